import dataclasses
import math

import numpy as np
import pytest
from medmnist.evaluator import getACC, getAUC

from mmpt.evaluation.metrics import compute_metrics, mean_metrics
from mmpt.tasks import BINARY, MULTI_LABEL, ORDINAL, TASKS


def _random_labels_and_scores(task, rng, n=300):
    if task.task_type == MULTI_LABEL:
        labels = rng.integers(0, 2, size=(n, task.num_classes))
        scores = rng.random((n, task.num_classes))
    else:
        labels = rng.integers(0, task.num_classes, size=(n, 1))
        labels[: task.num_classes, 0] = np.arange(task.num_classes)  # every class present: AUC defined
        logits = rng.normal(size=(n, task.num_classes))
        scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels.astype(np.int64), scores


@pytest.mark.parametrize("flag", list(TASKS))
def test_auc_and_acc_equal_medmnist_evaluator(flag):
    task = TASKS[flag]
    labels, scores = _random_labels_and_scores(task, np.random.default_rng(list(TASKS).index(flag)))
    metrics = compute_metrics(task, labels, scores)
    assert metrics["auc"] == getAUC(labels, scores, task.task_type)
    assert metrics["acc"] == getACC(labels, scores, task.task_type)


def test_every_metric_is_a_python_float():
    task = TASKS["retinamnist"]
    labels, scores = _random_labels_and_scores(task, np.random.default_rng(0))
    metrics = compute_metrics(task, labels, scores)
    assert set(metrics) == {"auc", "acc", "balanced_acc", "kappa", "qwk", "mae", "ece", "brier", "nll"}
    assert all(type(v) is float for v in metrics.values())


def test_auc_is_nan_when_a_class_is_absent():
    task = TASKS["pathmnist"]
    labels = np.array([[0], [1], [2], [0]])  # 9 classes, most absent
    scores = np.full((4, task.num_classes), 1 / task.num_classes)
    metrics = compute_metrics(task, labels, scores)
    assert math.isnan(metrics["auc"])
    assert metrics["acc"] == 0.5


def test_multi_class_balanced_acc_and_kappa_by_hand():
    task = TASKS["dermamnist"]
    labels = np.array([[0], [0], [0], [1], [2]])
    predicted = np.array([0, 0, 1, 1, 1])
    scores = np.eye(task.num_classes)[predicted]
    metrics = compute_metrics(task, labels, scores)
    assert metrics["acc"] == pytest.approx(3 / 5)
    # recalls 2/3, 1, 0 over the classes present
    assert metrics["balanced_acc"] == pytest.approx(5 / 9)
    # p_o = 0.6, p_e = (3*2 + 1*3 + 1*0) / 25 = 0.36
    assert metrics["kappa"] == pytest.approx((0.6 - 0.36) / (1 - 0.36))


def test_binary_predicts_positive_only_above_one_half():
    task = TASKS["breastmnist"]
    labels = np.array([[0], [0], [0], [1], [1]])
    positive = np.array([0.2, 0.6, 0.4, 0.9, 0.5])  # 0.5 is not above the threshold
    scores = np.stack([1 - positive, positive], axis=1)
    metrics = compute_metrics(task, labels, scores)
    assert metrics["acc"] == pytest.approx(3 / 5)
    # recalls: negatives 2/3, positives 1/2
    assert metrics["balanced_acc"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # p_o = 0.6, p_e = (3*3 + 2*2) / 25
    assert metrics["kappa"] == pytest.approx((0.6 - 13 / 25) / (1 - 13 / 25))


def test_multi_label_balanced_acc_and_kappa_are_means_over_labels():
    task = dataclasses.replace(TASKS["chestmnist"], num_classes=2)
    labels = np.array([[0, 1], [1, 0], [1, 0], [0, 0]])
    scores = np.array([[0.1, 0.9], [0.7, 0.8], [0.3, 0.6], [0.2, 0.1]])
    metrics = compute_metrics(task, labels, scores)
    # label 0 predicts [0,1,0,0]: balanced 3/4, kappa 0.5; label 1 predicts [1,1,1,0]: 2/3, 0.2
    assert metrics["balanced_acc"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert metrics["kappa"] == pytest.approx((0.5 + 0.2) / 2)


def test_ordinal_qwk_and_mae_by_hand():
    task = TASKS["retinamnist"]
    labels = np.array([[0], [1], [2], [3], [4]])
    predicted = np.array([0, 1, 2, 4, 2])
    metrics = compute_metrics(task, labels, np.eye(5)[predicted])
    assert metrics["mae"] == pytest.approx(3 / 5)
    # sum w*O = 1 + 4 = 5; sum w*E = 95 / 5 = 19
    assert metrics["qwk"] == pytest.approx(1 - 5 / 19)


def test_qwk_keeps_grade_distances_when_a_grade_is_absent():
    task = TASKS["retinamnist"]
    labels = np.array([[0], [1], [4], [4]])
    predicted = np.array([1, 1, 4, 0])
    metrics = compute_metrics(task, labels, np.eye(5)[predicted])
    # on grades 0..4: sum w*O = 1 + 16 = 17, sum w*E = 96 / 4 = 24 (re-indexing {0,1,4} would give 0)
    assert metrics["qwk"] == pytest.approx(1 - 17 / 24)


def test_mean_metrics_averages_each_metric_over_datasets_reporting_it():
    per_task = {
        "pathmnist": {"auc": 0.9, "acc": 0.8},
        "retinamnist": {"auc": 0.7, "acc": 0.4, "qwk": 0.5},
    }
    means = mean_metrics(per_task)
    assert means == pytest.approx({"auc": 0.8, "acc": 0.6, "qwk": 0.5})


@pytest.mark.parametrize("task_type", [BINARY, ORDINAL])
def test_metrics_accept_one_dimensional_labels(task_type):
    task = next(t for t in TASKS.values() if t.task_type == task_type)
    labels, scores = _random_labels_and_scores(task, np.random.default_rng(1))
    assert compute_metrics(task, labels[:, 0], scores) == compute_metrics(task, labels, scores)


def _ece_by_loop(confidence, correct, bins):
    """ECE as Guo et al. write it: for each bin (lo, hi] of confidence (the first [0, hi]), |acc − conf| weighted."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (confidence >= lo) & (confidence < hi) if b < bins - 1 else (confidence >= lo)
        if inside.any():
            total += inside.sum() / len(confidence) * abs(correct[inside].mean() - confidence[inside].mean())
    return total


@pytest.mark.parametrize("flag", ["breastmnist", "dermamnist", "chestmnist", "retinamnist"])
@pytest.mark.parametrize("bins", [1, 15, 40])
def test_calibration_metrics_equal_scikit_learn_and_the_textbook_ece(flag, bins):
    """Brier and NLL equal scikit-learn's (per label for a multi-label task, then averaged); the ECE is the
    equal-width binned |accuracy − confidence| of the predicted class, computed here bin by bin."""
    from sklearn.metrics import brier_score_loss, log_loss

    task = TASKS[flag]
    labels, scores = _random_labels_and_scores(task, np.random.default_rng(bins))
    if task.task_type == BINARY:
        scores = np.stack([1 - scores[:, 1], scores[:, 1]], axis=1)
    got = compute_metrics(task, labels, scores, bins=bins)
    if task.task_type == MULTI_LABEL:
        y, p = labels, scores
        brier = np.mean([brier_score_loss(y[:, k], p[:, k]) for k in range(task.num_classes)])
        nll = np.mean([log_loss(y[:, k], p[:, k], labels=[0, 1]) for k in range(task.num_classes)])
        eces = []
        for k in range(task.num_classes):
            predicted = p[:, k] > 0.5
            confidence = np.where(predicted, p[:, k], 1 - p[:, k])
            eces.append(_ece_by_loop(confidence, (predicted == (y[:, k] == 1)).astype(float), bins))
        ece = np.mean(eces)
    elif task.task_type == BINARY:
        y, p = labels[:, 0], scores[:, 1]
        brier, nll = brier_score_loss(y, p), log_loss(y, p, labels=[0, 1])
        predicted = p > 0.5
        ece = _ece_by_loop(np.where(predicted, p, 1 - p), (predicted == (y == 1)).astype(float), bins)
    else:
        y = labels[:, 0]
        onehot = np.eye(task.num_classes)[y]
        brier = np.mean(((scores - onehot) ** 2).sum(axis=1))  # the multi-class Brier score over the one-hot vector
        nll = log_loss(y, scores, labels=list(range(task.num_classes)))
        predicted = scores.argmax(axis=1)  # CE heads: the argmax (ordinal with the median rule: see below)
        ece = _ece_by_loop(scores.max(axis=1), (predicted == y).astype(float), bins)
    assert got["brier"] == pytest.approx(brier, rel=1e-12)
    assert got["nll"] == pytest.approx(nll, rel=1e-9)
    assert got["ece"] == pytest.approx(ece, rel=1e-9, abs=1e-12)


def test_ordinal_calibration_uses_the_grade_rule_of_the_loss():
    """With CORAL/CORN's median rule, the ECE's predicted grade and its confidence follow that rule."""
    task = TASKS["retinamnist"]
    labels = np.array([[0], [1], [2], [4]])
    scores = np.array([[0.4, 0.05, 0.05, 0.05, 0.45]] * 4)  # argmax 4; median: P(y > k) > 0.5 for k = 0, 1 -> grade 2
    argmax = compute_metrics(task, labels, scores, ["ece"], "argmax", bins=10)["ece"]
    median = compute_metrics(task, labels, scores, ["ece"], "median", bins=10)["ece"]
    assert argmax == pytest.approx(abs(0.25 - 0.45))  # predicts 4 with 0.45: right once in four
    assert median == pytest.approx(abs(0.25 - 0.05))  # predicts 2 with 0.05: right once in four


@pytest.mark.parametrize("flag", ["breastmnist", "dermamnist", "chestmnist"])
def test_per_class_metrics_equal_scikit_learn(flag):
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    from mmpt.evaluation.metrics import per_class_metrics

    task = TASKS[flag]
    labels, scores = _random_labels_and_scores(task, np.random.default_rng(7))
    if task.task_type == BINARY:
        scores = np.stack([1 - scores[:, 1], scores[:, 1]], axis=1)
    got = per_class_metrics(task, labels, scores)
    names = list(task.class_names)
    assert list(got) == names
    if task.task_type == MULTI_LABEL:
        for k, name in enumerate(names):
            p, r, f, s = precision_recall_fscore_support(labels[:, k], scores[:, k] > 0.5, average="binary")
            expected = {"precision": p, "recall": r, "f1": f, "support": labels[:, k].sum()}
            expected["auc"] = roc_auc_score(labels[:, k], scores[:, k])
            assert got[name] == pytest.approx(expected, rel=1e-12)
        return
    predicted = (scores[:, 1] > 0.5).astype(int) if task.task_type == BINARY else scores.argmax(axis=1)
    p, r, f, s = precision_recall_fscore_support(
        labels[:, 0], predicted, labels=range(len(names)), zero_division=np.nan
    )
    for k, name in enumerate(names):
        auc = roc_auc_score(labels[:, 0] == k, scores[:, k])
        expected = {"precision": p[k], "recall": r[k], "f1": f[k], "support": s[k], "auc": auc}
        assert got[name] == pytest.approx(expected, rel=1e-12, nan_ok=True)
