"""The run folder: its layout and file names, the lock that keeps one writer per folder, and --overwrite.

runs/<name>/ holds config.yaml, env.json, summary.json, val_history.json, metrics.{json,csv,md}, plots,
checkpoints/{last,best}.pt, tb/ (TensorBoard), predictions/ (medmnist-named CSV files and data.json),
features/ (probe caches) and eval/{val,test}/ (evaluate.py). --overwrite removes these by name and nothing else.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mmpt.errors import MmptError

try:
    import fcntl
except ImportError:  # Windows: no flock; the run folder is then not locked
    fcntl = None

DATA_RECORD = "data.json"  # beside the prediction files: what they were evaluated on


# What mmpt writes in a run folder, by name: --overwrite removes these and nothing else.
OUTPUT_FILES = (
    "config.yaml",
    "env.json",
    "summary.json",
    "val_history.json",
    "metrics.json",
    "metrics.csv",
    "metrics.md",
    "val_auc.png",
    "loss_curves.png",
    "compare.json",
    "compare.csv",
    "compare.md",
    "compare_auc.png",
    "compare_diff.png",
)
OUTPUT_PATTERNS = (
    re.compile(r"(config|env)\.before-resume-at-step\d+\.(yaml|json)"),  # records kept by a resume
    re.compile(r"\..+\.tmp"),  # temp files of an interrupted atomic write
)
CHECKPOINT_FILE = re.compile(r"(last|best)\.pt|\.(last|best)\.pt\..+\.tmp")
EVENT_FILE = re.compile(r"events\.out\.tfevents\..+")
METRICS_FILE = re.compile(r"metrics\.(json|csv|md)|confusion_[a-z]+mnist\.png|loss_curves\.png|\..+\.tmp")
# cached backbone features of `evaluate.py probe` (they belong to the weights being replaced)
FEATURE_FILE = re.compile(r"[a-z]+mnist_\d+_(train|val|test)\.npy|manifest\.json|\..+\.tmp")
# medmnist Evaluator names: {flag}{_size}_{split}_[AUC]x_[ACC]y@{run}.csv (see prediction_filename)
PREDICTION_FILE = re.compile(
    r"(?P<flag>[a-z]+mnist)(?:_(?P<size>\d+))?_(?P<split>train|val|test)_\[AUC\].+_\[ACC\].+@.+\.csv"
)

# the run folders this process holds locked: (st_dev, st_ino) -> open descriptor, kept until the process ends
_RUN_LOCKS: dict[tuple[int, int], int] = {}


def lock_run_dir(run_dir: Path) -> None:
    """Create `run_dir` if needed and hold an exclusive lock on it for the life of this process.

    The lock is an flock on the folder itself (no lock file to go stale or to change the folder): the kernel
    releases it when the process ends, even on kill -9. Locking a folder this process already holds is a no-op.
    Raises MmptError if another process holds it, or the folder cannot be created or opened.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise MmptError(
            f"cannot create or open the run folder {run_dir} ({exc.strerror or exc}); "
            "pass --output DIR with a writable folder"
        ) from None
    stat = os.fstat(fd)
    key = (stat.st_dev, stat.st_ino)
    if key in _RUN_LOCKS or fcntl is None:
        os.close(fd)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise MmptError(
            f"run folder {run_dir} is in use by another mmpt process; wait for it to finish or stop it "
            "(Ctrl-C, it saves last.pt), or pass --output DIR for another folder"
        ) from None
    _RUN_LOCKS[key] = fd


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> list[str]:
    """Create the run folder; refuse to reuse one with outputs unless resuming or overwriting.

    Overwrite removes only what mmpt writes, by name (see OUTPUT_FILES), unlinks symbolic links instead of
    following them, and prints what it kept. Returns the kept entries (relative paths). Raises MmptError for a
    folder with outputs (without resume or overwrite), or one that cannot be created or cleared.
    """
    try:
        has_outputs = run_dir.is_dir() and any(run_dir.iterdir())
        _check_output_kinds(run_dir)
        if resume:
            return []
        if has_outputs and not overwrite:
            raise MmptError(
                f"run folder {run_dir} already has outputs; pass --resume {run_dir} to continue it, "
                "--overwrite to start over, or --output DIR for a new folder"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        kept = _remove_outputs(run_dir) if overwrite else []
    except OSError as exc:
        raise MmptError(
            f"cannot prepare the run folder {run_dir} ({exc.strerror or exc}); pass --output DIR with a writable folder"
        ) from None
    if kept:
        print(f"--overwrite kept what mmpt did not write in {run_dir}: {', '.join(kept)}")
    return kept


def _check_output_kinds(run_dir: Path) -> None:
    """Raise MmptError if a folder mmpt writes into is a file there, or a file it writes is a folder."""
    for name in ("checkpoints", "tb", "predictions", "features"):
        if (run_dir / name).exists() and not (run_dir / name).is_dir():
            raise MmptError(
                f"run folder {run_dir} has a file named {name} where mmpt writes a folder; move it away "
                "or pass --output DIR for another folder"
            )
    for name in (*OUTPUT_FILES, "checkpoints/last.pt", "checkpoints/best.pt"):
        if (run_dir / name).is_dir():
            raise MmptError(
                f"run folder {run_dir} has a folder named {name} where mmpt writes a file; move it away "
                "or pass --output DIR for another folder"
            )


def _remove_outputs(run_dir: Path) -> list[str]:
    """Remove mmpt's outputs from `run_dir` by name; return what was kept (relative paths, sorted)."""
    kept: list[str] = []

    def clear(folder: Path, is_output, handled: tuple[str, ...] = ()) -> None:
        """Remove `folder`'s files whose names `is_output` accepts, then the folder if empty; a link is unlinked."""
        if folder.is_symlink():
            folder.unlink()  # a link where mmpt puts a folder: remove the link, never what it points to
            return
        for path in sorted(folder.iterdir()):
            if path.name in handled:
                continue
            if is_output(path.name) and (path.is_symlink() or not path.is_dir()):
                path.unlink()
            else:
                kept.append(str(path.relative_to(run_dir)))
        if not any(folder.iterdir()):
            folder.rmdir()

    def is_prediction(name: str) -> bool:
        return bool(PREDICTION_FILE.fullmatch(name)) or name == DATA_RECORD

    for path in sorted(run_dir.iterdir()):
        name = path.name
        if name == "checkpoints":
            clear(path, lambda n: bool(CHECKPOINT_FILE.fullmatch(n)))
        elif name == "tb":
            clear(path, lambda n: bool(EVENT_FILE.fullmatch(n)))
        elif name == "predictions":
            clear(path, is_prediction)
        elif name == "features":
            clear(path, lambda n: bool(FEATURE_FILE.fullmatch(n)))
        elif name == "eval" and path.is_dir() and not path.is_symlink():
            # evaluate.py's default output: eval/{val,test}/metrics.* and eval/{split}/predictions/
            for split in sorted(path.iterdir()):
                if split.name not in ("val", "test") or split.is_symlink() or not split.is_dir():
                    kept.append(str(split.relative_to(run_dir)))
                    continue
                if (split / "predictions").is_symlink() or (split / "predictions").is_dir():
                    clear(split / "predictions", is_prediction)
                clear(split, lambda n: bool(METRICS_FILE.fullmatch(n)), handled=("predictions",))
                if (split / "predictions").exists():
                    kept.append(str(split.relative_to(run_dir) / "predictions"))
            if not any(path.iterdir()):
                path.rmdir()
        elif (
            (name in OUTPUT_FILES or any(p.fullmatch(name) for p in OUTPUT_PATTERNS))
            and (path.is_symlink() or not path.is_dir())
        ) or (name == "eval" and path.is_symlink()):
            path.unlink()
        else:
            kept.append(name)
    # a kept file inside a kept folder: name the file only
    return sorted(k for k in set(kept) if not any(o.startswith(k + "/") for o in kept))


def prediction_filename(flag: str, resolution: int, split: str, metrics: dict[str, float], run: str) -> str:
    """medmnist Evaluator's standard name: `{flag}{_size}_{split}_[AUC]x_[ACC]y@{run}.csv`."""
    size_flag = "" if resolution == 28 else f"_{resolution}"
    return f"{flag}{size_flag}_{split}_[AUC]{metrics['auc']:.3f}_[ACC]{metrics['acc']:.3f}@{run}.csv"
