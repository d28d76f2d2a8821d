"""The search driver: prepare the data once, then run OptunaSearch (TPE) with ASHA on Ray Tune.

The run folder is Tune's experiment folder (``STORAGE_PATH/NAME``). Besides Tune's own files it contains
``lesiontune_config.yaml`` (the resolved experiment), ``manifest.parquet`` (the split every trial
uses), ``data_summary.json`` with ``data_report.parquet`` (counts per class, exclusion reason, duplicate
kind and split), ``exclusions.parquet`` and ``duplicates.parquet``, and after the search ``trials.parquet``
and ``epochs.parquet``.

``STORAGE_PATH`` may also be a URI that ``pyarrow.fs`` reads (``s3://``, ``gs://``, ``file://``; see
:mod:`search.storage`). The driver then prepares the data in a local staging folder and uploads its files,
Tune writes to the URI itself, and trials get the manifest through Ray's object store instead of a file.
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import json
import logging
import math
import os
import shlex
import socket
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import yaml

from data.cache import build_image_cache
from data.duplicates import (CACHED_IMAGE_MAX_DISTANCE, DEFAULT_MAX_DISTANCE, compute_array_hashes, find_duplicates,
                             merge_duplicate_groups)
from data.io import write_json_atomic, write_parquet_atomic
from data.metadata import DataError, load_dataset
from data.splits import SplitFractions, assign_splits, write_manifest
from search.storage import (StoragePath, check_storage_reachable, download_run_files, list_names, path_exists,
                            read_bytes, read_text, resolve_storage_path, upload_files, write_text)
from spaces.config import ExperimentConfig
from search.resources import (ConcurrencyPlan, GpuMemoryCheck, NodeResources, check_gpu_memory, find_gpu_memory,
                              nodes_from_ray, plan_concurrency)
from spaces.tune_space import ConditionalSpace
from trainables.backbones import WeightsUnavailableError, get_backbone
from trainables.trial import TrialSetup

__all__ = ["PreparedData", "SearchOutcome", "cache_size", "check_imagenet_weights", "default_cache_dir", "prepare_data",
           "resume_search", "run_search"]

logger = logging.getLogger(__name__)

CONFIG_FILE = "lesiontune_config.yaml"
MANIFEST_FILE = "manifest.parquet"
SUMMARY_FILE = "data_summary.json"
EXCLUSIONS_FILE = "exclusions.parquet"
DATA_REPORT_FILE = "data_report.parquet"
DUPLICATES_FILE = "duplicates.parquet"
DATA_FILES = (MANIFEST_FILE, SUMMARY_FILE, DATA_REPORT_FILE, EXCLUSIONS_FILE, DUPLICATES_FILE)
KERAS_WEIGHTS_ORIGIN = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class PreparedData:
    """The split manifest and one image cache per searched image size."""

    manifest_path: Path | str  # a local file, or in a remote run folder the manifest's URI (credentials masked)
    cache_paths: dict[int, str]
    summary: dict[str, object]
    manifest_parquet: bytes | None = None  # the manifest file's bytes when the run folder is remote, else None


@dataclass(frozen=True)
class SearchOutcome:
    run_dir: StoragePath  # ``str()`` and ``/`` work as on a Path, and ``str()`` masks credentials in a URI
    trials: pd.DataFrame
    metric: str
    summary: dict[str, object]  # the content of data_summary.json


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


def cache_size(cache_paths: dict[int, str]) -> int:
    """Return the bytes of the image caches' files."""
    total = 0
    for folder in cache_paths.values():
        total += sum(path.stat().st_size for path in Path(folder).iterdir() if path.is_file())
    return total


def _ray_nodes() -> list[NodeResources]:
    import ray

    return nodes_from_ray(ray.nodes())


def _run_name(config: ExperimentConfig) -> str:
    return config.search["name"] or "lesiontune-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _trial_setup(config: ExperimentConfig, prepared: PreparedData) -> TrialSetup:
    weights = config.training["weights"]
    return TrialSetup(
        manifest_path=str(prepared.manifest_path), cache_paths=prepared.cache_paths,
        manifest_parquet=prepared.manifest_parquet,
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


def _new_searcher(config: ExperimentConfig, metric: str):
    """Return OptunaSearch over the conditional space, with TPE or, for a baseline, random sampling."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    seed = int(config.search["seed"])
    if config.search["algorithm"] == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed)
    points = config.search["points_to_evaluate"] or None
    return OptunaSearch(space=ConditionalSpace(config), metric=metric, mode="max", sampler=sampler,
                        points_to_evaluate=points)


def _new_scheduler(config: ExperimentConfig, concurrency: int):
    """Return ASHA with a quorum per rung, or FIFO (every trial runs all its epochs) for ``search.scheduler: fifo``."""
    from ray.tune.schedulers import FIFOScheduler

    from search.asha import QuorumASHA

    if config.search["scheduler"] == "fifo":
        return FIFOScheduler()
    return QuorumASHA(time_attr="training_iteration", max_t=int(config.search["max_epochs"]),
                      grace_period=int(config.search["grace_period"]),
                      reduction_factor=float(config.search["reduction_factor"]), quorum=config.search["rung_quorum"],
                      max_concurrent=concurrency)


def _ray_storage(location: StoragePath) -> tuple[str, pafs.FileSystem | None]:
    """Return Tune's ``(storage_path, storage_filesystem)`` for ``location``: the plain path and None when local.

    For a URI, Tune gets the resolved filesystem and the path on it, so the URI, which may hold credentials,
    never appears in Tune's logs.
    """
    return (location.path, None) if location.is_local else (location.path, location.filesystem)


def _new_tuner(config: ExperimentConfig, setup: TrialSetup, *, name: str, storage_path: StoragePath,
               concurrency: int, progress: bool, callbacks: list | None = None):
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from search.asha import QuorumConcurrencyLimiter

    metric = setup.metric
    limiter = QuorumConcurrencyLimiter if config.search["scheduler"] == "asha" else ConcurrencyLimiter
    searcher = limiter(_new_searcher(config, metric), max_concurrent=concurrency)
    scheduler = _new_scheduler(config, concurrency)
    storage, filesystem = _ray_storage(storage_path)
    return tune.Tuner(
        _trainable(config, setup),
        tune_config=tune.TuneConfig(metric=metric, mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=int(config.search["num_samples"]),
                                    reuse_actors=bool(config.search["reuse_workers"])),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, storage_filesystem=filesystem, verbose=1 if progress else 0,
            callbacks=callbacks,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=metric,
                                                    checkpoint_score_order="max"),
            failure_config=tune.FailureConfig(max_failures=int(config.search["max_failures"])),
        ),
    )


def _log_resources(config: ExperimentConfig, resources: dict[str, float], plan: ConcurrencyPlan) -> None:
    logger.info("Cluster has %s CPUs and %s GPUs; each trial takes %s CPUs and %s GPUs: %s",
                resources.get("CPU"), resources.get("GPU", 0), config.resources["cpus_per_trial"],
                config.resources["gpus_per_trial"], plan.describe())
    if plan.limited_by == "memory" and plan.trials == 1:
        logger.warning("One trial may need more memory than a node offers (estimated %.1f GiB per trial). Lower "
                       "space.batch_size or space.image_size, or set search.max_concurrent_trials if the estimate "
                       "is too cautious.", plan.trial_memory_bytes / 2**30)


def _log_gpu_memory_check(check: GpuMemoryCheck | None) -> None:
    """Log the GPU memory estimate of a trial, and warn when it exceeds the trial's share of a GPU."""
    if check is None:
        return
    logger.info("%s", check.describe())
    warning = check.warning()
    if warning:
        logger.warning("%s", warning)


def run_search(config: ExperimentConfig, *, address: str | None = None, progress: bool = True) -> SearchOutcome:
    """Prepare the data, run the search and export ``trials.parquet`` and ``epochs.parquet``."""
    name = _run_name(config)
    storage_path = resolve_storage_path(config.search["storage_path"] or Path.cwd() / "lesiontune_runs")
    check_storage_reachable(storage_path)
    run_dir = storage_path / name
    if _contains_search(run_dir):
        raise ValueError(f"Run folder {run_dir} already contains a search. Continue it with --resume "
                         f"{shlex.quote(str(run_dir))}, or choose another --name.")
    # A URI is saved with its credentials masked, so the saved config never contains a secret.
    config.search["name"], config.search["storage_path"] = name, str(storage_path)
    # Absolute paths let the run be repeated from its saved config wherever the command starts.
    config.data["path"] = str(Path(config.data["path"]).expanduser().resolve())
    if config.data["cache_dir"]:
        config.data["cache_dir"] = str(Path(config.data["cache_dir"]).expanduser().resolve())
    write_text(run_dir / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
    logger.info("Experiment %s in %s:\n%s", name, run_dir, yaml.safe_dump(config.to_dict(), sort_keys=False))

    # Checked before the data are prepared, which can take minutes, so a warning comes early.
    gpu_memory = find_gpu_memory(config)
    _log_gpu_memory_check(check_gpu_memory(config, gpu_memory))

    if config.training["weights"] == "imagenet":
        check_imagenet_weights(list(config.space["backbone"].candidates()),
                               [int(s) for s in config.space["image_size"].candidates()])
    prepared = _prepare_run_folder(config, run_dir, progress=progress)
    setup = _trial_setup(config, prepared)

    resources = _start_ray(address)
    plan = plan_concurrency(config, _ray_nodes(), cache_bytes=cache_size(prepared.cache_paths), gpu_memory=gpu_memory)
    _log_resources(config, resources, plan)
    tuner = _new_tuner(config, setup, name=name, storage_path=storage_path, concurrency=plan.trials,
                       progress=progress)
    tuner.fit()
    return SearchOutcome(run_dir=run_dir, trials=_export_run_folder(run_dir), metric=setup.metric,
                         summary=prepared.summary)


def resume_search(run_dir: str | os.PathLike, *, address: str | None = None, progress: bool = True) -> SearchOutcome:
    """Continue a stopped or crashed search from its run folder.

    Finished trials are kept, unfinished and errored ones continue from their last checkpoint, and the
    searcher (OptunaSearch) and scheduler (ASHA) get their saved state back, so the total trial count holds.
    """
    from ray import tune

    run_dir = resolve_storage_path(run_dir)
    check_storage_reachable(run_dir)
    if not path_exists(run_dir / CONFIG_FILE):
        raise FileNotFoundError(f"Cannot resume {run_dir}: {CONFIG_FILE} not found. Pass the run folder "
                                "(STORAGE_PATH/NAME) that the first search printed.")
    storage, filesystem = _ray_storage(run_dir)
    if not tune.Tuner.can_restore(storage, storage_filesystem=filesystem):
        raise ValueError(f"Cannot resume {run_dir}: Ray Tune saved no experiment state there (the search stopped "
                         "before its first trial started). Start it again with 'lesiontune search'.")
    config = _load_saved_config(run_dir)
    summary = json.loads(read_text(run_dir / SUMMARY_FILE))
    cache_paths = {int(k): v for k, v in summary["cache_paths"].items()}
    if run_dir.is_local:
        prepared = PreparedData(manifest_path=Path(run_dir.path) / MANIFEST_FILE, cache_paths=cache_paths,
                                summary=summary)
    else:
        prepared = PreparedData(manifest_path=str(run_dir / MANIFEST_FILE), cache_paths=cache_paths, summary=summary,
                                manifest_parquet=read_bytes(run_dir / MANIFEST_FILE))
    setup = _trial_setup(config, prepared)

    _start_ray(address)
    logger.info("Resuming %s", run_dir)
    tuner = tune.Tuner.restore(storage, trainable=_trainable(config, setup), resume_unfinished=True,
                               resume_errored=True, storage_filesystem=filesystem)
    tuner.fit()
    return SearchOutcome(run_dir=run_dir, trials=_export_run_folder(run_dir), metric=setup.metric, summary=summary)


def _contains_search(run_dir: StoragePath) -> bool:
    """Return whether Tune saved an experiment state in ``run_dir``."""
    return any(fnmatch.fnmatch(name, "experiment_state-*.json") for name in list_names(run_dir))


def _prepare_run_folder(config: ExperimentConfig, run_dir: StoragePath, *, progress: bool) -> PreparedData:
    """Run :func:`prepare_data` into ``run_dir``; for a remote run folder, into a staging folder then uploaded.

    Trials of a remote run may run on nodes that cannot read the driver's disk, so they get the manifest's
    bytes in their :class:`TrialSetup`, which ``tune.with_parameters`` ships through Ray's object store.
    """
    if run_dir.is_local:
        return prepare_data(config, Path(run_dir.path), progress=progress)

    with tempfile.TemporaryDirectory(prefix="lesiontune-staging-") as staging:
        prepared = prepare_data(config, Path(staging), progress=progress)
        upload_files(Path(staging), run_dir, DATA_FILES)
        manifest_parquet = (Path(staging) / MANIFEST_FILE).read_bytes()
    logger.info("Uploaded %s to %s", ", ".join(DATA_FILES), run_dir)
    return dataclasses.replace(prepared, manifest_path=str(run_dir / MANIFEST_FILE), manifest_parquet=manifest_parquet)


def _export_run_folder(run_dir: StoragePath) -> pd.DataFrame:
    """Write ``trials.parquet`` and ``epochs.parquet`` into ``run_dir``; return the trials table.

    ``export_run`` reads Tune's trial folders from a local disk, so a remote run folder is exported from a
    local copy of its files without the checkpoints, and the two tables are uploaded.
    """
    from results.export import EPOCHS_FILE, TRIALS_FILE, export_run

    if run_dir.is_local:
        return export_run(Path(run_dir.path))
    with tempfile.TemporaryDirectory(prefix="lesiontune-export-") as local:
        download_run_files(run_dir, Path(local))
        trials = export_run(local)
        upload_files(Path(local), run_dir, (TRIALS_FILE, EPOCHS_FILE))
    return trials


def _load_saved_config(run_dir: StoragePath) -> ExperimentConfig:
    """Read ``lesiontune_config.yaml`` of ``run_dir`` through :func:`spaces.config.load_config`."""
    from spaces.config import load_config

    if run_dir.is_local:
        return load_config(Path(run_dir.path) / CONFIG_FILE)
    with tempfile.TemporaryDirectory(prefix="lesiontune-config-") as local:
        copy = Path(local) / CONFIG_FILE
        copy.write_bytes(read_bytes(run_dir / CONFIG_FILE))
        return load_config(copy)
