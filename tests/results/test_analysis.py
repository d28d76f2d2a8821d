import shutil

import pandas as pd
import pytest
import yaml

from results.analysis import (best_checkpoint, compare_runs, expand_run_dirs, factor_effects, finished_trials,
                              load_runs, parameter_importance, read_trials, resolve_trial_id, validation_predictions,
                              read_run_manifest)
from results.export import load_run_config


def _level(effects: pd.DataFrame, factor: str, level: str) -> pd.Series:
    rows = effects[(effects["factor"] == factor) & (effects["level"] == level)]
    assert len(rows) == 1, f"{factor}={level} not found in\n{effects}"
    return rows.iloc[0]


def test_read_trials_exports_missing_table(fresh_run):
    assert not (fresh_run / "trials.parquet").exists()

    trials = read_trials(fresh_run)

    assert (fresh_run / "trials.parquet").is_file()
    assert sorted(trials["trial_id"]) == ["aaaa1111", "bbbb2222", "cccc3333", "dddd4444"]
    assert trials.set_index("trial_id").loc["dddd4444", "status"] == "ERROR"
    assert bool(trials.set_index("trial_id").loc["cccc3333", "stopped_early"])


def test_finished_trials_drop_errors(synthetic_run):
    finished = finished_trials(read_trials(synthetic_run))

    assert sorted(finished["trial_id"]) == ["aaaa1111", "bbbb2222", "cccc3333"]


def test_factor_effects_counts_per_level(synthetic_run):
    effects = factor_effects(read_trials(synthetic_run))

    oversample = _level(effects, "balancing", "oversample")
    assert oversample["trials"] == 1
    assert oversample["max"] == pytest.approx(0.08)
    assert "undersample" not in set(effects.loc[effects["factor"] == "balancing", "level"])
    batch_16 = _level(effects, "batch_size", "16")
    assert batch_16["trials"] == 2
    assert batch_16["stopped_early"] == 1
    assert batch_16["mean"] == pytest.approx((0.08 + 0.01) / 2)
    assert batch_16["median"] == pytest.approx((0.08 + 0.01) / 2)


def test_factor_effects_bins_numeric_factors(synthetic_run):
    effects = factor_effects(read_trials(synthetic_run))

    learning_rates = effects.loc[effects["factor"] == "learning_rate", "level"].tolist()
    assert learning_rates == ["[1e-5, 1e-4)", "[1e-4, 1e-3)", "[1e-3, 1e-2)"]
    intensities = effects.loc[effects["factor"] == "augmentation_intensity", "level"].tolist()
    assert intensities == ["[0.00, 0.25)", "[0.25, 0.50)", "[0.75, 1.00]"]
    assert _level(effects, "unfrozen_layers", "all")["trials"] == 3


def test_factor_effects_rejects_no_finished_trial(synthetic_run):
    trials = read_trials(synthetic_run).assign(status="ERROR")

    with pytest.raises(ValueError, match="No finished trial with an objective value among 4 trials"):
        factor_effects(trials)


def test_parameter_importance_covers_searched_parameters(synthetic_run):
    space = load_run_config(synthetic_run)["space"]

    for method in ("fanova", "ped-anova"):
        importance = parameter_importance(read_trials(synthetic_run), space, method=method)
        assert set(importance["parameter"]) == {"balancing", "augmentation_intensity", "learning_rate",
                                                "batch_size", "dropout"}
        assert importance["importance"].sum() == pytest.approx(1.0)


def test_parameter_importance_rejects_one_trial(synthetic_run):
    trials = read_trials(synthetic_run)
    space = load_run_config(synthetic_run)["space"]

    with pytest.raises(ValueError, match="at least 2 finished trials .* this run has 1"):
        parameter_importance(trials[trials["trial_id"] == "aaaa1111"], space)


def test_parameter_importance_rejects_foreign_value(synthetic_run):
    trials = read_trials(synthetic_run)
    space = {**load_run_config(synthetic_run)["space"], "batch_size": [64, 128]}

    with pytest.raises(ValueError, match="outside the space saved in lesiontune_config.yaml"):
        parameter_importance(trials, space)


def test_parameter_importance_rejects_unknown_method(synthetic_run):
    with pytest.raises(ValueError, match="Invalid importance method 'anova'"):
        parameter_importance(read_trials(synthetic_run), {}, method="anova")


def test_expand_run_dirs_matches_glob(synthetic_run):
    found = expand_run_dirs([str(synthetic_run.parent / "*"), str(synthetic_run)])

    assert found == [synthetic_run]


def test_expand_run_dirs_rejects_empty_glob(tmp_path):
    with pytest.raises(FileNotFoundError, match="No run folder matches"):
        expand_run_dirs([str(tmp_path / "*")])


def test_expand_run_dirs_rejects_non_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a lesiontune run folder"):
        expand_run_dirs([str(tmp_path)])


def test_load_runs_adds_run_column(synthetic_run, tmp_path):
    second = tmp_path / "second"
    shutil.copytree(synthetic_run, second)

    trials = load_runs([synthetic_run, second])

    assert trials.columns[0] == "run"
    assert trials.groupby("run").size().to_dict() == {"second": 4, "synthetic": 4}


def test_load_runs_rejects_mixed_objectives(synthetic_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(synthetic_run, other)
    config = yaml.safe_load((other / "lesiontune_config.yaml").read_text())
    config["search"]["objective"] = "auc"
    (other / "lesiontune_config.yaml").write_text(yaml.safe_dump(config))

    with pytest.raises(ValueError, match="different objectives .*synthetic: pauc80, other: auc"):
        load_runs([synthetic_run, other])


def test_compare_runs_one_column_per_run(synthetic_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(synthetic_run, other)

    table = compare_runs([synthetic_run, other])

    assert list(table.columns) == ["synthetic", "other"]
    assert table.loc["best trial", "synthetic"] == "aaaa1111"
    assert table.loc["errors", "synthetic"] == 1
    assert table.loc["space: learning_rate", "other"] == "[1e-05, 0.01, log]"


def test_resolve_trial_id_accepts_unique_prefix(synthetic_run):
    assert resolve_trial_id(synthetic_run, "bbbb") == "bbbb2222"
    assert resolve_trial_id(synthetic_run, "cccc3333") == "cccc3333"


def test_resolve_trial_id_rejects_unknown_id(synthetic_run):
    with pytest.raises(ValueError, match="No trial 'zzzz' in .*aaaa1111, bbbb2222"):
        resolve_trial_id(synthetic_run, "zzzz")


def test_resolve_trial_id_rejects_short_prefix(synthetic_run):
    with pytest.raises(ValueError, match="at least 4 characters"):
        resolve_trial_id(synthetic_run, "aa")


def test_best_checkpoint_picks_best_epoch(synthetic_run):
    assert best_checkpoint(synthetic_run, "aaaa1111").epoch == 2
    assert best_checkpoint(synthetic_run, "bbbb2222").epoch == 1


def test_best_checkpoint_rejects_trial_without_checkpoint(synthetic_run):
    with pytest.raises(FileNotFoundError, match="Trial dddd4444 has no checkpoint"):
        best_checkpoint(synthetic_run, "dddd4444")


def test_validation_predictions_follow_manifest(synthetic_run, run_inputs):
    manifest = read_run_manifest(synthetic_run)

    predictions = validation_predictions(manifest, best_checkpoint(synthetic_run, "aaaa1111"))

    assert predictions["image_id"].tolist() == manifest.loc[manifest["split"] == "validation", "image_id"].tolist()
    assert predictions["score"].to_numpy() == pytest.approx(run_inputs["validation_scores"])


def _with_conditional_values(trials: pd.DataFrame) -> pd.DataFrame:
    trials = trials.sort_values("trial_id").reset_index(drop=True)
    trials["smote_k"] = pd.array([3, None, 7, None], dtype="Int64")
    trials["fine_tune_lr_multiplier"] = [0.05, 0.5, None, 0.2]
    trials["unfrozen_fraction"] = [0.0, 0.3, 0.9, 0.3]
    return trials


def test_factor_effects_cover_conditional_parameters(synthetic_run):
    effects = factor_effects(_with_conditional_values(read_trials(synthetic_run)))

    assert effects.loc[effects["factor"] == "smote_k", "level"].tolist() == ["3", "7"]
    assert effects.loc[effects["factor"] == "fine_tune_lr_multiplier", "level"].tolist() == ["[1e-2, 1e-1)",
                                                                                           "[1e-1, 1e0)"]
    assert _level(effects, "unfrozen_fraction", "0 (frozen)")["trials"] == 1
    assert _level(effects, "unfrozen_fraction", "[0.25, 0.50)")["trials"] == 1


def test_parameter_importance_skips_undrawn_values(synthetic_run):
    trials = _with_conditional_values(read_trials(synthetic_run))
    space = {**load_run_config(synthetic_run)["space"], "smote_k": {"low": 2, "high": 8},
             "fine_tune_lr_multiplier": {"low": 0.01, "high": 1.0, "log": True}}

    importance = parameter_importance(trials, space, method="fanova")

    assert "balancing" in set(importance["parameter"])
    assert importance["importance"].sum() == pytest.approx(1.0)
