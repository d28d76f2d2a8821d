import json

import pytest

from results.analysis import best_checkpoint
from results.model_export import export_model


def test_export_model_writes_folder(evaluated_run, tmp_path):
    folder = export_model(evaluated_run, "aaaa", tmp_path / "model")

    assert sorted(p.name for p in folder.iterdir()) == ["MODEL_CARD.md", "model.keras", "preprocessing.json",
                                                         "threshold.json"]
    checkpoint = best_checkpoint(evaluated_run, "aaaa1111")
    threshold = json.loads((folder / "threshold.json").read_text())
    assert threshold["threshold"] == checkpoint.threshold
    assert threshold["epoch"] == 2
    preprocessing = json.loads((folder / "preprocessing.json").read_text())
    assert preprocessing["image_size"] == 32
    assert preprocessing["resize_rule"] == "center_crop"
    assert preprocessing["input"]["pixel_range"] == [0, 255]
    assert preprocessing["backbone_preprocessing"]["mode"] == "tf"


def test_export_model_card_has_test_metrics(evaluated_run, tmp_path):
    card = (export_model(evaluated_run, "aaaa1111", tmp_path / "model") / "MODEL_CARD.md").read_text()

    for heading in ("## Model", "## Data", "## Search", "## Metrics", "## Subgroups (test split)", "## Known limits"):
        assert heading in card
    assert "| auc |" in card
    assert "bootstrap over groups (50 resamples)" in card
    assert "| no diagnosis | 2 |" in card
    assert "| test | 16 | 4 | 12 | 8 |" in card


def test_export_model_card_without_evaluation(synthetic_run, tmp_path):
    card = (export_model(synthetic_run, "bbbb2222", tmp_path / "model") / "MODEL_CARD.md").read_text()

    assert "Not evaluated on the test split" in card
    assert "## Subgroups" not in card


def test_export_model_rejects_non_empty_folder(synthetic_run, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old.txt").write_text("x")

    with pytest.raises(ValueError, match="already exists and is not empty"):
        export_model(synthetic_run, "aaaa1111", tmp_path / "model")


def test_export_model_accepts_empty_folder(synthetic_run, tmp_path):
    (tmp_path / "model").mkdir()

    assert (export_model(synthetic_run, "aaaa1111", tmp_path / "model") / "model.keras").is_file()


def test_export_model_rejects_trial_without_checkpoint(synthetic_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="Trial dddd4444 has no checkpoint"):
        export_model(synthetic_run, "dddd4444", tmp_path / "model")
    assert not (tmp_path / "model").exists()
