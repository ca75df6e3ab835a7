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
    assert set(metrics) == {"auc", "acc", "balanced_acc", "kappa", "qwk", "mae"}
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
