"""Process-level setup: determinism and seeds, env.json, stop signals (the run folder: mmpt.runs.rundir)."""

from __future__ import annotations

import contextlib
import os
import platform
import random
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

CUBLAS_WORKSPACE = ":4096:8"


def configure_determinism(seed: int, deterministic: bool, tf32: bool = False) -> None:
    """Seed Python, NumPy and torch; with `deterministic`, force deterministic kernels (CUDA included); `tf32`: TF32
    tensor cores for float32 matrix products and convolutions on CUDA (train.tf32).

    TF32 is independent of determinism: its kernels give the same bits run to run on the same GPU model. Deterministic
    mode does not fill new memory (torch's fill_uninitialized_memory): mmpt reads no uninitialised memory, and the
    fill costs a write of every new tensor. CUBLAS_WORKSPACE_CONFIG must be set before CUDA starts; if CUDA is already
    up, this warns.
    """
    if deterministic:
        if torch.cuda.is_initialized() and os.environ.get("CUBLAS_WORKSPACE_CONFIG") is None:
            warnings.warn(
                "CUDA was initialised before mmpt set CUBLAS_WORKSPACE_CONFIG; cuBLAS may not be deterministic",
                stacklevel=2,
            )
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    # imported here: timm is slow to import, and of this module only env.json needs it (the CLI imports the rest)
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
        "fill_uninitialized_memory": torch.utils.deterministic.fill_uninitialized_memory,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    return env


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived where there is no step to finish (validation, test, evaluate.py): stop there.

    A BaseException, so that no `except Exception` on the way swallows a stop."""


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise Interrupted (naming the signal) instead of killing the process."""

    def handle(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# SIGUSR2 is what SLURM (and submitit's local jobs) send before a job's time limit or a preemption
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR2") if hasattr(signal, name))


# A stop signal delivered again within this many seconds is the same stop: `timeout`, srun, submitit's controller
# and a terminal can each deliver one (to the process and to its group), and writing the stop checkpoint of a large
# model takes seconds. A signal after it means "stop now, without saving".
REPEAT_WINDOW_S = 30.0


class StopSignal:
    """Turns SIGINT/SIGTERM/SIGUSR2 into a flag the loop checks after each step, so a stop never splits a step.

    Repeats within REPEAT_WINDOW_S of the first are one stop; a signal after that raises KeyboardInterrupt."""

    def __init__(self, window_s: float = REPEAT_WINDOW_S):
        self.received: str | None = None
        self.window_s = window_s
        self._at: float | None = None
        self._previous = {}

    def __enter__(self) -> StopSignal:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received, self._at = signal.Signals(signum).name, time.monotonic()
        elif time.monotonic() - self._at > self.window_s:  # a second stop, well after the first: stop now
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
