"""Metrics against isic-challenge-scoring, the official ISIC scorer, on random and edge cases."""

import math

import numpy as np
import pandas as pd
import pytest
from isic_challenge_scoring import metrics as isic_metrics
from isic_challenge_scoring.confusion import create_binary_confusion_matrix
from sklearn.metrics import roc_curve

from trainables.metrics import choose_threshold, evaluate_scores, partial_auc_above_tpr


def _random_case(seed: int, size: int = 300, ties: bool = False):
    rng = np.random.default_rng(seed)
    labels = (rng.random(size) < 0.25).astype(int)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
    if ties:
        scores = np.round(scores, 1)
    return labels, scores


def _series(labels, scores):
    return pd.Series(labels, dtype=float), pd.Series(scores), pd.Series(np.ones(len(labels)))


@pytest.mark.parametrize("seed,ties", [(0, False), (1, False), (2, True), (3, True)])
def test_evaluate_scores_matches_isic_scorer(seed, ties):
    labels, scores = _random_case(seed, ties=ties)
    truth, prediction, weights = _series(labels, scores)
    metrics = evaluate_scores(labels, scores, threshold=0.5)
    matrix = create_binary_confusion_matrix(labels.astype(float), (scores >= 0.5).astype(float))
    assert metrics.auc == pytest.approx(isic_metrics.auc(truth, prediction, weights))
    assert metrics.sensitivity == pytest.approx(isic_metrics.binary_sensitivity(matrix))
    assert metrics.specificity == pytest.approx(isic_metrics.binary_specificity(matrix))
    assert metrics.average_precision == pytest.approx(isic_metrics.average_precision(truth, prediction, weights))


@pytest.mark.parametrize("seed,ties", [(0, False), (4, False), (5, True)])
def test_partial_auc_matches_isic_2019_variant(seed, ties):
    labels, scores = _random_case(seed, ties=ties)
    truth, prediction, weights = _series(labels, scores)
    # isic-challenge-scoring integrates TPR from the FPR where TPR reaches 0.8; removing the rectangle
    # below TPR 0.8 gives the ISIC 2024 area above TPR 0.8.
    area_2019 = isic_metrics.auc_above_sensitivity(truth, prediction, weights, 0.8)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    index = tpr.searchsorted(0.8, side="left")
    fpr_at_threshold = np.interp(0.8, tpr[index - 1:index + 1], fpr[index - 1:index + 1])
    assert partial_auc_above_tpr(labels, scores) == pytest.approx(area_2019 - 0.8 * (1 - fpr_at_threshold))


def test_partial_auc_range_extremes():
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert partial_auc_above_tpr(labels, np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])) == pytest.approx(0.2)
    assert partial_auc_above_tpr(labels, np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])) == pytest.approx(0.0)
    labels, scores = _random_case(9)
    assert 0.0 <= evaluate_scores(labels, scores).pauc80 <= 0.2


def test_evaluate_scores_one_class_undefined():
    metrics = evaluate_scores(np.zeros(10), np.linspace(0, 1, 10))
    assert math.isnan(metrics.auc)
    assert math.isnan(metrics.pauc80)
    assert math.isnan(metrics.sensitivity)
    assert metrics.specificity == pytest.approx(0.5)


def test_choose_threshold_maximises_f2():
    labels, scores = _random_case(11)
    threshold = choose_threshold(labels, scores)
    best = evaluate_scores(labels, scores, threshold=threshold).f2
    for other in np.linspace(0.05, 0.95, 19):
        assert evaluate_scores(labels, scores, threshold=other).f2 <= best + 1e-12


def test_evaluate_scores_sens_at_spec():
    labels = np.array([0] * 10 + [1] * 10)
    scores = np.concatenate([np.linspace(0, 0.9, 10), np.linspace(0.5, 1.0, 10)])
    metrics = evaluate_scores(labels, scores, specificity_target=0.8)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert metrics.sens_at_spec == pytest.approx(tpr[(1 - fpr) >= 0.8].max())


def test_evaluate_scores_rejects_nan():
    with pytest.raises(ValueError, match="NaN or infinity"):
        evaluate_scores(np.array([0, 1]), np.array([0.2, np.nan]))
