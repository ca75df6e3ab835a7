"""The interface every multi-task method implements, how a method is declared, and `MethodState`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from mmpt.errors import MmptError

STATIC, LOSS, GRADIENT = "static", "loss-based", "gradient-based"
# what a method needs from sampler.tasks_per_step
ANY, SEVERAL, ALL = "any", "several", "all"


class Weighting(Protocol):
    """What the training step needs from a multi-task weighting method."""

    def backward(self, losses: dict[str, Tensor], features: Tensor, scale: Callable[[Tensor], Tensor]) -> None:
        """Run this step's backward pass.

        losses: per-dataset mean loss of the step (0-dim, unweighted), keyed by flag in the step's order;
        under DDP each value is the global mean with the local rank's gradient. features: the backbone's
        output for the whole step (N_total×F, the datasets' slices in the order of `losses`). scale: the
        fp16 GradScaler's scale (identity otherwise), applied to a scalar before .backward().
        Scalarizers and static weights never synchronise with the device; aggregators do (their solvers
        run on the host).
        """
        ...

    def weights(self) -> dict[str, Tensor]:
        """Effective weight of each dataset of the last step (0-dim device tensors; NaN where a method has none)."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Stateless:
    """For methods that keep nothing between steps but the last step's weights (`_last`): an empty state."""

    _last: dict[str, Tensor]

    def weights(self) -> dict[str, Tensor]:
        return self._last

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass(frozen=True)
class Arg:
    """One option of a method (a key of loss.weighting_args): its default and the values it accepts."""

    default: float | int | None  # None: see the method's build function (e.g. the backbone's lr)
    whole: bool = False  # a whole number >= 1 (an iteration count)
    may_be_zero: bool = False  # >= 0 instead of > 0

    def problem(self, method: str, key: str, value: float) -> str | None:
        """What is wrong with `value` for this option (None when it is valid)."""
        if self.whole and (value != int(value) or value < 1):
            return f"loss.weighting_args.{key} of {method} must be a whole number >= 1, got {value!r}"
        if not self.whole and (value < 0 or (value == 0 and not self.may_be_zero)):
            return (
                f"loss.weighting_args.{key} of {method} must be {'>= 0' if self.may_be_zero else '> 0'}, got {value!r}"
            )
        return None


@dataclass(frozen=True)
class Context:
    """What build functions may use beyond the method's args."""

    train_sizes: dict[str, int]
    device: torch.device
    lr: float  # the backbone's learning rate: the default of learned method parameters
    seed: int
    steps_per_epoch: int
    shared_params: tuple[Tensor, ...]
    weights: dict[str, float]  # loss.weights (methods that declare reads_weights)


@dataclass(frozen=True)
class Method:
    """One weighting method: how to build it and everything the validation needs to know about it."""

    kind: str  # STATIC, LOSS or GRADIENT
    build: Callable[[list[str], dict, Context], Weighting]  # (flags, args with defaults, context) -> Weighting
    args: dict[str, Arg] = field(default_factory=dict)  # the keys of loss.weighting_args it takes
    tasks: str = ANY  # ANY, SEVERAL (tasks_per_step >= 2) or ALL (tasks_per_step: all)
    needs: tuple[str, ...] = ()  # Python modules of a solver (all in the mtl-solvers extra)
    reads_weights: bool = False  # takes one weight per dataset from loss.weights
    reference: str = ""

    @property
    def distributed(self) -> bool:
        """Whether it runs under DDP: gradient-based methods aggregate per-dataset gradients on one process."""
        return self.kind != GRADIENT

    def defaults(self) -> dict[str, float | int | None]:
        return {key: arg.default for key, arg in self.args.items()}


class MethodState:
    """Wraps a method: its checkpoint names it (resuming with another loss.weighting is an error), and it sums
    each dataset's effective weight on the device for the per-epoch record (`mean_weights`)."""

    def __init__(self, name: str, method: Weighting, kind: str) -> None:
        self.name = name
        self.method = method
        self.kind = kind
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def backward(self, losses: dict[str, Tensor], features: Tensor, scale: Callable[[Tensor], Tensor]) -> None:
        self.method.backward(losses, features, scale)
        for t, w in self.method.weights().items():
            self._sums[t] = self._sums[t] + w if t in self._sums else w.clone()
            self._counts[t] = self._counts.get(t, 0) + 1

    def weights(self) -> dict[str, Tensor]:
        return self.method.weights()

    def mean_weights(self) -> dict[str, float]:
        """Each dataset's mean effective weight over its steps since the last call (one read per dataset, once
        per epoch)."""
        means = {t: float(self._sums[t]) / self._counts[t] for t in self._sums}
        self._sums, self._counts = {}, {}
        return means

    def state_dict(self) -> dict:
        return {
            "method": self.name,
            "state": self.method.state_dict(),
            "weight_sums": dict(self._sums),
            "weight_counts": dict(self._counts),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("method", "none or size (an earlier mmpt)")
        # a checkpoint of an earlier mmpt records no method: it was trained with static weights
        if saved != self.name and not (not state.get("method") and self.kind == STATIC):
            raise MmptError(
                f"the checkpoint was trained with loss.weighting={saved}, not {self.name}; resume with the run's "
                "own config or start a new run with --output"
            )
        self.method.load_state_dict(state.get("state", {}))
        self._sums = dict(state.get("weight_sums", {}))
        self._counts = dict(state.get("weight_counts", {}))
