"""Benchmark: the share of a trial's wall time spent training and evaluating, with fresh and with reused workers.

Runs the search driver's own pieces (``prepare_data``, the trial setup, ``_new_tuner``) on HAM10000
melanoma versus the rest, MobileNetV2 from scratch at 64 px, with every hyperparameter fixed and the
FIFO scheduler, so each trial does the same work. A Tune callback in the driver notes when each trial's
worker has started and when the trial completes. Each trial reports ``setup_seconds`` (from the start of the trial
function to its first epoch: imports, reading the manifest and cache, building the model) and
``epoch_seconds`` (fit on the training split, predict on validation, metrics). Two shares:

- per trial: the sum of its ``epoch_seconds`` over its wall time from Tune's ``on_trial_start``
  (its worker process is up) to its completion, which counts the trial's imports, data loading,
  model build and checkpoints;
- per search: the sum of ``epoch_seconds`` of all trials over the trial slots times the wall time of
  ``Tuner.fit``, which also counts starting worker processes and Ray's scheduling.

The same trials run twice: with a new worker process per trial (Ray Tune's default, the baseline)
and with ``search.reuse_workers: true``, where a finished trial's worker runs the next trial and
TensorFlow stays imported. ``ratio`` is the per-search share with reused workers over the one with
fresh workers.

Run from the repository root::

    python bench/trial_overhead.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _machine import HAM10000_FOLDER, cpu_model_name, skip_without_ham10000

DATA_FOLDER = HAM10000_FOLDER


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4, help="trials per mode (default 4)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial (default 2)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--concurrent", type=int, default=2, help="trials at once, one CPU each (default 2)")
    parser.add_argument("--modes", nargs="+", default=["fresh", "reused"], choices=("fresh", "reused"),
                        help="worker modes to run, in order (default: fresh reused)")
    return parser.parse_args()


def make_timing_callback(log_path: Path):
    """Return a Tune callback that appends when each trial starts and completes to ``log_path``.

    A file, because Tune keeps its own copy of the callbacks in the run config.
    """
    from ray.tune import Callback

    class TrialTimes(Callback):
        """Callback that notes the time at which each trial's actor has started and the trial completes."""

        def __init__(self, path: str):
            self.path = path

        def _note(self, event: str, trial) -> None:
            with open(self.path, "a", encoding="utf-8") as log:
                log.write(json.dumps({"event": event, "trial_id": trial.trial_id, "time": time.monotonic()}) + "\n")

        def on_trial_start(self, iteration, trials, trial, **info):
            self._note("started", trial)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._note("completed", trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._note("completed", trial)

    return TrialTimes(str(log_path))


def read_timing(log_path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Return (started, completed) times by trial id from the callback's log."""
    started, completed = {}, {}
    for line in log_path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        (started if entry["event"] == "started" else completed)[entry["trial_id"]] = entry["time"]
    return started, completed


def build_config(arguments: argparse.Namespace, storage: Path, reuse: bool):
    from spaces.config import load_config

    cache_dir = os.environ.get("LESIONTUNE_CACHE")
    return load_config(overrides={
        "data": {"path": str(DATA_FOLDER), "layout": "ham10000",
                 "cache_dir": str(Path(cache_dir) / "images") if cache_dir else None},
        "search": {"num_samples": arguments.trials, "max_epochs": arguments.epochs, "scheduler": "fifo",
                   "max_concurrent_trials": arguments.concurrent, "storage_path": str(storage),
                   "reuse_workers": reuse, "seed": 0},
        "training": {"weights": "none"},
        "space": {"backbone": "MobileNetV2", "balancing": "class_weight", "augmentation_intensity": 0.5,
                  "learning_rate": 1e-3, "batch_size": arguments.batch_size, "dropout": 0.2,
                  "image_size": arguments.image_size},
    })


def run_mode(arguments: argparse.Namespace, storage: Path, mode: str, prepared_by_size: dict) -> list[dict]:
    """Run one search in this mode and return one row per trial."""
    from search import driver
    from search.storage import resolve_storage_path

    config = build_config(arguments, storage, reuse=(mode == "reused"))
    run_dir = storage / f"overhead-{mode}"
    run_dir.mkdir(parents=True)
    prepared = prepared_by_size.get("prepared")
    if prepared is None:
        prepared = driver.prepare_data(config, run_dir, progress=False)
        prepared_by_size["prepared"] = prepared
    setup = driver._trial_setup(config, prepared)
    log_path = storage / f"timing-{mode}.jsonl"
    timing = make_timing_callback(log_path)
    tuner = driver._new_tuner(config, setup, name=f"overhead-{mode}", storage_path=resolve_storage_path(storage),
                              concurrency=arguments.concurrent, progress=False, callbacks=[timing])
    fit_started = time.monotonic()
    results = tuner.fit()
    fit_seconds = time.monotonic() - fit_started
    added, completed = read_timing(log_path)

    rows = []
    for result in results:
        folder_name = Path(result.path).name if result.path else ""
        # Tune names a trial's folder after the trainable, then the trial id.
        trial_id = next((key for key in added if key in folder_name), None)
        history = result.metrics_dataframe
        wall = None
        if trial_id in completed:
            wall = completed[trial_id] - added[trial_id]
        epoch_seconds = float(history["epoch_seconds"].sum()) if history is not None else 0.0
        rows.append({
            "mode": mode, "trial": trial_id, "epochs": int(len(history)) if history is not None else 0,
            "wall_seconds": wall, "setup_seconds": float(history["setup_seconds"].iloc[0]) if history is not None else None,
            "epoch_seconds": epoch_seconds,
            "share": epoch_seconds / wall if wall else None,
            "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}"[:200],
            "search_seconds": fit_seconds,
        })
    return rows


def print_table(rows: list[dict]) -> None:
    print("| workers | trial | epochs | wall s | setup s | fit + evaluate s | other s | share in fit + evaluate |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        other = row["wall_seconds"] - row["setup_seconds"] - row["epoch_seconds"] if row["wall_seconds"] else None
        cells = [row["mode"], row["trial"], row["epochs"], _fmt(row["wall_seconds"]), _fmt(row["setup_seconds"]),
                 _fmt(row["epoch_seconds"]), _fmt(other), _fmt(row["share"], 3)]
        print("| " + " | ".join(str(cell) for cell in cells) + " |")


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> int:
    arguments = parse_arguments()
    if skip_without_ham10000():
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import ray

    from search import driver

    load_before = os.getloadavg()[0]
    rows: list[dict] = []
    prepared: dict = {}
    with tempfile.TemporaryDirectory(prefix="lesiontune-bench-overhead-") as folder:
        driver._start_ray(None)
        try:
            for mode in arguments.modes:
                rows += run_mode(arguments, Path(folder), mode, prepared)
        finally:
            ray.shutdown()

    print_table(rows)
    failed = [row for row in rows if row["error"]]
    for row in failed:
        print(f"trial {row['trial']} ({row['mode']}) failed: {row['error']}", file=sys.stderr)
    shares = {mode: [row["share"] for row in rows if row["mode"] == mode and row["share"] is not None]
              for mode in arguments.modes}
    search_shares = {}
    for mode in arguments.modes:
        mode_rows = [row for row in rows if row["mode"] == mode]
        slots_seconds = arguments.concurrent * mode_rows[0]["search_seconds"]
        search_shares[mode] = round(sum(row["epoch_seconds"] for row in mode_rows) / slots_seconds, 4)
    means = {mode: round(statistics.mean(values), 4) if values else None for mode, values in shares.items()}
    walls = {mode: round(statistics.mean(row["wall_seconds"] for row in rows if row["mode"] == mode
                                         and row["wall_seconds"]), 1) for mode in arguments.modes}
    figures = {
        "benchmark": "trial_overhead",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable cores, {cpu_model_name()}",
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "trials_per_mode": arguments.trials, "epochs": arguments.epochs, "image_size": arguments.image_size,
        "batch_size": arguments.batch_size, "concurrent": arguments.concurrent,
        "mean_wall_seconds": walls,
        "share_fresh": means.get("fresh"), "share_reused": means.get("reused"),
        "min_share": {mode: round(min(values), 4) for mode, values in shares.items() if values},
        "search_share": search_shares,
        "failed_trials": len(failed),
        "ratio": round(search_shares["reused"] / search_shares["fresh"], 3)
        if "reused" in search_shares and "fresh" in search_shares else None,
    }
    print(json.dumps(figures))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
