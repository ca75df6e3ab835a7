"""Process-level setup: determinism and seeds, the device, the run folder, env.json, stop signals."""

from __future__ import annotations

import contextlib
import os
import platform
import random
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from mmpt.errors import MmptError

CUBLAS_WORKSPACE = ":4096:8"


def configure_determinism(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; with `deterministic`, force deterministic kernels (CUDA included).

    CUBLAS_WORKSPACE_CONFIG must be set before CUDA starts; if CUDA is already up, this warns.
    """
    if deterministic:
        if torch.cuda.is_initialized() and os.environ.get("CUBLAS_WORKSPACE_CONFIG") is None:
            warnings.warn("CUDA was initialised before mmpt set CUBLAS_WORKSPACE_CONFIG; cuBLAS may not be deterministic")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    # TF32 trades exactness for speed: only when determinism is off
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """Autocast to bf16 or fp16 when asked for, else a no-op context."""
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Create the run folder; refuse to reuse one with outputs unless resuming or overwriting.

    Overwrite removes only the files mmpt writes, never anything else in the folder.
    """
    has_outputs = run_dir.exists() and any(run_dir.iterdir())
    if resume:
        return
    if has_outputs and not overwrite:
        raise MmptError(
            f"run folder {run_dir} already has outputs; pass --resume {run_dir} to continue it, "
            "--overwrite to start over, or --output DIR for a new folder"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in ("checkpoints", "tb", "predictions", "eval"):
            for path in sorted((run_dir / name).glob("**/*"), reverse=True):
                path.unlink() if path.is_file() else path.rmdir()
        for pattern in ("*.json", "config*.yaml", "metrics.csv", "metrics.md", "val_auc.png"):
            for path in run_dir.glob(pattern):
                path.unlink()


def git_commit() -> str | None:
    """The project's git commit, or None outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device, deterministic: bool) -> dict:
    """Versions, device and determinism settings, for env.json."""
    import medmnist
    import timm

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "timm": timm.__version__,
        "medmnist": medmnist.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "determinism": deterministic,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    return env


class Interrupted(Exception):
    """A SIGINT/SIGTERM arrived during a phase that stops between batches (validation, test, evaluate.py)."""


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step, so a stop never splits a step."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second signal means: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
