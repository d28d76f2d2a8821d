"""Tests for the dataset report of ``lesiontune data inspect``."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data.inspect import format_report, inspect_dataset
from data.metadata import load_dataset

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MELANOMA = ("Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma Invasive")
NEVUS = ("Benign", "Benign melanocytic proliferations", "Nevus")


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)


@pytest.fixture
def dataset(tmp_path):
    """Six images of three patients (one with both classes), an indeterminate row, a copy, a corrupt file."""
    rows = [
        ("ISIC_1", "P1", MELANOMA, "male", "55", "head/neck"),
        ("ISIC_2", "P1", NEVUS, "male", "55", "posterior torso"),
        ("ISIC_3", "P2", NEVUS, "female", "", "posterior torso"),
        ("ISIC_4", "P2", NEVUS, "female", "40", ""),
        ("ISIC_5", "P3", MELANOMA, "", "70", "upper extremity"),
        ("ISIC_6", "P3", MELANOMA, "", "70", "upper extremity"),
        ("ISIC_7", "P3", ("Indeterminate",) + ("",) * 2, "", "70", ""),
    ]
    frame = pd.DataFrame([{"isic_id": image_id, "patient_id": patient, "diagnosis_1": levels[0],
                           "diagnosis_2": levels[1], "diagnosis_3": levels[2], "sex": sex, "age_approx": age,
                           "anatom_site_general": site}
                          for image_id, patient, levels, sex, age, site in rows])
    frame.to_csv(tmp_path / "metadata.csv", index=False)
    for number in range(1, 5):
        _image(number, (120, 90) if number < 4 else (64, 48)).save(tmp_path / f"ISIC_{number}.jpg", quality=95)
    Image.open(tmp_path / "ISIC_2.jpg").save(tmp_path / "ISIC_5.png")
    (tmp_path / "ISIC_6.jpg").write_bytes(b"not an image")
    _image(7, (120, 90)).save(tmp_path / "ISIC_7.jpg")
    return load_dataset(tmp_path)


def test_inspect_dataset_counts(dataset):
    report = inspect_dataset(dataset, image_stats=False)
    assert (report["images"], report["positive"], report["negative"]) == (6, 3, 3)
    assert report["excluded_by_reason"] == {"indeterminate diagnosis": 1}
    assert report["groups"] == 3
    assert report["groups_detail"] == {"images_per_group": {"min": 2, "median": 2, "max": 2},
                                       "groups_with_both_classes": 1}
    assert report["diagnoses"] == {"Melanoma Invasive": {"images": 3, "positive": 3},
                                   "Nevus": {"images": 3, "positive": 0}}
    assert report["sex"] == {"male": 2, "female": 2, "missing": 2}
    assert report["anatom_site"] == {"posterior torso": 2, "upper extremity": 2, "head/neck": 1, "missing": 1}
    assert report["age_approx"] == {"min": 40, "median": 55, "max": 70, "missing": 1}
    assert "image_sizes" not in report
    assert "duplicates" not in report
    json.dumps(report)


def test_inspect_dataset_image_sizes(dataset):
    sizes = inspect_dataset(dataset)["image_sizes"]
    assert (sizes["checked"], sizes["sampled"], sizes["unreadable"]) == (6, False, 1)
    assert sizes["unreadable_examples"][0].startswith("ISIC_6: UnidentifiedImageError")
    assert sizes["width"] == {"min": 64, "median": 120, "max": 120}
    assert sizes["height"] == {"min": 48, "median": 90, "max": 90}
    assert sizes["most_common"] == [{"width": 120, "height": 90, "images": 4},
                                    {"width": 64, "height": 48, "images": 1}]


def test_inspect_dataset_image_sample(dataset):
    first = inspect_dataset(dataset, sample=3, seed=1)["image_sizes"]
    assert (first["checked"], first["sampled"]) == (3, True)
    assert inspect_dataset(dataset, sample=3, seed=1)["image_sizes"] == first
    assert inspect_dataset(dataset, sample=100)["image_sizes"]["sampled"] is False


def test_inspect_dataset_duplicates(dataset):
    found = inspect_dataset(dataset, image_stats=False, duplicates=True, workers=1)["duplicates"]
    assert found == {"exact_pairs": 1, "near_pairs": 0, "images_with_duplicates": 2, "pairs_across_groups": 1,
                     "pairs_with_different_labels": 1, "groups_after_merging": 2}


def test_inspect_dataset_given_duplicates(dataset):
    pairs = pd.DataFrame({"image_id": ["ISIC_4", "ISIC_9"], "duplicate_of": ["ISIC_3", "ISIC_1"],
                          "kind": ["near", "near"], "distance": [10, 12]})
    found = inspect_dataset(dataset, image_stats=False, duplicates=pairs)["duplicates"]
    assert found == {"exact_pairs": 0, "near_pairs": 1, "images_with_duplicates": 2, "pairs_across_groups": 0,
                     "pairs_with_different_labels": 0, "groups_after_merging": 3}


def test_inspect_dataset_invalid_arguments(dataset):
    with pytest.raises(ValueError, match="Invalid sample 0: expected a positive number of images"):
        inspect_dataset(dataset, sample=0)
    with pytest.raises(TypeError, match="Invalid duplicates str: expected True, False or the DataFrame"):
        inspect_dataset(dataset, duplicates="yes")


def test_format_report_lines(dataset):
    text = format_report(inspect_dataset(dataset, duplicates=True))
    labels = [line.split("  ")[0] for line in text.splitlines()]
    assert labels == ["Dataset", "Images", "Positive", "Groups", "Excluded", "Diagnoses", "Sex", "Site",
                      "Age (years)", "Image size", "Duplicates"]
    assert "Positive     3 melanoma images of 2 patients" in text
    assert "Excluded     1: indeterminate diagnosis 1" in text
    assert "most common 120x90 (4), 64x48 (1); 1 unreadable" in text
    assert "1 exact and 0 near pairs of 2 images" in text


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real ISIC images) is absent")
def test_inspect_dataset_shared_data():
    ham = inspect_dataset(load_dataset(SHARED_DATA / "ham10000"), sample=500)
    assert "Positive     1,113 melanoma images of 614 lesions" in format_report(ham)
    assert ham["diagnoses"]["mel"] == {"images": 1113, "positive": 1113}
    assert ham["image_sizes"]["most_common"] == [{"width": 200, "height": 150, "images": 500}]

    cc0 = inspect_dataset(load_dataset(SHARED_DATA / "isic-cc0-550"))
    assert "Images       550: 153 positive (melanoma), 397 negative" in format_report(cc0)
    assert cc0["image_sizes"]["most_common"] == [{"width": 250, "height": 250, "images": 550}]
