"""The recipe layer: from a Config to the components' plain arguments, and the checks a run needs from its machine.

Components (the model, the sampler, the optimizers, the weighting methods, the step, the transforms) take plain
arguments and know no Config; the functions here read the config and call them, as torchtune's recipes assemble
its components. `check_run` sits here, not in mmpt.config, because what it checks is the environment: timm's
model list, the optimizers timm can create here, the number of processes and the installed solvers; the rules
within one config are the schema's (mmpt.config.from_dict), checked where a config is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmpt import checkpoint as ckpt
from mmpt.backbones import create_backbone, resolve_backbone
from mmpt.config import Config, OptimConfig, recorded_config
from mmpt.conflicts import BATCHES, GradientConflicts, conflict_interval, conflict_source
from mmpt.data.sampler import Sampler
from mmpt.data.transforms import DeviceTransform
from mmpt.distributed import SINGLE, World
from mmpt.errors import MmptError
from mmpt.losses import TaskLoss, build_loss
from mmpt.model import MultiTaskNet, build_head, check_input_size, copy_initial_weights
from mmpt.mtl import GRADIENT, METHODS, environment_problems
from mmpt.mtl.build import build_method
from mmpt.norm import check_norm, has_batchnorm
from mmpt.norm_calibration import calibrate_norms
from mmpt.optim import build_optimizers, check_layer_decay, check_optimizer_name
from mmpt.precision import autocast, resolve_precision
from mmpt.step import TrainStep
from mmpt.tasks import FLAGS, TaskSpec
from mmpt.weights import read_weights, train_sizes


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
    if problems:
        raise MmptError("; ".join(problems))


def model_input_size(cfg: Config) -> int | str:
    """The input side the backbone sees: the data resolution in native mode, else model.img_size (or its default)."""
    return cfg.data.resolution if cfg.input.mode == "native" else (cfg.model.img_size or "default")


def build_model(cfg: Config, tasks: list[TaskSpec]) -> tuple[MultiTaskNet, dict[str, TaskLoss]]:
    """The backbone with one head per task, each head sized by its task's loss; and those losses."""
    losses = {t.flag: build_loss(t, ordinal=cfg.loss.ordinal) for t in tasks}
    backbone = create_backbone(
        cfg.model.backbone,
        pretrained=cfg.model.pretrained,
        img_size=cfg.model.img_size,
        drop_rate=cfg.model.drop_rate,
        dynamic_img_size=cfg.input.mode == "native",
    )
    heads = {
        t.flag: build_head(losses[t.flag].head, backbone.num_features, losses[t.flag].num_outputs, t.num_classes)
        for t in tasks
    }
    check_norm(cfg.model.norm, backbone, cfg.model.backbone)
    check_layer_decay(cfg.optim.layer_decay, backbone, cfg.model.backbone)
    model = MultiTaskNet(backbone, heads, input_size=cfg.model.img_size)
    check_input_size(model, cfg.data.resolution if cfg.input.mode == "native" else model.input_size, cfg.model.backbone)
    # converted after the size check, which runs the plain backbone: the per-dataset layers start from its values
    model = MultiTaskNet(
        backbone, heads, input_size=cfg.model.img_size, norm=cfg.model.norm, norm_tasks=tuple(t.flag for t in tasks)
    )
    return model, losses


def build_transform(cfg: Config, model: MultiTaskNet, device: torch.device | None = None) -> DeviceTransform:
    """On-device preprocessing to the model's input size with the backbone's mean/std; its normalisation constants
    moved to `device` once (when given), so no batch copies them."""
    mean, std = model.mean_std
    transform = DeviceTransform(
        input_size=model.input_size,
        mode=cfg.input.mode,
        mean=mean,
        std=std,
        pad_value=cfg.input.pad_value,
        interpolation=cfg.input.interpolation,
        augment=cfg.input.augment,
    )
    return transform.to(device) if device is not None else transform


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

    The one place the recipe and the benchmarks assemble a step.
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
    )


def jacobian_chunk_size(compiled: bool, precision: str, model: MultiTaskNet) -> int | None:
    """How many rows of a gradient-based method's Jacobian TorchJD differentiates at once: all (None), with torch.vmap
    over the backward pass, except where vmap cannot run it: through a compiled backward (train.compile) or through
    BatchNorm's backward in bf16 or fp16 (its batched kernel takes one dtype: "expected scalar type BFloat16 but found
    Float"); there one by one (1), which computes the same Jacobian."""
    one_by_one = compiled or (precision != "fp32" and has_batchnorm(model.backbone))
    return 1 if one_by_one else None


def run_precision(cfg: Config, device: torch.device, saved: dict | None = None) -> str:
    """What a run trains in: train.precision, `auto` resolved for `device` when the run starts; on resume, what the
    checkpoint `saved` trained in (an auto run keeps its first decision on any device; any other value is a recipe
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


def calibrate_statistics(
    cfg: Config,
    model: MultiTaskNet,
    splits: dict,
    transform: DeviceTransform,
    device: torch.device,
    *,
    epoch: int,
    world: World = SINGLE,
    precision: str | None = None,
    synchronised: bool = False,
) -> bool:
    """Precise per-dataset BatchNorm statistics before the validation after epoch `epoch` (0-based):
    model.norm_calibration_batches batches of train.batch_size images of each dataset's train split (`splits`:
    flag -> its train SplitData), drawn from train.seed and the epoch, each pass under the run's precision
    (`precision`, default train.precision resolved for `device`) as at evaluation, and with `synchronised` over every
    rank's images as the training step's passes are (model.sync_norm; `calibrate_norms`); returns whether
    it calibrated (not for 0 or shared statistics, nor after an epoch of train.probe_epochs: the backbone is frozen
    there, its statistics stay as loaded).
    """
    if epoch < cfg.train.probe_epochs:
        return False
    precision = precision or resolve_precision(cfg.train.precision, device)
    return calibrate_norms(
        model,
        splits,
        transform,
        device,
        batches=cfg.model.norm_calibration_batches,
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        epoch=epoch,
        world=world,
        forward_context=lambda: autocast(device, precision),
        synchronised=synchronised,
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


def load_initial_weights(model: MultiTaskNet, source: str | Path, cfg: Config) -> list[str]:
    """Copy another run's backbone, and its heads for datasets both runs have, into `model` (weights only).

    `source` is a run folder (its best.pt), a checkpoint file or a folder written by `evaluate.py export`.
    Optimizer, schedule and progress are not taken: the new run starts fresh from these weights (mm-PT as
    pre-training, then fine-tuning). Raises MmptError when the source's backbone or input size differs from
    `cfg`'s. Returns the heads copied.
    """
    path, state = read_weights(source)
    saved = recorded_config(state[ckpt.CONFIG])
    theirs, ours = resolve_backbone(saved.model.backbone), resolve_backbone(cfg.model.backbone)
    # another resolution or input.mode is refused even where the weights would fit (a padded or native
    # backbone): fine-tuning on other input is another experiment, not mm-PFT as the recipe states it
    if (
        theirs != ours
        or model_input_size(saved) != model_input_size(cfg)
        or (saved.data.resolution, saved.input.mode) != (cfg.data.resolution, cfg.input.mode)
    ):
        raise MmptError(
            f"model.init_from {path} holds a {theirs} backbone trained on {saved.data.resolution} px images "
            f"(input.mode {saved.input.mode}, model input {model_input_size(saved)}), but this run builds {ours} for "
            f"{cfg.data.resolution} px images (input.mode {cfg.input.mode}, model input {model_input_size(cfg)}); "
            "initialise from a run with the same backbone, resolution, input.mode and model.img_size"
        )
    sizes, _ = train_sizes(state, saved.data.datasets)  # the source run's own train splits
    return copy_initial_weights(model, state[ckpt.MODEL], saved.data.datasets, path, ours, sizes)


def load_backbone(source: str | Path) -> tuple[MultiTaskNet, Config]:
    """The trained backbone of a run folder, checkpoint or export, without its heads, and that run's config."""
    _, state = read_weights(source)
    return backbone_of(state)


def backbone_of(state: dict) -> tuple[MultiTaskNet, Config]:
    """The trained backbone of a checkpoint's state (mmpt.checkpoint.load, mmpt.weights.read_weights), without its
    heads, and that run's config."""
    cfg = recorded_config(state[ckpt.CONFIG])
    backbone = create_backbone(
        cfg.model.backbone,
        img_size=cfg.model.img_size,
        dynamic_img_size=cfg.input.mode == "native",
    )
    weights = {k.removeprefix("backbone."): v for k, v in state[ckpt.MODEL].items() if k.startswith("backbone.")}
    model = MultiTaskNet(
        backbone, {}, input_size=cfg.model.img_size, norm=cfg.model.norm, norm_tasks=tuple(cfg.data.datasets)
    )
    backbone.load_state_dict(weights)
    return model, cfg
