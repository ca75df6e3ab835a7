"""Every read and write of TorchJD's private state, in one place: what exact resume saves and restores of the
stateful methods DWA, FAMO and Nash-MTL (TorchJD keeps it in attributes of its own, not behind state_dict).

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
        f"mmpt supports TorchJD {SUPPORTED}.x (it saves and restores the state of DWA, FAMO and Nash-MTL from "
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
