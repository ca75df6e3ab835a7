"""MultiTaskNet: a timm backbone with one head per task; aliases; input sizes per input.mode."""

from __future__ import annotations

import pytest
import timm
import torch

from mmpt.config import load_config
from mmpt.config.settings import parse_override
from mmpt.errors import MmptError
from mmpt.model.backbones import BACKBONES, create_backbone, resolve_backbone
from mmpt.model.build import build_model, build_transform
from mmpt.tasks import FLAGS, TASKS, resolve_tasks


def config(*overrides: str):
    return load_config(None, [parse_override(o) for o in overrides])


@pytest.mark.parametrize("alias", sorted(BACKBONES))
def test_every_alias_names_a_timm_model(alias):
    assert resolve_backbone(alias) in timm.list_models()


def test_vit_b16_is_vit_base_patch16_224_and_timm_names_pass_through():
    assert resolve_backbone("vit_b16") == "vit_base_patch16_224"
    assert resolve_backbone("resnet34") == "resnet34"


def test_unknown_backbone_lists_close_matches():
    with pytest.raises(MmptError, match=r"unknown backbone 'resnet_18'.*resnet18"):
        resolve_backbone("resnet_18")


def test_one_head_per_task_sized_by_task_type():
    cfg = config("model.backbone=test_resnet", "input.mode=native")
    model, losses = build_model(cfg, resolve_tasks("all"))
    assert list(model.heads) == list(FLAGS)
    x = torch.randn(4, 3, 28, 28)
    model.eval()
    for flag, task in TASKS.items():
        logits = model(x, flag)
        # multi-label: one logit per label; CORAL: K-1 thresholds; otherwise one logit per class (binary: 2)
        expected = {"multi-label, binary-class": 14, "ordinal-regression": task.num_classes - 1}.get(
            task.task_type, task.num_classes
        )
        assert logits.shape == (4, expected), flag
        assert losses[flag].scores(logits).shape == (4, task.num_classes)


def test_backbone_has_no_classifier_and_its_features_feed_the_heads():
    backbone = create_backbone("test_resnet")
    assert backbone.num_classes == 0
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, backbone.num_features)


@pytest.mark.parametrize("size", [28, 64])
def test_vit_in_native_mode_takes_any_medmnist_size(size):
    cfg = config("model.backbone=test_vit", "input.mode=native", f"data.resolution={size}")
    model, _ = build_model(cfg, resolve_tasks("breast"))
    transform = build_transform(cfg, model)
    x = transform(torch.randint(0, 256, (2, size, size), dtype=torch.uint8))
    assert x.shape == (2, 3, size, size)
    assert model(x, "breastmnist").shape == (2, 2)


def test_pad_mode_builds_a_vit_for_img_size_and_pads_to_it():
    cfg = config("model.backbone=test_vit", "input.mode=pad", "model.img_size=48")
    model, _ = build_model(cfg, resolve_tasks("breast"))
    assert model.input_size == 48
    x = build_transform(cfg, model)(torch.zeros(2, 28, 28, dtype=torch.uint8))
    assert x.shape == (2, 3, 48, 48)
    assert model(x, "breastmnist").shape == (2, 2)


def test_a_backbone_that_cannot_take_the_input_size_is_one_clear_error():
    cfg = config("model.backbone=test_convnext", "input.mode=native")
    # test_convnext's downsampling stages reduce 28 px below its kernel size
    with pytest.raises(MmptError, match=r"backbone test_convnext cannot take 28x28 inputs.*input.mode pad or resize"):
        build_model(cfg, resolve_tasks("breast"))
