"""End-to-end searches on the real ISIC images in ../shared/data (minutes each)."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real ISIC images) is absent"),
]


def _search(tmp_path: Path, data: Path, *options: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "LESIONTUNE_CACHE": os.environ.get("LESIONTUNE_CACHE", str(tmp_path / "cache"))}
    command = [sys.executable, "-m", "search", "--data", str(data), "--weights", "none",
               "--storage-path", str(tmp_path / "runs"), "--quiet", *options]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def test_search_isic_cc0_smoke(tmp_path):
    completed = _search(tmp_path, SHARED_DATA / "isic-cc0-550", "--backbones", "MobileNetV2", "EfficientNetV2B0",
                        "--image-size", "64", "--num-samples", "8", "--max-epochs", "4", "--name", "smoke")
    run = tmp_path / "runs" / "smoke"
    trials = pd.read_parquet(run / "trials.parquet")
    schema = pq.read_schema(run / "trials.parquet")

    assert len(trials) == 8
    assert (trials["status"] == "TERMINATED").all(), trials[["trial_id", "status", "error"]]
    assert trials["stopped_early"].any(), "ASHA stopped no trial early"
    assert (trials.loc[trials["stopped_early"], "epochs_run"] < 4).all()
    assert str(schema.field("backbone").type) == "string"
    assert str(schema.field("balancing").type) == "string"
    assert str(schema.field("unfrozen_layers").type) == "int64"
    assert str(schema.field("augmentation_intensity").type) == "double"
    assert str(schema.field("learning_rate").type) == "double"
    assert set(trials["backbone"]) <= {"MobileNetV2", "EfficientNetV2B0"}
    assert trials["best_objective"].between(0, 0.2).all()
    assert "Top 8 of 8 trials by val_pauc80" in completed.stdout

    report = pd.read_parquet(run / "data_report.parquet")
    splits = report[report["section"] == "split"].set_index("name")
    assert splits["images"].sum() == 550
    assert report.loc[(report["section"] == "class") & (report["name"] == "positive"), "images"].item() == 153
    assert "Data: 550 images, 153 positive (melanoma)" in completed.stdout

    epochs = pd.read_parquet(run / "epochs.parquet")
    assert len(epochs) == trials["epochs_run"].sum()
    assert (run / "lesiontune_config.yaml").is_file()


def test_search_ham10000_lesion_grouped(tmp_path):
    _search(tmp_path, SHARED_DATA / "ham10000", "--backbones", "MobileNetV2", "--image-size", "32",
            "--num-samples", "2", "--max-epochs", "1", "--name", "ham")
    run = tmp_path / "runs" / "ham"
    manifest = pd.read_parquet(run / "manifest.parquet")
    metadata = pd.read_csv(SHARED_DATA / "ham10000" / "HAM10000_metadata.csv")
    lesion_of = metadata.set_index("image_id")["lesion_id"]

    splits_per_lesion = manifest.assign(lesion=manifest["image_id"].map(lesion_of)).groupby("lesion")["split"].nunique()
    assert len(manifest) == 10015
    assert splits_per_lesion.max() == 1
    assert manifest["group"].str.startswith("HAM_").all()
    assert len(pd.read_parquet(run / "trials.parquet")) == 2
