"""Property tests for the grouped, stratified split."""

import numpy as np
import pandas as pd
import pytest

from data.splits import SplitFractions, assign_splits, read_manifest, write_manifest


def _records(n_groups: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n_groups)
    groups = np.repeat([f"G{i}" for i in range(n_groups)], sizes)
    group_label = {f"G{i}": int(rng.random() < 0.2) for i in range(n_groups)}
    return pd.DataFrame({"image_id": [f"I{i}" for i in range(len(groups))], "group": groups,
                         "label": [group_label[g] for g in groups]})


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_assign_splits_groups_disjoint(seed):
    records = _records(seed=seed)
    split = assign_splits(records, seed=seed)
    splits_per_group = records.assign(split=split).groupby("group")["split"].nunique()
    assert splits_per_group.max() == 1


@pytest.mark.parametrize("seed", [0, 3])
def test_assign_splits_class_ratio_and_sizes(seed):
    records = _records(n_groups=600, seed=seed)
    split = assign_splits(records, fractions=SplitFractions(validation=0.2, test=0.2), seed=seed)
    overall = records["label"].mean()
    for name in ("train", "validation", "test"):
        labels = records.loc[split == name, "label"]
        assert abs(labels.mean() - overall) < 0.05, name
    assert abs((split == "test").mean() - 0.2) < 0.05
    assert abs((split == "validation").mean() - 0.2) < 0.05


def test_assign_splits_same_seed_same_split():
    records = _records()
    assert assign_splits(records, seed=5).equals(assign_splits(records, seed=5))
    assert not assign_splits(records, seed=5).equals(assign_splits(records, seed=6))


def test_assign_splits_one_class_error():
    records = _records().assign(label=0)
    with pytest.raises(ValueError, match="only one class"):
        assign_splits(records)


def test_assign_splits_too_few_groups_error():
    records = pd.DataFrame({"image_id": ["a", "b", "c"], "group": ["g1", "g2", "g3"], "label": [0, 1, 0]})
    with pytest.raises(ValueError, match="Cannot split 3 groups"):
        assign_splits(records)


def test_split_fractions_invalid():
    with pytest.raises(ValueError, match="Invalid test fraction 1.5"):
        SplitFractions(validation=0.1, test=1.5)
    with pytest.raises(ValueError, match="add up to 0.95"):
        SplitFractions(validation=0.5, test=0.45)


def test_manifest_round_trip(tmp_path):
    records = _records()
    split = assign_splits(records)
    write_manifest(records, split, tmp_path / "manifest.parquet")
    manifest = read_manifest(tmp_path / "manifest.parquet")
    assert manifest["split"].tolist() == split.tolist()
    assert list(manifest.columns) == ["image_id", "group", "label", "split"]
