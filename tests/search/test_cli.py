"""The command line turns bad input into one clear line on stderr, with no traceback."""

from pathlib import Path

import pandas as pd
import pytest

from search.cli import main, search_main

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _run(capsys, argv, entry=main):
    status = entry(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_search_data_without_metadata(tmp_path, capsys):
    status, _, err = _run(capsys, ["search", "--data", str(tmp_path), "--storage-path", str(tmp_path / "runs"),
                                   "--name", "x"])
    assert status == 2
    assert err.startswith("lesiontune: error: No metadata found in")
    assert "Traceback" not in err


def test_search_metadata_without_label_column(tmp_path, capsys):
    pd.DataFrame({"isic_id": ["ISIC_1"], "sex": ["male"]}).to_csv(tmp_path / "metadata.csv", index=False)
    status, _, err = _run(capsys, ["search", "--data", str(tmp_path), "--storage-path", str(tmp_path / "runs")])
    assert status == 2
    assert "has no known label column" in err


def test_search_unknown_yaml_key(tmp_path, capsys):
    (tmp_path / "e.yaml").write_text("search: {num_trials: 3}\n")
    status, _, err = _run(capsys, ["search", "--config", str(tmp_path / "e.yaml"), "--data", str(tmp_path)])
    assert status == 2
    assert "unknown key 'search.num_trials'" in err


def test_search_unknown_backbone(tmp_path, capsys):
    status, _, err = _run(capsys, ["search", "--data", str(tmp_path), "--backbones", "ResNet5"])
    assert status == 2
    assert "invalid value 'ResNet5' for space.backbone[0]" in err


def test_search_learning_rate_low_above_high(tmp_path, capsys):
    (tmp_path / "e.yaml").write_text("space: {learning_rate: {low: 0.1, high: 0.001, log: true}}\n")
    status, _, err = _run(capsys, ["search", "--config", str(tmp_path / "e.yaml"), "--data", str(tmp_path)])
    assert status == 2
    assert "low 0.1 is greater than high 0.001" in err


def test_python_m_search_dry_run(tmp_path, capsys):
    for label, count in (("melanoma", 3), ("nevus", 5)):
        (tmp_path / label).mkdir()
        for index in range(count):
            (tmp_path / label / f"{label}_{index}.jpg").write_bytes(b"not decoded by a dry run")

    status, out, _ = _run(capsys, ["--data", str(tmp_path), "--backbones", "MobileNetV2", "--image-size", "64",
                                   "--dry-run"], entry=search_main)

    assert status == 0
    assert "backbone: MobileNetV2" in out
    assert "image_size: 64" in out
    assert "image cache for 8 images" in out
    assert "trials at once, limited by cpu" in out or "1 trial at once" in out


def test_dry_run_names_conditional_parameters(tmp_path, capsys):
    status, out, err = _run(capsys, ["search", "--data", str(tmp_path), "--backbones", "MobileNetV2",
                                     "--image-size", "64", "--dry-run"])

    assert "Drawn only where they change the trial" in out
    assert "In this space: smote_k." in out
    assert status == 2
    assert str(tmp_path) in err


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real ISIC images) is absent")
def test_data_inspect_ham10000(capsys):
    status, out, _ = _run(capsys, ["data", "inspect", "--json", str(SHARED_DATA / "ham10000")])
    assert status == 0
    assert '"positive": 1113' in out
    assert '"positive_groups": 614' in out
