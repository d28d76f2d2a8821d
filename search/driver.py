"""The search driver: prepare the data once, then run OptunaSearch (TPE) with ASHA on Ray Tune.

The run folder is Tune's experiment folder (``STORAGE_PATH/NAME``). Besides Tune's own files it contains
``lesiontune_config.yaml`` (the resolved experiment), ``manifest.parquet`` (the split every trial
uses), ``data_summary.json`` with ``data_report.parquet`` (counts per class, exclusion reason, duplicate
kind and split), ``exclusions.parquet`` and ``duplicates.parquet``, and after the search ``trials.parquet``
and ``epochs.parquet``.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import yaml

from data.cache import build_image_cache
from data.duplicates import (CACHED_IMAGE_MAX_DISTANCE, DEFAULT_MAX_DISTANCE, compute_array_hashes, find_duplicates,
                             merge_duplicate_groups)
from data.io import write_json_atomic, write_parquet_atomic
from data.metadata import DataError, load_dataset
from data.splits import SplitFractions, assign_splits, write_manifest
from spaces.config import ExperimentConfig
from spaces.tune_space import to_param_space
from trainables.backbones import WeightsUnavailableError, get_backbone
from trainables.trial import TrialSetup

__all__ = ["PreparedData", "SearchOutcome", "check_imagenet_weights", "default_cache_dir", "prepare_data", "resume_search",
           "run_search", "trial_concurrency"]

logger = logging.getLogger(__name__)

CONFIG_FILE = "lesiontune_config.yaml"
MANIFEST_FILE = "manifest.parquet"
SUMMARY_FILE = "data_summary.json"
EXCLUSIONS_FILE = "exclusions.parquet"
DATA_REPORT_FILE = "data_report.parquet"
DUPLICATES_FILE = "duplicates.parquet"
KERAS_WEIGHTS_ORIGIN = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class PreparedData:
    """The split manifest and one image cache per searched image size."""

    manifest_path: Path
    cache_paths: dict[int, str]
    summary: dict[str, object]


@dataclass(frozen=True)
class SearchOutcome:
    run_dir: Path
    trials: pd.DataFrame
    metric: str


def default_cache_dir() -> Path:
    """Return ``$LESIONTUNE_CACHE/images``, else ``~/.cache/lesiontune/images``."""
    root = os.environ.get("LESIONTUNE_CACHE") or Path.home() / ".cache" / "lesiontune"
    return Path(root) / "images"


def prepare_data(config: ExperimentConfig, run_dir: Path, *, progress: bool = True) -> PreparedData:
    """Read the metadata, build the image caches, split by group and write the manifest and data report."""
    settings = config.data
    dataset = load_dataset(settings["path"], positive_class=settings["positive_class"], layout=settings["layout"])
    records = dataset.records.reset_index(drop=True)
    cache_root = Path(settings["cache_dir"]).expanduser() if settings["cache_dir"] else default_cache_dir()

    cache_paths: dict[int, str] = {}
    skipped_frames = []
    cache = None
    for size in sorted(config.space["image_size"].candidates()):
        cache = build_image_cache(records["path"].tolist(), records["image_id"].tolist(), image_size=int(size),
                                  cache_root=cache_root, progress=progress)
        cache_paths[int(size)] = str(cache.path)
        skipped_frames.append(cache.skipped[["image_id", "reason"]])
    assert cache is not None  # the image_size parameter always has at least one value
    records["cache_row"] = [cache.row_of(image_id) for image_id in records["image_id"]]

    unreadable = pd.concat(skipped_frames).drop_duplicates("image_id")
    records = records[~records["image_id"].isin(unreadable["image_id"])].reset_index(drop=True)
    if records.empty:
        raise DataError(f"None of the images in {dataset.root} could be decoded; see {run_dir / EXCLUSIONS_FILE}.")
    exclusions = pd.concat([dataset.excluded, unreadable.assign(reason="unreadable image: " + unreadable["reason"])],
                           ignore_index=True)

    # Copies of one image under two ids would land in different splits and leak. Hashing the cached pixels
    # spares a second decode of the originals, and each row is read from the memory map only when it is hashed.
    cached_pixels = [cache.images[row] for row in records["cache_row"]]
    hashes = compute_array_hashes(cached_pixels, records["image_id"].tolist())
    max_distance = CACHED_IMAGE_MAX_DISTANCE if cache.resize_rule == "center_crop" else DEFAULT_MAX_DISTANCE
    duplicates = find_duplicates(records, max_distance=max_distance, hashes=hashes)
    records = merge_duplicate_groups(records, duplicates)
    write_parquet_atomic(duplicates, run_dir / DUPLICATES_FILE)

    split = assign_splits(records, fractions=SplitFractions(settings["validation_fraction"], settings["test_fraction"]),
                          seed=int(config.search["seed"]))
    manifest_path = run_dir / MANIFEST_FILE
    write_manifest(records, split, manifest_path)
    write_parquet_atomic(exclusions.astype({"image_id": "string", "reason": "string"}), run_dir / EXCLUSIONS_FILE)

    summary = dataset.summary()
    summary["excluded"] = int(len(exclusions))
    summary["excluded_by_reason"] = {str(k): int(v) for k, v in exclusions["reason"].value_counts().items()}
    summary["images"] = int(len(records))
    summary["positive"] = int(records["label"].sum())
    summary["negative"] = int(len(records) - records["label"].sum())
    summary["groups"] = int(records["group"].nunique())
    summary["splits"] = {
        name: {"images": int((split == name).sum()), "positive": int(records.loc[split == name, "label"].sum()),
               "groups": int(records.loc[split == name, "group"].nunique())}
        for name in ("train", "validation", "test")
    }
    summary["duplicates"] = {kind: int((duplicates["kind"] == kind).sum()) for kind in ("exact", "near")}
    summary["cache_paths"] = {str(k): v for k, v in cache_paths.items()}
    write_json_atomic(summary, run_dir / SUMMARY_FILE)
    write_parquet_atomic(_data_report_table(summary), run_dir / DATA_REPORT_FILE)
    return PreparedData(manifest_path=manifest_path, cache_paths=cache_paths, summary=summary)


def _data_report_table(summary: dict) -> pa.Table:
    """Flatten the data summary into one typed table: a row per class, exclusion reason, duplicate kind and split."""
    rows = [
        {"section": "class", "name": "positive", "images": summary["positive"], "positive": summary["positive"],
         "groups": summary.get("positive_groups")},
        {"section": "class", "name": "negative", "images": summary["negative"], "positive": 0, "groups": None},
        *({"section": "exclusion", "name": reason, "images": count, "positive": None, "groups": None}
          for reason, count in summary["excluded_by_reason"].items()),
        *({"section": "duplicates", "name": kind, "images": count, "positive": None, "groups": None}
          for kind, count in summary["duplicates"].items()),
        *({"section": "split", "name": name, **values} for name, values in summary["splits"].items()),
    ]
    schema = pa.schema([("section", pa.string()), ("name", pa.string()), ("images", pa.int64()),
                        ("positive", pa.int64()), ("groups", pa.int64())])
    return pa.Table.from_pylist(rows, schema=schema)


def check_imagenet_weights(backbones: list[str], image_sizes: list[int], *, origin: str = KERAS_WEIGHTS_ORIGIN,
                           timeout: float = 10.0) -> None:
    """Fail before any trial starts if ImageNet weights are neither cached nor downloadable."""
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    missing = [get_backbone(b).weights_file_for(s) for b in backbones for s in image_sizes
               if not (cache / get_backbone(b).weights_file_for(s)).is_file()]
    if not missing:
        return
    try:
        urllib.request.urlopen(urllib.request.Request(origin, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # The server sent an HTTP status, so the network works; the download itself may still fail later.
    except (urllib.error.URLError, socket.timeout, OSError) as error:
        raise WeightsUnavailableError(
            f"ImageNet weights are not cached ({', '.join(sorted(set(missing)))}) and {origin} cannot be reached "
            f"({getattr(error, 'reason', error)}). Use --weights none to train from scratch, or --weights DIR with a "
            "folder of pre-downloaded weight files."
        ) from error


def trial_concurrency(config: ExperimentConfig, cluster_cpus: float, cluster_gpus: float) -> int:
    """Trials that fit at once: the configured limit, else what the CPUs and GPUs allow."""
    limit = config.search["max_concurrent_trials"]
    if limit:
        return int(limit)
    cpus, gpus = config.resources["cpus_per_trial"], config.resources["gpus_per_trial"]
    fits = math.floor(cluster_cpus / cpus) if cpus else 1
    if gpus:
        fits = min(fits, math.floor(cluster_gpus / gpus))
    return max(1, fits)


def _run_name(config: ExperimentConfig) -> str:
    return config.search["name"] or "lesiontune-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _trial_setup(config: ExperimentConfig, prepared: PreparedData) -> TrialSetup:
    weights = config.training["weights"]
    return TrialSetup(
        manifest_path=str(prepared.manifest_path), cache_paths=prepared.cache_paths,
        max_epochs=int(config.search["max_epochs"]),
        weights=weights if weights in ("imagenet", "none") else str(Path(weights).expanduser().resolve()),
        objective=config.search["objective"], seed=int(config.search["seed"]),
        cpus_per_trial=max(1, math.ceil(config.resources["cpus_per_trial"])),
        head_epochs=int(config.training["head_epochs"]),
        fine_tune_learning_rate_multiplier=float(config.training["fine_tune_learning_rate_multiplier"]),
        specificity_target=float(config.training["specificity_target"]),
        sensitivity_target=float(config.training["sensitivity_target"]),
        mixed_precision=bool(config.training["mixed_precision"]),
        jit_compile=config.training["jit_compile"],
        gpus_per_trial=float(config.resources["gpus_per_trial"]),
    )


def _start_ray(address: str | None) -> dict[str, float]:
    """Connect to ``address``, else to ``$RAY_ADDRESS``, else start a local Ray; return the cluster's resources."""
    import ray

    if not ray.is_initialized():
        runtime_env = {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}}
        # Ray sets RAY_ADDRESS for the driver of a Ray job, so a submitted search joins the job's cluster.
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, runtime_env=runtime_env)
        else:
            # "local" starts a new Ray here even when another cluster on this machine could be joined.
            ray.init(address="local", include_dashboard=False, runtime_env=runtime_env)
    return ray.cluster_resources()


def _trainable(config: ExperimentConfig, setup: TrialSetup):
    from ray import tune

    from trainables.trial import train_classifier

    return tune.with_resources(
        tune.with_parameters(train_classifier, setup=setup),
        {"cpu": config.resources["cpus_per_trial"], "gpu": config.resources["gpus_per_trial"]},
    )


def _new_tuner(config: ExperimentConfig, setup: TrialSetup, *, name: str, storage_path: Path, concurrency: int,
               progress: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    metric = setup.metric
    points = config.search["points_to_evaluate"] or None
    searcher = ConcurrencyLimiter(OptunaSearch(seed=int(config.search["seed"]), points_to_evaluate=points),
                                  max_concurrent=concurrency)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=int(config.search["max_epochs"]),
                              grace_period=int(config.search["grace_period"]),
                              reduction_factor=float(config.search["reduction_factor"]))
    return tune.Tuner(
        _trainable(config, setup),
        param_space=to_param_space(config.space),
        tune_config=tune.TuneConfig(metric=metric, mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=int(config.search["num_samples"])),
        run_config=tune.RunConfig(
            name=name, storage_path=str(storage_path), verbose=1 if progress else 0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=metric,
                                                    checkpoint_score_order="max"),
            failure_config=tune.FailureConfig(max_failures=int(config.search["max_failures"])),
        ),
    )


def _log_resources(config: ExperimentConfig, resources: dict[str, float], concurrency: int) -> None:
    logger.info("Cluster has %s CPUs and %s GPUs: up to %d trials at once, each with %s CPUs and %s GPUs",
                resources.get("CPU"), resources.get("GPU", 0), concurrency, config.resources["cpus_per_trial"],
                config.resources["gpus_per_trial"])


def run_search(config: ExperimentConfig, *, address: str | None = None, progress: bool = True) -> SearchOutcome:
    """Prepare the data, run the search and export ``trials.parquet`` and ``epochs.parquet``."""
    from results.export import export_run

    name = _run_name(config)
    storage_path = Path(config.search["storage_path"] or Path.cwd() / "lesiontune_runs").expanduser().resolve()
    run_dir = storage_path / name
    if any(run_dir.glob("experiment_state-*.json")):
        raise ValueError(f"Run folder {run_dir} already contains a search. Continue it with --resume {run_dir}, "
                         "or choose another --name.")
    run_dir.mkdir(parents=True, exist_ok=True)
    config.search["name"], config.search["storage_path"] = name, str(storage_path)
    # Absolute paths let the run be repeated from its saved config wherever the command starts.
    config.data["path"] = str(Path(config.data["path"]).expanduser().resolve())
    if config.data["cache_dir"]:
        config.data["cache_dir"] = str(Path(config.data["cache_dir"]).expanduser().resolve())
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    logger.info("Experiment %s in %s:\n%s", name, run_dir, yaml.safe_dump(config.to_dict(), sort_keys=False))

    if config.training["weights"] == "imagenet":
        check_imagenet_weights(list(config.space["backbone"].candidates()),
                               [int(s) for s in config.space["image_size"].candidates()])
    prepared = prepare_data(config, run_dir, progress=progress)
    setup = _trial_setup(config, prepared)

    resources = _start_ray(address)
    concurrency = trial_concurrency(config, resources.get("CPU", 1), resources.get("GPU", 0))
    _log_resources(config, resources, concurrency)
    tuner = _new_tuner(config, setup, name=name, storage_path=storage_path, concurrency=concurrency,
                       progress=progress)
    tuner.fit()
    return SearchOutcome(run_dir=run_dir, trials=export_run(run_dir), metric=setup.metric)


def resume_search(run_dir: str | os.PathLike, *, address: str | None = None, progress: bool = True) -> SearchOutcome:
    """Continue a stopped or crashed search from its run folder.

    Finished trials are kept, unfinished and errored ones continue from their last checkpoint, and the
    searcher (OptunaSearch) and scheduler (ASHA) get their saved state back, so the total trial count holds.
    """
    from ray import tune

    from results.export import export_run
    from spaces.config import load_config

    run_dir = Path(run_dir).expanduser().resolve()
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"Cannot resume {run_dir}: {CONFIG_FILE} not found. Pass the run folder "
                                "(STORAGE_PATH/NAME) that the first search printed.")
    if not tune.Tuner.can_restore(str(run_dir)):
        raise ValueError(f"Cannot resume {run_dir}: Ray Tune saved no experiment state there (the search stopped "
                         "before its first trial started). Start it again with 'lesiontune search'.")
    config = load_config(run_dir / CONFIG_FILE)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    prepared = PreparedData(manifest_path=run_dir / MANIFEST_FILE,
                            cache_paths={int(k): v for k, v in summary["cache_paths"].items()}, summary=summary)
    setup = _trial_setup(config, prepared)

    _start_ray(address)
    logger.info("Resuming %s", run_dir)
    tuner = tune.Tuner.restore(str(run_dir), trainable=_trainable(config, setup), resume_unfinished=True,
                               resume_errored=True)
    tuner.fit()
    return SearchOutcome(run_dir=run_dir, trials=export_run(run_dir), metric=setup.metric)
