import numpy as np
import pandas as pd
import pytest

from results.analysis import read_run_manifest
from results.evaluate import (INTERVAL_METRICS, TestSplitAlreadyEvaluatedError, age_band, bootstrap_intervals,
                              evaluate_run, subgroup_rates, subgroup_table)


def _interval(intervals: pd.DataFrame, metric: str) -> pd.Series:
    return intervals.set_index("metric").loc[metric]


def test_bootstrap_perfect_classifier_degenerate():
    labels = np.array([0] * 20 + [1] * 20)
    scores = np.where(labels == 1, 0.9, 0.1)

    intervals = bootstrap_intervals(labels, scores, np.arange(40), threshold=0.5, resamples=30)

    assert list(intervals["metric"]) == list(INTERVAL_METRICS)
    for metric in ("auc", "sensitivity", "specificity"):
        row = _interval(intervals, metric)
        assert (row["estimate"], row["ci_lower"], row["ci_upper"]) == (1.0, 1.0, 1.0)


def test_bootstrap_resamples_whole_groups():
    # 50 positive groups of 10 identical images, half of them detected, and 50 negative groups. Resampling
    # groups gives sensitivity ~ detected groups / positive groups drawn, whose standard deviation is about
    # sqrt(0.25 / 50) = 0.071, so the 95 % interval is 0.5 +- 0.139. Resampling the 1,000 images one by one
    # would give 0.5 +- 0.044 instead.
    group_labels = np.array([1] * 50 + [0] * 50)
    group_scores = np.array([0.9] * 25 + [0.1] * 25 + [0.1] * 50)
    groups = np.repeat(np.arange(100), 10)

    intervals = bootstrap_intervals(group_labels[groups], group_scores[groups], groups, threshold=0.5,
                                    resamples=400, seed=1)

    sensitivity = _interval(intervals, "sensitivity")
    assert sensitivity["estimate"] == pytest.approx(0.5)
    assert sensitivity["ci_lower"] == pytest.approx(0.5 - 0.139, abs=0.035)
    assert sensitivity["ci_upper"] == pytest.approx(0.5 + 0.139, abs=0.035)
    assert _interval(intervals, "specificity")["ci_lower"] == 1.0


def test_bootstrap_counts_undefined_resamples():
    # One positive group among 20: a resample misses it with probability (19/20)**20 = 0.36.
    labels = np.array([1] + [0] * 19)
    scores = np.linspace(0.9, 0.0, 20)

    intervals = bootstrap_intervals(labels, scores, np.arange(20), threshold=0.5, resamples=200, seed=0)

    defined = intervals.set_index("metric")["resamples_defined"]
    assert 100 < defined["sensitivity"] < 160
    assert defined["specificity"] == 200
    assert defined["auc"] == defined["sensitivity"]


def test_bootstrap_same_seed_same_result():
    rng = np.random.default_rng(3)
    labels, scores, groups = rng.integers(0, 2, 60), rng.random(60), rng.integers(0, 20, 60)

    first = bootstrap_intervals(labels, scores, groups, threshold=0.5, resamples=20, seed=7)
    second = bootstrap_intervals(labels, scores, groups, threshold=0.5, resamples=20, seed=7)

    pd.testing.assert_frame_equal(first, second)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"resamples": 0}, "Invalid resamples 0"),
    ({"confidence": 1.0}, "Invalid confidence 1.0"),
])
def test_bootstrap_rejects_invalid_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_intervals(np.array([0, 1]), np.array([0.2, 0.8]), np.array([0, 1]), threshold=0.5, **arguments)


@pytest.mark.parametrize(("age", "band"), [
    (0.0, "<30"), (29.9, "<30"), (30.0, "[30, 50)"), (49.0, "[30, 50)"), (50.0, "[50, 70)"), (70.0, ">=70"),
    (85.0, ">=70"), (float("nan"), "unknown"), (None, "unknown"),
])
def test_age_band_boundaries(age, band):
    assert age_band(age) == band


def test_subgroup_rates_counts_and_flags():
    predictions = pd.DataFrame({
        "label": [1, 1, 0, 0, 0, 1, 0, 0],
        "score": [0.9, 0.2, 0.1, 0.8, 0.3, 0.7, 0.1, 0.6],
        "sex": ["female", "female", "female", "female", "male", "male", "male", None],
        "age_approx": [25.0, 35.0, 55.0, 75.0, 25.0, 35.0, None, 55.0],
    })

    rates = subgroup_rates(predictions, threshold=0.5).set_index(["factor", "level"])

    assert set(rates.index.get_level_values("factor")) == {"sex", "age_band"}
    female = rates.loc[("sex", "female")]
    assert (female["images"], female["positives"], female["negatives"]) == (4, 2, 2)
    assert female["sensitivity"] == pytest.approx(0.5)
    assert female["specificity"] == pytest.approx(0.5)
    assert bool(female["few_cases"])
    unknown_sex = rates.loc[("sex", "unknown")]
    assert (unknown_sex["images"], unknown_sex["positives"]) == (1, 0)
    assert np.isnan(unknown_sex["sensitivity"])
    ages = rates.loc["age_band"]
    assert list(ages.index) == ["<30", "[30, 50)", "[50, 70)", ">=70", "unknown"]
    assert ages["images"].sum() == len(predictions)


def test_subgroup_rates_no_flag_with_enough_cases():
    predictions = pd.DataFrame({"label": [1] * 10 + [0] * 30, "score": [0.9] * 40, "sex": ["female"] * 40})

    rates = subgroup_rates(predictions, threshold=0.5)

    assert not bool(rates.iloc[0]["few_cases"])


def test_evaluate_run_writes_tables(evaluated_run):
    metrics = pd.read_parquet(evaluated_run / "test_evaluation.parquet")
    predictions = pd.read_parquet(evaluated_run / "predictions.parquet")

    assert sorted(metrics["trial_id"].unique()) == ["aaaa1111", "bbbb2222"]
    overall = metrics[metrics["scope"] == "overall"]
    assert sorted(overall["metric"].unique()) == sorted(INTERVAL_METRICS)
    assert (overall["images"] == 16).all()
    assert (overall["positives"] == 4).all()
    assert (overall["ci_lower"] <= overall["estimate"] + 1e-12).all()
    assert (overall["estimate"] <= overall["ci_upper"] + 1e-12).all()
    assert set(predictions.groupby(["trial_id", "split"]).size()) == {16}
    assert set(predictions["split"]) == {"validation", "test"}


def test_evaluate_run_uses_validation_threshold(evaluated_run):
    from results.analysis import best_checkpoint

    metrics = pd.read_parquet(evaluated_run / "test_evaluation.parquet")
    predictions = pd.read_parquet(evaluated_run / "predictions.parquet")
    checkpoint = best_checkpoint(evaluated_run, "aaaa1111")
    test = predictions[(predictions["trial_id"] == "aaaa1111") & (predictions["split"] == "test")]

    rows = metrics[(metrics["trial_id"] == "aaaa1111") & (metrics["scope"] == "overall")].set_index("metric")
    expected = (test.loc[test["label"] == 1, "score"] >= checkpoint.threshold).mean()
    assert rows.loc["sensitivity", "threshold"] == checkpoint.threshold
    assert rows.loc["sensitivity", "estimate"] == pytest.approx(expected)


def test_evaluate_run_subgroup_counts(evaluated_run):
    metrics = pd.read_parquet(evaluated_run / "test_evaluation.parquet")
    manifest = read_run_manifest(evaluated_run)
    test = manifest[manifest["split"] == "test"]

    subgroups = metrics[(metrics["scope"] == "subgroup") & (metrics["trial_id"] == "aaaa1111")
                        & (metrics["metric"] == "sensitivity")].set_index(["factor", "level"])
    for site, count in test["anatom_site"].fillna("unknown").value_counts().items():
        assert subgroups.loc[("anatom_site", site), "images"] == count
    assert subgroups.loc[("sex", "female"), "positives"] == int(test.loc[test["sex"] == "female", "label"].sum())
    assert subgroups.groupby("factor")["images"].sum().eq(len(test)).all()
    assert subgroups["few_cases"].all()


def test_evaluate_run_rejects_second_run(evaluated_run):
    with pytest.raises(TestSplitAlreadyEvaluatedError, match="already evaluated on its test split.*--force"):
        evaluate_run(evaluated_run, top=1)


def test_evaluate_run_force_overwrites(fresh_run):
    evaluate_run(fresh_run, top=1, resamples=5)

    evaluation = evaluate_run(fresh_run, top=3, resamples=5, force=True)

    assert sorted(evaluation.metrics["trial_id"].unique()) == ["aaaa1111", "bbbb2222", "cccc3333"]
    written = pd.read_parquet(fresh_run / "test_evaluation.parquet")
    assert written["trial_id"].nunique() == 3


def test_evaluate_run_skips_checkpointless_trial(fresh_run):
    evaluation = evaluate_run(fresh_run, top=10, resamples=5)

    assert "dddd4444" not in set(evaluation.metrics["trial_id"])
    assert evaluation.metrics.groupby("trial_id")["rank"].first().to_dict() == {
        "aaaa1111": 1, "bbbb2222": 2, "cccc3333": 3}


def test_evaluate_run_rebuilds_missing_cache(fresh_run, evaluated_run, tmp_path):
    import json

    for state_path in fresh_run.glob("*/checkpoint_*/state.json"):
        state = json.loads(state_path.read_text())
        state["setup"]["cache_paths"] = {"32": str(tmp_path / "deleted-cache")}
        state_path.write_text(json.dumps(state))

    evaluation = evaluate_run(fresh_run, top=1, resamples=5)

    reference = pd.read_parquet(evaluated_run / "predictions.parquet")
    reference = reference[(reference["trial_id"] == "aaaa1111") & (reference["split"] == "test")]
    rebuilt = evaluation.predictions[evaluation.predictions["split"] == "test"]
    assert rebuilt["score"].to_numpy() == pytest.approx(reference["score"].to_numpy(), abs=1e-6)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"top": 0}, "Invalid top 0"),
    ({"top": 1, "batch_size": 0}, "Invalid batch_size 0"),
])
def test_evaluate_run_rejects_invalid_arguments(synthetic_run, arguments, message):
    with pytest.raises(ValueError, match=message):
        evaluate_run(synthetic_run, **arguments)


def test_subgroup_table_keeps_level_order(evaluated_run):
    metrics = pd.read_parquet(evaluated_run / "test_evaluation.parquet")

    table = subgroup_table(metrics)

    ages = table[(table["trial_id"] == "aaaa1111") & (table["factor"] == "age_band")]
    assert ages["level"].tolist() == ["<30", "[30, 50)", "[50, 70)", ">=70", "unknown"]
    assert len(table) == (metrics["scope"] == "subgroup").sum() // 2
    male_rows = metrics[(metrics["trial_id"] == "aaaa1111") & (metrics["level"] == "male")]
    row = table[(table["trial_id"] == "aaaa1111") & (table["level"] == "male")].iloc[0]
    # The test split has no positive male, so the sensitivity is NaN in both tables.
    expected = male_rows.set_index("metric")["estimate"]
    assert row["specificity"] == pytest.approx(expected["specificity"])
    assert row["sensitivity"] == pytest.approx(expected["sensitivity"], nan_ok=True)
    assert np.isnan(row["sensitivity"])
