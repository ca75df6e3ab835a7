"""Precision: autocast and the gradient-scaler decision, for the training step, evaluation and the benchmarks."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from mmpt.choices import PRECISIONS
from mmpt.errors import lookup


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
assert tuple(PRECISION_TYPES) == PRECISIONS, f"precisions {tuple(PRECISION_TYPES)} differ from {PRECISIONS}"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16 or fp16 when asked for, else a no-op context. Raises MmptError for an unknown name."""
    dtype = lookup("precision", PRECISION_TYPES, precision).dtype
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """The gradient scaler `precision` trains with (fp16), else None. Raises MmptError for an unknown name."""
    return torch.amp.GradScaler(device.type) if lookup("precision", PRECISION_TYPES, precision).scaled else None
