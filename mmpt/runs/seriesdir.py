"""A series folder as one object: `SeriesDir` gives every path of it that is not a member's run folder, and
`run_candidates` / `is_output_folder` find the runs under a folder.

runs/<name>/                            a series (mmpt.experiments.series): its members' run folders (RunDir)
  series.json                           the recipe asked for and each member's resolved config
  sweep.{json,csv,md,png}               the summary over its finished runs (mmpt.experiments.summary)
  jobs/                                 when its members train as jobs (train.py --launcher): jobs.json, the
                                        launcher's record, and submitit's files: jobs/local/<member>/, jobs/slurm/
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mmpt.runs.names import (
    CHECKPOINTS,
    CONFIG,
    JOBS,
    JOBS_RECORD,
    LAST,
    PROBE_PREFIX,
    SERIES_RECORD,
    SUBFOLDERS,
    SUMMARY,
    SWEEP_FILES,
)


@dataclass(frozen=True)
class SeriesDir:
    """A series folder: its record (series.json) and the summary over its runs (sweep.*)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def record(self) -> Path:
        """series.json: the recipe asked for and each member's resolved config."""
        return self.path / SERIES_RECORD

    @property
    def sweep_files(self) -> tuple[Path, Path, Path, Path]:
        """sweep.json, sweep.csv, sweep.md and sweep.png."""
        return tuple(self.path / name for name in SWEEP_FILES)

    @property
    def jobs(self) -> Path:
        """jobs/: what a launcher keeps (train.py --launcher); the series' lock while it submits."""
        return self.path / JOBS

    @property
    def jobs_record(self) -> Path:
        """jobs/jobs.json: each member's latest job, the submissions and their launcher settings."""
        return self.jobs / JOBS_RECORD

    def local_jobs(self, member: str) -> Path:
        """submitit's folder of a member's local jobs (one per member: a local job is named by its pid, which the
        system reuses); `member` "" is a single run."""
        return self.jobs / "local" / (member or "run")

    @property
    def slurm_jobs(self) -> Path:
        """submitit's folder of the series' SLURM jobs (the arrays, the summary jobs and their logs)."""
        return self.jobs / "slurm"


def is_output_folder(name: str) -> bool:
    """Whether a folder of this name holds a run's outputs, a probe's or a launcher's, never a run of its own."""
    return name in SUBFOLDERS or name == JOBS or name.startswith(PROBE_PREFIX)


def run_candidates(root: Path, skip: Callable[[Path], bool]) -> set[Path]:
    """Folders at or under `root` that hold a run's config.yaml, summary.json or checkpoints/last.pt (`skip`
    leaves some out)."""
    found = {p.parent for name in (CONFIG, SUMMARY) for p in Path(root).rglob(name)}
    found |= {p.parent.parent for p in Path(root).rglob(f"{CHECKPOINTS}/{LAST}")}
    return {folder for folder in found if not skip(folder)}
