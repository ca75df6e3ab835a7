"""Optimizers and LR schedules: one for the backbone and one per head, each stepped by its own updates.

A head is updated only on the steps that sample its task, so its cosine schedule runs over its own
update count, not the global step. `per_head=False` gives the thesis code's single shared optimizer
(one schedule over global steps) for ablation.

Layer-wise learning-rate decay (`layer_decay`, timm's `param_groups_layer_decay` with the backbone's
`group_matcher`) gives each of the backbone's L layer groups (stem, then every block) its own `lr_scale`,
decay^(L - 1 - l): the last block trains at the backbone's LR, the stem at the lowest; timm's schedules apply
the scale. A frozen optimizer (`Optimizers.frozen`, LP-FT's probe phase) neither steps nor advances its schedule.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from timm.optim import (
    create_optimizer_v2,
    get_optimizer_info,
    list_optimizers,
    param_groups_layer_decay,
    param_groups_weight_decay,
)
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from mmpt.config.choices import SCHEDULES as SCHEDULE_NAMES
from mmpt.errors import MmptError, lookup, unknown_name

SHARED = "shared"  # the group name of the single optimizer when per_head is off
BACKBONE = "backbone"


def check_optimizer_name(name: str) -> None:
    """Raise MmptError unless timm knows the optimizer `name` and can create it in this environment."""
    if name not in list_optimizers():
        raise unknown_name("optimizer", name, list_optimizers())
    # some of timm's optimizers need CUDA or another package: find out now, before the run folder is written
    try:
        create_optimizer_v2([nn.Parameter(torch.zeros(1))], opt=name, lr=1e-3)  # no module: draws no random numbers
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise MmptError(
            f"optimizer {name} cannot be created here ({reason}); choose another optim.name, e.g. adamw"
        ) from None


def _cosine(optimizer: torch.optim.Optimizer, total_updates: int, min_lr_ratio: float, warmup: dict) -> Scheduler:
    """timm's cosine schedule over `total_updates` updates, down to min_lr_ratio times the first group's LR."""
    base_lr = optimizer.param_groups[0]["lr"]
    return CosineLRScheduler(
        optimizer, t_initial=max(total_updates, 1), lr_min=base_lr * min_lr_ratio, warmup_prefix=False, **warmup
    )


def _constant(optimizer: torch.optim.Optimizer, total_updates: int, min_lr_ratio: float, warmup: dict) -> Scheduler:
    """Each parameter group at its own LR (a shared optimizer's heads may have head_lr) after the warmup."""
    return StepLRScheduler(optimizer, decay_t=1, decay_rate=1.0, warmup_prefix=True, **warmup)


# optim.schedule: every schedule mmpt implements (the config's choices, mmpt.config.choices.SCHEDULES)
SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, int, float, dict], Scheduler]] = {
    "cosine": _cosine,
    "constant": _constant,
}
assert tuple(SCHEDULES) == SCHEDULE_NAMES, f"schedules {tuple(SCHEDULES)} differ from {SCHEDULE_NAMES}"


def build_schedule(
    optimizer: torch.optim.Optimizer,
    *,
    total_updates: int,
    warmup_updates: int,
    min_lr_ratio: float,
    schedule: str,
) -> Scheduler:
    """The schedule `schedule` (a key of SCHEDULES) over `total_updates` updates, with linear warmup.

    Raises MmptError for an unknown schedule, listing the valid names.
    """
    make = lookup("schedule", SCHEDULES, schedule)
    base_lr = optimizer.param_groups[0]["lr"]
    warmup = dict(warmup_t=warmup_updates, warmup_lr_init=base_lr * 1e-3 if warmup_updates else 0.0, t_in_epochs=False)
    return make(optimizer, total_updates, min_lr_ratio, warmup)


@dataclass
class Optimizers:
    """The optimizers, their schedules and the count of updates each has made."""

    optimizers: dict[str, torch.optim.Optimizer]
    schedules: dict[str, Scheduler]
    updates: dict[str, int] = field(default_factory=dict)
    clip_grad_norm: float | None = None
    # optimizers that sit out (LP-FT's probe phase: the backbone's); their update counts and schedules stay put
    frozen: frozenset[str] = frozenset()
    _param_cache: dict[tuple[str, ...], list[torch.Tensor]] = field(default_factory=dict, repr=False)

    def groups_for(self, tasks: tuple[str, ...]) -> tuple[str, ...]:
        """The optimizers that step when `tasks` are in a step: the backbone's and those heads', or the shared one;
        less the frozen ones."""
        names = (SHARED,) if SHARED in self.optimizers else (BACKBONE, *tasks)
        return tuple(n for n in names if n not in self.frozen) if self.frozen else names

    def _params(self, names: tuple[str, ...]) -> list[torch.Tensor]:
        # built once per set of optimizers, not per step
        if names not in self._param_cache:
            self._param_cache[names] = [p for n in names for g in self.optimizers[n].param_groups for p in g["params"]]
        return self._param_cache[names]

    def zero_grad(self, tasks: tuple[str, ...] | None = None) -> None:
        """Drop the gradients of the optimizers that stepped for `tasks` (all optimizers when None)."""
        names = self.optimizers if tasks is None else self.groups_for(tasks)
        for name in names:
            self.optimizers[name].zero_grad(set_to_none=True)

    def step(self, tasks: tuple[str, ...], scaler: torch.amp.GradScaler | None = None) -> None:
        """Clip (if configured) and step the optimizers of `tasks`, then advance their schedules.

        With an fp16 `scaler`, gradients are unscaled before clipping and a step with non-finite
        gradients is skipped by the scaler (the schedules still advance, as in timm's train loop).
        """
        names = self.groups_for(tasks)
        if scaler is not None:
            for name in names:
                scaler.unscale_(self.optimizers[name])
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._params(names), self.clip_grad_norm)
        for name in names:
            if scaler is not None:
                scaler.step(self.optimizers[name])
            else:
                self.optimizers[name].step()
            self.updates[name] = self.updates.get(name, 0) + 1
            self.schedules[name].step_update(self.updates[name])
        if scaler is not None:
            scaler.update()

    def learning_rates(self) -> dict[str, float]:
        """Each optimizer's scheduled LR (with optim.layer_decay: that of its top layer, whose scale is 1)."""
        return {
            name: opt.param_groups[0]["lr"] / opt.param_groups[0].get("lr_scale", 1.0)
            for name, opt in self.optimizers.items()
        }

    def state_dict(self) -> dict:
        return {
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "updates": dict(self.updates),
        }

    def load_state_dict(self, state: dict) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        self.updates = dict(state["updates"])
        # a schedule is a pure function of the update count, so restoring the count restores the LR
        for name, schedule in self.schedules.items():
            schedule.step_update(self.updates.get(name, 0))


def build_optimizers(
    backbone: nn.Module,
    heads: dict[str, nn.Module],
    updates_per_epoch: dict[str, float],
    *,
    epochs: int,
    name: str = "adamw",
    lr: float = 1e-4,
    head_lr: float | None = None,
    weight_decay: float = 0.05,
    per_head: bool = True,
    schedule: str = "cosine",
    warmup_epochs: float = 0.0,
    min_lr_ratio: float = 0.0,
    clip_grad_norm: float | None = None,
    layer_decay: float | None = None,
    probe_epochs: int = 0,
    fused: bool = False,
    steps_per_epoch: float | None = None,
) -> Optimizers:
    """Create the backbone's and each head's optimizer (or one shared one) with their LR schedules.

    `updates_per_epoch` maps each task to its (expected) batches per epoch; it sizes each head's schedule.
    `steps_per_epoch` sizes the backbone's (and the shared) schedule; None = their sum (one dataset per step).
    `layer_decay`: layer-wise LR decay of the backbone (timm's; None = off). `probe_epochs`: the first epochs of
    `epochs` train the heads only (LP-FT), so the backbone's schedule (warmup included) spans the other
    `epochs - probe_epochs` epochs of its own updates; the heads' schedules span all `epochs`.
    `fused` asks for the optimizer's fused kernel (one kernel for all parameters) where its class has one.
    `name` is a timm optimizer that this machine can create (checked once per run by `check_optimizer_name`), and
    `layer_decay` one that the backbone's layers take (checked when the model is built, by `check_layer_decay`).
    """
    assert 0 <= probe_epochs < epochs, f"probe_epochs {probe_epochs} must be below epochs {epochs}"
    assert per_head or not probe_epochs, "LP-FT (probe_epochs) needs one optimizer per head"
    opt_class = get_optimizer_info(name).opt_class
    kernel = {"fused": True} if fused and "fused" in inspect.signature(opt_class).parameters else {}
    head_lr = lr if head_lr is None else head_lr
    steps_per_epoch = sum(updates_per_epoch.values()) if steps_per_epoch is None else steps_per_epoch

    def make(params_or_module, group_lr: float, layer_decay: float | None = None) -> torch.optim.Optimizer:
        return create_optimizer_v2(
            params_or_module, opt=name, lr=group_lr, weight_decay=weight_decay, layer_decay=layer_decay, **kernel
        )

    def schedule_for(optimizer: torch.optim.Optimizer, per_epoch: float, run_epochs: int = epochs) -> Scheduler:
        return build_schedule(
            optimizer,
            total_updates=math.ceil(per_epoch * run_epochs),
            warmup_updates=math.ceil(per_epoch * warmup_epochs),
            min_lr_ratio=min_lr_ratio,
            schedule=schedule,
        )

    if not per_head:
        if layer_decay is None:
            groups = param_groups_weight_decay(backbone, weight_decay)
        else:
            groups = param_groups_layer_decay(backbone, weight_decay, layer_decay=layer_decay)
            assert_layered(groups, layer_decay)
        for head in heads.values():
            groups += [dict(g, lr=head_lr) for g in param_groups_weight_decay(head, weight_decay)]
        optimizer = make(groups, lr)
        return Optimizers(
            {SHARED: optimizer}, {SHARED: schedule_for(optimizer, steps_per_epoch)}, clip_grad_norm=clip_grad_norm
        )

    optimizers = {BACKBONE: make(backbone, lr, layer_decay)}
    if layer_decay is not None:
        assert_layered(optimizers[BACKBONE].param_groups, layer_decay)
    schedules = {BACKBONE: schedule_for(optimizers[BACKBONE], steps_per_epoch, epochs - probe_epochs)}
    for task, head in heads.items():
        optimizers[task] = make(head, head_lr)
        schedules[task] = schedule_for(optimizers[task], updates_per_epoch[task])
    return Optimizers(optimizers, schedules, clip_grad_norm=clip_grad_norm)


def check_layer_decay(layer_decay: float | None, backbone: nn.Module, backbone_name: str) -> None:
    """Raise MmptError when a layer decay below 1 would leave every backbone parameter at one scale: timm finds no
    layers in the backbone (no group_matcher), so the setting would silently do nothing."""
    if layer_decay is not None and layer_decay < 1:
        if len(layer_scales(param_groups_layer_decay(backbone, 0.0, layer_decay=layer_decay))) < 2:
            raise MmptError(
                f"optim.layer_decay {layer_decay:g} needs a backbone that timm splits into layers (a group_matcher), "
                f"but {backbone_name} gives one layer; set optim.layer_decay null or choose a timm backbone"
            )


def assert_layered(groups: list[dict], layer_decay: float) -> None:
    assert layer_decay >= 1 or len(layer_scales(groups)) >= 2, (
        f"optim.layer_decay {layer_decay:g} on a backbone without layers (check_layer_decay refuses it)"
    )


def layer_scales(groups: list[dict]) -> list[float]:
    """The distinct LR scales of an optimizer's parameter groups, lowest (the stem) first; [1.0] without decay."""
    return sorted({float(g.get("lr_scale", 1.0)) for g in groups})
