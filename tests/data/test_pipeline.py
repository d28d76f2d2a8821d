import collections
import tracemalloc

import albumentations as A
import numpy as np
import pytest
import tensorflow as tf

from data.augment import build_augmentation
from data.pipeline import make_dataset

IMAGE_SIZE = 8


def _row_coded_images(count: int) -> np.ndarray:
    """Return `(count, 8, 8, 3)` uint8 images whose every pixel equals the image's row index."""
    assert count <= 256
    return np.broadcast_to(
        np.arange(count, dtype=np.uint8)[:, None, None, None], (count, IMAGE_SIZE, IMAGE_SIZE, 3)
    ).copy()


def _decoded_rows(x: np.ndarray) -> np.ndarray:
    """Recover the row index from each image of a batch of row-coded images."""
    return x[:, 0, 0, 0].astype(np.int64)


def _epoch(dataset: tf.data.Dataset) -> tuple[np.ndarray, ...]:
    """Concatenate one pass over the dataset into numpy arrays, one per element component."""
    batches = [tuple(component.numpy() for component in element) for element in dataset]
    return tuple(np.concatenate(parts) for parts in zip(*batches))


def test_make_dataset_element_spec_static():
    images = _row_coded_images(10)
    rows = np.arange(10)
    labels = np.zeros(10)

    spec = make_dataset(images, rows, labels, batch_size=4).element_spec
    dropped_spec = make_dataset(images, rows, labels, batch_size=4, drop_remainder=True).element_spec

    assert spec[0] == tf.TensorSpec((None, IMAGE_SIZE, IMAGE_SIZE, 3), tf.float32)
    assert spec[1] == tf.TensorSpec((None,), tf.float32)
    assert dropped_spec[0] == tf.TensorSpec((4, IMAGE_SIZE, IMAGE_SIZE, 3), tf.float32)
    assert dropped_spec[1] == tf.TensorSpec((4,), tf.float32)


def test_make_dataset_weighted_augmented_spec():
    images = _row_coded_images(10)
    augmentation = build_augmentation(1.0, image_size=IMAGE_SIZE)

    dataset = make_dataset(
        images, np.arange(10), np.zeros(10), batch_size=4, augmentation=augmentation, sample_weights=np.ones(10)
    )

    assert len(dataset.element_spec) == 3
    assert dataset.element_spec[2] == tf.TensorSpec((None,), tf.float32)
    for x, y, w in dataset:
        assert x.dtype == tf.float32
        assert x.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3)
        assert y.shape == x.shape[:1]
        assert w.shape == x.shape[:1]


def test_make_dataset_unaugmented_pixels_exact():
    images = np.random.default_rng(0).integers(0, 256, size=(12, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    rows = np.array([3, 0, 11, 5, 5, 7, 2])

    x, _ = _epoch(make_dataset(images, rows, np.zeros(7), batch_size=3))

    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, images[rows].astype(np.float32))


def test_make_dataset_shuffled_labels_aligned():
    images = _row_coded_images(40)
    rows = np.random.default_rng(1).permutation(40)
    labels = (rows % 2).astype(np.float32)
    weights = rows * 0.5

    x, y, w = _epoch(make_dataset(images, rows, labels, batch_size=7, shuffle=True, seed=3, sample_weights=weights))
    seen_rows = _decoded_rows(x)

    np.testing.assert_array_equal(y, seen_rows % 2)
    np.testing.assert_allclose(w, seen_rows * 0.5)


def test_make_dataset_oversampled_rows_repeat():
    images = _row_coded_images(5)
    rows = np.array([0, 1, 1, 2, 2, 2, 4])
    labels = np.array([0, 1, 1, 0, 0, 0, 1])

    x, y = _epoch(make_dataset(images, rows, labels, batch_size=3, shuffle=True, seed=0))

    assert collections.Counter(_decoded_rows(x).tolist()) == {0: 1, 1: 2, 2: 3, 4: 1}
    assert y.sum() == 3


def test_make_dataset_shuffle_differs_between_epochs():
    images = _row_coded_images(64)
    dataset = make_dataset(images, np.arange(64), np.zeros(64), batch_size=16, shuffle=True, seed=5)

    first = _decoded_rows(_epoch(dataset)[0])
    second = _decoded_rows(_epoch(dataset)[0])

    assert sorted(first) == list(range(64))
    assert sorted(second) == list(range(64))
    assert not np.array_equal(first, second)


def test_make_dataset_shuffle_reproducible():
    images = _row_coded_images(64)
    rows = np.arange(64)

    def two_epochs(seed: int) -> list[np.ndarray]:
        dataset = make_dataset(images, rows, np.zeros(64), batch_size=16, shuffle=True, seed=seed)
        return [_decoded_rows(_epoch(dataset)[0]) for _ in range(2)]

    first_run, second_run, other_seed = two_epochs(0), two_epochs(0), two_epochs(1)

    np.testing.assert_array_equal(first_run[0], second_run[0])
    np.testing.assert_array_equal(first_run[1], second_run[1])
    assert not np.array_equal(first_run[0], other_seed[0])


def test_make_dataset_without_shuffle_keeps_order():
    images = _row_coded_images(10)
    rows = np.array([9, 1, 4, 4, 0])

    x, _ = _epoch(make_dataset(images, rows, np.zeros(5), batch_size=2))

    np.testing.assert_array_equal(_decoded_rows(x), rows)


def test_make_dataset_augmentation_reproducible():
    images = np.random.default_rng(0).integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    augmentation = build_augmentation(1.0, image_size=32)

    def two_epochs(seed: int) -> list[np.ndarray]:
        dataset = make_dataset(images, np.arange(16), np.zeros(16), batch_size=4, augmentation=augmentation, seed=seed)
        return [_epoch(dataset)[0] for _ in range(2)]

    first_run, second_run = two_epochs(2), two_epochs(2)

    np.testing.assert_array_equal(first_run[0], second_run[0])
    np.testing.assert_array_equal(first_run[1], second_run[1])
    assert not np.array_equal(first_run[0], first_run[1])
    assert not np.array_equal(first_run[0], images.astype(np.float32))


def test_make_dataset_augmentation_keeps_pixel_range():
    images = np.random.default_rng(0).integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    augmentation = build_augmentation(1.0, image_size=32)

    x, _ = _epoch(make_dataset(images, np.arange(16), np.zeros(16), batch_size=5, augmentation=augmentation))

    assert x.shape == (16, 32, 32, 3)
    assert x.min() >= 0.0
    assert x.max() <= 255.0


def test_make_dataset_drop_remainder_full_batches():
    images = _row_coded_images(10)

    batch_sizes = [x.shape[0] for x, _ in make_dataset(images, np.arange(10), np.zeros(10), batch_size=4, drop_remainder=True)]

    assert batch_sizes == [4, 4]


def test_make_dataset_memmap_not_copied(tmp_path):
    count = 512
    path = tmp_path / "cache.npy"
    writable = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, 64, 64, 3))
    writable[:] = np.arange(count, dtype=np.uint16)[:, None, None, None] % 256
    writable.flush()
    del writable
    images = np.load(path, mmap_mode="r")
    rows = np.array([3, 300, 3])

    tracemalloc.start()
    dataset = make_dataset(images, rows, np.zeros(3), batch_size=3)
    x, _ = next(iter(dataset))
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    graph_bytes = len(dataset._as_serialized_graph().numpy())

    assert isinstance(images, np.memmap)
    np.testing.assert_array_equal(x.numpy()[:, 0, 0, 0], [3, 300 % 256, 3])
    assert peak_bytes < images.nbytes / 10
    assert graph_bytes < images.nbytes / 10


def test_make_dataset_resizing_augmentation_fails():
    images = _row_coded_images(4)
    resize = A.Compose([A.Resize(4, 4)])
    dataset = make_dataset(images, np.arange(4), np.zeros(4), batch_size=2, augmentation=resize)

    with pytest.raises(tf.errors.InvalidArgumentError, match="augmentation returned an image of shape"):
        next(iter(dataset))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"images": np.zeros((4, 8, 8, 3), np.float32)}, "images must have dtype uint8"),
        ({"images": np.zeros((4, 8, 6, 3), np.uint8)}, r"images must have shape \(N, S, S, 3\).*\(4, 8, 6, 3\)"),
        ({"rows": np.array([0, 1, 4, 2])}, r"rows must be in \[0, 3\].*from 0 to 4"),
        ({"rows": np.array([0.0, 1.0, 2.0, 3.0])}, "rows must have an integer dtype"),
        ({"rows": np.array([], dtype=np.int64), "labels": np.zeros(0)}, "rows must be a non-empty 1-D array"),
        ({"labels": np.zeros(3)}, r"labels must have shape \(4,\)"),
        ({"labels": np.array([0, 1, 2, 0])}, "labels must be 0 .* got 2 at position 2"),
        ({"labels": np.array([0, np.nan, 1, 0])}, "labels must be 0 .* at position 1"),
        ({"sample_weights": np.array([1, -1, 1, 1])}, "sample_weights must be finite and >= 0.* at position 1"),
        ({"sample_weights": np.ones(5)}, r"sample_weights must have shape \(4,\)"),
        ({"batch_size": 0}, "batch_size must be at least 1 image, got 0"),
        ({"batch_size": 8, "drop_remainder": True}, "drop_remainder=True with 4 rows and batch_size 8 yields no batch"),
    ],
)
def test_make_dataset_rejects_invalid_input(arguments, message):
    call = {"images": _row_coded_images(4), "rows": np.arange(4), "labels": np.zeros(4), "batch_size": 2}
    call.update(arguments)

    with pytest.raises(ValueError, match=message):
        make_dataset(**call)


def test_make_dataset_rejects_invalid_types():
    images = _row_coded_images(4)

    with pytest.raises(TypeError, match="images must be a numpy array"):
        make_dataset(images.tolist(), np.arange(4), np.zeros(4), batch_size=2)
    with pytest.raises(TypeError, match="augmentation must be an albumentations transform"):
        make_dataset(images, np.arange(4), np.zeros(4), batch_size=2, augmentation=lambda image: image)
    with pytest.raises(TypeError, match="batch_size must be an integer"):
        make_dataset(images, np.arange(4), np.zeros(4), batch_size=2.0)


def test_make_dataset_blends_smote_pairs():
    images = np.random.default_rng(3).integers(0, 256, size=(10, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    rows = np.array([0, 1, 2, 3])
    partners = np.array([0, 5, 7, 9])
    weights = np.array([0.0, 0.25, 1.0, 0.6], dtype=np.float32)

    x, _ = _epoch(make_dataset(images, rows, np.ones(4), batch_size=3, partner_rows=partners, blend_weights=weights))

    blend = (1 - weights[:, None, None, None]) * images[rows].astype(np.float32) + \
        weights[:, None, None, None] * images[partners].astype(np.float32)
    expected = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(x, expected.astype(np.float32))
    np.testing.assert_array_equal(x[0], images[0].astype(np.float32))
    np.testing.assert_array_equal(x[2], images[7].astype(np.float32))


@pytest.mark.parametrize("partners,weights,message", [
    (np.array([0, 1]), None, "partner_rows and blend_weights must be given together"),
    (np.array([0, 1, 2]), np.array([0.0, 0.5]), r"partner_rows must have shape \(2,\)"),
    (np.array([0, 1]), np.array([0.0, 1.5]), r"blend_weights must be in \[0, 1\], got 1.5 at position 1"),
    (np.array([0, 99]), np.array([0.0, 0.5]), r"rows must be in \[0, 9\]"),
])
def test_make_dataset_invalid_blend(partners, weights, message):
    images = _row_coded_images(10)
    with pytest.raises(ValueError, match=message):
        make_dataset(images, np.array([0, 1]), np.ones(2), batch_size=2, partner_rows=partners,
                     blend_weights=weights)
