"""Benchmark: validation quality of every balancing method on HAM10000 melanoma versus nevus.

A reference measurement of model quality, not a speed comparison, so it has no baseline. Reads
HAM10000 from ``../shared/data/ham10000`` relative to the repository root and keeps only the
images with ``dx`` ``mel`` (positive) or ``nv`` (negative). The filtered metadata goes to a
temporary folder whose ``images`` entry is a symbolic link to the shared images, so nothing is
copied. ``prepare_data`` then builds the image cache, removes duplicates and splits by
``lesion_id``, as a search does.

Ray Tune trains one MobileNetV2 from scratch (``weights: none``) for each balancing method and
augmentation intensity, a grid with one trial per cell, with a fixed budget: no searcher or
scheduler stops a trial early. The figures are the validation metrics from each trial's last
epoch: ROC AUC, partial AUC above 80 % sensitivity (pAUC80, at most 0.2), and sensitivity and
specificity at the threshold that maximises F2. One seed and few epochs make them noisy.

Prints a table, then as the last line one JSON object with the figures. ``ratio`` is null
because there is no baseline.

Run from the repository root::

    python bench/quality.py --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _machine import SHARED_DATA, cpu_model_name

DATA_FOLDER = SHARED_DATA / "ham10000"
METADATA_FILE = "HAM10000_metadata.csv"
KEPT_DIAGNOSES = ("mel", "nv")
BALANCING_METHODS = ("none", "class_weight", "undersample", "oversample", "smote")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per trial (default 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per training batch (default 64)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--dropout", type=float, default=0.2, help="dropout before the output layer (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the model and the sampling (default 0)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--backbone", default="MobileNetV2", help="Keras backbone (default MobileNetV2)")
    parser.add_argument(
        "--balancing", nargs="+", default=list(BALANCING_METHODS), choices=BALANCING_METHODS,
        help="balancing methods to train (default: all five)",
    )
    parser.add_argument(
        "--intensities", nargs="+", type=float, default=[0.0, 0.5],
        help="augmentation intensities in [0, 1] to train (default: 0.0 0.5)",
    )
    parser.add_argument(
        "--limit", type=int, default=None,
        help="keep a random sample of N filtered metadata rows, for a quick test of the script (default: all)",
    )
    parser.add_argument(
        "--concurrent", type=int, default=2,
        help="trials that run at once, one CPU each (default 2)",
    )
    return parser.parse_args()


def write_filtered_dataset(folder: Path, limit: int | None, seed: int) -> int:
    """Write the mel and nv rows of the HAM10000 metadata into ``folder`` and return the row count."""
    import pandas as pd

    metadata = pd.read_csv(DATA_FOLDER / METADATA_FILE, dtype=str)
    filtered = metadata[metadata["dx"].isin(KEPT_DIAGNOSES)]
    if limit is not None:
        # The CSV lists images by diagnosis, so its first rows would be almost all one class.
        filtered = filtered.sample(n=min(limit, len(filtered)), random_state=seed)
    filtered.to_csv(folder / METADATA_FILE, index=False)
    (folder / "images").symlink_to(DATA_FOLDER / "images", target_is_directory=True)
    return int(len(filtered))


def build_config(arguments: argparse.Namespace, dataset_folder: Path, work_folder: Path):
    from spaces.config import load_config

    cache_dir = os.environ.get("LESIONTUNE_CACHE")
    cache_dir = str(Path(cache_dir) / "images") if cache_dir else str(work_folder / "cache")
    return load_config(overrides={
        "data": {"path": str(dataset_folder), "layout": "ham10000", "positive_class": "melanoma",
                 "cache_dir": cache_dir},
        "search": {"max_epochs": arguments.epochs, "seed": arguments.seed},
        "training": {"weights": "none"},
        "space": {
            "backbone": arguments.backbone,
            "balancing": list(arguments.balancing),
            "augmentation_intensity": arguments.intensities[0],
            "learning_rate": arguments.learning_rate,
            "batch_size": arguments.batch_size,
            "dropout": arguments.dropout,
            "image_size": arguments.image_size,
        },
    })


def run_grid(config, setup, arguments: argparse.Namespace, storage: Path):
    """Train every (balancing, intensity) pair once and return the Tune result grid."""
    import ray
    from ray import tune

    from spaces.tune_space import to_param_space
    from trainables.trial import train_classifier

    # Fixed values, including the backbone depth that load_config sets for weights "none", come from the config.
    param_space = to_param_space(config.space)
    param_space["balancing"] = tune.grid_search(list(arguments.balancing))
    param_space["augmentation_intensity"] = tune.grid_search(list(arguments.intensities))

    ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
    try:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(train_classifier, setup=setup), {"cpu": 1}),
            param_space=param_space,
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=arguments.concurrent),
            run_config=tune.RunConfig(storage_path=str(storage), name="quality", verbose=0),
        )
        return tuner.fit()
    finally:
        ray.shutdown()


def rounded(value, digits: int = 4):
    return None if value is None else round(float(value), digits)


def collect_rows(results) -> list[dict[str, object]]:
    rows = []
    for result in results:
        metrics = result.metrics or {}
        config = result.config or {}
        rows.append({
            "balancing": config.get("balancing"),
            "intensity": config.get("augmentation_intensity"),
            "epochs": metrics.get("epoch"),
            "val_auc": rounded(metrics.get("val_auc")),
            "val_pauc80": rounded(metrics.get("val_pauc80")),
            "sensitivity": rounded(metrics.get("val_sensitivity")),
            "specificity": rounded(metrics.get("val_specificity")),
            "epoch_seconds": rounded(metrics.get("epoch_seconds"), 1),
            "minutes": rounded((metrics.get("time_total_s") or 0.0) / 60.0, 2),
            "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}"[:300],
        })
    order = {name: index for index, name in enumerate(BALANCING_METHODS)}
    rows.sort(key=lambda row: (order.get(row["balancing"], len(order)), row["intensity"] or 0.0))
    return rows


def format_cell(value) -> str:
    return "-" if value is None else f"{value}"


def print_table(rows: list[dict[str, object]]) -> None:
    print("| balancing | intensity | val AUC | val pAUC80 | sensitivity | specificity | minutes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        cells = [row["balancing"], row["intensity"], row["val_auc"], row["val_pauc80"], row["sensitivity"],
                 row["specificity"], row["minutes"]]
        print("| " + " | ".join(format_cell(cell) for cell in cells) + " |")
    for row in rows:
        if row["error"]:
            print(f"trial {row['balancing']}, intensity {row['intensity']} failed: {row['error']}", file=sys.stderr)


def main() -> int:
    arguments = parse_arguments()
    if arguments.epochs < 1:
        print(f"--epochs must be at least 1, got {arguments.epochs}", file=sys.stderr)
        return 2
    if any(not 0.0 <= intensity <= 1.0 for intensity in arguments.intensities):
        print(f"--intensities must lie in [0, 1], got {arguments.intensities}", file=sys.stderr)
        return 2
    if not (DATA_FOLDER / METADATA_FILE).is_file() or not (DATA_FOLDER / "images").is_dir():
        print(f"skipped: HAM10000 not found at {DATA_FOLDER} (expected {METADATA_FILE} and images/). "
              "Place the shared data folder next to the repository.", file=sys.stderr)
        return 0

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from search.driver import _trial_setup, prepare_data

    started = time.perf_counter()
    work_folder = Path(tempfile.mkdtemp(prefix="lesiontune-bench-quality-"))
    try:
        dataset_folder = work_folder / "dataset"
        run_folder = work_folder / "run"
        dataset_folder.mkdir()
        run_folder.mkdir()
        metadata_rows = write_filtered_dataset(dataset_folder, arguments.limit, arguments.seed)
        config = build_config(arguments, dataset_folder, work_folder)

        prepare_started = time.perf_counter()
        prepared = prepare_data(config, run_folder, progress=False)
        prepare_seconds = time.perf_counter() - prepare_started
        setup = _trial_setup(config, prepared)

        grid_started = time.perf_counter()
        results = run_grid(config, setup, arguments, work_folder / "ray_results")
        grid_seconds = time.perf_counter() - grid_started
        rows = collect_rows(results)
    finally:
        shutil.rmtree(work_folder, ignore_errors=True)
    total_seconds = time.perf_counter() - started

    summary = prepared.summary
    data_counts = {
        "metadata_rows": metadata_rows,
        "images": summary["images"],
        "melanoma": summary["positive"],
        "lesions": summary["groups"],
        "excluded": summary["excluded"],
        "duplicates": summary["duplicates"],
        "splits": {
            name: {"images": split["images"], "melanoma": split["positive"], "lesions": split["groups"]}
            for name, split in summary["splits"].items()
        },
    }
    print_table(rows)
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_model_name()}, {platform.system()}",
        "task": "HAM10000 mel vs nv, lesion-grouped split",
        "backbone": arguments.backbone,
        "weights": "none",
        "image_size": arguments.image_size,
        "epochs": arguments.epochs,
        "batch_size": arguments.batch_size,
        "learning_rate": arguments.learning_rate,
        "dropout": arguments.dropout,
        "seed": arguments.seed,
        "data": data_counts,
        "configs": [{key: value for key, value in row.items() if key != "error" or value} for row in rows],
        "prepare_seconds": round(prepare_seconds, 1),
        "grid_seconds": round(grid_seconds, 1),
        "total_seconds": round(total_seconds, 1),
        "ratio": None,
    }))
    return 1 if any(row["error"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
