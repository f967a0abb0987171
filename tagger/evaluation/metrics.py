"""Evaluation metrics, pure NumPy (no I/O): classification, calibration, retrieval, duplicate thresholds.

Conventions used throughout:

* Labels are integer indices ``0..n_labels-1``; ``y_true`` and ``y_pred`` are 1-D integer arrays.
* A ratio with an empty denominator (precision of a label never predicted, recall of a label with no
  support, precision at a threshold that accepts nothing) is 0.0 for per-label figures, as in
  scikit-learn's ``zero_division=0``, and ``nan`` for curve points, so plots leave a gap.
* Weighted F1 averages per-label F1 weighted by support (true count); macro F1 is the plain mean
  over labels that occur in ``y_true`` or ``y_pred``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


# ---- classification -------------------------------------------------------------------------------


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> np.ndarray:
    """(n_labels, n_labels) int64 counts; rows are true labels, columns predicted labels."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError("y_true and y_pred must have the same length")
    matrix = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


@dataclass(frozen=True)
class PerLabel:
    """Per-label figures, index-aligned with the label order of the confusion matrix."""

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray  # true count per label
    predicted: np.ndarray  # predicted count per label


def per_label_scores(matrix: np.ndarray) -> PerLabel:
    """Precision, recall, F1 and support of every label from a confusion matrix."""
    matrix = np.asarray(matrix)
    tp = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return PerLabel(precision, recall, f1, support.astype(np.int64), predicted.astype(np.int64))


def accuracy(matrix: np.ndarray) -> float:
    total = matrix.sum()
    return float(np.trace(matrix) / total) if total else 0.0


def weighted_f1(matrix: np.ndarray) -> float:
    scores = per_label_scores(matrix)
    total = scores.support.sum()
    return float((scores.f1 * scores.support).sum() / total) if total else 0.0


def macro_f1(matrix: np.ndarray) -> float:
    """Mean F1 over labels that appear as truth or prediction (absent labels would add meaningless zeros)."""
    scores = per_label_scores(matrix)
    present = (scores.support > 0) | (scores.predicted > 0)
    return float(scores.f1[present].mean()) if present.any() else 0.0


# ---- calibration -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reliability:
    """Equal-width confidence bins: edges (n_bins+1), and per bin count, mean confidence, accuracy."""

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray  # nan where empty
    accuracy: np.ndarray  # nan where empty
    ece: float


def reliability(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> Reliability:
    """Reliability bins and expected calibration error, ECE = sum_b (n_b / N) * |acc_b - conf_b|.

    A confidence of exactly 1.0 falls in the last bin; bins are right-closed otherwise ``(lo, hi]``
    except the first, which also takes 0.0.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(index, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
        mean_acc = np.where(count > 0, acc_sum / np.maximum(count, 1), np.nan)
    n = count.sum()
    gaps = np.abs(np.nan_to_num(mean_acc) - np.nan_to_num(mean_conf)) * count
    ece = float(gaps.sum() / n) if n else 0.0
    return Reliability(edges, count, mean_conf, mean_acc, ece)


# ---- precision vs coverage -------------------------------------------------------------------------


@dataclass(frozen=True)
class CoverageCurve:
    """Accepting a prediction when its score is >= threshold: the share accepted and their precision."""

    thresholds: np.ndarray
    coverage: np.ndarray
    precision: np.ndarray  # nan where nothing is accepted
    accepted: np.ndarray


def precision_coverage(scores: np.ndarray, correct: np.ndarray, thresholds: np.ndarray) -> CoverageCurve:
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    cum_correct = np.concatenate([[0], np.cumsum(correct[order])])
    # number of scores >= t: position of t in the descending list
    accepted = np.searchsorted(-sorted_scores, -thresholds, side="right")
    n = len(scores)
    coverage = accepted / n if n else np.zeros_like(thresholds)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(accepted > 0, cum_correct[accepted] / np.maximum(accepted, 1), np.nan)
    return CoverageCurve(thresholds, coverage.astype(np.float64), precision, accepted.astype(np.int64))


def threshold_for_precision(scores: np.ndarray, correct: np.ndarray, target: float) -> float | None:
    """The smallest threshold whose accepted predictions (score >= threshold) reach ``target`` precision.

    Candidates are the observed scores themselves, so the answer is exact, not limited to a grid; the
    smallest such threshold gives the largest coverage. None when no threshold reaches the target.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return None
    candidates = np.unique(scores)
    curve = precision_coverage(scores, correct, candidates)
    ok = np.nan_to_num(curve.precision, nan=-1.0) >= target
    return float(candidates[ok].min()) if ok.any() else None


# ---- retrieval -------------------------------------------------------------------------------------


def ranks_of_relevant(scores: np.ndarray, relevant: np.ndarray | None = None) -> np.ndarray:
    """1-based rank of each query's single relevant candidate in its row of ``scores`` (queries x candidates).

    ``relevant[i]`` is the candidate index relevant to query i (default: i, the diagonal). Ties are
    broken pessimistically: a candidate scoring equal to the relevant one ranks ahead of it, so a
    degenerate model with constant scores gets no free hits.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[0]
    relevant = np.arange(n) if relevant is None else np.asarray(relevant, dtype=np.int64)
    own = scores[np.arange(n), relevant][:, None]
    ahead = (scores >= own).sum(axis=1)  # includes the relevant item itself
    return ahead.astype(np.int64)


def hits_at_k(ranks: np.ndarray, k: int) -> float:
    ranks = np.asarray(ranks)
    return float((ranks <= k).mean()) if ranks.size else 0.0


def mean_reciprocal_rank(ranks: np.ndarray) -> float:
    ranks = np.asarray(ranks, dtype=np.float64)
    return float((1.0 / ranks).mean()) if ranks.size else 0.0


# ---- duplicate thresholds --------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdSweep:
    """Pairs with similarity >= threshold are called duplicates; figures per threshold."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    precision: np.ndarray  # nan where nothing is called a duplicate
    recall: np.ndarray
    f1: np.ndarray


def threshold_sweep(similarity: np.ndarray, is_duplicate: np.ndarray, thresholds: np.ndarray) -> ThresholdSweep:
    similarity = np.asarray(similarity, dtype=np.float64)
    is_duplicate = np.asarray(is_duplicate, dtype=bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    pos = np.sort(similarity[is_duplicate])
    neg = np.sort(similarity[~is_duplicate])
    tp = len(pos) - np.searchsorted(pos, thresholds, side="left")
    fp = len(neg) - np.searchsorted(neg, thresholds, side="left")
    fn = len(pos) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), np.nan)
    recall = tp / len(pos) if len(pos) else np.zeros_like(thresholds)
    p0 = np.nan_to_num(precision)
    f1 = _ratio(2 * p0 * recall, p0 + recall)
    return ThresholdSweep(thresholds, tp.astype(np.int64), fp.astype(np.int64), fn.astype(np.int64), precision,
                          recall.astype(np.float64), f1)


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    rule: str  # "precision" or "f1"
    precision: float
    recall: float
    f1: float


def suggest_threshold(sweep: ThresholdSweep, min_precision: float = 0.98) -> ThresholdChoice:
    """The duplicate threshold to configure, by a fixed rule.

    1. The lowest threshold whose precision reaches ``min_precision`` (recall only falls as the
       threshold rises, so the lowest such threshold has the best recall among them): rule "precision".
    2. If no threshold reaches it, the threshold with the highest F1 (the highest such threshold on a
       tie, to favour precision): rule "f1".
    """
    precision = np.nan_to_num(sweep.precision, nan=-1.0)
    ok = np.flatnonzero((precision >= min_precision) & (sweep.tp > 0))
    if ok.size:
        i = int(ok[np.argmin(sweep.thresholds[ok])])
        rule = "precision"
    else:
        best = sweep.f1.max()
        i = int(np.flatnonzero(sweep.f1 == best).max())
        rule = "f1"
    return ThresholdChoice(float(sweep.thresholds[i]), rule, float(np.nan_to_num(sweep.precision[i])),
                           float(sweep.recall[i]), float(sweep.f1[i]))


def best_f1(sweep: ThresholdSweep) -> ThresholdChoice:
    best = sweep.f1.max()
    i = int(np.flatnonzero(sweep.f1 == best).max())
    return ThresholdChoice(float(sweep.thresholds[i]), "f1", float(np.nan_to_num(sweep.precision[i])),
                           float(sweep.recall[i]), float(sweep.f1[i]))


def grid(start: float, stop: float, step: float) -> np.ndarray:
    """An inclusive, rounded threshold grid (so 0.95 is exactly 0.95 in tables)."""
    count = int(round((stop - start) / step)) + 1
    return np.round(start + step * np.arange(count), 6)


def summarise(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {}
    return {"min": float(array.min()), "p05": float(np.quantile(array, 0.05)), "median": float(np.median(array)),
            "p95": float(np.quantile(array, 0.95)), "max": float(array.max())}
