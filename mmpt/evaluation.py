"""Per-dataset evaluation: predictions, losses and metrics of a model on a split of every task."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmpt.data.loader import eval_loader
from mmpt.data.store import TaskData
from mmpt.data.transforms import DeviceTransform
from mmpt.distributed import SINGLE, World, any_rank, gather_rows, sum_over_ranks
from mmpt.io import write_text
from mmpt.losses import TaskLoss
from mmpt.metrics import compute_metrics, mean_metrics
from mmpt.model import MultiTaskNet
from mmpt.runtime import Interrupted, StopSignal, autocast
from mmpt.tasks import ORDINAL, TaskSpec


@dataclass(frozen=True)
class TaskResult:
    labels: np.ndarray  # N×L int64
    scores: np.ndarray  # N×K class scores (medmnist's convention)
    metrics: dict[str, float]  # includes "loss"


def split_loader(
    data: dict[str, TaskData], split: str, device: torch.device, *, batch_size: int = 256, num_workers: int = 0,
    pin_memory: bool = True, world: World = SINGLE,
):
    """The `eval_loader` over one split of every task in `data`, this rank's shards."""
    return eval_loader(
        {flag: task_data.splits[split] for flag, task_data in data.items()}, batch_size, num_workers=num_workers,
        pin_memory=pin_memory and device.type == "cuda", rank=world.rank, world_size=world.world_size,
    )


@torch.no_grad()
def evaluate_all(
    model: MultiTaskNet,
    loader: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    tasks: dict[str, TaskSpec],
    losses: dict[str, TaskLoss],
    transform: DeviceTransform,
    device: torch.device,
    *,
    precision: str = "fp32",
    world: World = SINGLE,
    stop: StopSignal | None = None,
) -> dict[str, TaskResult]:
    """Run each task's head over its split as `loader` (an `eval_loader`) yields it; return labels, scores and
    metrics (with the mean loss) per task, in the order of `tasks`.

    Under torchrun each rank scores its contiguous shards and they are gathered in rank order, so every
    image is scored exactly once and every rank returns the same results. Raises Interrupted when `stop`
    has received a signal (checked between batches; across ranks, once at the end).
    """
    model.eval()
    scores: dict[str, list[np.ndarray]] = {flag: [] for flag in tasks}
    labels: dict[str, list[np.ndarray]] = {flag: [] for flag in tasks}
    # MAE and kappa of the ordinal task use the loss's own grade rule (CORAL/CORN: the rank rule, not the argmax)
    grades: dict[str, list[np.ndarray]] = {flag: [] for flag, task in tasks.items() if task.task_type == ORDINAL}
    loss_sums = {flag: torch.zeros((), device=device) for flag in tasks}
    for flag, images, y_cpu in loader:
        if stop is not None and stop.received and not world.distributed:
            raise Interrupted(stop.received)
        x = transform(images.to(device, non_blocking=True))
        y = y_cpu.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x, flag)
        logits = logits.float()
        loss_sums[flag] += losses[flag](logits, y) * len(y)
        scores[flag].append(losses[flag].scores(logits).cpu().numpy())
        labels[flag].append(y_cpu.numpy())
        if flag in grades:
            grades[flag].append(losses[flag].grades(logits).cpu().numpy().reshape(-1, 1))  # N×1, gathered like labels
    if stop is not None and any_rank(world, stop.received is not None)[0]:
        raise Interrupted(stop.received or "a stop signal on another rank")
    return {
        flag: _result(task, scores[flag], labels[flag], loss_sums[flag], world, grades.get(flag))
        for flag, task in tasks.items()
    }


def _result(
    task: TaskSpec, scores: list, labels: list, loss_sum: torch.Tensor, world: World, grades: list | None = None
) -> TaskResult:
    """Gather one task's shards from every rank (in rank order) and compute its metrics."""
    empty_scores, empty_labels = np.zeros((0, task.num_classes)), np.zeros((0, task.label_width), np.int64)
    all_scores = gather_rows(world, np.concatenate(scores) if scores else empty_scores).astype(np.float64)
    all_labels = gather_rows(world, np.concatenate(labels) if labels else empty_labels)
    all_grades = None
    if grades is not None:
        all_grades = gather_rows(world, np.concatenate(grades) if grades else np.zeros((0, 1), np.int64))
    loss = sum_over_ranks(world, loss_sum.item()) / len(all_labels)
    metrics = {"loss": loss, **compute_metrics(task, all_labels, all_scores, all_grades)}
    return TaskResult(labels=all_labels, scores=all_scores, metrics=metrics)


def metrics_table(results: dict[str, TaskResult]) -> dict[str, dict[str, float]]:
    """dataset -> metric -> value, plus a "mean" entry (the unweighted mean over datasets)."""
    table = {flag: dict(result.metrics) for flag, result in results.items()}
    table["mean"] = mean_metrics({flag: m for flag, m in table.items()})
    return table


def prediction_filename(flag: str, resolution: int, split: str, metrics: dict[str, float], run: str) -> str:
    """medmnist Evaluator's standard name: `{flag}{_size}_{split}_[AUC]x_[ACC]y@{run}.csv`."""
    size_flag = "" if resolution == 28 else f"_{resolution}"
    return f"{flag}{size_flag}_{split}_[AUC]{metrics['auc']:.3f}_[ACC]{metrics['acc']:.3f}@{run}.csv"


def write_predictions(
    folder: Path, results: dict[str, TaskResult], resolution: int, split: str, run: str
) -> list[Path]:
    """Write each task's scores in medmnist Evaluator's CSV format (index column, no header).

    medmnist's `Evaluator.parse_and_evaluate` re-scores these files from their names alone.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for flag, result in results.items():
        path = folder / prediction_filename(flag, resolution, split, result.metrics, run)
        write_text(path, pd.DataFrame(result.scores).to_csv(header=None))
        paths.append(path)
    return paths
