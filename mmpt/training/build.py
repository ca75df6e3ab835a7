"""From a Config to what training needs beside the model: the sampler, the optimizers, the loss weighting, the step
with its gradient-conflict diagnostic, the precision it trains in, and the checks a run needs from its machine.

`check_run` sits here, not in mmpt.config, because what it checks is the environment: timm's model list, the
optimizers timm can create here, the number of processes and the installed solvers; the rules within one config are
the schema's (mmpt.config.from_dict), checked where a config is loaded. mmpt.training.setup assembles a run from
these and mmpt.model.build.
"""

from __future__ import annotations

import torch

from mmpt.config import Config, OptimConfig
from mmpt.config.methods import GRADIENT, METHODS, environment_problems
from mmpt.data.sampler import Sampler
from mmpt.errors import MmptError
from mmpt.model.backbones import resolve_backbone
from mmpt.model.build import build_transform, calibrate_statistics
from mmpt.model.losses import TaskLoss
from mmpt.model.net import MultiTaskNet
from mmpt.model.norm import has_batchnorm
from mmpt.mtl.build import build_method
from mmpt.runs import checkpoint as ckpt
from mmpt.runtime.distributed import SINGLE, World
from mmpt.runtime.precision import resolve_precision
from mmpt.tasks import FLAGS, resolve_tasks
from mmpt.training.conflicts import BATCHES, GradientConflicts, conflict_interval, conflict_source
from mmpt.training.monitor import load_reference
from mmpt.training.optim import build_optimizers, check_optimizer_name
from mmpt.training.step import TrainStep


def check_run(cfg: Config, world_size: int = 1) -> None:
    """Check what a run of `cfg` needs from this environment, once, before anything is built or written.

    The backbone name (timm), the optimizer (timm, CUDA or packages it needs), the global batch against the
    number of processes, and the weighting method under that many processes with its solvers installed.
    Raises one MmptError naming every problem and what to do.
    """
    problems = []
    # the sampler keeps every training batch at half the batch size or more, so each rank gets 2 or more images
    if world_size > 1 and cfg.train.batch_size < 4 * world_size:
        problems.append(
            f"train.batch_size {cfg.train.batch_size} is the global batch, split over {world_size} processes; "
            f"it must be at least {4 * world_size}: raise --batch-size or start fewer processes"
        )
    for run_check in (lambda: resolve_backbone(cfg.model.backbone), lambda: check_optimizer_name(cfg.optim.name)):
        try:
            run_check()
        except MmptError as exc:
            problems.append(str(exc))
    problems += environment_problems(cfg.loss.weighting, world_size)  # e.g. an aggregator under DDP, a solver
    if cfg.train.monitor_reference is not None:
        try:
            monitor_reference(cfg)
        except MmptError as exc:
            problems.append(str(exc))
    if problems:
        raise MmptError("; ".join(problems))


def monitor_reference(cfg: Config) -> dict[str, dict[str, float]] | None:
    """train.monitor val_delta_m's reference values (dataset -> auc, acc), None for the other monitors."""
    if cfg.train.monitor_reference is None:
        return None
    flags = [t.flag for t in resolve_tasks(cfg.data.datasets)]
    return load_reference(cfg.train.monitor_reference, flags, cfg.data.resolution)


def build_sampler(cfg: Config, sizes: dict[str, int]) -> Sampler:
    """The epoch plans of a run over train splits of these sizes (flag -> images)."""
    s = cfg.sampler
    return Sampler(
        sizes,
        cfg.train.batch_size,
        cfg.train.seed,
        replacement=s.replacement,
        alpha=s.alpha,
        steps_per_epoch=s.steps_per_epoch,
        last_batch=s.last_batch,
        tasks_per_step=s.tasks_per_step,
    )


def optimizer_arguments(optim: OptimConfig) -> dict:
    """The optim section as build_optimizers' keyword arguments (each named: a new key is a decision, not a leak)."""
    return dict(
        name=optim.name,
        lr=optim.lr,
        head_lr=optim.head_lr,
        weight_decay=optim.weight_decay,
        per_head=optim.per_head,
        schedule=optim.schedule,
        warmup_epochs=optim.warmup_epochs,
        min_lr_ratio=optim.min_lr_ratio,
        clip_grad_norm=optim.clip_grad_norm,
        layer_decay=optim.layer_decay,
    )


def build_step(
    cfg: Config,
    model: MultiTaskNet,
    losses: dict[str, TaskLoss],
    sampler: Sampler,
    device: torch.device,
    world: World = SINGLE,
    train_splits: dict | None = None,
    precision: str | None = None,
    compile_backend: str = "inductor",
) -> TrainStep:
    """The training step of `cfg` for `model` (already on `device`): its optimizers, each head's LR schedule sized
    by the head's own updates per epoch and the backbone's by the steps, its loss weighting, input transform and
    gradient-conflict diagnostic (`train_splits`, flag -> train SplitData: where it draws batches when a step holds
    one dataset; without them that source stays off). `precision`: what it trains in (`run_precision`; None:
    train.precision resolved for `device`). `compile_backend`: torch.compile's backend under train.compile.

    The one place a step is assembled (mmpt.training.setup calls it for training and the benchmarks).
    """
    precision = precision or resolve_precision(cfg.train.precision, device)
    optimizers = build_optimizers(
        model.backbone,
        dict(model.heads),
        sampler.updates_per_task,
        epochs=cfg.train.epochs,
        probe_epochs=cfg.train.probe_epochs,
        fused=device.type == "cuda",
        steps_per_epoch=sampler.steps,
        **optimizer_arguments(cfg.optim),
    )
    method_run = build_method(
        cfg.loss.weighting,
        sampler.sizes,
        cfg.loss.weighting_args,
        device=device,
        lr=cfg.optim.lr,
        seed=cfg.train.seed,
        steps_per_epoch=sampler.steps,
        shared_params=model.backbone.parameters(),
        manual_weights=cfg.loss.weights,
        jacobian_chunk_size=jacobian_chunk_size(cfg.train.compile, precision, model),
    )
    return TrainStep(
        model,
        losses,
        optimizers,
        method_run,
        build_transform(cfg, model),
        device=device,
        world=world,
        precision=precision,
        seed=cfg.train.seed,
        channels_last=cfg.train.channels_last,
        compile=cfg.train.compile,
        compile_backend=compile_backend,
        sync_norm=cfg.model.sync_norm,
        conflicts=build_conflicts(cfg, list(model.heads), world, train_splits),
        jacobian=jacobian_path(cfg.loss.jacobian, cfg.loss.weighting, cfg.train.compile, precision, model),
    )


ONE_PASS, AUTOJAC = "one_pass", "autojac"


def jacobian_path(setting: str, weighting: str, compiled: bool, precision: str, model: MultiTaskNet) -> str | None:
    """How the step's gradient-based method gets the Jacobian of the step's losses (loss.jacobian as applied; None for
    a method that takes none).

    one_pass runs each dataset's forward pass on its own with views of the shared weights, so that one backward pass
    of the summed losses gives each view its dataset's gradient: the whole Jacobian for one backward pass. It equals
    TorchJD's mtl_backward (autojac: one backward pass per dataset, over the whole step) where a dataset's losses do
    not depend on the other datasets' images: not with BatchNorm statistics shared across the step's datasets
    (model.norm shared on a BatchNorm backbone), and it takes neither a compiled backbone nor fp16's loss scaling.
    `auto` takes it wherever it applies. Raises MmptError where loss.jacobian one_pass asks for it and it does not.
    """
    if METHODS[weighting].kind != GRADIENT:
        return None
    shared_statistics = model.norm == "shared" and has_batchnorm(model.backbone)
    if setting == AUTOJAC or (setting == "auto" and (compiled or precision == "fp16" or shared_statistics)):
        return AUTOJAC
    if shared_statistics:
        raise MmptError(
            "loss.jacobian one_pass runs each dataset's forward pass on its own, but with model.norm shared the "
            "backbone's BatchNorm statistics mix the step's datasets, so its Jacobian would not be the step's; set "
            "model.norm per_dataset_stats (or auto), or loss.jacobian autojac (or auto)"
        )
    return ONE_PASS


def jacobian_chunk_size(compiled: bool, precision: str, model: MultiTaskNet) -> int | None:
    """How many rows of a gradient-based method's Jacobian TorchJD differentiates at once: all (None), with torch.vmap
    over the backward pass, except where vmap cannot run it: through a compiled backward (train.compile) or through
    BatchNorm's backward in bf16 or fp16 (its batched kernel takes one dtype: "expected scalar type BFloat16 but found
    Float"); there one by one (1), which computes the same Jacobian."""
    one_by_one = compiled or (precision != "fp32" and has_batchnorm(model.backbone))
    return 1 if one_by_one else None


def run_precision(cfg: Config, device: torch.device, saved: dict | None = None) -> str:
    """What a run trains in: train.precision, `auto` resolved for `device` when the run starts; on resume, what the
    checkpoint `saved` trained in (an auto run keeps its first decision on any device; any other value is a fixed
    key, the same in the checkpoint)."""
    if saved is not None and "precision" in saved.get(ckpt.STEP, {}):
        return saved[ckpt.STEP]["precision"]
    return resolve_precision(cfg.train.precision, device)


def build_conflicts(cfg: Config, tasks: list[str], world: World, train_splits: dict | None) -> GradientConflicts | None:
    """The gradient-conflict diagnostic of `cfg` (train.conflict_every_steps), or None where it is off."""
    several = cfg.sampler.tasks_per_step == "all" or cfg.sampler.tasks_per_step >= 2
    source = conflict_source(several, METHODS[cfg.loss.weighting].kind == GRADIENT, world.world_size)
    every = conflict_interval(cfg.train.conflict_every_steps, source, len(tasks))
    if not every or (source == BATCHES and train_splits is None):
        return None
    return GradientConflicts(
        [t for t in FLAGS if t in tasks],
        every,
        source,
        seed=cfg.train.seed,
        batch_size=max(2, -(-cfg.train.batch_size // world.world_size)),  # one process's share of the global batch
        splits=train_splits,
        is_main=world.is_main,
    )


def calibrate_step(cfg: Config, step: TrainStep, splits: dict, *, epoch: int) -> bool:
    """`calibrate_statistics` for the model of a training step, in its precision and norm synchronisation."""
    return calibrate_statistics(
        cfg,
        step.model,
        splits,
        step.transform,
        step.device,
        epoch=epoch,
        world=step.world,
        precision=step.precision,
        synchronised=step.norm_world is not None,
    )
