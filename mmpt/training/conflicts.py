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

cos_ij = G_ij / sqrt(G_ii G_jj) over the backbone's shared parameters (per-dataset BatchNorm weights excluded), and
beside the angles the magnitudes: each dataset's gradient norm sqrt(G_ii) and its ratio to the mean norm of the
datasets measured with it (a ratio far from 1 means one dataset's gradient dominates the sum, whatever the angles;
Elich et al. 2024 find magnitude, not angle, explains most of the gap between multi-task and single-task training).
Measurements stay on the device until read at a logging interval or a checkpoint (`fresh`, `state_dict`).
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


def norm_ratios(norms: Sequence[float]) -> list[float]:
    """Each gradient norm over the mean of the measured (non-NaN) ones; NaN where not measured or all are 0."""
    measured = [v for v in norms if not math.isnan(v)]
    mean = sum(measured) / len(measured) if measured else math.nan
    return [v / mean if mean > 0 else math.nan for v in norms]


def _nanmean(values: list, shape: tuple[int, ...]) -> np.ndarray:
    """The mean over the first axis, ignoring NaN (NaN where every value is)."""
    if not values:
        return np.full(shape, np.nan)
    stack = np.asarray(values, dtype=float)
    counts = (~np.isnan(stack)).sum(axis=0)
    return np.where(counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan)


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
        # (step, T×(T+1) on the device: the cosines, then each dataset's gradient norm), not read yet
        self.pending: list[tuple[int, Tensor]] = []
        self.steps: list[int] = []
        self.matrices: list[list[list[float]]] = []  # T×T cosines each, NaN where a pair was not measured
        self.norms: list[list[float]] = []  # T gradient norms each, NaN for a dataset not measured
        self._fresh = 0  # records not yet handed out by `fresh`
        self._images: dict[str, np.ndarray] = {}

    def due(self, step: int) -> bool:
        """Whether the step after `step` steps (0-based count before it) measures."""
        return (step + 1) % self.every_steps == 0

    def record(self, step: int, tasks: Sequence[str], gramian: Tensor) -> None:
        """Keep the cosines and gradient norms from the k×k Gramian (inner products of the per-dataset gradients) of
        `tasks` (the step's datasets, in its order), measured in step `step` + 1; nothing is read from the device."""
        g = gramian.detach().float()
        norms = g.diagonal().clamp(min=0).sqrt()
        n = len(self.tasks)
        full = torch.full((n, n + 1), math.nan, device=g.device)
        rows = torch.tensor([self.index[t] for t in tasks], device=g.device)
        full[rows[:, None], rows[None, :]] = cosines(g)
        full[rows, n] = norms
        self.pending.append((step + 1, full))

    def fresh(self) -> list[tuple[int, list[list[float]], list[float]]]:
        """Read what is pending from the device (one read) and return every (step, cosines, norms) not handed out
        before."""
        self._read()
        out = list(zip(self.steps[self._fresh :], self.matrices[self._fresh :], self.norms[self._fresh :]))
        self._fresh = len(self.steps)
        return out

    def _read(self) -> None:
        if self.pending:
            values = torch.stack([m for _, m in self.pending]).tolist()
            self.steps += [s for s, _ in self.pending]
            self.matrices += [[row[:-1] for row in value] for value in values]
            self.norms += [[row[-1] for row in value] for value in values]
            self.pending = []

    def state_dict(self) -> dict:
        """Every measurement so far (read from the device first), for a resume to continue the record."""
        self._read()
        n = len(self.tasks)
        return {
            "tasks": list(self.tasks),
            "steps": torch.tensor(self.steps, dtype=torch.long),
            "cosine": torch.tensor(self.matrices, dtype=torch.float32).reshape(-1, n, n),
            "norm": torch.tensor(self.norms, dtype=torch.float32).reshape(-1, n),
        }

    def load_state_dict(self, state: dict) -> None:
        assert list(state["tasks"]) == list(self.tasks), "the checkpoint's datasets are the run's (a fixed key)"
        self.steps = state["steps"].tolist()
        self.matrices = state["cosine"].tolist()
        # a checkpoint of a release that measured angles only: its earlier measurements have no norms
        self.norms = state["norm"].tolist() if "norm" in state else [[math.nan] * len(self.tasks)] * len(self.steps)
        self.pending, self._fresh = [], len(self.steps)

    def record_json(self) -> dict:
        """What gradient_conflicts.json holds: the datasets (medmnist order), how and how often, every measurement
        (the cosines, each dataset's gradient norm and its ratio to the mean norm of that measurement's datasets)."""
        self._read()

        def number(v: float) -> float | None:
            return None if math.isnan(v) else v

        measurements = []
        for s, m, norms in zip(self.steps, self.matrices, self.norms):
            ratios = norm_ratios(norms)
            measurements.append(
                {
                    "step": s,
                    "cosine": [[number(v) for v in row] for row in m],
                    "grad_norm": {t: number(v) for t, v in zip(self.tasks, norms)},
                    "grad_norm_ratio": {t: number(v) for t, v in zip(self.tasks, ratios)},
                }
            )
        return {
            "datasets": list(self.tasks),
            "every_steps": self.every_steps,
            "source": self.source,
            "source_description": SOURCES[self.source],
            "measurements": measurements,
        }

    def mean(self) -> np.ndarray:
        """The T×T mean cosine over every measurement (NaN for a pair never measured)."""
        self._read()
        return _nanmean(self.matrices, (len(self.tasks),) * 2)

    def mean_norm_ratios(self) -> np.ndarray:
        """Each dataset's mean gradient-norm ratio over the measurements that covered it (NaN: never measured)."""
        self._read()
        return _nanmean([norm_ratios(n) for n in self.norms], (len(self.tasks),))

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
        self.record(
            step, self.tasks, batch_gramian(model, inputs, losses, shared, forward=forward, device=device, scale=scale)
        )


def batch_gramian(
    model: nn.Module,
    inputs: dict[str, tuple[Tensor, Tensor]],
    losses: dict,
    shared: Sequence[nn.Parameter],
    *,
    forward: Callable[[Tensor, str], Tensor],
    device: torch.device,
    scale: Callable[[Tensor], Tensor] = lambda loss: loss,
) -> Tensor:
    """The k×k Gramian of the gradients on `shared` of each dataset's loss on its batch ({task: (x, labels)}), with
    `model` in the mode it is in; the global RNG, the model's buffers and every .grad are left as they were."""
    buffers = [b.detach().clone() for b in model.buffers()]
    gradients = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for task, (x, y) in inputs.items():
            loss = losses[task](forward(x, task).float(), y)
            gradients.append(torch.autograd.grad(scale(loss), list(shared), allow_unused=True))
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)
    return gramian(gradients)
