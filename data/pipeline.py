"""tf.data input pipeline that reads image-cache rows and applies Albumentations.

The pipeline carries only row positions through tf.data. Each batch of
positions goes to one `tf.numpy_function`, which gathers the batch's rows
from the image array (usually a read-only `np.memmap`, so only those rows
are read) and augments the images on a thread pool. OpenCV releases the GIL
while it works, so the threads overlap in the OpenCV calls. Casting to float32 happens after the
function returns and after the prefetch buffer, so only uint8 pixels cross the Python boundary and
wait in the buffer.
"""

from __future__ import annotations

import copy
import logging
import numbers
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import albumentations as A
import cv2
import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

# Tasks per thread for each batch. More tasks balance the threads better when one of them
# falls behind, and fewer tasks cost less in scheduling.
_CHUNKS_PER_THREAD = 2

_executor: ThreadPoolExecutor | None = None
_executor_threads = 0
_executor_lock = threading.Lock()


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
    blend = None
    if partner_rows is not None or blend_weights is not None:
        blend = _checked_blend(partner_rows, blend_weights, num_images=images.shape[0], num_rows=rows.shape[0])

    loader = _BatchLoader(images=images, rows=rows, augmentation=augmentation, blend=blend)
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
        "on" if augmentation is not None else "off",
        shuffle,
        seed,
    )
    # The prefetch buffer keeps uint8 batches, a quarter of the memory of float32 ones, and the cast runs
    # as the model takes each batch.
    return dataset.prefetch(tf.data.AUTOTUNE).map(to_float)


class _BatchLoader:
    """Gathers a batch of rows, blends SMOTE pairs and augments the images on the shared thread pool."""

    def __init__(self, *, images: np.ndarray, rows: np.ndarray, augmentation: A.Compose | None,
                 blend: tuple[np.ndarray, np.ndarray] | None = None):
        self._images = images
        self._rows = rows
        self._augmentation = augmentation
        self._blend = blend
        # Albumentations transforms keep their random generators as attributes,
        # so each worker thread gets its own copy of the augmentation.
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
        executor, num_threads = _shared_executor()
        num_chunks = min(batch.shape[0], num_threads * _CHUNKS_PER_THREAD)
        futures = [
            executor.submit(self._augment_in_place, batch, indices, image_seeds[indices])
            for indices in np.array_split(np.arange(batch.shape[0]), num_chunks)
        ]
        for future in futures:
            future.result()
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

    def _augment_in_place(self, batch: np.ndarray, indices: np.ndarray, image_seeds: np.ndarray) -> None:
        augmentation = getattr(self._thread_state, "augmentation", None)
        if augmentation is None:
            augmentation = copy.deepcopy(self._augmentation)
            self._thread_state.augmentation = augmentation

        for index, image_seed in zip(indices, image_seeds):
            batch[index] = self._augment_one(augmentation, batch[index], int(image_seed))

    @staticmethod
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


def _shared_executor() -> tuple[ThreadPoolExecutor, int]:
    """Return the process-wide augmentation thread pool, with one thread per usable CPU core, and its size."""
    # NOTE: "usable" means the process's CPU affinity, not a Ray trial's CPU reservation, so
    # several trials on one node each start a thread per core and oversubscribe the node.
    global _executor, _executor_threads
    with _executor_lock:
        if _executor is None:
            usable_cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
            _executor_threads = len(usable_cores) if usable_cores else os.cpu_count() or 1
            _executor = ThreadPoolExecutor(max_workers=_executor_threads, thread_name_prefix="lesiontune-augment")
            # The pool already runs one image per core, so OpenCV's own parallel loops only add
            # thread hand-offs (measured: 1.5x the CPU per image at intensity 0.5 on 2 cores).
            # NOTE: cv2.setNumThreads is process-wide, so other OpenCV users in a trial run single-threaded too.
            cv2.setNumThreads(1)
            logger.debug("Started %d augmentation threads; OpenCV set to 1 thread per call", _executor_threads)
        return _executor, _executor_threads


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
