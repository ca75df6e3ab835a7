"""Gradient-based methods: `torchjd.autojac.mtl_backward` computes the Jacobian of the step's losses w.r.t. the
shared backbone, and a `torchjd.aggregation` Aggregator turns it into one gradient (upgrad, pcgrad, mgda, ...).

Nash-MTL's state between steps lives in TorchJD's own attributes: mmpt.mtl.torchjd_state reads and restores it
(and checks the TorchJD release).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchjd import aggregation
from torchjd.autojac import jac_to_grad, mtl_backward

from mmpt.mtl import torchjd_state
from mmpt.mtl.base import ALL, ANY, GRADIENT, SEVERAL, Arg, Context, Method, Stateless, Weighting


class AggregatorWeighting(Stateless):
    """torchjd.autojac.mtl_backward + jac_to_grad: each head gets its own loss's gradient; the backbone gets the
    aggregation of the step's per-dataset gradients (the rows of the Jacobian).

    Effective weights: the aggregator's weights on the Jacobian's rows (NaN for aggregators without weights,
    e.g. GradDrop).
    """

    def __init__(self, aggregator: nn.Module, shared_params: tuple[Tensor, ...]) -> None:
        assert shared_params, "a gradient-based method needs the backbone's parameters (shared_params)"
        self.aggregator = aggregator
        self.shared_params = shared_params
        self._last: dict[str, Tensor] = {}

    def backward(self, losses: dict[str, Tensor], features: Tensor, scale: Callable[[Tensor], Tensor]) -> None:
        # every task's loss is scaled alike: the aggregators are positively homogeneous, so unscaling still works
        mtl_backward([scale(loss) for loss in losses.values()], features=features, shared_params=self.shared_params)
        weights = jac_to_grad(self.shared_params, self.aggregator)
        if weights is None:
            weights = torch.full((len(losses),), math.nan, device=features.device)
        self._last = dict(zip(losses, weights.detach().unbind()))


class NashMTLWeighting(AggregatorWeighting):
    """Nash-MTL keeps its last weights and Gramian normalisation (NumPy) between steps: saved as tensors."""

    def state_dict(self) -> dict:
        return torchjd_state.nash_mtl_state(self.aggregator)

    def load_state_dict(self, state: dict) -> None:
        torchjd_state.load_nash_mtl_state(self.aggregator, state)


def aggregator(
    make: Callable[[int, dict], nn.Module], wrapper: type = AggregatorWeighting
) -> Callable[[list[str], dict, Context], Weighting]:
    """A method from make(number of datasets, args) -> torchjd Aggregator."""

    def build(flags: list[str], args: dict, ctx: Context) -> Weighting:
        return wrapper(make(len(flags), args), ctx.shared_params)

    return build


QP = ("qpsolvers", "quadprog")

AGGREGATORS: dict[str, Method] = {
    "upgrad": Method(
        GRADIENT,
        aggregator(lambda n, a: aggregation.UPGrad()),
        tasks=SEVERAL,
        needs=QP,
        reference="Quinton & Rey 2024, Jacobian Descent for MTL",
    ),
    "pcgrad": Method(
        GRADIENT,
        aggregator(lambda n, a: aggregation.PCGrad()),
        tasks=SEVERAL,
        reference="Yu et al. 2020, Gradient Surgery for MTL",
    ),
    "mgda": Method(
        GRADIENT,
        aggregator(lambda n, a: aggregation.MGDA(epsilon=a["epsilon"], max_iters=int(a["max_iters"]))),
        {"epsilon": Arg(0.001), "max_iters": Arg(100, whole=True)},
        SEVERAL,
        reference="Sener & Koltun 2018, MTL as Multi-Objective Optimization",
    ),
    "cagrad": Method(
        GRADIENT,
        aggregator(lambda n, a: aggregation.CAGrad(c=a["c"])),
        {"c": Arg(0.5)},
        SEVERAL,
        needs=("cvxpy", "clarabel"),
        reference="Liu et al. 2021, Conflict-Averse Gradient Descent",
    ),
    "nash_mtl": Method(
        GRADIENT,
        aggregator(
            lambda n, a: aggregation.NashMTL(
                n_tasks=n,
                max_norm=a["max_norm"],
                update_weights_every=int(a["update_weights_every"]),
                optim_niter=int(a["optim_niter"]),
            ),
            NashMTLWeighting,
        ),
        # max_norm 0: Nash-MTL without clipping
        {
            "max_norm": Arg(1.0, may_be_zero=True),
            "update_weights_every": Arg(1, whole=True),
            "optim_niter": Arg(20, whole=True),
        },
        ALL,
        needs=("cvxpy", "ecos"),
        reference="Navon et al. 2022, MTL as a Bargaining Game",
    ),
    "imtl_g": Method(
        GRADIENT,
        aggregator(lambda n, a: aggregation.IMTLG()),
        tasks=SEVERAL,
        reference="Liu et al. 2021, Towards Impartial MTL",
    ),
    "aligned_mtl": Method(
        GRADIENT,
        aggregator(lambda n, a: aggregation.AlignedMTL()),
        tasks=SEVERAL,
        reference="Senushkin et al. 2023, Aligned-MTL",
    ),
    "graddrop": Method(
        GRADIENT,
        aggregator(lambda n, a: aggregation.GradDrop()),
        tasks=SEVERAL,
        reference="Chen et al. 2020, Gradient Sign Dropout",
    ),
    "dualproj": Method(
        GRADIENT,
        aggregator(lambda n, a: aggregation.DualProj()),
        tasks=SEVERAL,
        needs=QP,
        reference="Quinton & Rey 2024 (DualProj)",
    ),
    "config": Method(
        GRADIENT,
        aggregator(lambda n, a: aggregation.ConFIG()),
        tasks=SEVERAL,
        reference="Liu et al. 2025, ConFIG",
    ),
    "fairgrad": Method(
        GRADIENT,
        aggregator(lambda n, a: aggregation.FairGrad(alpha=a["alpha"])),
        {"alpha": Arg(1.0)},
        SEVERAL,
        reference="Ban & Ji 2024, Fair Resource Allocation in MTO",
    ),
    "jd_mean": Method(
        GRADIENT,
        aggregator(lambda n, a: aggregation.Mean()),
        tasks=ANY,
        reference="the Jacobian path with plain averaging (a baseline)",
    ),
}
