"""One way to write a file: atomically and durably, for every file the engine writes.

A temp file in the target's folder is written, flushed and fsynced, moved over the target with
`os.replace`, and the folder is fsynced so the rename itself survives a power cut. A crash at any
moment leaves the old file or the new one, never half of either. The file gets the mode `open()` would
give it (0666 less the umask for a new file, the old file's mode when replacing one), not the temp
file's private 0600: a group can read a shared study.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from mmpt.errors import MmptError


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(file)` on a temp file beside `path`, then move it into place durably.

    Raises OSError (the caller turns it into an MmptError that names the folder) when the folder
    cannot be written; the temp file is removed and the old `path`, if any, is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600 whatever the umask; open() gives a new file 0666 less the umask and
        # keeps an existing file's mode
        if hasattr(os, "fchmod"):
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)
            except OSError:
                mode = 0o666 & ~current_umask()
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def write_advice(exc: OSError) -> str:
    """What to do about an OSError of a write: the cause and the fix in a few words."""
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a part of the path is a file, not a folder: pass a folder"
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG):
        return "free disk space"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the folder writable, or pass another one"
    if exc.errno == errno.EISDIR:
        return "a folder stands where the file goes: move it away"
    return "free disk space or make the folder writable"


def check_output_folder(folder: Path, flag: str = "--output") -> None:
    """Raise MmptError unless `folder` is a writable folder, or can be created as one (no part of its path is a
    file), without writing anything yet. `flag` names the option that gave it in the message."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        what = "is a file, not a folder" if existing == folder else f"is inside {existing}, which is a file"
        raise MmptError(f"{flag} {folder} {what}; pass {flag} DIR with a folder")
    if not os.access(existing, os.W_OK):
        raise MmptError(f"{flag} {folder}: {existing} is not writable; pass {flag} DIR with a writable folder")


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_text(path: Path, text: str, *, keep_previous_as: Path | None = None) -> None:
    """Write `text` to `path` atomically; an OSError (disk full, read-only folder) is an MmptError.

    With `keep_previous_as` (a path), a file that already holds different text is first copied there: a resume
    that changes the config or the machine loses no record.
    """
    path = Path(path)
    kept = Path(keep_previous_as) if keep_previous_as is not None else None
    created_kept = False
    try:
        if kept is not None and path.is_file():
            previous = path.read_bytes()
            if previous == text.encode():
                return
            created_kept = not kept.exists()
            write_bytes(kept, previous)
        write_bytes(path, text.encode())
    except OSError as exc:
        # leave the folder as it was: no kept copy of a file that did not change
        if created_kept:
            kept.unlink(missing_ok=True)
        raise MmptError(f"cannot write {path} ({exc.strerror or exc}); {write_advice(exc)}") from None


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


def write_json(path: Path, data: Any, *, keep_previous_as: Path | None = None) -> None:
    """Write `data` as strict JSON atomically; see write_text."""
    write_text(path, json_text(data), keep_previous_as=keep_previous_as)


def write_csv(path: Path, rows: Iterable[Sequence[Any]]) -> None:
    """Write `rows` (the first one the header) as CSV atomically."""
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    write_text(path, text.getvalue())


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], *, align: str | None = None) -> str:
    """A Markdown table (no trailing newline): `header`, then `rows` of cells. `align`: one letter per column, `l`
    left or `r` right (default: the first column left, the others right, as numbers read); a `|` in a cell is
    escaped. The one writer of the Markdown tables mmpt writes (metrics, compare, summaries, cards, docs)."""
    align = align or "l" + "r" * (len(header) - 1)
    assert len(align) == len(header), f"one alignment per column: {align!r} for {len(header)} columns"

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    rule = "|" + "".join("---|" if a == "l" else "---:|" for a in align)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def read_json(path: Path, fix: str) -> Any:
    """Read a JSON file mmpt wrote. Raises MmptError naming the file and `fix` when it is unreadable or malformed."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MmptError(f"{path} is not readable JSON ({reason}); {fix}") from None
