"""One way to write a file: atomically and durably, for every file the engine writes.

A temp file in the target's folder is written, flushed and fsynced, moved over the target with
`os.replace`, and the folder is fsynced so the rename itself survives a power cut. A crash at any
moment leaves the old file or the new one, never half of either.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(file)` on a temp file beside `path`, then move it into place durably.

    Raises OSError (the caller turns it into an MmptError that names the folder) when the folder
    cannot be written; the temp file is removed and the old `path`, if any, is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_text(path: Path, text: str, *, keep_previous_as: str | None = None) -> None:
    """Write `text` to `path` atomically.

    With `keep_previous_as`, a file that already holds different text is first kept as
    `{stem}.{keep_previous_as}{suffix}`: a resume that changes the config or the machine loses no record.
    """
    path = Path(path)
    if keep_previous_as and path.is_file():
        previous = path.read_text()
        if previous == text:
            return
        write_text(path.with_name(f"{path.stem}.{keep_previous_as}{path.suffix}"), previous)
    write_bytes(path, text.encode())


def finite_json(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None: JSON has no NaN, and strict readers refuse it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def json_text(data: Any) -> str:
    """Strict JSON text of `data` (non-finite floats as null), indented, ending in a newline."""
    return json.dumps(finite_json(data), indent=2, allow_nan=False, default=str) + "\n"


def write_json(path: Path, data: Any, *, keep_previous_as: str | None = None) -> None:
    """Write `data` as strict JSON atomically; see write_text."""
    write_text(path, json_text(data), keep_previous_as=keep_previous_as)
