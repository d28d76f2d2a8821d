"""Find images stored twice under different ids, and keep each copy in the split of its original.

Two kinds of duplicate are found:

- ``exact``: the decoded RGB pixels are identical (a SHA-256 of the pixels and the image size), whatever the
  file format or metadata;
- ``near``: the 256-bit DCT perceptual hashes (pHash) of two images differ in at most ``max_distance`` bits,
  as for a copy that was re-encoded, resized or slightly recoloured.

The hash has 256 bits, not the common 64, because dermoscopy images look alike at low frequencies. On the
10,015 HAM10000 images, 1,513 pairs of images of different lesions were within 6 bits of 64, the distance
that re-encoded copies (JPEG quality 70, 0.7 x resize, +10 % brightness) reached. With 256 bits such copies of
300 HAM10000 images stayed within 22 bits. Within the default 28 bits, HAM10000 has 100 pairs: 99 of one
lesion, and one recoloured copy filed under two lesion ids (ISIC_0025226, ISIC_0030074). The closest pair of
distinct images of different lesions was 32 bits apart.

:func:`merge_duplicate_groups` then joins the groups of all images linked by duplicates (union-find), so that
a grouped split (:mod:`data.splits`) keeps every copy on the same side.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

__all__ = ["CACHED_IMAGE_MAX_DISTANCE", "DEFAULT_MAX_DISTANCE", "DUPLICATE_COLUMNS", "HASH_BITS", "HASH_COLUMNS", "compute_array_hashes",
           "compute_image_hashes", "find_duplicates", "hamming_distance", "merge_duplicate_groups", "perceptual_hash"]

logger = logging.getLogger(__name__)

DUPLICATE_COLUMNS = ("image_id", "duplicate_of", "kind", "distance")
HASH_COLUMNS = ("image_id", "pixel_hash", "phash", "width", "height", "error")

DEFAULT_MAX_DISTANCE = 28
"""Largest pHash Hamming distance, in bits of 256, at which two images count as near-duplicates."""

CACHED_IMAGE_MAX_DISTANCE = 24
"""The same limit for images hashed by :func:`compute_array_hashes` after a center crop to a square.

The crop removes much of what distinguishes images. With 224 x 224 center crops of HAM10000, the copies above
stayed within 22 bits, but two distinct images of different lesions were 28 bits apart.
"""

HASH_BITS = 256
_HASH_SIDE = 16
_THUMBNAIL_SIDE = 64
_WORDS = HASH_BITS // 64
# DCT-II basis of the lowest frequencies: row k is cos(pi * (2n + 1) * k / 2N) over the pixel positions n.
_DCT_BASIS = np.cos(np.pi * np.outer(np.arange(_HASH_SIDE), 2 * np.arange(_THUMBNAIL_SIDE) + 1)
                    / (2 * _THUMBNAIL_SIDE))
# Elements of the largest temporary array of the pairwise search (rows x images), 32 MiB of uint64.
_PAIR_BLOCK_ELEMENTS = 1 << 22


def _phash_bytes(image: Image.Image) -> bytes:
    thumbnail = image.convert("L").resize((_THUMBNAIL_SIDE, _THUMBNAIL_SIDE), Image.Resampling.LANCZOS,
                                          reducing_gap=3.0)
    pixels = np.asarray(thumbnail, dtype=np.float64)
    coefficients = _DCT_BASIS @ pixels @ _DCT_BASIS.T
    return np.packbits(coefficients > np.median(coefficients)).tobytes()


def perceptual_hash(image: Image.Image) -> int:
    """Compute the 256-bit DCT perceptual hash (pHash) of an image.

    The image is converted to grayscale and resized to 64 x 64 pixels. Bit ``i`` (most significant first) of
    the hash is set when the ``i``-th of the 16 x 16 lowest-frequency coefficients of its 2-D DCT-II, in row
    order, is above their median.

    Args:
        image: a PIL image of any mode and size.
    """
    return int.from_bytes(_phash_bytes(image), "big")


def hamming_distance(first: int, second: int) -> int:
    """Count the bits in which two perceptual hashes differ (0 to 256)."""
    return (first ^ second).bit_count()


def _pixel_hash(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class _HashRow:
    pixel_hash: str = ""
    phash: str = ""
    width: int = 0
    height: int = 0
    error: str = ""


def _hash_file(path: str) -> _HashRow:
    """Decode one file and hash it. A file that cannot be decoded gets the reason in ``error``."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        return _HashRow(error=f"{type(error).__name__}: {error}")
    return _HashRow(pixel_hash=_pixel_hash(rgb), phash=_phash_bytes(rgb).hex(), width=rgb.width, height=rgb.height)


def _check_workers(workers: int | None) -> int:
    """Return ``workers``, or the CPUs this process may use when it is None."""
    if workers is None:
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"Invalid workers {workers!r}: expected a positive number of threads, e.g. 4.")
    return workers


def compute_image_hashes(paths: Sequence[str], image_ids: Sequence[str], *, workers: int | None = None) -> pd.DataFrame:
    """Decode every image and compute its pixel hash and perceptual hash.

    Decoding, conversion, resizing and SHA-256 run in C and release the GIL, so a thread pool uses all cores.

    Args:
        paths: image files, one per id.
        image_ids: the id of each image.
        workers: threads that decode images; default: the CPUs this process may use.

    Returns:
        One row per image, in input order, with the columns of :data:`HASH_COLUMNS`: ``pixel_hash`` (SHA-256,
        hex str), ``phash`` (256 bits, hex str), ``width`` and ``height`` (pixels), and ``error``. ``error`` is
        empty unless the file could not be decoded, and then the hashes are empty and the sizes 0.
    """
    if len(paths) != len(image_ids):
        raise ValueError(f"Got {len(paths)} paths but {len(image_ids)} image ids: pass one id per path.")
    workers = _check_workers(workers)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-hash") as pool:
        rows = list(pool.map(_hash_file, [str(path) for path in paths]))
    _log_throughput(len(rows), time.perf_counter() - started, workers)
    return _hash_table(image_ids, rows)


def _log_throughput(count: int, seconds: float, workers: int) -> None:
    logger.info("Hashed %d images in %.1f s (%.0f images/s, %d threads)", count, seconds,
                count / max(seconds, 1e-9), workers)


def _hash_table(image_ids: Sequence[str], rows: Sequence[_HashRow]) -> pd.DataFrame:
    return pd.DataFrame({
        "image_id": pd.Series(list(image_ids), dtype=str),
        "pixel_hash": [row.pixel_hash for row in rows],
        "phash": [row.phash for row in rows],
        "width": np.array([row.width for row in rows], dtype=np.int64),
        "height": np.array([row.height for row in rows], dtype=np.int64),
        "error": [row.error for row in rows],
    }, columns=list(HASH_COLUMNS))


def _hash_array(pixels: np.ndarray, image_id: str) -> _HashRow:
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"Invalid pixels of image {image_id!r}: got {pixels.dtype} {pixels.shape}, expected "
                         "(height, width, 3) uint8 RGB. Convert the image to 8-bit RGB first.")
    image = Image.fromarray(np.ascontiguousarray(pixels))
    return _HashRow(pixel_hash=_pixel_hash(image), phash=_phash_bytes(image).hex(), width=image.width,
                    height=image.height)


def compute_array_hashes(images: np.ndarray | Sequence[np.ndarray], image_ids: Sequence[str], *,
                         workers: int | None = None) -> pd.DataFrame:
    """Hash images that are already decoded, such as the rows of an image cache.

    Exact duplicates are then images whose decoded, resized pixels are identical, so two originals that differ
    only in detail lost by the resize also count as exact.

    Args:
        images: ``(n, height, width, 3)`` uint8 in [0, 255], or a sequence of such ``(height, width, 3)`` arrays.
        image_ids: the id of each image.
        workers: threads that hash images; default: the CPUs this process may use.

    Returns:
        The table of :func:`compute_image_hashes`, with an empty ``error`` column.
    """
    if len(images) != len(image_ids):
        raise ValueError(f"Got {len(images)} images but {len(image_ids)} image ids: pass one id per image.")
    workers = _check_workers(workers)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-hash") as pool:
        rows = list(pool.map(_hash_array, images, [str(image_id) for image_id in image_ids]))
    _log_throughput(len(rows), time.perf_counter() - started, workers)
    return _hash_table(image_ids, rows)


def _hash_words(hex_hashes: Sequence[str]) -> np.ndarray:
    """Unpack hex perceptual hashes into a ``(n, 4)`` uint64 array."""
    packed = b"".join(bytes.fromhex(value) for value in hex_hashes)
    return np.frombuffer(packed, dtype=">u8").reshape(len(hex_hashes), _WORDS).astype(np.uint64)


def _near_pairs(words: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(first, second, distance)`` for every pair ``first < second`` within ``max_distance`` bits.

    Args:
        words: ``(n, 4)`` uint64, the hashes of :func:`_hash_words`.
    """
    # Known limit: every pair is compared, so the time grows with n squared: 1 s for 10,000 images on a 2-core
    # x86 machine, and an estimated 2 min for 100,000. Larger archives need an index such as multi-index hashing.
    count = len(words)
    block_rows = max(1, min(count, _PAIR_BLOCK_ELEMENTS // max(count, 1)))
    firsts, seconds, distances = [], [], []
    for start in range(0, count, block_rows):
        block = words[start:start + block_rows]
        # Compare each row with itself and the images after it only, so that a pair is found once.
        distance = np.zeros((len(block), count - start), dtype=np.uint16)
        for word in range(_WORDS):
            distance += np.bitwise_count(block[:, word, np.newaxis] ^ words[np.newaxis, start:, word])
        is_later = np.arange(len(block))[:, np.newaxis] < np.arange(count - start)[np.newaxis, :]
        rows, columns = np.nonzero((distance <= max_distance) & is_later)
        firsts.append(rows + start)
        seconds.append(columns + start)
        distances.append(distance[rows, columns].astype(np.int64))
    if not firsts:
        empty = np.array([], dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(firsts), np.concatenate(seconds), np.concatenate(distances)


def _require_columns(frame: pd.DataFrame, name: str, columns: Sequence[str], hint: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{name} is missing the column(s) {', '.join(missing)}; it has "
                         f"{', '.join(map(str, frame.columns))}. {hint}")


def find_duplicates(records: pd.DataFrame, *, max_distance: int = DEFAULT_MAX_DISTANCE, workers: int | None = None,
                    hashes: pd.DataFrame | None = None) -> pd.DataFrame:
    """Find exact and near-duplicate images among ``records``.

    Each set of images with identical pixels gives one ``exact`` row per copy, pointing at the first image of
    the set in ``records`` order (distance 0). Then one image per pixel hash takes part in the near-duplicate
    search, which gives one ``near`` row per pair within ``max_distance`` bits, pointing at the earlier image.
    Images that cannot be decoded are logged and left out.

    Args:
        records: one row per image with ``image_id`` and ``path`` columns (``LabelledDataset.records``).
        max_distance: largest pHash Hamming distance of a near-duplicate, in bits, 0 to 256; 0 disables the
            near-duplicate search.
        workers: threads that decode images; default: the CPUs this process may use.
        hashes: the output of :func:`compute_image_hashes` or :func:`compute_array_hashes` for these records,
            to skip decoding them again.

    Returns:
        A DataFrame with the columns of :data:`DUPLICATE_COLUMNS`: ``image_id`` and ``duplicate_of`` (str),
        ``kind`` (``"exact"`` or ``"near"``) and ``distance`` (int, bits).
    """
    _require_columns(records, "records", ("image_id", "path"), "Pass LabelledDataset.records.")
    if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)) \
            or not 0 <= max_distance <= HASH_BITS:
        raise ValueError(f"Invalid max_distance {max_distance!r}: expected a number of bits from 0 to {HASH_BITS}, "
                         f"e.g. {DEFAULT_MAX_DISTANCE}; 0 finds exact duplicates only.")
    if hashes is None:
        hashes = compute_image_hashes(records["path"].tolist(), records["image_id"].tolist(), workers=workers)
    else:
        _require_columns(hashes, "hashes", HASH_COLUMNS, "Pass the output of compute_image_hashes.")
        hashes = hashes.set_index("image_id").reindex(records["image_id"].astype(str)).reset_index()
        if hashes["pixel_hash"].isna().any():
            missing = hashes.loc[hashes["pixel_hash"].isna(), "image_id"].iloc[0]
            raise ValueError(f"hashes has no row for image {missing!r}: compute the hashes from the same records.")

    failed = hashes[hashes["error"] != ""]
    if len(failed):
        logger.warning("%d images could not be decoded and were not checked for duplicates, e.g. %s: %s",
                       len(failed), failed["image_id"].iloc[0], failed["error"].iloc[0])
    readable = hashes[hashes["error"] == ""].reset_index(drop=True)

    first_of_pixels = readable.groupby("pixel_hash", sort=False)["image_id"].transform("first")
    is_copy = readable["image_id"] != first_of_pixels
    exact = pd.DataFrame({"image_id": readable.loc[is_copy, "image_id"], "duplicate_of": first_of_pixels[is_copy],
                          "kind": "exact", "distance": 0})

    unique = readable[~is_copy].reset_index(drop=True)
    searched = unique if max_distance > 0 else unique.iloc[:0]
    first, second, distance = _near_pairs(_hash_words(searched["phash"].tolist()), max_distance)
    near = pd.DataFrame({"image_id": searched["image_id"].to_numpy()[second],
                         "duplicate_of": searched["image_id"].to_numpy()[first], "kind": "near",
                         "distance": distance})

    duplicates = pd.concat([exact, near], ignore_index=True).astype(
        {"image_id": str, "duplicate_of": str, "kind": str, "distance": np.int64})
    logger.info("Found %d exact and %d near-duplicate pairs (max distance %d bits) among %d images",
                len(exact), len(near), max_distance, len(records))
    return duplicates[list(DUPLICATE_COLUMNS)]


class _UnionFind:
    """Disjoint sets of group names. The root of a set is its smallest name, so the pair order does not matter."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        root = name
        while self._parent.get(root, root) != root:
            root = self._parent[root]
        while name != root:
            self._parent[name], name = root, self._parent[name]
        return root

    def union(self, first: str, second: str) -> None:
        first_root, second_root = self.find(first), self.find(second)
        if first_root != second_root:
            low, high = sorted((first_root, second_root))
            self._parent[high] = low


def merge_duplicate_groups(records: pd.DataFrame, duplicates: pd.DataFrame) -> pd.DataFrame:
    """Put every image linked by a duplicate pair into one group, so that a grouped split keeps copies together.

    Groups are joined transitively (union-find): when image A of group G1 duplicates image B of group G2, every
    image of G1 and G2 ends in the group named by the smaller of the two names. Pairs naming an image that is
    not in ``records`` (an excluded image, say) are ignored.

    Args:
        records: one row per image with ``image_id`` and ``group`` columns.
        duplicates: pairs with ``image_id`` and ``duplicate_of`` columns, as :func:`find_duplicates` returns.

    Returns:
        A copy of ``records`` with the merged ``group`` column.
    """
    _require_columns(records, "records", ("image_id", "group"), "Pass LabelledDataset.records.")
    _require_columns(duplicates, "duplicates", ("image_id", "duplicate_of"), "Pass the output of find_duplicates.")
    groups = records["group"].astype(str)
    group_of_image = dict(zip(records["image_id"].astype(str), groups))

    sets = _UnionFind()
    ignored = 0
    for image_id, duplicate_of in zip(duplicates["image_id"].astype(str), duplicates["duplicate_of"].astype(str)):
        if image_id not in group_of_image or duplicate_of not in group_of_image:
            ignored += 1
            continue
        sets.union(group_of_image[image_id], group_of_image[duplicate_of])

    merged = groups.map(sets.find)
    changed = groups != merged
    logger.info("Merged duplicate groups: %d images changed group, %d groups became %d; %d duplicate pairs named "
                "images outside the records", int(changed.sum()), groups.nunique(), merged.nunique(), ignored)
    largest = int(merged.value_counts().iloc[0]) if len(merged) else 0
    if largest > groups.value_counts().iloc[0] and largest > 0.01 * len(merged) and len(merged) >= 100:
        logger.warning("The largest merged group contains %d of %d images, so near-duplicate chains may have "
                       "joined unrelated images. Check find_duplicates with a smaller max_distance.",
                       largest, len(merged))
    return records.assign(group=merged.to_numpy())
