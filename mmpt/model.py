"""MultiTaskNet: one timm backbone shared by every task, one classification head per task."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from mmpt.config import Config
from mmpt.data.transforms import DeviceTransform
from mmpt.errors import MmptError, unknown_name
from mmpt.losses import TaskLoss, build_head, build_loss
from mmpt.tasks import TaskSpec

# Short names researchers use; any other timm model name works as it is.
BACKBONES: dict[str, str] = {
    "vit_b16": "vit_base_patch16_224",
    "vit_s16": "vit_small_patch16_224",
    "vit_t16": "vit_tiny_patch16_224",
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "densenet121": "densenet121",
    "convnext_tiny": "convnext_tiny",
    "efficientnet_b0": "efficientnet_b0",
}


def resolve_backbone(name: str) -> str:
    """Return the timm model name for an alias or timm name; raise MmptError listing close matches."""
    timm_name = BACKBONES.get(name, name)
    if timm.is_model(timm_name):
        return timm_name
    raise unknown_name("backbone", name, list(BACKBONES) + timm.list_models())


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    img_size: int | None = None,
    drop_rate: float = 0.0,
    dynamic_img_size: bool = False,
) -> nn.Module:
    """Build a timm backbone without classifier (`num_classes=0`), so `forward` returns pooled features.

    `img_size` is passed to models built for a fixed size (ViTs); `dynamic_img_size` lets such models take
    any input size (timm's dynamic_img_size, padding to a multiple of the patch), for `input.mode: native`.
    Convolutional models take neither argument and accept any size. Raises MmptError for an unknown name or
    pretrained weights that cannot be fetched.
    """
    timm_name = resolve_backbone(name)
    kwargs = {"num_classes": 0, "drop_rate": drop_rate}
    optional = {"img_size": img_size} if img_size else {}
    if dynamic_img_size:
        optional.update(dynamic_img_size=True, dynamic_img_pad=True)
    try:
        while True:
            try:
                return timm.create_model(timm_name, pretrained=pretrained, **kwargs, **optional)
            except TypeError as exc:
                # a model without one of the size arguments (a CNN) takes any size: drop what it refused
                refused = [key for key in optional if f"'{key}'" in str(exc)]
                if not refused:
                    raise
                for key in refused:
                    del optional[key]
    except (OSError, RuntimeError) as exc:
        if not pretrained:
            raise
        raise MmptError(
            f"could not load pretrained weights for {timm_name} ({str(exc).splitlines()[0][:160]}); "
            "put them in the Hugging Face cache (HF_HOME) or set model.pretrained: false"
        ) from None


class MultiTaskNet(nn.Module):
    """A shared backbone and a `ModuleDict` of heads keyed by task (medmnist flag).

    `forward(x, task)` returns the logits of `task`'s head for the N×3×S×S input `x`.
    """

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], input_size: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        # the side pad/resize bring images to: as configured, else the backbone's pretrained_cfg
        self.input_size = input_size or int(backbone.pretrained_cfg["input_size"][-1])

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        features = self.backbone(x)  # N×F
        return self.heads[task](features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled N×F features of the N×3×S×S input `x` (what every head reads)."""
        return self.backbone(x)

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        cfg = self.backbone.pretrained_cfg
        return tuple(cfg["mean"]), tuple(cfg["std"])


def build_model(cfg: Config, tasks: list[TaskSpec]) -> tuple[MultiTaskNet, dict[str, TaskLoss]]:
    """The backbone with one head per task, each head sized by its task's loss; and those losses."""
    losses = {t.flag: build_loss(t, ordinal=cfg.loss.ordinal) for t in tasks}
    backbone = create_backbone(
        cfg.model.backbone, pretrained=cfg.model.pretrained, img_size=cfg.model.img_size,
        drop_rate=cfg.model.drop_rate, dynamic_img_size=cfg.input.mode == "native",
    )
    heads = {
        t.flag: build_head(losses[t.flag].head, backbone.num_features, losses[t.flag].num_outputs, t.num_classes)
        for t in tasks
    }
    model = MultiTaskNet(backbone, heads, input_size=cfg.model.img_size)
    check_input_size(model, cfg.data.resolution if cfg.input.mode == "native" else model.input_size, cfg.model.backbone)
    return model, losses


@torch.no_grad()
def check_input_size(model: MultiTaskNet, size: int, backbone: str) -> None:
    """Run one blank image through the backbone; raise MmptError if it cannot take `size` px inputs.

    Eval mode and no gradients: no RNG is drawn and no statistic moves, so training is unaffected.
    """
    was_training = model.training
    model.eval()
    try:
        model.backbone(torch.zeros(1, 3, size, size))
    except RuntimeError as exc:
        raise MmptError(
            f"backbone {backbone} cannot take {size}x{size} inputs ({str(exc).splitlines()[0][:120]}); "
            f"use input.mode pad or resize with a larger model.img_size, or another backbone"
        ) from None
    finally:
        model.train(was_training)


def build_transform(cfg: Config, model: MultiTaskNet) -> DeviceTransform:
    """On-device preprocessing to the model's input size with the backbone's mean/std."""
    mean, std = model.mean_std
    return DeviceTransform(
        input_size=model.input_size, mode=cfg.input.mode, mean=mean, std=std, pad_value=cfg.input.pad_value,
        interpolation=cfg.input.interpolation, augment=cfg.input.augment,
    )


def checkpoint_path(source: str | Path) -> Path:
    """A run folder means its checkpoints/best.pt; anything else is taken as a checkpoint file."""
    source = Path(source)
    return source / "checkpoints" / "best.pt" if source.is_dir() else source


def model_input_size(cfg: Config) -> int | str:
    """The input side the backbone sees: the data resolution in native mode, else model.img_size (or its default)."""
    return cfg.data.resolution if cfg.input.mode == "native" else (cfg.model.img_size or "default")


def load_initial_weights(model: MultiTaskNet, source: str | Path, cfg: Config) -> list[str]:
    """Copy another run's backbone, and its heads for datasets both runs have, into `model` (weights only).

    `source` is a run folder (its best.pt), a checkpoint file or a folder written by `evaluate.py export`.
    Optimizer, schedule and progress are not
    taken: the new run starts fresh from these weights (mm-PT as pre-training, then fine-tuning). Raises
    MmptError when the source's backbone or input size differs from `cfg`'s. Returns the heads copied.
    """
    from mmpt import checkpoint as ckpt
    from mmpt.config import from_dict
    from mmpt.experiments.export import export_state, is_export

    # an export (evaluate.py export) is read as the checkpoint it came from
    path = Path(source) if is_export(source) else checkpoint_path(source)
    state = export_state(path) if is_export(source) else ckpt.load(path)
    saved = from_dict(state[ckpt.CONFIG])
    theirs, ours = resolve_backbone(saved.model.backbone), resolve_backbone(cfg.model.backbone)
    if theirs != ours or model_input_size(saved) != model_input_size(cfg):
        raise MmptError(
            f"model.init_from {path} holds a {theirs} backbone for {model_input_size(saved)} px inputs, but this run "
            f"builds {ours} for {model_input_size(cfg)} px; initialise from a run with the same backbone, "
            "resolution, input.mode and model.img_size"
        )
    weights = state[ckpt.MODEL]
    backbone = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    mismatched = [k for k, v in model.backbone.state_dict().items() if k not in backbone or backbone[k].shape != v.shape]
    if mismatched or len(backbone) != len(model.backbone.state_dict()):
        raise MmptError(
            f"model.init_from {path}: its backbone weights do not fit this run's {ours} "
            f"(first difference: {(mismatched or sorted(backbone))[0]}); initialise from a run with the same backbone"
        )
    model.backbone.load_state_dict(backbone)
    copied = []
    for flag, head in model.heads.items():
        prefix = f"heads.{flag}."
        theirs_head = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        own = head.state_dict()
        # a head of another shape (e.g. loss.ordinal ce vs coral) stays freshly initialised
        if theirs_head.keys() == own.keys() and all(theirs_head[k].shape == own[k].shape for k in own):
            head.load_state_dict(theirs_head)
            copied.append(flag)
    print(f"initialised from {path}: backbone and heads of {', '.join(copied) or 'no dataset'}")
    return copied


def load_backbone(source: str | Path) -> tuple[MultiTaskNet, Config]:
    """The trained backbone of a run folder or checkpoint, without its heads, and that run's config."""
    from mmpt import checkpoint as ckpt
    from mmpt.config import from_dict
    from mmpt.experiments.export import export_state, is_export

    state = export_state(source) if is_export(source) else ckpt.load(checkpoint_path(source))
    cfg = from_dict(state[ckpt.CONFIG])
    backbone = create_backbone(
        cfg.model.backbone, img_size=cfg.model.img_size, dynamic_img_size=cfg.input.mode == "native",
    )
    weights = {k.removeprefix("backbone."): v for k, v in state[ckpt.MODEL].items() if k.startswith("backbone.")}
    backbone.load_state_dict(weights)
    return MultiTaskNet(backbone, {}, input_size=cfg.model.img_size), cfg


def check_batch_size(model: nn.Module, batch_size: int) -> None:
    """Raise MmptError if `model` has BatchNorm layers and `batch_size` is 1: BatchNorm trains on 2+ values per channel."""
    if batch_size < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise MmptError(
            "train.batch_size is 1, but the backbone has BatchNorm layers, which cannot train on one image; "
            "use --batch-size 2 or more"
        )
