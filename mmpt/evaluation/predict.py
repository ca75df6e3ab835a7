"""Predictions and metrics: evaluate a model on a split of every task, write medmnist-named prediction files."""

from __future__ import annotations

import dataclasses
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
from mmpt.evaluation.metrics import (
    ECE_BINS,
    THRESHOLD,
    calibration_problems,
    compute_metrics,
    expected_calibration_error,
    mean_metrics,
    per_class_metrics,
    reliability,
)
from mmpt.evaluation.plots import plot_confusion, plot_reliability
from mmpt.evaluation.tables import write_metrics, write_per_class
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
    logits: np.ndarray | None = None  # N×outputs, float64, where evaluate_all was asked to keep them


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
    ece_bins: int = ECE_BINS,
    keep_logits: bool = False,
) -> dict[str, TaskResult]:
    """Run each task's head over its split as `loader` (an `eval_loader`) yields it; return labels, scores and
    metrics (with the mean loss: each loss's terms summed over the split over their number, so it does not
    depend on the batch size or the number of processes) per task, in the order of `tasks`.

    Under torchrun each rank scores its contiguous shards and they are gathered in rank order, so every
    image is scored exactly once and every rank returns the same results. Raises Interrupted when `stop`
    has received a signal (checked between batches; across ranks, once at the end). `keep_logits`: each result
    also holds the head's logits (temperature scaling fits them).
    """
    model.eval()
    scores: dict[str, list[np.ndarray]] = {flag: [] for flag in tasks}
    kept: dict[str, list[np.ndarray]] = {flag: [] for flag in tasks}
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
        if keep_logits:
            kept[flag].append(logits.cpu().numpy())
    if stop is not None and any_rank(world, stop.received is not None)[0]:
        raise Interrupted(stop.received or "a stop signal on another rank")
    results = {}
    for flag, task in tasks.items():
        result = _result(task, scores[flag], labels[flag], loss_sums[flag], world, losses[flag].grade_rule, ece_bins)
        if keep_logits:
            empty = np.zeros((0, losses[flag].num_outputs))
            logits = gather_rows(world, np.concatenate(kept[flag]) if kept[flag] else empty).astype(np.float64)
            result = dataclasses.replace(result, logits=logits)
        results[flag] = result
    return results


def _result(
    task: TaskSpec, scores: list, labels: list, loss_sum: torch.Tensor, world: World, grade_rule: str, bins: int
) -> TaskResult:
    """Gather one task's shards from every rank (in rank order) and compute its metrics."""
    empty_scores, empty_labels = np.zeros((0, task.num_classes)), np.zeros((0, task.label_width), np.int64)
    all_scores = gather_rows(world, np.concatenate(scores) if scores else empty_scores).astype(np.float64)
    all_labels = gather_rows(world, np.concatenate(labels) if labels else empty_labels)
    total, count = loss_sum.tolist()
    loss = sum_over_ranks(world, total) / sum_over_ranks(world, count)
    return scored(task, all_labels, all_scores, loss, grade_rule, bins)


def scored(
    task: TaskSpec, labels: np.ndarray, scores: np.ndarray, loss: float, grade_rule: str, bins: int
) -> TaskResult:
    """A TaskResult of `scores` with its metrics and its mean `loss`."""
    # MAE and kappa of the ordinal task use the loss's own grade rule (CORAL/CORN: the median, not the argmax)
    metrics = {"loss": loss, **compute_metrics(task, labels, scores, grade_rule=grade_rule, bins=bins)}
    return TaskResult(labels=labels, scores=scores, metrics=metrics, grade_rule=grade_rule)


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
    checkpoint: str | None = None,
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
        "checkpoint": checkpoint,  # the file evaluated (absolute), so a page can find the run's recipe
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


def reliability_panels(
    task: TaskSpec, labels: np.ndarray, scores: np.ndarray, grade_rule: str = "argmax", bins: int = ECE_BINS
) -> dict[str, dict[str, np.ndarray]]:
    """Panel title -> the reliability bins of the top-label confidence the ECE uses (one panel; one per label of a
    multi-label task), the panel's ECE in its title."""
    problems = calibration_problems(task, labels, scores, grade_rule)
    names = [f"{task.short}: {c}" for c in task.class_names] if task.task_type == MULTI_LABEL else [task.short]
    panels = {}
    for name, (confidence, correct, _, _) in zip(names, problems):
        ece = expected_calibration_error(confidence, correct, bins)
        panels[f"{name} (ECE {ece:.3f})"] = reliability(confidence, correct, bins)
    return panels


def plot_reliabilities(
    data_tasks: dict[str, TaskSpec], results: dict[str, TaskResult], output: Results, bins: int
) -> list[Path]:
    """reliability_<flag>.png per dataset in the `output` folder."""
    return [
        plot_reliability(
            reliability_panels(data_tasks[flag], r.labels, r.scores, r.grade_rule, bins),
            output.reliability(flag),
            f"{flag}: reliability\n{bins} equal-width bins, their images on the bars",
        )
        for flag, r in results.items()
    ]


PICTURES = ("confusion", "reliability")


def write_results(
    output: Results,
    tasks: dict[str, TaskSpec],
    results: dict[str, TaskResult],
    *,
    resolution: int,
    split: str,
    run: str,
    data_root: str | None,
    weights_sha256: str | None,
    checkpoint: str | None,
    pictures: tuple[str, ...],
    bins: int = ECE_BINS,
) -> dict[str, dict[str, float]]:
    """Write one evaluation into `output`: metrics.{json,csv,md}, metrics_per_class.{csv,md}, the medmnist-format
    predictions and their data.json, and the `pictures` of PICTURES named (a confusion matrix, a reliability
    diagram, per dataset). Returns the metrics table."""
    table = metrics_table(results)
    write_metrics(output, table)
    write_per_class(
        output, {f: per_class_metrics(tasks[f], r.labels, r.scores, r.grade_rule) for f, r in results.items()}
    )
    write_predictions(
        output.predictions,
        results,
        resolution,
        split,
        run=run,
        data_root=data_root,
        weights_sha256=weights_sha256,
        checkpoint=checkpoint,
    )
    assert set(pictures) <= set(PICTURES), f"pictures are among {PICTURES}, got {pictures}"
    if "confusion" in pictures:
        plot_confusions(tasks, results, output)
    if "reliability" in pictures:
        plot_reliabilities(tasks, results, output, bins)
    return table


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
