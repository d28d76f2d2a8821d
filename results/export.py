"""Export a finished (or stopped) search to typed Parquet tables.

``trials.parquet`` has one row per trial and ``epochs.parquet`` one row per trial and epoch. Column
names and types are fixed by the schemas below, so that runs can be concatenated and compared; a column
never mixes types.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import yaml

from data.io import write_parquet_atomic

__all__ = ["EPOCH_SCHEMA", "TRIAL_SCHEMA", "export_run", "leaderboard", "load_run_config"]

logger = logging.getLogger(__name__)

CONFIG_FILE = "lesiontune_config.yaml"
TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"

METRIC_COLUMNS = ("val_auc", "val_pauc80", "val_average_precision", "val_sensitivity", "val_specificity", "val_f2",
                  "val_balanced_accuracy", "val_sens_at_spec", "val_spec_at_sens", "val_threshold")

_HYPERPARAMETER_FIELDS = [
    pa.field("backbone", pa.string()),
    pa.field("balancing", pa.string()),
    pa.field("unfrozen_layers", pa.int64()),  # null when unfrozen_fraction sets the depth
    pa.field("unfrozen_fraction", pa.float64()),  # null when not searched
    pa.field("augmentation_intensity", pa.float64()),
    pa.field("learning_rate", pa.float64()),
    pa.field("batch_size", pa.int64()),
    pa.field("dropout", pa.float64()),
    pa.field("image_size", pa.int64()),
    pa.field("smote_k", pa.int64()),  # null in runs made before smote_k existed
    pa.field("fine_tune_lr_multiplier", pa.float64()),  # null when not searched
]

TRIAL_SCHEMA = pa.schema([
    pa.field("trial_id", pa.string()),
    pa.field("status", pa.string()),
    *_HYPERPARAMETER_FIELDS,
    pa.field("objective", pa.string()),
    pa.field("best_objective", pa.float64()),
    pa.field("last_objective", pa.float64()),
    pa.field("best_epoch", pa.int64()),
    pa.field("epochs_run", pa.int64()),
    pa.field("stopped_early", pa.bool_()),
    pa.field("stop_reason", pa.string()),  # max_epochs, asha, error, or the Tune status of an unfinished trial
    *[pa.field(f"best_{name}", pa.float64()) for name in METRIC_COLUMNS],
    pa.field("wall_seconds", pa.float64()),
    pa.field("setup_seconds", pa.float64()),  # start of the trial function to its first epoch: data, model build
    pa.field("cpus_per_trial", pa.float64()),
    pa.field("gpus_per_trial", pa.float64()),
    pa.field("error", pa.string()),
])

EPOCH_SCHEMA = pa.schema([
    pa.field("trial_id", pa.string()),
    pa.field("epoch", pa.int64()),
    pa.field("objective_value", pa.float64()),
    pa.field("train_loss", pa.float64()),
    *[pa.field(name, pa.float64()) for name in METRIC_COLUMNS],
    pa.field("trainable_weight_layers", pa.int64()),
    pa.field("epoch_seconds", pa.float64()),
    pa.field("time_total_s", pa.float64()),
])


def load_run_config(run_dir: Path) -> dict:
    """Read the resolved experiment saved in a run folder."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a lesiontune run folder: {CONFIG_FILE} not found. "
                                "Pass the folder that 'lesiontune search' printed (STORAGE_PATH/NAME).")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# Columns of Tune's progress.csv that stay text even when they look like numbers.
_TEXT_COLUMNS = {"trial_id", "date", "hostname", "node_ip", "checkpoint_dir_name"}


def _read_results(trial_dir: Path) -> list[dict]:
    """Return the trial's reported results, one per epoch in epoch order, from result.json and progress.csv."""
    path = trial_dir / "result.json"
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
    # NOTE: when Ray 2.60 restarts a trial from a checkpoint, its loggers copy the stored result.json and
    # progress.csv over the local ones. A trial that ASHA paused and restarted within about a second lost its
    # last result.json rows that way in two kill-and-resume runs, while progress.csv kept them, so rows
    # missing from result.json come from progress.csv.
    recorded = {row.get("epoch") for row in rows}
    rows += [row for row in _read_progress_csv(trial_dir / "progress.csv") if row.get("epoch") not in recorded]
    by_epoch = {row.get("epoch"): row for row in rows}
    if None in by_epoch:
        return rows
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _read_progress_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as file:
        return [{key: _csv_value(key, text) for key, text in row.items()} for row in csv.DictReader(file)]


def _csv_value(key: str, text: str | None):
    """Convert one progress.csv cell back to the type result.json has: None, bool, int, float or text."""
    if text is None or text == "":
        return None
    if key in _TEXT_COLUMNS:
        return text
    if text in ("True", "False"):
        return text == "True"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _trial_states(run_dir: Path) -> dict[str, dict]:
    """Read each trial's status and error from Tune's newest experiment state file."""
    # A resumed run writes a new state file and rewrites the old one too, so modification times cannot tell
    # which is newest. The timestamp in the name (YYYY-MM-DD_HH-MM-SS) can.
    states = sorted(run_dir.glob("experiment_state-*.json"), key=lambda path: path.name)
    if not states:
        return {}
    document = json.loads(states[-1].read_text(encoding="utf-8"))
    found: dict[str, dict] = {}
    for entry in document.get("trial_data", []):
        trial_json = entry[0] if isinstance(entry, (list, tuple)) else entry
        state = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        trial_id = state.get("trial_id")
        if trial_id:
            found[trial_id] = state
    return found


def _error_text(trial_dir: Path, state: dict) -> str | None:
    """Return the last line of the trial's ``error.txt`` (the exception), else Tune's saved error message."""
    path = trial_dir / "error.txt"
    if path.is_file():
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else "failed"
    return state.get("error_msg") or None


def _trial_id_of_folder(trial_dir: Path) -> str:
    """Return the trial id from a Tune trial folder name, ``<trainable>_<trial id>_<number>_<params>_<date>``."""
    match = re.match(r"train_classifier_([^_]+)_\d+_", trial_dir.name)
    return match.group(1) if match else trial_dir.name


def _finite(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _stop_reason(status: str, epochs_run: int, max_epochs: int) -> str:
    if status == "ERROR":
        return "error"
    if status != "TERMINATED":
        return status.lower()
    return "asha" if 0 < epochs_run < max_epochs else "max_epochs"


def _trial_dirs(run_dir: Path) -> list[Path]:
    return sorted(p.parent for p in run_dir.glob("*/params.json"))


def export_run(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Write ``trials.parquet`` and ``epochs.parquet`` into ``run_dir``; return the trials table."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    objective = config["search"]["objective"]
    metric = f"val_{objective}"
    max_epochs = int(config["search"]["max_epochs"])
    states = _trial_states(run_dir)

    trial_rows, epoch_rows = [], []
    for trial_dir in _trial_dirs(run_dir):
        params = json.loads((trial_dir / "params.json").read_text(encoding="utf-8"))
        results = _read_results(trial_dir)
        trial_id = results[0]["trial_id"] if results else _trial_id_of_folder(trial_dir)
        state = states.get(trial_id, {})
        error = _error_text(trial_dir, state)
        if state.get("status"):
            status = state["status"]
            # A trial that Tune retried after its worker died keeps its old error file, so the status decides.
            error = error if status == "ERROR" else None
        elif error:
            status = "ERROR"
        else:
            status = "TERMINATED" if results else "PENDING"

        objectives = [_finite(r.get(metric)) for r in results]
        best_index = None
        if results:
            best_index = int(np.argmax([v if v is not None else -np.inf for v in objectives]))
        best = results[best_index] if best_index is not None else {}
        epochs_run = max((int(r["epoch"]) for r in results if r.get("epoch") is not None), default=len(results))
        row = {
            "trial_id": trial_id, "status": status,
            **{field.name: params.get(field.name) for field in _HYPERPARAMETER_FIELDS},
            "objective": objective,
            "best_objective": objectives[best_index] if best_index is not None else None,
            "last_objective": objectives[-1] if results else None,
            "best_epoch": int(best["epoch"]) if best else None,
            "epochs_run": epochs_run,
            "stopped_early": bool(status == "TERMINATED" and 0 < epochs_run < max_epochs),
            "stop_reason": _stop_reason(status, epochs_run, max_epochs),
            **{f"best_{name}": _finite(best.get(name)) for name in METRIC_COLUMNS},
            "wall_seconds": _finite(results[-1].get("time_total_s")) if results else None,
            "setup_seconds": _finite(results[0].get("setup_seconds")) if results else None,
            "cpus_per_trial": float(config["resources"]["cpus_per_trial"]),
            "gpus_per_trial": float(config["resources"]["gpus_per_trial"]),
            "error": error,
        }
        trial_rows.append(row)
        for result in results:
            epoch_rows.append({
                "trial_id": trial_id, "epoch": int(result["epoch"]), "objective_value": _finite(result.get(metric)),
                "train_loss": _finite(result.get("train_loss")),
                **{name: _finite(result.get(name)) for name in METRIC_COLUMNS},
                "trainable_weight_layers": result.get("trainable_weight_layers"),
                "epoch_seconds": _finite(result.get("epoch_seconds")),
                "time_total_s": _finite(result.get("time_total_s")),
            })

    trial_rows.sort(key=lambda r: r["trial_id"])
    epoch_rows.sort(key=lambda r: (r["trial_id"], r["epoch"]))
    trials = pa.Table.from_pylist(trial_rows, schema=TRIAL_SCHEMA)
    epochs = pa.Table.from_pylist(epoch_rows, schema=EPOCH_SCHEMA)
    write_parquet_atomic(trials, run_dir / TRIALS_FILE)
    write_parquet_atomic(epochs, run_dir / EPOCHS_FILE)
    logger.info("Wrote %d trials and %d epochs to %s", trials.num_rows, epochs.num_rows, run_dir)
    return trials.to_pandas()


def leaderboard(trials: pd.DataFrame, *, top: int = 10) -> pd.DataFrame:
    """Return the ``top`` trials by best objective, with the searched factors and key metrics."""
    columns = ["trial_id", "status", "best_objective", "best_epoch", "epochs_run", "stopped_early", "backbone",
               "balancing", "unfrozen_layers", "augmentation_intensity", "learning_rate", "batch_size", "dropout",
               "image_size", "best_val_auc", "best_val_sensitivity", "best_val_specificity", "best_val_f2"]
    ranked = trials.sort_values("best_objective", ascending=False, na_position="last")
    return ranked[columns].head(top).reset_index(drop=True)
