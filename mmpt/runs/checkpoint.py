"""Checkpoints: atomic writes (mmpt.io), safe loads (`weights_only=True`), weight digests, integrity checks.

A checkpoint is a dict of tensors and plain Python values, never code. It carries a SHA-256 digest of
everything else it holds, and every load verifies it, so a file whose bytes changed after mmpt wrote it
(bit rot, a bad copy, an edit) is refused instead of silently training or evaluating other weights.
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
from mmpt.runs.names import BEST, LAST

# Top-level keys of a training checkpoint.
MODEL = "model"
OPTIMIZERS = "optimizers"
WEIGHTING = "weighting"
STEP = "step"  # the training step's own state (fp16 gradient scaler)
PROGRESS = "progress"
EARLY_STOPPING = "early_stopping"
RNG = "rng"
CONFIG = "config"
DATA = "data"  # identity of each data file trained on (size and mtime, MD5 when verified)
FORMAT = "format"
DIGEST = "digest"  # SHA-256 over every other key: verified on every load
FORMAT_VERSION = 3  # 3: early stopping its own part; 2: DIGEST, DATA, the step's state, progress.done and world_size


def save(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically with torch.save, with the format version and a digest of the whole state.

    Raises MmptError if the file cannot be written (disk full, read-only folder); the previous file is kept.
    """
    state = dict(state, **{FORMAT: FORMAT_VERSION})
    state[DIGEST] = content_digest(state)
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as exc:
        raise MmptError(
            f"cannot write checkpoint {path} ({exc.strerror or exc}); the previous one is intact: free disk space "
            "or make the folder writable, then resume"
        ) from None


def load(path: Path) -> dict:
    """Read a checkpoint with `torch.load(weights_only=True)` and verify its digest; return the state without it.

    Raises MmptError if the file is missing, unreadable, lacks the model or config, holds anything but
    tensors and plain values (for example a pickle crafted to run code, which is refused without running it),
    has another format version, or fails its digest (its bytes changed after mmpt wrote it).
    """
    path = Path(path)
    if path.is_dir():
        raise MmptError(
            f"checkpoint {path} is a folder; pass the checkpoint file (a run's checkpoints/best.pt or last.pt)"
        )
    if not path.is_file():
        raise missing_error(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MmptError(
            f"checkpoint {path} is not plain tensor data, so it was refused and nothing in it was run "
            f"({_unpickling_reason(exc)}); it is corrupt or was not written by mmpt: use a checkpoint written by mmpt"
        ) from None
    except Exception as exc:  # torch.load fails on other files in many ways (a text file: KeyError)
        text = str(exc).strip()
        first = f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__
        raise MmptError(
            f"checkpoint {path} is unreadable or truncated, or another kind of file ({first}); use another "
            "checkpoint, one written by mmpt"
        ) from None
    if not isinstance(state, dict) or not {FORMAT, MODEL, CONFIG} <= state.keys():
        raise MmptError(f"{path} is not an mmpt checkpoint; pass a checkpoint written by mmpt")
    if state[FORMAT] != FORMAT_VERSION or DIGEST not in state:
        raise MmptError(
            f"checkpoint {path} has format {state[FORMAT]!r}, but this mmpt reads format {FORMAT_VERSION} "
            f"(with a digest); use the mmpt version that wrote it, or train a new run"
        )
    stored = state.pop(DIGEST)
    if not isinstance(stored, str) or content_digest(state) != stored:
        damage = "; it holds non-finite weights" if _has_non_finite(state[MODEL]) else ""
        raise MmptError(
            f"checkpoint {path} fails its integrity check (its bytes changed after mmpt wrote it{damage}), so it was "
            f"not used; restore it from a backup, or use the other checkpoint explicitly ({_fallback(path)})"
        )
    return state


def missing_error(path: Path) -> MmptError:
    """The error for a checkpoint file that is not there."""
    return MmptError(f"checkpoint {path} not found; pass a run folder with checkpoints/ or a .pt file")


def _fallback(path: Path) -> str:
    """What to use instead of a damaged checkpoint, in words."""
    if path.name == LAST:
        return f"evaluate.py --checkpoint {path.with_name(BEST)}; a resume needs an intact {LAST}"
    return f"evaluate.py --checkpoint {path.with_name(LAST)}"


def _has_non_finite(model_state) -> bool:
    if not isinstance(model_state, dict):
        return False
    return any(
        isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
        for t in model_state.values()
    )


def content_digest(value) -> str:
    """SHA-256 over a checkpoint's nested dicts, lists, tensors and plain values (dict keys in sorted order).

    Tensors contribute dtype, shape and bytes; other values their type and repr, so a round trip through
    torch.save/torch.load gives the same digest.
    """
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}|".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}{len(value)}|".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__}:{value!r}|".encode())


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


def set_rng_state(state: dict) -> tuple[int, int]:
    """Restore what `rng_state` captured; return (CUDA states restored, CUDA states saved).

    A checkpoint keeps one state per GPU the run saw; on a machine with fewer GPUs (or none) the first as many as
    there are GPUs are restored, the others' generators keep their seeded state, and the caller says so.
    """
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    saved = list(state.get("cuda", []))
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    restored = min(len(saved), visible)
    for device in range(restored):
        torch.cuda.set_rng_state(saved[device], device)
    return restored, len(saved)
