"""The interface every multi-task method implements (`Method`), what build functions receive (`Context`), and
`MethodRun`: the method as a run uses it (named in the checkpoint, its weights averaged for the epoch record).

Words: a *method* is what loss.weighting names (declared by a `mmpt.config.methods.MethodSpec`, implemented by a
`Method`); its *dataset weights* are the effective weight of each dataset's loss in a step; the model's weights
are never called that here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from mmpt.errors import MmptError
from mmpt.runtime.precision import LossScale


class Method(Protocol):
    """What the training step needs from a multi-task method (static, loss-based or gradient-based)."""

    def backward(
        self,
        losses: dict[str, Tensor],
        features: Tensor | list[Tensor],
        scale: LossScale,
        *,
        gramian: bool = False,
        views: list[list[Tensor]] | None = None,
    ) -> Tensor | None:
        """Run this step's backward pass; return the Gramian of the step's per-dataset gradients on the backbone when
        `gramian` asks for it and the method has it at no extra cost (gradient-based methods: k×k, on the device; None
        after an fp16 overflow), else None (the gradient-conflict diagnostic then measures it another way).

        losses: per-dataset mean loss of the step (0-dim, unweighted), keyed by flag in the step's order;
        under DDP each value is the global mean with the local rank's gradient. features: the backbone's
        output for the whole step (N_total×F, the datasets' slices in the order of `losses`), or on the one-pass
        path (loss.jacobian) each dataset's own. views: on the one-pass path, per dataset the views of the backbone's
        parameters its forward pass used (in the order of the backbone's parameters); None otherwise. scale: the
        fp16 GradScaler's scale (identity otherwise), applied to a scalar before .backward(); an aggregator
        unscales its Jacobian with it before aggregating (`LossScale.unscale_`).
        Scalarizers and static weights never synchronise with the device; aggregators do (their solvers
        run on the host).
        """
        ...

    def dataset_weights(self) -> dict[str, Tensor]:
        """Effective weight of each dataset of the last step (0-dim device tensors; NaN where a method has none)."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Context:
    """What build functions may use beyond the method's args."""

    train_sizes: dict[str, int]
    device: torch.device
    lr: float  # the backbone's learning rate: the default of learned method parameters
    seed: int
    steps_per_epoch: int
    shared_params: tuple[Tensor, ...]
    manual_weights: dict[str, float]  # loss.weights (methods that declare reads_weights)
    # rows of a Jacobian differentiated at once (TorchJD's parallel_chunk_size): None all (vmap), 1 one by one
    jacobian_chunk_size: int | None = None


class MethodRun:
    """Wraps a method: its checkpoint names it (resuming with another loss.weighting is an error), and it sums
    each dataset's effective weight on the device for the per-epoch record (`mean_dataset_weights`)."""

    def __init__(self, name: str, method: Method) -> None:
        self.name = name
        self.method = method
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def backward(
        self,
        losses: dict[str, Tensor],
        features: Tensor | list[Tensor],
        scale: LossScale,
        *,
        gramian: bool = False,
        views: list[list[Tensor]] | None = None,
    ) -> Tensor | None:
        """The method's backward pass (`Method.backward`); its dataset weights summed for the epoch's record."""
        found = self.method.backward(losses, features, scale, gramian=gramian, views=views)
        for t, w in self.method.dataset_weights().items():
            self._sums[t] = self._sums[t] + w if t in self._sums else w.clone()
            self._counts[t] = self._counts.get(t, 0) + 1
        return found

    def dataset_weights(self) -> dict[str, Tensor]:
        return self.method.dataset_weights()

    def mean_dataset_weights(self) -> dict[str, float]:
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
        if state["method"] != self.name:
            raise MmptError(
                f"the checkpoint was trained with loss.weighting={state['method']}, not {self.name}; resume with "
                "the run's own config or start a new run with --output"
            )
        self.method.load_state_dict(state["state"])
        self._sums = dict(state["weight_sums"])
        self._counts = dict(state["weight_counts"])
