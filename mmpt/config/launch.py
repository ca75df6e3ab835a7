"""The `launch:` section of the schema: where a series' members train (this process, local jobs or SLURM) and
with what resources; SLURM's time format (`time_minutes`). Declared as every setting is (mmpt.config.settings)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mmpt.config.choices import LAUNCHERS
from mmpt.config.settings import setting

# A job's time limit as SLURM writes it: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes or days-hours:minutes:seconds
SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
TIME_TEXT = "minutes (e.g. 240) or SLURM's [days-]hours:minutes:seconds (e.g. 4:00:00, 1-12:00:00)"


def time_minutes(value: float | str) -> float:
    """A launch.time value in minutes: a number is minutes, text is SLURM's format. ValueError when it is neither."""
    if isinstance(value, (int, float)):
        return float(value)
    match = SLURM_TIME.fullmatch(value.strip())
    if match is None:
        raise ValueError(value)
    days, first, second, third = (int(g) if g is not None else None for g in match.groups())
    if days is None:
        if second is None:  # minutes
            return float(first)
        if third is None:  # minutes:seconds
            return first + second / 60
        return first * 60 + second + third / 60  # hours:minutes:seconds
    return days * 1440 + first * 60 + (second or 0) + (third or 0) / 60  # days-hours[:minutes[:seconds]]


def _time_problem(value: float | str) -> str | None:
    try:
        minutes = time_minutes(value)
    except ValueError:
        return f"must be {TIME_TEXT}, got {value!r}"
    return None if minutes > 0 else f"must be a time limit above 0, got {value!r}"


def _mem_problem(value: str) -> str | None:
    if re.fullmatch(r"[1-9]\d*[KMGT]?", value):
        return None
    return f"must be memory as SLURM writes it, a whole number with K, M, G or T (e.g. 64G), got {value!r}"


@dataclass(frozen=True)
class LaunchConfig:
    """Where a series' members train (mmpt.experiments.launcher): it never changes what a run computes, and a rerun
    of a series may give other resources."""

    launcher: str = setting(
        "sequential",
        "how a series' members train: sequential (one after another in this process), local (jobs in parallel on "
        "this machine) or slurm (a SLURM job array), through submitit",
        choices=LAUNCHERS,
        resume=True,
        result=False,
        flag="--launcher",
    )
    jobs: int | None = setting(
        None,
        "members at a time; null = local: one per GPU group (else 1), slurm: no limit (the array's parallelism)",
        ge=1,
        resume=True,
        result=False,
        flag="--jobs",
    )
    gpus_per_job: int | None = setting(
        None,
        "GPUs per member (several: it trains under torch.distributed, one process per GPU); "
        "null = local: 1 when the machine has GPUs, else 0; slurm: 0",
        ge=0,
        resume=True,
        result=False,
        flag="--gpus-per-job",
    )
    cpus_per_job: int | None = setting(
        None,
        "CPU cores per member (on each node); null = local: the cores divided among --jobs, slurm: the partition's",
        ge=1,
        resume=True,
        result=False,
        flag="--cpus-per-job",
    )
    nodes: int = setting(
        1,
        "SLURM nodes per member (torch.distributed over all their GPUs)",
        ge=1,
        resume=True,
        result=False,
        flag="--nodes",
    )
    time: float | str | None = setting(
        None,
        "time limit per job (a job that reaches it writes last.pt and is requeued); null = local: none, slurm: 4:00:00",
        check=_time_problem,
        allowed=TIME_TEXT,
        resume=True,
        result=False,
        flag="--time",
    )
    retries: int = setting(
        1,
        "resubmissions of a member whose job crashed (a node failure, an out-of-memory kill, an exception without an "
        "error: line), each continuing from last.pt; never one refused by bad input or stopped by a signal. 1: a "
        "cluster's one-off failure costs no rerun by hand, and a crash that repeats costs one attempt more",
        ge=0,
        le=10,
        resume=True,
        result=False,
        flag="--retries",
    )
    partition: str | None = setting(
        None, "SLURM partition; null = the cluster's default", resume=True, result=False, flag="--partition"
    )
    mem: str | None = setting(
        None,
        "SLURM memory per node (e.g. 64G); null = the partition's default",
        check=_mem_problem,
        allowed="memory as SLURM writes it (e.g. 64G, 500M)",
        resume=True,
        result=False,
        flag="--mem",
    )
    slurm_args: str | None = setting(
        None,
        "further sbatch options, e.g. '--qos=high --account=lab' (long options only; "
        "on the command line: --slurm-args='--qos=high')",
        resume=True,
        result=False,
        flag="--slurm-args",
    )
