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


def test_dry_run_prints_asha_rungs(tmp_path, capsys):
    status, out, _ = _run(capsys, ["search", "--data", str(_image_folders(tmp_path)), "--max-epochs", "16",
                                   "--grace-period", "1", "--reduction-factor", "4", "--dry-run"])

    assert status == 0
    assert "ASHA rungs at epochs 1, 4 of 16: the top 1/4 of each rung goes on, once 4 trials" in out


def test_dry_run_prints_fifo(tmp_path, capsys):
    status, out, _ = _run(capsys, ["search", "--data", str(_image_folders(tmp_path)), "--scheduler", "fifo",
                                   "--max-epochs", "5", "--dry-run"])

    assert status == 0
    assert "FIFO scheduler: every trial runs all 5 epochs." in out


def _image_folders(tmp_path):
    for label, count in (("melanoma", 3), ("nevus", 5)):
        (tmp_path / label).mkdir(parents=True)
        for index in range(count):
            (tmp_path / label / f"{label}_{index}.jpg").write_bytes(b"not decoded by a dry run")
    return tmp_path


def test_dry_run_gpu_memory_fits_share(tmp_path, capsys):
    status, out, err = _run(capsys, ["search", "--data", str(_image_folders(tmp_path)), "--backbones", "ResNet50",
                                     "--gpus-per-trial", "0.25", "--gpu-memory-gib", "80", "--dry-run"])

    assert status == 0
    assert "gpu_memory_gib: 80.0" in out
    assert "# GPU memory per trial: estimated 19.0 GiB for ResNet50 at 224 px with batch size 64 in float32, which " \
           "fits in the share of 20.0 GiB (resources.gpus_per_trial 0.25 x 80.0 GiB per GPU from " \
           "resources.gpu_memory_gib)." in out
    assert "warning" not in err


def test_dry_run_gpu_memory_warning(tmp_path, capsys):
    (tmp_path / "e.yaml").write_text("resources: {gpus_per_trial: 0.125, gpu_memory_gib: 80}\n")
    status, out, err = _run(capsys, ["search", "--config", str(tmp_path / "e.yaml"), "--data",
                                     str(_image_folders(tmp_path / "data")), "--backbones", "ResNet50", "--dry-run"])

    assert status == 0
    assert "exceeds the share of 10.0 GiB" in out
    assert err.startswith("lesiontune: warning: The largest configuration in the space, ResNet50 at 224 px with batch "
                          "size 64 in float32, needs an estimated 19.0 GiB of GPU memory.")
    assert "raise resources.gpus_per_trial to 0.25" in err


def test_dry_run_gpu_memory_unknown(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("search.resources.shutil.which", lambda name: None)

    status, out, _ = _run(capsys, ["search", "--data", str(_image_folders(tmp_path)), "--backbones", "MobileNetV2",
                                   "--gpus-per-trial", "0.5", "--dry-run"])

    assert status == 0
    assert "not checked because the GPU's memory is unknown" in out
    assert "Set resources.gpu_memory_gib (--gpu-memory-gib) to check it." in out


def test_search_invalid_gpu_memory(tmp_path, capsys):
    status, _, err = _run(capsys, ["search", "--data", str(tmp_path), "--gpu-memory-gib", "0", "--dry-run"])

    assert status == 2
    assert "invalid value 0.0 for resources.gpu_memory_gib" in err


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real ISIC images) is absent")
def test_data_inspect_ham10000(capsys):
    status, out, _ = _run(capsys, ["data", "inspect", "--json", str(SHARED_DATA / "ham10000")])
    assert status == 0
    assert '"positive": 1113' in out
    assert '"positive_groups": 614' in out
