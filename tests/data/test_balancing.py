"""Tests for balancing the training rows."""

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
