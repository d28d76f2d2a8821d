"""Tests for data.cache: layout, reuse, cache keys, geometry, conversions and bad files."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, JpegImagePlugin

from data import cache as cache_module
from data.cache import build_image_cache, open_image_cache

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
EXIF_ORIENTATION_TAG = 0x0112


def _save(image: Image.Image, path: Path, **kwargs) -> str:
    image.save(path, **kwargs)
    return str(path)


def _solid_png(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> str:
    return _save(Image.new("RGB", size, color), path)


def _build(paths, ids, cache_root, **kwargs):
    kwargs.setdefault("image_size", 16)
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("progress", False)
    return build_image_cache(paths, ids, cache_root=cache_root, **kwargs)


@pytest.fixture
def three_images(tmp_path: Path) -> tuple[list[str], list[str]]:
    folder = tmp_path / "images"
    folder.mkdir()
    paths = [
        _solid_png(folder / "a.png", (40, 30), RED),
        _save(Image.new("RGB", (25, 50), GREEN), folder / "b.jpg", quality=95),
        _solid_png(folder / "c.png", (8, 8), BLUE),
    ]
    return paths, ["a", "b", "c"]


def test_build_image_cache_shape_dtype_read_only(three_images, tmp_path):
    paths, ids = three_images
    cache = _build(paths, ids, tmp_path / "cache")

    assert cache.images.shape == (3, 16, 16, 3)
    assert cache.images.dtype == np.uint8
    assert not cache.images.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        cache.images[0, 0, 0, 0] = 1
    assert cache.image_size == 16
    assert cache.image_ids == ("a", "b", "c")
    assert cache.ok.tolist() == [True, True, True]
    assert cache.skipped.empty
    assert list(cache.skipped.columns) == ["image_id", "path", "reason"]
    assert len(cache) == 3


def test_build_image_cache_layout_and_values(three_images, tmp_path):
    paths, ids = three_images
    cache = _build(paths, ids, tmp_path / "cache")

    assert sorted(p.name for p in cache.path.iterdir()) == [
        "images.npy", "index.parquet", "meta.json",
    ]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.path.name]
    index = pd.read_parquet(cache.path / "index.parquet")
    assert index["image_id"].tolist() == ["a", "b", "c"]
    assert index["row"].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(cache.images[cache.row_of("a")], np.full((16, 16, 3), RED))
    np.testing.assert_allclose(cache.images[cache.row_of("b")], np.full((16, 16, 3), GREEN), atol=3)
    np.testing.assert_array_equal(cache.images[cache.row_of("c")], np.full((16, 16, 3), BLUE))


def test_open_image_cache_matches_build(three_images, tmp_path):
    paths, ids = three_images
    built = _build(paths, ids, tmp_path / "cache")
    opened = open_image_cache(built.path)

    assert opened == built
    np.testing.assert_array_equal(opened.images, built.images)
    np.testing.assert_array_equal(opened.ok, built.ok)


def test_image_cache_pickle_omits_pixels(three_images, tmp_path):
    paths, ids = three_images
    cache = _build(paths, ids, tmp_path / "cache")
    pixels = np.array(cache.images)

    payload = pickle.dumps(cache)
    restored = pickle.loads(payload)

    assert len(payload) < pixels.nbytes
    np.testing.assert_array_equal(restored.images, pixels)
    assert isinstance(restored.images, np.memmap)


def test_row_of_unknown_id_raises(three_images, tmp_path):
    paths, ids = three_images
    cache = _build(paths, ids, tmp_path / "cache")
    with pytest.raises(ValueError, match=r"image_id 'zzz' is not in the image cache"):
        cache.row_of("zzz")


def test_build_image_cache_reuses_without_decoding(three_images, tmp_path, monkeypatch, caplog):
    paths, ids = three_images
    first = _build(paths, ids, tmp_path / "cache")
    mtime_ns = (first.path / "images.npy").stat().st_mtime_ns

    def fail_decode(*args, **kwargs):
        raise AssertionError("the second build decoded an image")

    monkeypatch.setattr(cache_module, "_load_square_rgb", fail_decode)
    with caplog.at_level(logging.INFO, logger="data.cache"):
        second = _build(paths, ids, tmp_path / "cache")

    assert second.path == first.path
    assert (second.path / "images.npy").stat().st_mtime_ns == mtime_ns
    assert "reusing image cache" in caplog.text


def test_build_image_cache_new_key_on_changed_file(three_images, tmp_path):
    paths, ids = three_images
    first = _build(paths, ids, tmp_path / "cache")

    _solid_png(Path(paths[0]), (40, 30), GREEN)
    stat = os.stat(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = _build(paths, ids, tmp_path / "cache")

    assert second.path != first.path
    np.testing.assert_array_equal(second.images[0], np.full((16, 16, 3), GREEN))
    np.testing.assert_array_equal(first.images[0], np.full((16, 16, 3), RED))


def test_build_image_cache_new_key_on_changed_size(three_images, tmp_path):
    paths, ids = three_images
    small = _build(paths, ids, tmp_path / "cache", image_size=16)
    large = _build(paths, ids, tmp_path / "cache", image_size=24)

    assert large.path != small.path
    assert large.images.shape == (3, 24, 24, 3)


def test_build_image_cache_new_key_on_changed_rule(three_images, tmp_path):
    paths, ids = three_images
    cropped = _build(paths, ids, tmp_path / "cache")
    padded = _build(paths, ids, tmp_path / "cache", resize_rule="pad")

    assert padded.path != cropped.path
    assert padded.resize_rule == "pad"


def test_build_image_cache_new_key_on_reordered_ids(three_images, tmp_path):
    paths, ids = three_images
    ordered = _build(paths, ids, tmp_path / "cache")
    reordered = _build(paths[::-1], ids[::-1], tmp_path / "cache")

    assert reordered.path != ordered.path
    assert reordered.image_ids == ("c", "b", "a")
    np.testing.assert_array_equal(reordered.images[0], ordered.images[2])


def _wide_image_with_red_left_band(path: Path) -> str:
    # 200x100 green image whose left 30 columns are red. The centered 100x100 square
    # starts at column 50, 20 pixels past the band. At a 5x reduction the Lanczos filter
    # reaches 15 source pixels, so no red leaks into the crop.
    image = Image.new("RGB", (200, 100), GREEN)
    image.paste(RED, (0, 0, 30, 100))
    return _save(image, path)


def test_center_crop_removes_side_band(tmp_path):
    path = _wide_image_with_red_left_band(tmp_path / "wide.png")
    cache = _build([path], ["wide"], tmp_path / "cache", image_size=20, resize_rule="center_crop")

    image = cache.images[0].astype(int)
    np.testing.assert_allclose(image, np.full((20, 20, 3), GREEN), atol=2)


def test_pad_keeps_side_band_and_adds_black(tmp_path):
    path = _wide_image_with_red_left_band(tmp_path / "wide.png")
    cache = _build([path], ["wide"], tmp_path / "cache", image_size=20, resize_rule="pad")

    image = cache.images[0].astype(int)
    # The image scales to 20x10 and sits in rows 5 to 14. The band becomes columns 0 to 2.
    np.testing.assert_array_equal(image[:5], 0)
    np.testing.assert_array_equal(image[15:], 0)
    np.testing.assert_allclose(image[6:14, 0], np.full((8, 3), RED), atol=10)
    np.testing.assert_allclose(image[6:14, 10:], np.full((8, 10, 3), GREEN), atol=10)


@pytest.mark.parametrize(
    ("resize_rule", "drafted_size"),
    [("center_crop", (200, 150)), ("pad", (100, 75))],
)
def test_build_image_cache_drafts_large_jpeg(tmp_path, monkeypatch, resize_rule, drafted_size):
    # 800x600 to 100 px: center_crop needs both sides >= 100, so the DCT scale is 1/4.
    # pad needs only the longer side >= 100, so the scale is 1/8.
    path = _save(Image.new("RGB", (800, 600), GREEN), tmp_path / "large.jpg", quality=90)
    sizes_after_draft = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, mode, size):
        result = original_draft(self, mode, size)
        sizes_after_draft.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    cache = _build([path], ["large"], tmp_path / "cache", image_size=100, resize_rule=resize_rule)

    assert sizes_after_draft == [drafted_size]
    assert cache.ok.tolist() == [True]
    np.testing.assert_allclose(cache.images[0, 50, 50], GREEN, atol=3)


def test_build_image_cache_unknown_rule_raises(three_images, tmp_path):
    paths, ids = three_images
    with pytest.raises(ValueError, match=r"resize_rule must be one of \['center_crop', 'pad'\], got 'stretch'"):
        _build(paths, ids, tmp_path / "cache", resize_rule="stretch")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 0}, r"image_size must be a positive int \(pixels\), got 0"),
        ({"image_size": 22.5}, r"image_size must be a positive int \(pixels\), got 22.5"),
        ({"workers": 0}, r"workers must be a positive int or None \(all cores\), got 0"),
    ],
)
def test_build_image_cache_invalid_numbers_raise(three_images, tmp_path, kwargs, message):
    paths, ids = three_images
    with pytest.raises(ValueError, match=message):
        _build(paths, ids, tmp_path / "cache", **kwargs)


def test_build_image_cache_invalid_ids_raise(three_images, tmp_path):
    paths, ids = three_images
    with pytest.raises(ValueError, match="image_paths has 3 entries but image_ids has 2"):
        _build(paths, ids[:2], tmp_path / "cache")
    with pytest.raises(ValueError, match=r"image_ids must be unique, got 1 repeated ids, first \['a'\]"):
        _build(paths, ["a", "b", "a"], tmp_path / "cache")
    with pytest.raises(ValueError, match="image_ids must be str, got 7"):
        _build(paths, ["a", "b", 7], tmp_path / "cache")
    with pytest.raises(ValueError, match="image_paths is empty"):
        _build([], [], tmp_path / "cache")


def test_open_image_cache_non_cache_folder_raises(tmp_path):
    with pytest.raises(ValueError, match=r"is not a cache: meta.json not found"):
        open_image_cache(tmp_path)


def _truncated_jpeg(path: Path) -> str:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    _save(Image.fromarray(noise), path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _zero_byte_file(path: Path) -> str:
    path.write_bytes(b"")
    return str(path)


def _text_file(path: Path) -> str:
    path.write_text("ISIC image list, not an image\n")
    return str(path)


@pytest.mark.parametrize(
    ("make_file", "reason"),
    [
        (_zero_byte_file, r"^empty file \(0 bytes\)$"),
        (_truncated_jpeg, r"^decode failed: OSError: image file is truncated"),
        (_text_file, r"^not an image: Pillow cannot identify the file format$"),
        (None, r"^file not found$"),
    ],
    ids=["zero_bytes", "truncated_jpeg", "not_an_image", "missing_file"],
)
def test_build_image_cache_skips_bad_file(tmp_path, caplog, make_file, reason):
    good = _solid_png(tmp_path / "good.png", (20, 20), BLUE)
    bad_path = tmp_path / "bad.jpg"
    bad = make_file(bad_path) if make_file is not None else str(bad_path)

    with caplog.at_level(logging.WARNING, logger="data.cache"):
        cache = _build([bad, good], ["bad", "good"], tmp_path / "cache")

    assert cache.ok.tolist() == [False, True]
    assert cache.skipped["image_id"].tolist() == ["bad"]
    assert cache.skipped["path"].tolist() == [os.path.abspath(bad)]
    assert cache.skipped["reason"].str.contains(reason, regex=True).all(), cache.skipped["reason"][0]
    assert not cache.images[0].any()
    np.testing.assert_array_equal(cache.images[1], np.full((16, 16, 3), BLUE))
    assert "skipped 1 of 2 images" in caplog.text
    assert "bad: " in caplog.text


def test_build_image_cache_converts_grayscale(tmp_path):
    path = _save(Image.new("L", (20, 20), 100), tmp_path / "gray.png")
    cache = _build([path], ["gray"], tmp_path / "cache")
    np.testing.assert_array_equal(cache.images[0], np.full((16, 16, 3), 100))


def test_build_image_cache_converts_palette(tmp_path):
    image = Image.new("P", (20, 20), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    path = _save(image, tmp_path / "palette.png")
    cache = _build([path], ["palette"], tmp_path / "cache")
    np.testing.assert_array_equal(cache.images[0], np.full((16, 16, 3), (200, 100, 50)))


def test_build_image_cache_converts_cmyk_jpeg(tmp_path):
    image = Image.new("CMYK", (32, 32), (0, 0, 0, 0))
    image.paste((255, 0, 0, 0), (0, 0, 16, 32))
    path = _save(image, tmp_path / "cmyk.jpg", quality=95)
    cache = _build([path], ["cmyk"], tmp_path / "cache", image_size=32)

    assert Image.open(path).mode == "CMYK"
    np.testing.assert_allclose(cache.images[0, 16, 2], (0, 255, 255), atol=8)
    np.testing.assert_allclose(cache.images[0, 16, 29], (255, 255, 255), atol=8)


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        ("RGBA", (200, 100, 50, 255), (200, 100, 50)),
        ("RGBA", (200, 100, 50, 0), (0, 0, 0)),
        ("RGBA", (200, 100, 50, 128), (100, 50, 25)),
        ("LA", (200, 128), (100, 100, 100)),
    ],
    ids=["opaque", "transparent", "half", "gray_alpha"],
)
def test_build_image_cache_composites_alpha_on_black(tmp_path, mode, color, expected):
    path = _save(Image.new(mode, (20, 20), color), tmp_path / "alpha.png")
    cache = _build([path], ["alpha"], tmp_path / "cache")
    np.testing.assert_allclose(cache.images[0].astype(int), np.full((16, 16, 3), expected), atol=1)


def test_build_image_cache_scales_16_bit_png(tmp_path):
    # (value, expected) pairs: v * 255 / 65535 rounded. A clip to 8 bits would give 255
    # for every value above 255.
    cases = [(0, 0), (1000, 4), (257 * 10, 10), (32896, 128), (65535, 255)]
    paths = []
    for value, _ in cases:
        image = Image.fromarray(np.full((20, 20), value, dtype=np.uint16))
        paths.append(_save(image, tmp_path / f"gray16_{value}.png"))
    assert Image.open(paths[-1]).mode == "I;16"

    cache = _build(paths, [str(value) for value, _ in cases], tmp_path / "cache")

    for row, (value, expected) in enumerate(cases):
        assert cache.images[row].min() == expected, value
        assert cache.images[row].max() == expected, value


def test_build_image_cache_applies_exif_orientation(tmp_path):
    # Stored 40x20: red left half, blue right half. Orientation 6 means "rotate 90 degrees
    # clockwise to display", which puts red on top and blue at the bottom of a 20x40 image.
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    rotated = _save(image, tmp_path / "rotated.jpg", quality=95, exif=exif)
    upright = _save(image, tmp_path / "upright.jpg", quality=95)

    cache = _build([rotated, upright], ["rotated", "upright"], tmp_path / "cache",
                   image_size=20, resize_rule="pad")

    display = cache.images[0].astype(int)
    np.testing.assert_allclose(display[2, 10], RED, atol=20)
    np.testing.assert_allclose(display[17, 10], BLUE, atol=20)
    np.testing.assert_array_equal(display[:, :5], 0)
    stored = cache.images[1].astype(int)
    np.testing.assert_array_equal(stored[2, 10], 0)
    np.testing.assert_allclose(stored[10, 2], RED, atol=20)


def test_build_image_cache_two_workers_match_one(tmp_path):
    rng = np.random.default_rng(1)
    paths, ids = [], []
    for number in range(9):
        noise = rng.integers(0, 256, size=(30 + number, 50, 3), dtype=np.uint8)
        paths.append(_save(Image.fromarray(noise), tmp_path / f"{number}.jpg", quality=90))
        ids.append(f"img{number}")
    paths.append(_zero_byte_file(tmp_path / "empty.jpg"))
    ids.append("empty")

    serial = _build(paths, ids, tmp_path / "serial", workers=1)
    parallel = _build(paths, ids, tmp_path / "parallel", workers=2)

    assert serial.path.name == parallel.path.name
    assert (serial.path / "images.npy").read_bytes() == (parallel.path / "images.npy").read_bytes()
    pd.testing.assert_frame_equal(serial.skipped, parallel.skipped)
    assert parallel.ok.tolist() == [True] * 9 + [False]


def test_build_image_cache_uses_winner_of_rename_race(three_images, tmp_path, monkeypatch):
    paths, ids = three_images
    winner = _build(paths, ids, tmp_path / "other_root")
    (winner.path / "winner.txt").write_text("built first")
    race_root = tmp_path / "cache"
    original_write = cache_module._write_cache

    def write_then_lose_race(folder, *args, **kwargs):
        original_write(folder, *args, **kwargs)
        shutil.copytree(winner.path, race_root / winner.path.name)

    monkeypatch.setattr(cache_module, "_write_cache", write_then_lose_race)
    cache = _build(paths, ids, race_root)

    assert cache.path == race_root / winner.path.name
    assert (cache.path / "winner.txt").is_file()
    assert [p.name for p in race_root.iterdir()] == [winner.path.name]


def _default_start_method() -> str:
    # get_start_method() without allow_none would fix the start method for the session.
    return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]


@pytest.mark.parametrize(
    "workers",
    [
        1,
        pytest.param(2, marks=pytest.mark.skipif(
            _default_start_method() != "fork",
            reason="worker processes see the monkeypatched decoder only when forked",
        )),
    ],
)
def test_build_image_cache_failure_leaves_no_folder(three_images, tmp_path, monkeypatch, workers):
    paths, ids = three_images

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash during decoding")

    monkeypatch.setattr(cache_module, "_load_square_rgb", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _build(paths, ids, tmp_path / "cache", workers=workers)

    assert list((tmp_path / "cache").iterdir()) == []


def test_build_image_cache_progress_bar_on_stderr(three_images, tmp_path, capsys):
    paths, ids = three_images
    _build(paths, ids, tmp_path / "cache", progress=True)
    captured = capsys.readouterr()
    assert "image cache" in captured.err
    assert "img/s" in captured.err
    assert captured.out == ""
