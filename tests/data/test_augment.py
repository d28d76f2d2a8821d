import math
import random

import albumentations as A
import numpy as np
import pytest

from data.augment import MicroscopeVignette, SimulatedHair, _OpenCVSquareSymmetry, build_augmentation


def _textured_images(count: int, size: int, *, seed: int = 0) -> np.ndarray:
    """Return `(count, size, size, 3)` uint8 images: smooth gradients plus noise, like skin with a lesion."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(60, 200, size, dtype=np.float32)
    base = (ramp[np.newaxis, :, np.newaxis] + ramp[:, np.newaxis, np.newaxis]) / 2
    noise = rng.normal(0, 20, size=(count, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _augment(augmentation: A.Compose, image: np.ndarray, seed: int) -> np.ndarray:
    augmentation.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return augmentation(image=image)["image"]


def _mean_abs_change(intensity: float, images: np.ndarray) -> float:
    augmentation = build_augmentation(intensity, image_size=images.shape[1])
    if augmentation is None:
        return 0.0
    changes = [
        np.abs(_augment(augmentation, image, seed).astype(np.float32) - image).mean()
        for seed, image in enumerate(images)
    ]
    return float(np.mean(changes))


def test_build_augmentation_zero_returns_none():
    assert build_augmentation(0.0, image_size=224) is None
    assert build_augmentation(0, image_size=224) is None


@pytest.mark.parametrize("image_size", [48, 33])
@pytest.mark.parametrize("intensity", [0.01, 0.3, 0.7, 1.0])
def test_build_augmentation_keeps_shape_and_dtype(intensity, image_size):
    augmentation = build_augmentation(intensity, image_size=image_size)
    image = _textured_images(1, image_size)[0]

    for seed in range(50):
        augmented = _augment(augmentation, image, seed)
        assert augmented.shape == image.shape
        assert augmented.dtype == np.uint8


def test_build_augmentation_change_grows_with_intensity():
    images = _textured_images(32, 48)

    weak = _mean_abs_change(0.2, images)
    strong = _mean_abs_change(1.0, images)

    assert 0.0 < weak
    assert weak < strong


def test_build_augmentation_seeded_output_repeats():
    augmentation = build_augmentation(1.0, image_size=48)
    image = _textured_images(1, 48)[0]

    first = _augment(augmentation, image, seed=7)
    second = _augment(augmentation, image, seed=7)

    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("intensity", [-0.1, 1.5, math.nan, math.inf])
def test_build_augmentation_intensity_out_of_range(intensity):
    with pytest.raises(ValueError, match=r"intensity must be in \[0, 1\].*got"):
        build_augmentation(intensity, image_size=224)


@pytest.mark.parametrize("intensity", ["0.5", True, None])
def test_build_augmentation_intensity_not_number(intensity):
    with pytest.raises(TypeError, match="intensity must be a real number"):
        build_augmentation(intensity, image_size=224)


def test_build_augmentation_rejects_invalid_image_size():
    with pytest.raises(ValueError, match="image_size must be at least 1 pixel, got 0"):
        build_augmentation(0.5, image_size=0)
    with pytest.raises(TypeError, match="image_size must be an integer"):
        build_augmentation(0.5, image_size=224.0)


def test_simulated_hair_darkens_pixels():
    image = np.full((64, 64, 3), 200, dtype=np.uint8)
    hair = SimulatedHair(num_hairs_range=(3, 3), p=1.0)
    hair.set_random_seed(0)

    augmented = hair(image=image)["image"]

    assert augmented.shape == image.shape
    assert augmented.dtype == np.uint8
    assert (augmented < image).any(axis=-1).sum() > 64
    assert (augmented <= image).all()


def test_simulated_hair_keeps_float_dtype():
    image = np.full((32, 32, 3), 0.8, dtype=np.float32)
    hair = SimulatedHair(p=1.0)
    hair.set_random_seed(0)

    augmented = hair(image=image)["image"]

    assert augmented.dtype == np.float32
    assert augmented.shape == image.shape
    assert augmented.min() < 0.8


def test_microscope_vignette_darkens_corners():
    image = np.full((64, 64, 3), 200, dtype=np.uint8)
    vignette = MicroscopeVignette(
        radius_range=(1.0, 1.0),
        softness_range=(0.05, 0.05),
        darkness_range=(1.0, 1.0),
        center_shift_limit=0.0,
        p=1.0,
    )

    augmented = vignette(image=image)["image"]

    assert augmented.shape == image.shape
    assert augmented.dtype == np.uint8
    np.testing.assert_array_equal(augmented[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(augmented[63, 63], [0, 0, 0])
    np.testing.assert_array_equal(augmented[28:36, 28:36], image[28:36, 28:36])


def test_microscope_vignette_keeps_float_dtype():
    image = np.full((32, 32, 3), 0.8, dtype=np.float32)
    vignette = MicroscopeVignette(radius_range=(0.9, 0.9), p=1.0)

    augmented = vignette(image=image)["image"]

    assert augmented.dtype == np.float32
    assert augmented[0, 0].max() < 0.8


@pytest.mark.parametrize("shape", [(40, 56, 3), (40, 56, 4), (40, 56, 1), (40, 56)])
def test_vignette_uint8_matches_float_path(shape):
    image = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    params = {"radius": 0.8, "softness": 0.3, "darkness": 0.7, "center_shift": (0.04, -0.03)}

    augmented = MicroscopeVignette(p=1.0).apply(image, **params)
    reference = MicroscopeVignette(p=1.0).apply(image.astype(np.float32), **params)

    assert augmented.shape == image.shape
    assert augmented.dtype == np.uint8
    # Rounding the float result to the nearest integer may differ by one where it ends in .5.
    assert np.abs(augmented.astype(np.int16) - np.rint(reference).astype(np.int16)).max() <= 1
    assert (augmented != image).any()


@pytest.mark.parametrize("group_element", ["e", "r90", "r180", "r270", "v", "hvt", "h", "t"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("shape", [(6, 9, 3), (6, 9, 4), (5, 5, 1), (5, 7)])
def test_opencv_square_symmetry_matches_albumentations(group_element, shape, dtype):
    image = np.random.default_rng(0).integers(0, 256, size=shape).astype(dtype)

    expected = A.SquareSymmetry(p=1.0).apply(image, group_element=group_element)
    actual = _OpenCVSquareSymmetry(p=1.0).apply(image, group_element=group_element)

    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize(
    ("make_transform", "field"),
    [
        (lambda: SimulatedHair(num_hairs_range=(3, 1)), "num_hairs_range"),
        (lambda: SimulatedHair(opacity_range=(0.5, 1.5)), "opacity_range"),
        (lambda: MicroscopeVignette(softness_range=(0.0, 0.1)), "softness_range"),
        (lambda: MicroscopeVignette(center_shift_limit=-0.1), "center_shift_limit"),
    ],
)
def test_dermoscopy_transforms_reject_invalid_ranges(make_transform, field):
    with pytest.raises(ValueError, match=field):
        make_transform()
