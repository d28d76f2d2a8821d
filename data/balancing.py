"""Class balancing of the training split: class weights or random resampling of row indices.

Only the training split is ever balanced. Resampling works on indices (imbalanced-learn samplers
fed a column of row numbers), so no image is copied: oversampling repeats row numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from imblearn.over_sampling import RandomOverSampler
from imblearn.under_sampling import RandomUnderSampler
from sklearn.utils.class_weight import compute_class_weight

__all__ = ["BALANCING_METHODS", "BalancedRows", "balance_rows"]

BALANCING_METHODS = ("none", "class_weight", "undersample", "oversample")


@dataclass(frozen=True)
class BalancedRows:
    """Training rows after balancing, with their labels and per-row loss weights (None: unweighted)."""

    rows: np.ndarray  # (M,) int64 indices into the image cache; may repeat after oversampling
    labels: np.ndarray  # (M,) float32 in {0, 1}
    sample_weights: np.ndarray | None  # (M,) float32 or None
    class_weight: dict[int, float] | None


def balance_rows(rows: np.ndarray, labels: np.ndarray, *, method: str, seed: int = 0) -> BalancedRows:
    """Balance training rows by ``method``.

    Args:
        rows: (N,) int indices of the training images.
        labels: (N,) labels in {0, 1}, aligned with ``rows``.
        method: one of ``BALANCING_METHODS``. ``class_weight`` weights the loss by inverse class frequency
            ("balanced" weights); ``undersample`` and ``oversample`` draw rows at random to a 1:1 ratio.
        seed: seed of the random samplers.
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

    sampler_type = RandomUnderSampler if method == "undersample" else RandomOverSampler
    sampler = sampler_type(sampling_strategy="auto", random_state=seed)
    resampled, resampled_labels = sampler.fit_resample(rows.reshape(-1, 1), labels)
    return BalancedRows(resampled.ravel().astype(np.int64), resampled_labels.astype(np.float32), None, None)
