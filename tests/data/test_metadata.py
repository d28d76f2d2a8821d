"""Tests for the metadata readers and the label policy."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data.labels import Outcome, label_current_isic, label_ham10000, label_legacy_isic
from data.metadata import DataError, load_dataset

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 120, dtype=np.uint8)).save(path)


def _isic_folder(tmp_path: Path, rows: list[dict], *, images: list[str] | None = None, text: str | None = None) -> Path:
    frame = pd.DataFrame(rows)
    if text is None:
        frame.to_csv(tmp_path / "metadata.csv", index=False)
    else:
        (tmp_path / "metadata.csv").write_bytes(text.encode("utf-8"))
    for image_id in images if images is not None else frame["isic_id"]:
        _write_image(tmp_path / f"{image_id}.jpg")
    return tmp_path


def test_label_current_isic_melanoma_policy():
    melanoma = label_current_isic("Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma in situ",
                                  positive_class="melanoma")
    carcinoma = label_current_isic("Malignant", "Malignant adnexal epithelial proliferations - Follicular",
                                   "Basal cell carcinoma", positive_class="melanoma")
    assert melanoma.outcome is Outcome.POSITIVE
    assert carcinoma.outcome is Outcome.NEGATIVE
    assert label_current_isic("Malignant", None, "Basal cell carcinoma", positive_class="malignant").outcome \
        is Outcome.POSITIVE


def test_label_current_isic_indeterminate_excluded():
    decision = label_current_isic("Indeterminate", None, None, positive_class="melanoma")
    assert decision.outcome is Outcome.EXCLUDED
    assert decision.reason == "indeterminate diagnosis"
    assert label_current_isic(None, None, None, positive_class="melanoma").reason == "missing diagnosis"


def test_label_legacy_isic_cases():
    assert label_legacy_isic("malignant", "melanoma", positive_class="melanoma").outcome is Outcome.POSITIVE
    assert label_legacy_isic("benign", None, positive_class="melanoma").outcome is Outcome.NEGATIVE
    assert label_legacy_isic("malignant", "basal cell carcinoma", positive_class="melanoma").outcome is Outcome.NEGATIVE
    assert label_legacy_isic("malignant", "basal cell carcinoma", positive_class="malignant").outcome is Outcome.POSITIVE
    assert label_legacy_isic("indeterminate/benign", None, positive_class="melanoma").outcome is Outcome.EXCLUDED
    assert label_legacy_isic(None, None, positive_class="melanoma").outcome is Outcome.EXCLUDED


def test_label_ham10000_policies():
    assert label_ham10000("mel", positive_class="melanoma").outcome is Outcome.POSITIVE
    assert label_ham10000("bcc", positive_class="melanoma").outcome is Outcome.NEGATIVE
    assert label_ham10000("bcc", positive_class="malignant").outcome is Outcome.POSITIVE
    assert label_ham10000("xyz", positive_class="melanoma").reason == "unknown dx 'xyz'"


def test_load_dataset_legacy_columns_counts_exclusions(tmp_path):
    rows = [
        {"isic_id": "ISIC_1", "benign_malignant": "malignant", "diagnosis": "melanoma"},
        {"isic_id": "ISIC_2", "benign_malignant": "benign", "diagnosis": "nevus"},
        {"isic_id": "ISIC_3", "benign_malignant": "indeterminate", "diagnosis": ""},
        {"isic_id": "ISIC_4", "benign_malignant": "benign", "diagnosis": "nevus"},
        {"isic_id": "../escape", "benign_malignant": "benign", "diagnosis": "nevus"},
    ]
    folder = _isic_folder(tmp_path, rows, images=["ISIC_1", "ISIC_2", "ISIC_3"])
    dataset = load_dataset(folder)
    summary = dataset.summary()
    assert summary["images"] == 2
    assert summary["positive"] == 1
    assert summary["excluded_by_reason"] == {"indeterminate diagnosis": 1, "image file not found": 1,
                                             "invalid image id": 1}
    assert dataset.group_column is None
    assert list(dataset.records["group"]) == list(dataset.records["image_id"])


def test_load_dataset_current_columns_groups_by_patient(tmp_path):
    rows = [
        {"isic_id": "ISIC_1", "patient_id": "P1", "lesion_id": "L1", "diagnosis_1": "Malignant",
         "diagnosis_2": "Malignant melanocytic proliferations (Melanoma)", "diagnosis_3": "Melanoma Invasive"},
        {"isic_id": "ISIC_2", "patient_id": "P1", "lesion_id": "L2", "diagnosis_1": "Benign",
         "diagnosis_2": "Benign melanocytic proliferations", "diagnosis_3": "Nevus"},
    ]
    dataset = load_dataset(_isic_folder(tmp_path, rows))
    assert dataset.group_column == "patient_id"
    assert set(dataset.records["group"]) == {"P1"}
    assert dataset.records.set_index("image_id")["label"].to_dict() == {"ISIC_1": 1, "ISIC_2": 0}


def test_load_dataset_semicolon_bom_decimal_comma(tmp_path):
    text = "\ufeffisic_id;benign_malignant;diagnosis;age_approx\nISIC_1;malignant;melanoma;55,5\nISIC_2;benign;nevus;30\n"
    dataset = load_dataset(_isic_folder(tmp_path, [], images=["ISIC_1", "ISIC_2"], text=text))
    assert dataset.records["age_approx"].tolist() == [55.5, 30.0]


def test_load_dataset_no_metadata_error(tmp_path):
    with pytest.raises(DataError, match="No metadata found in .*expected metadata.csv"):
        load_dataset(tmp_path)


def test_load_dataset_missing_path_error(tmp_path):
    with pytest.raises(DataError, match="does not exist. Pass --data"):
        load_dataset(tmp_path / "nowhere")


def test_load_dataset_no_label_column_error(tmp_path):
    folder = _isic_folder(tmp_path, [{"isic_id": "ISIC_1", "sex": "male"}])
    with pytest.raises(DataError, match="has no known label column: expected diagnosis_1"):
        load_dataset(folder)


def test_load_dataset_invalid_positive_class(tmp_path):
    with pytest.raises(ValueError, match="Invalid positive class 'nevus'"):
        load_dataset(tmp_path, positive_class="nevus")


def test_load_dataset_class_folders(tmp_path):
    for name in ("benign/a.png", "benign/b.png", "melanoma/c.png"):
        _write_image(tmp_path / name)
    dataset = load_dataset(tmp_path)
    assert dataset.layout == "class-folders"
    assert dataset.records.set_index("image_id")["label"].to_dict() == {"a": 0, "b": 0, "c": 1}


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real ISIC images) is absent")
def test_load_dataset_shared_counts():
    cc0 = load_dataset(SHARED_DATA / "isic-cc0-550").summary()
    ham = load_dataset(SHARED_DATA / "ham10000").summary()
    assert (cc0["images"], cc0["positive"], cc0["excluded"]) == (550, 153, 0)
    assert (ham["images"], ham["positive"], ham["positive_groups"], ham["groups"]) == (10015, 1113, 614, 7470)
    assert ham["group_column"] == "lesion_id"


def _placeholder_images(folder: Path, image_ids, suffix: str = ".jpg") -> None:
    """Create one hard link per id: loading metadata checks only that image files exist."""
    folder.mkdir(parents=True, exist_ok=True)
    original = folder / "placeholder.bin"
    original.write_bytes(b"\xff")
    for image_id in image_ids:
        os.link(original, folder / f"{image_id}{suffix}")


def test_load_dataset_malignant_collision(tmp_path):
    rows = [
        {"isic_id": "ISIC_1", "diagnosis_1": "Malignant",
         "diagnosis_2": "Collision - At least one malignant proliferation"},
        {"isic_id": "ISIC_2", "diagnosis_1": "Malignant", "diagnosis_2": "Malignant epidermal proliferations"},
        {"isic_id": "ISIC_3", "diagnosis_1": "Benign", "diagnosis_2": "Benign melanocytic proliferations"},
        {"isic_id": "ISIC_4", "diagnosis_1": "Malignant", "diagnosis_3": "Melanoma in situ"},
    ]
    folder = _isic_folder(tmp_path, rows)
    melanoma = load_dataset(folder, positive_class="melanoma")
    malignant = load_dataset(folder, positive_class="malignant")
    assert melanoma.records.set_index("image_id")["label"].to_dict() == {"ISIC_2": 0, "ISIC_3": 0, "ISIC_4": 1}
    assert melanoma.summary()["excluded_by_reason"] == {"unspecified malignant diagnosis": 1}
    assert malignant.records.set_index("image_id")["label"].to_dict() == {"ISIC_1": 1, "ISIC_2": 1, "ISIC_3": 0,
                                                                          "ISIC_4": 1}


@pytest.mark.skipif(not (SHARED_DATA / "metadata").is_dir(), reason="../shared/data/metadata is absent")
def test_load_dataset_isic2020_shared_rows(tmp_path):
    truth = pd.read_csv(SHARED_DATA / "metadata" / "ISIC_2020_Training_GroundTruth.csv", dtype=str)
    head = pd.concat([truth[truth["target"] == "1"].head(20), truth[truth["target"] == "0"].head(280)])
    head.to_csv(tmp_path / "ISIC_2020_Training_GroundTruth.csv", index=False)
    _placeholder_images(tmp_path / "train", head["image_name"])
    dataset = load_dataset(tmp_path, layout="isic2020")
    assert dataset.group_column == "patient_id"
    assert len(dataset.records) == 300
    assert dataset.records["label"].sum() == 20
    assert dataset.records["group"].nunique() == head["patient_id"].nunique()


@pytest.mark.skipif(not (SHARED_DATA / "metadata").is_dir(), reason="../shared/data/metadata is absent")
def test_load_dataset_isic2019_shared_rows(tmp_path):
    truth = pd.read_csv(SHARED_DATA / "metadata" / "ISIC_2019_Training_GroundTruth.csv", dtype=str).head(400)
    truth.to_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", index=False)
    _placeholder_images(tmp_path / "ISIC_2019_Training_Input", truth["image"])
    melanoma = load_dataset(tmp_path, layout="isic2019")
    malignant = load_dataset(tmp_path, layout="isic2019", positive_class="malignant")
    one_hot = truth.set_index("image").astype(float)
    assert melanoma.records["label"].sum() == one_hot["MEL"].sum()
    assert malignant.records["label"].sum() == one_hot[["MEL", "BCC", "AK", "SCC"]].sum().sum()
    assert len(melanoma.excluded) == 0
