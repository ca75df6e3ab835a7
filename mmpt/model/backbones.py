"""Backbone names and creation: aliases, `resolve_backbone`, `create_backbone`, the input size a backbone takes.

A leaf, as timm's `_registry` and `_factory` are: it imports only timm, torch and mmpt.errors.
"""

from __future__ import annotations

import inspect

import timm
import torch
from torch import nn

from mmpt.errors import MmptError, unknown_name

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

# The arguments that size a model built for a fixed input (ViTs, Swin, ...); convolutional models take none.
SIZE_ARGUMENTS = ("img_size", "dynamic_img_size", "dynamic_img_pad")


def resolve_backbone(name: str) -> str:
    """Return the timm model name for an alias or timm name; raise MmptError listing close matches."""
    timm_name = BACKBONES.get(name, name)
    if timm.is_model(timm_name):
        return timm_name
    raise unknown_name("backbone", name, list(BACKBONES) + timm.list_models())


def size_arguments(timm_name: str) -> frozenset[str]:
    """The SIZE_ARGUMENTS that the model class of `timm_name` takes, from its `__init__` signature.

    The class is found by building the model on the meta device: no memory is allocated and no random number
    drawn, so the real build that follows starts from the same generator state.
    """
    with torch.device("meta"):
        probe = timm.create_model(timm_name, pretrained=False, num_classes=0)
    parameters = inspect.signature(type(probe)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return frozenset(SIZE_ARGUMENTS)
    return frozenset(a for a in SIZE_ARGUMENTS if a in parameters)


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
    A model whose class takes neither argument (a CNN) accepts any size and gets none (`size_arguments`).
    Raises MmptError for an unknown name or pretrained weights that cannot be fetched.
    """
    timm_name = resolve_backbone(name)
    wanted = {"img_size": img_size} if img_size else {}
    if dynamic_img_size:
        wanted.update(dynamic_img_size=True, dynamic_img_pad=True)
    if wanted:
        accepted = size_arguments(timm_name)
        wanted = {key: value for key, value in wanted.items() if key in accepted}
    try:
        return timm.create_model(timm_name, pretrained=pretrained, num_classes=0, drop_rate=drop_rate, **wanted)
    except (OSError, RuntimeError) as exc:
        if not pretrained:
            raise
        raise MmptError(
            f"could not load pretrained weights for {timm_name} ({str(exc).splitlines()[0][:160]}); "
            "put them in the Hugging Face cache (HF_HOME) or set model.pretrained: false"
        ) from None


def input_size(backbone: nn.Module, img_size: int | None = None) -> int:
    """The side that pad and resize bring images to: `img_size` (model.img_size) if set, else the size the
    backbone was built for (its pretrained_cfg)."""
    return int(img_size or backbone.pretrained_cfg["input_size"][-1])


def mean_std(backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std the backbone's inputs are normalised with (its pretrained_cfg)."""
    cfg = backbone.pretrained_cfg
    return tuple(cfg["mean"]), tuple(cfg["std"])
