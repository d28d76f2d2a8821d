"""Resized-image cache: decode and resize each image once, then memory-map it in every trial.

A cache is a folder under ``cache_root`` that contains:

- ``images.npy``: ``(N, image_size, image_size, 3)`` uint8 in [0, 255], in the row order of
  the ``image_ids`` given to :func:`build_image_cache`. Rows of images that could not be
  decoded are zeros.
- ``index.parquet``: one row per image with columns ``image_id``, ``path``, ``row``, ``ok``
  and ``reason`` (empty when ``ok``).
- ``meta.json``: format version, image size, resize rule, image count, the full cache key
  and the Pillow version that decoded the images.

The folder name is derived from a SHA-256 key over the format version, the image size, the
resize rule, the ordered image ids and each file's absolute path, size in bytes and
modification time in nanoseconds. Building again with the same inputs reuses the folder
without decoding anything, and any change to a file or to the size gives a new folder.
File contents are not hashed, so a file rewritten with the same size and modification
time keeps its old cache entry.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import PIL
from numpy.lib.format import open_memmap
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
RESIZE_RULES = ("center_crop", "pad")

_IMAGES_FILE = "images.npy"
_INDEX_FILE = "index.parquet"
_META_FILE = "meta.json"

# Images per task sent to a worker process: small enough that the progress bar moves and
# the last tasks balance across workers, large enough to amortize the task overhead.
_MAX_CHUNK_IMAGES = 64

# Number of skipped images whose reasons the warning after a build lists.
_SKIPPED_REASONS_LOGGED = 5

# Pillow modes that hold 16-bit (or wider) integer samples of one channel.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

# Pillow modes with an alpha channel, composited on black.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@dataclass(frozen=True)
class ImageCache:
    """A built image cache, opened read-only.

    Attributes:
        path: the cache folder.
        image_size: side of the square images, in pixels.
        resize_rule: ``"center_crop"`` or ``"pad"``, see :func:`build_image_cache`.
        image_ids: image ids in row order, length N.
        skipped: images that could not be decoded, columns ``image_id``, ``path`` and
            ``reason`` (all str), in row order. Their rows in ``images`` are zeros.
        ok: ``(N,)`` bool, True where the image was decoded.
    """

    path: Path
    image_size: int
    resize_rule: str
    image_ids: tuple[str, ...]
    skipped: pd.DataFrame = field(compare=False, repr=False)
    ok: np.ndarray = field(compare=False, repr=False)

    @cached_property
    def images(self) -> np.memmap:
        """``(N, image_size, image_size, 3)`` uint8 in [0, 255], memory-mapped read-only."""
        return np.load(self.path / _IMAGES_FILE, mmap_mode="r")

    @cached_property
    def _row_by_id(self) -> dict[str, int]:
        return {image_id: row for row, image_id in enumerate(self.image_ids)}

    def __len__(self) -> int:
        return len(self.image_ids)

    def row_of(self, image_id: str) -> int:
        """Return the row of ``image_id`` in ``images``.

        Raises:
            ValueError: the id is not in this cache.
        """
        try:
            return self._row_by_id[image_id]
        except KeyError:
            raise ValueError(
                f"image_id {image_id!r} is not in the image cache {self.path} "
                f"({len(self.image_ids)} images). Build the cache with this id included."
            ) from None

    def __getstate__(self) -> dict:
        # Pickling (for example to a Ray worker) sends the fields only. A pickled np.memmap
        # would carry a full in-memory copy of the pixels, so the receiver maps the file again.
        state = dict(self.__dict__)
        state.pop("images", None)
        state.pop("_row_by_id", None)
        return state


def build_image_cache(
    image_paths: Sequence[str | os.PathLike],
    image_ids: Sequence[str],
    *,
    image_size: int,
    cache_root: str | os.PathLike,
    resize_rule: str = "center_crop",
    workers: int | None = None,
    progress: bool = True,
) -> ImageCache:
    """Decode and resize images into a cache under ``cache_root``, or reuse a matching one.

    Each image is decoded with Pillow. A JPEG is decoded at a reduced DCT scale (1/2, 1/4
    or 1/8) that still leaves both sides at least ``image_size`` pixels, which is the main
    speed-up on large originals. The EXIF orientation is then applied and the image is
    converted to RGB:

    - grayscale, bilevel, palette, YCbCr and CMYK images are converted by Pillow;
    - 16-bit grayscale is scaled to 8 bits with rounding (``v * 255 / 65535``), not clipped;
    - RGBA, LA, PA and images with a transparent color are composited on black.

    Then the square is made by ``resize_rule``:

    - ``"center_crop"``: take the centered square whose side is the shorter side, and
      resize it to ``image_size`` with Lanczos filtering.
    - ``"pad"``: resize the whole image with Lanczos filtering so its longer side is
      ``image_size``, then center it on a black square. The image keeps its aspect ratio.

    Files that cannot be read (missing, zero bytes, not an image, truncated or otherwise
    corrupt) are skipped with a reason and never stop the build. Their rows are zeros.

    The cache is written to a temporary folder in ``cache_root`` and renamed into place, so
    an interrupted build leaves no partial cache under the final name. When two processes
    build the same cache at once, the one whose rename comes second discards its copy and
    returns the first one's.

    Args:
        image_paths: image files, one per id.
        image_ids: unique ids, in the row order of the cache.
        image_size: side of the square output, in pixels (>= 1).
        cache_root: folder that contains the caches. It is created if missing.
        resize_rule: ``"center_crop"`` or ``"pad"``.
        workers: decoding processes, started with the current multiprocessing start method.
            None uses ``os.cpu_count()``. 1 decodes in this process.
        progress: show a tqdm bar (images/s and ETA) on stderr.

    Returns:
        The cache, opened read-only.

    Raises:
        ValueError: an argument is invalid. The message names it and the fix.
    """
    _validate_build_arguments(image_paths, image_ids, image_size, resize_rule, workers)
    ids = tuple(image_ids)
    paths = tuple(os.path.abspath(os.fspath(p)) for p in image_paths)
    if workers is None:
        workers = os.cpu_count() or 1

    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    key = _compute_cache_key(paths, ids, image_size, resize_rule)
    final_path = cache_root / f"{image_size}px-{resize_rule}-{key[:16]}"
    if final_path.exists():
        cache = open_image_cache(final_path)
        _check_key_matches(final_path, key)
        logger.info(
            "reusing image cache %s (%d images at %d px, %d skipped)",
            final_path, len(ids), image_size, len(cache.skipped),
        )
        return cache

    # NOTE: a process killed outright (SIGKILL, power loss) leaves this hidden temporary
    # folder behind in cache_root. It is never read, but its disk space is not reclaimed.
    temporary_path = Path(tempfile.mkdtemp(prefix=f".{final_path.name}.", dir=cache_root))
    try:
        _write_cache(temporary_path, paths, ids, image_size, resize_rule, key, workers, progress)
        _publish(temporary_path, final_path)
    finally:
        if temporary_path.exists():
            shutil.rmtree(temporary_path, ignore_errors=True)

    cache = open_image_cache(final_path)
    _check_key_matches(final_path, key)
    _log_skipped(cache)
    return cache


def open_image_cache(path: str | os.PathLike) -> ImageCache:
    """Open a cache folder written by :func:`build_image_cache`, read-only.

    Raises:
        ValueError: the folder is missing, incomplete or of another format version.
    """
    path = Path(path)
    meta_path = path / _META_FILE
    if not meta_path.is_file():
        raise ValueError(
            f"image cache folder {path} is not a cache: {_META_FILE} not found. "
            "Pass a folder returned by build_image_cache, or delete it and build again."
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"image cache {path} has format_version {meta.get('format_version')!r}, but this "
            f"version of lesiontune reads {FORMAT_VERSION}. Delete the folder and build again."
        )

    index = pd.read_parquet(path / _INDEX_FILE)
    if not np.array_equal(index["row"].to_numpy(), np.arange(len(index))):
        raise ValueError(
            f"image cache {path} is damaged: the rows in {_INDEX_FILE} are not "
            f"0..{len(index) - 1} in order. Delete the folder and build again."
        )
    ok = index["ok"].to_numpy(dtype=bool, copy=True)
    ok.setflags(write=False)
    skipped = index.loc[~index["ok"], ["image_id", "path", "reason"]].reset_index(drop=True)

    cache = ImageCache(
        path=path,
        image_size=int(meta["image_size"]),
        resize_rule=str(meta["resize_rule"]),
        image_ids=tuple(str(image_id) for image_id in index["image_id"]),
        skipped=skipped,
        ok=ok,
    )
    expected_shape = (len(index), cache.image_size, cache.image_size, 3)
    if cache.images.shape != expected_shape or cache.images.dtype != np.uint8:
        raise ValueError(
            f"image cache {path} is damaged: {_IMAGES_FILE} has shape {cache.images.shape} "
            f"and dtype {cache.images.dtype}, expected {expected_shape} uint8. "
            "Delete the folder and build again."
        )
    return cache


def _validate_build_arguments(
    image_paths: Sequence[str | os.PathLike],
    image_ids: Sequence[str],
    image_size: int,
    resize_rule: str,
    workers: int | None,
) -> None:
    if isinstance(image_paths, (str, os.PathLike)) or isinstance(image_ids, str):
        raise ValueError(
            "image_paths and image_ids must be sequences with one entry per image, "
            f"got {type(image_paths).__name__} and {type(image_ids).__name__}. "
            "Wrap a single image in a list."
        )
    if len(image_paths) != len(image_ids):
        raise ValueError(
            f"image_paths has {len(image_paths)} entries but image_ids has {len(image_ids)}. "
            "Pass one id per path, in the same order."
        )
    if len(image_ids) == 0:
        raise ValueError("image_paths is empty. Pass at least one image.")
    for image_id in image_ids:
        if not isinstance(image_id, str):
            raise ValueError(
                f"image_ids must be str, got {image_id!r} of type {type(image_id).__name__}. "
                "Convert the ids with str()."
            )
    duplicates = [image_id for image_id, count in Counter(image_ids).items() if count > 1]
    if duplicates:
        raise ValueError(
            f"image_ids must be unique, got {len(duplicates)} repeated ids, "
            f"first {duplicates[:5]}. Drop the duplicate rows before building the cache."
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(
            f"image_size must be a positive int (pixels), got {image_size!r}. Pass e.g. 224."
        )
    if resize_rule not in RESIZE_RULES:
        raise ValueError(
            f"resize_rule must be one of {list(RESIZE_RULES)}, got {resize_rule!r}"
        )
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise ValueError(
            f"workers must be a positive int or None (all cores), got {workers!r}"
        )


def _compute_cache_key(
    paths: tuple[str, ...], ids: tuple[str, ...], image_size: int, resize_rule: str
) -> str:
    files = []
    for image_id, path in zip(ids, paths):
        try:
            stat = os.stat(path)
            files.append([image_id, path, stat.st_size, stat.st_mtime_ns])
        except OSError:
            # A missing file still gets a stable key. Once it appears, its size and time
            # change the key, so the next build decodes it.
            files.append([image_id, path, None, None])
    payload = {
        "format_version": FORMAT_VERSION,
        "image_size": image_size,
        "resize_rule": resize_rule,
        "files": files,
    }
    encoded = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()


def _check_key_matches(path: Path, key: str) -> None:
    meta = json.loads((path / _META_FILE).read_text(encoding="utf-8"))
    if meta.get("key_sha256") != key:
        raise ValueError(
            f"image cache {path} was built for other inputs: its key is "
            f"{meta.get('key_sha256')!r}, expected {key!r}. Delete the folder and build again."
        )


def _write_cache(
    folder: Path,
    paths: tuple[str, ...],
    ids: tuple[str, ...],
    image_size: int,
    resize_rule: str,
    key: str,
    workers: int,
    progress: bool,
) -> None:
    images_path = folder / _IMAGES_FILE
    shape = (len(ids), image_size, image_size, 3)
    # open_memmap writes the .npy header and sizes the file. Unwritten rows read as zeros.
    open_memmap(images_path, mode="w+", dtype=np.uint8, shape=shape).flush()

    started = time.perf_counter()
    chunks = _split_into_chunks(len(ids), workers)
    workers = min(workers, len(chunks))
    logger.info(
        "building image cache of %d images at %d px (%s) with %d worker(s) in %s",
        len(ids), image_size, resize_rule, workers, folder.parent,
    )
    with tqdm(
        total=len(ids), desc="image cache", unit="img", file=sys.stderr, disable=not progress
    ) as bar:
        if workers == 1:
            reasons = _decode_in_process(images_path, paths, chunks, image_size, resize_rule, bar)
        else:
            reasons = _decode_in_pool(
                images_path, paths, chunks, image_size, resize_rule, workers, bar
            )
    seconds = time.perf_counter() - started
    logger.info(
        "decoded %d images in %.1f s (%.1f images/s)",
        len(ids), seconds, len(ids) / max(seconds, 1e-9),
    )

    index = pd.DataFrame(
        {
            "image_id": list(ids),
            "path": list(paths),
            "row": np.arange(len(ids), dtype=np.int64),
            "ok": [reason is None for reason in reasons],
            "reason": [reason or "" for reason in reasons],
        }
    )
    index.to_parquet(folder / _INDEX_FILE, index=False)
    meta = {
        "format_version": FORMAT_VERSION,
        "image_size": image_size,
        "resize_rule": resize_rule,
        "count": len(ids),
        "skipped": int(sum(reason is not None for reason in reasons)),
        "key_sha256": key,
        "pillow_version": PIL.__version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    for name in (_IMAGES_FILE, _INDEX_FILE, _META_FILE):
        _fsync_path(folder / name)


def _split_into_chunks(count: int, workers: int) -> list[range]:
    # About four chunks per worker, so a slow chunk does not leave other workers idle.
    size = max(1, min(_MAX_CHUNK_IMAGES, math.ceil(count / (workers * 4))))
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def _decode_in_process(
    images_path: Path,
    paths: tuple[str, ...],
    chunks: list[range],
    image_size: int,
    resize_rule: str,
    bar: tqdm,
) -> list[str | None]:
    images = np.load(images_path, mmap_mode="r+")
    reasons: list[str | None] = [None] * len(paths)
    for rows in chunks:
        for row, reason in _decode_rows(images, rows, paths, image_size, resize_rule):
            reasons[row] = reason
        bar.update(len(rows))
    images.flush()
    del images
    return reasons


def _decode_in_pool(
    images_path: Path,
    paths: tuple[str, ...],
    chunks: list[range],
    image_size: int,
    resize_rule: str,
    workers: int,
    bar: tqdm,
) -> list[str | None]:
    # The workers use the process-wide start method: fork on Linux before Python 3.14,
    # which starts a worker in milliseconds and does not import the calling script again.
    # NOTE: forking a process that runs threads (TensorFlow, a Ray driver) is only safe
    # while the child takes none of their locks. The workers run Pillow and numpy only.
    # Call multiprocessing.set_start_method("forkserver") first to avoid fork entirely.
    reasons: list[str | None] = [None] * len(paths)
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context(),
        initializer=_open_worker_images,
        initargs=(str(images_path),),
    ) as pool:
        futures = {
            pool.submit(
                _decode_rows_in_worker, rows, [paths[row] for row in rows], image_size, resize_rule
            ): rows
            for rows in chunks
        }
        try:
            for future in as_completed(futures):
                for row, reason in future.result():
                    reasons[row] = reason
                bar.update(len(futures[future]))
        except BrokenProcessPool as exc:
            raise RuntimeError(
                "an image-decoding worker process exited abruptly. With the spawn and "
                "forkserver start methods, workers import the calling script again: if it "
                "starts the build at module level, move that code under "
                "`if __name__ == \"__main__\":`, and run a script from a file, not stdin. "
                "Otherwise pass workers=1 to decode in this process and see the error."
            ) from exc
        finally:
            # After an error or an interrupt, leaving the pool would otherwise wait for
            # every queued chunk. Cancelling a finished future does nothing.
            for future in futures:
                future.cancel()
    return reasons


# Each worker process maps images.npy once, read-write, and writes its rows straight into
# it, so pixel arrays never travel back through pickling.
_worker_images: np.memmap | None = None


def _open_worker_images(images_path: str) -> None:
    global _worker_images
    _worker_images = np.load(images_path, mmap_mode="r+")


def _decode_rows_in_worker(
    rows: range, chunk_paths: list[str], image_size: int, resize_rule: str
) -> list[tuple[int, str | None]]:
    paths_by_row = dict(zip(rows, chunk_paths))
    return _decode_rows(_worker_images, rows, paths_by_row, image_size, resize_rule)


def _decode_rows(
    images: np.memmap,
    rows: range,
    paths: Sequence[str] | dict[int, str],
    image_size: int,
    resize_rule: str,
) -> list[tuple[int, str | None]]:
    results = []
    for row in rows:
        pixels, reason = _load_square_rgb(paths[row], image_size, resize_rule)
        if pixels is not None:
            images[row] = pixels
        results.append((row, reason))
    return results


def _load_square_rgb(
    path: str, image_size: int, resize_rule: str
) -> tuple[np.ndarray | None, str | None]:
    """Decode one file to ``(image_size, image_size, 3)`` uint8, or return why it failed."""
    try:
        if os.path.getsize(path) == 0:
            return None, "empty file (0 bytes)"
    except FileNotFoundError:
        return None, "file not found"
    except OSError as exc:
        return None, f"cannot read file: {exc}"

    try:
        with Image.open(path) as image:
            _draft_for_size(image, image_size, resize_rule)
            ImageOps.exif_transpose(image, in_place=True)
            image = _convert_to_rgb(image)
            square = _resize_to_square(image, image_size, resize_rule)
            return np.asarray(square, dtype=np.uint8), None
    except UnidentifiedImageError:
        return None, "not an image: Pillow cannot identify the file format"
    except _UnsupportedModeError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001
        # Pillow's plugins report corrupt data with several exception types (OSError,
        # SyntaxError, EOFError, ValueError and others, depending on the format and the
        # damage), and one bad file must not stop a build of thousands.
        return None, f"decode failed: {type(exc).__name__}: {exc}"


class _UnsupportedModeError(ValueError):
    pass


def _draft_for_size(image: Image.Image, image_size: int, resize_rule: str) -> None:
    width, height = image.size
    if resize_rule == "pad":
        # Only the longer side must stay >= image_size, since it is the one scaled to it.
        scale = image_size / max(width, height)
        requested = (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale)))
    else:
        requested = (image_size, image_size)
    # For a JPEG, Pillow picks the largest DCT scale that keeps both sides >= requested.
    # Other formats ignore the call.
    image.draft("RGB", requested)


def _convert_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GRAY_MODES:
        return _scale_wide_gray_to_rgb(image)
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise _UnsupportedModeError(
            f"unsupported image mode {image.mode!r}: Pillow cannot convert it to RGB ({exc})"
        ) from exc


def _scale_wide_gray_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.int64)
    # NOTE: mode "I" (32-bit signed) is read as 16-bit like "I;16", so values outside
    # [0, 65535] saturate. 16-bit grayscale PNG files open as "I;16" in Pillow 13.
    values = np.clip(values, 0, 65535)
    gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _resize_to_square(image: Image.Image, image_size: int, resize_rule: str) -> Image.Image:
    width, height = image.size
    target = (image_size, image_size)
    if resize_rule == "center_crop":
        side = min(width, height)
        left = (width - side) / 2
        top = (height - side) / 2
        box = (left, top, left + side, top + side)
        return image.resize(target, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)

    scale = image_size / max(width, height)
    fitted_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    fitted = image.resize(fitted_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    square = Image.new("RGB", target, (0, 0, 0))
    square.paste(fitted, ((image_size - fitted_size[0]) // 2, (image_size - fitted_size[1]) // 2))
    return square


def _publish(temporary_path: Path, final_path: Path) -> None:
    try:
        os.rename(temporary_path, final_path)
    except OSError as exc:
        lost_race = exc.errno in (errno.EEXIST, errno.ENOTEMPTY) or isinstance(
            exc, FileExistsError
        )
        if not (lost_race and (final_path / _META_FILE).is_file()):
            raise
        logger.info(
            "image cache %s was built by another process meanwhile, using that one", final_path
        )
        return
    _fsync_path(final_path.parent)


def _fsync_path(path: Path) -> None:
    # On Linux, fsync also writes pages dirtied through memory maps of the file. Windows
    # cannot open a directory with os.open, so the directory fsync is skipped there.
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _log_skipped(cache: ImageCache) -> None:
    if cache.skipped.empty:
        return
    first = cache.skipped.head(_SKIPPED_REASONS_LOGGED)
    listed = "; ".join(f"{row.image_id}: {row.reason}" for row in first.itertuples())
    logger.warning(
        "skipped %d of %d images that could not be decoded (their rows are zeros). First: %s",
        len(cache.skipped), len(cache.image_ids), listed,
    )
