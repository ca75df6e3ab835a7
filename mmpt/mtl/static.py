"""Static weights: a fixed multiplier per dataset, so the step's loss is sum_t w_t * L_t."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from mmpt.mtl.base import Context, Method


class StaticMethod:
    """A fixed multiplier per dataset: the step's loss is sum_t w_t * L_t."""

    def __init__(self, weights: dict[str, float]) -> None:
        self._weights = dict(weights)
        self._as_tensors = {t: torch.tensor(w) for t, w in weights.items()}  # made once, not per step
        self._last: dict[str, Tensor] = {}

    def backward(
        self,
        losses: dict[str, Tensor],
        features: Tensor | list[Tensor],
        scale: Callable[[Tensor], Tensor],
        *,
        gramian: bool = False,
        views: list[list[Tensor]] | None = None,
    ) -> None:
        total = sum(self._weights[t] * loss for t, loss in losses.items())
        scale(total).backward()
        self._last = {t: self._as_tensors[t] for t in losses}

    def dataset_weights(self) -> dict[str, Tensor]:
        return self._last

    def state_dict(self) -> dict:
        return {}  # nothing is learned or carried between steps

    def load_state_dict(self, state: dict) -> None:
        pass


def by_size(rule: Callable[[int, int, int], float]) -> Callable[[list[str], dict, Context], Method]:
    """Weights from each dataset's train size: rule(|D_t|, min |D|, max |D|)."""

    def build(flags: list[str], args: dict, ctx: Context) -> Method:
        sizes = ctx.train_sizes
        assert sizes and min(sizes.values()) > 0, f"train sizes must be positive, got {sizes}"
        smallest, largest = min(sizes.values()), max(sizes.values())
        return StaticMethod({t: rule(sizes[t], smallest, largest) for t in flags})

    return build


def manual(flags: list[str], args: dict, ctx: Context) -> Method:
    return StaticMethod({t: float(ctx.manual_weights[t]) for t in flags})


# the build function of each static method (declared in mmpt.config.methods)
STATIC_BUILDERS: dict[str, Callable[[list[str], dict, Context], Method]] = {
    "none": by_size(lambda n, lo, hi: 1.0),
    "size": by_size(lambda n, lo, hi: lo / n),
    "inverse_size": by_size(lambda n, lo, hi: hi / n),
    "sqrt_size": by_size(lambda n, lo, hi: math.sqrt(lo / n)),
    "manual": manual,
}
