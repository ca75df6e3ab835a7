"""What a training run tells its user: the opening lines, the train losses (TensorBoard, progress bar), the
non-finite-loss check and the per-epoch validation line."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from mmpt.config import Config
from mmpt.data.sampler import Sampler
from mmpt.errors import MmptError
from mmpt.evaluation.plots import plot_gradient_conflicts
from mmpt.io import write_json
from mmpt.model.net import MultiTaskNet
from mmpt.model.norm import describe_norm, has_batchnorm
from mmpt.runs.names import GRADIENT_CONFLICTS, GRADIENT_CONFLICTS_PLOT
from mmpt.runs.rundir import RunDir
from mmpt.runtime.distributed import World
from mmpt.training.conflicts import SOURCES, GradientConflicts, norm_ratios
from mmpt.training.optim import BACKBONE, Optimizers, layer_scales
from mmpt.training.step import TrainStep


class Log:
    """Train losses (read from the device once per call of `losses`), TensorBoard on rank 0, the progress bar."""

    def __init__(self, tb_dir: Path, world: World, steps_done: int, epoch_sums: dict | None = None) -> None:
        self.world = world
        self.writer = SummaryWriter(str(tb_dir)) if world.is_main else None
        self.interval: dict[str, list[float]] = {}  # task -> [loss sum, steps] since the last log line
        # the same since the epoch began: the checkpoint's (Progress.epoch_loss_sums), so a resume continues them
        self.epoch: dict[str, list[float]] = {} if epoch_sums is None else epoch_sums
        self.first_unchecked_step = steps_done + 1
        self.tick, self.images_seen = time.time(), 0

    def images(self, count: int) -> None:
        self.images_seen += count

    def losses(self, train_step: TrainStep, global_step: int, last: Path) -> None:
        """Read the step's loss sums; raise MmptError if any was non-finite (then nothing more is saved)."""
        sums, nonfinite = train_step.read_losses()
        if nonfinite:
            bad = [t for t, (s, _) in sums.items() if not math.isfinite(s)]
            kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint had been written yet"
            raise MmptError(
                f"the loss of {', '.join(bad) or 'a dataset'} became NaN or infinite between steps "
                f"{self.first_unchecked_step} and {global_step}; training stopped without saving them, {kept}; "
                "lower optim.lr or set optim.clip_grad_norm"
            )
        self.first_unchecked_step = global_step + 1
        for table in (self.interval, self.epoch):
            for task, (total, count) in sums.items():
                entry = table.setdefault(task, [0.0, 0])
                entry[0] += total
                entry[1] += count
        if train_step.conflicts is not None:  # read with the losses: at logging intervals and before every checkpoint
            self.conflicts(train_step.conflicts.tasks, train_step.conflicts.fresh())

    def conflicts(self, tasks: tuple[str, ...], measured: list[tuple[int, list[list[float]], list[float]]]) -> None:
        """TensorBoard scalars per measurement: grad_cosine/<dataset>~<dataset> for each pair, grad_norm/<dataset>
        and grad_norm_ratio/<dataset> (to the mean norm of the measurement's datasets) for each dataset."""
        if self.writer is None:
            return
        for at, matrix, norms in measured:
            for i, a in enumerate(tasks):
                for j, b in enumerate(tasks[:i]):
                    if not math.isnan(matrix[i][j]):
                        self.writer.add_scalar(f"grad_cosine/{b}~{a}", matrix[i][j], at)
            for task, norm, ratio in zip(tasks, norms, norm_ratios(norms)):
                if not math.isnan(norm):
                    self.writer.add_scalar(f"grad_norm/{task}", norm, at)
                    self.writer.add_scalar(f"grad_norm_ratio/{task}", ratio, at)

    def train(self, global_step: int, learning_rates: dict[str, float], weights: dict, bar) -> None:
        rate = self.images_seen / max(time.time() - self.tick, 1e-9)
        means = {task: total / count for task, (total, count) in self.interval.items()}
        if means:
            bar.set_postfix(loss=f"{sum(means.values()) / len(means):.3f}", img_s=f"{rate:.0f}")
        if self.writer is not None:
            for task, loss in means.items():
                self.writer.add_scalar(f"train/loss/{task}", loss, global_step)
            self.writer.add_scalar("train/images_per_s", rate, global_step)
            for name, lr in learning_rates.items():
                self.writer.add_scalar(f"lr/{name}", lr, global_step)
            for task, weight in weights.items():
                self.writer.add_scalar(f"weight/{task}", float(weight), global_step)
        self.interval = {}
        self.tick, self.images_seen = time.time(), 0

    def epoch_losses(self) -> dict[str, float]:
        """Each dataset's mean train loss over the epoch; starts the next epoch's sums."""
        means = {task: total / count for task, (total, count) in self.epoch.items()}
        self.epoch.clear()  # in place: the checkpoint holds this object
        return means

    def validation(
        self, epoch: int, val: dict[str, dict[str, float]], improved: bool, monitor: dict[str, float]
    ) -> None:
        """The epoch's validation line and scalars; `monitor`: train.monitor's name and value (shown where it is
        neither of the two means the line always shows)."""
        if not self.world.is_main:
            return
        for name, row in val.items():
            for metric, value in row.items():
                self.writer.add_scalar(f"val/{name}/{metric}", value, epoch)
        ((name, value),) = monitor.items()
        self.writer.add_scalar(f"val/monitor/{name}", value, epoch)
        shown = "" if name in ("val_loss", "val_auc") else f"  {name} {value:.4f}"
        print(
            f"epoch {epoch}: val mean auc {val['mean']['auc']:.4f}  loss {val['mean']['loss']:.4f}{shown}"
            + ("  (best)" if improved else "")
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def describe(
    cfg: Config,
    model: MultiTaskNet,
    sampler: Sampler,
    device,
    world: World,
    data_cache: Path,
    optimizers: Optimizers | None = None,
    conflicts: GradientConflicts | None = None,
    train_step: TrainStep | None = None,
) -> str:
    """The run's opening lines: what will be trained, on what input, where and how (`train_step`: the training step,
    whose optimizers, diagnostic, precision and norm synchronisation they state)."""
    if train_step is not None:
        optimizers, conflicts = train_step.optimizers, train_step.conflicts
    sizes, batches, steps = sampler.sizes, sampler.updates_per_task, sampler.steps
    width = max(len(t) for t in sizes)
    lines = [f"run folder: {cfg.run_dir}   data cache: {data_cache}"]
    exposure = sampler.exposure(cfg.train.epochs)
    lines += [
        f"  {t:<{width}} {sizes[t]:>9,} train images  {batches[t]:>8,.0f} batches/epoch  "
        f"{exposure[t][0]:>6.1%} of steps  {exposure[t][1]:>7.2f} passes over its images in the run"
        for t in sorted(sizes)
    ]
    if cfg.sampler.replacement or cfg.sampler.steps_per_epoch:
        why = (
            "sampling with replacement"
            + (f", alpha {cfg.sampler.alpha:g}" if cfg.sampler.alpha != 1 else "")
            + ("; with several datasets per step, epoch 0's plan" if sampler.grouped else "")
            if cfg.sampler.replacement
            else "a truncated or repeated pass (sampler.steps_per_epoch)"
        )
        lines.append(f"  (batches, shares and passes are expected values: {why})")
    per_rank = f", about {cfg.train.batch_size / world.world_size:g} per process" if world.distributed else ""
    per_step = "" if not sampler.grouped else f" per dataset, {cfg.sampler.tasks_per_step} datasets per step"
    lines.append(
        f"{len(sizes)} datasets, {sum(sizes.values()):,} train images, {steps:,} "
        f"steps per epoch, batch {cfg.train.batch_size} (global{per_rank}){per_step}, {cfg.train.epochs} epochs"
    )
    lines.append(
        f"loss weighting: {cfg.loss.weighting}"
        + (f" {dict(cfg.loss.weighting_args)}" if cfg.loss.weighting_args else "")
        + (jacobian_description(cfg, train_step) if train_step is not None and train_step.jacobian else "")
    )
    lines.append(f"model: {cfg.model.backbone}, input {input_description(cfg, model)}")
    if cfg.train.probe_epochs:
        lines.append(probe_description(cfg))
    if cfg.optim.layer_decay is not None and optimizers is not None and BACKBONE in optimizers.optimizers:
        scales = layer_scales(optimizers.optimizers[BACKBONE].param_groups)
        lines.append(
            f"backbone learning rate by layer (optim.layer_decay {cfg.optim.layer_decay:g}, timm's layer groups): "
            f"{len(scales)} groups, the stem at {scales[0]:.3g} x optim.lr ({scales[0] * cfg.optim.lr:.3g}), "
            f"the last block at optim.lr ({cfg.optim.lr:g})"
        )
    if has_batchnorm(model.backbone):
        line = describe_norm(
            model.norm,
            list(sizes),
            auto=cfg.model.norm == "auto",
            calibration_batches=cfg.model.norm_calibration_batches,
        )
        if world.distributed:
            line += (
                f"; batch statistics over all {world.world_size} processes' images (model.sync_norm)"
                if train_step is not None and train_step.norm_world is not None
                else "; batch statistics over each process's own shard (model.sync_norm false)"
            )
        lines.append(line)
    if len(sizes) > 1:
        lines.append(conflicts_description(conflicts))
    precision = train_step.precision if train_step is not None else cfg.train.precision
    lines.append(
        f"device: {device}   world size: {world.world_size}   precision: {precision}"
        + (" (train.precision auto)" if cfg.train.precision == "auto" else "")
        + ("   channels_last" if cfg.train.channels_last else "")
        + ("   compiled" if cfg.train.compile else "")
    )
    lines.append(numerics_description(cfg, device))
    return "\n".join(lines)


def numerics_description(cfg: Config, device) -> str:
    """The start line on reproducibility and float32 arithmetic: determinism and TF32."""
    if cfg.determinism:
        line = "determinism: on (the same config and seed give the same weights on the same hardware)"
    else:
        line = "determinism: off (cuDNN autotuning; weights differ run to run)"
    if getattr(device, "type", str(device)) == "cuda":
        line += (
            "; TF32 for float32 matrix products and convolutions (train.tf32; reproducible on the same GPU model)"
            if cfg.train.tf32
            else "; full float32 matrix products and convolutions (train.tf32 false)"
        )
    return line


def probe_description(cfg: Config) -> str:
    """The start line of LP-FT (train.probe_epochs): which epochs train what, and where each schedule runs."""
    probe, epochs = cfg.train.probe_epochs, cfg.train.epochs
    first = "epoch 1" if probe == 1 else f"epochs 1-{probe}"
    rest = f"epoch {epochs}" if probe + 1 == epochs else f"epochs {probe + 1}-{epochs}"
    warmup = f"{cfg.optim.warmup_epochs:g} epochs of warm-up, then " if cfg.optim.warmup_epochs else ""
    return (
        f"LP-FT (train.probe_epochs {probe}): the heads alone train in {first} of {epochs} (the backbone frozen, in "
        f"eval mode: BatchNorm statistics as loaded, no dropout), everything in {rest}; the backbone's "
        f"{cfg.optim.schedule} schedule ({warmup}optim.lr {cfg.optim.lr:g}) starts at epoch {probe + 1}, the heads' "
        f"spans all {epochs} epochs"
    )


def jacobian_description(cfg: Config, train_step: TrainStep) -> str:
    """How the step's gradient-based method gets its Jacobian, and why when loss.jacobian auto chose autojac."""
    if train_step.jacobian == "one_pass":
        return "; Jacobian in one pass (each dataset's own forward pass, one backward pass; loss.jacobian)"
    why = ""
    if cfg.loss.jacobian == "auto":
        why = (
            "compiled backbone"
            if cfg.train.compile
            else "fp16"
            if train_step.precision == "fp16"
            else "BatchNorm statistics shared across datasets"
        )
        why = f", as loss.jacobian auto chose for the {why}"
    return f"; Jacobian by TorchJD's mtl_backward (one backward pass per dataset{why})"


def conflicts_description(conflicts: GradientConflicts | None) -> str:
    """The start line of the gradient-conflict diagnostic: how often, from what, and where it goes."""
    if conflicts is None:
        return (
            "gradient conflicts between datasets: off (train.conflict_every_steps N measures them every N steps; "
            "with one dataset per step that costs one forward and backward pass per dataset each time)"
        )
    return (
        f"gradient conflicts and magnitudes between datasets: every {conflicts.every_steps} steps, from "
        f"{SOURCES[conflicts.source]}; in TensorBoard (grad_cosine/, grad_norm/, grad_norm_ratio/), "
        f"{GRADIENT_CONFLICTS} and, at the end of a run that measured at least once, {GRADIENT_CONFLICTS_PLOT}"
    )


def write_conflicts(run: RunDir, conflicts: GradientConflicts) -> None:
    """gradient_conflicts.json (every measurement) and gradient_conflicts.png (the mean cosines as a heat map, the mean
    gradient-norm ratios as bars); no picture when nothing was measured (a run shorter than the interval)."""
    record = conflicts.record_json()
    write_json(run.gradient_conflicts, record)
    steps = [m["step"] for m in record["measurements"]]
    if steps:
        plot_gradient_conflicts(
            conflicts.mean(),
            conflicts.tasks,
            steps,
            conflicts.every_steps,
            run.gradient_conflicts_plot,
            norm_ratios=conflicts.mean_norm_ratios(),
        )


def input_description(cfg: Config, model: MultiTaskNet) -> str:
    """What the model sees, e.g. `28 px zero-padded to 224 px (input.mode pad)`."""
    source, size, mode = cfg.data.resolution, model.input_size, cfg.input.mode
    if mode == "native" or source == size:
        return f"{source} px as stored (input.mode {mode})"
    how = "zero-padded" if mode == "pad" and source < size else "resized"
    return f"{source} px {how} to {size} px (input.mode {mode}; {(size / source) ** 2:.1f}x the pixels)"


def resumed_line(
    saved: dict, world: World, cfg: Config, model: MultiTaskNet, cuda_states: tuple[int, int] = (0, 0)
) -> str:
    """The resume's line: where it continues, what a change of the world size changes, and which GPU random
    states it restored (`cuda_states`: restored, in the checkpoint)."""
    line = f"resumed at epoch {saved['epoch']}, step {saved['step']}"
    before = saved.get("world_size", 1)
    if before != world.world_size:
        line += (
            f"; trained on {before} process(es) so far, now on {world.world_size}: the global batch is "
            f"unchanged, so the run continues with the same plan ({world_change(cfg, model)})"
        )
    restored, held = cuda_states
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if held > restored:
        line += (
            f"; the checkpoint holds the random state of {held} GPU(s) and this machine has {visible}: "
            f"{restored} restored, the rest left as the seed set them"
        )
    elif held == 0 and visible and world.world_size == 1:
        line += "; the checkpoint holds no GPU random state (trained without a GPU): the GPU's is the seed's"
    return line


def world_change(cfg: Config, model: MultiTaskNet) -> str:
    """What differs from an uninterrupted run when a resume changes the number of processes, in words."""
    what = ["float rounding"]
    if has_batchnorm(model.backbone) and not cfg.model.sync_norm:
        what.append("the BatchNorm batch statistics, each rank's over its own shard (model.sync_norm false)")
    if cfg.model.drop_rate > 0:
        what.append("the dropout masks, which each rank draws for its own shard")
    return "results differ from an uninterrupted run by " + " and ".join(what) + " only"
