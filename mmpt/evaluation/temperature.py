"""Post-hoc temperature scaling (Guo et al. 2017): one temperature T per dataset (per label of a multi-label task),
fitted on the validation split by minimising the negative log-likelihood of the scores of logits / T, then applied
to the logits of the split evaluated.

A temperature divides every logit of an image by the same positive number, so the predicted class (the argmax, or
the side of 0.5) and the accuracy never change, and neither does the AUC of a binary task or of each label of a
multi-label one (a monotone map of one score). The one-vs-rest AUC of a multi-class task can change a little: a
temperature keeps each image's ranking of the classes, not each class's ranking of the images. CORAL and CORN heads
are refused: their grade is the median of a distribution made of several sigmoids, and a temperature on their
logits can move it, which would change the predictions a calibration must leave alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from mmpt.config.choices import CALIBRATIONS
from mmpt.errors import MmptError
from mmpt.model.losses import TaskLoss
from mmpt.tasks import MULTI_LABEL, TaskSpec

# the search interval of T: wide enough for any trained head (a fitted T sits near 1 to 3), narrow enough that a
# degenerate split cannot drive it to 0 or infinity
LOWEST, HIGHEST = 0.05, 20.0
# Brent's method stops when log T moves less than this: T to about 1e-6 relative, far below any effect on a metric
TOLERANCE = 1e-7
assert CALIBRATIONS == ("temperature",), "evaluate.py --calibrate offers what this module fits"


@dataclass(frozen=True)
class Temperatures:
    """One dataset's fitted temperatures (one per label of a multi-label task, else one) and the validation NLL
    before and after."""

    values: tuple[float, ...]
    val_nll_before: float
    val_nll_after: float

    @property
    def at_bound(self) -> bool:
        """Whether a temperature sits at an end of the search interval: the validation NLL kept falling there (a
        split the head separates perfectly pushes T towards 0), so T is the interval's, not a minimum."""
        return any(min(abs(math.log(t / LOWEST)), abs(math.log(t / HIGHEST))) < 1e-3 for t in self.values)

    def record(self) -> dict:
        return {
            "temperature": self.values[0] if len(self.values) == 1 else list(self.values),
            "val_nll_before": self.val_nll_before,
            "val_nll_after": self.val_nll_after,
            "at_search_bound": self.at_bound,
        }


def refusal(task: TaskSpec, loss: TaskLoss) -> str | None:
    """Why `task`'s head cannot be temperature-scaled (None: it can)."""
    if loss.grade_rule != "argmax":
        return (
            f"{task.flag}'s {type(loss).__name__.removesuffix('Loss').upper()} head: a temperature on its logits can "
            "move its predicted grade (the median of several sigmoids), so it is left uncalibrated"
        )
    return None


def _problems(task: TaskSpec, logits: np.ndarray, labels: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, targets) of each problem a temperature is fitted to: each label of a multi-label task, else the
    task's (softmax over its K logits)."""
    logits_t = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(len(labels), -1))
    if task.task_type == MULTI_LABEL:
        return [(logits_t[:, k], labels_t[:, k].double()) for k in range(task.num_classes)]
    return [(logits_t, labels_t[:, 0])]


def _nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    """The mean negative log-likelihood of the targets under the scores of logits / temperature."""
    scaled = logits / temperature
    if logits.ndim == 1:
        return float(F.binary_cross_entropy_with_logits(scaled, targets))
    return float(F.cross_entropy(scaled, targets))


def _check_classes(task: TaskSpec, problems, split: str) -> None:
    """A temperature fitted on one class only would push every score to that class: refuse it."""
    for k, (_, targets) in enumerate(problems):
        if torch.unique(targets).numel() < 2:
            what = f"its label {task.class_names[k]!r}" if task.task_type == MULTI_LABEL else "it"
            raise MmptError(
                f"{task.flag}'s {split} split has one class only for {what}: no temperature can be fitted on it; "
                f"leave {task.flag} out with --datasets, or evaluate without --calibrate"
            )


def fit(task: TaskSpec, logits: np.ndarray, labels: np.ndarray, split: str = "val") -> Temperatures:
    """The temperatures minimising the validation NLL (Brent's method on log T within [LOWEST, HIGHEST]).
    Raises MmptError when a problem's labels have one class only."""
    problems = _problems(task, logits, labels)
    _check_classes(task, problems, split)
    values = []
    for problem_logits, targets in problems:
        result = minimize_scalar(
            lambda log_t, z=problem_logits, y=targets: _nll(z, y, math.exp(log_t)),
            bounds=(math.log(LOWEST), math.log(HIGHEST)),
            method="bounded",
            options={"xatol": TOLERANCE},
        )
        values.append(float(math.exp(result.x)))
    before = float(np.mean([_nll(z, y, 1.0) for z, y in problems]))
    after = float(np.mean([_nll(z, y, t) for (z, y), t in zip(problems, values)]))
    return Temperatures(tuple(values), before, after)


def scaled(logits: np.ndarray, temperatures: Temperatures) -> torch.Tensor:
    """logits / T (float64), T per column for a multi-label task."""
    divisor = torch.tensor(temperatures.values, dtype=torch.float64)
    return torch.as_tensor(np.asarray(logits, dtype=np.float64)) / divisor


def apply(loss: TaskLoss, logits: np.ndarray, temperatures: Temperatures) -> np.ndarray:
    """The class scores (the loss's `scores`, float64) of logits / T."""
    return loss.scores(scaled(logits, temperatures)).numpy()
