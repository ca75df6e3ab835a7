"""Checkpoints: atomic writes (mmpt.io), safe loads (`weights_only=True`), weight digests.

A checkpoint is a dict of tensors and plain Python values, never code.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from mmpt.errors import MmptError
from mmpt.io import atomic_write

# Top-level keys of a training checkpoint.
MODEL = "model"
OPTIMIZERS = "optimizers"
WEIGHTING = "weighting"
STEP = "step"  # the training step's own state (fp16 gradient scaler)
PROGRESS = "progress"
RNG = "rng"
CONFIG = "config"
FORMAT = "format"
FORMAT_VERSION = 2  # 2: the training step's state, progress.done and world_size, mmpt.io writes

LAST = "last.pt"
BEST = "best.pt"


def save(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically with torch.save."""
    atomic_write(path, lambda f: torch.save(dict(state, **{FORMAT: FORMAT_VERSION}), f))


def load(path: Path) -> dict:
    """Read a checkpoint with `torch.load(weights_only=True)`.

    Raises MmptError if the file is missing, unreadable, lacks the model or config, or holds anything but
    tensors and plain values (for example a pickle crafted to run code, which is refused without running it).
    """
    path = Path(path)
    if not path.is_file():
        raise MmptError(f"checkpoint {path} not found; pass a run folder with checkpoints/ or a .pt file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MmptError(
            f"checkpoint {path} is not plain tensor data, so it was refused and nothing in it was run "
            f"({_unpickling_reason(exc)}); it is corrupt or was not written by mmpt: use a checkpoint written by mmpt"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise MmptError(f"checkpoint {path} is unreadable or truncated ({first}); use another checkpoint") from None
    if not isinstance(state, dict) or not {FORMAT, MODEL, CONFIG} <= state.keys():
        raise MmptError(f"{path} is not an mmpt checkpoint; pass a checkpoint written by mmpt")
    return state


def _unpickling_reason(exc: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only error that names the refused item; never its advice to drop weights_only."""
    lines = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in str(exc).splitlines()]
    reasons = [line.split(". ")[0] for line in lines if line.startswith(("Trying to load unsupported", "Unsupported"))]
    return reasons[0].rstrip(".")[:200] if reasons else type(exc).__name__


def state_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in sorted key order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) RNG states as checkpoint-safe values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
