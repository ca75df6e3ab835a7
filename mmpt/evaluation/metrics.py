"""Per-dataset metrics from labels and class scores, with medmnist's definitions of AUC and ACC.

"auc" and "acc" reproduce medmnist.evaluator.getAUC / getACC (tests check equality); they are
computed here with scikit-learn so that an undefined AUC gives NaN instead of an exception. "ece", "brier" and
"nll" say how well the scores are calibrated (whether a predicted probability of 0.9 comes true 90 % of the time);
lower is better for them, as for "mae".
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    mean_absolute_error,
    roc_auc_score,
)

from mmpt.tasks import BINARY, MULTI_LABEL, ORDINAL, TaskSpec

THRESHOLD = 0.5  # medmnist's decision threshold for binary and multi-label scores
CALIBRATION = ("ece", "brier", "nll")  # computed from the scores as probabilities; lower is better
LOWER_IS_BETTER = frozenset({"mae", *CALIBRATION})
ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (evaluation.ece_bins)
PROBABILITY_FLOOR = 1e-12  # a probability of 0 for the true class would make the NLL infinite


def compute_metrics(
    task: TaskSpec,
    labels: np.ndarray,
    scores: np.ndarray,
    names: tuple[str, ...] | list[str] | None = None,
    grade_rule: str = "argmax",
    bins: int = ECE_BINS,
) -> dict[str, float]:
    """Return {"auc", "acc", "balanced_acc", "kappa", "ece", "brier", "nll"} (plus "qwk", "mae" for ordinal tasks)
    as floats.

    `names` restricts the result to those metrics (the others are not computed: bootstrap loops need speed).

    labels: int N×L as medmnist stores them; scores: N×K from the loss's `scores` (N×2 for binary,
    whose last column is the positive class; N×14 sigmoids for multi-label).
    - auc, acc: exactly medmnist's getAUC / getACC (binary: score[:, -1] > 0.5; multi-label: mean over
      labels with threshold 0.5; multi-class and ordinal: argmax, one-vs-rest AUC averaged over classes).
    - balanced_acc, kappa (Cohen's): on the same predictions as acc; for multi-label, the mean over
      labels of each label's balanced accuracy / kappa at threshold 0.5.
    - qwk (quadratically weighted kappa over all K grades) and mae (mean |predicted - true grade|), ordinal
      only, on the grade `grade_rule` predicts from the scores (`predicted_grades`: "argmax", or "median" for
      the rank-consistent ordinal losses CORAL and CORN, whose own rule it equals).
    - ece, brier, nll: calibration (`calibration_metrics`), `bins` equal-width confidence bins for the ECE.
    AUC is NaN where a class (or a label's positives or negatives) is absent from `labels`, where
    medmnist would raise; kappa is NaN where undefined (labels and predictions one same class).
    """
    labels = np.asarray(labels).reshape(len(labels), -1)  # N×L
    scores = np.asarray(scores)
    assert scores.ndim == 2 and len(scores) == len(labels), f"scores {scores.shape} do not match labels {labels.shape}"
    with warnings.catch_warnings():
        # undefined values become NaN, as documented above, not console noise
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
        if task.task_type == MULTI_LABEL:
            assert labels.shape[1] == scores.shape[1] == task.num_classes, (
                f"{task.flag} needs N×{task.num_classes} labels and scores, got {labels.shape}, {scores.shape}"
            )
            per_label = [_binary_metrics(labels[:, i], scores[:, i], names) for i in range(task.num_classes)]
            # sum then divide, in label order, as medmnist does, so the floats match exactly
            metrics = {name: sum(m[name] for m in per_label) / task.num_classes for name in per_label[0]}
            return metrics | calibration_metrics(task, labels, scores, names, grade_rule, bins)
        if task.task_type == BINARY:
            metrics = _binary_metrics(labels[:, 0], scores[:, -1], names)
            return metrics | calibration_metrics(task, labels, scores, names, grade_rule, bins)
        assert scores.shape[1] == task.num_classes, f"{task.flag} needs N×{task.num_classes} scores, got {scores.shape}"
        metrics = _class_metrics(labels[:, 0], scores, names)
        if task.task_type == ORDINAL and (names is None or {"qwk", "mae"} & set(names)):
            true = labels[:, 0]
            predicted = predicted_grades(scores, grade_rule)
            all_grades = list(range(task.num_classes))
            # all grades given, so an absent grade does not shrink the distances the weights use
            metrics["qwk"] = float(cohen_kappa_score(true, predicted, labels=all_grades, weights="quadratic"))
            metrics["mae"] = float(mean_absolute_error(true, predicted))
        return _only(metrics, names) | calibration_metrics(task, labels, scores, names, grade_rule, bins)


GRADE_RULES = ("argmax", "median")


def predicted_grades(scores: np.ndarray, rule: str = "argmax") -> np.ndarray:
    """N predicted grades from N×K class probabilities: the most probable class ("argmax"), or the median
    of the predicted distribution ("median": the number of k with P(y > k) > 0.5, CORAL's and CORN's rule)."""
    assert rule in GRADE_RULES, f"grade rule must be one of {GRADE_RULES}, got {rule!r}"
    if rule == "argmax":
        return scores.argmax(axis=1)
    above = 1 - np.cumsum(scores, axis=1)[:, :-1]  # N×(K−1): P(y > k)
    return (above > 0.5).sum(axis=1)


def calibration_problems(
    task: TaskSpec, labels: np.ndarray, scores: np.ndarray, grade_rule: str = "argmax"
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per image, for each problem whose mean is the task's calibration (one; a multi-label task: one per label):
    (confidence, correct, brier, nll).

    confidence and correct are top-label (Guo et al. 2017): the probability of the predicted class and whether it is
    the true one; the predicted class is medmnist's (binary and multi-label: score > 0.5; multi-class: the argmax;
    ordinal: `grade_rule`'s grade, whose probability is its class score). brier: the squared error of the probability
    vector against the one-hot label (binary and each label: (p − y)², the positive probability); nll: −log of the
    true class's probability (at least PROBABILITY_FLOOR).
    """
    labels = np.asarray(labels).reshape(len(labels), -1)
    scores = np.asarray(scores, dtype=np.float64)
    if task.task_type in (BINARY, MULTI_LABEL):
        columns = range(task.num_classes) if task.task_type == MULTI_LABEL else [0]
        out = []
        for k in columns:
            p, y = (scores[:, k], labels[:, k]) if task.task_type == MULTI_LABEL else (scores[:, -1], labels[:, 0])
            predicted = p > THRESHOLD
            true_p = np.where(y == 1, p, 1 - p)
            out.append(
                (
                    np.where(predicted, p, 1 - p),
                    (predicted == (y == 1)).astype(np.float64),
                    (p - y) ** 2,
                    -np.log(np.maximum(true_p, PROBABILITY_FLOOR)),
                )
            )
        return out
    y = labels[:, 0]
    predicted = predicted_grades(scores, grade_rule) if task.task_type == ORDINAL else scores.argmax(axis=1)
    rows = np.arange(len(y))
    onehot = np.zeros_like(scores)
    onehot[rows, y] = 1.0
    brier = ((scores - onehot) ** 2).sum(axis=1)
    nll = -np.log(np.maximum(scores[rows, y], PROBABILITY_FLOOR))
    return [(scores[rows, predicted], (predicted == y).astype(np.float64), brier, nll)]


def confidence_bins(confidence: np.ndarray, bins: int) -> np.ndarray:
    """The equal-width bin (0 … bins−1) of each confidence in [0, 1]; a confidence of 1 falls in the last."""
    return np.minimum((np.asarray(confidence) * bins).astype(np.int64), bins - 1)


def calibration_metrics(
    task: TaskSpec,
    labels: np.ndarray,
    scores: np.ndarray,
    names=None,
    grade_rule: str = "argmax",
    bins: int = ECE_BINS,
) -> dict[str, float]:
    """ECE (expected calibration error over `bins` equal-width confidence bins: Σ_b (n_b / N) |accuracy_b −
    confidence_b|), the Brier score and the NLL, each the mean over the task's problems (`calibration_problems`;
    per label for a multi-label task)."""
    wanted = [m for m in CALIBRATION if names is None or m in names]
    if not wanted:
        return {}
    problems = calibration_problems(task, labels, scores, grade_rule)
    values = {"ece": [], "brier": [], "nll": []}
    for confidence, correct, brier, nll in problems:
        values["ece"].append(expected_calibration_error(confidence, correct, bins))
        values["brier"].append(float(brier.mean()))
        values["nll"].append(float(nll.mean()))
    return {m: sum(values[m]) / len(problems) for m in wanted}


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ_b (n_b / N) |accuracy_b − confidence_b| over `bins` equal-width confidence bins."""
    gaps = np.bincount(confidence_bins(confidence, bins), weights=correct - confidence, minlength=bins)
    return float(np.abs(gaps).sum() / len(confidence))


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """What a reliability diagram shows: per equal-width bin its image count, mean confidence and accuracy (NaN for
    an empty bin), and its edges."""
    which = confidence_bins(confidence, bins)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(which, weights=correct, minlength=bins) / count
    return {"edges": np.linspace(0, 1, bins + 1), "count": count, "confidence": mean_confidence, "accuracy": accuracy}


PER_CLASS = ("precision", "recall", "f1", "auc")  # of each class (a multi-label task: each label), with its support


def class_labels(task: TaskSpec) -> list[str]:
    """The rows of a per-class table: each class (binary, multi-class, ordinal) or each label (multi-label), by
    medmnist's name."""
    return [task.class_names[k] for k in range(len(task.class_names))]


def per_class_predictions(
    task: TaskSpec, labels: np.ndarray, scores: np.ndarray, grade_rule: str = "argmax"
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per class (a multi-label task: per label): (is it the true class, is it the predicted class, its one-vs-rest
    score), each N; the predictions are medmnist's (threshold 0.5, argmax) or the grade rule's."""
    labels = np.asarray(labels).reshape(len(labels), -1)
    scores = np.asarray(scores, dtype=np.float64)
    if task.task_type == MULTI_LABEL:
        return [(labels[:, k] == 1, scores[:, k] > THRESHOLD, scores[:, k]) for k in range(task.num_classes)]
    if task.task_type == BINARY:
        positive = scores[:, -1] > THRESHOLD
        return [(labels[:, 0] == 0, ~positive, 1 - scores[:, -1]), (labels[:, 0] == 1, positive, scores[:, -1])]
    predicted = predicted_grades(scores, grade_rule) if task.task_type == ORDINAL else scores.argmax(axis=1)
    return [(labels[:, 0] == k, predicted == k, scores[:, k]) for k in range(task.num_classes)]


def per_class_metrics(
    task: TaskSpec, labels: np.ndarray, scores: np.ndarray, grade_rule: str = "argmax"
) -> dict[str, dict[str, float]]:
    """Each class's (each label's) precision, recall, F1, one-vs-rest AUC and support (its test images): whether a
    head learned the rare classes or only the majority. Precision is NaN for a class never predicted, F1 where
    precision or recall is; AUC where the class is absent or is every image."""
    out = {}
    for name, (true, predicted, score) in zip(
        class_labels(task), per_class_predictions(task, labels, scores, grade_rule)
    ):
        hits, support, predicted_count = float((true & predicted).sum()), float(true.sum()), float(predicted.sum())
        precision = hits / predicted_count if predicted_count else math.nan
        recall = hits / support if support else math.nan
        f1 = f1_score(precision, recall)
        out[name] = {"precision": precision, "recall": recall, "f1": f1, "auc": _auc(true, score), "support": support}
    return out


def f1_score(precision, recall):
    """The harmonic mean of precision and recall (numbers or arrays); 0 where either is 0 (a class with images that
    is never predicted has no precision, and F1 0), NaN where neither is defined."""
    precision, recall = np.asarray(precision, dtype=float), np.asarray(recall, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    f1 = np.where((precision == 0) | (recall == 0) | (np.isnan(precision) & (recall == 0)), 0.0, f1)
    return float(f1) if f1.ndim == 0 else f1


def relative_change(metric: str, reference, mine):
    """Δm's term, (−1)^{lower is better} (M − M_ref) / |M_ref|, for numbers or arrays of resamples: positive when
    `mine` is better, whatever the reference's sign; NaN where the reference is 0. LibMTL divides by M_ref; a metric
    that can be negative (kappa, QWK) would then flip the sign of its term, so the divisor is its magnitude."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    reference, mine = np.asarray(reference, dtype=float), np.asarray(mine, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        change = np.where(reference != 0, sign * (mine - reference) / np.abs(reference), np.nan)
    return float(change) if change.ndim == 0 else change


def mean_metrics(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """Return the unweighted mean over datasets of each metric, over the datasets that report it.

    A NaN in any dataset makes that metric's mean NaN.
    """
    names = dict.fromkeys(name for metrics in per_task.values() for name in metrics)
    means = {}
    for name in names:
        values = [metrics[name] for metrics in per_task.values() if name in metrics]
        means[name] = float(sum(values) / len(values))
    return means


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of binary targets; NaN when only one class is present (roc_auc_score is undefined)."""
    if positive.min() == positive.max():
        return float("nan")
    return float(roc_auc_score(positive, score))


def _only(metrics: dict, names) -> dict[str, float]:
    return metrics if names is None else {k: v for k, v in metrics.items() if k in names}


def _binary_metrics(labels: np.ndarray, score: np.ndarray, names=None) -> dict[str, float]:
    """Metrics of one binary problem: labels N (0/1) and the positive class's score N."""
    predicted = (score > THRESHOLD).astype(np.int64)
    compute = {
        "auc": lambda: _auc(labels, score),
        "acc": lambda: float(accuracy_score(labels, predicted)),
        "balanced_acc": lambda: float(balanced_accuracy_score(labels, predicted)),
        "kappa": lambda: float(cohen_kappa_score(labels, predicted, labels=[0, 1])),
    }
    return {k: f() for k, f in compute.items() if names is None or k in names}


def _class_metrics(labels: np.ndarray, scores: np.ndarray, names=None) -> dict[str, float]:
    """Metrics of one K-class problem: labels N in [0, K) and scores N×K, predicting the argmax."""
    num_classes = scores.shape[1]
    predicted = scores.argmax(axis=1)
    compute = {
        # sum then divide, in class order, as medmnist does, so the floats match exactly
        "auc": lambda: float(sum(_auc(labels == k, scores[:, k]) for k in range(num_classes)) / num_classes),
        "acc": lambda: float(accuracy_score(labels, predicted)),
        "balanced_acc": lambda: float(balanced_accuracy_score(labels, predicted)),
        "kappa": lambda: float(cohen_kappa_score(labels, predicted, labels=list(range(num_classes)))),
    }
    return {k: f() for k, f in compute.items() if names is None or k in names}
