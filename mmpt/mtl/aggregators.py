"""Gradient-based methods: `torchjd.autojac.mtl_backward` computes the Jacobian of the step's losses w.r.t. the
shared backbone, and a `torchjd.aggregation` Aggregator turns it into one gradient (upgrad, pcgrad, mgda, ...).

Nash-MTL's state between steps lives in TorchJD's own attributes: mmpt.mtl.torchjd_state reads and restores it
(and checks the TorchJD release).

Under fp16 the Jacobian is unscaled and checked before it is aggregated (`LossScale.unscale_`): an aggregator sees
the true Jacobian, never inf or NaN (its solver runs on the host), and a step whose scaled Jacobian overflowed is
skipped as the gradient scaler skips one. Where torch.vmap, TorchJD's default, cannot run the backward pass (a
compiled backbone; BatchNorm in bf16 or fp16) mmpt.training.build has the Jacobian's rows differentiated one by one
(`jacobian_chunk_size` 1, TorchJD's parallel_chunk_size; mmpt.training.build.jacobian_chunk_size).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchjd import aggregation
from torchjd.autojac import jac_to_grad, mtl_backward

from mmpt.mtl import torchjd_state
from mmpt.mtl.base import Context, Method
from mmpt.runtime.precision import LossScale


def jacobian_gramian(params: Sequence[Tensor]) -> Tensor:
    """The Gramian J J^T (k×k) of the Jacobian that torchjd's mtl_backward stored in the parameters' `.jac`."""
    total = None
    for p in params:
        rows = p.jac.flatten(1).float()  # k×numel
        total = rows @ rows.T if total is None else total + rows @ rows.T
    return total


class AggregatorState(NamedTuple):
    """How an aggregator that keeps state between steps saves and restores it (tensors and plain values)."""

    save: Callable[[nn.Module], dict]
    load: Callable[[nn.Module, dict], None]


# Nash-MTL keeps its last weights and Gramian normalisation (NumPy) between steps: saved as tensors
NASH_MTL_STATE = AggregatorState(torchjd_state.nash_mtl_state, torchjd_state.load_nash_mtl_state)
GRADVAC_STATE = AggregatorState(torchjd_state.gradvac_state, torchjd_state.load_gradvac_state)
EXCESS_MTL_STATE = AggregatorState(torchjd_state.excess_mtl_state, torchjd_state.load_excess_mtl_state)
CR_MOGM_STATE = AggregatorState(torchjd_state.cr_mogm_state, torchjd_state.load_cr_mogm_state)


class AggregatorMethod:
    """torchjd.autojac.mtl_backward + jac_to_grad: each head gets its own loss's gradient; the backbone gets the
    aggregation of the step's per-dataset gradients (the rows of the Jacobian).

    Effective weights: the aggregator's weights on the Jacobian's rows (NaN for aggregators without weights,
    e.g. GradDrop). `state`: for an aggregator with state between steps (Nash-MTL); None: it has none.
    """

    def __init__(
        self,
        aggregator: nn.Module,
        shared_params: tuple[Tensor, ...],
        jacobian_chunk_size: int | None = None,
        state: AggregatorState | None = None,
    ) -> None:
        assert shared_params, "a gradient-based method needs the backbone's parameters (shared_params)"
        self.aggregator = aggregator
        self.state = state
        self.shared_params = shared_params
        self.jacobian_chunk_size = jacobian_chunk_size  # None: every row at once (vmap); 1: one by one
        self._last: dict[str, Tensor] = {}

    def backward(
        self,
        losses: dict[str, Tensor],
        features: Tensor | list[Tensor],
        scale: LossScale,
        *,
        gramian: bool = False,
        views: list[list[Tensor]] | None = None,
    ) -> Tensor | None:
        if views is None:
            mtl_backward(
                [scale(loss) for loss in losses.values()],
                features=features,
                shared_params=self.shared_params,
                parallel_chunk_size=self.jacobian_chunk_size,
            )
        else:
            self._one_pass_jacobian(losses, scale, views)
        if not scale.unscale_([p.jac for p in self.shared_params]):
            # fp16 overflow: no aggregation; an infinite gradient makes the scaler skip the backbone's step and lower
            # its scale, as after any overflow (the heads' finite gradients step, each optimizer judged on its own)
            for p in self.shared_params:
                del p.jac
            self.shared_params[0].grad = torch.full_like(self.shared_params[0], math.inf)
            return None  # the weights of the last aggregated step stay the record
        # read before jac_to_grad frees the Jacobian: no extra backward pass
        found = jacobian_gramian(self.shared_params) if gramian else None
        weights = jac_to_grad(self.shared_params, self.aggregator)
        scale.rescale_([p.grad for p in self.shared_params if p.grad is not None])
        if weights is None:
            weights = torch.full((len(losses),), math.nan, device=self.shared_params[0].device)
        self._last = dict(zip(losses, weights.detach().unbind()))
        return found

    def _one_pass_jacobian(self, losses: dict[str, Tensor], scale: LossScale, views: list[list[Tensor]]) -> None:
        """The Jacobian into `.jac` from one backward pass (loss.jacobian one_pass): each dataset's forward pass used
        its own views of the shared parameters, so the backward pass of the summed losses hands each view its dataset's
        gradient (a hook keeps it) and each head its own loss's gradient, as mtl_backward does."""
        assert all(len(per) == len(self.shared_params) for per in views), "a view of every shared parameter"
        rows: list[list[Tensor | None]] = [[None] * len(self.shared_params) for _ in views]

        def keep(t: int, i: int):
            def hook(grad: Tensor) -> None:
                rows[t][i] = grad

            return hook

        handles = [view.register_hook(keep(t, i)) for t, per in enumerate(views) for i, view in enumerate(per)]
        try:
            scale(sum(losses.values())).backward()
        finally:
            for handle in handles:
                handle.remove()
        for i, p in enumerate(self.shared_params):
            p.grad = None  # the rows' plain sum, which the aggregation replaces
            p.jac = torch.stack([row[i] if row[i] is not None else torch.zeros_like(p) for row in rows])

    def dataset_weights(self) -> dict[str, Tensor]:
        return self._last

    def state_dict(self) -> dict:
        return self.state.save(self.aggregator) if self.state else {}

    def load_state_dict(self, state: dict) -> None:
        if self.state:
            self.state.load(self.aggregator, state)


def aggregator(
    make: Callable[[int, dict], nn.Module], state: AggregatorState | None = None
) -> Callable[[list[str], dict, Context], Method]:
    """A method from make(number of datasets, args) -> torchjd Aggregator (`state`: as AggregatorMethod's)."""

    def build(flags: list[str], args: dict, ctx: Context) -> Method:
        return AggregatorMethod(make(len(flags), args), ctx.shared_params, ctx.jacobian_chunk_size, state)

    return build


# the build function of each gradient-based method (declared in mmpt.config.methods)
AGGREGATOR_BUILDERS: dict[str, Callable[[list[str], dict, Context], Method]] = {
    "upgrad": aggregator(lambda n, a: aggregation.UPGrad()),
    "pcgrad": aggregator(lambda n, a: aggregation.PCGrad()),
    "mgda": aggregator(lambda n, a: aggregation.MGDA(epsilon=a["epsilon"], max_iters=int(a["max_iters"]))),
    "cagrad": aggregator(lambda n, a: aggregation.CAGrad(c=a["c"])),
    "nash_mtl": aggregator(
        lambda n, a: aggregation.NashMTL(
            n_tasks=n,
            max_norm=a["max_norm"],
            update_weights_every=int(a["update_weights_every"]),
            optim_niter=int(a["optim_niter"]),
        ),
        NASH_MTL_STATE,
    ),
    "imtl_g": aggregator(lambda n, a: aggregation.IMTLG()),
    "aligned_mtl": aggregator(lambda n, a: aggregation.AlignedMTL()),
    "graddrop": aggregator(lambda n, a: aggregation.GradDrop()),
    "dualproj": aggregator(lambda n, a: aggregation.DualProj()),
    "config": aggregator(lambda n, a: aggregation.ConFIG()),
    "fairgrad": aggregator(lambda n, a: aggregation.FairGrad(alpha=a["alpha"])),
    "jd_mean": aggregator(lambda n, a: aggregation.Mean()),
    "gradvac": aggregator(lambda n, a: aggregation.GradVac(beta=a["beta"], eps=a["eps"]), GRADVAC_STATE),
    "excess_mtl": aggregator(
        lambda n, a: aggregation.ExcessMTL(
            robust_step_size=a["robust_step_size"], n_warmup_steps=int(a["n_warmup_steps"])
        ),
        EXCESS_MTL_STATE,
    ),
    "cr_mogm": aggregator(
        lambda n, a: aggregation.GramianWeightedAggregator(
            aggregation.CRMOGMWeighting(aggregation.MGDAWeighting(), alpha=a["alpha"])
        ),
        CR_MOGM_STATE,
    ),
}
