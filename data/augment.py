"""Albumentations presets for dermoscopy images, scaled by one intensity knob.

A dermoscopy image has no "up", because the lesion may be photographed at
any angle, so all eight flips and 90-degree rotations preserve the label.
The presets add the usual affine, colour, blur and dropout transforms, plus
two artefacts of real dermoscopy that a classifier should learn to ignore:
body hair over the lesion (`SimulatedHair`) and the dark round border of a
contact dermatoscope (`MicroscopeVignette`).
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Annotated, Any

import albumentations as A
import cv2
import numpy as np
from albumentations.core.pydantic import check_range_bounds, nondecreasing
from albumentations.core.transforms_interface import BaseTransformInitSchema
from pydantic import AfterValidator, Field

logger = logging.getLogger(__name__)

# Magnitudes that are measured in pixels (blur sigma, hair width) are given
# for this image side and scaled linearly for other sizes.
_REFERENCE_IMAGE_SIZE = 224

# Number of points sampled along each hair strand, which is drawn as a polyline through them.
_POINTS_PER_STRAND = 24

# cv2.polylines takes integer coordinates, so the points carry 4 fractional
# bits (its `shift` argument) to place anti-aliased strands at sub-pixel positions.
_SUBPIXEL_BITS = 4


# OpenCV versions of the eight group elements of albumentations' D4 transform.
# np.rot90 and transposes return strided views that Albumentations then copies
# element by element. For a 90-degree rotation of a 224 px uint8 RGB image that
# takes about 0.13 ms against 0.013 ms for cv2.rotate (albumentations 2.0.8).
_OPENCV_SQUARE_SYMMETRIES = {
    "e": lambda image: image,
    "r90": lambda image: cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE),
    "r180": lambda image: cv2.rotate(image, cv2.ROTATE_180),
    "r270": lambda image: cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE),
    "v": lambda image: cv2.flip(image, 0),
    "hvt": lambda image: cv2.flip(cv2.transpose(image), -1),
    "h": lambda image: cv2.flip(image, 1),
    "t": cv2.transpose,
}


class _OpenCVSquareSymmetry(A.SquareSymmetry):
    """SquareSymmetry whose image path uses OpenCV, with the same draws and results."""

    def apply(self, img: np.ndarray, group_element: str, **params: Any) -> np.ndarray:
        # OpenCV drops a trailing channel axis of size 1, so such images take the NumPy path.
        if img.dtype in (np.uint8, np.float32) and img.ndim == 3 and img.shape[2] in (3, 4):
            return _OPENCV_SQUARE_SYMMETRIES[group_element](img)
        return super().apply(img, group_element=group_element, **params)


class SimulatedHair(A.ImageOnlyTransform):
    """Draw thin, dark, curved strands over the image, like body hair in dermoscopy.

    Each strand is a quadratic Bezier curve that starts at a random point,
    runs in a random direction and may leave the frame. Strands are drawn
    with anti-aliasing in dark brown to black and blended at partial
    opacity, so the skin under a strand stays faintly visible.

    Args:
        num_hairs_range: minimum and maximum number of strands per image, inclusive.
        thickness_range: minimum and maximum strand width in pixels, inclusive.
        opacity_range: range of the blending weight of the strands, in [0, 1].
        p: probability of applying the transform.

    Targets: image. Works on uint8 and float32 images of any size; the output
    has the input's shape and dtype.
    """

    class InitSchema(BaseTransformInitSchema):
        num_hairs_range: Annotated[
            tuple[int, int], AfterValidator(check_range_bounds(1, None)), AfterValidator(nondecreasing)
        ]
        thickness_range: Annotated[
            tuple[int, int], AfterValidator(check_range_bounds(1, None)), AfterValidator(nondecreasing)
        ]
        opacity_range: Annotated[
            tuple[float, float], AfterValidator(check_range_bounds(0, 1)), AfterValidator(nondecreasing)
        ]

    def __init__(
        self,
        num_hairs_range: tuple[int, int] = (1, 8),
        thickness_range: tuple[int, int] = (1, 2),
        opacity_range: tuple[float, float] = (0.6, 0.95),
        p: float = 0.5,
    ):
        super().__init__(p=p)
        self.num_hairs_range = num_hairs_range
        self.thickness_range = thickness_range
        self.opacity_range = opacity_range

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        rng = self.random_generator
        num_hairs = int(rng.integers(self.num_hairs_range[0], self.num_hairs_range[1] + 1))

        strands = list(_draw_strands(rng, num_hairs, height=height, width=width))
        thicknesses = rng.integers(self.thickness_range[0], self.thickness_range[1] + 1, size=num_hairs)
        # A low grey level with less green and blue than red gives dark brown to black hair.
        grey_levels = rng.uniform(10.0, 60.0, size=num_hairs)
        colors = [(float(g), float(0.8 * g), float(0.6 * g)) for g in grey_levels]
        opacity = float(rng.uniform(*self.opacity_range))
        return {"strands": strands, "thicknesses": thicknesses.tolist(), "colors": colors, "opacity": opacity}

    def apply(
        self,
        img: np.ndarray,
        strands: list[np.ndarray],
        thicknesses: list[int],
        colors: list[tuple[float, float, float]],
        opacity: float,
        **params: Any,
    ) -> np.ndarray:
        overlay = img.copy()
        color_scale = 1.0 if img.dtype == np.uint8 else 1.0 / 255.0
        for points, thickness, color in zip(strands, thicknesses, colors):
            cv2.polylines(
                overlay,
                [points],
                isClosed=False,
                color=tuple(c * color_scale for c in color),
                thickness=int(thickness),
                lineType=cv2.LINE_AA,
                shift=_SUBPIXEL_BITS,
            )
        return cv2.addWeighted(overlay, opacity, img, 1.0 - opacity, 0.0)


class MicroscopeVignette(A.ImageOnlyTransform):
    """Darken the image outside a circle, like the round field of view of a contact dermatoscope.

    Distances are in units of half the shorter image side, so a radius of 1.0
    touches the nearest edges and sqrt(2) (about 1.414) reaches the corners of
    a square image. Pixels inside the circle are unchanged, pixels beyond
    `radius + softness` lose `darkness` of their brightness, and the gain
    falls linearly in between.

    Args:
        radius_range: range of the circle radius, in half-sides, > 0.
        softness_range: range of the width of the transition, in half-sides, > 0.
        darkness_range: range of the fraction of brightness removed outside the circle, in [0, 1] (1 is black).
        center_shift_limit: maximum shift of the circle centre along each axis, in half-sides, >= 0.
        p: probability of applying the transform.

    Targets: image. Works on uint8 and float32 images; the output has the
    input's shape and dtype.
    """

    class InitSchema(BaseTransformInitSchema):
        radius_range: Annotated[
            tuple[float, float],
            AfterValidator(check_range_bounds(0, None, min_inclusive=False)),
            AfterValidator(nondecreasing),
        ]
        softness_range: Annotated[
            tuple[float, float],
            AfterValidator(check_range_bounds(0, None, min_inclusive=False)),
            AfterValidator(nondecreasing),
        ]
        darkness_range: Annotated[
            tuple[float, float], AfterValidator(check_range_bounds(0, 1)), AfterValidator(nondecreasing)
        ]
        center_shift_limit: float = Field(ge=0)

    def __init__(
        self,
        radius_range: tuple[float, float] = (0.9, 1.4),
        softness_range: tuple[float, float] = (0.05, 0.2),
        darkness_range: tuple[float, float] = (0.8, 1.0),
        center_shift_limit: float = 0.05,
        p: float = 0.5,
    ):
        super().__init__(p=p)
        self.radius_range = radius_range
        self.softness_range = softness_range
        self.darkness_range = darkness_range
        self.center_shift_limit = center_shift_limit

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator
        shift = self.center_shift_limit
        return {
            "radius": float(rng.uniform(*self.radius_range)),
            "softness": float(rng.uniform(*self.softness_range)),
            "darkness": float(rng.uniform(*self.darkness_range)),
            "center_shift": (float(rng.uniform(-shift, shift)), float(rng.uniform(-shift, shift))),
        }

    def apply(
        self,
        img: np.ndarray,
        radius: float,
        softness: float,
        darkness: float,
        center_shift: tuple[float, float],
        **params: Any,
    ) -> np.ndarray:
        height, width = img.shape[:2]
        half_side = min(height, width) / 2.0
        center_y = (height - 1) / 2.0 + center_shift[0] * half_side
        center_x = (width - 1) / 2.0 + center_shift[1] * half_side

        # Separable squared offsets, summed by broadcasting and kept in float32 for speed.
        squared_dy = ((np.arange(height, dtype=np.float32) - center_y) / half_side) ** 2
        squared_dx = ((np.arange(width, dtype=np.float32) - center_x) / half_side) ** 2
        distance = np.sqrt(squared_dy[:, np.newaxis] + squared_dx[np.newaxis, :])
        outside = np.clip((distance - radius) * np.float32(1.0 / softness), 0.0, 1.0, out=distance)
        gain = np.float32(1.0) - np.float32(darkness) * outside

        channels = img.shape[2] if img.ndim == 3 else 0
        if img.dtype == np.uint8 and channels in (0, 3, 4):
            # cv2.multiply rounds and saturates to uint8 in one pass, about twice as fast as
            # NumPy's float32 product and cast at 224 px. OpenCV would drop a channel axis of
            # size 1, so other channel counts take the NumPy path.
            if channels:
                gain = cv2.merge([gain] * channels)
            return cv2.multiply(img, gain, dtype=cv2.CV_8U)

        if img.ndim == 3:
            gain = gain[..., np.newaxis]
        darkened = img * gain
        if img.dtype == np.uint8:
            # The gain is in [0, 1], so the product stays in [0, 255] and adding 0.5 before truncation rounds it.
            darkened += np.float32(0.5)
        return darkened.astype(img.dtype)


def build_augmentation(intensity: float, *, image_size: int) -> A.Compose | None:
    """Build the training augmentation for dermoscopy images at one intensity.

    Each transform's probability grows linearly from 0 at intensity 0 to its
    maximum at 1, so a search over intensity moves smoothly from no
    augmentation to the strongest preset. The range of each main magnitude
    (angle, shift, scale, colour jitter, blur sigma, number of hairs, vignette
    radius, number and size of holes) grows linearly too. Hair width and
    opacity and vignette softness and darkness have fixed ranges.

    At intensity 1 every image gets one of the eight flips and rotations of
    the square, the identity included, drawn uniformly. With lower
    probabilities it also gets an affine transform (shift up to 10 %, scale
    by up to 20 %, rotation up to 45 degrees, reflected borders) and
    simulated hair. Brightness, contrast, hue and saturation jitter, Gaussian
    blur, a microscope vignette and coarse dropout follow, in that order.

    Args:
        intensity: strength of the augmentation, in [0, 1], where 0 returns None (no augmentation).
        image_size: side of the square images the preset will see, in pixels, >= 1. It
            scales the magnitudes measured in pixels (blur sigma, hair width).

    Returns:
        An `albumentations.Compose` that maps a `(image_size, image_size, 3)` uint8
        image in [0, 255] to an image of the same shape and dtype, or None at intensity 0.

    Raises:
        TypeError: if intensity is not a real number or image_size is not an integer.
        ValueError: if intensity is NaN or outside [0, 1], or image_size is below 1.
    """
    _check_intensity(intensity)
    _check_image_size(image_size)
    if intensity == 0:
        logger.debug("Augmentation off (intensity 0)")
        return None

    strength = float(intensity)
    pixel_scale = image_size / _REFERENCE_IMAGE_SIZE
    transforms = [
        *_geometric_transforms(strength),
        _hair_transform(strength, pixel_scale),
        *_photometric_transforms(strength, pixel_scale),
        *_occlusion_transforms(strength),
    ]
    logger.debug("Built augmentation preset at intensity %.3f for %d px images", strength, image_size)
    return A.Compose(transforms)


def _geometric_transforms(strength: float) -> list[A.BasicTransform]:
    return [
        _OpenCVSquareSymmetry(p=strength),
        A.Affine(
            translate_percent=(-0.10 * strength, 0.10 * strength),
            scale=(1.0 - 0.20 * strength, 1.0 + 0.20 * strength),
            rotate=(-45.0 * strength, 45.0 * strength),
            border_mode=cv2.BORDER_REFLECT_101,
            p=0.75 * strength,
        ),
    ]


def _hair_transform(strength: float, pixel_scale: float) -> SimulatedHair:
    max_thickness = max(1, round(2 * pixel_scale))
    return SimulatedHair(
        num_hairs_range=(1, max(1, round(10 * strength))),
        thickness_range=(1, max_thickness),
        opacity_range=(0.6, 0.95),
        p=0.4 * strength,
    )


def _photometric_transforms(strength: float, pixel_scale: float) -> list[A.BasicTransform]:
    max_sigma = max(0.1, 1.5 * strength * pixel_scale)
    return [
        A.RandomBrightnessContrast(
            brightness_limit=(-0.25 * strength, 0.25 * strength),
            contrast_limit=(-0.25 * strength, 0.25 * strength),
            p=0.75 * strength,
        ),
        # Hue is in OpenCV units for uint8 images (0 to 179, 2 degrees per unit).
        A.HueSaturationValue(
            hue_shift_limit=(-8.0 * strength, 8.0 * strength),
            sat_shift_limit=(-20.0 * strength, 20.0 * strength),
            val_shift_limit=(-15.0 * strength, 15.0 * strength),
            p=0.5 * strength,
        ),
        A.GaussianBlur(sigma_limit=(0.1, max_sigma), p=0.3 * strength),
        MicroscopeVignette(
            radius_range=(1.4 - 0.5 * strength, 1.4),
            softness_range=(0.05, 0.2),
            darkness_range=(0.8, 1.0),
            center_shift_limit=0.05,
            p=0.3 * strength,
        ),
    ]


def _occlusion_transforms(strength: float) -> list[A.BasicTransform]:
    max_hole_fraction = 0.03 + 0.09 * strength
    return [
        A.CoarseDropout(
            num_holes_range=(1, max(1, round(6 * strength))),
            hole_height_range=(0.03, max_hole_fraction),
            hole_width_range=(0.03, max_hole_fraction),
            fill=0,
            p=0.5 * strength,
        ),
    ]


def _draw_strands(rng: np.random.Generator, count: int, *, height: int, width: int) -> np.ndarray:
    """Sample `count` hair strands as `(count, _POINTS_PER_STRAND, 1, 2)` int32 (x, y) points in fixed point."""
    # All strands are drawn in one set of array operations. One strand at a time cost about 0.03 ms of Python
    # per image at intensity 0.5 (profiled), while the other augmentation threads waited for the GIL.
    longer_side = max(height, width)
    start = rng.uniform((0.0, 0.0), (width, height), size=(count, 2))
    angle = rng.uniform(0.0, 2.0 * math.pi, size=count)
    length = rng.uniform(0.3, 0.9, size=count) * longer_side
    direction = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    end = start + length[:, np.newaxis] * direction

    # The control point sits off the chord's midpoint, which bends the strand.
    normal = np.stack([-direction[:, 1], direction[:, 0]], axis=1)
    bend = rng.uniform(-0.25, 0.25, size=count) * length
    control = (start + end) / 2.0 + bend[:, np.newaxis] * normal

    steps = np.linspace(0.0, 1.0, _POINTS_PER_STRAND)[np.newaxis, :, np.newaxis]
    start, control, end = start[:, np.newaxis], control[:, np.newaxis], end[:, np.newaxis]
    curve = (1 - steps) ** 2 * start + 2 * (1 - steps) * steps * control + steps**2 * end
    return np.rint(curve * (1 << _SUBPIXEL_BITS)).astype(np.int32).reshape(count, -1, 1, 2)


def _check_intensity(intensity: float) -> None:
    if isinstance(intensity, bool) or not isinstance(intensity, numbers.Real):
        raise TypeError(
            f"intensity must be a real number in [0, 1], got {intensity!r} of type {type(intensity).__name__}. "
            "Pass a float such as 0.5."
        )
    if math.isnan(intensity) or not 0.0 <= intensity <= 1.0:
        raise ValueError(
            f"intensity must be in [0, 1] (0 turns augmentation off, 1 is the strongest preset), got {intensity!r}. "
            "Pass a value in [0, 1], for example by bounding the search space to that range."
        )


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral):
        raise TypeError(
            f"image_size must be an integer number of pixels, got {image_size!r} of type "
            f"{type(image_size).__name__}. Pass the side of the square images, such as 224."
        )
    if image_size < 1:
        raise ValueError(
            f"image_size must be at least 1 pixel, got {image_size}. Pass the side of the square images, such as 224."
        )
