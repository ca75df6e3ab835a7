"""Predictions and metrics: evaluate a model on a split of every task, write medmnist-named prediction files."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix

from mmpt.data.loader import eval_loader
from mmpt.data.store import TaskData
from mmpt.data.transforms import DeviceTransform
from mmpt.evaluation.metrics import THRESHOLD, compute_metrics, mean_metrics
from mmpt.evaluation.plots import plot_confusion
from mmpt.io import write_json, write_text
from mmpt.model.losses import TaskLoss
from mmpt.model.net import MultiTaskNet
from mmpt.runs.names import DATA_RECORD, prediction_filename
from mmpt.runs.rundir import Results
from mmpt.runtime.distributed import SINGLE, World, any_rank, gather_rows, sum_over_ranks
from mmpt.runtime.precision import autocast
from mmpt.runtime.process import Interrupted, StopSignal
from mmpt.tasks import BINARY, MULTI_LABEL, TaskSpec


@dataclass(frozen=True)
class TaskResult:
    labels: np.ndarray  # N×L int64
    scores: np.ndarray  # N×K class scores (medmnist's convention)
    metrics: dict[str, float]  # includes "loss"
    grade_rule: str = "argmax"  # how the ordinal task's grade follows from the scores (metrics.predicted_grades)


def split_loader(
    data: dict[str, TaskData],
    split: str,
    device: torch.device,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    pin_memory: bool = True,
    world: World = SINGLE,
):
    """The `eval_loader` over one split of every task in `data`, this rank's shards."""
    return eval_loader(
        {flag: task_data.splits[split] for flag, task_data in data.items()},
        batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory and device.type == "cuda",
        rank=world.rank,
        world_size=world.world_size,
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
    metrics (with the mean loss: each loss's terms summed over the split over their number, so it does not
    depend on the batch size or the number of processes) per task, in the order of `tasks`.

    Under torchrun each rank scores its contiguous shards and they are gathered in rank order, so every
    image is scored exactly once and every rank returns the same results. Raises Interrupted when `stop`
    has received a signal (checked between batches; across ranks, once at the end).
    """
    model.eval()
    scores: dict[str, list[np.ndarray]] = {flag: [] for flag in tasks}
    labels: dict[str, list[np.ndarray]] = {flag: [] for flag in tasks}
    # each loss's terms summed, and counted, over the split: the mean over the split whatever the batch size
    loss_sums = {flag: torch.zeros(2, dtype=torch.float64, device=device) for flag in tasks}
    for flag, images, y_cpu in loader:
        if stop is not None and stop.received and not world.distributed:
            raise Interrupted(stop.received)
        x = transform(images.to(device, non_blocking=True))
        y = y_cpu.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x, flag)
        logits = logits.float()
        loss_sums[flag] += torch.stack(losses[flag].sum_and_count(logits, y)).double()
        scores[flag].append(losses[flag].scores(logits).cpu().numpy())
        labels[flag].append(y_cpu.numpy())
    if stop is not None and any_rank(world, stop.received is not None)[0]:
        raise Interrupted(stop.received or "a stop signal on another rank")
    return {
        flag: _result(task, scores[flag], labels[flag], loss_sums[flag], world, losses[flag].grade_rule)
        for flag, task in tasks.items()
    }


def _result(
    task: TaskSpec, scores: list, labels: list, loss_sum: torch.Tensor, world: World, grade_rule: str
) -> TaskResult:
    """Gather one task's shards from every rank (in rank order) and compute its metrics."""
    empty_scores, empty_labels = np.zeros((0, task.num_classes)), np.zeros((0, task.label_width), np.int64)
    all_scores = gather_rows(world, np.concatenate(scores) if scores else empty_scores).astype(np.float64)
    all_labels = gather_rows(world, np.concatenate(labels) if labels else empty_labels)
    total, count = loss_sum.tolist()
    loss = sum_over_ranks(world, total) / sum_over_ranks(world, count)
    # MAE and kappa of the ordinal task use the loss's own grade rule (CORAL/CORN: the median, not the argmax)
    metrics = {"loss": loss, **compute_metrics(task, all_labels, all_scores, grade_rule=grade_rule)}
    return TaskResult(labels=all_labels, scores=all_scores, metrics=metrics, grade_rule=grade_rule)


def metrics_table(results: dict[str, TaskResult]) -> dict[str, dict[str, float]]:
    """dataset -> metric -> value, plus a "mean" entry (the unweighted mean over datasets)."""
    table = {flag: dict(result.metrics) for flag, result in results.items()}
    table["mean"] = mean_metrics(dict(table.items()))
    return table


def labels_digest(labels: np.ndarray) -> str:
    """SHA-256 of int64 labels with their shape: equal digests mean the same images in the same order."""
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    return hashlib.sha256(f"{labels.shape}|".encode() + labels.tobytes()).hexdigest()


def write_predictions(
    folder: Path,
    results: dict[str, TaskResult],
    resolution: int,
    split: str,
    run: str,
    data_root: str | None = None,
    weights_sha256: str | None = None,
) -> list[Path]:
    """Write each task's scores in medmnist Evaluator's CSV format (index column, no header).

    medmnist's `Evaluator.parse_and_evaluate` re-scores these files from their names alone. Beside them,
    data.json records the resolution, split, and per dataset the number of images and a digest of their
    labels, so that `compare` can refuse runs evaluated on different data (and `data_root`, when given), and
    `weights_sha256` (mmpt.runs.checkpoint.state_digest of the model evaluated, when given), so that an export's model
    card reports only the metrics of the weights it exports.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for flag, result in results.items():
        path = folder / prediction_filename(flag, resolution, split, result.metrics, run)
        write_text(path, pd.DataFrame(result.scores).to_csv(header=None))
        paths.append(path)
    record = {
        "resolution": resolution,
        "split": split,
        "run": run,
        "data_root": data_root,
        "weights_sha256": weights_sha256,
        "datasets": {
            flag: {
                "images": len(result.labels),
                "labels_sha256": labels_digest(result.labels),
                "grade_rule": result.grade_rule,
            }
            for flag, result in results.items()
        },
    }
    write_json(folder / DATA_RECORD, record)
    return paths


def confusion_matrices(
    task: TaskSpec, labels: np.ndarray, scores: np.ndarray
) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Panel -> (K×K counts, class names), on the predictions the metrics use (threshold 0.5 or argmax).

    One panel per dataset; one 2×2 panel per label for multi-label tasks (ChestMNIST).
    """
    labels = np.asarray(labels).reshape(len(labels), -1)
    name = task.short
    if task.task_type == MULTI_LABEL:
        return {
            f"{name}: {cls}": (confusion_matrix(labels[:, i], scores[:, i] > THRESHOLD, labels=[0, 1]), ["no", "yes"])
            for i, cls in enumerate(task.class_names)
        }
    predicted = (scores[:, -1] > THRESHOLD).astype(int) if task.task_type == BINARY else scores.argmax(axis=1)
    classes = list(range(task.num_classes))
    return {name: (confusion_matrix(labels[:, 0], predicted, labels=classes), list(task.class_names))}


def plot_confusions(data_tasks: dict[str, TaskSpec], results: dict[str, TaskResult], output: Results) -> list[Path]:
    """confusion_<flag>.png per dataset in the `output` folder."""
    paths = []
    for flag, result in results.items():
        panels = confusion_matrices(data_tasks[flag], result.labels, result.scores)
        paths.append(
            plot_confusion(
                {p: m for p, (m, _) in panels.items()},
                {p: n for p, (_, n) in panels.items()},
                output.confusion(flag),
                f"{flag}: confusion matrix",
            )
        )
    return paths
