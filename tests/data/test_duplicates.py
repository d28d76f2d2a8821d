"""Tests for exact and near-duplicate detection and for merging duplicate groups."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data.duplicates import (
    DEFAULT_MAX_DISTANCE,
    DUPLICATE_COLUMNS,
    HASH_BITS,
    compute_array_hashes,
    compute_image_hashes,
    find_duplicates,
    hamming_distance,
    merge_duplicate_groups,
    perceptual_hash,
)
from data.splits import assign_splits

HAM10000 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ham10000"


def _smooth_image(seed: int) -> Image.Image:
    """Make a (96, 128, 3) uint8 image of random blobs, distinct for each seed.

    The blobs come from 24 x 32 random pixels, so that the 16 x 16 frequencies of the hash carry signal. From
    6 x 8 pixels, a resized, re-encoded copy differed from its original in up to 40 bits.
    """
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8))
    return coarse.resize((128, 96), Image.Resampling.BICUBIC)


def _records(tmp_path: Path, images: dict[str, Image.Image], suffix: str = ".png", **save_options) -> pd.DataFrame:
    rows = []
    for image_id, image in images.items():
        path = tmp_path / f"{image_id}{suffix}"
        image.save(path, **save_options)
        rows.append({"image_id": image_id, "path": str(path), "group": f"G_{image_id}", "label": 0})
    return pd.DataFrame(rows)


def _reencoded_copy(image: Image.Image, path: Path) -> Path:
    smaller = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.BILINEAR)
    smaller.save(path, quality=75)
    return path


@pytest.fixture
def library(tmp_path) -> pd.DataFrame:
    """Five images: an original, its exact copy (as PNG of the same pixels), a re-encoded resized copy, and two
    unrelated images."""
    original = _smooth_image(0)
    records = _records(tmp_path, {"original": original, "exact_copy": original.copy(),
                                  "other_a": _smooth_image(1), "other_b": _smooth_image(2)})
    near_path = _reencoded_copy(original, tmp_path / "near_copy.jpg")
    near = pd.DataFrame([{"image_id": "near_copy", "path": str(near_path), "group": "G_near_copy", "label": 1}])
    return pd.concat([records, near], ignore_index=True)


def test_find_duplicates_exact_and_near(library):
    duplicates = find_duplicates(library, workers=2)
    assert list(duplicates.columns) == list(DUPLICATE_COLUMNS)
    rows = {(row.image_id, row.duplicate_of): row for row in duplicates.itertuples()}
    assert set(rows) == {("exact_copy", "original"), ("near_copy", "original")}
    assert rows[("exact_copy", "original")].kind == "exact"
    assert rows[("exact_copy", "original")].distance == 0
    assert rows[("near_copy", "original")].kind == "near"
    assert 0 < rows[("near_copy", "original")].distance <= DEFAULT_MAX_DISTANCE


def test_find_duplicates_unrelated_images(library):
    duplicates = find_duplicates(library, workers=1)
    listed = set(duplicates["image_id"]) | set(duplicates["duplicate_of"])
    assert "other_a" not in listed
    assert "other_b" not in listed


def test_find_duplicates_exact_across_formats(tmp_path):
    jpeg = tmp_path / "a.jpg"
    _smooth_image(3).save(jpeg, quality=90)
    Image.open(jpeg).convert("RGB").save(tmp_path / "b.png")
    records = pd.DataFrame({"image_id": ["a", "b"], "path": [str(jpeg), str(tmp_path / "b.png")]})
    duplicates = find_duplicates(records, max_distance=0)
    assert duplicates[["image_id", "duplicate_of", "kind"]].values.tolist() == [["b", "a", "exact"]]


def test_find_duplicates_zero_distance_exact_only(library):
    duplicates = find_duplicates(library, max_distance=0)
    assert set(duplicates["kind"]) == {"exact"}
    assert duplicates["image_id"].tolist() == ["exact_copy"]


def test_find_duplicates_unreadable_file_skipped(library, tmp_path, caplog):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    records = pd.concat([library, pd.DataFrame([{"image_id": "broken", "path": str(broken), "group": "G",
                                                 "label": 0}])], ignore_index=True)
    with caplog.at_level(logging.WARNING, logger="data.duplicates"):
        duplicates = find_duplicates(records)
    assert "1 images could not be decoded" in caplog.text
    assert "broken" not in set(duplicates["image_id"]) | set(duplicates["duplicate_of"])
    assert len(duplicates) == 2


def test_find_duplicates_reuses_hashes(library):
    hashes = compute_image_hashes(library["path"].tolist(), library["image_id"].tolist(), workers=1)
    assert find_duplicates(library, hashes=hashes).equals(find_duplicates(library))
    with pytest.raises(ValueError, match="hashes has no row for image 'original'"):
        find_duplicates(library, hashes=hashes[hashes["image_id"] != "original"])


def test_find_duplicates_invalid_arguments(library):
    with pytest.raises(ValueError, match=f"Invalid max_distance 300: expected a number of bits from 0 to {HASH_BITS}"):
        find_duplicates(library, max_distance=300)
    with pytest.raises(ValueError, match="records is missing the column.s. path; it has image_id"):
        find_duplicates(library[["image_id"]])
    with pytest.raises(ValueError, match="Invalid workers 0: expected a positive number of threads"):
        find_duplicates(library, workers=0)
    with pytest.raises(ValueError, match="Got 2 paths but 1 image ids"):
        compute_image_hashes(["a.png", "b.png"], ["a"])


def test_compute_image_hashes_columns(library):
    hashes = compute_image_hashes(library["path"].tolist(), library["image_id"].tolist(), workers=2)
    assert hashes["image_id"].tolist() == library["image_id"].tolist()
    assert (hashes["width"].iloc[:4] == 128).all()
    assert (hashes["height"].iloc[:4] == 96).all()
    assert hashes["phash"].str.len().eq(HASH_BITS // 4).all()
    assert (hashes["error"] == "").all()
    assert hashes["pixel_hash"].iloc[0] == hashes["pixel_hash"].iloc[1]


def test_compute_array_hashes_match_files(library):
    png_rows = library.iloc[:4]
    arrays = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in png_rows["path"]])
    from_arrays = compute_array_hashes(arrays, png_rows["image_id"].tolist(), workers=2)
    from_files = compute_image_hashes(png_rows["path"].tolist(), png_rows["image_id"].tolist(), workers=2)
    assert from_arrays.equals(from_files)
    duplicates = find_duplicates(png_rows, hashes=from_arrays)
    assert duplicates[["image_id", "duplicate_of", "kind"]].values.tolist() == [["exact_copy", "original", "exact"]]


def test_compute_array_hashes_invalid_pixels():
    with pytest.raises(ValueError, match=r"Invalid pixels of image 'gray': got uint8 \(4, 4\), expected"):
        compute_array_hashes([np.zeros((4, 4), dtype=np.uint8)], ["gray"])
    with pytest.raises(ValueError, match="Got 1 images but 2 image ids"):
        compute_array_hashes(np.zeros((1, 4, 4, 3), dtype=np.uint8), ["a", "b"])


def test_perceptual_hash_resize_and_unrelated():
    image = _smooth_image(4)
    same = perceptual_hash(image)
    resized = perceptual_hash(image.resize((200, 150), Image.Resampling.LANCZOS))
    grayscale = perceptual_hash(image.convert("L"))
    unrelated = perceptual_hash(_smooth_image(5))
    assert 0 <= same < 2 ** HASH_BITS
    assert hamming_distance(same, resized) <= 8
    assert hamming_distance(same, grayscale) == 0
    assert hamming_distance(same, unrelated) > DEFAULT_MAX_DISTANCE * 2


def test_merge_duplicate_groups_union_find():
    records = pd.DataFrame({"image_id": ["a", "b", "c", "d", "e", "f"],
                            "group": ["g3", "g1", "g2", "g2", "g4", "g5"], "label": [0, 1, 0, 0, 1, 0]})
    duplicates = pd.DataFrame({"image_id": ["a", "c", "x"], "duplicate_of": ["b", "a", "e"],
                               "kind": ["near", "exact", "near"], "distance": [4, 0, 2]})
    merged = merge_duplicate_groups(records, duplicates)
    assert merged["group"].tolist() == ["g1", "g1", "g1", "g1", "g4", "g5"]
    assert merged.drop(columns="group").equals(records.drop(columns="group"))
    assert records["group"].tolist() == ["g3", "g1", "g2", "g2", "g4", "g5"]
    reversed_pairs = duplicates.iloc[::-1].rename(columns={"image_id": "duplicate_of", "duplicate_of": "image_id"})
    assert merge_duplicate_groups(records, reversed_pairs)["group"].tolist() == merged["group"].tolist()


def test_merge_duplicate_groups_no_pairs():
    records = pd.DataFrame({"image_id": ["a", "b"], "group": ["g1", "g2"]})
    empty = pd.DataFrame(columns=list(DUPLICATE_COLUMNS))
    assert merge_duplicate_groups(records, empty)["group"].tolist() == ["g1", "g2"]


def test_merge_then_split_copies_together():
    rng = np.random.default_rng(0)
    for seed in range(5):
        records = pd.DataFrame({"image_id": [f"I{i}" for i in range(600)],
                                "group": [f"G{i // 2}" for i in range(600)],
                                "label": (rng.random(600) < 0.2).astype("int8")})
        pairs = rng.choice(600, size=(60, 2), replace=False)
        duplicates = pd.DataFrame({"image_id": [f"I{i}" for i in pairs[:, 0]],
                                   "duplicate_of": [f"I{i}" for i in pairs[:, 1]]})
        merged = merge_duplicate_groups(records, duplicates)
        split = assign_splits(merged, seed=seed).set_axis(merged["image_id"])
        assert (split[duplicates["image_id"]].to_numpy() == split[duplicates["duplicate_of"]].to_numpy()).all()


def test_merge_duplicate_groups_missing_columns():
    records = pd.DataFrame({"image_id": ["a"], "group": ["g"]})
    with pytest.raises(ValueError, match="duplicates is missing the column.s. duplicate_of"):
        merge_duplicate_groups(records, pd.DataFrame({"image_id": ["a"]}))
    with pytest.raises(ValueError, match="records is missing the column.s. group"):
        merge_duplicate_groups(records[["image_id"]], pd.DataFrame(columns=list(DUPLICATE_COLUMNS)))


@pytest.mark.skipif(not (HAM10000 / "images").is_dir(), reason="the shared HAM10000 images are absent")
def test_find_duplicates_ham10000_recoloured_copy():
    # ISIC_0030074 and ISIC_0025226 are one image, recoloured, filed under lesions HAM_0000140 and HAM_0004919.
    # ISIC_0027757 and ISIC_0032082 are the closest images of different lesions in HAM10000 (32 bits apart).
    image_ids = ["ISIC_0025226", "ISIC_0030074", "ISIC_0027757", "ISIC_0032082", "ISIC_0024306", "ISIC_0024307"]
    records = pd.DataFrame({"image_id": image_ids, "path": [str(HAM10000 / "images" / f"{i}.jpg") for i in image_ids]})
    duplicates = find_duplicates(records)
    assert duplicates[["image_id", "duplicate_of", "kind"]].values.tolist() == [
        ["ISIC_0030074", "ISIC_0025226", "near"]]
