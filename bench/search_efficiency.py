"""Benchmark: ASHA with TPE against full-budget random search, in epochs trained and best objective reached.

Both searches run the product's own driver pieces on one real, cheap problem: HAM10000 melanoma
versus the rest, split by lesion, MobileNetV2 from scratch at 32 px. By default they use a random
sample of 4,000 images, so that three seeds of both searches fit in about an hour on 2 cores. They search the same space
(learning rate, dropout, augmentation intensity, batch size, balancing) with the same number of
trials and the same maximum epochs per trial:

- ``asha_tpe``: Optuna's TPE sampler, ASHA stops weak trials at its rungs (the default search, with its rung
  quorum: a trial that reaches a rung before ``--rung-quorum`` others pauses there until they have);
- ``random``: uniform random draws, and every trial trains for all its epochs (FIFO scheduler).

Each seed runs both. The split (made with seed 0) and the image cache are the same for every run,
so ``--seeds 2`` alone repeats the third seed of a full run. The seed sets the sampler, the model's
initial weights and the shuffling. The objective is the search's default,
validation pAUC above 80 % sensitivity (at most 0.2).

Figures: epochs trained by each search, the best validation objective each reached, and per seed
and on average ``epoch_fraction`` (ASHA's epochs over random search's) and ``objective_gap``
(random's best minus ASHA's best). ``ratio`` is the mean ``epoch_fraction``. The goal is a gap of at
most 0.01 with at most 35 % of random search's epochs.

Run from the repository root::

    python bench/search_efficiency.py
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
SEARCHES = {"asha_tpe": {"algorithm": "tpe", "scheduler": "asha"},
            "random": {"algorithm": "random", "scheduler": "fifo"}}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search seeds (default 0 1 2)")
    parser.add_argument("--trials", type=int, default=16, help="trials per search (default 16)")
    parser.add_argument("--max-epochs", type=int, default=8, help="epochs of a trial that is never stopped (default 8)")
    parser.add_argument("--grace-period", type=int, default=1, help="ASHA's first rung, in epochs (default 1)")
    parser.add_argument("--reduction-factor", type=float, default=4, help="ASHA's reduction factor (default 4)")
    parser.add_argument("--rung-quorum", type=int, default=None,
                        help="results an ASHA rung needs before a trial passes it; 1 decides on arrival, as Ray's "
                             "ASHA does (default: the reduction factor, rounded up)")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--concurrent", type=int, default=2, help="trials at once, one CPU each (default 2)")
    parser.add_argument("--limit", type=int, default=4000,
                        help="keep a random sample of N HAM10000 images; 0 keeps all 10,015 (default 4000)")
    return parser.parse_args()


def write_dataset(folder: Path, limit: int | None) -> Path:
    """Return the HAM10000 folder, or a folder with a sample of its metadata that links to its images."""
    if not limit:
        return DATA_FOLDER
    import pandas as pd

    metadata = pd.read_csv(DATA_FOLDER / "HAM10000_metadata.csv", dtype=str)
    # The CSV lists images by diagnosis, so a sample must be random to keep both classes.
    metadata.sample(n=min(limit, len(metadata)), random_state=0).to_csv(folder / "HAM10000_metadata.csv", index=False)
    (folder / "images").symlink_to(DATA_FOLDER / "images", target_is_directory=True)
    return folder


def build_config(arguments: argparse.Namespace, data_folder: Path, storage: Path, search: str, seed: int):
    from spaces.config import load_config

    cache_dir = os.environ.get("LESIONTUNE_CACHE")
    return load_config(overrides={
        "data": {"path": str(data_folder), "layout": "ham10000",
                 "cache_dir": str(Path(cache_dir) / "images") if cache_dir else None},
        "search": {"num_samples": arguments.trials, "max_epochs": arguments.max_epochs,
                   "grace_period": arguments.grace_period, "reduction_factor": arguments.reduction_factor,
                   "rung_quorum": arguments.rung_quorum, "max_concurrent_trials": arguments.concurrent,
                   "storage_path": str(storage), "seed": seed,
                   **SEARCHES[search]},
        "training": {"weights": "none"},
        "space": {"backbone": "MobileNetV2", "balancing": ["none", "class_weight", "undersample", "oversample"],
                  "augmentation_intensity": {"low": 0.0, "high": 1.0},
                  "learning_rate": {"low": 1e-4, "high": 3e-2, "log": True}, "batch_size": [32, 64, 128],
                  "dropout": {"low": 0.0, "high": 0.5}, "image_size": arguments.image_size},
    })


def run_search(arguments: argparse.Namespace, data_folder: Path, storage: Path, search: str, seed: int,
               prepared: dict) -> dict:
    """Run one search and return its epochs, best objective and time."""
    from search import driver
    from search.storage import resolve_storage_path

    config = build_config(arguments, data_folder, storage, search, seed)
    name = f"{search}-seed{seed}"
    run_dir = storage / name
    run_dir.mkdir(parents=True)
    if "data" not in prepared:
        # One split for every seed: the split follows search.seed, so it is made with seed 0.
        split_config = build_config(arguments, data_folder, storage, search, seed=0)
        prepared["data"] = driver.prepare_data(split_config, run_dir, progress=False)
    setup = driver._trial_setup(config, prepared["data"])
    started = time.perf_counter()
    tuner = driver._new_tuner(config, setup, name=name, storage_path=resolve_storage_path(storage), concurrency=arguments.concurrent,
                              progress=False)
    results = tuner.fit()
    minutes = (time.perf_counter() - started) / 60

    epochs, best, failed = 0, None, 0
    for result in results:
        if result.error is not None:
            failed += 1
        history = result.metrics_dataframe
        if history is None or setup.metric not in history:
            continue
        epochs += int(history["epoch"].max())
        value = float(history[setup.metric].max())
        best = value if best is None else max(best, value)
    return {"search": search, "seed": seed, "trials": len(results), "failed": failed, "epochs": epochs,
            "best_objective": best, "minutes": round(minutes, 2)}


def print_table(rows: list[dict], per_seed: list[dict]) -> None:
    print("| seed | search | trials | failed | epochs | best val pAUC80 | minutes |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        best = "-" if row["best_objective"] is None else f"{row['best_objective']:.4f}"
        print(f"| {row['seed']} | {row['search']} | {row['trials']} | {row['failed']} | {row['epochs']} | {best} | "
              f"{row['minutes']:.1f} |")
    print()
    print("| seed | epoch_fraction | objective_gap |")
    print("| ---: | ---: | ---: |")
    for seed in per_seed:
        print(f"| {seed['seed']} | {seed['epoch_fraction']:.3f} | {seed['objective_gap']:+.4f} |")


def main() -> int:
    arguments = parse_arguments()
    if skip_without_ham10000():
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import ray

    from search import driver
    from search.asha import resolve_quorum

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    rows: list[dict] = []
    prepared: dict = {}
    with tempfile.TemporaryDirectory(prefix="lesiontune-bench-efficiency-") as folder:
        data_folder = Path(folder) / "data"
        data_folder.mkdir()
        data_folder = write_dataset(data_folder, arguments.limit)
        driver._start_ray(None)
        try:
            for seed in arguments.seeds:
                for search in SEARCHES:
                    rows.append(run_search(arguments, data_folder, Path(folder) / "runs", search, seed, prepared))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            ray.shutdown()

    per_seed = []
    for seed in arguments.seeds:
        asha = next(row for row in rows if row["seed"] == seed and row["search"] == "asha_tpe")
        random = next(row for row in rows if row["seed"] == seed and row["search"] == "random")
        if asha["best_objective"] is None or random["best_objective"] is None or not random["epochs"]:
            continue
        per_seed.append({"seed": seed, "epoch_fraction": asha["epochs"] / random["epochs"],
                         "objective_gap": random["best_objective"] - asha["best_objective"]})
    print_table(rows, per_seed)

    fraction = statistics.mean(s["epoch_fraction"] for s in per_seed) if per_seed else None
    gap = statistics.mean(s["objective_gap"] for s in per_seed) if per_seed else None
    summary = prepared["data"].summary if "data" in prepared else {}
    figures = {
        "benchmark": "search_efficiency",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable cores, {cpu_model_name()}",
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "images": summary.get("images"), "validation_positive": summary.get("splits", {}).get("validation", {})
        .get("positive"),
        "image_size": arguments.image_size, "trials": arguments.trials, "max_epochs": arguments.max_epochs,
        "grace_period": arguments.grace_period, "reduction_factor": arguments.reduction_factor,
        "rung_quorum": resolve_quorum(arguments.rung_quorum, arguments.reduction_factor),
        "seeds": arguments.seeds,
        "runs": rows,
        "per_seed": [{key: round(value, 4) if isinstance(value, float) else value for key, value in s.items()}
                     for s in per_seed],
        "epoch_fraction": None if fraction is None else round(fraction, 4),
        "objective_gap": None if gap is None else round(gap, 4),
        "goal_met": None if fraction is None else bool(fraction <= 0.35 and gap <= 0.01),
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "ratio": None if fraction is None else round(fraction, 4),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
