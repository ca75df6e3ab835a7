"""How a step's per-dataset losses become one backward pass: static weights, TorchJD scalarizers, TorchJD aggregators.

Three families behind one Protocol (`base.Weighting`):
- static (`static.py`): a fixed multiplier per dataset (none, size, inverse_size, sqrt_size, manual);
- loss-based (`scalarizers.py`): a `torchjd.scalarization` Scalarizer turns the loss vector into one scalar
  (uw, rlw, dwa, famo, imtl_l, geometric_mean, stch); its learnable parameters are trained by an optimizer of
  the method's own;
- gradient-based (`aggregators.py`): `torchjd.autojac.mtl_backward` computes the Jacobian of the step's losses
  w.r.t. the shared backbone, and a `torchjd.aggregation` Aggregator turns it into one gradient.

To add a method, add one `Method` entry to its family's dict: the entry declares how to build it, its options
(`Arg`: default and bounds), the tasks_per_step it needs, its solver modules and whether it reads loss.weights;
whether it runs under DDP follows from its kind. Nothing outside the entry names a method.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch
from torch import Tensor

from mmpt.errors import MmptError, lookup
from mmpt.mtl.aggregators import AGGREGATORS
from mmpt.mtl.base import ALL, ANY, GRADIENT, LOSS, SEVERAL, STATIC, Arg, Context, Method, MethodState, Weighting
from mmpt.mtl.scalarizers import SCALARIZERS
from mmpt.mtl.static import STATIC_METHODS

__all__ = [
    "ALL",
    "ANY",
    "GRADIENT",
    "LOSS",
    "METHODS",
    "SEVERAL",
    "SOLVERS_EXTRA",
    "STATIC",
    "Arg",
    "Method",
    "MethodState",
    "Weighting",
    "build_weighting",
    "check_weighting",
    "method_problems",
    "missing_solvers",
]

SOLVERS_EXTRA = 'pip install -e ".[mtl-solvers]"'

METHODS: dict[str, Method] = {**STATIC_METHODS, **SCALARIZERS, **AGGREGATORS}


def method_problems(
    name: str,
    args: dict[str, float],
    *,
    tasks_per_step: int | str,
    world_size: int = 1,
    weights: dict[str, float] | None = None,
    datasets: Iterable[str] = (),
) -> list[str]:
    """Return what is wrong with running weighting `name` with these settings (empty when it can run).

    Each problem names the setting to change. `weights` (loss.weights) are checked against `datasets` (flags) for
    a method that reads them; None: not checked (their own problem was reported already).
    """
    if name not in METHODS:
        return [f"loss.weighting must be one of {', '.join(METHODS)}, got {name!r}"]
    method = METHODS[name]
    problems = []
    unknown = sorted(set(args) - set(method.args))
    if unknown:
        valid = f"it takes {', '.join(method.args)}" if method.args else "it takes no options"
        problems.append(f"loss.weighting_args has {', '.join(unknown)}, which {name} does not take ({valid})")
    problems += [
        problem
        for key, value in args.items()
        if key in method.args and (problem := method.args[key].problem(name, key, value)) is not None
    ]
    several = tasks_per_step == "all" or (isinstance(tasks_per_step, int) and tasks_per_step >= 2)
    if method.tasks == ALL and tasks_per_step != "all":
        problems.append(
            f"loss.weighting={name} needs every dataset in every step; set sampler.tasks_per_step=all "
            f"(got {tasks_per_step})"
        )
    elif method.tasks == SEVERAL and not several:
        problems.append(
            f"loss.weighting={name} combines several datasets per step; set sampler.tasks_per_step to 2 or more "
            f"or all (got {tasks_per_step})"
        )
    if not method.distributed and world_size > 1:
        problems.append(
            f"loss.weighting={name} aggregates per-dataset gradients on one process and does not support "
            f"distributed training ({world_size} processes); train on one GPU or choose a loss-based method"
        )
    if method.reads_weights:
        if weights is not None:
            problems += _weights_problems(name, weights, list(datasets))
    elif weights:
        readers = ", ".join(n for n, m in METHODS.items() if m.reads_weights)
        problems.append(f"loss.weights is only read by loss.weighting={readers}, not {name}; remove it")
    return problems


def _weights_problems(name: str, weights: dict[str, float], datasets: list[str]) -> list[str]:
    """One weight per trained dataset, none negative, not all zero."""
    problems = []
    missing = [t for t in datasets if t not in weights]
    extra = [t for t in weights if t not in datasets]
    if missing or extra:
        problems.append(
            f"loss.weighting={name} needs one weight per trained dataset in loss.weights"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; not trained: {', '.join(extra)}" if extra else "")
        )
    negative = [t for t, w in weights.items() if w < 0]
    if negative:
        problems.append(f"loss.weights must be >= 0, got negative weights for {', '.join(negative)}")
    elif weights and not missing and all(w == 0 for w in weights.values()):
        problems.append(
            "loss.weights are all 0, so the loss would be 0 and nothing would train; give at least one dataset a "
            "positive weight"
        )
    return problems


def missing_solvers(name: str) -> list[str]:
    """Return the solver modules `name` needs that are not installed (the mtl-solvers extra)."""
    return [module for module in METHODS[name].needs if importlib.util.find_spec(module) is None]


def check_weighting(
    name: str,
    args: dict[str, float],
    *,
    tasks_per_step: int | str,
    world_size: int,
    datasets: list[str],
    weights: dict[str, float] | None = None,
) -> None:
    """Raise MmptError (one line naming the setting to change) when `name` cannot run with these settings, or
    when a solver it needs is not installed."""
    lookup("loss weighting", METHODS, name)
    problems = method_problems(
        name,
        dict(args),
        tasks_per_step=tasks_per_step,
        world_size=world_size,
        weights=dict(weights or {}),
        datasets=datasets,
    )
    if problems:
        raise MmptError("; ".join(problems))
    missing = missing_solvers(name)
    if missing:
        raise MmptError(f"loss.weighting={name} needs {', '.join(missing)}: install them with {SOLVERS_EXTRA}")


def build_weighting(
    name: str,
    train_sizes: dict[str, int],
    args: dict[str, float] | None = None,
    *,
    tasks_per_step: int | str = 1,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    lr: float = 1e-3,
    seed: int = 0,
    steps_per_epoch: int = 1,
    shared_params: Iterable[Tensor] = (),
    weights: dict[str, float] | None = None,
) -> MethodState:
    """Return the weighting method `name` for datasets with these train-split sizes (keys: flags, in step order).

    args: loss.weighting_args (missing keys take the method's defaults; a learned method's `lr` defaults to
    `lr`, the backbone's). steps_per_epoch: DWA's epoch length. shared_params: the backbone's parameters
    (gradient-based methods). weights: loss.weights (methods that read them).
    Raises MmptError for an unknown name (listing the valid ones), bad args, a method that cannot run with
    `tasks_per_step` or `world_size`, or a missing solver of the mtl-solvers extra.
    """
    method = lookup("loss weighting", METHODS, name)
    args = dict(args or {})
    flags = list(train_sizes)
    check_weighting(name, args, tasks_per_step=tasks_per_step, world_size=world_size, weights=weights, datasets=flags)
    context = Context(
        train_sizes=dict(train_sizes),
        device=torch.device(device),
        lr=lr,
        seed=seed,
        steps_per_epoch=max(1, steps_per_epoch),
        shared_params=tuple(p for p in shared_params if p.requires_grad),
        weights=dict(weights or {}),
    )
    return MethodState(name, method.build(flags, {**method.defaults(), **args}, context), method.kind)
