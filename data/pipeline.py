"""tf.data input pipeline that reads image-cache rows and applies Albumentations.

The pipeline carries only row positions through tf.data. Each batch of
positions goes to one `tf.numpy_function`, which gathers the batch's rows
from the image array (usually a read-only `np.memmap`, so only those rows
are read). Augmentation then runs in worker processes: the batch goes to a
shared-memory block, each worker augments a slice of it in place, and the
caller copies the result out. Albumentations spends much of its time in
Python, which holds the global interpreter lock: two threads augmented only
1.2 times as fast as one on 2 cores. Casting to float32 happens after the
function returns and after the prefetch buffer, so only uint8 pixels cross the
Python boundary and wait in the buffer.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import numbers
import os
import pickle
import random
import threading
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory

import albumentations as A
import cv2
import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

# Tasks per worker for each batch. More tasks balance the workers better when one of them
# falls behind, and fewer tasks cost less in scheduling.
_CHUNKS_PER_WORKER = 2

# Augmentations that one worker process keeps unpickled, by token, so a batch does not pay for
# unpickling the transform again (about 1.4 ms for the intensity 0.5 preset).
_WORKER_CACHE_SIZE = 8

_pools: dict[int, ProcessPoolExecutor] = {}
_pools_lock = threading.Lock()


def make_dataset(
    images: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    augmentation: A.Compose | None = None,
    shuffle: bool = False,
    seed: int = 0,
    sample_weights: np.ndarray | None = None,
    drop_remainder: bool = False,
    partner_rows: np.ndarray | None = None,
    blend_weights: np.ndarray | None = None,
    num_workers: int | None = None,
) -> tf.data.Dataset:
    """Build a batched, prefetched tf.data pipeline over rows of an image array.

    Shuffling draws a new order of the rows each epoch, and augmentation
    draws new random parameters each epoch. Both are reproducible, so two
    datasets built with the same arguments and seed yield the same batches
    epoch by epoch, whatever the thread scheduling, as long as the TensorFlow
    global seed (`tf.random.set_seed`) is the same or unset in both.

    Args:
        images: `(N, S, S, 3)` uint8 in [0, 255], usually a read-only `np.memmap`
            of the image cache. Only the rows of each batch are read, never the whole array.
        rows: `(M,)` integer indices into `images`, in [0, N). Repeated indices
            (random oversampling) yield that image once per occurrence.
        labels: `(M,)` labels in {0, 1}, aligned with `rows`.
        batch_size: images per batch, >= 1.
        augmentation: transform applied to each `(S, S, 3)` uint8 image, which must
            keep its shape and dtype, for example from `build_augmentation`; None applies none.
        shuffle: whether to shuffle the rows, with a new order each epoch.
        seed: seed of the shuffle order and of the augmentation draws.
        sample_weights: `(M,)` non-negative finite weights aligned with `rows`, or None.
        drop_remainder: whether to drop the last batch when it is smaller than `batch_size`.
        partner_rows: `(M,)` integer indices into `images`, aligned with `rows`, or None. Entry i of the
            dataset is then the blend `(1 - blend_weights[i]) * images[rows[i]] + blend_weights[i] *
            images[partner_rows[i]]`, rounded to uint8 before augmentation (SMOTE-style balancing).
        blend_weights: `(M,)` weights in [0, 1] aligned with `rows`; required with `partner_rows`.
        num_workers: processes that augment images, shared by every dataset of this process with the
            same number. None starts one per usable CPU core, and 0 augments in the tf.data thread that
            loads the batch. Without augmentation no process starts. The images are the same for any value.
            Workers start with multiprocessing's forkserver method, which imports the main module again,
            so a script that builds the dataset needs the ``if __name__ == "__main__":`` guard.

    Returns:
        A dataset of `(x, y)`, or `(x, y, w)` when `sample_weights` is given:
        x `(B, S, S, 3)` float32 in [0, 255] (no backbone preprocessing),
        y `(B,)` float32 and w `(B,)` float32. B is static (`batch_size`) when
        `drop_remainder` is True and None otherwise.

    Raises:
        TypeError: if `images` is not a numpy array, `augmentation` is not an
            Albumentations transform, or `batch_size` is not an integer.
        ValueError: if an array has the wrong shape, dtype or values, or
            `drop_remainder` would leave no batch.
    """
    _check_images(images)
    rows = _checked_rows(rows, num_images=images.shape[0])
    labels = _checked_labels(labels, num_rows=rows.shape[0])
    if sample_weights is not None:
        sample_weights = _checked_sample_weights(sample_weights, num_rows=rows.shape[0])
    _check_batching(batch_size, drop_remainder=drop_remainder, num_rows=rows.shape[0])
    _check_augmentation(augmentation)
    num_workers = _checked_num_workers(num_workers)
    blend = None
    if partner_rows is not None or blend_weights is not None:
        blend = _checked_blend(partner_rows, blend_weights, num_images=images.shape[0], num_rows=rows.shape[0])

    loader = _BatchLoader(images=images, rows=rows, augmentation=augmentation, blend=blend, num_workers=num_workers)
    image_size = images.shape[1]
    static_batch = batch_size if drop_remainder else None
    label_table = tf.constant(labels)
    weight_table = None if sample_weights is None else tf.constant(sample_weights)

    def load_batch(positions: tf.Tensor, batch_seed: tf.Tensor) -> tuple[tf.Tensor, ...]:
        pixels = tf.numpy_function(loader, [positions, batch_seed], tf.uint8, stateful=False)
        pixels = tf.ensure_shape(pixels, [static_batch, image_size, image_size, 3])
        targets = tf.gather(label_table, positions)
        if weight_table is None:
            return pixels, targets
        return pixels, targets, tf.gather(weight_table, positions)

    def to_float(pixels: tf.Tensor, *rest: tf.Tensor) -> tuple[tf.Tensor, ...]:
        return (tf.cast(pixels, tf.float32), *rest)

    positions = tf.data.Dataset.range(rows.shape[0])
    if shuffle:
        positions = positions.shuffle(rows.shape[0], seed=seed, reshuffle_each_iteration=True)
    batches = positions.batch(batch_size, drop_remainder=drop_remainder)
    # One random int64 per batch seeds that batch's augmentation. It is drawn
    # anew each epoch, so the augmentations differ from epoch to epoch.
    batch_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    dataset = tf.data.Dataset.zip(batches, batch_seeds)
    dataset = dataset.map(load_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    logger.debug(
        "Input pipeline: %d rows of %d images, %d px, batch %d, augmentation %s, shuffle %s, seed %d",
        rows.shape[0],
        images.shape[0],
        image_size,
        batch_size,
        f"on ({num_workers} worker processes)" if augmentation is not None else "off",
        shuffle,
        seed,
    )
    # The prefetch buffer keeps uint8 batches, a quarter of the memory of float32 ones, and the cast runs
    # as the model takes each batch.
    return dataset.prefetch(tf.data.AUTOTUNE).map(to_float)


class _BatchLoader:
    """Batch loader: gathers the rows of a batch, blends SMOTE pairs and augments the images."""

    def __init__(self, *, images: np.ndarray, rows: np.ndarray, augmentation: A.Compose | None,
                 blend: tuple[np.ndarray, np.ndarray] | None = None, num_workers: int = 0):
        self._images = images
        self._rows = rows
        self._augmentation = augmentation
        self._blend = blend
        self._num_workers = num_workers
        # Workers keep the unpickled augmentation under this token, which is new for each dataset.
        self._token = uuid.uuid4().hex
        self._payload = pickle.dumps(augmentation) if augmentation is not None and num_workers > 0 else b""
        # tf.data may load several batches at once, and Albumentations transforms keep their random
        # generators as attributes, so each loading thread augments with its own copy.
        self._thread_state = threading.local()

    def __call__(self, positions: np.ndarray, batch_seed: np.int64) -> np.ndarray:
        # Fancy indexing a memmap reads only the selected rows into a new array,
        # which the augmented images may then overwrite in place.
        batch = np.asarray(self._images[self._rows[positions]])
        if self._blend is not None:
            self._blend_in_place(batch, positions)
        if self._augmentation is None or batch.shape[0] == 0:
            return batch

        # Batch seeds from tf.data are signed int64, but SeedSequence needs a non-negative integer.
        entropy = int(batch_seed) & 0xFFFF_FFFF_FFFF_FFFF
        image_seeds = np.random.SeedSequence(entropy).generate_state(batch.shape[0], dtype=np.uint64)
        if self._num_workers == 0:
            augmentation = getattr(self._thread_state, "augmentation", None)
            if augmentation is None:
                augmentation = copy.deepcopy(self._augmentation)
                self._thread_state.augmentation = augmentation
            _augment_slice(augmentation, batch, range(batch.shape[0]), image_seeds)
            return batch
        return self._augment_in_workers(batch, image_seeds)

    def _augment_in_workers(self, batch: np.ndarray, image_seeds: np.ndarray) -> np.ndarray:
        pool = _process_pool(self._num_workers)
        block = shared_memory.SharedMemory(create=True, size=batch.nbytes)
        try:
            shared = np.ndarray(batch.shape, dtype=np.uint8, buffer=block.buf)
            shared[...] = batch
            num_chunks = min(batch.shape[0], self._num_workers * _CHUNKS_PER_WORKER)
            bounds = np.linspace(0, batch.shape[0], num_chunks + 1).astype(int)
            try:
                futures = [
                    pool.submit(_augment_shared_slice, block.name, batch.shape, int(start), int(stop),
                                image_seeds[start:stop], self._token, self._payload)
                    for start, stop in zip(bounds[:-1], bounds[1:]) if stop > start
                ]
                for future in futures:
                    future.result()
            except BrokenProcessPool as error:
                # The next batch starts a new pool, so a search can retry the trial in this process.
                _discard_pool(self._num_workers, pool)
                raise RuntimeError(
                    f"An augmentation worker process died (pool of {self._num_workers}), for example killed for "
                    "lack of memory. Lower num_workers or the batch size, or check the system log."
                ) from error
            batch[...] = shared
            del shared
        finally:
            block.close()
            block.unlink()
        return batch

    def _blend_in_place(self, batch: np.ndarray, positions: np.ndarray) -> None:
        partner_rows, blend_weights = self._blend
        weights = blend_weights[positions]
        synthetic = np.flatnonzero(weights > 0)
        if synthetic.shape[0] == 0:
            return
        # Only the partners of synthetic entries are read, so an unblended batch costs no extra reads.
        partners = np.asarray(self._images[partner_rows[positions[synthetic]]], dtype=np.float32)
        weight = weights[synthetic, None, None, None]
        mixed = (1.0 - weight) * batch[synthetic].astype(np.float32) + weight * partners
        batch[synthetic] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _augment_slice(augmentation: A.Compose, batch: np.ndarray, indices, image_seeds: np.ndarray) -> None:
    """Augment ``batch[i]`` in place for each index, each image with its own seed."""
    for index, image_seed in zip(indices, image_seeds):
        batch[index] = _augment_one(augmentation, batch[index], int(image_seed))


def _augment_one(augmentation: A.Compose, image: np.ndarray, seed: int) -> np.ndarray:
    # The whole Compose shares one generator pair. Compose.set_random_seed in
    # albumentations 2.0.8 gives every transform its own generator with the
    # same seed, which makes transforms with equal p fire together.
    augmentation.set_random_state(np.random.default_rng(seed), random.Random(seed))
    augmented = augmentation(image=image)["image"]

    if augmented.shape != image.shape or augmented.dtype != np.uint8:
        raise ValueError(
            f"augmentation returned an image of shape {augmented.shape} and dtype {augmented.dtype} "
            f"for an input of shape {image.shape} and dtype uint8. The pipeline needs both unchanged: "
            "remove resizing, cropping or dtype-changing transforms, or resize the image cache instead."
        )
    return augmented


# State of a worker process: augmentations by token, oldest first.
_worker_augmentations: dict[str, A.Compose] = {}


def _augment_shared_slice(block_name: str, shape: tuple[int, ...], start: int, stop: int, image_seeds: np.ndarray,
                          token: str, payload: bytes) -> None:
    """Augment rows [start, stop) of the batch in shared-memory block ``block_name``, in a worker process."""
    augmentation = _worker_augmentations.get(token)
    if augmentation is None:
        augmentation = pickle.loads(payload)
        _worker_augmentations[token] = augmentation
        while len(_worker_augmentations) > _WORKER_CACHE_SIZE:
            del _worker_augmentations[next(iter(_worker_augmentations))]
    block = shared_memory.SharedMemory(name=block_name)
    try:
        batch = np.ndarray(shape, dtype=np.uint8, buffer=block.buf)
        _augment_slice(augmentation, batch, range(start, stop), image_seeds)
        del batch
    finally:
        block.close()


def _start_worker() -> None:
    # Each worker augments one image at a time, and the pool already runs one worker per core, so
    # OpenCV's own threads would only add hand-offs.
    cv2.setNumThreads(1)


def _process_pool(num_workers: int) -> ProcessPoolExecutor:
    """Return the process-wide pool of ``num_workers`` augmentation processes, starting it on first use."""
    with _pools_lock:
        pool = _pools.get(num_workers)
        if pool is None:
            # forkserver starts workers from a clean server process, not by forking this one, which
            # may run TensorFlow and Ray threads. The server imports the augmentation module once.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["data.augment"])
            pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=context, initializer=_start_worker)
            _pools[num_workers] = pool
            logger.debug("Started %d augmentation processes", num_workers)
        return pool


def _discard_pool(num_workers: int, pool: ProcessPoolExecutor) -> None:
    with _pools_lock:
        if _pools.get(num_workers) is pool:
            del _pools[num_workers]
    pool.shutdown(wait=False, cancel_futures=True)


def _usable_cores() -> int:
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return len(usable) if usable else os.cpu_count() or 1


def _checked_num_workers(num_workers: int | None) -> int:
    if num_workers is None:
        return _usable_cores()
    if isinstance(num_workers, bool) or not isinstance(num_workers, numbers.Integral) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0 or None, got {num_workers!r}. Pass the number of "
                         "augmentation processes, 0 to augment in the loading thread, or None for one per CPU core.")
    return int(num_workers)


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray):
        raise TypeError(
            f"images must be a numpy array or np.memmap of shape (N, S, S, 3), got {type(images).__name__}. "
            "Pass the image cache opened with np.load(..., mmap_mode='r') or np.memmap."
        )
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] != 3 or images.shape[0] == 0:
        raise ValueError(
            f"images must have shape (N, S, S, 3) with N >= 1 (square RGB images), got {images.shape}. "
            "Resize the images to a square side S when building the cache."
        )
    if images.dtype != np.uint8:
        raise ValueError(
            f"images must have dtype uint8 with pixels in [0, 255], got {images.dtype}. "
            "Store the cache as uint8, without scaling or backbone preprocessing."
        )


def _checked_rows(rows: np.ndarray, *, num_images: int) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or rows.shape[0] == 0:
        raise ValueError(
            f"rows must be a non-empty 1-D array of image indices, got shape {rows.shape}. "
            "Pass one index into images per training example."
        )
    if not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"rows must have an integer dtype, got {rows.dtype}. Pass indices, e.g. rows.astype(np.int64).")
    low, high = int(rows.min()), int(rows.max())
    if low < 0 or high >= num_images:
        raise ValueError(
            f"rows must be in [0, {num_images - 1}] because images has {num_images} rows, "
            f"got values from {low} to {high}. Pass indices into the image cache that images was loaded from."
        )
    return rows.astype(np.int64, copy=False)


def _checked_labels(labels: np.ndarray, *, num_rows: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (num_rows,):
        raise ValueError(
            f"labels must have shape ({num_rows},) to match rows, got {labels.shape}. Pass one label per entry of rows."
        )
    invalid = ~np.isin(labels, (0, 1))
    if invalid.any():
        position = int(np.flatnonzero(invalid)[0])
        raise ValueError(
            f"labels must be 0 (benign) or 1 (melanoma), got {labels[position].item()!r} at position {position}. "
            "Map the diagnosis column to {0, 1} before building the dataset."
        )
    return labels.astype(np.float32)


def _checked_sample_weights(sample_weights: np.ndarray, *, num_rows: int) -> np.ndarray:
    sample_weights = np.asarray(sample_weights, dtype=np.float32)
    if sample_weights.shape != (num_rows,):
        raise ValueError(
            f"sample_weights must have shape ({num_rows},) to match rows, got {sample_weights.shape}. "
            "Pass one weight per entry of rows, or None."
        )
    invalid = ~np.isfinite(sample_weights) | (sample_weights < 0)
    if invalid.any():
        position = int(np.flatnonzero(invalid)[0])
        raise ValueError(
            f"sample_weights must be finite and >= 0, got {sample_weights[position].item()!r} at position {position}. "
            "Pass per-row weights such as inverse class frequencies, or None for equal weights."
        )
    return sample_weights


def _checked_blend(partner_rows: np.ndarray | None, blend_weights: np.ndarray | None, *, num_images: int,
                   num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    if partner_rows is None or blend_weights is None:
        raise ValueError("partner_rows and blend_weights must be given together, or both left None. "
                         "Pass BalancedRows.partner_rows and BalancedRows.blend_weights.")
    partner_rows = _checked_rows(partner_rows, num_images=num_images)
    if partner_rows.shape != (num_rows,):
        raise ValueError(f"partner_rows must have shape ({num_rows},) to match rows, got {partner_rows.shape}.")
    blend_weights = np.asarray(blend_weights, dtype=np.float32)
    if blend_weights.shape != (num_rows,):
        raise ValueError(f"blend_weights must have shape ({num_rows},) to match rows, got {blend_weights.shape}.")
    invalid = ~np.isfinite(blend_weights) | (blend_weights < 0) | (blend_weights > 1)
    if invalid.any():
        position = int(np.flatnonzero(invalid)[0])
        raise ValueError(f"blend_weights must be in [0, 1], got {blend_weights[position].item()!r} at position "
                         f"{position}. Pass the weights from balance_rows(..., method='smote').")
    return partner_rows, blend_weights


def _check_batching(batch_size: int, *, drop_remainder: bool, num_rows: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size must be an integer number of images, got {batch_size!r}. Pass an int such as 32.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 image, got {batch_size}. Pass a positive int such as 32.")
    if drop_remainder and num_rows < batch_size:
        raise ValueError(
            f"drop_remainder=True with {num_rows} rows and batch_size {batch_size} yields no batch. "
            "Lower batch_size or pass drop_remainder=False."
        )


def _check_augmentation(augmentation: A.Compose | None) -> None:
    if augmentation is not None and not isinstance(augmentation, (A.BaseCompose, A.BasicTransform)):
        raise TypeError(
            f"augmentation must be an albumentations transform or None, got {type(augmentation).__name__}. "
            "Pass the result of build_augmentation(...)."
        )
