"""Score new images with a model folder written by ``lesiontune results export-model``.

Images are decoded by :func:`data.cache.build_image_cache`, into a temporary cache, so that they get
exactly the decoding, EXIF rotation, RGB conversion and resizing that the training images got. A file
that cannot be decoded gets a row with the reason in ``error`` and does not stop the others.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data.cache import build_image_cache

__all__ = ["IMAGE_SUFFIXES", "ExportedModel", "collect_image_paths", "load_exported_model", "predict_images",
           "predict_scores", "write_predictions"]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
PREPROCESSING_FILE = "preprocessing.json"
THRESHOLD_FILE = "threshold.json"
OUTPUT_SUFFIXES = (".csv", ".parquet")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")

# Below this many images the decoding runs in this process: starting a pool of worker processes
# costs more than it saves.
_MIN_IMAGES_FOR_WORKER_POOL = 64


@dataclass(frozen=True)
class ExportedModel:
    """A loaded model folder.

    Attributes:
        path: the folder.
        model: the Keras model, input ``(batch, image_size, image_size, 3)`` float32 in [0, 255], output
            ``(batch, 1)`` probability of the positive class.
        image_size: side of the square input, in pixels.
        resize_rule: ``"center_crop"`` or ``"pad"``, as in :func:`data.cache.build_image_cache`.
        threshold: a score >= threshold is a positive decision.
    """

    path: Path
    model: Any
    image_size: int
    resize_rule: str
    threshold: float


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} not found in {path.parent}: the folder is not a model exported by "
                                "'lesiontune results export-model RUN --trial ID DIR'.")
    return path


def _read_json(path: Path) -> dict:
    return json.loads(_require_file(path).read_text(encoding="utf-8"))


def load_exported_model(model_dir: str | os.PathLike) -> ExportedModel:
    """Load ``model.keras`` with its preprocessing and threshold files.

    Raises:
        FileNotFoundError: the folder or one of its three files is missing.
        ValueError: the model's input size differs from ``preprocessing.json``.
    """
    import keras

    import trainables.model  # noqa: F401  (registers BackbonePreprocessing for deserialisation)

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"Model folder {model_dir} not found. Create one with "
                                "'lesiontune results export-model RUN --trial ID DIR'.")
    preprocessing = _read_json(model_dir / PREPROCESSING_FILE)
    threshold = _read_json(model_dir / THRESHOLD_FILE)
    model = keras.models.load_model(_require_file(model_dir / MODEL_FILE))

    image_size = int(preprocessing["image_size"])
    input_shape = tuple(model.input_shape[1:])
    if input_shape != (image_size, image_size, 3):
        raise ValueError(f"{model_dir / MODEL_FILE} takes inputs of shape {input_shape} but {PREPROCESSING_FILE} "
                         f"gives image_size {image_size}. Export the model again.")
    return ExportedModel(path=model_dir, model=model, image_size=image_size,
                         resize_rule=str(preprocessing["resize_rule"]), threshold=float(threshold["threshold"]))


def predict_scores(model: Any, images: np.ndarray, rows: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """Return the model's positive-class probability for each of ``rows`` of ``images``.

    Args:
        model: a Keras classifier with input float32 pixels in [0, 255] and output ``(batch, 1)``.
        images: ``(N, S, S, 3)`` uint8 in [0, 255], usually an image-cache memmap. Only ``rows`` are read.
        rows: ``(M,)`` integer indices into ``images``.
        batch_size: images per forward pass (>= 1).

    Returns:
        ``(M,)`` float32 scores in [0, 1], in the order of ``rows``.
    """
    if batch_size < 1:
        raise ValueError(f"Invalid batch_size {batch_size!r}: expected an integer >= 1.")
    rows = np.asarray(rows, dtype=np.int64)
    scores = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        batch = np.asarray(images[rows[start:start + batch_size]], dtype=np.float32)
        scores[start:start + len(batch)] = np.asarray(model(batch, training=False)).reshape(-1)
    return scores


def collect_image_paths(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into image files: a folder gives its image files, recursively, sorted.

    A file given by name is kept whatever its suffix (and even when missing), so that it gets a row with
    an error. In folders only files ending in one of ``IMAGE_SUFFIXES`` (any case) count.

    Raises:
        ValueError: no inputs, or nothing to score after expanding the folders.
    """
    if not inputs:
        raise ValueError("No images given: pass image files or folders.")
    paths: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                logger.warning("Folder %s contains no image files (%s)", path, ", ".join(IMAGE_SUFFIXES))
            paths.extend(found)
        else:
            paths.append(path)
    if not paths:
        raise ValueError(f"The folders {', '.join(map(str, inputs))} contain no image files "
                         f"({', '.join(IMAGE_SUFFIXES)}).")
    return paths


def predict_images(model_dir: str | os.PathLike | ExportedModel, inputs: Sequence[str | os.PathLike], *,
                   batch_size: int = 32) -> pd.DataFrame:
    """Score image files and folders with an exported model.

    Returns:
        One row per image, in input order, with columns ``path`` (str), ``score`` (float64 in [0, 1],
        NaN when the image could not be decoded), ``decision`` (nullable bool, score >= threshold),
        ``threshold`` (float64) and ``error`` (str, missing when the image was scored).
    """
    exported = model_dir if isinstance(model_dir, ExportedModel) else load_exported_model(model_dir)
    paths = collect_image_paths(inputs)
    workers = 1 if len(paths) < _MIN_IMAGES_FOR_WORKER_POOL else None

    with tempfile.TemporaryDirectory(prefix="lesiontune-predict-") as cache_root:
        cache = build_image_cache(paths, [str(i) for i in range(len(paths))], image_size=exported.image_size,
                                  cache_root=cache_root, resize_rule=exported.resize_rule, workers=workers,
                                  progress=False)
        decoded = np.flatnonzero(cache.ok)
        scores = np.full(len(paths), np.nan)
        scores[decoded] = predict_scores(exported.model, cache.images, decoded, batch_size=batch_size)
        reasons = dict(zip(cache.skipped["image_id"].astype(int), cache.skipped["reason"]))
        del cache

    decision = pd.array([None if np.isnan(s) else bool(s >= exported.threshold) for s in scores], dtype="boolean")
    error = pd.array([reasons.get(i) for i in range(len(paths))], dtype="string")
    logger.info("Scored %d of %d images with %s", len(decoded), len(paths), exported.path)
    return pd.DataFrame({"path": [str(p) for p in paths], "score": scores, "decision": decision,
                         "threshold": exported.threshold, "error": error})


def write_predictions(predictions: pd.DataFrame, output: str | os.PathLike) -> Path:
    """Write predictions as CSV or Parquet, chosen by the suffix of ``output``.

    Raises:
        ValueError: the suffix is neither ``.csv`` nor ``.parquet``.
    """
    output = Path(output)
    suffix = output.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"Invalid output file {output}: the name must end in .csv or .parquet.")
    output.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        predictions.to_csv(output, index=False)
    else:
        predictions.to_parquet(output, index=False)
    return output
