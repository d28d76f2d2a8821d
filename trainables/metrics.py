"""Recall-weighted classification metrics and the choice of the operating threshold.

AUC and average precision come from ``isic-challenge-scoring``, the ISIC challenge's own scorer. The
partial AUC is the ISIC 2024 challenge metric: the area under the ROC curve and above a true-positive
rate of 0.8, unnormalised, so it ranges from 0 to 0.2. isic-challenge-scoring 5.6 only has the ISIC 2019
variant (the area under the curve where sensitivity >= 0.8, down to TPR 0), so it is computed here the
way the ISIC 2024 scoring code does, and the tests check it against the 2019 variant minus the rectangle
below TPR 0.8.
Metrics that a set of labels cannot define (for example AUC with one class only) are NaN, never 0.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from isic_challenge_scoring import metrics as isic_metrics
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

__all__ = ["OBJECTIVES", "ClassificationMetrics", "choose_threshold", "evaluate_scores", "f_beta",
           "partial_auc_above_tpr"]

OBJECTIVES = ("pauc80", "f2", "sens_at_spec", "auc")
"""Objectives a search can maximise; each names a field of :class:`ClassificationMetrics`."""

PAUC_MIN_SENSITIVITY = 0.8


@dataclass(frozen=True)
class ClassificationMetrics:
    """Metrics of one set of scores; NaN where the labels cannot define a value."""

    auc: float
    pauc80: float  # in [0, 0.2]
    average_precision: float
    threshold: float  # operating threshold the threshold-dependent metrics use
    sensitivity: float
    specificity: float
    f2: float
    balanced_accuracy: float
    sens_at_spec: float  # best sensitivity with specificity >= specificity_target
    spec_at_sens: float  # best specificity with sensitivity >= sensitivity_target
    specificity_target: float
    sensitivity_target: float
    positives: int
    negatives: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def f_beta(sensitivity: float, precision: float, beta: float = 2.0) -> float:
    """Return the F-beta score; F2 weighs sensitivity four times as much as precision."""
    if sensitivity + precision == 0:
        return 0.0
    return (1 + beta**2) * precision * sensitivity / (beta**2 * precision + sensitivity)


def choose_threshold(labels: np.ndarray, scores: np.ndarray, *, beta: float = 2.0) -> float:
    """Return the score threshold (predict positive when score >= threshold) that maximises F-beta.

    Ties go to the lower threshold, which favours sensitivity. Returns 0.5 when the labels have no positive.
    """
    labels = np.asarray(labels)
    if labels.sum() == 0:
        return 0.5
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last precision/recall pair has no threshold (recall 0 by convention).
    precision, recall = precision[:-1], recall[:-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        f_scores = (1 + beta**2) * precision * recall / (beta**2 * precision + recall)
    f_scores = np.nan_to_num(f_scores, nan=0.0)
    best = np.flatnonzero(f_scores == f_scores.max())
    return float(thresholds[best].min())


def partial_auc_above_tpr(labels: np.ndarray, scores: np.ndarray, *, min_tpr: float = PAUC_MIN_SENSITIVITY) -> float:
    """Return the ROC area above ``min_tpr``, in [0, 1 - min_tpr] (ISIC 2024 pAUC for ``min_tpr=0.8``).

    Flipping labels and scores turns the region TPR >= min_tpr into FPR <= 1 - min_tpr, whose partial area
    scikit-learn computes with the McClish correction; the last line undoes that correction.
    """
    max_fpr = 1.0 - min_tpr
    flipped = roc_auc_score(1 - np.asarray(labels), -np.asarray(scores), max_fpr=max_fpr)
    return float(0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / (1.0 - 0.5) * (flipped - 0.5))


def _rate(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def evaluate_scores(
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    threshold: float | None = None,
    specificity_target: float = 0.8,
    sensitivity_target: float = 0.866,
) -> ClassificationMetrics:
    """Compute every metric of ``scores`` against ``labels``.

    Args:
        labels: (N,) ground truth in {0, 1}.
        scores: (N,) predicted probabilities of the positive class, in [0, 1].
        threshold: operating threshold; None chooses the F2-maximising one on these labels (validation).
        specificity_target: the fixed specificity of ``sens_at_spec``.
        sensitivity_target: the fixed sensitivity of ``spec_at_sens``; the default 0.866 is the mean
            sensitivity of dermatologists in Haenssle et al., Annals of Oncology 2018.
    """
    labels = np.asarray(labels).astype(np.int64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must have the same shape.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("Scores contain NaN or infinity; the model diverged.")
    positives, negatives = int(labels.sum()), int(len(labels) - labels.sum())
    both_classes = positives > 0 and negatives > 0

    if threshold is None:
        threshold = choose_threshold(labels, scores)
    predicted = scores >= threshold
    true_positive = int(np.sum(predicted & (labels == 1)))
    true_negative = int(np.sum(~predicted & (labels == 0)))
    sensitivity = _rate(true_positive, positives)
    specificity = _rate(true_negative, negatives)
    precision = _rate(true_positive, int(predicted.sum()))

    if both_classes:
        truth, prediction = pd.Series(labels, dtype=float), pd.Series(scores)
        weights = pd.Series(np.ones(len(labels)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            auc = float(isic_metrics.auc(truth, prediction, weights))
            average_precision = float(isic_metrics.average_precision(truth, prediction, weights))
        pauc = partial_auc_above_tpr(labels, scores)
        false_positive_rate, true_positive_rate, _ = roc_curve(labels, scores)
        meets_specificity = (1 - false_positive_rate) >= specificity_target
        sens_at_spec = float(true_positive_rate[meets_specificity].max()) if meets_specificity.any() else 0.0
        meets_sensitivity = true_positive_rate >= sensitivity_target
        spec_at_sens = float((1 - false_positive_rate[meets_sensitivity]).max()) if meets_sensitivity.any() else 0.0
        f2 = f_beta(sensitivity, 0.0 if math.isnan(precision) else precision)
        balanced_accuracy = (sensitivity + specificity) / 2
    else:
        auc = pauc = average_precision = sens_at_spec = spec_at_sens = f2 = balanced_accuracy = math.nan

    return ClassificationMetrics(
        auc=auc, pauc80=pauc, average_precision=average_precision, threshold=float(threshold),
        sensitivity=sensitivity, specificity=specificity, f2=f2, balanced_accuracy=balanced_accuracy,
        sens_at_spec=sens_at_spec, spec_at_sens=spec_at_sens, specificity_target=specificity_target,
        sensitivity_target=sensitivity_target, positives=positives, negatives=negatives,
    )
