"""Gradient conflicts between datasets: the cosine of each pair of datasets' gradients on the shared backbone.

The standard diagnostic of which datasets help each other and which fight (Yu et al. 2020, PCGrad): a negative
cosine means a step on one dataset's loss raises the other's. Every `train.conflict_every_steps` steps the
training step measures the matrix one of three ways, none of which changes training (the run's weights, its
digests and every other output are bitwise those of a run without it):

- `gramian`: several datasets in the step and a gradient-based loss.weighting: from the Gramian G = J J^T of the
  step's Jacobian, which `mtl_backward` has computed anyway (no extra backward pass; the k×k product over the
  backbone's parameters costs k²·P multiply-adds on those steps);
- `step`: several datasets in the step and another weighting, one process: from the per-dataset gradients of the
  step's own losses (`torch.autograd.grad` over the step's graph: one extra backward pass per dataset of the step);
- `batches`: one dataset per step (or several under torchrun without a Jacobian): from one batch of each of the
  run's datasets, drawn for that step from its train split with a generator of its own and run on rank 0 as
  training runs (train mode, no augmentation): one forward and backward pass per dataset. The global RNG is
  forked, BatchNorm buffers are restored afterwards and the gradients come from `torch.autograd.grad` (no .grad,
  no optimizer state touched).

cos_ij = G_ij / sqrt(G_ii G_jj) over the backbone's shared parameters (per-dataset BatchNorm weights excluded).
Matrices stay on the device until read at a logging interval or a checkpoint (`fresh`, `state_dict`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

GRAMIAN, STEP, BATCHES = "gramian", "step", "batches"
SOURCES = {
    GRAMIAN: "the Gramian of the step's Jacobian (no extra backward pass)",
    STEP: "the per-dataset gradients of the step's losses (one extra backward pass per dataset of the step)",
    BATCHES: "one batch of each dataset, drawn apart from training (one forward and backward pass per dataset)",
}
# train.conflict_every_steps null (auto): this often where the matrix is there anyway (gramian), else off
AUTO_EVERY_STEPS = 100
BATCH_SEED_TAG = 0x636F6E66  # keeps the diagnostic's batch draws apart from every other seeded draw


def conflict_source(several_per_step: bool, gradient_based: bool, world_size: int) -> str:
    """How the matrix is measured: from the step's Jacobian, from the step's own losses, or from batches of its own."""
    if several_per_step and gradient_based:
        return GRAMIAN
    return STEP if several_per_step and world_size == 1 else BATCHES


def conflict_interval(setting: int | None, source: str, num_tasks: int) -> int:
    """train.conflict_every_steps as applied: an explicit N (0 = off); null = AUTO_EVERY_STEPS where the Gramian is
    there anyway, else off. Always off for a single dataset (no pair)."""
    if num_tasks < 2:
        return 0
    if setting is None:
        return AUTO_EVERY_STEPS if source == GRAMIAN else 0
    return setting


def cosines(gramian: Tensor) -> Tensor:
    """The k×k cosine matrix of the vectors whose Gramian (k×k inner products) is `gramian`."""
    norms = gramian.diagonal().clamp(min=0).sqrt()
    return gramian / (norms[:, None] * norms[None, :])


def gramian(gradients: Sequence[Sequence[Tensor | None]]) -> Tensor:
    """k×k inner products of k gradients, each given as its per-parameter tensors (None: a zero gradient)."""
    rows = []
    for grads in gradients:
        rows.append(torch.cat([g.reshape(-1).float() for g in grads if g is not None]))
    matrix = torch.stack(rows)  # k×P
    return matrix @ matrix.T


class GradientConflicts:
    """The conflict diagnostic of one run: when it measures, the matrices it has measured, and the `batches` source.

    `tasks`: every dataset of the run in medmnist order (the rows and columns of every matrix; a pair the step did
    not cover is NaN). `splits`: the train splits (flag -> SplitData), for the `batches` source.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        every_steps: int,
        source: str,
        *,
        seed: int = 0,
        batch_size: int = 64,
        splits: dict | None = None,
        is_main: bool = True,
    ) -> None:
        assert every_steps >= 1 and len(tasks) >= 2, "a diagnostic that measures needs an interval and a pair"
        assert source != BATCHES or splits is not None, "the batches source draws from the train splits"
        self.tasks, self.every_steps, self.source = tuple(tasks), every_steps, source
        self.seed, self.batch_size, self.splits, self.is_main = seed, batch_size, splits or {}, is_main
        self.index = {task: i for i, task in enumerate(self.tasks)}
        self.pending: list[tuple[int, Tensor]] = []  # (step, T×T on the device), not read yet
        self.steps: list[int] = []
        self.matrices: list[list[list[float]]] = []  # T×T each, NaN where a pair was not measured
        self._fresh = 0  # records not yet handed out by `fresh`
        self._images: dict[str, np.ndarray] = {}

    def due(self, step: int) -> bool:
        """Whether the step after `step` steps (0-based count before it) measures."""
        return (step + 1) % self.every_steps == 0

    def record(self, step: int, tasks: Sequence[str], matrix: Tensor) -> None:
        """Keep the k×k cosine `matrix` of `tasks` (the step's datasets, in its order), measured in step `step` + 1."""
        full = torch.full((len(self.tasks), len(self.tasks)), math.nan, device=matrix.device)
        rows = torch.tensor([self.index[t] for t in tasks], device=matrix.device)
        full[rows[:, None], rows[None, :]] = matrix.detach().float()
        self.pending.append((step + 1, full))

    def fresh(self) -> list[tuple[int, list[list[float]]]]:
        """Read what is pending from the device (one read) and return every (step, matrix) not handed out before."""
        self._read()
        out = list(zip(self.steps[self._fresh :], self.matrices[self._fresh :]))
        self._fresh = len(self.steps)
        return out

    def _read(self) -> None:
        if self.pending:
            values = torch.stack([m for _, m in self.pending]).tolist()
            self.steps += [s for s, _ in self.pending]
            self.matrices += values
            self.pending = []

    def state_dict(self) -> dict:
        """Every matrix measured so far (read from the device first), for a resume to continue the record."""
        self._read()
        n = len(self.tasks)
        return {
            "tasks": list(self.tasks),
            "steps": torch.tensor(self.steps, dtype=torch.long),
            "cosine": torch.tensor(self.matrices, dtype=torch.float32).reshape(-1, n, n),
        }

    def load_state_dict(self, state: dict) -> None:
        assert list(state["tasks"]) == list(self.tasks), "the checkpoint's datasets are the run's (a fixed key)"
        self.steps = state["steps"].tolist()
        self.matrices = state["cosine"].tolist()
        self.pending, self._fresh = [], len(self.steps)

    def record_json(self) -> dict:
        """What gradient_conflicts.json holds: the datasets (medmnist order), how and how often, every matrix."""
        self._read()
        return {
            "datasets": list(self.tasks),
            "every_steps": self.every_steps,
            "source": self.source,
            "source_description": SOURCES[self.source],
            "measurements": [
                {"step": s, "cosine": [[None if math.isnan(v) else v for v in row] for row in m]}
                for s, m in zip(self.steps, self.matrices)
            ],
        }

    def mean(self) -> np.ndarray:
        """The T×T mean over every measurement (NaN for a pair never measured)."""
        self._read()
        if not self.matrices:
            return np.full((len(self.tasks),) * 2, np.nan)
        stack = np.asarray(self.matrices, dtype=float)
        counts = (~np.isnan(stack)).sum(axis=0)
        sums = np.nansum(stack, axis=0)
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    # --- the `batches` source ----------------------------------------------------------------------------------

    def batch_of(self, task: str, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images, labels) of `task`'s diagnostic batch at `step`: a draw without replacement from its train
        split, a pure function of (seed, step, dataset) that no training stream sees."""
        split = self.splits[task]
        rng = np.random.default_rng([self.seed, step, self.index[task], BATCH_SEED_TAG])
        n = min(self.batch_size, len(split))
        idx = np.sort(rng.choice(len(split), size=n, replace=False))  # sorted: sequential memmap reads
        if task not in self._images:
            self._images[task] = split.open_images()
        return np.ascontiguousarray(self._images[task][idx]), np.asarray(split.labels[idx])

    def measure_batches(
        self,
        step: int,
        model: nn.Module,
        losses: dict,
        transform: Callable[[Tensor], Tensor],
        shared: Sequence[nn.Parameter],
        *,
        forward: Callable[[Tensor, str], Tensor],
        device: torch.device,
        scale: Callable[[Tensor], Tensor] = lambda loss: loss,
    ) -> None:
        """Measure the `batches` source at `step` (rank 0 only): each dataset's gradient on `shared` from its own
        diagnostic batch, training left exactly as it was. `forward(x, task)` returns that task's logits."""
        if not self.is_main:
            return
        batches = {task: self.batch_of(task, step) for task in self.tasks}
        inputs = {
            task: (
                transform(torch.from_numpy(images).to(device, non_blocking=True)),
                torch.from_numpy(labels).to(device, non_blocking=True),
            )
            for task, (images, labels) in batches.items()
        }
        matrix = batch_gradient_cosines(model, inputs, losses, shared, forward=forward, device=device, scale=scale)
        self.record(step, self.tasks, matrix)


def batch_gradient_cosines(
    model: nn.Module,
    inputs: dict[str, tuple[Tensor, Tensor]],
    losses: dict,
    shared: Sequence[nn.Parameter],
    *,
    forward: Callable[[Tensor, str], Tensor],
    device: torch.device,
    scale: Callable[[Tensor], Tensor] = lambda loss: loss,
) -> Tensor:
    """The k×k cosines of the gradients on `shared` of each dataset's loss on its batch ({task: (x, labels)}),
    with `model` in the mode it is in; the global RNG, the model's buffers and every .grad are left as they were."""
    buffers = [b.detach().clone() for b in model.buffers()]
    gradients = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for task, (x, y) in inputs.items():
            loss = losses[task](forward(x, task).float(), y)
            gradients.append(torch.autograd.grad(scale(loss), list(shared), allow_unused=True))
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)
    return cosines(gramian(gradients))
