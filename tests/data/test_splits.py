"""Property tests for the grouped, stratified split and the cross-validation folds."""

import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import StratifiedGroupKFold

from data.splits import (
    TEST_FOLD,
    SplitFractions,
    _stratified_group_folds,
    assign_folds,
    assign_splits,
    read_manifest,
    write_manifest,
)

ISIC2020_CSV = (Path(__file__).resolve().parents[2].parent / "shared" / "data" / "metadata"
                / "ISIC_2020_Training_GroundTruth.csv")
RANDOM_DATASETS = 12
# Largest difference between the positive share of a split or fold and of the whole dataset. Over 150 random
# datasets of _random_records, with 2 to 10 folds, the largest seen was 0.015.
RATIO_TOLERANCE = 0.03


def _records(n_groups: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n_groups)
    groups = np.repeat([f"G{i}" for i in range(n_groups)], sizes)
    group_label = {f"G{i}": int(rng.random() < 0.2) for i in range(n_groups)}
    return pd.DataFrame({"image_id": [f"I{i}" for i in range(len(groups))], "group": groups,
                         "label": [group_label[g] for g in groups]})


def _random_records(rng: np.random.Generator) -> pd.DataFrame:
    """Draw a dataset like ISIC: skewed group sizes, 5 to 40 % positives, some groups with both classes."""
    n_groups = int(rng.integers(300, 800))
    sizes = np.minimum(rng.geometric(0.4, n_groups), 10)
    group_of_image = np.repeat(np.arange(n_groups), sizes)
    rate = rng.uniform(0.05, 0.4)
    group_is_positive = rng.random(n_groups) < rate
    follows_group = rng.random(len(group_of_image)) < 0.9
    labels = np.where(follows_group, group_is_positive[group_of_image], rng.random(len(group_of_image)) < rate)
    return pd.DataFrame({"image_id": [f"I{i}" for i in range(len(group_of_image))],
                         "group": [f"G{g}" for g in group_of_image], "label": labels.astype("int8")})


def _assert_groups_disjoint(records: pd.DataFrame, assignment: pd.Series) -> None:
    parts_per_group = records.assign(part=assignment).groupby("group")["part"].nunique()
    assert parts_per_group.max() == 1


def _assert_class_ratio(records: pd.DataFrame, assignment: pd.Series, parts) -> None:
    overall = records["label"].mean()
    for part in parts:
        members = records.loc[(assignment == part).to_numpy(), "label"]
        assert len(members) > 0, part
        assert abs(members.mean() - overall) < RATIO_TOLERANCE, part


def test_assign_splits_random_properties():
    rng = np.random.default_rng(2024)
    for seed in range(RANDOM_DATASETS):
        records = _random_records(rng)
        split = assign_splits(records, seed=seed)
        _assert_groups_disjoint(records, split)
        _assert_class_ratio(records, split, ("train", "validation", "test"))
        assert abs((split == "test").mean() - 0.15) < 0.05
        assert abs((split == "validation").mean() - 0.15) < 0.05


def test_assign_folds_random_properties():
    rng = np.random.default_rng(7)
    for seed in range(RANDOM_DATASETS):
        records = _random_records(rng)
        n_folds = int(rng.integers(2, 11))
        folds = assign_folds(records, n_folds=n_folds, seed=seed)
        assert set(folds) == set(range(n_folds))
        _assert_groups_disjoint(records, folds)
        _assert_class_ratio(records, folds, range(n_folds))
        sizes = folds.value_counts(normalize=True)
        assert (sizes - 1 / n_folds).abs().max() < 0.05


def test_assign_folds_held_out_test():
    rng = np.random.default_rng(11)
    for seed in range(RANDOM_DATASETS):
        records = _random_records(rng)
        folds = assign_folds(records, n_folds=4, seed=seed, test_fraction=0.2)
        split = assign_splits(records, fractions=SplitFractions(validation=0.1, test=0.2), seed=seed)
        assert set(folds) == {TEST_FOLD, 0, 1, 2, 3}
        assert ((folds == TEST_FOLD) == (split == "test")).all()
        _assert_groups_disjoint(records, folds)
        _assert_class_ratio(records, folds, (TEST_FOLD, 0, 1, 2, 3))


def test_assign_splits_seed_reproducible():
    rng = np.random.default_rng(3)
    for seed in range(RANDOM_DATASETS):
        records = _random_records(rng)
        split = assign_splits(records, seed=seed)
        assert split.equals(assign_splits(records, seed=seed))
        assert not split.equals(assign_splits(records, seed=seed + 100))


def test_assign_folds_seed_reproducible():
    rng = np.random.default_rng(4)
    for seed in range(RANDOM_DATASETS):
        records = _random_records(rng)
        folds = assign_folds(records, seed=seed)
        assert folds.equals(assign_folds(records, seed=seed))
        assert not folds.equals(assign_folds(records, seed=seed + 100))


def test_stratified_group_folds_match_scikit_learn():
    rng = np.random.default_rng(5)
    for seed in range(RANDOM_DATASETS):
        records = _random_records(rng)
        n_folds = int(rng.choice([2, 3, 5, 7, 10]))
        labels, groups = records["label"].to_numpy(), records["group"].to_numpy()
        expected = np.empty(len(records), dtype=np.int64)
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for fold, (_, members) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
                expected[members] = fold
        assert np.array_equal(_stratified_group_folds(labels, groups, n_folds, seed), expected), (seed, n_folds)


def test_assign_splits_groups_disjoint():
    records = _records(seed=1)
    _assert_groups_disjoint(records, assign_splits(records, seed=1))


def test_assign_splits_class_ratio_and_sizes():
    records = _records(n_groups=600, seed=3)
    split = assign_splits(records, fractions=SplitFractions(validation=0.2, test=0.2), seed=3)
    _assert_class_ratio(records, split, ("train", "validation", "test"))
    assert abs((split == "test").mean() - 0.2) < 0.05
    assert abs((split == "validation").mean() - 0.2) < 0.05


def test_assign_splits_one_class_error():
    records = _records().assign(label=0)
    with pytest.raises(ValueError, match="only one class"):
        assign_splits(records)


def test_assign_splits_too_few_groups_error():
    records = pd.DataFrame({"image_id": ["a", "b", "c"], "group": ["g1", "g2", "g3"], "label": [0, 1, 0]})
    with pytest.raises(ValueError, match="Cannot split 3 groups"):
        assign_splits(records)


def test_assign_splits_invalid_records_errors():
    records = _records()
    with pytest.raises(ValueError, match="records is missing the column.s. group; it has image_id, label"):
        assign_splits(records.drop(columns="group"))
    with pytest.raises(ValueError, match="Invalid label 2 in row 0: expected 0 or 1"):
        assign_splits(records.assign(label=[2] + records["label"].tolist()[1:]))
    with pytest.raises(ValueError, match="Missing group in row 1: every image needs a group"):
        assign_splits(records.assign(group=["G0", None] + records["group"].tolist()[2:]))


def test_assign_folds_invalid_arguments_errors():
    records = _records(n_groups=20)
    with pytest.raises(ValueError, match="Invalid n_folds 1: expected an integer of at least 2"):
        assign_folds(records, n_folds=1)
    with pytest.raises(ValueError, match="Invalid n_folds 2.5"):
        assign_folds(records, n_folds=2.5)
    with pytest.raises(ValueError, match="Invalid test fraction 1.0: expected a number in .0, 1."):
        assign_folds(records, test_fraction=1.0)
    with pytest.raises(ValueError, match="Cannot split 20 groups into 25 folds: every fold needs at least one group"):
        assign_folds(records, n_folds=25)


def test_assign_folds_no_positive_fold_warning(caplog):
    records = pd.DataFrame({"image_id": list("abcdef"), "group": list("abcdef"), "label": [1, 0, 0, 0, 0, 0]})
    assign_folds(records, n_folds=3)
    assert "has no positive image" in caplog.text


def test_split_fractions_invalid():
    with pytest.raises(ValueError, match="Invalid test fraction 1.5"):
        SplitFractions(validation=0.1, test=1.5)
    with pytest.raises(ValueError, match="Invalid validation fraction True"):
        SplitFractions(validation=True)
    with pytest.raises(ValueError, match="add up to 0.95"):
        SplitFractions(validation=0.5, test=0.45)


def test_manifest_round_trip(tmp_path):
    records = _records()
    split = assign_splits(records)
    write_manifest(records, split, tmp_path / "manifest.parquet")
    manifest = read_manifest(tmp_path / "manifest.parquet")
    assert manifest["split"].tolist() == split.tolist()
    assert list(manifest.columns) == ["image_id", "group", "label", "split"]


@pytest.mark.skipif(not ISIC2020_CSV.is_file(), reason="the shared ISIC 2020 ground-truth CSV is absent")
def test_assign_splits_isic2020_by_patient():
    truth = pd.read_csv(ISIC2020_CSV, usecols=["image_name", "patient_id", "target"])
    records = pd.DataFrame({"image_id": truth["image_name"], "group": truth["patient_id"],
                            "label": truth["target"].astype("int8")})
    started = time.perf_counter()
    split = assign_splits(records, seed=0)
    folds = assign_folds(records, n_folds=5, seed=0, test_fraction=0.15)
    elapsed = time.perf_counter() - started

    assert len(records) == 33126
    assert elapsed < 10.0
    _assert_groups_disjoint(records, split)
    _assert_groups_disjoint(records, folds)
    _assert_class_ratio(records, split, ("train", "validation", "test"))
    assert ((folds == TEST_FOLD) == (split == "test")).all()
