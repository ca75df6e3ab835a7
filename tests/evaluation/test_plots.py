"""Pictures of a run: confusion matrices (per label for multi-label tasks) and the loss curves."""

from __future__ import annotations

import numpy as np

from mmpt.tasks import TASKS
from tests.helpers import assert_png


def test_confusion_matrices_per_label_for_multi_label_tasks():
    from mmpt.evaluation.predict import confusion_matrices

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (50, 14))
    scores = rng.random((50, 14))
    panels = confusion_matrices(TASKS["chestmnist"], labels, scores)
    assert len(panels) == 14
    matrix, names = panels["chest: " + TASKS["chestmnist"].class_names[3]]
    assert names == ["no", "yes"] and matrix.sum() == 50
    assert matrix[1, 1] == np.sum((labels[:, 3] == 1) & (scores[:, 3] > 0.5))
    ((matrix, names),) = confusion_matrices(TASKS["retinamnist"], labels[:, :1] * 4, scores[:, :5]).values()
    assert matrix.shape == (5, 5) and matrix[4].sum() == np.sum(labels[:, 0] == 1)


def test_loss_curves_plot_train_and_val_losses_and_tolerate_a_history_without_train_losses(tmp_path):
    from mmpt.evaluation.plots import plot_loss_curves

    history = [
        {
            "epoch": e,
            "val": {"breastmnist": {"loss": 1 / e}, "retinamnist": {"loss": 2 / e}, "mean": {"loss": 1.5 / e}},
            "train_loss": {"breastmnist": 1.2 / e, "retinamnist": 2.5 / e},
        }
        for e in (1, 2, 3)
    ]
    assert_png(plot_loss_curves(history, tmp_path / "both.png"))
    for entry in history:
        del entry["train_loss"]
    assert_png(plot_loss_curves(history, tmp_path / "val_only.png"))
    assert plot_loss_curves([], tmp_path / "none.png") is None
