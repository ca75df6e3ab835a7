"""Per-head optimizers: a step moves the backbone and the sampled head only; each schedule follows its own updates."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mmpt.config import load_config
from mmpt.errors import MmptError
from mmpt.model.backbones import create_backbone
from mmpt.model.build import build_model
from mmpt.tasks import resolve_tasks
from mmpt.training.optim import BACKBONE, SHARED, build_optimizers, check_layer_decay

TASKS = ("a", "b", "c")


def tiny_net(seed: int = 0) -> tuple[nn.Module, dict[str, nn.Module]]:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    heads = {t: nn.Linear(8, 2) for t in TASKS}
    return backbone, heads


def train_step(backbone, heads, optimizers, task: str) -> None:
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    nn.functional.cross_entropy(heads[task](backbone(x)), y).backward()
    optimizers.step((task,))
    optimizers.zero_grad()


def parameter_copies(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("per_head", [True, False])
def test_a_step_updates_the_backbone_and_the_sampled_head_only(per_head):
    backbone, heads = tiny_net()
    optimizers = build_optimizers(
        backbone, heads, dict.fromkeys(TASKS, 10), epochs=1, lr=0.1, weight_decay=0.05, per_head=per_head
    )
    before = {"backbone": parameter_copies(backbone), **{t: parameter_copies(h) for t, h in heads.items()}}
    train_step(backbone, heads, optimizers, "b")
    assert not same(parameter_copies(backbone), before["backbone"])
    assert not same(parameter_copies(heads["b"]), before["b"])
    # untouched, weight decay included
    assert same(parameter_copies(heads["a"]), before["a"]) and same(parameter_copies(heads["c"]), before["c"])


def test_one_optimizer_for_the_backbone_and_one_per_head_each_with_its_own_schedule():
    backbone, heads = tiny_net()
    optimizers = build_optimizers(backbone, heads, {"a": 8, "b": 2, "c": 2}, epochs=1, lr=0.1, head_lr=0.2)
    assert set(optimizers.optimizers) == {BACKBONE, *TASKS}
    for _ in range(4):
        train_step(backbone, heads, optimizers, "a")
    lrs = optimizers.learning_rates()
    # the backbone's cosine runs over all 12 steps of the epoch, a's over its own 8, b's and c's have not moved
    assert optimizers.updates == {BACKBONE: 4, "a": 4}
    assert lrs["b"] == lrs["c"] == pytest.approx(0.2)
    assert lrs["a"] == pytest.approx(0.2 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 4 / 8)).item()))
    assert lrs[BACKBONE] == pytest.approx(0.1 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 4 / 12)).item()))


def test_a_heads_schedule_reaches_its_end_after_its_own_updates_not_global_steps():
    backbone, heads = tiny_net()
    optimizers = build_optimizers(backbone, heads, {"a": 2, "b": 6, "c": 2}, epochs=1, lr=0.1, min_lr_ratio=0.1)
    for task in ("b", "b", "b", "b", "b", "b", "a", "a"):
        train_step(backbone, heads, optimizers, task)
    lrs = optimizers.learning_rates()
    assert lrs["a"] == pytest.approx(0.01) and lrs["b"] == pytest.approx(0.01)  # both at their own ends
    assert lrs["c"] == pytest.approx(0.1)


def test_shared_optimizer_is_one_schedule_over_global_steps():
    backbone, heads = tiny_net()
    optimizers = build_optimizers(backbone, heads, dict.fromkeys(TASKS, 4), epochs=1, lr=0.1, per_head=False)
    assert set(optimizers.optimizers) == {SHARED}
    for task in ("a", "b", "c"):
        train_step(backbone, heads, optimizers, task)
    assert optimizers.learning_rates()[SHARED] == pytest.approx(
        0.1 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 3 / 12)).item())
    )


def test_constant_schedule_keeps_each_group_at_its_own_lr_after_warmup():
    backbone, heads = tiny_net()
    optimizers = build_optimizers(
        backbone,
        heads,
        dict.fromkeys(TASKS, 4),
        epochs=2,
        lr=0.1,
        head_lr=0.3,
        per_head=False,
        schedule="constant",
        warmup_epochs=0.25,
    )
    for task in ("a", "b", "c", "a", "b"):
        train_step(backbone, heads, optimizers, task)
    group_lrs = sorted({round(g["lr"], 12) for g in optimizers.optimizers[SHARED].param_groups})
    assert group_lrs == [0.1, 0.3]


def test_state_dict_restores_moments_update_counts_and_learning_rates():
    backbone, heads = tiny_net()
    optimizers = build_optimizers(backbone, heads, dict.fromkeys(TASKS, 5), epochs=1, lr=0.1)
    for task in ("a", "b", "a"):
        train_step(backbone, heads, optimizers, task)
    state = copy.deepcopy(optimizers.state_dict())  # as through a checkpoint file: no shared tensors
    backbone2, heads2 = tiny_net()
    backbone2.load_state_dict(backbone.state_dict())
    for t in TASKS:
        heads2[t].load_state_dict(heads[t].state_dict())
    restored = build_optimizers(backbone2, heads2, dict.fromkeys(TASKS, 5), epochs=1, lr=0.1)
    restored.load_state_dict(state)
    assert restored.learning_rates() == optimizers.learning_rates()
    torch.manual_seed(1)
    train_step(backbone, heads, optimizers, "c")
    torch.manual_seed(1)
    train_step(backbone2, heads2, restored, "c")
    assert same(parameter_copies(backbone), parameter_copies(backbone2)) and same(
        parameter_copies(heads["c"]), parameter_copies(heads2["c"])
    )


# --- layer-wise LR decay (optim.layer_decay) and a frozen backbone (LP-FT) -------------------------------------------

# (backbone, layer groups timm's group_matcher gives it, a stem parameter, a parameter of a middle layer group and its
# index, a last-block parameter)
LAYERED = [
    ("test_resnet", 5, "conv1.0.weight", ("layer2.0.conv1.weight", 2), "layer4.0.conv2.weight"),
    ("resnet18", 9, "conv1.weight", ("layer2.1.conv1.weight", 4), "layer4.1.conv2.weight"),
    ("test_vit", 7, "patch_embed.proj.weight", ("blocks.2.attn.qkv.weight", 3), "blocks.5.mlp.fc2.weight"),
    ("vit_b16", 13, "patch_embed.proj.weight", ("blocks.5.attn.qkv.weight", 6), "blocks.11.mlp.fc2.weight"),
]


def lr_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> tuple[float, float]:
    """(lr, weight_decay) of the parameter group that holds `param`."""
    (group,) = [g for g in optimizer.param_groups if any(p is param for p in g["params"])]
    return group["lr"], group["weight_decay"]


@pytest.mark.parametrize("name, layers, stem, middle, last", LAYERED, ids=[row[0] for row in LAYERED])
def test_layer_decay_lowers_the_lr_layer_by_layer_from_the_last_block_to_the_stem(name, layers, stem, middle, last):
    backbone = create_backbone(name)
    heads = {t: nn.Linear(backbone.num_features, 2) for t in TASKS}
    decay, lr = 0.5, 1e-3
    optimizers = build_optimizers(
        backbone, heads, dict.fromkeys(TASKS, 10), epochs=2, lr=lr, weight_decay=0.05, layer_decay=decay
    )
    opt, params = optimizers.optimizers[BACKBONE], dict(backbone.named_parameters())
    for update in (0, 7):  # at the start, and after the cosine schedule has moved: the scale stays per layer
        optimizers.schedules[BACKBONE].step_update(update)
        peak = lr * 0.5 * (1 + math.cos(math.pi * update / 60))  # 30 steps per epoch, 2 epochs
        assert lr_of(opt, params[last])[0] == pytest.approx(peak)
        assert lr_of(opt, params[middle[0]])[0] == pytest.approx(peak * decay ** (layers - 1 - middle[1]))
        assert lr_of(opt, params[stem])[0] == pytest.approx(peak * decay ** (layers - 1))
        assert optimizers.learning_rates()[BACKBONE] == pytest.approx(peak)  # what the log shows: the top layer's
    assert len({g["lr_scale"] for g in opt.param_groups}) == layers
    # every backbone parameter once; weight decay as without layer decay: none on 1-D parameters (and on ViT's
    # position embedding and class token, timm's no_weight_decay)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)
    no_decay = set(getattr(backbone, "no_weight_decay", set)())
    for pname, p in params.items():
        assert lr_of(opt, p)[1] == (0.0 if p.ndim <= 1 or pname in no_decay else 0.05), pname
    # the heads keep their own optimizers at the full LR
    assert all(optimizers.learning_rates()[t] == pytest.approx(lr) for t in TASKS)


def test_layer_decay_groups_per_dataset_norm_weights_with_their_block():
    cfg = load_config(overrides=[{"model": {"backbone": "test_resnet", "norm": "per_dataset"}}])
    model, _ = build_model(cfg, resolve_tasks(["breast", "retina"]))
    optimizers = build_optimizers(
        model.backbone, dict(model.heads), dict.fromkeys(model.heads, 4), epochs=1, lr=1.0, layer_decay=0.5
    )
    params = dict(model.backbone.named_parameters())
    opt = optimizers.optimizers[BACKBONE]
    assert lr_of(opt, params["layer4.0.bn1.task_weight.1"])[0] == lr_of(opt, params["layer4.0.conv1.weight"])[0] == 1
    assert lr_of(opt, params["conv1.1.task_bias.0"])[0] == lr_of(opt, params["conv1.0.weight"])[0] == 0.5**4


def test_layer_decay_refuses_a_backbone_timm_cannot_split_into_layers():
    backbone, _ = tiny_net()  # a plain Sequential: no group_matcher, no pretrained_cfg
    with pytest.raises(MmptError, match=r"optim.layer_decay 0.5 needs a backbone that timm splits into layers"):
        check_layer_decay(0.5, backbone, "tiny")
    check_layer_decay(None, backbone, "tiny")  # off: nothing to split
    check_layer_decay(0.5, create_backbone("test_resnet"), "test_resnet")


def test_a_frozen_backbone_keeps_its_weights_and_its_schedule_starts_when_it_unfreezes():
    backbone, heads = tiny_net()
    # LP-FT: 1 probe epoch of 3 (12 steps each); the backbone's warmup (1 epoch) and cosine run over epochs 2-3
    optimizers = build_optimizers(
        backbone, heads, dict.fromkeys(TASKS, 4), epochs=3, probe_epochs=1, lr=0.1, warmup_epochs=1
    )
    optimizers.frozen = frozenset({BACKBONE})
    before = parameter_copies(backbone)
    for task in TASKS * 4:
        train_step(backbone, heads, optimizers, task)
    assert same(parameter_copies(backbone), before)  # weight decay included
    assert BACKBONE not in optimizers.updates and optimizers.updates == dict.fromkeys(TASKS, 4)
    assert optimizers.learning_rates()[BACKBONE] == pytest.approx(0.1 * 1e-3)  # the warmup's start, unmoved
    optimizers.frozen = frozenset()
    for task in TASKS * 4:
        train_step(backbone, heads, optimizers, task)
    assert not same(parameter_copies(backbone), before)
    # warmup over 12 of the backbone's own updates, then the cosine over 24 (its two epochs): half way at 12
    assert optimizers.updates[BACKBONE] == 12
    assert optimizers.learning_rates()[BACKBONE] == pytest.approx(0.1 * 0.5)
    # the heads' schedules span all 3 epochs (12 updates each) of their own updates: 8 of 12 taken
    assert optimizers.learning_rates()["a"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 8 / 12)))
