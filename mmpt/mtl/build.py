"""Building a weighting method: the build function of every method declared in mmpt.config.methods.

Imports the implementations (torch, TorchJD); the declarations alone are `mmpt.config.methods.METHODS`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from mmpt.config.methods import GRADIENT, LOSS, METHODS, STATIC
from mmpt.mtl.aggregators import AGGREGATOR_BUILDERS
from mmpt.mtl.base import Context, MethodRun
from mmpt.mtl.scalarizers import SCALARIZER_BUILDERS
from mmpt.mtl.static import STATIC_BUILDERS

BUILDERS = {**STATIC_BUILDERS, **SCALARIZER_BUILDERS, **AGGREGATOR_BUILDERS}
# every declared method is built, by the family its kind names
assert BUILDERS.keys() == METHODS.keys(), f"declared but not built: {METHODS.keys() ^ BUILDERS.keys()}"
assert all(
    METHODS[name].kind == kind
    for kind, builders in ((STATIC, STATIC_BUILDERS), (LOSS, SCALARIZER_BUILDERS), (GRADIENT, AGGREGATOR_BUILDERS))
    for name in builders
), "a method is built by another family than its declared kind"


def build_method(
    name: str,
    train_sizes: dict[str, int],
    args: dict[str, float] | None = None,
    *,
    device: torch.device | str = "cpu",
    lr: float = 1e-3,
    seed: int = 0,
    steps_per_epoch: int = 1,
    shared_params: Iterable[Tensor] = (),
    manual_weights: dict[str, float] | None = None,
    jacobian_chunk_size: int | None = None,
) -> MethodRun:
    """Return the weighting method `name` for datasets with these train-split sizes (keys: flags, in step order).

    args: loss.weighting_args (missing keys take the method's defaults; a learned method's `lr` defaults to
    `lr`, the backbone's). steps_per_epoch: DWA's epoch length. shared_params: the backbone's parameters
    (gradient-based methods). manual_weights: loss.weights (methods that read them). jacobian_chunk_size: rows of a
    gradient-based method's Jacobian differentiated at once (None: all, with torch.vmap; 1: one by one).
    The name, the args and what the method needs were checked where the config was loaded and by the run's
    environment check (mmpt.config.methods: method_problems, environment_problems).
    """
    assert name in BUILDERS, f"unknown loss.weighting {name!r} reached build_method"
    flags = list(train_sizes)
    context = Context(
        train_sizes=dict(train_sizes),
        device=torch.device(device),
        lr=lr,
        seed=seed,
        steps_per_epoch=max(1, steps_per_epoch),
        shared_params=tuple(p for p in shared_params if p.requires_grad),
        manual_weights=dict(manual_weights or {}),
        jacobian_chunk_size=jacobian_chunk_size,
    )
    return MethodRun(name, BUILDERS[name](flags, {**METHODS[name].defaults(), **dict(args or {})}, context))
