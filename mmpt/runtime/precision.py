"""Precision: autocast, the gradient-scaler decision and the loss scale a backward pass applies, for the training
step, evaluation and the benchmarks."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mmpt.config.choices import PRECISIONS
from mmpt.errors import lookup

AUTO = "auto"  # bf16 on a CUDA device that supports it, else fp32


@dataclass(frozen=True)
class Precision:
    """How one train.precision runs: the autocast dtype (None: no autocast) and whether losses are scaled."""

    dtype: torch.dtype | None
    scaled: bool  # fp16 needs a GradScaler: its small gradients would underflow


PRECISION_TYPES: dict[str, Precision] = {
    "fp32": Precision(None, scaled=False),
    "bf16": Precision(torch.bfloat16, scaled=False),
    "fp16": Precision(torch.float16, scaled=True),
}
assert (AUTO, *PRECISION_TYPES) == PRECISIONS, f"precisions {tuple(PRECISION_TYPES)} differ from {PRECISIONS}"


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision as it runs on `device`: auto is bf16 on a CUDA device with bf16 support, else fp32; any other
    name stays as it is."""
    if precision != AUTO:
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16 or fp16 when asked for, else a no-op context (auto: as `resolve_precision` decides).
    Raises MmptError for an unknown name."""
    dtype = lookup("precision", PRECISION_TYPES, resolve_precision(precision, device)).dtype
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """The gradient scaler `precision` trains with (fp16), else None. Raises MmptError for an unknown name."""
    scaled = lookup("precision", PRECISION_TYPES, resolve_precision(precision, device)).scaled
    return torch.amp.GradScaler(device.type) if scaled else None


class LossScale:
    """What a backward pass does with the fp16 gradient scaler (`scaler`; None: fp32 and bf16, where it is the
    identity): scale a loss before its backward pass, and, for a method that aggregates a Jacobian, unscale the
    Jacobian first (the aggregators are not positively homogeneous: Nash-MTL clips to max_norm, FairGrad's weights
    do not scale) and scale the aggregated gradient back, so the optimizer's own unscale restores it exactly."""

    def __init__(self, scaler: torch.amp.GradScaler | None = None) -> None:
        self.scaler = scaler

    def __call__(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, tensors: Sequence[Tensor]) -> bool:
        """Divide `tensors` in place by the scale; return whether every value is finite. With a scaler this reads
        two values from the device (the scale and the check): a Jacobian with inf or NaN must not reach a host
        solver. True without a scaler, reading nothing."""
        if self.scaler is None:
            return True
        factor = 1.0 / self.scaler.get_scale()  # a power of two: unscaling and scaling back are exact
        torch._foreach_mul_(list(tensors), factor)
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    def rescale_(self, tensors: Sequence[Tensor]) -> None:
        """Multiply `tensors` in place by the scale (undoing `unscale_` on a gradient the optimizer will unscale)."""
        if self.scaler is not None:
            torch._foreach_mul_(list(tensors), self.scaler.get_scale())
