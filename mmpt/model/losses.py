"""One loss per task type.

A loss knows how many logits its head must produce (`num_outputs`), which head module the model builds for it
(`head`, a key of `model.HEADS`), how to turn logits into the N×K class scores medmnist's metrics expect
(`scores`), and by which rule the ordinal task's grade follows from those scores (`grade_rule`, read by
`metrics.predicted_grades` for MAE and kappa).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpt.config.choices import ORDINAL_LOSSES as ORDINAL_LOSS_NAMES
from mmpt.errors import lookup
from mmpt.runtime.distributed import SINGLE, World, sum_over_ranks_tensor
from mmpt.tasks import BINARY, MULTI_CLASS, MULTI_LABEL, ORDINAL, TaskSpec


class TaskLoss(Protocol):
    """What the training loop and evaluation need from a task's loss."""

    num_outputs: int  # logits the head must produce
    head: str  # a key of model.HEADS: which head module the model must build
    grade_rule: str  # how a predicted grade follows from the K scores (metrics.predicted_grades)

    def __call__(self, logits: Tensor, labels: Tensor, world: World = SINGLE) -> Tensor:
        """Mean loss over the batch; labels are int64 N×L as medmnist stores them.

        `world`: the batch is this rank's shard of a training step's global batch (TrainStep passes it; evaluation
        does not). The step rescales the mean of each rank's shard by its share of the images, which makes the
        global mean of a loss that averages over every image; a loss that averages over a data-dependent subset of
        the batch instead reduces that subset's size over the ranks itself (CORN), so that the distributed
        gradient is the single-process one.
        """
        ...

    def sum_and_count(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The sum of the loss's terms over the batch and their number (tensors on the logits' device), whose
        quotient is `__call__`'s mean: summed over a split's batches, they give the mean over the whole split,
        whatever the batch size and the number of processes (evaluation's loss)."""
        ...

    def scores(self, logits: Tensor) -> Tensor:
        """N×K class scores in medmnist's convention (softmax, sigmoid or class probabilities)."""
        ...


class CrossEntropyLoss:
    """Softmax cross-entropy over K logits (multi-class, binary with 2 logits, or ordinal as classes)."""

    head = "linear"
    grade_rule = "argmax"  # metrics.predicted_grades

    def __init__(self, num_classes: int) -> None:
        self.num_outputs = num_classes

    def __call__(self, logits: Tensor, labels: Tensor, world: World = SINGLE) -> Tensor:
        # medmnist stores single-label targets as N×1
        return F.cross_entropy(logits, labels.reshape(-1))

    def sum_and_count(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return F.cross_entropy(logits, labels.reshape(-1), reduction="sum"), _count(logits, len(logits))

    def scores(self, logits: Tensor) -> Tensor:
        return logits.softmax(dim=-1)


class MultiLabelBCELoss:
    """Binary cross-entropy with logits, averaged over the batch and all labels (ChestMNIST's 14)."""

    head = "linear"
    grade_rule = "argmax"  # metrics.predicted_grades

    def __init__(self, num_classes: int) -> None:
        self.num_outputs = num_classes

    def __call__(self, logits: Tensor, labels: Tensor, world: World = SINGLE) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

    def sum_and_count(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        total = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="sum")
        return total, _count(logits, logits.numel())

    def scores(self, logits: Tensor) -> Tensor:
        return logits.sigmoid()


class CoralLoss:
    """CORAL ordinal loss (Cao, Mirjalili, Raschka 2020) over K−1 rank-consistent logits.

    Logit k estimates P(y > k); the loss is BCE-with-logits on the targets [y > k], averaged over the
    batch and the K−1 thresholds.
    """

    head = "coral"
    grade_rule = "median"  # metrics.predicted_grades: the median, its own rank rule

    def __init__(self, num_classes: int) -> None:
        self.num_outputs = num_classes - 1

    def __call__(self, logits: Tensor, labels: Tensor, world: World = SINGLE) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, self._levels(logits, labels))

    def sum_and_count(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        total = F.binary_cross_entropy_with_logits(logits, self._levels(logits, labels), reduction="sum")
        return total, _count(logits, logits.numel())

    def _levels(self, logits: Tensor, labels: Tensor) -> Tensor:
        thresholds = torch.arange(self.num_outputs, device=logits.device)
        return (labels.reshape(-1, 1) > thresholds).to(logits.dtype)  # N×(K−1)

    def scores(self, logits: Tensor) -> Tensor:
        return class_probabilities(logits.sigmoid())


class CornLoss:
    """CORN ordinal loss (Shi, Cao, Raschka 2021: conditional training subsets) over K−1 logits.

    Logit k estimates the conditional P(y > k | y > k−1); it is trained by BCE on the subset of the
    batch with y > k−1 (every sample for k = 0), with target [y > k]. The loss is the sum of the
    BCE terms over all (sample, k) pairs in the subsets divided by their count, as in coral-pytorch's
    corn_loss; in a training step under torchrun (`world`) the count is the global batch's, reduced over the
    ranks. P(y > k) is the product of the first k+1 conditionals, so it never increases with k
    (rank-consistent by construction, with an ordinary linear head).
    """

    head = "linear"
    grade_rule = "median"  # metrics.predicted_grades: the median, its own rank rule

    def __init__(self, num_classes: int) -> None:
        self.num_outputs = num_classes - 1

    def __call__(self, logits: Tensor, labels: Tensor, world: World = SINGLE) -> Tensor:
        total, count = self.sum_and_count(logits, labels)
        if not world.distributed:
            # the k = 0 subset is the whole batch, so the count is never 0
            return total / count
        # the global batch's number of (sample, k) pairs and its images, in one all-reduce (no host read)
        counts = sum_over_ranks_tensor(world, torch.stack([count, count.new_tensor(float(len(labels)))]))
        pairs, images = counts[0], counts[1]
        # this rank's sum over the global count, per image of its shard: the step's rescaling by the shard's share of
        # the images (n_r·W/N) and DDP's mean over ranks then give the global batch's sum over its count
        return total * images / (pairs * len(labels))

    def sum_and_count(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The BCE terms of every (sample, k) pair in the subsets, summed, and the number of pairs: a batch's mean
        weights each batch by its pairs, so the mean over a split is the quotient of the sums, not a mean of means."""
        thresholds = torch.arange(self.num_outputs, device=logits.device)
        grades = labels.reshape(-1, 1)
        in_subset = (grades > thresholds - 1).to(logits.dtype)  # N×(K−1): y > k−1
        targets = (grades > thresholds).to(logits.dtype)  # N×(K−1): y > k
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return (bce * in_subset).sum(), in_subset.sum()

    def scores(self, logits: Tensor) -> Tensor:
        return class_probabilities(logits.sigmoid().cumprod(dim=1))


def _count(logits: Tensor, n: int) -> Tensor:
    """A number of loss terms known on the host, as a tensor beside the logits (no device sync)."""
    return torch.tensor(float(n), device=logits.device)


def class_probabilities(above: Tensor) -> Tensor:
    """N×K class probabilities from N×(K−1) cumulative P(y > k): p_k = P(y > k−1) − P(y > k).

    P(y > −1) = 1 and P(y > K−1) = 0, so the K values telescope to a sum of 1.
    """
    ones = torch.ones_like(above[:, :1])
    upper = torch.cat([ones, above], dim=1)  # N×K: P(y > k−1)
    lower = torch.cat([above, 1 - ones], dim=1)  # N×K: P(y > k)
    # non-negative in exact arithmetic when P(y > k) is non-increasing; clamp guards rounding and unordered CORAL logits
    probs = (upper - lower).clamp(min=0)
    return probs / probs.sum(dim=1, keepdim=True)


# The loss of each task type; ordinal regression is chosen separately (config loss.ordinal).
LOSSES: dict[str, Callable[[int], TaskLoss]] = {
    MULTI_CLASS: CrossEntropyLoss,
    BINARY: CrossEntropyLoss,
    MULTI_LABEL: MultiLabelBCELoss,
}

ORDINAL_LOSSES: dict[str, Callable[[int], TaskLoss]] = {
    "ce": CrossEntropyLoss,
    "coral": CoralLoss,
    "corn": CornLoss,
}
assert tuple(ORDINAL_LOSSES) == ORDINAL_LOSS_NAMES, f"ordinal losses {tuple(ORDINAL_LOSSES)} != {ORDINAL_LOSS_NAMES}"


def build_loss(task: TaskSpec, ordinal: str = "coral") -> TaskLoss:
    """Return the loss for `task`; `ordinal` names the loss of ordinal-regression tasks.

    Raises MmptError for an unknown ordinal loss or task type, listing the valid names.
    """
    if task.task_type == ORDINAL:
        factory = lookup("ordinal loss", ORDINAL_LOSSES, ordinal)
    else:
        factory = lookup("task type", LOSSES, task.task_type)
    return factory(task.num_classes)
