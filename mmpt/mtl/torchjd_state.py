"""Every read and write of TorchJD's private state, in one place: what exact resume saves and restores of the
stateful methods DWA, FAMO, Nash-MTL, GradVac, ExcessMTL and CR-MOGM (TorchJD keeps it in attributes of its own, not
behind state_dict).

Those attributes are TorchJD 0.18's: another release may rename or change them, and a resume would then fail or,
worse, continue from another state. So this module refuses, when it is imported (with mmpt.mtl.build, before any run
folder is touched), any TorchJD but the supported 0.18.x, in one line naming both versions; setup.cfg pins the
same release. tests/mtl/test_methods.py resumes every stateful method to the uninterrupted digests.
"""

from __future__ import annotations

import importlib.metadata

import torch
from torchjd import aggregation, scalarization

from mmpt.errors import MmptError

SUPPORTED = "0.18"  # the minor release whose attributes this module reads
INSTALL = "pip install 'torchjd[quadprog-projector]~=0.18.0'"


class TorchJDVersionError(MmptError, ImportError):
    """The installed TorchJD is not the release whose private state mmpt reads."""


def check_version(installed: str | None) -> None:
    """Raise TorchJDVersionError unless `installed` (a version string; None: not found) is a 0.18.x release."""
    if installed is not None and (installed == SUPPORTED or installed.startswith(SUPPORTED + ".")):
        return
    found = f"TorchJD {installed} is installed" if installed is not None else "the installed TorchJD has no version"
    raise TorchJDVersionError(
        f"mmpt supports TorchJD {SUPPORTED}.x (it saves and restores the state of its stateful methods from "
        f"TorchJD's own attributes), but {found}; install the supported release: {INSTALL}"
    )


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("torchjd")
    except importlib.metadata.PackageNotFoundError:
        return None


check_version(installed_version())


# ---------------------------------------------------------------- DWA: the running epoch sum and the last averages


def dwa_state(dwa: scalarization.DWA) -> dict:
    state = {"n_batches": dwa._n_batches, "previous_averages": list(dwa._previous_averages)}
    if dwa._loss_sum is not None:
        state["loss_sum"] = dwa._loss_sum
    return state


def load_dwa_state(dwa: scalarization.DWA, state: dict, device: torch.device) -> None:
    dwa._n_batches = state["n_batches"]
    dwa._previous_averages = [a.to(device) for a in state["previous_averages"]]
    dwa._loss_sum = state["loss_sum"].to(device) if "loss_sum" in state else None


# ---------------------------------------------------------------- FAMO: the last losses and the logits' optimizer


def famo_has_losses(famo: scalarization.FAMO) -> bool:
    """Whether FAMO has seen a step's losses (its update needs the previous ones)."""
    return famo._prev_losses is not None


def famo_state(famo: scalarization.FAMO) -> dict:
    state = {}
    if famo._prev_losses is not None:
        state["prev_losses"] = famo._prev_losses
    if famo._optimizer is not None:
        state["famo_optimizer"] = famo._optimizer.state_dict()
    return state


def load_famo_state(famo: scalarization.FAMO, state: dict) -> None:
    famo._prev_losses = state["prev_losses"].to(famo._w.device) if "prev_losses" in state else None
    famo._optimizer = None
    if "famo_optimizer" in state:
        # the optimizer FAMO.update creates on first use, recreated to receive its saved state
        famo._optimizer = torch.optim.Adam([famo._w], lr=famo.lr, weight_decay=famo.weight_decay)
        famo._optimizer.load_state_dict(state["famo_optimizer"])


# ---------------------------------------------------------------- Nash-MTL: the last weights and Gramian scale (NumPy)


def nash_mtl_state(nash_mtl: aggregation.NashMTL) -> dict:
    weighting = nash_mtl.weighting
    return {
        "step": float(weighting.step),
        "prvs_alpha": torch.from_numpy(weighting.prvs_alpha.copy()),
        "normalization_factor": torch.from_numpy(weighting.normalization_factor.copy()),
    }


def load_nash_mtl_state(nash_mtl: aggregation.NashMTL, state: dict) -> None:
    weighting = nash_mtl.weighting
    weighting.step = state["step"]
    weighting.prvs_alpha = state["prvs_alpha"].numpy().copy()
    weighting.normalization_factor = state["normalization_factor"].numpy().copy()
    if weighting.step > 0:
        # NashMTL builds its solver problem on its first call only; rebuild it around the restored weights
        weighting._init_optim_problem()


# ---------------------------------------------------------------- GradVac: the EMA of each pair's cosine target


def gradvac_state(gradvac: aggregation.GradVac) -> dict:
    weighting = gradvac.gramian_weighting
    return {} if weighting._phi_t is None else {"phi_t": weighting._phi_t}


def load_gradvac_state(gradvac: aggregation.GradVac, state: dict) -> None:
    weighting = gradvac.gramian_weighting
    weighting.reset()
    if "phi_t" in state:
        phi_t = state["phi_t"].clone()
        weighting._phi_t, weighting._state_key = phi_t, (phi_t.shape[0], phi_t.dtype)


# ---------------------------------------------------------------- ExcessMTL: the squared-gradient sums and the weights

EXCESS_MTL_TENSORS = ("_weights", "_sq_grad_sum", "_initial_w", "_warmup_w_sum")


def excess_mtl_state(excess_mtl: aggregation.ExcessMTL) -> dict:
    weighting = excess_mtl.weighting
    if weighting._sq_grad_sum is None:
        return {}
    state = {name: getattr(weighting, name) for name in EXCESS_MTL_TENSORS if getattr(weighting, name) is not None}
    return state | {"n_steps": weighting._n_steps}


def load_excess_mtl_state(excess_mtl: aggregation.ExcessMTL, state: dict) -> None:
    weighting = excess_mtl.weighting
    weighting.reset()
    if not state:
        return
    for name in EXCESS_MTL_TENSORS:
        setattr(weighting, name, state[name].clone() if name in state else None)
    weighting._n_steps = state["n_steps"]
    matrix = weighting._sq_grad_sum  # m × n, as the Jacobian it accumulates
    weighting._state_key = (matrix.shape[0], matrix.shape[1], matrix.dtype, matrix.device)


# ---------------------------------------------------------------- CR-MOGM: the moving average of the weights


def cr_mogm_state(aggregator: aggregation.GramianWeightedAggregator) -> dict:
    weighting = aggregator.gramian_weighting
    return {} if weighting._lambda is None else {"lambda": weighting._lambda}


def load_cr_mogm_state(aggregator: aggregation.GramianWeightedAggregator, state: dict) -> None:
    aggregator.gramian_weighting._lambda = state["lambda"].clone() if "lambda" in state else None
