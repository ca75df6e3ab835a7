"""A launcher's settings checked against this machine (local) or cluster (slurm), before anything is written or
submitted: `plan_launch` resolves them into a `LaunchPlan` (each job's GPUs, threads, time limit, sbatch options)
or raises one MmptError line that says what to change. mmpt.experiments.launcher submits the jobs it plans.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
from dataclasses import dataclass

import torch

from mmpt.config.choices import LAUNCHERS
from mmpt.config.launch import LaunchConfig, time_minutes
from mmpt.config.settings import to_dict
from mmpt.errors import MmptError

# the launchers that run members as jobs; sequential is a series' own loop in this process (mmpt.experiments.series)
JOB_LAUNCHERS = ("local", "slurm")
assert LAUNCHERS == ("sequential", *JOB_LAUNCHERS), f"launch.launcher choices {LAUNCHERS} are not those implemented"

# how long before a job's time limit submitit sends the stop signal (its executors' signal_delay_s defaults): a
# job whose limit is not longer than this is stopped as it starts
SIGNAL_MARGIN_S = {"local": 30, "slurm": 90}
# a SLURM job without --time: a limit nearly every GPU partition allows, and short jobs start sooner (backfill)
SLURM_TIME_MIN = 240
# sbatch options the launcher sets itself, and the setting to use instead
OWN_SBATCH_OPTIONS = {
    "array": "--jobs",
    "time": "--time",
    "partition": "--partition",
    "mem": "--mem",
    "nodes": "--nodes",
    "ntasks-per-node": "--gpus-per-job",
    "gpus-per-node": "--gpus-per-job",
    "cpus-per-task": "--cpus-per-job",
    "output": None,
    "error": None,
    "job-name": None,
    "signal": None,
    "open-mode": None,
    "dependency": None,
    "wrap": None,
    "no-requeue": None,
}


@dataclass(frozen=True)
class LaunchPlan:
    """The resolved launcher settings (mmpt.config.LaunchConfig) for this machine or cluster."""

    launcher: str
    jobs: int | None  # members at a time (slurm: None = no limit)
    gpus_per_job: int
    slots: tuple[tuple[int, ...], ...]  # local: each job slot's GPUs (physical ids; () on CPU)
    threads: int | None  # local: CPU threads per job
    cpus_per_job: int | None
    nodes: int
    time_min: float | None
    partition: str | None
    mem: str | None
    sbatch_options: dict
    settings: dict  # the launch section as given, for the record
    retries: int = 0  # resubmissions of a member whose job crashed (launch.retries)


def parse_slurm_args(text: str) -> dict[str, str | bool]:
    """`--qos=high --account lab --exclusive` -> {"qos": "high", "account": "lab", "exclusive": True}.

    Raises MmptError for text that is not long sbatch options, an option given twice, or one the launcher sets
    from its own settings (--time, --partition, ...).
    """
    try:
        items = shlex.split(text)
    except ValueError as exc:
        raise MmptError(f"--slurm-args {text!r} cannot be read ({exc}); quote values that hold spaces") from None
    options: dict[str, str | bool] = {}
    i = 0
    while i < len(items):
        match = re.fullmatch(r"--([a-z][a-z0-9-]*)(?:=(.+))?", items[i], re.DOTALL)
        if match is None:
            raise MmptError(
                f"--slurm-args: {items[i]!r} is not a long sbatch option; give options as --name=value "
                "(e.g. --slurm-args='--qos=high --account=lab')"
            )
        key, value = match.group(1), match.group(2)
        if value is None and i + 1 < len(items) and not items[i + 1].startswith("-"):
            value, i = items[i + 1], i + 1
        if key in OWN_SBATCH_OPTIONS:
            instead = OWN_SBATCH_OPTIONS[key]
            raise MmptError(
                f"--slurm-args sets --{key}, which the launcher sets "
                + (f"from {instead}: pass it there" if instead else "itself: leave it out")
            )
        if key in options:
            raise MmptError(f"--slurm-args gives --{key} twice; give it once")
        if value is not None and "\n" in value:
            raise MmptError(f"--slurm-args: the value of --{key} holds a line break; give it on one line")
        options[key] = True if value is None else value
        i += 1
    return options


def visible_gpus() -> list[int]:
    """This machine's GPUs as the indices CUDA_VISIBLE_DEVICES uses (all of them when it is unset)."""
    count = torch.cuda.device_count()
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return list(range(count))
    ids = [item.strip() for item in mask.split(",") if item.strip()][:count]
    if not all(item.isdigit() for item in ids):
        raise MmptError(
            f"CUDA_VISIBLE_DEVICES={mask} names GPUs, and the local launcher hands each job GPU indices; "
            "set it to indices (e.g. 0,1,2,3) or unset it"
        )
    return [int(item) for item in ids]


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plan_launch(launch: LaunchConfig, members: int, checkpoint_minutes: float | None = None) -> LaunchPlan:
    """Check the launch settings against this machine (local) or cluster (slurm), before anything is written or
    submitted; raises MmptError with one line that says what to change. `checkpoint_minutes`: how often a member
    writes last.pt (checkpoint.every_minutes; None for jobs that write none, such as probes)."""
    assert launch.launcher in JOB_LAUNCHERS, f"no launcher to plan for {launch.launcher!r}"
    time_min = time_minutes(launch.time) if launch.time is not None else None
    if time_min is None and launch.launcher == "slurm":
        time_min = SLURM_TIME_MIN
    every = checkpoint_minutes or 0.0
    margin = SIGNAL_MARGIN_S[launch.launcher] / 60
    if time_min is not None and time_min <= margin + every:
        interval = f" plus one checkpoint interval (checkpoint.every_minutes {every:g})" if every else ""
        raise MmptError(
            f"the time limit per job ({time_min:g} min) is not longer than the {launch.launcher} launcher's stop "
            f"signal margin ({SIGNAL_MARGIN_S[launch.launcher]} s before the limit){interval}: a job would be "
            f"stopped before it trained or wrote last.pt; pass --time {math.ceil(2 * (margin + every)) + 1} or "
            "longer" + (f", or --set checkpoint.every_minutes={max(1, math.floor(time_min / 2))}" if every else "")
        )
    common = dict(
        launcher=launch.launcher,
        cpus_per_job=launch.cpus_per_job,
        nodes=launch.nodes,
        time_min=time_min,
        partition=launch.partition,
        mem=launch.mem,
        settings=to_dict(launch),
        retries=launch.retries,
    )
    if launch.launcher == "slurm":
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            raise MmptError(
                f"--launcher slurm needs SLURM's {' and '.join(missing)} on PATH, and none is here; run the "
                "command on the cluster's login node, or use --launcher local"
            )
        options = parse_slurm_args(launch.slurm_args) if launch.slurm_args else {}
        return LaunchPlan(
            jobs=launch.jobs,
            gpus_per_job=launch.gpus_per_job or 0,
            slots=(),
            threads=None,
            sbatch_options=options,
            **common,
        )
    for flag, value, default in (
        ("--partition", launch.partition, None),
        ("--mem", launch.mem, None),
        ("--slurm-args", launch.slurm_args, None),
        ("--nodes", launch.nodes, 1),
    ):
        if value != default:
            raise MmptError(f"{flag} is a SLURM setting, and --launcher local runs on this machine; drop {flag}")
    gpus = visible_gpus()
    per_job = launch.gpus_per_job
    if per_job and not gpus:
        raise MmptError(
            f"--gpus-per-job {per_job} asks for GPUs, and this machine has none visible; drop --gpus-per-job to "
            "train the members on the CPU cores"
        )
    per_job = (1 if gpus else 0) if per_job is None else per_job
    if per_job:
        groups = [tuple(gpus[i : i + per_job]) for i in range(0, len(gpus) - per_job + 1, per_job)]
        if not groups:
            raise MmptError(f"--gpus-per-job {per_job} asks for more GPUs than the {len(gpus)} visible here")
        jobs = launch.jobs or len(groups)
        if jobs > len(groups):
            raise MmptError(
                f"--jobs {jobs} with --gpus-per-job {per_job} needs {jobs * per_job} GPUs, and {len(gpus)} are "
                f"visible; pass --jobs {len(groups)} or fewer"
            )
        slots = tuple(groups[:jobs])
    else:
        jobs = launch.jobs or 1
        slots = ((),) * jobs
    jobs = min(jobs, max(members, 1))
    threads = launch.cpus_per_job or max(1, cpu_cores() // jobs)
    return LaunchPlan(jobs=jobs, gpus_per_job=per_job, slots=slots[:jobs], threads=threads, sbatch_options={}, **common)
