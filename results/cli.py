"""Command-line actions of ``lesiontune results`` and the top-level ``lesiontune predict``.

:func:`add_results_commands` and :func:`add_predict_command` add parsers to ``argparse`` subparsers.
Each parser sets ``handler``, a function of the parsed arguments that prints its results and returns
the exit status, and has ``--quiet``. Bad input raises ``ValueError`` or ``FileNotFoundError`` with a
message for the user, which the ``lesiontune`` dispatcher prints as one line.

A run argument may also be a URI of a run in object storage, as ``lesiontune search --storage-path`` takes
it; :mod:`results.remote` fetches the files each command reads and uploads those it writes into the run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from data.storage import is_uri, resolve_storage_path, write_bytes
from results.remote import RunCopy, staged_runs

__all__ = ["add_predict_command", "add_results_commands"]


def _print_table(table: pd.DataFrame, *, index: bool = False) -> None:
    with pd.option_context("display.width", 220, "display.max_columns", 40, "display.max_colwidth", 60,
                           "display.float_format", "{:.4g}".format):
        print(table.to_string(index=index))


def _objective_of(run_dir: Path) -> str:
    from results.export import load_run_config

    return load_run_config(run_dir)["search"]["objective"]


def _one_run(copies: list[RunCopy], argument: str) -> RunCopy:
    if len(copies) != 1:
        raise ValueError(f"RUN {argument!r} matches {len(copies)} run folders, but this command takes one. "
                         "Give a single run folder.")
    return copies[0]


def _remote_labels(labels: Sequence[str], copies: Sequence[RunCopy]) -> list[str]:
    """Replace a label that is the folder of a local copy (a run label when two runs share a name) by its URI."""
    by_folder = {str(copy.local): str(copy.remote) for copy in copies if copy.remote is not None}
    return [by_folder.get(label, label) for label in labels]


def _export(args: argparse.Namespace) -> int:
    from results.export import EPOCHS_FILE, TRIALS_FILE, export_run, leaderboard

    with staged_runs([args.run_dir]) as copies:
        run = _one_run(copies, args.run_dir)
        trials = export_run(run.argument)
        run.upload(TRIALS_FILE, EPOCHS_FILE)
        print(f"Wrote {run.display(Path(run.argument) / TRIALS_FILE)} ({len(trials)} trials) and {EPOCHS_FILE}")
        print(f"Top trials by val_{_objective_of(run.local)}:")
        _print_table(leaderboard(trials, top=args.top))
    return 0


def _leaderboard(args: argparse.Namespace) -> int:
    with staged_runs(args.runs) as copies:
        return _print_leaderboard(args, copies)


def _print_leaderboard(args: argparse.Namespace, copies: list[RunCopy]) -> int:
    from results.analysis import RUN_COLUMN, expand_run_dirs, load_runs
    from results.export import leaderboard

    run_dirs = expand_run_dirs([copy.argument for copy in copies])
    trials = load_runs(run_dirs)
    trials[RUN_COLUMN] = _remote_labels(list(trials[RUN_COLUMN]), copies)
    # leaderboard() keeps only its own columns, so the run travels inside the trial id and is split off after.
    keyed = trials.assign(trial_id=trials[RUN_COLUMN] + "\t" + trials["trial_id"])
    table = leaderboard(keyed, top=args.top)
    runs_and_ids = table["trial_id"].str.split("\t", n=1, expand=True)
    table["trial_id"] = runs_and_ids[1]
    if len(run_dirs) > 1:
        table.insert(0, RUN_COLUMN, runs_and_ids[0])
    print(f"Top {len(table)} of {len(trials)} trials in {len(run_dirs)} run(s) by val_{_objective_of(run_dirs[0])}:")
    _print_table(table)
    return 0


def _effects(args: argparse.Namespace) -> int:
    from results.analysis import expand_run_dirs, factor_effects, finished_trials, load_runs

    with staged_runs(args.runs) as copies:
        run_dirs = expand_run_dirs([copy.argument for copy in copies])
        trials = load_runs(run_dirs)
        effects = factor_effects(trials)
        print(f"Best val_{_objective_of(run_dirs[0])} of {len(finished_trials(trials))} finished trials "
              f"in {len(run_dirs)} run(s), by factor level:")
        _print_table(effects)
    return 0


def _importance(args: argparse.Namespace) -> int:
    from results.analysis import finished_trials, parameter_importance, read_trials
    from results.export import load_run_config

    with staged_runs([args.run_dir]) as copies:
        run = _one_run(copies, args.run_dir)
        config = load_run_config(run.local)
        trials = read_trials(run.argument)
        importance = parameter_importance(trials, config["space"], method=args.method, seed=args.seed)
        print(f"Importance of each searched parameter for the best val_{config['search']['objective']} "
              f"({args.method}, {len(finished_trials(trials))} finished trials):")
        _print_table(importance)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from results.analysis import compare_runs, expand_run_dirs

    with staged_runs(args.runs) as copies:
        run_dirs = expand_run_dirs([copy.argument for copy in copies])
        if len(run_dirs) != 2:
            raise ValueError(f"compare needs two different run folders, got {len(run_dirs)}: "
                             f"{', '.join(_remote_labels([str(path) for path in run_dirs], copies))}.")
        table = compare_runs(run_dirs)
        table.columns = _remote_labels([str(label) for label in table.columns], copies)
        _print_table(table, index=True)
    return 0


def _report(args: argparse.Namespace) -> int:
    from results.report import REPORT_FILE, write_report

    with staged_runs([args.run_dir], checkpoint_metadata=True) as copies:
        run = _one_run(copies, args.run_dir)
        if args.output is None:
            path = write_report(run.argument, top=args.top)
            run.upload(REPORT_FILE)
            print(f"Wrote {run.display(path)}")
        elif is_uri(args.output):
            target = resolve_storage_path(args.output)
            with tempfile.TemporaryDirectory(prefix="lesiontune-report-") as folder:
                path = write_report(run.argument, output=Path(folder) / REPORT_FILE, top=args.top)
                write_bytes(target, path.read_bytes())
            print(f"Wrote {target}")
        else:
            print(f"Wrote {write_report(run.argument, output=args.output, top=args.top)}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from results.evaluate import PREDICTIONS_FILE, TEST_EVALUATION_FILE, evaluate_run

    with staged_runs([args.run_dir], checkpoint_metadata=True) as copies:
        run = _one_run(copies, args.run_dir)
        evaluation = evaluate_run(run.argument, top=args.top, force=args.force, resamples=args.resamples,
                                  seed=args.seed, batch_size=args.batch_size, fetch_model=run.fetch_model)
        run.upload(TEST_EVALUATION_FILE, PREDICTIONS_FILE)
        _print_evaluation(evaluation, run)
    return 0


def _print_evaluation(evaluation, run: RunCopy) -> None:
    from results.evaluate import subgroup_table

    metrics = evaluation.metrics
    overall = metrics[metrics["scope"] == "overall"]
    confidence = overall["confidence"].iloc[0]
    print(f"Test split, at each checkpoint's validation threshold, with {confidence:.0%} group-bootstrap intervals:")
    _print_table(overall[["rank", "trial_id", "epoch", "threshold", "metric", "estimate", "ci_lower", "ci_upper"]])
    subgroups = subgroup_table(metrics)
    if len(subgroups):
        print("\nSubgroups (few_cases: fewer than 10 positives or 30 negatives):")
        _print_table(subgroups)
    print(f"\nWrote {run.display(evaluation.metrics_path)} and {run.display(evaluation.predictions_path)}")


def _export_model(args: argparse.Namespace) -> int:
    from results.analysis import best_checkpoint
    from results.model_export import export_model

    with staged_runs([args.run_dir], checkpoint_metadata=True) as copies:
        run = _one_run(copies, args.run_dir)
        run.fetch_model(best_checkpoint(run.argument, args.trial))
        path = export_model(run.argument, args.trial, args.directory)
    print(f"Wrote {path} (model.keras, preprocessing.json, threshold.json, MODEL_CARD.md)")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from results.predict import predict_images, write_predictions

    predictions = predict_images(args.model_dir, args.images, batch_size=args.batch_size)
    failed = int(predictions["error"].notna().sum())
    if args.output:
        path = write_predictions(predictions, args.output)
        positives = int(predictions["decision"].sum())
        print(f"Scored {len(predictions) - failed} of {len(predictions)} images ({positives} positive, "
              f"{failed} unreadable) and wrote {path}")
    else:
        predictions.to_csv(sys.stdout, index=False)
    return 1 if failed else 0


def _add_parser(subparsers, name: str, help_text: str, handler) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    parser.set_defaults(handler=handler)
    return parser


def _add_run_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="run folder (STORAGE_PATH/NAME), local or a URI such as "
                                                       "s3://BUCKET/PREFIX/NAME")


def add_results_commands(subparsers) -> None:
    """Add the actions of ``lesiontune results`` to ``subparsers``, the result of ``add_subparsers``.

    Actions: export, leaderboard, effects, importance, compare, report, evaluate and export-model.
    """
    runs_help = ("run folders or URIs, or quoted glob patterns such as 'lesiontune_runs/*' or "
                 "'s3://BUCKET/runs/*' (a URI's pattern in its last folder name only)")

    parser = _add_parser(subparsers, "export", "write trials.parquet and epochs.parquet and print the top trials",
                         _export)
    _add_run_argument(parser)
    parser.add_argument("--top", type=int, default=10, metavar="N", help="trials to list (default 10)")

    parser = _add_parser(subparsers, "leaderboard", "rank the trials of one or more runs by their best objective",
                         _leaderboard)
    parser.add_argument("runs", nargs="+", metavar="RUN", help=runs_help)
    parser.add_argument("--top", type=int, default=10, metavar="N", help="trials to list (default 10)")

    parser = _add_parser(subparsers, "effects", "best objective per level of each searched factor, finished trials "
                                                "only (mean, median, max, count)", _effects)
    parser.add_argument("runs", nargs="+", metavar="RUN", help=runs_help)

    parser = _add_parser(subparsers, "importance", "hyperparameter importance of a run (optuna fANOVA or PED-ANOVA)",
                         _importance)
    _add_run_argument(parser)
    parser.add_argument("--method", choices=("fanova", "ped-anova"), default="fanova",
                        help="importance evaluator (default fanova)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fANOVA random forest (default 0)")

    parser = _add_parser(subparsers, "compare", "put two runs side by side: data, budget, outcome, best trial, space",
                         _compare)
    parser.add_argument("runs", nargs=2, metavar="RUN", help="run folder or URI")

    parser = _add_parser(subparsers, "report", "write a self-contained HTML report of a run", _report)
    _add_run_argument(parser)
    parser.add_argument("--output", metavar="FILE.html", help="report file or URI (default RUN/report.html)")
    parser.add_argument("--top", type=int, default=5, metavar="K",
                        help="best trials whose curves are drawn (default 5)")

    parser = _add_parser(subparsers, "evaluate", "evaluate the best K trials once on the held-out test split, with "
                                                 "group-bootstrap intervals and subgroups", _evaluate)
    _add_run_argument(parser)
    parser.add_argument("--top", type=int, required=True, metavar="K", help="best trials to evaluate")
    parser.add_argument("--force", action="store_true",
                        help="evaluate again although the run was evaluated before (the test split is not for "
                             "model selection)")
    parser.add_argument("--resamples", type=int, default=1000, metavar="N",
                        help="group-bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward pass (default 64)")

    parser = _add_parser(subparsers, "export-model", "write a trial's best checkpoint with its preprocessing, "
                                                     "threshold and model card", _export_model)
    _add_run_argument(parser)
    parser.add_argument("--trial", required=True, metavar="ID", help="trial id, or a unique prefix of 4+ characters")
    parser.add_argument("directory", metavar="DIR", help="folder to create (must not exist or be empty)")


def add_predict_command(subparsers) -> None:
    """Add ``predict`` to ``subparsers``: score images with a folder written by ``results export-model``."""
    parser = _add_parser(subparsers, "predict", "score image files or folders with an exported model (exit "
                                                "status 1 when an image could not be read)", _predict)
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by 'lesiontune results export-model'")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders searched recursively")
    parser.add_argument("--output", metavar="FILE", help="write FILE.csv or FILE.parquet (default: CSV on stdout)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward pass (default 32)")
