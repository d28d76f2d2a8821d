"""Class balancing of the training split: class weights, random resampling or SMOTE-style blending.

Only the training split is ever balanced. Resampling works on indices (imbalanced-learn samplers
fed a column of row numbers), so no image is copied: oversampling repeats row numbers. SMOTE-style
balancing adds synthetic minority samples as pairs of row numbers and a blend weight, and the input
pipeline blends the two images of a pair when it loads the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
from imblearn.over_sampling import RandomOverSampler
from imblearn.under_sampling import RandomUnderSampler
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.class_weight import compute_class_weight

__all__ = ["BALANCING_METHODS", "DEFAULT_SMOTE_K", "BalancedRows", "balance_rows"]

logger = logging.getLogger(__name__)

BALANCING_METHODS = ("none", "class_weight", "undersample", "oversample", "smote")
DEFAULT_SMOTE_K = 5

# Side in pixels of the thumbnails on which SMOTE finds neighbours. The nearest-neighbour search runs on
# 16 * 16 * 3 = 768 features per image instead of the full cached resolution.
THUMBNAIL_SIZE = 16
# Cached images read from the memmap at a time while thumbnails are made, which bounds the memory of that step.
_THUMBNAIL_CHUNK_ROWS = 256


@dataclass(frozen=True)
class BalancedRows:
    """Training rows after balancing, with their labels and per-row loss weights (None: unweighted).

    After SMOTE-style balancing, entry ``i`` is the blend ``(1 - blend_weights[i]) * image[rows[i]] +
    blend_weights[i] * image[partner_rows[i]]``. Original rows come first with a blend weight of 0 and
    themselves as partner, and the synthetic pairs follow. Other methods leave both fields None.
    """

    rows: np.ndarray  # (M,) int64 indices into the image cache; may repeat after oversampling
    labels: np.ndarray  # (M,) float32 in {0, 1}
    sample_weights: np.ndarray | None  # (M,) float32 or None
    class_weight: dict[int, float] | None
    partner_rows: np.ndarray | None = None  # (M,) int64 indices into the image cache, or None
    blend_weights: np.ndarray | None = None  # (M,) float32 in [0, 1], or None

    @property
    def num_synthetic(self) -> int:
        """Number of synthetic samples: the entries with a blend weight above 0."""
        return 0 if self.blend_weights is None else int(np.count_nonzero(self.blend_weights))


def balance_rows(rows: np.ndarray, labels: np.ndarray, *, method: str, seed: int = 0,
                 images: np.ndarray | None = None, smote_k: int = DEFAULT_SMOTE_K) -> BalancedRows:
    """Balance training rows by ``method``.

    Args:
        rows: (N,) int indices of the training images.
        labels: (N,) labels in {0, 1}, aligned with ``rows``.
        method: one of ``BALANCING_METHODS``. ``class_weight`` weights the loss by inverse class frequency
            ("balanced" weights). ``undersample`` and ``oversample`` draw rows at random to a 1:1 ratio.
            ``smote`` adds synthetic minority samples up to a 1:1 ratio. Each is a blend of a minority image
            and one of its ``smote_k`` nearest minority neighbours.
        seed: seed of the random samplers.
        images: (num_images, S, S, 3) uint8 in [0, 255], the image cache that ``rows`` index, usually a
            read-only memmap. Only ``smote`` needs it, and it reads the minority rows in chunks.
        smote_k: neighbours per minority image among which ``smote`` picks a partner, >= 1. Fewer are
            used when the minority class has at most ``smote_k`` images.
    """
    if method not in BALANCING_METHODS:
        raise ValueError(f"Invalid balancing method {method!r}: expected one of {', '.join(BALANCING_METHODS)}.")
    rows = np.asarray(rows, dtype=np.int64)
    labels = np.asarray(labels).astype(np.int64)
    if rows.shape != labels.shape:
        raise ValueError(f"rows {rows.shape} and labels {labels.shape} must have the same shape.")
    if len(np.unique(labels)) < 2:
        raise ValueError("Cannot balance a training split with a single class; check the label policy and split.")

    if method == "none":
        return BalancedRows(rows, labels.astype(np.float32), None, None)
    if method == "class_weight":
        weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
        class_weight = {0: float(weights[0]), 1: float(weights[1])}
        sample_weights = np.where(labels == 1, weights[1], weights[0]).astype(np.float32)
        return BalancedRows(rows, labels.astype(np.float32), sample_weights, class_weight)
    if method == "smote":
        return _smote_pairs(rows, labels, images=images, k=smote_k, seed=seed)

    sampler_type = RandomUnderSampler if method == "undersample" else RandomOverSampler
    sampler = sampler_type(sampling_strategy="auto", random_state=seed)
    resampled, resampled_labels = sampler.fit_resample(rows.reshape(-1, 1), labels)
    return BalancedRows(resampled.ravel().astype(np.int64), resampled_labels.astype(np.float32), None, None)


def _smote_pairs(rows: np.ndarray, labels: np.ndarray, *, images: np.ndarray | None, k: int,
                 seed: int) -> BalancedRows:
    """Draw one (minority row, neighbour row, blend weight) triple per missing minority sample.

    This is the SMOTE sampling rule applied to row numbers: the base image is drawn uniformly from the
    minority class, its partner uniformly from the base's k nearest minority neighbours, and the blend
    weight uniformly from [0, 1].
    """
    _check_smote_inputs(images, k, rows)
    counts = np.bincount(labels, minlength=2)
    minority_label = int(np.argmin(counts))
    minority_rows = rows[labels == minority_label]
    missing = int(counts.max() - counts.min())
    if minority_rows.shape[0] < 2:
        raise ValueError(
            f"smote balancing needs at least 2 training images of class {minority_label}, got "
            f"{minority_rows.shape[0]}. Use balancing 'oversample' or 'class_weight', or add images of that class.")

    neighbours = _minority_neighbours(images, minority_rows, k)
    rng = np.random.default_rng(seed)
    bases = rng.integers(0, minority_rows.shape[0], size=missing)
    choices = rng.integers(0, neighbours.shape[1], size=missing)
    first_rows = minority_rows[bases]
    second_rows = minority_rows[neighbours[bases, choices]]
    weights = rng.uniform(0.0, 1.0, size=missing).astype(np.float32)
    logger.debug("SMOTE: %d synthetic samples of class %d from %d images, %d neighbours each",
                 missing, minority_label, minority_rows.shape[0], neighbours.shape[1])

    all_labels = np.concatenate([labels, np.full(missing, minority_label)]).astype(np.float32)
    return BalancedRows(
        rows=np.concatenate([rows, first_rows]),
        labels=all_labels,
        sample_weights=None,
        class_weight=None,
        partner_rows=np.concatenate([rows, second_rows]),
        blend_weights=np.concatenate([np.zeros(rows.shape[0], dtype=np.float32), weights]),
    )


def _check_smote_inputs(images: np.ndarray | None, k: int, rows: np.ndarray) -> None:
    if images is None:
        raise ValueError("smote balancing needs the image cache: pass images=cache.images to balance_rows.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"Invalid smote_k {k!r}: expected an integer number of neighbours >= 1, such as 5.")
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, S, S, 3) uint8, got shape {images.shape} and dtype {images.dtype}.")
    if rows.min() < 0 or rows.max() >= images.shape[0]:
        raise ValueError(f"rows must be in [0, {images.shape[0] - 1}] to index images, "
                         f"got values from {rows.min()} to {rows.max()}.")


def _minority_neighbours(images: np.ndarray, minority_rows: np.ndarray, k: int) -> np.ndarray:
    """Return (n, min(k, n - 1)) positions in ``minority_rows`` of each image's nearest other minority images."""
    thumbnails = _thumbnails(images, minority_rows)
    neighbour_count = min(k, minority_rows.shape[0] - 1)
    if neighbour_count < k:
        logger.warning("smote_k %d is not below the %d minority images; using %d neighbours.",
                       k, minority_rows.shape[0], neighbour_count)
    search = NearestNeighbors(n_neighbors=neighbour_count).fit(thumbnails)
    # Without a query, kneighbors leaves each point out of its own neighbour list.
    return search.kneighbors(return_distance=False)


def _thumbnails(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Return (len(rows), 768) float32 features: each image shrunk to 16 x 16 px by area averaging."""
    features = np.empty((rows.shape[0], THUMBNAIL_SIZE * THUMBNAIL_SIZE * 3), dtype=np.float32)
    for start in range(0, rows.shape[0], _THUMBNAIL_CHUNK_ROWS):
        chunk = np.asarray(images[rows[start:start + _THUMBNAIL_CHUNK_ROWS]])
        for offset, image in enumerate(chunk):
            small = cv2.resize(image, (THUMBNAIL_SIZE, THUMBNAIL_SIZE), interpolation=cv2.INTER_AREA)
            features[start + offset] = small.reshape(-1)
    return features
