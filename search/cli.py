"""The ``lesiontune`` command line: ``search``, ``submit``, ``results``, ``predict``, ``data`` and ``weights``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "search_main"]

logger = logging.getLogger("lesiontune")



def _user_errors() -> tuple[type[BaseException], ...]:
    """Return the errors a user can fix; they are printed as one line, without a traceback."""
    from data.fetch import FetchError
    from search.storage import StorageError
    from trainables.backbones import WeightsUnavailableError

    return (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, FetchError, WeightsUnavailableError,
            StorageError)


def _add_search_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="PATH",
                      help="dataset folder or metadata CSV (isic-cli download, HAM10000, ISIC 2019/2020, class "
                           "folders); default: a CC-0 ISIC sample downloaded into the user cache on first use")
    data.add_argument("--layout", help="metadata layout; default: detected from the files")
    data.add_argument("--positive-class", choices=("melanoma", "malignant"),
                      help="positive class: melanoma (default) or any malignant lesion")
    data.add_argument("--cache-dir", metavar="DIR",
                      help="image cache folder (default: $LESIONTUNE_CACHE/images or ~/.cache/lesiontune/images); "
                           "on a multi-node cluster it must be on storage every node can read")

    experiment = parser.add_argument_group("experiment")
    experiment.add_argument("--config", metavar="FILE.yaml", help="YAML experiment file; options below override it")
    experiment.add_argument("--name", help="run name, the folder under --storage-path (default: timestamped)")
    experiment.add_argument("--storage-path", metavar="DIR_OR_URI",
                            help="where run folders go: a folder, or a URI that pyarrow.fs reads, e.g. "
                                 "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, file:///ABSOLUTE/PATH, "
                                 "s3://BUCKET/PREFIX?endpoint_override=HOST:PORT&scheme=http "
                                 "(default: ./lesiontune_runs)")
    experiment.add_argument("--num-samples", type=int, metavar="N", help="number of trials")
    experiment.add_argument("--max-epochs", type=int, metavar="N", help="epochs of a trial that ASHA never stops")
    experiment.add_argument("--grace-period", type=int, metavar="N", help="epochs before ASHA may stop a trial")
    experiment.add_argument("--reduction-factor", type=float, metavar="F",
                            help="ASHA keeps the top 1/F of each rung; rungs are at grace period x F^k epochs")
    experiment.add_argument("--rung-quorum", type=int, metavar="N",
                            help="results an ASHA rung needs before a trial passes it; earlier trials pause there "
                                 "(default: the reduction factor, rounded up; 1 decides each trial on arrival)")
    experiment.add_argument("--image-size", type=int, nargs="+", metavar="PX", help="image size(s) in pixels")
    experiment.add_argument("--weights", metavar="{imagenet,none,DIR}",
                            help="initial backbone weights: imagenet, none (from scratch) or a folder of weight files")
    experiment.add_argument("--backbones", nargs="+", metavar="NAME", help="backbones to search, e.g. MobileNetV2")
    experiment.add_argument("--objective", choices=("pauc80", "f2", "sens_at_spec", "auc"),
                            help="validation metric to maximise (default pauc80)")
    experiment.add_argument("--seed", type=int, help="seed of the split, the TPE sampler and the trials")
    experiment.add_argument("--algorithm", choices=("tpe", "random"),
                            help="how configurations are drawn: tpe (default) or random, a baseline")
    experiment.add_argument("--scheduler", choices=("asha", "fifo"),
                            help="asha (default) stops weak trials early; fifo runs every trial for --max-epochs")

    cluster = parser.add_argument_group("resources")
    cluster.add_argument("--address", help="address of a running Ray cluster (default: $RAY_ADDRESS, which Ray sets "
                         "inside a Ray job; without it, start a local Ray)")
    cluster.add_argument("--cpus-per-trial", type=float, metavar="N")
    cluster.add_argument("--gpus-per-trial", type=float, metavar="N", help="fractions pack several trials on a GPU")
    cluster.add_argument("--gpu-memory-gib", type=float, metavar="GIB",
                         help="memory of one GPU on the nodes that run trials, in GiB, for the check of each trial's "
                              "GPU memory (default: read with nvidia-smi on this machine, else not checked)")
    cluster.add_argument("--max-concurrent-trials", type=int, metavar="N")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue a stopped or crashed search from its run folder, a folder or a URI as the "
                             "first search printed it (other options are ignored)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved experiment, the resources per trial and the concurrency, then stop")
    parser.add_argument("--quiet", action="store_true", help="log warnings only")


def _overrides(args: argparse.Namespace) -> dict:
    """Collect the command-line options that were given, in the YAML format."""
    mapping = {
        ("data", "path"): args.data, ("data", "layout"): args.layout,
        ("data", "positive_class"): args.positive_class, ("data", "cache_dir"): args.cache_dir,
        ("search", "name"): args.name, ("search", "storage_path"): args.storage_path,
        ("search", "num_samples"): args.num_samples, ("search", "max_epochs"): args.max_epochs,
        ("search", "grace_period"): args.grace_period, ("search", "objective"): args.objective,
        ("search", "reduction_factor"): args.reduction_factor, ("search", "rung_quorum"): args.rung_quorum,
        ("search", "seed"): args.seed, ("search", "max_concurrent_trials"): args.max_concurrent_trials,
        ("search", "algorithm"): args.algorithm, ("search", "scheduler"): args.scheduler,
        ("training", "weights"): args.weights,
        ("resources", "cpus_per_trial"): args.cpus_per_trial, ("resources", "gpus_per_trial"): args.gpus_per_trial,
        ("resources", "gpu_memory_gib"): args.gpu_memory_gib,
        ("space", "backbone"): args.backbones, ("space", "image_size"): args.image_size,
    }
    overrides: dict = {}
    for (section, key), value in mapping.items():
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    return overrides


def _run_search_command(args: argparse.Namespace) -> int:
    from spaces.config import load_config

    if args.resume:
        from search.driver import resume_search

        outcome = resume_search(args.resume, address=args.address, progress=not args.quiet)
        _print_leaderboard(outcome.trials, outcome.metric)
        return _search_status(outcome.trials)

    config = load_config(args.config, overrides=_overrides(args))
    if args.dry_run:
        return _print_dry_run(config)
    if not config.data["path"]:
        from data.fetch import ensure_default_sample

        logger.info("No --data given: using the CC-0 ISIC sample in the user cache")
        config.data["path"] = str(ensure_default_sample())

    from search.driver import run_search

    outcome = run_search(config, address=args.address, progress=not args.quiet)
    _print_data_summary(outcome.summary)
    _print_leaderboard(outcome.trials, outcome.metric)
    print(f"\nResults: {outcome.run_dir / 'trials.parquet'} and {outcome.run_dir / 'epochs.parquet'}")
    return _search_status(outcome.trials)


def _search_status(trials) -> int:
    """Return 1, with the first error, when no trial finished, so a Ray job of a failed search fails too."""
    if len(trials) and not (trials["status"] == "TERMINATED").any():
        errors = trials["error"].dropna()
        first = errors.iloc[0] if len(errors) else "no error recorded"
        print(f"lesiontune: error: all {len(trials)} trials failed; the first error: {first}", file=sys.stderr)
        return 1
    return 0


def _print_data_summary(summary: dict) -> None:
    reasons = ", ".join(f"{count} {reason}" for reason, count in summary["excluded_by_reason"].items()) or "none"
    splits = ", ".join(f"{name} {values['images']} ({values['positive']} positive)"
                       for name, values in summary["splits"].items())
    print(f"Data: {summary['images']} images, {summary['positive']} positive ({summary['positive_class']}), "
          f"{summary['groups']} groups; excluded {summary['excluded']} ({reasons}); split: {splits}")


def _print_dry_run(config) -> int:
    """Print the resolved experiment, the resources and the concurrency; return 2 if the data cannot be read."""
    import yaml

    from search.resources import find_gpu_memory, local_node, plan_concurrency
    from spaces.tune_space import CONDITIONAL_PARAMETERS

    node = local_node()
    images, data_error = None, None
    if config.data["path"]:
        from data.metadata import load_dataset

        try:
            dataset = load_dataset(config.data["path"], positive_class=config.data["positive_class"],
                                   layout=config.data["layout"])
            images = len(dataset.records)
        except (ValueError, OSError) as error:
            data_error = error
    sizes = [int(s) for s in config.space["image_size"].candidates()]
    cache_bytes = (images or 0) * sum(size * size * 3 for size in sizes)
    plan = plan_concurrency(config, [node], cache_bytes=cache_bytes, gpu_memory=find_gpu_memory(config))

    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    conditional = [name for name in CONDITIONAL_PARAMETERS if name in config.space]
    if conditional:
        print("# Drawn only where they change the trial: smote_k with smote balancing; fine_tune_lr_multiplier "
              "with pretrained weights, head_epochs > 0 and an unfrozen depth above 0 layers. In this space: "
              f"{', '.join(conditional)}.")
    print(f"# {_describe_scheduler(config)}")
    print(f"# Each trial: CPUs {config.resources['cpus_per_trial']:g}, GPUs {config.resources['gpus_per_trial']:g}, "
          f"about {plan.trial_memory_bytes / 2**30:.1f} GiB of memory (estimated for the largest configuration).")
    cache = f"{cache_bytes / 2**30:.2f} GiB of image cache for {images} images" if images is not None else \
        "image cache not counted (no readable --data)"
    print(f"# On this machine ({node.cpus:g} CPUs, {node.memory_bytes / 2**30:.1f} GiB for Ray, GPUs not counted, {cache}): "
          f"{plan.describe()}.")
    if plan.gpu_memory is not None:
        print(f"# {plan.gpu_memory.describe()}.")
        warning = plan.gpu_memory.warning()
        if warning:
            print(f"lesiontune: warning: {warning}", file=sys.stderr)
    if data_error is not None:
        print(f"lesiontune: error: {data_error}", file=sys.stderr)
        return 2
    return 0


def _describe_scheduler(config) -> str:
    """Return one line on when trials stop: ASHA's rungs and quorum, or every trial running all its epochs."""
    from search.asha import resolve_quorum, rung_milestones

    max_epochs, factor = int(config.search["max_epochs"]), float(config.search["reduction_factor"])
    milestones = rung_milestones(grace_period=int(config.search["grace_period"]), max_t=max_epochs,
                                 reduction_factor=factor)
    if config.search["scheduler"] == "fifo":
        return f"FIFO scheduler: every trial runs all {max_epochs} epochs."
    if not milestones:
        return f"ASHA has no rung below search.max_epochs ({max_epochs}), so every trial runs all its epochs."
    quorum = resolve_quorum(config.search["rung_quorum"], factor)
    epochs = ", ".join(str(m) for m in milestones)
    rungs = f"ASHA rungs at epochs {epochs} of {max_epochs}: the top 1/{factor:g} of each rung"
    if quorum == 1:
        return f"{rungs} goes on, each trial decided when it reports there (search.rung_quorum 1)."
    return f"{rungs} goes on, once {quorum} trials have reported there (search.rung_quorum)."


def _print_leaderboard(trials, metric: str, top: int = 10) -> None:
    import pandas as pd

    from results.export import leaderboard

    table = leaderboard(trials, top=top)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        print(f"Top {len(table)} of {len(trials)} trials by {metric}:")
        print(table.to_string(index=False))


def _data_inspect(args: argparse.Namespace) -> int:
    from data.inspect import format_report, inspect_dataset
    from data.metadata import load_dataset

    dataset = load_dataset(args.path, positive_class=args.positive_class, layout=args.layout)
    report = inspect_dataset(dataset, image_stats=not args.no_image_stats, sample=args.sample,
                             duplicates=args.duplicates)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _data_fetch(args: argparse.Namespace) -> int:
    from data.fetch import fetch_isic_images

    report = fetch_isic_images(args.directory, query=args.query, collections=args.collections or (),
                               limit=args.limit, progress=not args.quiet)
    print(f"{report.downloaded} downloaded, {report.skipped_existing} already present, {len(report.failed)} failed "
          f"in {report.directory}")
    for image_id, reason in report.failed:
        print(f"  failed {image_id}: {reason}")
    return 1 if report.failed else 0


def _weights_download(args: argparse.Namespace) -> int:
    from trainables.weights import download_weights

    paths = download_weights(args.directory, backbones=args.backbones, image_size=args.image_size)
    for path in paths:
        print(path)
    print(f"{len(paths)} weight files in {Path(args.directory).expanduser()}; on a machine without network, "
          "copy that folder and pass it as --weights DIR.")
    return 0


class _SubmittedSearchParser(argparse.ArgumentParser):
    """The ``python -m search`` parser, raising ValueError so that bad search options fail before the upload."""

    def error(self, message: str):
        raise ValueError(f"invalid search arguments after '--': {message}. Run python -m search --help to list them.")


def _check_submitted_search_args(search_args: list[str]) -> None:
    parser = _SubmittedSearchParser(prog="python -m search")
    _add_search_arguments(parser)
    parser.parse_args(search_args)


def _max_upload_bytes(mib: float | None) -> int:
    from search.submit import DEFAULT_MAX_UPLOAD_BYTES, MIB

    if mib is None:
        return DEFAULT_MAX_UPLOAD_BYTES
    if not math.isfinite(mib):
        raise ValueError(f"invalid --max-upload-mib {mib}. Pass a number of MiB, such as 50.")
    return round(mib * MIB)


def _submit_command(args: argparse.Namespace) -> int:
    from search.submit import check_upload_size, find_ray_cli, format_largest_entries, format_size, job_submit_command

    _check_submitted_search_args(args.search_args)
    max_bytes = _max_upload_bytes(args.max_upload_mib)
    upload = check_upload_size(args.working_dir, runtime_env=args.runtime_env, max_bytes=max_bytes)
    print(f"Upload: {format_size(upload.package_bytes)} in {len(upload.files)} files from {upload.working_dir} "
          f"(limit {format_size(max_bytes)})")
    if args.check_only:
        print("\n".join(format_largest_entries(upload)))
        return 0

    command = job_submit_command(find_ray_cli(), working_dir=args.working_dir, runtime_env=args.runtime_env,
                                 search_args=args.search_args, address=args.address,
                                 submission_id=args.submission_id, no_wait=args.no_wait)
    print(f"Running: {shlex.join(command)}", flush=True)
    return subprocess.run(command, check=False).returncode


def _add_submit_command(commands) -> None:
    from search.submit import DEFAULT_MAX_UPLOAD_BYTES, MIB, RAY_JOB_UPLOAD_LIMIT_BYTES

    submit = commands.add_parser(
        "submit", help="check the upload size of the working directory, then submit a search as a Ray job",
        description="Measure what ray job submit would upload from the working directory, stop with the largest "
                    "entries when it is too large, else run ray job submit with python -m search SEARCH_ARGS "
                    "as the entrypoint. Put the options of python -m search after --.",
        usage="lesiontune submit [options] -- [SEARCH_ARGS ...]")
    submit.add_argument("--address", metavar="URL",
                        help="the cluster's job server, e.g. http://127.0.0.1:8265, passed to ray job submit "
                             "(RAY_API_SERVER_ADDRESS or RAY_ADDRESS override it)")
    submit.add_argument("--runtime-env", default="runtime_env.yaml", metavar="FILE.yaml",
                        help="runtime environment YAML whose 'excludes' apply (default: runtime_env.yaml)")
    submit.add_argument("--working-dir", default=".", metavar="DIR",
                        help="folder that Ray zips and uploads (default: the current directory)")
    submit.add_argument("--max-upload-mib", type=float, metavar="MIB",
                        help=f"largest upload accepted, in MiB, at most {RAY_JOB_UPLOAD_LIMIT_BYTES // MIB}, the "
                             f"limit of Ray 2.60's job server (default: {DEFAULT_MAX_UPLOAD_BYTES // MIB})")
    submit.add_argument("--submission-id", metavar="ID", help="job id, which must be new on the cluster")
    submit.add_argument("--no-wait", action="store_true", help="return after submitting instead of following the log")
    submit.add_argument("--check-only", action="store_true",
                        help="print the upload size and its largest entries, then stop without submitting")
    submit.add_argument("--quiet", action="store_true", help="log warnings only")
    submit.add_argument("search_args", nargs="*", metavar="SEARCH_ARGS",
                        help="options of python -m search (the same as lesiontune search), after --")
    submit.set_defaults(handler=_submit_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lesiontune", description="Hyperparameter search for melanoma classifiers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    search = commands.add_parser("search", help="run a search (Optuna TPE + ASHA on Ray Tune)")
    _add_search_arguments(search)
    search.set_defaults(handler=_run_search_command)
    _add_submit_command(commands)

    from results.cli import add_predict_command, add_results_commands

    results = commands.add_parser("results", help="export, rank, analyse, report and evaluate the trials of a run")
    add_results_commands(results.add_subparsers(dest="action", required=True, metavar="ACTION"))
    add_predict_command(commands)

    data = commands.add_parser("data", help="inspect or download datasets")
    data_commands = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    inspect = data_commands.add_parser("inspect", help="print counts per class, exclusion reason and group")
    inspect.add_argument("path", metavar="PATH")
    inspect.add_argument("--positive-class", default="melanoma", choices=("melanoma", "malignant"))
    inspect.add_argument("--layout", default="auto")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--sample", type=int, metavar="N",
                         help="read the image sizes of N images drawn at random (default: all images)")
    inspect.add_argument("--no-image-stats", action="store_true", help="skip reading image sizes from file headers")
    inspect.add_argument("--duplicates", action="store_true",
                         help="count exact and near-duplicate pairs; decodes every image, so it is slow on "
                              "full-size originals")
    inspect.add_argument("--quiet", action="store_true")
    inspect.set_defaults(handler=_data_inspect)
    fetch = data_commands.add_parser("fetch", help="download images and metadata from the ISIC Archive")
    fetch.add_argument("directory", metavar="DIR")
    fetch.add_argument("--query", help="ISIC Archive search query, e.g. 'diagnosis_3:\"Melanoma Invasive\"'")
    fetch.add_argument("--collections", type=int, nargs="+", metavar="ID", help="ISIC collection ids")
    fetch.add_argument("--limit", type=int, metavar="N", help="maximum number of images")
    fetch.add_argument("--quiet", action="store_true")
    fetch.set_defaults(handler=_data_fetch)

    from trainables.backbones import BACKBONES

    weights = commands.add_parser("weights", help="download backbone weights for machines without network")
    weights_commands = weights.add_subparsers(dest="action", required=True, metavar="ACTION")
    download = weights_commands.add_parser(
        "download", help="download the no-top ImageNet weight files under their Keras names, for --weights DIR")
    download.add_argument("directory", metavar="DIR")
    download.add_argument("--backbones", nargs="+", metavar="NAME", choices=list(BACKBONES),
                          help=f"backbones to download (default: all): {', '.join(BACKBONES)}")
    download.add_argument("--image-size", type=int, default=224, metavar="PX",
                          help="image size in pixels that picks the MobileNetV2 file (default 224)")
    download.add_argument("--quiet", action="store_true")
    download.set_defaults(handler=_weights_download)
    return parser


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _dispatch(args: argparse.Namespace) -> int:
    _configure_logging(getattr(args, "quiet", False))
    try:
        return args.handler(args)
    except _user_errors() as error:
        print(f"lesiontune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lesiontune: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lesiontune`` command and return its exit status."""
    args = build_parser().parse_args(argv)
    return _dispatch(args)


def search_main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m search``: the ``lesiontune search`` options, without the subcommand."""
    parser = argparse.ArgumentParser(prog="python -m search", description="Run a lesiontune search (for Ray jobs).")
    _add_search_arguments(parser)
    parser.set_defaults(handler=_run_search_command)
    return _dispatch(parser.parse_args(argv))
