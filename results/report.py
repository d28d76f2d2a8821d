"""One self-contained HTML report of a run: tables, and figures embedded as base64 PNG.

Each section is an HTML ``<section>`` whose id is in ``SECTION_IDS``, in this order:

- the leaderboard, with failed trials and their errors;
- ROC and precision-recall curves of the top trials, with their operating points;
- learning curves, with the epochs where ASHA stopped trials;
- the objective against each searched factor, with the per-level table;
- a parallel-coordinates plot;
- calibration of the best model (reliability curve and expected calibration error);
- the test evaluation, when ``lesiontune results evaluate`` has written one;
- the data report: summary, split sizes and exclusions by reason.

The figures are drawn on matplotlib's Agg canvas without pyplot, so no display or global figure state
is used.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from results.analysis import (EXCLUSIONS_FILE, SUMMARY_FILE, Checkpoint, best_checkpoint, factor_effects,
                              finished_trials, read_run_manifest, read_trials, validation_predictions)
from results.evaluate import PREDICTIONS_FILE, TEST_EVALUATION_FILE, subgroup_table
from results.export import EPOCHS_FILE, leaderboard, load_run_config
from trainables.metrics import evaluate_scores

__all__ = ["REPORT_FILE", "SECTION_IDS", "expected_calibration_error", "write_report"]

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
SECTION_IDS = ("leaderboard", "roc-pr", "learning-curves", "factors", "parallel-coordinates", "calibration",
               "test-evaluation", "data")
CALIBRATION_BINS = 10

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.8em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } div.table { overflow-x: auto; }
.note { color: #555; font-style: italic; } nav a { margin-right: 1em; }
"""


@dataclass(frozen=True)
class _TopTrial:
    """A top trial with its best checkpoint and validation scores (manifest validation rows + ``score``)."""

    rank: int
    trial_id: str
    checkpoint: Checkpoint
    validation: pd.DataFrame


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, *, bins: int = CALIBRATION_BINS) -> float:
    """Return the expected calibration error over equal-width score bins.

    ECE = sum over bins of (images in bin / all images) * |positive fraction - mean score| in the bin.
    The bins split [0, 1] into ``bins`` equal parts, the last one closed, and empty bins add nothing.

    Args:
        labels: ``(N,)`` ground truth in {0, 1}.
        scores: ``(N,)`` predicted probabilities in [0, 1].
        bins: number of bins (>= 1).
    """
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if len(labels) == 0:
        return math.nan
    index = np.minimum((scores * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins)
    positive_fraction = np.bincount(index, weights=labels, minlength=bins)
    mean_score = np.bincount(index, weights=scores, minlength=bins)
    filled = counts > 0
    gaps = np.abs(positive_fraction[filled] - mean_score[filled]) / counts[filled]
    return float(np.sum(counts[filled] / len(labels) * gaps))


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _image_tag(figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _table(frame: pd.DataFrame) -> str:
    # A pivot leaves its column-axis name ("metric"), which to_html would print as an extra header row.
    frame = frame.rename_axis(columns=None)
    table = frame.to_html(index=False, border=0, na_rep="", float_format=lambda value: f"{value:.4g}")
    return f'<div class="table">{table}</div>'



def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _section(section_id: str, title: str, *parts: str) -> str:
    return f'<section id="{section_id}">\n<h2>{html.escape(title)}</h2>\n' + "\n".join(parts) + "\n</section>"


def _operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """Return (false-positive rate, sensitivity, precision) at ``threshold``."""
    metrics = evaluate_scores(labels, scores, threshold=threshold)
    predicted = scores >= threshold
    precision = float(labels[predicted].mean()) if predicted.any() else math.nan
    return 1.0 - metrics.specificity, metrics.sensitivity, precision


def _roc_pr_section(top_trials: list[_TopTrial]) -> str:
    from sklearn.metrics import precision_recall_curve, roc_curve

    title = "ROC and precision-recall curves (validation split)"
    usable = [t for t in top_trials if t.validation["label"].nunique() == 2]
    if not usable:
        return _section("roc-pr", title, _note("No top trial has a checkpoint with both classes in validation."))

    figure = _figure(12, 5)
    roc_axes, pr_axes = figure.subplots(1, 2)
    for index, trial in enumerate(usable):
        labels, scores = trial.validation["label"].to_numpy(), trial.validation["score"].to_numpy()
        color = f"C{index}"
        false_positive_rate, true_positive_rate, _ = roc_curve(labels, scores)
        precision, recall, _ = precision_recall_curve(labels, scores)
        label = f"#{trial.rank} {trial.trial_id} (epoch {trial.checkpoint.epoch})"
        roc_axes.plot(false_positive_rate, true_positive_rate, color=color, label=label)
        pr_axes.plot(recall, precision, color=color, label=label)
        point_fpr, point_sensitivity, point_precision = _operating_point(labels, scores, trial.checkpoint.threshold)
        roc_axes.plot([point_fpr], [point_sensitivity], "o", color=color, markersize=8, markeredgecolor="black")
        pr_axes.plot([point_sensitivity], [point_precision], "o", color=color, markersize=8, markeredgecolor="black")

    prevalence = usable[0].validation["label"].mean()
    roc_axes.plot([0, 1], [0, 1], ":", color="gray", label="chance")
    roc_axes.axhline(0.8, color="gray", linewidth=0.8, linestyle="--", label="TPR 0.8 (pAUC80 region above)")
    pr_axes.axhline(prevalence, color="gray", linestyle=":", label=f"prevalence {prevalence:.2f}")
    roc_axes.set(xlabel="false-positive rate (1 - specificity)", ylabel="sensitivity", title="ROC", xlim=(0, 1),
                 ylim=(0, 1.02))
    pr_axes.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall", xlim=(0, 1),
                ylim=(0, 1.02))
    roc_axes.legend(fontsize=8, loc="lower right")
    pr_axes.legend(fontsize=8, loc="upper right")
    text = ("Curves of each top trial's best checkpoint on the validation split. The dot is the operating point "
            "at the F2-optimal threshold that the trial chose on the same split.")
    return _section("roc-pr", title, f"<p>{html.escape(text)}</p>", _image_tag(figure, "ROC and PR curves"))


def _asha_rungs(config: dict) -> list[int]:
    """Return the epochs at which ASHA compares trials: grace_period * reduction_factor**k < max_epochs."""
    search = config["search"]
    epoch, rungs = float(search["grace_period"]), []
    while epoch < int(search["max_epochs"]) and float(search["reduction_factor"]) > 1:
        rungs.append(int(round(epoch)))
        epoch *= float(search["reduction_factor"])
    return rungs


def _learning_curves_section(epochs: pd.DataFrame, trials: pd.DataFrame, top_ids: list[str], config: dict) -> str:
    title = "Learning curves"
    objective = config["search"]["objective"]
    if epochs.empty:
        return _section("learning-curves", title, _note("No trial reported an epoch."))

    figure = _figure(12, 5)
    axes = figure.subplots()
    stopped_ids = set(trials.loc[trials["stopped_early"].fillna(False).astype(bool), "trial_id"])
    stopped_marked = False
    for trial_id, curve in epochs.groupby("trial_id", sort=False):
        if trial_id in top_ids:
            continue
        axes.plot(curve["epoch"], curve["objective_value"], color="0.7", linewidth=1)
        if trial_id in stopped_ids:
            last = curve.iloc[-1]
            axes.plot([last["epoch"]], [last["objective_value"]], "x", color="tab:red", markersize=8,
                      label=None if stopped_marked else "stopped by ASHA")
            stopped_marked = True
    for index, trial_id in enumerate(top_ids):
        curve = epochs[epochs["trial_id"] == trial_id]
        axes.plot(curve["epoch"], curve["objective_value"], "-o", color=f"C{index}", linewidth=2, markersize=4,
                  label=f"#{index + 1} {trial_id}")
        if trial_id in stopped_ids:
            last = curve.iloc[-1]
            axes.plot([last["epoch"]], [last["objective_value"]], "x", color="tab:red", markersize=10)
    for rung in _asha_rungs(config):
        axes.axvline(rung, color="gray", linestyle=":", linewidth=1)
    axes.set(xlabel="epoch", ylabel=f"validation {objective}",
             title=f"Validation {objective} per epoch (dotted lines: ASHA rungs)")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.legend(fontsize=8)
    stopped = len(stopped_ids)
    text = (f"Top trials in color, the others in gray. ASHA stopped {stopped} of {len(trials)} trials before "
            f"{config['search']['max_epochs']} epochs, and a red cross marks the last epoch of each.")
    return _section("learning-curves", title, f"<p>{html.escape(text)}</p>", _image_tag(figure, "learning curves"))


def _searched_factors(trials: pd.DataFrame, space: dict) -> list[str]:
    """Return the searched parameters that vary: not fixed in the space and with 2 or more values."""
    factors = []
    for name, setting in space.items():
        if name in trials.columns and isinstance(setting, (list, dict)) and trials[name].nunique() > 1:
            factors.append(name)
    return factors


def _is_categorical(name: str, space: dict) -> bool:
    return isinstance(space.get(name), list)


def _is_log_scale(name: str, space: dict) -> bool:
    setting = space.get(name)
    return isinstance(setting, dict) and bool(setting.get("log"))


def _factors_section(trials: pd.DataFrame, config: dict) -> str:
    title = "Objective against each factor"
    finished = finished_trials(trials)
    space, objective = config["space"], config["search"]["objective"]
    factors = _searched_factors(finished, space)
    effects = _table(factor_effects(trials)) if len(finished) else _note("No trial finished with an objective.")
    if not factors:
        return _section("factors", title, _note("No searched factor took two values among the finished trials."),
                        effects)

    columns = min(3, len(factors))
    rows = math.ceil(len(factors) / columns)
    figure = _figure(4.2 * columns, 3.4 * rows)
    axes_grid = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    stopped = finished["stopped_early"].fillna(False).astype(bool).to_numpy()
    rng = np.random.default_rng(0)
    for axes, name in zip(axes_grid, factors):
        values = finished[name]
        if _is_categorical(name, space):
            levels = [level for level in space[name] if level in set(values)]
            x = values.map({level: i for i, level in enumerate(levels)}).to_numpy(dtype=float)
            x = x + rng.uniform(-0.15, 0.15, size=len(x))
            axes.set_xticks(range(len(levels)), [str(level) for level in levels], rotation=20, fontsize=8)
        else:
            x = values.to_numpy(dtype=float)
            if _is_log_scale(name, space):
                axes.set_xscale("log")
        y = finished["best_objective"].to_numpy()
        axes.scatter(x[~stopped], y[~stopped], color="C0", s=22, label="ran all epochs")
        axes.scatter(x[stopped], y[stopped], color="tab:red", marker="x", s=26, label="stopped by ASHA")
        axes.set(xlabel=name, ylabel=f"best {objective}")
    for axes in axes_grid[len(factors):]:
        axes.set_visible(False)
    axes_grid[0].legend(fontsize=7)
    table_title = "<h3>Objective per factor level (finished trials, numeric factors binned)</h3>"
    return _section("factors", title, _image_tag(figure, "objective against each factor"), table_title, effects)


def _parallel_axis(values: pd.Series, name: str, space: dict) -> tuple[np.ndarray, list[tuple[float, str]]]:
    """Scale one factor to [0, 1] for the parallel-coordinates plot, and return it with its axis labels."""
    if _is_categorical(name, space) or not pd.api.types.is_numeric_dtype(values):
        levels = [level for level in space.get(name, sorted(values.unique())) if level in set(values)]
        positions = {level: (i / (len(levels) - 1) if len(levels) > 1 else 0.5) for i, level in enumerate(levels)}
        return values.map(positions).to_numpy(dtype=float), [(positions[level], str(level)) for level in levels]
    numeric = values.to_numpy(dtype=float)
    scaled = np.log10(numeric) if _is_log_scale(name, space) else numeric
    low, high = np.nanmin(scaled), np.nanmax(scaled)
    span = high - low if high > low else 1.0
    return (scaled - low) / span, [(0.0, f"{np.nanmin(numeric):.3g}"), (1.0, f"{np.nanmax(numeric):.3g}")]


def _parallel_section(trials: pd.DataFrame, config: dict) -> str:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    title = "Parallel coordinates"
    finished = finished_trials(trials).sort_values("best_objective")
    space, objective = config["space"], config["search"]["objective"]
    factors = _searched_factors(finished, space)
    if len(finished) < 2 or not factors:
        return _section("parallel-coordinates", title,
                        _note("Needs at least 2 finished trials and one factor that varies."))

    axes_names = factors + ["best_objective"]
    figure = _figure(max(8, 1.9 * len(axes_names)), 5)
    axes = figure.subplots()
    scaled, tick_labels = [], []
    for name in axes_names:
        values, labels = _parallel_axis(finished[name], name, space)
        scaled.append(values)
        tick_labels.append(labels)
    lines = np.column_stack(scaled)
    objectives = finished["best_objective"].to_numpy()
    norm = Normalize(vmin=objectives.min(), vmax=objectives.max() if objectives.max() > objectives.min() else
                     objectives.min() + 1e-9)
    colormap = colormaps["viridis"]
    for row, value in zip(lines, objectives):
        best = value == objectives.max()
        axes.plot(range(len(axes_names)), row, color=colormap(norm(value)), linewidth=2.5 if best else 1.0,
                  alpha=1.0 if best else 0.7)
    for position, labels in enumerate(tick_labels):
        axes.axvline(position, color="black", linewidth=0.8)
        for height, text in labels:
            axes.annotate(text, (position, height), xytext=(4, 0), textcoords="offset points", fontsize=7,
                          va="center")
    axes.set_xticks(range(len(axes_names)), [n if n != "best_objective" else f"best {objective}" for n in axes_names],
                    rotation=15, fontsize=8)
    axes.set_yticks([])
    axes.set(xlim=(-0.2, len(axes_names) - 0.5), ylim=(-0.05, 1.05))
    figure.colorbar(ScalarMappable(norm=norm, cmap=colormap), ax=axes, label=f"best {objective}")
    text = ("One line per finished trial, colored by its best objective. The thickest line is the best trial. "
            "Each axis is scaled to the range the trials took (log scale for log-searched ranges).")
    return _section("parallel-coordinates", title, f"<p>{html.escape(text)}</p>",
                    _image_tag(figure, "parallel coordinates"))


def _test_predictions(run_dir: Path, trial_id: str) -> pd.DataFrame | None:
    path = run_dir / PREDICTIONS_FILE
    if not path.is_file():
        return None
    predictions = pd.read_parquet(path)
    test = predictions[(predictions["trial_id"] == trial_id) & (predictions["split"] == "test")]
    return test if len(test) else None


def _calibration_section(top_trials: list[_TopTrial], run_dir: Path) -> str:
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    title = "Calibration of the best model"
    if not top_trials:
        return _section("calibration", title, _note("No finished trial has a checkpoint."))
    best = top_trials[0]
    splits = {"validation": best.validation}
    test = _test_predictions(run_dir, best.trial_id)
    if test is not None:
        splits["test"] = test

    figure = _figure(12, 4.5)
    curve_axes, histogram_axes = figure.subplots(1, 2)
    curve_axes.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    rows = []
    for index, (split, frame) in enumerate(splits.items()):
        labels, scores = frame["label"].to_numpy(), frame["score"].to_numpy()
        ece = expected_calibration_error(labels, scores)
        positive_fraction, mean_score = calibration_curve(labels, scores, n_bins=CALIBRATION_BINS, strategy="uniform")
        curve_axes.plot(mean_score, positive_fraction, "-o", color=f"C{index}", label=f"{split} (ECE {ece:.3f})")
        histogram_axes.hist(scores, bins=CALIBRATION_BINS, range=(0, 1), alpha=0.6, color=f"C{index}", label=split)
        rows.append({"split": split, "images": len(frame), "positives": int(labels.sum()),
                     "expected calibration error": ece, "Brier score": brier_score_loss(labels, scores),
                     "mean score": float(scores.mean()), "positive fraction": float(labels.mean())})
    curve_axes.set(xlabel="mean score in bin", ylabel="positive fraction in bin", xlim=(0, 1), ylim=(0, 1),
                   title=f"Reliability curve, trial {best.trial_id} ({CALIBRATION_BINS} equal-width bins)")
    histogram_axes.axvline(best.checkpoint.threshold, color="black", linestyle="--", label="threshold")
    histogram_axes.set(xlabel="score", ylabel="images", title="Score distribution")
    curve_axes.legend(fontsize=8)
    histogram_axes.legend(fontsize=8)
    text = ("Class balancing during training (oversampling, undersampling or class weights) moves the scores "
            "away from the split's prevalence, so a large calibration error is expected for balanced trials.")
    return _section("calibration", title, f"<p>{html.escape(text)}</p>", _image_tag(figure, "calibration"),
                    _table(pd.DataFrame(rows)))


def _test_section(run_dir: Path) -> str:
    title = "Test evaluation"
    path = run_dir / TEST_EVALUATION_FILE
    if not path.is_file():
        return _section("test-evaluation", title,
                        _note(f"Not evaluated on the test split. Run 'lesiontune results evaluate {run_dir} --top K' "
                              "once, after the model is chosen."))
    rows = pd.read_parquet(path)
    overall = rows[rows["scope"] == "overall"].copy()
    overall["interval"] = [f"[{low:.3f}, {high:.3f}]" for low, high in zip(overall["ci_lower"], overall["ci_upper"])]
    wide = overall.pivot_table(index=["rank", "trial_id", "epoch", "threshold"], columns="metric",
                               values="estimate").reset_index()
    intervals = overall.pivot(index="trial_id", columns="metric", values="interval").add_suffix(" interval")
    wide = wide.merge(intervals.reset_index(), on="trial_id")
    subgroups = subgroup_table(rows)
    first = overall.iloc[0]
    text = (f"Evaluated {first['evaluated_utc']} at each checkpoint's validation threshold. Intervals are "
            f"{first['confidence']:.0%} percentile intervals of a bootstrap over groups ({first['resamples']} "
            f"resamples). spec_at_sens is the specificity at sensitivity >= {first['sensitivity_target']:g}. "
            "few_cases marks subgroups with fewer than 10 positives or 30 negatives.")
    return _section("test-evaluation", title, f"<p>{html.escape(text)}</p>", _table(wide),
                    "<h3>Subgroups</h3>", _table(subgroups))


def _data_section(run_dir: Path, manifest: pd.DataFrame) -> str:
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    facts = pd.DataFrame({"item": [k for k, v in summary.items() if not isinstance(v, (dict, list))],
                          "value": [str(v) for v in summary.values() if not isinstance(v, (dict, list))]})
    splits = []
    for split, members in manifest.groupby("split", observed=False):
        splits.append({"split": split, "images": len(members), "positives": int(members["label"].sum()),
                       "negatives": int(len(members) - members["label"].sum()),
                       "groups": members["group"].nunique()})
    exclusions_path = run_dir / EXCLUSIONS_FILE
    if exclusions_path.is_file():
        reasons = pd.read_parquet(exclusions_path)["reason"].value_counts()
        excluded = pd.DataFrame({"reason": reasons.index.astype(str), "images": reasons.to_numpy()})
    else:
        excluded = pd.DataFrame(columns=["reason", "images"])
    exclusions_html = _table(excluded) if len(excluded) else _note("No image was excluded.")
    return _section("data", "Data", _table(facts), "<h3>Split sizes</h3>", _table(pd.DataFrame(splits)),
                    "<h3>Exclusions by reason</h3>", exclusions_html)


def _leaderboard_section(trials: pd.DataFrame, objective: str) -> str:
    parts = [f"<p>Trials ranked by their best validation {html.escape(objective)}.</p>",
             _table(leaderboard(trials, top=max(10, len(trials))))]
    failed = trials[trials["status"] == "ERROR"]
    if len(failed):
        parts += ["<h3>Failed trials</h3>", _table(failed[["trial_id", "epochs_run", "error"]])]
    return _section("leaderboard", "Leaderboard", *parts)


def _top_trials(run_dir: Path, trials: pd.DataFrame, manifest: pd.DataFrame, top: int) -> list[_TopTrial]:
    ranked = finished_trials(trials).sort_values("best_objective", ascending=False)
    chosen = []
    for rank, trial_id in enumerate(ranked["trial_id"], start=1):
        if len(chosen) == top:
            break
        try:
            checkpoint = best_checkpoint(run_dir, trial_id)
        except FileNotFoundError as error:
            logger.warning("Report leaves out trial %s: %s", trial_id, error)
            continue
        chosen.append(_TopTrial(rank=rank, trial_id=trial_id, checkpoint=checkpoint,
                                validation=validation_predictions(manifest, checkpoint)))
    return chosen


def write_report(run_dir: str | os.PathLike, *, output: str | os.PathLike | None = None, top: int = 5) -> Path:
    """Write the HTML report of a run.

    Args:
        run_dir: the run folder.
        output: the HTML file to write, by default ``report.html`` in the run folder.
        top: how many of the best trials get ROC, precision-recall and highlighted learning curves (>= 1).

    Returns:
        The written file.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"Invalid top {top!r}: expected the number of trials to plot, an integer >= 1.")
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    output = Path(output) if output is not None else run_dir / REPORT_FILE
    if output.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"Invalid report file {output}: the name must end in .html.")
    trials = read_trials(run_dir)
    epochs = pd.read_parquet(run_dir / EPOCHS_FILE)
    manifest = read_run_manifest(run_dir)
    top_trials = _top_trials(run_dir, trials, manifest, top)
    objective = config["search"]["objective"]

    sections = [
        _leaderboard_section(trials, objective),
        _roc_pr_section(top_trials),
        _learning_curves_section(epochs, trials, [t.trial_id for t in top_trials], config),
        _factors_section(trials, config),
        _parallel_section(trials, config),
        _calibration_section(top_trials, run_dir),
        _test_section(run_dir),
        _data_section(run_dir, manifest),
    ]
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    navigation = " ".join(f'<a href="#{section_id}">{section_id}</a>' for section_id in SECTION_IDS)
    document = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>lesiontune report: {html.escape(run_dir.name)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>lesiontune run {html.escape(run_dir.name)}</h1>\n"
        f"<p>{html.escape(str(run_dir.resolve()))}: {len(trials)} trials maximising validation "
        f"{html.escape(objective)}, report written {created}.</p>\n<nav>{navigation}</nav>\n"
        + "\n".join(sections) + "\n</body>\n</html>\n")

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(document, encoding="utf-8")
    logger.info("Wrote the report of %s to %s (%d KiB)", run_dir, output, len(document) // 1024)
    return output
