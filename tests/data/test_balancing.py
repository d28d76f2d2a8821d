"""Tests for balancing the training rows."""

import tracemalloc

import numpy as np
import pytest

from data.balancing import balance_rows

ROWS = np.arange(100, 200)
LABELS = np.array([1] * 20 + [0] * 80)


def test_balance_rows_none_keeps_rows():
    result = balance_rows(ROWS, LABELS, method="none")
    assert np.array_equal(result.rows, ROWS)
    assert result.sample_weights is None


def test_balance_rows_class_weight_inverse_frequency():
    result = balance_rows(ROWS, LABELS, method="class_weight")
    assert result.class_weight == pytest.approx({0: 100 / (2 * 80), 1: 100 / (2 * 20)})
    assert result.sample_weights[LABELS == 1].sum() == pytest.approx(result.sample_weights[LABELS == 0].sum())


def test_balance_rows_class_weight_changes_loss():
    import keras

    balanced = balance_rows(ROWS, LABELS, method="class_weight")
    features = np.random.default_rng(0).normal(size=(len(LABELS), 4)).astype("float32")
    targets = LABELS.astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(loss=keras.losses.BinaryCrossentropy())

    unweighted = model.evaluate(features, targets, batch_size=len(LABELS), verbose=0)
    weighted = model.evaluate(features, targets, sample_weight=balanced.sample_weights, batch_size=len(LABELS),
                              verbose=0)
    per_sample = keras.ops.convert_to_numpy(
        keras.losses.binary_crossentropy(targets[:, None], model.predict(features, verbose=0)))

    assert balanced.sample_weights.sum() == pytest.approx(len(LABELS))
    assert balanced.sample_weights[LABELS == 1].sum() == pytest.approx(balanced.sample_weights[LABELS == 0].sum())
    assert weighted != pytest.approx(unweighted, rel=1e-3)
    # Equal class totals make the weighted loss the plain mean of the two per-class mean losses.
    class_mean = 0.5 * (per_sample[LABELS == 1].mean() + per_sample[LABELS == 0].mean())
    assert weighted == pytest.approx(class_mean, rel=1e-4)
    assert unweighted == pytest.approx(per_sample.mean(), rel=1e-4)


def test_balance_rows_undersample_one_to_one():
    result = balance_rows(ROWS, LABELS, method="undersample", seed=1)
    assert len(result.rows) == 40
    assert result.labels.sum() == 20
    assert set(result.rows) <= set(ROWS)
    assert len(set(result.rows)) == 40


def test_balance_rows_oversample_repeats_rows():
    result = balance_rows(ROWS, LABELS, method="oversample", seed=1)
    assert len(result.rows) == 160
    assert result.labels.sum() == 80
    positives = result.rows[result.labels == 1]
    assert set(positives) == set(ROWS[:20])
    label_of = dict(zip(ROWS, LABELS))
    assert all(label_of[row] == label for row, label in zip(result.rows, result.labels))


def test_balance_rows_unknown_method():
    with pytest.raises(ValueError, match="Invalid balancing method 'smote2'"):
        balance_rows(ROWS, LABELS, method="smote2")


def _clustered_images(path, *, clusters: int, per_cluster: int, majority: int, size: int = 32):
    """Write a memmap whose minority images form tight clusters far apart; return (images, rows, labels).

    Minority image j of cluster c has pixels 60 * c plus noise in [0, 4], so its nearest minority neighbours
    are the other images of its cluster. Majority images follow the minority ones.
    """
    count = clusters * per_cluster + majority
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, size, size, 3))
    rng = np.random.default_rng(0)
    for row in range(clusters * per_cluster):
        images[row] = 60 * (row // per_cluster) + rng.integers(0, 5, (size, size, 3))
    images[clusters * per_cluster:] = rng.integers(0, 256, (majority, size, size, 3))
    images.flush()
    labels = np.array([1] * (clusters * per_cluster) + [0] * majority)
    return np.load(path, mmap_mode="r"), np.arange(count), labels


def test_balance_rows_smote_one_to_one(tmp_path):
    images, rows, labels = _clustered_images(tmp_path / "images.npy", clusters=4, per_cluster=4, majority=40)
    result = balance_rows(rows, labels, method="smote", images=images, smote_k=3, seed=2)
    assert result.num_synthetic == 40 - 16
    assert len(result.rows) == 80
    assert result.labels.sum() == 40
    assert np.array_equal(result.rows[:56], rows)
    assert np.array_equal(result.partner_rows[:56], rows)
    assert np.all(result.blend_weights[:56] == 0)


def test_balance_rows_smote_pairs_are_minority_neighbours(tmp_path):
    images, rows, labels = _clustered_images(tmp_path / "images.npy", clusters=4, per_cluster=4, majority=40)
    result = balance_rows(rows, labels, method="smote", images=images, smote_k=3, seed=2)
    first, second = result.rows[56:], result.partner_rows[56:]
    weights = result.blend_weights[56:]
    assert np.all(labels[first] == 1)
    assert np.all(labels[second] == 1)
    assert np.all(first != second)
    assert np.array_equal(first // 4, second // 4)
    assert np.all((weights >= 0) & (weights <= 1))
    assert np.all(result.labels[56:] == 1)


def test_balance_rows_smote_reads_no_full_copy(tmp_path):
    images, rows, labels = _clustered_images(tmp_path / "images.npy", clusters=5, per_cluster=10, majority=1950,
                                             size=64)
    tracemalloc.start()
    try:
        result = balance_rows(rows, labels, method="smote", images=images, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.num_synthetic == 1900
    assert peak < images.nbytes / 10


def test_balance_rows_smote_needs_images():
    with pytest.raises(ValueError, match="smote balancing needs the image cache"):
        balance_rows(ROWS, LABELS, method="smote")


def test_balance_rows_smote_single_minority_image(tmp_path):
    images, rows, labels = _clustered_images(tmp_path / "images.npy", clusters=1, per_cluster=1, majority=5)
    with pytest.raises(ValueError, match="needs at least 2 training images of class 1, got 1"):
        balance_rows(rows, labels, method="smote", images=images)


def test_balance_rows_smote_invalid_k(tmp_path):
    images, rows, labels = _clustered_images(tmp_path / "images.npy", clusters=2, per_cluster=2, majority=5)
    with pytest.raises(ValueError, match="Invalid smote_k 0"):
        balance_rows(rows, labels, method="smote", images=images, smote_k=0)
