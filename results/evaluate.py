"""Evaluate the best trials of a run once on the held-out test split.

The best K finished trials are rebuilt from their best checkpoints and score the test images. Each
metric gets a percentile interval from a group bootstrap: the resamples draw whole groups (patients or
lesions, the manifest's ``group`` column), because images of one group are correlated and resampling
single images would make the intervals too narrow. Sensitivity and specificity are also reported per
sex, age band and anatomic site.

The test split estimates how the chosen model performs on new patients. Looking at it again after
changing the search or the choice of model makes it part of model selection, so a second evaluation
of a run is rejected unless forced.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from data.cache import build_image_cache, open_image_cache
from data.io import write_parquet_atomic
from results.analysis import (Checkpoint, best_checkpoint, finished_trials, read_run_manifest, read_trials,
                              recorded_cache_path, recorded_resize_rule, validation_predictions)
from results.export import load_run_config
from results.predict import predict_scores
from trainables.metrics import evaluate_scores

__all__ = ["AGE_BANDS", "EVALUATION_SCHEMA", "INTERVAL_METRICS", "PREDICTIONS_FILE", "PREDICTION_SCHEMA",
           "TEST_EVALUATION_FILE", "TestEvaluation", "TestSplitAlreadyEvaluatedError", "age_band",
           "bootstrap_intervals", "evaluate_run", "subgroup_rates", "subgroup_table"]

logger = logging.getLogger(__name__)

TEST_EVALUATION_FILE = "test_evaluation.parquet"
PREDICTIONS_FILE = "predictions.parquet"

INTERVAL_METRICS = ("auc", "pauc80", "sensitivity", "specificity", "spec_at_sens")
"""Fields of :class:`trainables.metrics.ClassificationMetrics` reported with bootstrap intervals."""

SUBGROUP_FACTORS = ("sex", "age_band", "anatom_site")
UNKNOWN_LEVEL = "unknown"

# A subgroup with fewer cases than this is flagged: its sensitivity or specificity rests on too few
# images to compare with the others.
MIN_SUBGROUP_POSITIVES = 10
MIN_SUBGROUP_NEGATIVES = 30

EVALUATION_SCHEMA = pa.schema([
    pa.field("trial_id", pa.string()),
    pa.field("rank", pa.int64()),
    pa.field("epoch", pa.int64()),
    pa.field("threshold", pa.float64()),
    pa.field("scope", pa.string()),  # "overall" or "subgroup"
    pa.field("factor", pa.string()),  # sex, age_band or anatom_site, null when overall
    pa.field("level", pa.string()),
    pa.field("metric", pa.string()),
    pa.field("estimate", pa.float64()),
    pa.field("ci_lower", pa.float64()),
    pa.field("ci_upper", pa.float64()),
    pa.field("resamples_defined", pa.int64()),  # resamples in which the metric was defined
    pa.field("images", pa.int64()),
    pa.field("positives", pa.int64()),
    pa.field("negatives", pa.int64()),
    pa.field("few_cases", pa.bool_()),
    pa.field("sensitivity_target", pa.float64()),
    pa.field("resamples", pa.int64()),
    pa.field("confidence", pa.float64()),
    pa.field("seed", pa.int64()),
    pa.field("evaluated_utc", pa.string()),
])

PREDICTION_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),
    pa.field("label", pa.int8()),
    pa.field("score", pa.float64()),
    pa.field("split", pa.string()),
    pa.field("trial_id", pa.string()),
    pa.field("group", pa.string()),
])


class TestSplitAlreadyEvaluatedError(ValueError):
    """The run folder already has a test evaluation and ``force`` was not given."""

    __test__ = False  # not a pytest test class, despite the name


@dataclass(frozen=True)
class TestEvaluation:
    """Tables and files written by :func:`evaluate_run`.

    Attributes:
        metrics: rows of ``test_evaluation.parquet`` (``EVALUATION_SCHEMA``).
        predictions: rows of ``predictions.parquet`` (``PREDICTION_SCHEMA``), validation and test.
        metrics_path: the written ``test_evaluation.parquet``.
        predictions_path: the written ``predictions.parquet``.
    """

    __test__ = False

    metrics: pd.DataFrame
    predictions: pd.DataFrame
    metrics_path: Path
    predictions_path: Path


def bootstrap_intervals(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, *, threshold: float,
                        resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                        specificity_target: float = 0.8, sensitivity_target: float = 0.866) -> pd.DataFrame:
    """Estimate ``INTERVAL_METRICS`` with percentile intervals of a group (cluster) bootstrap.

    Each resample draws as many groups as there are, uniformly with replacement, and keeps every image
    of each drawn group as many times as the group was drawn. A metric that a resample cannot define
    (no positive, say) is left out of that metric's percentiles.

    Args:
        labels: ``(N,)`` ground truth in {0, 1}.
        scores: ``(N,)`` positive-class probabilities in [0, 1].
        groups: ``(N,)`` group id of each image (patient, lesion or the image itself).
        threshold: operating threshold chosen on validation. A score >= threshold is positive.
        resamples: bootstrap resamples (>= 1).
        confidence: interval coverage in (0, 1). 0.95 takes the 2.5th and 97.5th percentiles.
        seed: seed of the resampling, so the same inputs give the same intervals.
        specificity_target, sensitivity_target: as in :func:`trainables.metrics.evaluate_scores`.

    Returns:
        One row per metric with ``metric``, ``estimate`` (on all images), ``ci_lower``, ``ci_upper`` and
        ``resamples_defined``. The bounds are NaN when no resample defines the metric.
    """
    if resamples < 1:
        raise ValueError(f"Invalid resamples {resamples!r}: expected an integer >= 1, e.g. 1000.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"Invalid confidence {confidence!r}: expected a number in (0, 1), e.g. 0.95.")
    labels = np.asarray(labels).astype(np.int64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    codes, uniques = pd.factorize(pd.Series(np.asarray(groups).ravel()).astype(str))
    if not len(labels) == len(scores) == len(codes):
        raise ValueError(f"labels ({len(labels)}), scores ({len(scores)}) and groups ({len(codes)}) must have "
                         "one entry per image.")

    def compute(index: np.ndarray | slice) -> list[float]:
        metrics = evaluate_scores(labels[index], scores[index], threshold=threshold,
                                  specificity_target=specificity_target, sensitivity_target=sensitivity_target)
        return [getattr(metrics, name) for name in INTERVAL_METRICS]

    rng = np.random.default_rng(seed)
    values = np.empty((resamples, len(INTERVAL_METRICS)))
    for resample in range(resamples):
        drawn_per_group = np.bincount(rng.integers(0, len(uniques), size=len(uniques)), minlength=len(uniques))
        index = np.repeat(np.arange(len(labels)), drawn_per_group[codes])
        values[resample] = compute(index)

    defined = np.isfinite(values).sum(axis=0)
    tail = (1.0 - confidence) / 2 * 100
    bounds = np.full((2, len(INTERVAL_METRICS)), np.nan)
    for column in np.flatnonzero(defined):
        bounds[:, column] = np.nanpercentile(values[:, column], [tail, 100 - tail])
    return pd.DataFrame({"metric": list(INTERVAL_METRICS), "estimate": compute(slice(None)),
                         "ci_lower": bounds[0], "ci_upper": bounds[1], "resamples_defined": defined})


AGE_BANDS = ("<30", "[30, 50)", "[50, 70)", ">=70")


def age_band(age: float) -> str:
    """Return the band of ``AGE_BANDS`` that an approximate age in years falls in, or ``unknown``."""
    if age is None or pd.isna(age):
        return UNKNOWN_LEVEL
    if age < 30:
        return AGE_BANDS[0]
    if age < 50:
        return AGE_BANDS[1]
    if age < 70:
        return AGE_BANDS[2]
    return AGE_BANDS[3]


def _level_order(level: str) -> tuple[int, int, str]:
    # Age bands in age order, other levels alphabetically, "unknown" last.
    return (level == UNKNOWN_LEVEL, AGE_BANDS.index(level) if level in AGE_BANDS else -1, level)


def _subgroup_levels(predictions: pd.DataFrame, factor: str) -> pd.Series | None:
    source = "age_approx" if factor == "age_band" else factor
    if source not in predictions.columns or predictions[source].isna().all():
        return None
    if factor == "age_band":
        return predictions[source].map(age_band)
    return predictions[source].astype("string").str.strip().fillna(UNKNOWN_LEVEL).replace("", UNKNOWN_LEVEL)


def subgroup_rates(predictions: pd.DataFrame, *, threshold: float) -> pd.DataFrame:
    """Compute sensitivity and specificity at ``threshold`` per sex, age band and anatomic site.

    A factor is left out when its column is missing or empty. Missing values form the ``unknown`` level.

    Args:
        predictions: one row per image with ``label`` (0/1), ``score`` in [0, 1] and any of ``sex``,
            ``age_approx`` (years) and ``anatom_site``.
        threshold: a score >= threshold is a positive decision.

    Returns:
        One row per factor and level with ``images``, ``positives``, ``negatives``, ``sensitivity`` and
        ``specificity`` (NaN without positives or negatives), and ``few_cases``: True when the level has
        fewer than ``MIN_SUBGROUP_POSITIVES`` positives or ``MIN_SUBGROUP_NEGATIVES`` negatives.

    NOTE: subgroup rates get no bootstrap interval, so two levels can differ by chance alone. Compare
    them only where ``few_cases`` is False.
    """
    rows = []
    for factor in SUBGROUP_FACTORS:
        levels = _subgroup_levels(predictions, factor)
        if levels is None:
            continue
        for level in sorted(levels.unique(), key=_level_order):
            members = predictions[(levels == level).to_numpy()]
            metrics = evaluate_scores(members["label"].to_numpy(), members["score"].to_numpy(), threshold=threshold)
            rows.append({
                "factor": factor, "level": level, "images": len(members), "positives": metrics.positives,
                "negatives": metrics.negatives, "sensitivity": metrics.sensitivity,
                "specificity": metrics.specificity,
                "few_cases": metrics.positives < MIN_SUBGROUP_POSITIVES or metrics.negatives < MIN_SUBGROUP_NEGATIVES,
            })
    return pd.DataFrame(rows, columns=["factor", "level", "images", "positives", "negatives", "sensitivity",
                                       "specificity", "few_cases"])


def subgroup_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Return the subgroup rows of ``test_evaluation.parquet`` with one row per trial, factor and level.

    Columns: ``rank``, ``trial_id``, ``factor``, ``level``, ``images``, ``positives``, ``negatives``,
    ``few_cases``, ``sensitivity`` and ``specificity``, in the order of ``metrics``.
    """
    keys = ["trial_id", "factor", "level"]
    subgroups = metrics[metrics["scope"] == "subgroup"]
    sensitivity = subgroups[subgroups["metric"] == "sensitivity"]
    specificity = subgroups[subgroups["metric"] == "specificity"]
    table = sensitivity[["rank", *keys, "images", "positives", "negatives", "few_cases", "estimate"]]
    table = table.rename(columns={"estimate": "sensitivity"})
    table = table.merge(specificity[[*keys, "estimate"]].rename(columns={"estimate": "specificity"}), on=keys,
                        how="left", sort=False)
    return table.reset_index(drop=True)


def _check_not_evaluated(run_dir: Path, force: bool) -> None:
    path = run_dir / TEST_EVALUATION_FILE
    if not path.is_file() or force:
        return
    previous = pd.read_parquet(path, columns=["trial_id", "evaluated_utc"])
    when = previous["evaluated_utc"].iloc[0] if len(previous) else "an earlier run"
    trials = ", ".join(previous["trial_id"].drop_duplicates())
    raise TestSplitAlreadyEvaluatedError(
        f"{run_dir} was already evaluated on its test split ({when}, trials {trials}), with results in {path.name}. "
        "The test split estimates the performance of a model chosen on validation, and evaluating again after "
        "changing the search or the choice of model would make it part of model selection and bias that "
        "estimate. Use the existing results, or pass --force (force=True) to evaluate again and overwrite them.")


@contextlib.contextmanager
def _open_split_images(rows: pd.DataFrame, checkpoint: Checkpoint) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(images, cache rows)`` of the manifest ``rows``: the trial's image cache, else a new one."""
    image_size = int(checkpoint.state["config"]["image_size"])
    cache_path = recorded_cache_path(checkpoint)
    cache_rows = None
    if cache_path is not None and cache_path.is_dir():
        cache = open_image_cache(cache_path)
        try:
            cache_rows = np.array([cache.row_of(image_id) for image_id in rows["image_id"]], dtype=np.int64)
        except ValueError:
            cache_rows = None
    if cache_rows is not None:
        yield cache.images, cache_rows
        return

    logger.warning("Image cache %s of trial %s is missing or lacks the test images, so %d test images are "
                   "decoded again", cache_path, checkpoint.trial_id, len(rows))
    with tempfile.TemporaryDirectory(prefix="lesiontune-evaluate-") as cache_root:
        cache = build_image_cache(rows["path"].tolist(), rows["image_id"].tolist(), image_size=image_size,
                                  cache_root=cache_root, resize_rule=recorded_resize_rule(checkpoint),
                                  progress=False)
        if not cache.ok.all():
            first = cache.skipped.iloc[0]
            raise ValueError(f"{len(cache.skipped)} test images can no longer be decoded, first {first['path']}: "
                             f"{first['reason']}. Restore the dataset files the search used.")
        yield cache.images, np.arange(len(rows))


def _score_test_split(checkpoint: Checkpoint, test: pd.DataFrame, batch_size: int) -> np.ndarray:
    import keras

    import trainables.model  # noqa: F401  (registers BackbonePreprocessing for deserialisation)

    model = keras.models.load_model(checkpoint.model_path)
    with _open_split_images(test, checkpoint) as (images, rows):
        return predict_scores(model, images, rows, batch_size=batch_size)


def _prediction_rows(frame: pd.DataFrame, trial_id: str) -> pd.DataFrame:
    return pd.DataFrame({"image_id": frame["image_id"].astype(str), "label": frame["label"].astype(np.int8),
                         "score": frame["score"].astype(np.float64), "split": frame["split"].astype(str),
                         "trial_id": trial_id, "group": frame["group"].astype(str)})


def _metric_rows(intervals: pd.DataFrame, subgroups: pd.DataFrame, test: pd.DataFrame,
                 common: dict[str, object]) -> list[dict[str, object]]:
    positives = int(test["label"].sum())
    negatives = len(test) - positives
    overall = [{**common, "scope": "overall", "factor": None, "level": None, **row, "images": len(test),
                "positives": positives, "negatives": negatives,
                "few_cases": positives < MIN_SUBGROUP_POSITIVES or negatives < MIN_SUBGROUP_NEGATIVES}
               for row in intervals.to_dict("records")]
    per_group = [{**common, "scope": "subgroup", "factor": row["factor"], "level": row["level"], "metric": metric,
                  "estimate": row[metric], "ci_lower": None, "ci_upper": None, "resamples_defined": None,
                  "images": row["images"], "positives": row["positives"], "negatives": row["negatives"],
                  "few_cases": row["few_cases"]}
                 for row in subgroups.to_dict("records") for metric in ("sensitivity", "specificity")]
    return overall + per_group


def _top_checkpoints(run_dir: Path, top: int) -> list[tuple[int, Checkpoint]]:
    ranked = finished_trials(read_trials(run_dir)).sort_values("best_objective", ascending=False)
    chosen: list[tuple[int, Checkpoint]] = []
    for rank, trial_id in enumerate(ranked["trial_id"], start=1):
        if len(chosen) == top:
            break
        try:
            chosen.append((rank, best_checkpoint(run_dir, trial_id)))
        except FileNotFoundError as error:
            logger.warning("Skipping trial %s (rank %d): %s", trial_id, rank, error)
    if not chosen:
        raise ValueError(f"No finished trial of {run_dir} has a checkpoint, so there is no model to evaluate.")
    return chosen


def _check_arguments(top: int, batch_size: int) -> None:
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"Invalid top {top!r}: expected the number of best trials to evaluate, an integer >= 1.")
    if batch_size < 1:
        raise ValueError(f"Invalid batch_size {batch_size!r}: expected an integer >= 1.")


def evaluate_run(run_dir: str | os.PathLike, *, top: int = 3, force: bool = False, resamples: int = 1000,
                 confidence: float = 0.95, seed: int = 0, batch_size: int = 64,
                 fetch_model: Callable[[Checkpoint], None] | None = None) -> TestEvaluation:
    """Score the test split with the best checkpoints of the ``top`` best trials and write the results.

    Writes ``test_evaluation.parquet`` (overall metrics with group-bootstrap intervals, then subgroup
    sensitivity and specificity) and ``predictions.parquet`` (each trial's validation scores from its
    checkpoint and its new test scores) into ``run_dir``. The threshold of the threshold-dependent
    metrics is the one the checkpoint chose on validation, never one fitted on the test split.

    Args:
        run_dir: the run folder.
        top: how many of the best finished trials (by best objective) to evaluate. A trial without a
            checkpoint is skipped and the next one taken.
        force: evaluate even when ``test_evaluation.parquet`` exists, and overwrite it.
        resamples, confidence, seed: of the group bootstrap, see :func:`bootstrap_intervals`.
        batch_size: images per forward pass.
        fetch_model: called with each chosen checkpoint before its ``model.keras`` is loaded, e.g. to copy
            it from object storage.

    Raises:
        TestSplitAlreadyEvaluatedError: the run was evaluated before and ``force`` is False.
        ValueError: invalid arguments, no test rows, or no trial with a checkpoint.
    """
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    _check_arguments(top, batch_size)
    _check_not_evaluated(run_dir, force)
    manifest = read_run_manifest(run_dir)
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    if test.empty:
        raise ValueError(f"The manifest of {run_dir} has no test rows, so there is nothing to evaluate.")
    targets = {"specificity_target": float(config["training"]["specificity_target"]),
               "sensitivity_target": float(config["training"]["sensitivity_target"])}
    evaluated_utc = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    metric_rows: list[dict[str, object]] = []
    prediction_frames = []
    for rank, checkpoint in _top_checkpoints(run_dir, top):
        if fetch_model is not None:
            fetch_model(checkpoint)
        scored = test.assign(score=_score_test_split(checkpoint, test, batch_size).astype(np.float64))
        intervals = bootstrap_intervals(scored["label"].to_numpy(), scored["score"].to_numpy(),
                                        scored["group"].to_numpy(), threshold=checkpoint.threshold,
                                        resamples=resamples, confidence=confidence, seed=seed, **targets)
        subgroups = subgroup_rates(scored, threshold=checkpoint.threshold)
        common = {"trial_id": checkpoint.trial_id, "rank": rank, "epoch": checkpoint.epoch,
                  "threshold": checkpoint.threshold, "sensitivity_target": targets["sensitivity_target"],
                  "resamples": resamples, "confidence": confidence, "seed": seed, "evaluated_utc": evaluated_utc}
        metric_rows.extend(_metric_rows(intervals, subgroups, scored, common))
        prediction_frames.append(_prediction_rows(validation_predictions(manifest, checkpoint), checkpoint.trial_id))
        prediction_frames.append(_prediction_rows(scored, checkpoint.trial_id))
        estimates = dict(zip(intervals["metric"], intervals["estimate"]))
        logger.info("Trial %s (rank %d, epoch %d): test AUC %.3f, sensitivity %.3f, specificity %.3f at threshold "
                    "%.3f", checkpoint.trial_id, rank, checkpoint.epoch, estimates["auc"], estimates["sensitivity"],
                    estimates["specificity"], checkpoint.threshold)

    metrics = pa.Table.from_pylist(metric_rows, schema=EVALUATION_SCHEMA)
    predictions = pa.Table.from_pandas(pd.concat(prediction_frames, ignore_index=True), schema=PREDICTION_SCHEMA,
                                       preserve_index=False)
    write_parquet_atomic(metrics, run_dir / TEST_EVALUATION_FILE)
    write_parquet_atomic(predictions, run_dir / PREDICTIONS_FILE)
    return TestEvaluation(metrics=metrics.to_pandas(), predictions=predictions.to_pandas(),
                          metrics_path=run_dir / TEST_EVALUATION_FILE, predictions_path=run_dir / PREDICTIONS_FILE)
