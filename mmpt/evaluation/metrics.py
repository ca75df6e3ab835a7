"""Per-dataset metrics from labels and class scores, with medmnist's definitions of AUC and ACC.

"auc" and "acc" reproduce medmnist.evaluator.getAUC / getACC (tests check equality); they are
computed here with scikit-learn so that an undefined AUC gives NaN instead of an exception.
"""

from __future__ import annotations

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


def compute_metrics(
    task: TaskSpec,
    labels: np.ndarray,
    scores: np.ndarray,
    names: tuple[str, ...] | list[str] | None = None,
    grade_rule: str = "argmax",
) -> dict[str, float]:
    """Return {"auc", "acc", "balanced_acc", "kappa"} (plus "qwk", "mae" for ordinal tasks) as floats.

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
            return {name: sum(m[name] for m in per_label) / task.num_classes for name in per_label[0]}
        if task.task_type == BINARY:
            return _binary_metrics(labels[:, 0], scores[:, -1], names)
        assert scores.shape[1] == task.num_classes, f"{task.flag} needs N×{task.num_classes} scores, got {scores.shape}"
        metrics = _class_metrics(labels[:, 0], scores, names)
        if task.task_type == ORDINAL and (names is None or {"qwk", "mae"} & set(names)):
            true = labels[:, 0]
            predicted = predicted_grades(scores, grade_rule)
            all_grades = list(range(task.num_classes))
            # all grades given, so an absent grade does not shrink the distances the weights use
            metrics["qwk"] = float(cohen_kappa_score(true, predicted, labels=all_grades, weights="quadratic"))
            metrics["mae"] = float(mean_absolute_error(true, predicted))
        return _only(metrics, names)


GRADE_RULES = ("argmax", "median")


def predicted_grades(scores: np.ndarray, rule: str = "argmax") -> np.ndarray:
    """N predicted grades from N×K class probabilities: the most probable class ("argmax"), or the median
    of the predicted distribution ("median": the number of k with P(y > k) > 0.5, CORAL's and CORN's rule)."""
    assert rule in GRADE_RULES, f"grade rule must be one of {GRADE_RULES}, got {rule!r}"
    if rule == "argmax":
        return scores.argmax(axis=1)
    above = 1 - np.cumsum(scores, axis=1)[:, :-1]  # N×(K−1): P(y > k)
    return (above > 0.5).sum(axis=1)


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
