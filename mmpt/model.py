"""MultiTaskNet: one timm backbone shared by every task, one classification head per task."""

from __future__ import annotations

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
    name: str, *, pretrained: bool = False, img_size: int | None = None, drop_rate: float = 0.0
) -> nn.Module:
    """Build a timm backbone without classifier (`num_classes=0`), so `forward` returns pooled features.

    `img_size` is passed to models built for a fixed size (ViTs); convolutional models take any size.
    Raises MmptError for an unknown name or pretrained weights that cannot be fetched.
    """
    timm_name = resolve_backbone(name)
    kwargs = {"num_classes": 0, "drop_rate": drop_rate}
    try:
        try:
            return timm.create_model(timm_name, pretrained=pretrained, **kwargs, **({"img_size": img_size} if img_size else {}))
        except TypeError as exc:
            if img_size is None or "img_size" not in str(exc):
                raise
            # convolutional backbones have no img_size argument: any input size works
            return timm.create_model(timm_name, pretrained=pretrained, **kwargs)
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

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        cfg = self.backbone.pretrained_cfg
        return tuple(cfg["mean"]), tuple(cfg["std"])


def build_model(cfg: Config, tasks: list[TaskSpec]) -> tuple[MultiTaskNet, dict[str, TaskLoss]]:
    """The backbone with one head per task, each head sized by its task's loss; and those losses."""
    losses = {t.flag: build_loss(t, ordinal=cfg.loss.ordinal) for t in tasks}
    backbone = create_backbone(
        cfg.model.backbone, pretrained=cfg.model.pretrained, img_size=cfg.model.img_size, drop_rate=cfg.model.drop_rate
    )
    heads = {
        t.flag: build_head(losses[t.flag].head, backbone.num_features, losses[t.flag].num_outputs, t.num_classes)
        for t in tasks
    }
    return MultiTaskNet(backbone, heads, input_size=cfg.model.img_size), losses


def build_transform(cfg: Config, model: MultiTaskNet) -> DeviceTransform:
    """On-device preprocessing to the model's input size with the backbone's mean/std."""
    mean, std = model.mean_std
    return DeviceTransform(
        input_size=model.input_size, mode=cfg.input.mode, mean=mean, std=std, pad_value=cfg.input.pad_value,
        interpolation=cfg.input.interpolation, augment=cfg.input.augment,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP and torch.compile wrappers so state_dict keys never carry their prefixes."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
