"""The run folder as one object: `RunDir` gives every path in it (mmpt.runs.names spells the names), `Results` the
paths of an evaluation's folder, `FeatureCache` those of the probes' cached features. And what comes before
anything is written into a run folder: the lock (one writer per run folder) and `prepare_run_dir`, whose
--overwrite removes what these objects name, by name, and nothing else; it leaves a launcher's jobs/ and job.log
in place (a job's log is being written while its run starts over). A probe writes a `Results` folder
probe-<method>[-recalibrated]/ beside what it probed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mmpt.errors import MmptError
from mmpt.runs.names import (
    BEST,
    CALIBRATED,
    CHECKPOINT_FILE,
    CHECKPOINTS,
    COMPARE_DIFF_PLOT,
    COMPARE_FILES,
    COMPARE_FOREST_PLOT,
    COMPARE_PAGES,
    COMPARE_PER_CLASS,
    CONFIG,
    CONFUSION_FILE,
    DATA_RECORD,
    ENV,
    EVAL,
    EVAL_SPLITS,
    EVENT_FILE,
    FEATURE_FILE,
    FEATURE_MANIFEST,
    FEATURES,
    GRADIENT_CONFLICTS,
    GRADIENT_CONFLICTS_PLOT,
    JOB_LOG,
    LAST,
    LAUNCHER_ENTRIES,
    LOSS_CURVES_PLOT,
    METRICS_FILES,
    PER_CLASS_FILES,
    PREDICTION_FILE,
    PREDICTIONS,
    PROBE_PREFIX,
    PROBE_RECORD,
    RECALIBRATED,
    RECALIBRATION_RECORD,
    RELIABILITY_FILE,
    RUN_FILE_PATTERNS,
    RUN_FILES,
    SUMMARY,
    TB,
    TEMP_FILE,
    TEMPERATURE_RECORD,
    VAL_AUC_PLOT,
    VAL_HISTORY,
)

try:
    import fcntl
except ImportError:  # Windows: no flock; the run folder is then not locked
    fcntl = None

# ---------------------------------------------------------------- the objects


@dataclass(frozen=True)
class Results:
    """A folder of one evaluation's results: a run's test report (the run folder itself), evaluate.py's
    eval/<split>, a probe's output, or the folder compare writes into."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def metrics(self) -> Path:
        """metrics.json: dataset -> metric -> value, with "mean"."""
        return self.path / METRICS_FILES[0]

    @property
    def metrics_files(self) -> tuple[Path, Path, Path]:
        """metrics.json, metrics.csv and metrics.md."""
        return tuple(self.path / name for name in METRICS_FILES)

    @property
    def predictions(self) -> Path:
        """The folder of medmnist-format prediction files and their data.json."""
        return self.path / PREDICTIONS

    @property
    def loss_curves(self) -> Path:
        return self.path / LOSS_CURVES_PLOT

    @property
    def per_class_files(self) -> tuple[Path, Path]:
        """metrics_per_class.csv and .md: each class's precision, recall, F1, AUC and support."""
        return tuple(self.path / name for name in PER_CLASS_FILES)

    def confusion(self, flag: str) -> Path:
        return self.path / f"confusion_{flag}.png"

    def reliability(self, flag: str) -> Path:
        """reliability_<flag>.png: accuracy against confidence per bin, with the bins' image counts."""
        return self.path / f"reliability_{flag}.png"

    @property
    def temperatures(self) -> Path:
        """What --calibrate temperature fitted (evaluate.py)."""
        return self.path / TEMPERATURE_RECORD

    @property
    def calibrated(self) -> Results:
        """The results of the temperature-scaled scores (evaluate.py --calibrate temperature)."""
        return Results(self.path / CALIBRATED)

    @property
    def recalibration(self) -> Path:
        """What --recalibrate-norm did (evaluate.py)."""
        return self.path / RECALIBRATION_RECORD

    @property
    def probe_record(self) -> Path:
        """The probe's method and what it chose per dataset."""
        return self.path / PROBE_RECORD

    @property
    def compare_files(self) -> tuple[Path, Path, Path]:
        """compare.json, compare.csv and compare.md."""
        return tuple(self.path / name for name in COMPARE_FILES)

    def compare_plot(self, metric: str) -> Path:
        """compare_<metric>.png: each run's values with their intervals."""
        return self.path / f"compare_{metric}.png"

    @property
    def compare_pages(self) -> tuple[Path, Path]:
        """compare.html (tables and pictures in one self-contained page) and compare.tex (the main table)."""
        return tuple(self.path / name for name in COMPARE_PAGES)

    @property
    def compare_per_class(self) -> Path:
        """compare_per_class.csv: each class's values, differences and intervals (compare --per-class)."""
        return self.path / COMPARE_PER_CLASS

    @property
    def compare_diff_plot(self) -> Path:
        """compare_diff.png: the paired differences to the first run."""
        return self.path / COMPARE_DIFF_PLOT

    @property
    def compare_forest_plot(self) -> Path:
        """compare_forest.png: Δm and each dataset's difference to the first run, one row per run."""
        return self.path / COMPARE_FOREST_PLOT


@dataclass(frozen=True)
class FeatureCache:
    """A folder of cached backbone features (`evaluate.py probe`): one .npy per dataset and split, and a manifest
    that names the backbone they came from."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def manifest(self) -> Path:
        return self.path / FEATURE_MANIFEST

    def file(self, flag: str, resolution: int, split: str) -> Path:
        return self.path / f"{flag}_{resolution}_{split}.npy"


@dataclass(frozen=True)
class RunDir:
    """One run folder: every path in it comes from here."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir | None:
        """The run folder that holds `checkpoint` as its checkpoints/last.pt or best.pt, else None."""
        checkpoint = Path(checkpoint)
        if checkpoint.name in (LAST, BEST) and checkpoint.parent.name == CHECKPOINTS:
            return cls(checkpoint.parent.parent)
        return None

    @classmethod
    def enclosing(cls, folder: str | Path, levels: int | None = None) -> RunDir | None:
        """The run `folder` is or lies in: the closest with a config.yaml of it and its parents, `levels` in all."""
        found = (p for p in [Path(folder), *Path(folder).parents][:levels] if (p / CONFIG).is_file())
        return next(map(cls, found), None)

    @property
    def config(self) -> Path:
        """config.yaml: the resolved config the run trains with."""
        return self.path / CONFIG

    @property
    def env(self) -> Path:
        """env.json: versions, device, git commit, world size."""
        return self.path / ENV

    def before_resume(self, record: Path, step: int) -> Path:
        """Where a resume at `step` keeps the earlier text of `record` (config.yaml or env.json) when it changes."""
        return record.with_name(f"{record.stem}.before-resume-at-step{step}{record.suffix}")

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last(self) -> Path:
        """checkpoints/last.pt: the whole training state, for resume."""
        return self.checkpoint("last")

    @property
    def best(self) -> Path:
        """checkpoints/best.pt: the weights of the best validation epoch."""
        return self.checkpoint("best")

    def checkpoint(self, which: str) -> Path:
        """checkpoints/<which>.pt for `which` "last" or "best"."""
        assert which in ("last", "best"), f"a run has a last and a best checkpoint, not {which!r}"
        return self.checkpoints / (LAST if which == "last" else BEST)

    @property
    def tb(self) -> Path:
        """The TensorBoard event folder."""
        return self.path / TB

    @property
    def val_history(self) -> Path:
        """val_history.json: per-epoch train losses, validation tables and weights."""
        return self.path / VAL_HISTORY

    @property
    def val_auc_plot(self) -> Path:
        return self.path / VAL_AUC_PLOT

    @property
    def gradient_conflicts(self) -> Path:
        """gradient_conflicts.json: every measurement of the gradient-conflict diagnostic (conflict_every_steps)."""
        return self.path / GRADIENT_CONFLICTS

    @property
    def gradient_conflicts_plot(self) -> Path:
        """gradient_conflicts.png: the heat map of their mean, written at the end of training."""
        return self.path / GRADIENT_CONFLICTS_PLOT

    @property
    def summary(self) -> Path:
        """summary.json: written last, so a run with it is finished."""
        return self.path / SUMMARY

    @property
    def results(self) -> Results:
        """The test report of best.pt that train.py writes at the top of the folder (and compare, with this run
        first)."""
        return Results(self.path)

    def eval(self, split: str, recalibrated: bool = False) -> Results:
        """evaluate.py's default output: eval/<split>, or eval/<split>-recalibrated with --recalibrate-norm."""
        assert split in EVAL_SPLITS, f"evaluate.py evaluates {EVAL_SPLITS}, not {split!r}"
        return Results(self.path / EVAL / (split + (RECALIBRATED if recalibrated else "")))

    def features(self, recalibrated: bool = False) -> FeatureCache:
        """The probes' feature cache: features/, or features-recalibrated/ with --recalibrate-norm."""
        return FeatureCache(self.path / (FEATURES + (RECALIBRATED if recalibrated else "")))

    @property
    def job_log(self) -> Path:
        """job.log: a link to the log of the latest job that trained this run (train.py --launcher)."""
        return self.path / JOB_LOG

    def is_run(self) -> bool:
        """Whether the folder holds a training run that reached a checkpoint (its checkpoints/, or summary.json)."""
        return self.summary.exists() or self.checkpoints.exists()


def probe_output(source: Path, method: str, recalibrated: bool = False) -> Results:
    """Where a probe of `source` writes by default: probe-<method>[-recalibrated]/ in it."""
    return Results(Path(source) / f"{PROBE_PREFIX}{method}{RECALIBRATED if recalibrated else ''}")


# ---------------------------------------------------------------- lock, prepare, --overwrite

# the run folders this process holds locked: (st_dev, st_ino) -> open descriptor, kept until the process ends
_RUN_LOCKS: dict[tuple[int, int], int] = {}


def in_use(run_dir: Path) -> bool:
    """Whether another process holds `run_dir`'s lock (lock_run_dir): a run training there now."""
    if fcntl is None or not Path(run_dir).is_dir():
        return False
    fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        stat = os.fstat(fd)
        if (stat.st_dev, stat.st_ino) in _RUN_LOCKS:
            return False  # this process's own
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


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

    Overwrite removes only what mmpt writes, by name (every output RunDir names, the recalibrated evaluations
    and feature caches included), unlinks symbolic links instead of following them, and prints what it kept.
    Returns the kept entries (relative paths). Raises MmptError for a folder with outputs (without resume or
    overwrite), or one that cannot be created or cleared.
    """
    try:
        has_outputs = run_dir.is_dir() and any(p.name not in LAUNCHER_ENTRIES for p in run_dir.iterdir())
        _check_output_kinds(RunDir(run_dir))
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


def _check_output_kinds(run: RunDir) -> None:
    """Raise MmptError if a folder mmpt writes into is a file there, or a file it writes is a folder."""
    for folder in (run.checkpoints, run.tb, run.results.predictions, run.features().path):
        if folder.exists() and not folder.is_dir():
            raise MmptError(
                f"run folder {run.path} has a file named {folder.name} where mmpt writes a folder; move it away "
                "or pass --output DIR for another folder"
            )
    for path in (*(run.path / name for name in RUN_FILES), run.last, run.best):
        if path.is_dir():
            raise MmptError(
                f"run folder {run.path} has a folder named {path.relative_to(run.path).as_posix()} where mmpt "
                "writes a file; move it away or pass --output DIR for another folder"
            )


def _is_prediction(name: str) -> bool:
    return bool(PREDICTION_FILE.fullmatch(name)) or name == DATA_RECORD or bool(TEMP_FILE.fullmatch(name))


def _is_feature(name: str) -> bool:
    return bool(FEATURE_FILE.fullmatch(name)) or name == FEATURE_MANIFEST or bool(TEMP_FILE.fullmatch(name))


def _is_result_file(name: str) -> bool:
    """What an evaluation writes into its Results folder besides predictions/."""
    names = (*METRICS_FILES, *PER_CLASS_FILES, LOSS_CURVES_PLOT, RECALIBRATION_RECORD, PROBE_RECORD, TEMPERATURE_RECORD)
    return name in names or any(p.fullmatch(name) for p in (CONFUSION_FILE, RELIABILITY_FILE, TEMP_FILE))


def _is_run_file(name: str) -> bool:
    return name in RUN_FILES or any(p.fullmatch(name) for p in RUN_FILE_PATTERNS)


# the output folders of a run folder and which of their files mmpt wrote
_FOLDER_FILES: dict[str, Callable[[str], bool]] = {
    CHECKPOINTS: lambda name: bool(CHECKPOINT_FILE.fullmatch(name)),
    TB: lambda name: bool(EVENT_FILE.fullmatch(name)),
    PREDICTIONS: _is_prediction,
    FEATURES: _is_feature,
    FEATURES + RECALIBRATED: _is_feature,
}
_EVAL_FOLDERS = tuple(split + suffix for split in EVAL_SPLITS for suffix in ("", RECALIBRATED))


def _clear(
    folder: Path, is_output: Callable[[str], bool], kept: list[str], base: Path, handled: tuple[str, ...] = ()
) -> None:
    """Remove `folder`'s files whose names `is_output` accepts, then the folder if empty; a link is unlinked.
    What stays is appended to `kept` (relative to `base`)."""
    if folder.is_symlink():
        folder.unlink()  # a link where mmpt puts a folder: remove the link, never what it points to
        return
    for path in sorted(folder.iterdir()):
        if path.name in handled:
            continue
        if is_output(path.name) and (path.is_symlink() or not path.is_dir()):
            path.unlink()
        else:
            kept.append(str(path.relative_to(base)))
    if not any(folder.iterdir()):
        folder.rmdir()


def _clear_results(folder: Path, kept: list[str], base: Path) -> None:
    """An evaluation's Results folder: its files, its predictions/ and the Results folder of its calibrated scores."""
    results = Results(folder)
    predictions, calibrated = results.predictions, results.calibrated.path
    if predictions.is_symlink() or predictions.is_dir():
        _clear(predictions, _is_prediction, kept, base)
    if calibrated.is_symlink():
        calibrated.unlink()
    elif calibrated.is_dir():
        _clear_results(calibrated, kept, base)
    _clear(folder, _is_result_file, kept, base, handled=(predictions.name, calibrated.name))
    for path in (predictions, calibrated):
        if path.exists() and not any(k.startswith(str(path.relative_to(base))) for k in kept):
            kept.append(str(path.relative_to(base)))


def clear_results(folder: Path) -> list[str]:
    """Remove, by name, what an evaluation wrote into the Results folder `folder` (metrics, predictions/ and its
    data.json, plots, records), so that a new evaluation's files never stand beside an earlier one's (of other
    datasets or another checkpoint); keep everything else. Returns what was kept (relative paths). Raises OSError."""
    folder = Path(folder)
    kept: list[str] = []
    if folder.is_dir() and not folder.is_symlink():
        _clear_results(folder, kept, folder)
    return kept


def _remove_outputs(run_dir: Path) -> list[str]:
    """Remove mmpt's outputs from `run_dir` by name; return what was kept (relative paths, sorted)."""
    kept: list[str] = []

    def clear(folder: Path, is_output: Callable[[str], bool], handled: tuple[str, ...] = ()) -> None:
        _clear(folder, is_output, kept, run_dir, handled)

    def clear_results(folder: Path) -> None:
        _clear_results(folder, kept, run_dir)

    for path in sorted(run_dir.iterdir()):
        name = path.name
        if name in LAUNCHER_ENTRIES:
            continue  # the launcher's: the job that trains this run writes its log there
        if name in _FOLDER_FILES and (path.is_dir() or path.is_symlink()):
            clear(path, _FOLDER_FILES[name])
        elif name == EVAL and path.is_dir() and not path.is_symlink():
            for results in sorted(path.iterdir()):
                if results.name in _EVAL_FOLDERS and results.is_dir() and not results.is_symlink():
                    clear_results(results)
                else:
                    kept.append(str(results.relative_to(run_dir)))
            if not any(path.iterdir()):
                path.rmdir()
        elif (_is_run_file(name) and (path.is_symlink() or not path.is_dir())) or (name == EVAL and path.is_symlink()):
            path.unlink()
        else:
            kept.append(name)
    # a kept file inside a kept folder: name the file only
    return sorted(k for k in set(kept) if not any(o.startswith(k + "/") for o in kept))
