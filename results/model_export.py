"""Export one trial's best checkpoint as a self-describing model folder.

The folder contains ``model.keras``, ``preprocessing.json`` (how to turn an image file into the model's
input), ``threshold.json`` (the operating point) and ``MODEL_CARD.md`` (data, search, metrics and known
limits). ``lesiontune predict`` reads it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from data.io import write_json_atomic
from results.analysis import (SUMMARY_FILE, Checkpoint, best_checkpoint, read_run_manifest,
                              recorded_resize_rule, space_setting_text)
from results.evaluate import TEST_EVALUATION_FILE, subgroup_table
from results.export import load_run_config
from results.predict import MODEL_FILE, PREPROCESSING_FILE, THRESHOLD_FILE
from trainables.backbones import get_backbone

__all__ = ["MODEL_CARD_FILE", "export_model"]

logger = logging.getLogger(__name__)

MODEL_CARD_FILE = "MODEL_CARD.md"

_DECODING = ("Decode with Pillow, apply the EXIF orientation, convert to RGB (alpha composited on black, 16-bit "
             "grayscale scaled to 8 bits), then make the square by the resize rule with Lanczos filtering, "
             "as data.cache.build_image_cache does.")
_RESIZE_RULES = {
    "center_crop": "take the centered square whose side is the shorter side and resize it to image_size",
    "pad": "resize so that the longer side is image_size and center the image on a black square",
}


def _preprocessing(checkpoint: Checkpoint) -> dict[str, object]:
    config = checkpoint.state["config"]
    image_size = int(config["image_size"])
    resize_rule = recorded_resize_rule(checkpoint)
    mode = get_backbone(config["backbone"]).preprocessing
    return {
        "image_size": image_size,
        "resize_rule": resize_rule,
        "resize": _RESIZE_RULES[resize_rule],
        "decoding": _DECODING,
        "input": {"shape": [image_size, image_size, 3], "dtype": "float32", "pixel_range": [0, 255],
                  "channel_order": "RGB"},
        "backbone_preprocessing": {
            "mode": mode,
            "applied_by": "the model itself (its 'preprocessing' layer), so pass raw pixels in [0, 255]",
        },
        "loading": "import trainables.model before keras.models.load_model, which registers the "
                   "lesiontune>BackbonePreprocessing layer",
    }


def _validation_metrics(checkpoint: Checkpoint) -> dict[str, object]:
    metrics = checkpoint.state.get("metrics", {})
    return {key.removeprefix("val_"): value for key, value in metrics.items() if key.startswith("val_")}


def _threshold(checkpoint: Checkpoint, objective: str) -> dict[str, object]:
    return {
        "threshold": checkpoint.threshold,
        "decision": "positive (suspected melanoma) when score >= threshold",
        "chosen_by": "maximum F2 on the validation split at the exported epoch",
        "trial_id": checkpoint.trial_id,
        "epoch": checkpoint.epoch,
        "objective": objective,
        "validation": _validation_metrics(checkpoint),
    }


def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4g}"
        return "" if value is None or value is pd.NA else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(str(c) for c in frame.columns) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _split_table(run_dir: Path) -> pd.DataFrame:
    manifest = read_run_manifest(run_dir)
    rows = []
    for split, members in manifest.groupby("split", observed=False):
        rows.append({"split": split, "images": len(members), "positives": int(members["label"].sum()),
                     "negatives": int(len(members) - members["label"].sum()), "groups": members["group"].nunique()})
    return pd.DataFrame(rows)


def _test_rows(run_dir: Path, trial_id: str) -> pd.DataFrame | None:
    path = run_dir / TEST_EVALUATION_FILE
    if not path.is_file():
        return None
    rows = pd.read_parquet(path)
    rows = rows[rows["trial_id"] == trial_id]
    return rows if len(rows) else None


def _metrics_section(checkpoint: Checkpoint, run_dir: Path, run_name: str) -> list[str]:
    validation = _validation_metrics(checkpoint)
    names = ("auc", "pauc80", "average_precision", "sensitivity", "specificity", "f2", "spec_at_sens")
    lines = ["## Metrics", "",
             f"Validation split, epoch {checkpoint.epoch}, at the threshold {checkpoint.threshold:.4g}. The search "
             "chose this model and its threshold on this split, so these values are optimistic.", "",
             _markdown_table(pd.DataFrame({"metric": names, "validation": [validation.get(n) for n in names]})), ""]

    test = _test_rows(run_dir, checkpoint.trial_id)
    if test is None:
        lines += ["Not evaluated on the test split. Run `lesiontune results evaluate "
                  f"{run_name} --top K` and export again to add test metrics with 95 % intervals.", ""]
        return lines
    overall = test[test["scope"] == "overall"]
    resamples, confidence = int(overall["resamples"].iloc[0]), float(overall["confidence"].iloc[0])
    lines += [f"Test split ({int(overall['images'].iloc[0])} images, {int(overall['positives'].iloc[0])} positive), "
              f"evaluated {overall['evaluated_utc'].iloc[0]} at the validation threshold. Intervals: "
              f"{confidence:.0%} percentile intervals of a bootstrap over groups ({resamples} resamples). "
              f"spec_at_sens is the specificity at sensitivity >= {overall['sensitivity_target'].iloc[0]:g}.", "",
              _markdown_table(overall[["metric", "estimate", "ci_lower", "ci_upper"]]), ""]

    subgroups = subgroup_table(test).drop(columns=["rank", "trial_id"])
    if len(subgroups):
        lines += ["## Subgroups (test split)", "",
                  "Sensitivity and specificity at the validation threshold. few_cases marks levels with fewer "
                  "than 10 positives or 30 negatives, whose rates are too uncertain to compare.", "",
                  _markdown_table(subgroups), ""]
    return lines


def _known_limits(summary: dict, config: dict, checkpoint: Checkpoint) -> list[str]:
    limits = [
        f"- Trained and tested on images from {config['data']['path']} only. Performance on other "
        "populations, skin types, cameras, or clinical (non-dermoscopic) photographs is unknown.",
        "- The score is not a calibrated probability of melanoma: class balancing "
        f"({checkpoint.state['config']['balancing']}) and the split's prevalence shift it. Use the threshold, "
        "or calibrate on data from the intended setting.",
        "- The threshold maximises F2 on the validation split, which also chose the model, so validation "
        "sensitivity and specificity overstate what new data will show.",
        "- Inputs must be decoded and resized as preprocessing.json says. Other resizing changes the scores.",
        "- A research model: it has not been validated for clinical use.",
    ]
    if not summary.get("group_column"):
        limits.append("- The metadata had no patient or lesion id, so each image was its own group: images of "
                      "one lesion may be in both training and test, which inflates the test metrics.")
    return limits


def _exclusion_lines(summary: dict) -> list[str]:
    excluded = summary.get("excluded_by_reason") or {}
    if not excluded:
        return ["No image was excluded.", ""]
    table = pd.DataFrame({"exclusion reason": list(excluded), "images": list(excluded.values())})
    return [_markdown_table(table), ""]


def _search_lines(config: dict) -> list[str]:
    search, space = config["search"], config["space"]
    table = pd.DataFrame({"parameter": list(space), "searched values": [space_setting_text(v) for v in space.values()]})
    return ["## Search", "",
            f"Optuna TPE with ASHA on Ray Tune: {search['num_samples']} trials of up to {search['max_epochs']} epochs, "
            f"maximising validation {search['objective']}.", "", _markdown_table(table), ""]


def _model_card(run_dir: Path, checkpoint: Checkpoint) -> str:
    config = load_run_config(run_dir)
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    trial_config = checkpoint.state["config"]
    run_name = run_dir.name

    lines = [f"# Model card: trial {checkpoint.trial_id} of run {run_name}", "",
             "Binary classifier of dermoscopy images: melanoma (positive) against benign lesions, exported by "
             "`lesiontune results export-model`.", "",
             "## Model", "",
             f"- Backbone {trial_config['backbone']}, input {trial_config['image_size']} x "
             f"{trial_config['image_size']} RGB pixels in [0, 255] (see preprocessing.json), output the "
             "positive-class score in [0, 1].",
             f"- Checkpoint after epoch {checkpoint.epoch}: {checkpoint.path}",
             f"- Initial backbone weights: {config['training']['weights']}.",
             "- Hyperparameters: " + ", ".join(f"{k}={v}" for k, v in trial_config.items()) + ".",
             f"- Decision: positive when score >= {checkpoint.threshold:.6g} (threshold.json).", "",
             "## Data", "",
             f"- Source: {config['data']['path']} (layout {summary.get('layout', config['data']['layout'])}), "
             f"positive class: {config['data']['positive_class']}.",
             f"- {summary.get('images', '?')} images used ({summary.get('positive', '?')} positive), "
             f"{summary.get('excluded', '?')} excluded, grouped by {summary.get('group_column') or 'image'}.", ""]
    lines += _exclusion_lines(summary)
    lines += ["Splits (whole groups, stratified by label):", "", _markdown_table(_split_table(run_dir)), ""]
    lines += _search_lines(config)
    lines += _metrics_section(checkpoint, run_dir, run_name)
    lines += ["## Known limits", "", *_known_limits(summary, config, checkpoint), ""]
    return "\n".join(lines)


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ValueError(f"Output folder {output_dir} already exists and is not empty. Choose a new folder, "
                         "or delete this one first.")


def export_model(run_dir: str | os.PathLike, trial_id: str, output_dir: str | os.PathLike) -> Path:
    """Write the best checkpoint of ``trial_id`` with its preprocessing, threshold and model card.

    Args:
        run_dir: the run folder.
        trial_id: the trial id, or a unique prefix of at least 4 characters.
        output_dir: the folder to create, which must be missing or empty.

    Returns:
        The written folder.

    Raises:
        ValueError: the trial is unknown or the output folder is not empty.
        FileNotFoundError: the trial has no checkpoint.
    """
    run_dir, output_dir = Path(run_dir), Path(output_dir)
    load_run_config(run_dir)
    _check_output_dir(output_dir)
    checkpoint = best_checkpoint(run_dir, trial_id)
    objective = load_run_config(run_dir)["search"]["objective"]

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        shutil.copy2(checkpoint.model_path, staging / MODEL_FILE)
        write_json_atomic(_preprocessing(checkpoint), staging / PREPROCESSING_FILE)
        write_json_atomic(_threshold(checkpoint, objective), staging / THRESHOLD_FILE)
        (staging / MODEL_CARD_FILE).write_text(_model_card(run_dir, checkpoint), encoding="utf-8")
        if output_dir.exists():
            output_dir.rmdir()
        staging.rename(output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("Exported trial %s (epoch %d, threshold %.4g) to %s", checkpoint.trial_id, checkpoint.epoch,
                checkpoint.threshold, output_dir)
    return output_dir
