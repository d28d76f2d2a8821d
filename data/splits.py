"""Train/validation/test splits grouped by patient or lesion and stratified by label.

All images of one group (patient, else lesion, else the image itself) land in the same split, so that
a model is never validated or tested on a lesion it was trained on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from data.io import write_parquet_atomic

__all__ = ["SPLITS", "SplitFractions", "assign_splits", "read_manifest", "write_manifest"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SplitFractions:
    """Share of images in the validation and test splits; the rest is training data."""

    validation: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        for name in ("validation", "test"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
                raise ValueError(f"Invalid {name} fraction {value!r}: expected a number in (0, 1), e.g. 0.15.")
        if self.validation + self.test >= 0.9:
            raise ValueError(
                f"Validation ({self.validation}) and test ({self.test}) fractions add up to "
                f"{self.validation + self.test:.2f}, leaving too little training data: keep their sum below 0.9."
            )


def _take_one_fold(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Return a boolean mask of about ``fraction`` of the rows, whole groups only, stratified by label."""
    n_splits = max(2, round(1.0 / fraction))
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise ValueError(
            f"Cannot split {n_groups} groups into folds of {fraction:.0%}: at least {n_splits} groups are needed. "
            "Use a larger dataset or larger validation/test fractions."
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held_out = next(splitter.split(np.zeros(len(labels)), labels, groups))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held_out] = True
    return mask


def assign_splits(records: pd.DataFrame, *, fractions: SplitFractions = SplitFractions(), seed: int = 0) -> pd.Series:
    """Assign each record to ``train``, ``validation`` or ``test``.

    Args:
        records: one row per image with ``label`` (0/1) and ``group`` columns.
        fractions: validation and test shares of the images (approximate: whole groups move together).
        seed: the same seed and records give the same split.

    Returns:
        A categorical Series aligned with ``records`` whose values are the split names.
    """
    labels = records["label"].to_numpy()
    groups = records["group"].astype(str).to_numpy()
    if len(np.unique(labels)) < 2:
        raise ValueError("Cannot stratify the split: the dataset has only one class. "
                         "Check the label policy (--positive-class) and the metadata.")

    is_test = _take_one_fold(labels, groups, fractions.test, seed)
    remaining = np.flatnonzero(~is_test)
    validation_share = fractions.validation / (1.0 - fractions.test)
    is_validation_of_rest = _take_one_fold(labels[remaining], groups[remaining], validation_share, seed + 1)

    split = np.full(len(records), "train", dtype=object)
    split[is_test] = "test"
    split[remaining[is_validation_of_rest]] = "validation"
    result = pd.Series(pd.Categorical(split, categories=list(SPLITS)), index=records.index, name="split")
    for name in ("validation", "test"):
        if labels[(result == name).to_numpy()].sum() == 0:
            logger.warning("The %s split has no positive image, so its metrics are undefined. Use more data.", name)
    return result


def write_manifest(records: pd.DataFrame, split: pd.Series, path: str | os.PathLike) -> pd.DataFrame:
    """Write the split manifest (one row per image: id, path, label, group, split, metadata) as Parquet."""
    manifest = records.assign(split=split).reset_index(drop=True)
    write_parquet_atomic(manifest, Path(path))
    return manifest


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a manifest written by :func:`write_manifest`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Split manifest {path} not found; it is written when a search starts.")
    manifest = pd.read_parquet(path)
    manifest["split"] = pd.Categorical(manifest["split"], categories=list(SPLITS))
    return manifest
