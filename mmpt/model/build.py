"""From a Config to the model: the backbone with its heads and losses, its input transform, its BatchNorm statistics
calibrated, and weights read from another run.

Components (the backbone, the heads, the losses, the per-dataset norm layers, the transform) take plain arguments and
know no Config; these functions read the config and call them, as torchtune's recipes assemble its components.
`build_model` decides model.norm once (`auto` resolved for the backbone and the datasets): everything after reads the
model's `norm`. Evaluation, probes, the export and training build their model here; training's other parts are
built in mmpt.training.build.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmpt.config import Config, recorded_config
from mmpt.data.transforms import DeviceTransform
from mmpt.errors import MmptError
from mmpt.model.backbones import create_backbone, resolve_backbone
from mmpt.model.calibration import calibrate_norms
from mmpt.model.losses import TaskLoss, build_loss
from mmpt.model.net import MultiTaskNet, build_head, check_input_size, copy_initial_weights
from mmpt.model.norm import check_norm, resolve_norm, saved_norm
from mmpt.model.weights import read_weights, train_sizes
from mmpt.runs import checkpoint as ckpt
from mmpt.runtime.distributed import SINGLE, World
from mmpt.runtime.precision import autocast, resolve_precision
from mmpt.tasks import TaskSpec


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
    model = MultiTaskNet(backbone, heads, input_size=cfg.model.img_size)
    check_input_size(model, cfg.data.resolution if cfg.input.mode == "native" else model.input_size, cfg.model.backbone)
    # model.norm as applied, decided here once; converted after the size check, which runs the plain backbone: the
    # per-dataset layers start from its values
    norm = resolve_norm(cfg.model.norm, backbone, len(tasks))
    model = MultiTaskNet(
        backbone, heads, input_size=cfg.model.img_size, norm=norm, norm_tasks=tuple(t.flag for t in tasks)
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
    # backbone): fine-tuning on other input is another experiment, not mm-PFT as the protocol states it
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
    """The trained backbone of a checkpoint's state (mmpt.runs.checkpoint.load, mmpt.model.weights.read_weights),
    without its heads, with the BatchNorm statistics its weights hold, and that run's config."""
    cfg = recorded_config(state[ckpt.CONFIG])
    backbone = create_backbone(
        cfg.model.backbone,
        img_size=cfg.model.img_size,
        dynamic_img_size=cfg.input.mode == "native",
    )
    weights = {k.removeprefix("backbone."): v for k, v in state[ckpt.MODEL].items() if k.startswith("backbone.")}
    norm = saved_norm(weights)  # what the weights hold (a recorded model.norm may say auto)
    model = MultiTaskNet(backbone, {}, input_size=cfg.model.img_size, norm=norm, norm_tasks=tuple(cfg.data.datasets))
    backbone.load_state_dict(weights)
    return model, cfg
