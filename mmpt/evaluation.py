"""Per-dataset evaluation: predictions, losses and metrics of a model on a split of every task."""

from __future__ import annotations

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
from mmpt.tasks import ORDINAL


@dataclass(frozen=True)
class TaskResult:
    labels: np.ndarray  # N×L int64
    scores: np.ndarray  # N×K class scores (medmnist's convention)
    metrics: dict[str, float]  # includes "loss"


@torch.no_grad()
def evaluate_task(
    model: MultiTaskNet,
    task_data: TaskData,
    split: str,
    loss_fn: TaskLoss,
    transform: DeviceTransform,
    device: torch.device,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    precision: str = "fp32",
    pin_memory: bool = True,
    world: World = SINGLE,
    stop: StopSignal | None = None,
) -> TaskResult:
    """Run `model`'s head for this task over a whole split; return labels, scores and metrics (with loss).

    Under torchrun each rank scores its contiguous shard and the shards are gathered in rank order, so
    every image is scored exactly once and every rank returns the same result. Raises Interrupted when
    `stop` has received a signal (checked between batches; across ranks, once per task).
    """
    model.eval()
    flag = task_data.task.flag
    loader = eval_loader(
        task_data.splits[split], batch_size=batch_size, num_workers=num_workers,
        pin_memory=pin_memory and device.type == "cuda", rank=world.rank, world_size=world.world_size,
    )
    ordinal = task_data.task.task_type == ORDINAL
    all_scores, all_grades, all_labels = [], [], []
    loss_sum = torch.zeros((), device=device)
    for images, labels in loader:
        if stop is not None and stop.received and not world.distributed:
            raise Interrupted(stop.received)
        x = transform(images.to(device, non_blocking=True))
        y = labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x, flag)
        logits = logits.float()
        loss_sum += loss_fn(logits, y) * len(y)
        all_scores.append(loss_fn.scores(logits).cpu().numpy())
        if ordinal:  # MAE and kappa use the loss's own grade rule (CORAL/CORN: the rank rule, not the argmax)
            all_grades.append(loss_fn.grades(logits).cpu().numpy())
        all_labels.append(labels.numpy())
    if stop is not None and any_rank(world, stop.received is not None)[0]:
        raise Interrupted(stop.received or "a stop signal on another rank")
    width = task_data.task.num_classes
    scores = gather_rows(world, np.concatenate(all_scores) if all_scores else np.zeros((0, width), np.float32))
    labels = gather_rows(world, np.concatenate(all_labels) if all_labels else np.zeros((0, task_data.task.label_width), np.int64))
    scores = scores.astype(np.float64)
    loss = sum_over_ranks(world, loss_sum.item()) / len(labels)
    grades = None
    if ordinal:  # N×1 rows, gathered like the labels
        grades = gather_rows(world, np.concatenate(all_grades).reshape(-1, 1) if all_grades else np.zeros((0, 1), np.int64))
    metrics = {"loss": loss, **compute_metrics(task_data.task, labels, scores, grades)}
    return TaskResult(labels=labels, scores=scores, metrics=metrics)


def evaluate_all(
    model: MultiTaskNet,
    data: dict[str, TaskData],
    split: str,
    losses: dict[str, TaskLoss],
    transform: DeviceTransform,
    device: torch.device,
    **kwargs,
) -> dict[str, TaskResult]:
    """evaluate_task for every task in `data`, in its order."""
    return {
        flag: evaluate_task(model, task_data, split, losses[flag], transform, device, **kwargs)
        for flag, task_data in data.items()
    }


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
