"""Tables from run folders: trials of several runs, factor effects, importance and run comparison.

This module also finds each trial's folder and best checkpoint, which the report, the test evaluation
and the model export share. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from data.splits import read_manifest
from results.export import CONFIG_FILE, TRIAL_SCHEMA, TRIALS_FILE, export_run, load_run_config

__all__ = ["Checkpoint", "best_checkpoint", "compare_runs", "expand_run_dirs", "factor_effects",
           "finished_trials", "load_runs", "parameter_importance", "read_run_manifest", "read_trials",
           "recorded_cache_path", "recorded_resize_rule", "resolve_trial_id", "space_setting_text",
           "trial_dirs_by_id", "validation_predictions"]

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.parquet"
SUMMARY_FILE = "data_summary.json"
EXCLUSIONS_FILE = "exclusions.parquet"
RESULT_FILE = "result.json"
STATE_FILE = "state.json"
MODEL_FILE = "model.keras"
SCORES_FILE = "validation_scores.npy"

SEARCH_RESIZE_RULE = "center_crop"

RUN_COLUMN = "run"
FINISHED_STATUS = "TERMINATED"
IMPORTANCE_METHODS = ("fanova", "ped-anova")

# A trial id may be abbreviated to a unique prefix of at least this many characters.
_MIN_TRIAL_PREFIX = 4


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder of a trial, with what its ``state.json`` records.

    Attributes:
        trial_id: the Tune trial id.
        path: the ``checkpoint_00000N`` folder.
        epoch: epochs trained when it was saved (1-based).
        objective_value: the run's objective on the validation split at that epoch.
        threshold: F2-optimal score threshold on the validation split, in [0, 1].
        state: the whole ``state.json`` (metrics, config, setup).
    """

    trial_id: str
    path: Path
    epoch: int
    objective_value: float
    threshold: float
    state: dict = field(compare=False, repr=False)

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def scores_path(self) -> Path:
        return self.path / SCORES_FILE


def expand_run_dirs(patterns: Sequence[str]) -> list[Path]:
    """Expand run folders and glob patterns (``runs/*``) into run folders, in order, without repeats.

    Raises:
        FileNotFoundError: a pattern matches no run folder, or a folder has no ``lesiontune_config.yaml``.
    """
    found: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern)))
                       if (Path(p) / CONFIG_FILE).is_file()]
            if not matches:
                raise FileNotFoundError(
                    f"No run folder matches {pattern!r}: a run folder contains {CONFIG_FILE}. "
                    "Check the pattern, and quote it so that the shell does not expand it first.")
        else:
            path = Path(pattern).expanduser()
            load_run_config(path)
            matches = [path]
        for path in matches:
            if path.resolve() not in {p.resolve() for p in found}:
                found.append(path)
    return found


def _trials_file_is_stale(run_dir: Path) -> bool:
    trials_path = run_dir / TRIALS_FILE
    if not trials_path.is_file():
        return True
    written = trials_path.stat().st_mtime
    return any(path.stat().st_mtime > written for path in run_dir.glob(f"*/{RESULT_FILE}"))


def read_trials(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Read ``trials.parquet`` of a run, exporting it first when it is missing or older than a result."""
    run_dir = Path(run_dir)
    load_run_config(run_dir)
    if _trials_file_is_stale(run_dir):
        logger.info("Exporting %s: %s is missing or older than the trial results", run_dir, TRIALS_FILE)
        return export_run(run_dir)
    return pd.read_parquet(run_dir / TRIALS_FILE)


def _run_labels(run_dirs: Sequence[Path]) -> list[str]:
    names = [path.name for path in run_dirs]
    if len(set(names)) == len(names):
        return names
    # Two runs of the same name in different storage folders: fall back to the full paths.
    return [str(path) for path in run_dirs]


def load_runs(run_dirs: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate the trials of several runs, with a ``run`` column first (the folder name).

    Raises:
        ValueError: the runs maximise different objectives, so their values cannot be ranked together.
    """
    paths = [Path(p) for p in run_dirs]
    frames = []
    for label, path in zip(_run_labels(paths), paths):
        trials = read_trials(path)
        trials.insert(0, RUN_COLUMN, label)
        frames.append(trials)
    trials = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[RUN_COLUMN])

    objectives = {label: load_run_config(path)["search"]["objective"] for label, path in zip(_run_labels(paths), paths)}
    if len(set(objectives.values())) > 1:
        listed = ", ".join(f"{label}: {objective}" for label, objective in objectives.items())
        raise ValueError(f"The runs maximise different objectives ({listed}), so their values are not comparable. "
                         "Analyse runs of one objective together, or use 'lesiontune results compare'.")
    return trials


def finished_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """Keep trials that ended without error (ASHA-stopped ones included) and have an objective value."""
    return trials[(trials["status"] == FINISHED_STATUS) & trials["best_objective"].notna()]


def _category_level(value: object) -> tuple[object, str]:
    return (str(value), str(value))


def _unfrozen_depth_level(value: float) -> tuple[object, str]:
    layers = int(value)
    if layers < 0:
        return (math.inf, "all")
    if layers == 0:
        return (0, "0 (frozen)")
    for low, high in ((1, 10), (11, 20), (21, 40), (41, 80)):
        if layers <= high:
            return (low, f"{low}-{high}")
    return (81, ">80")


def _intensity_level(value: float) -> tuple[object, str]:
    quarter = min(int(float(value) * 4), 3)
    low, high = quarter / 4, (quarter + 1) / 4
    closing = "]" if quarter == 3 else ")"
    return (low, f"[{low:.2f}, {high:.2f}{closing}")


def _dropout_level(value: float) -> tuple[object, str]:
    tenth = int(float(value) * 10)
    return (tenth, f"[{tenth / 10:.1f}, {(tenth + 1) / 10:.1f})")


def _learning_rate_level(value: float) -> tuple[object, str]:
    decade = math.floor(math.log10(float(value)))
    return (decade, f"[1e{decade}, 1e{decade + 1})")


def _fraction_level(value: float) -> tuple[object, str]:
    if float(value) == 0:
        return (-1, "0 (frozen)")
    return _intensity_level(value)


# Each searched factor and how its values are binned into levels: (sort key, label).
_FACTOR_LEVELS: dict[str, Callable[[object], tuple[object, str]]] = {
    "backbone": _category_level,
    "balancing": _category_level,
    "unfrozen_layers": _unfrozen_depth_level,
    "augmentation_intensity": _intensity_level,
    "learning_rate": _learning_rate_level,
    "batch_size": lambda value: (int(value), str(int(value))),
    "dropout": _dropout_level,
    "image_size": lambda value: (int(value), f"{int(value)} px"),
    "unfrozen_fraction": _fraction_level,
    "fine_tune_lr_multiplier": _learning_rate_level,
    "smote_k": lambda value: (int(value), str(int(value))),
}


def factor_effects(trials: pd.DataFrame) -> pd.DataFrame:
    """Summarise the best objective of finished trials per level of each searched factor.

    Numeric factors are binned: unfrozen depth into weight-layer ranges, the unfrozen fraction and
    augmentation intensity into quarters, dropout into tenths, and the learning rate and the fine-tuning
    multiplier into decades (log bins). A trial without a value for a factor (a conditional parameter
    that was not drawn, or a factor that the run did not search) is left out of that factor's rows.

    Returns:
        One row per factor and level with columns ``factor``, ``level``, ``trials``, ``stopped_early``
        (how many of them ASHA stopped), ``mean``, ``median`` and ``max`` of ``best_objective``.

    Raises:
        ValueError: no trial finished with an objective value.
    """
    finished = finished_trials(trials)
    if finished.empty:
        raise ValueError(f"No finished trial with an objective value among {len(trials)} trials "
                         "(statuses: " + ", ".join(sorted(trials["status"].dropna().unique())) + ").")

    rows = []
    for factor, level_of in _FACTOR_LEVELS.items():
        if factor not in finished:
            continue
        present = finished[finished[factor].notna()]
        levels = [level_of(value) for value in present[factor]]
        frame = pd.DataFrame({
            "key": [key for key, _ in levels], "level": [label for _, label in levels],
            "objective": present["best_objective"].to_numpy(), "stopped": present["stopped_early"].to_numpy(),
        })
        for (_, level), group in frame.groupby(["key", "level"], sort=True):
            rows.append({"factor": factor, "level": level, "trials": len(group),
                         "stopped_early": int(group["stopped"].fillna(False).astype(bool).sum()),
                         "mean": group["objective"].mean(), "median": group["objective"].median(),
                         "max": group["objective"].max()})
    return pd.DataFrame(rows, columns=["factor", "level", "trials", "stopped_early", "mean", "median", "max"])


def _is_integer_parameter(name: str) -> bool:
    return pa.types.is_integer(TRIAL_SCHEMA.field(name).type)


def _distribution(name: str, setting: object):
    """Return the optuna distribution of one ``space`` entry of the run config, or None when it is fixed."""
    import optuna

    if isinstance(setting, list):
        return optuna.distributions.CategoricalDistribution(tuple(setting))
    if isinstance(setting, dict):
        if _is_integer_parameter(name):
            return optuna.distributions.IntDistribution(int(setting["low"]), int(setting["high"]),
                                                        log=bool(setting.get("log", False)))
        return optuna.distributions.FloatDistribution(float(setting["low"]), float(setting["high"]),
                                                      log=bool(setting.get("log", False)))
    return None


def _importance_evaluator(method: str, seed: int):
    import optuna

    if method == "fanova":
        return optuna.importance.FanovaImportanceEvaluator(seed=seed)
    if method == "ped-anova":
        return optuna.importance.PedAnovaImportanceEvaluator()
    raise ValueError(f"Invalid importance method {method!r}: expected one of {', '.join(IMPORTANCE_METHODS)}.")


def _build_study(trials: pd.DataFrame, distributions: dict):
    import optuna

    study = optuna.create_study(direction="maximize")
    for row in trials.itertuples(index=False):
        params = {}
        for name in distributions:
            value = getattr(row, name)
            # A conditional parameter that this trial did not draw has no value.
            if pd.isna(value):
                continue
            params[name] = int(value) if _is_integer_parameter(name) else value
        try:
            trial = optuna.trial.create_trial(params=params, distributions={name: distributions[name]
                                                                            for name in params},
                                              value=float(row.best_objective))
        except ValueError as error:
            raise ValueError(f"Trial {row.trial_id} has parameters {params} outside the space saved in "
                             f"{CONFIG_FILE} ({error}). Was the config edited after the search?") from error
        study.add_trial(trial)
    return study


def parameter_importance(trials: pd.DataFrame, space: dict, *, method: str = "fanova",
                         seed: int = 0) -> pd.DataFrame:
    """Estimate how much each searched hyperparameter explains the best objective of finished trials.

    The trials are loaded into an in-memory optuna study whose distributions come from the run's
    ``space``: a list is categorical, a ``{low, high, log}`` mapping an int or float range. Fixed
    parameters are left out.

    Args:
        trials: rows of ``trials.parquet`` of one run.
        space: the ``space`` section of the run's ``lesiontune_config.yaml``.
        method: ``"fanova"`` (random-forest functional ANOVA, Hutter et al. 2014) or ``"ped-anova"``
            (Watanabe et al. 2023, which compares the top 10 % of trials with all of them).
        seed: seed of the fANOVA forest.

    Returns:
        Columns ``parameter`` and ``importance`` (normalised to sum to 1), most important first.

    Raises:
        ValueError: an unknown method, fewer than 2 finished trials, no searched parameter, or a trial
            value outside the saved space.
    """
    import optuna

    evaluator = _importance_evaluator(method, seed)
    distributions = {name: d for name, setting in space.items() if (d := _distribution(name, setting)) is not None}
    if not distributions:
        raise ValueError("Every parameter of this run's space is fixed, so there is no importance to estimate.")
    finished = finished_trials(trials)
    if len(finished) < 2:
        raise ValueError(f"Importance needs at least 2 finished trials with an objective value, but this run has "
                         f"{len(finished)}. Run a search with more --num-samples.")

    # NOTE: the target is each trial's best objective, and ASHA-stopped trials reached theirs after fewer
    # epochs, so the importance partly measures which configurations ASHA let train longer.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = _build_study(finished, distributions)
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return pd.DataFrame({"parameter": list(importances), "importance": list(importances.values())})


def _read_summary(run_dir: Path) -> dict:
    path = run_dir / SUMMARY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def space_setting_text(setting: object) -> str:
    """Format one ``space`` entry of a run config: ``[low, high, log]``, ``{a, b}`` or ``value (fixed)``."""
    if isinstance(setting, dict):
        scale = ", log" if setting.get("log") else ""
        return f"[{setting['low']:g}, {setting['high']:g}{scale}]"
    if isinstance(setting, list):
        return "{" + ", ".join(str(value) for value in setting) + "}"
    return f"{setting} (fixed)"


def _run_facts(run_dir: Path) -> dict[str, object]:
    config = load_run_config(run_dir)
    trials = read_trials(run_dir)
    finished = finished_trials(trials)
    summary = _read_summary(run_dir)
    facts: dict[str, object] = {
        "data": config["data"]["path"],
        "images": summary.get("images"),
        "positive images": summary.get("positive"),
        "objective": config["search"]["objective"],
        "max epochs": config["search"]["max_epochs"],
        "trials": len(trials),
        "finished": len(finished),
        "errors": int((trials["status"] == "ERROR").sum()),
        "stopped early": int(trials["stopped_early"].fillna(False).astype(bool).sum()),
        "best objective": finished["best_objective"].max() if len(finished) else None,
        "median objective": finished["best_objective"].median() if len(finished) else None,
        "trial hours": trials["wall_seconds"].sum() / 3600,
    }
    if len(finished):
        best = finished.loc[finished["best_objective"].idxmax()]
        facts["best trial"] = best["trial_id"]
        for name in ("best_val_auc", "best_val_sensitivity", "best_val_specificity", "best_val_threshold"):
            facts[f"best trial: {name.removeprefix('best_')}"] = best[name]
        for name in _FACTOR_LEVELS:
            facts[f"best trial: {name}"] = best[name]
    for name, setting in config["space"].items():
        facts[f"space: {name}"] = space_setting_text(setting)
    return facts


def compare_runs(run_dirs: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Put the data, budget, outcome, best trial and searched space of runs side by side.

    Returns:
        One row per item and one column per run (labelled by folder name).
    """
    paths = [Path(p) for p in run_dirs]
    columns = {label: _run_facts(path) for label, path in zip(_run_labels(paths), paths)}
    table = pd.DataFrame(columns)
    table.index.name = "item"
    return table


def _first_trial_id(trial_dir: Path) -> str | None:
    path = trial_dir / RESULT_FILE
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                return json.loads(line).get("trial_id")
    return None


def trial_dirs_by_id(run_dir: str | os.PathLike) -> dict[str, Path]:
    """Map each trial id of a run to its Tune trial folder."""
    found = {}
    for params_path in sorted(Path(run_dir).glob("*/params.json")):
        trial_dir = params_path.parent
        # Tune names trial folders "<trainable>_<trial id>_<index>_<params>_<date>".
        trial_id = _first_trial_id(trial_dir) or trial_dir.name.split("_")[-3]
        found[trial_id] = trial_dir
    return found


def resolve_trial_id(run_dir: str | os.PathLike, requested: str) -> str:
    """Return the trial id that equals ``requested`` or is the only one starting with it.

    Raises:
        ValueError: no trial, or several trials, match.
    """
    ids = sorted(trial_dirs_by_id(run_dir))
    if requested in ids:
        return requested
    matches = [trial_id for trial_id in ids if trial_id.startswith(requested)]
    if len(matches) == 1 and len(requested) >= _MIN_TRIAL_PREFIX:
        return matches[0]
    listed_ids = ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")
    if len(matches) > 1:
        raise ValueError(f"Trial id {requested!r} matches several trials of {run_dir} ({', '.join(matches)}). "
                         "Give more characters.")
    raise ValueError(f"No trial {requested!r} in {run_dir}. Its trials are: {listed_ids or 'none'}. "
                     f"A prefix needs at least {_MIN_TRIAL_PREFIX} characters.")


def _read_checkpoint(trial_id: str, path: Path, metric: str) -> Checkpoint:
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    value = state.get("metrics", {}).get(metric)
    return Checkpoint(trial_id=trial_id, path=path, epoch=int(state["epoch"]),
                      objective_value=float(value) if value is not None else math.nan,
                      threshold=float(state["threshold"]), state=state)


def best_checkpoint(run_dir: str | os.PathLike, trial_id: str) -> Checkpoint:
    """Return the kept checkpoint of a trial with the highest objective, a tie going to the earlier epoch.

    Tune keeps the 2 best checkpoints by the objective, so this is the trial's best epoch unless that
    checkpoint was deleted.

    Raises:
        ValueError: the trial id is unknown or an ambiguous prefix.
        FileNotFoundError: the trial has no checkpoint with a ``state.json``.
    """
    run_dir = Path(run_dir)
    trial_id = resolve_trial_id(run_dir, trial_id)
    trial_dir = trial_dirs_by_id(run_dir)[trial_id]
    metric = f"val_{load_run_config(run_dir)['search']['objective']}"
    checkpoints = [_read_checkpoint(trial_id, path.parent, metric)
                   for path in sorted(trial_dir.glob(f"checkpoint_*/{STATE_FILE}"))]
    if not checkpoints:
        raise FileNotFoundError(f"Trial {trial_id} has no checkpoint in {trial_dir}: it ended before its first "
                                "epoch finished. Choose another trial (see 'lesiontune results leaderboard').")
    return max(checkpoints, key=lambda c: (np.nan_to_num(c.objective_value, nan=-np.inf), -c.epoch))


def read_run_manifest(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Read the split manifest saved in a run folder (one row per image, in cache-build order)."""
    return read_manifest(Path(run_dir) / MANIFEST_FILE)


def validation_predictions(manifest: pd.DataFrame, checkpoint: Checkpoint) -> pd.DataFrame:
    """Pair a checkpoint's ``validation_scores.npy`` with the validation rows of the manifest.

    Returns:
        The validation rows of ``manifest`` in manifest order, with a float64 ``score`` column in [0, 1].

    Raises:
        ValueError: the number of scores differs from the number of validation rows.
    """
    scores = np.load(checkpoint.scores_path)
    validation = manifest[manifest["split"] == "validation"].reset_index(drop=True)
    if len(scores) != len(validation):
        raise ValueError(f"{checkpoint.scores_path} has {len(scores)} scores but the manifest has "
                         f"{len(validation)} validation rows, so the checkpoint belongs to another run.")
    return validation.assign(score=scores.astype(np.float64))


def recorded_cache_path(checkpoint: Checkpoint) -> Path | None:
    """Return the image cache folder the trial trained on, as its ``state.json`` records it."""
    image_size = int(checkpoint.state["config"]["image_size"])
    cache_paths = checkpoint.state.get("setup", {}).get("cache_paths", {})
    path = cache_paths.get(str(image_size)) or cache_paths.get(image_size)
    return Path(path) if path else None


def recorded_resize_rule(checkpoint: Checkpoint) -> str:
    """Return the resize rule of the trial's image cache, or the search driver's rule when it is gone."""
    from data.cache import open_image_cache

    path = recorded_cache_path(checkpoint)
    if path is not None and path.is_dir():
        return open_image_cache(path).resize_rule
    # NOTE: the search driver builds every cache with build_image_cache's default rule, center_crop, so a
    # deleted cache is assumed to have used it.
    return SEARCH_RESIZE_RULE
