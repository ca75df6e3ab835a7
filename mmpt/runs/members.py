"""What a series holds: its record (series.json), each run's recorded recipe, and which runs count.

One definition for `summarize`, `compare` and `probe` (`series_runs`, `member_status`): a run counts once it is
finished (summary.json and metrics.json) and, inside a series folder, only as a member that series.json records
and only when trained with the recipe recorded for it; the others are named with the reason and left out.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import yaml

from mmpt.config import RESULT_NEUTRAL, Config, config_differences, recorded_config
from mmpt.config.settings import load_yaml
from mmpt.errors import MmptError
from mmpt.io import read_json
from mmpt.runs.names import EXPORT_HEADS, EXPORT_NORM, EXPORT_RUN_CONFIG, EXPORT_TIMM_CONFIG, EXPORT_WEIGHTS
from mmpt.runs.rundir import Results, RunDir
from mmpt.runs.seriesdir import SeriesDir, is_output_folder, run_candidates

SEED_DIR = re.compile(r"seed(\d+)")  # a seed<k>/ folder of a series


def seed_folders(path: Path) -> list[Path]:
    """The seed<k>/ folders in `path`, by seed (seed2 before seed10)."""
    found = [p for p in Path(path).iterdir() if p.is_dir() and SEED_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(SEED_DIR.fullmatch(p.name).group(1)))


# ---------------------------------------------------------------- the recipe of a series and of its runs


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _first_difference(diffs: list[tuple[str, object, object]]) -> tuple[str, str]:
    diffs = sorted(diffs, key=lambda d: d[0])
    key, old, new = diffs[0]
    more = f" (also {', '.join(k for k, _, _ in diffs[1:])})" if diffs[1:] else ""
    return key, f"{key}={_show(old)}, not {_show(new)}{more}"


def read_run_config(folder: Path) -> Config:
    """The resolved config a run folder records (config.yaml); MmptError when it is missing or unreadable."""
    path = RunDir(folder).config
    try:
        return recorded_config(load_yaml(path.read_text()) or {})
    except (OSError, UnicodeDecodeError, yaml.YAMLError, MmptError, AttributeError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MmptError(
            f"{path} is not a config written by train.py ({reason}); pass --overwrite to train the run "
            "again, or --output DIR for a new folder"
        ) from None


def _recorded_config(raw: object, where: Path) -> Config:
    try:
        return recorded_config(raw)
    except (MmptError, AttributeError, TypeError):
        raise MmptError(
            f"{where} holds a config this mmpt cannot read; pass --overwrite to start the series "
            "again, or --output DIR for a new one"
        ) from None


def read_series(root: Path) -> dict | None:
    """series.json of a series folder ({"recipe": config, "members": {path: config}}), or None without one."""
    path = SeriesDir(root).record
    if not path.is_file():
        return None
    record = read_json(path, "it was written by train.py's series; restore it, or pass --overwrite to start again")
    if not (
        isinstance(record, dict) and isinstance(record.get("members"), dict) and isinstance(record.get("recipe"), dict)
    ):
        raise MmptError(f"{path} is not a series record written by train.py; restore it, or pass --overwrite")
    return record


def series_of(folder: Path) -> tuple[Path, str] | None:
    """(series folder, member path) when `folder` lies in a series folder (series.json above it), else None."""
    folder = Path(folder).absolute()
    for parent in folder.parents:
        if SeriesDir(parent).record.is_file():
            return parent, folder.relative_to(parent).as_posix()
    return None


# ---------------------------------------------------------------- what a series holds


def member_status(folder: Path) -> str | None:
    """None when the training run in `folder` counts in statistics, else why not (a phrase for the output).

    A run counts once finished (summary.json and metrics.json), and, inside a series folder, only as a member
    that series.json records and only when trained with the recipe recorded for it (RESULT_NEUTRAL aside).
    """
    run = RunDir(folder)
    if not run.summary.is_file() or not run.results.metrics.is_file():
        return "unfinished"
    owner = series_of(folder)
    if owner is None:
        return None
    root, member = owner
    record = read_series(root)
    if member not in record["members"]:
        return f"not a run of the series recorded in {SeriesDir(root).record}"
    diffs = config_differences(
        _recorded_config(record["members"][member], SeriesDir(root).record), read_run_config(folder), RESULT_NEUTRAL
    )
    if diffs:
        key, old, new = sorted(diffs, key=lambda d: d[0])[0]
        return f"trained with {key}={_show(new)}, the series asks for {_show(old)}"
    return None


def _skipped(path: Path, root: Path) -> bool:
    """Whether `path` lies in a folder of outputs (a run's checkpoints/, eval/, ..., a probe's results)."""
    return any(is_output_folder(part) for part in path.relative_to(root).parts)


def series_runs(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(finished runs, [(run, why left out)]) at or under `root`, each sorted: the one definition of what a
    series holds, for summarize, compare and probe. Members that series.json records but that never started
    are left out as "not started"."""
    root = Path(root)
    found = run_candidates(root, skip=lambda folder: _skipped(folder, root))
    series_root = root if SeriesDir(root).record.is_file() else (series_of(root) or (None,))[0]
    if series_root is not None:
        for member in read_series(series_root)["members"]:
            folder = series_root / member
            if folder == root or root in folder.parents:
                found.add(folder)
    finished, left_out = [], []
    for folder in sorted(found):
        if not folder.exists():
            left_out.append((folder, "not started"))
            continue
        why = member_status(folder)
        if why is None:
            finished.append(folder)
        else:
            left_out.append((folder, why))
    return finished, left_out


def left_out_error(left_out: list[tuple[Path, str]], what: str) -> MmptError:
    """The --require-complete error: names the first run left out and how many there are."""
    folder, why = left_out[0]
    more = f" and {len(left_out) - 1} more" if len(left_out) > 1 else ""
    return MmptError(
        f"{what}: {folder} is {why}{more}; finish the series (run its command again), or drop "
        "--require-complete to use the finished runs only"
    )


def left_out_line(left_out: list[tuple[Path, str]], root: Path | None = None) -> str:
    """One line naming the runs left out of the statistics, and why."""

    def name(p: Path) -> str:
        try:
            return p.relative_to(root).as_posix() if root is not None else str(p)
        except ValueError:
            return str(p)

    return "left out of the statistics: " + "; ".join(f"{name(p)} ({why})" for p, why in left_out)


# ---------------------------------------------------------------- exports and probes


def is_export(path: str | Path) -> bool:
    """Whether `path` is a folder written by `evaluate.py export`."""
    path = Path(path)
    return path.is_dir() and all(
        (path / name).is_file() for name in (EXPORT_WEIGHTS, EXPORT_TIMM_CONFIG, EXPORT_RUN_CONFIG)
    )


def leaf_weights(leaf: Path) -> str | None:
    """The identity of the weights a probe of `leaf` reads: a run's best_digest (summary.json), or the SHA-256 of
    an export's weight files; None when the run records none."""
    if is_export(leaf):
        digest = hashlib.sha256()
        for name in (EXPORT_WEIGHTS, EXPORT_HEADS, EXPORT_NORM):
            if (leaf / name).is_file():
                with (leaf / name).open("rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
        return digest.hexdigest()
    try:
        return json.loads(RunDir(leaf).summary.read_text()).get("best_digest")
    except (OSError, ValueError, AttributeError):
        return None


def probe_stale(results: Results) -> str | None:
    """Why a probe's results are stale (the run it probed has other weights now: retrained, or gone), or None
    (current, or a probe that records no run: a bare backbone's, or one written before probes recorded it)."""
    try:
        written = json.loads(results.probe_record.read_text())
    except (OSError, ValueError):
        return None
    leaf = written.get("leaf") if isinstance(written, dict) else None
    if not leaf:
        return None
    if not Path(leaf).exists():
        return f"the run it probed, {leaf}, is gone"
    if leaf_weights(Path(leaf)) != written.get("weights"):
        return f"the run it probed, {leaf}, has other weights now (trained again): probe it again"
    return None
