"""A series' members as jobs through submitit: several at a time on this machine, or one SLURM job array.

    train.py --config C --seeds 0,1,2 --launcher local --jobs 2
    train.py --config C --individual --seeds 0,1,2 --launcher slurm --partition gpu --gpus-per-job 1 --time 4:00:00

Every member is one job that runs `MemberJob` (mmpt.experiments.member_job), which calls the same `train_member`
as a sequential series (skip when finished, continue from last.pt, else start). The settings are checked first
(mmpt.experiments.launch_plan), and series.json is written and checked before anything is submitted
(mmpt.experiments.series.run_series); the jobs, the settings they were submitted with, and submitit's
files go to the series folder's jobs/ (mmpt.experiments.status reads them); each member's folder links its
job's log as job.log.

- local (mmpt.experiments.local_jobs): submitit's LocalExecutor runs each member in a session of its own (a
  Ctrl-C stops this process, not the jobs); this process starts --jobs of them, starts the next when one ends,
  starts a crashed one again (launch.retries), and summarizes the series at the end. Each job gets its own GPUs
  (CUDA_VISIBLE_DEVICES) or, on a machine without GPUs, its share of the cores (OMP_NUM_THREADS).
- slurm: one job array (submitit's SlurmExecutor, `executor.batch()`), at most --jobs running at once, and a
  summary job that runs when they have all ended (dependency afterany): it resubmits the members whose jobs
  crashed (launch.retries), else summarizes; this process returns after submitting.
- --overwrite: each job removes its member's earlier outputs when it starts, so a launch the scheduler refuses
  removes nothing.
- Several GPUs per member (or several nodes): one process per GPU under torch.distributed, from the job's
  environment (submitit's TorchDistributedEnvironment); the engine's distributed code is the same as under torchrun.
- Time limit or preemption: SLURM (and submitit's local controller) send SIGUSR2; training stops after the step,
  writes last.pt (mmpt.runtime.process.StopSignal), and hands the signal back to submitit, which asks
  `MemberJob.checkpoint` for the job to run next (the same member, which resumes from last.pt) and requeues it.
- A rerun of the same command submits only members that are neither finished nor running nor queued; a job that
  fails leaves its member unfinished (its log says why) and the others go on.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import math
import os
import shutil
import sys
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError

from mmpt.config import load_config, recorded_config
from mmpt.errors import MmptError
from mmpt.experiments.job_records import attempts, finished_by, link_log, member_labels, now, relative, submission_entry
from mmpt.experiments.launch_plan import LaunchPlan, plan_launch
from mmpt.experiments.local_jobs import launch_local
from mmpt.experiments.member_job import Member, TrainMember
from mmpt.experiments.series import Variant
from mmpt.experiments.status import (
    CRASH,
    FAILED,
    FINISHED,
    QUEUED,
    RUNNING,
    SLURM_QUEUED,
    failure_kind,
    member_states,
    process_alive,
    read_jobs,
    slurm_states,
    write_jobs,
)
from mmpt.experiments.summary import summarize
from mmpt.runs.members import read_series
from mmpt.runs.rundir import RunDir
from mmpt.runs.seriesdir import SeriesDir

# times a member may reach its time limit and be requeued; each requeue continues from last.pt, so it progresses
MAX_REQUEUES = 100
SUMMARY_TIME_MIN = 30  # the SLURM summary job reads metrics files and draws one plot


# ---------------------------------------------------------------- submitting


def launch_series(
    variants: list[Variant], overwrite: bool, *, root: Path, plan: LaunchPlan, series: bool = True, command: str = ""
) -> int:
    """`launch` for the members of a training series (a single run: a series of one member, `series` False)."""
    name = "" if series else variants[0].cfg.name
    members = [TrainMember(v) for v in variants]
    return launch(members, overwrite, root=root, plan=plan, series=series, name=name, command=command)


@contextlib.contextmanager
def series_lock(root: Path, record: dict):
    """Hold the series' jobs/ folder for this process, so that two launches never submit the same member."""
    folder = SeriesDir(root).jobs
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            feeder = record.get("feeder") or {}
            by = f" (process {feeder['pid']})" if process_alive(feeder.get("pid"), feeder.get("started")) else ""
            raise MmptError(
                f"the series in {root} is being launched by another train.py{by}, which starts its remaining "
                f"members itself; watch it with: python evaluate.py status {root}"
            ) from None
        yield
    finally:
        os.close(fd)


def launch(
    members: list[Member],
    overwrite: bool,
    *,
    root: Path,
    plan: LaunchPlan,
    series: bool = True,
    name: str = "",
    record: dict | None = None,
    command: str = "",
) -> int:
    """Submit the `members` that are neither finished nor running nor queued (with `overwrite`: every
    member not running or queued, its earlier outputs removed first) as jobs; return the exit code.

    local: waits for its jobs and summarizes the series (`series`) at the end: 0, or 1 when a member failed;
    130 when interrupted. slurm: returns 0 after submitting the array and the summary job. `name`: the SLURM
    jobs' name (default: the folder's). `record`: entries of the job record that say what the members are (the
    probes' kind and request; mmpt.experiments.status reads them). `command`: the command that continues the
    members (the launch's own, without --overwrite), which a stopped member's job names.
    Raises MmptError before submitting anything when a member is busy and `overwrite` asks to train it again,
    or when sbatch refuses the jobs.
    """
    root = Path(root)
    jobs = SeriesDir(root).jobs
    made = [folder for folder in (root, jobs) if not folder.exists()]
    try:
        with series_lock(root, read_jobs(root)):
            return _launch(
                members,
                overwrite,
                root=root,
                plan=plan,
                series=series,
                name=name or root.name,
                extra=(record or {}) | ({"command": command} if command else {}),
            )
    except MmptError:
        # refused before any job was recorded (a busy member, a launch in progress, sbatch's refusal): leave none
        # of the folders this launch made behind (submitit's files of the refused jobs included)
        if jobs in made and jobs.is_dir() and not SeriesDir(root).jobs_record.exists():
            shutil.rmtree(jobs)
        if root in made and root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        raise


def _launch(
    members: list[Member], overwrite: bool, *, root: Path, plan: LaunchPlan, series: bool, name: str, extra: dict
) -> int:
    record = read_jobs(root) | extra
    states = member_states(root, [m.path for m in members], record, finished=finished_by(members))
    busy = [states[m.path] for m in members if states[m.path].state in (RUNNING, QUEUED)]
    foreign = next((b for b in busy if b.launcher != plan.launcher), None)
    if foreign is not None:
        # a launcher waits for and counts only its own jobs: local cannot poll a SLURM job, nor SLURM's summary job
        # wait on a local process; a member trained by a process no record names cannot be waited for at all
        by = f"as a {foreign.launcher} job ({foreign.job_id})" if foreign.launcher else "by another process"
        again = f"run the command with --launcher {foreign.launcher}" if foreign.launcher else "wait for it"
        raise MmptError(
            f"{foreign.path or root} is {foreign.state} {by}, and this launch uses --launcher {plan.launcher}; "
            f"{again}, or wait until it has ended, so that one launcher keeps every running member"
        )
    if overwrite and busy:
        first = busy[0]
        cancel = f"scancel {first.job_id}" if first.launcher == "slurm" else f"kill {first.job_id}"
        raise MmptError(
            f"{first.path or root} is {first.state} as job {first.job_id}, and --overwrite would train it a "
            f"second time at once; wait for it, or stop it ({cancel}), then run the command again"
        )
    finished = {m.path for m in members if states[m.path].state == FINISHED}
    todo = [
        m for m in members if states[m.path].state not in (RUNNING, QUEUED) and (overwrite or m.path not in finished)
    ]
    counts = f"{len(members)} member{'s' if len(members) > 1 else ''}: " + ", ".join(
        [
            f"{0 if overwrite else len(finished)} finished",
            f"{len(busy)} running or queued",
            f"{len(todo)} to {'submit' if plan.launcher == 'slurm' else 'start'}",
        ]
    )
    # --overwrite: each job removes its member's earlier outputs when it starts, never this process before the
    # scheduler has accepted it (a refused sbatch leaves every finished member as it was)
    fresh = {m.path for m in todo} if overwrite else set()
    if plan.launcher == "slurm":
        return _launch_slurm(members, todo, busy, root, plan, record, series, counts, name, fresh)
    return launch_local(members, todo, busy, root, plan, record, series, counts, fresh)


# ---------------------------------------------------------------- slurm: one job array and a summary job


def _slurm_parameters(plan: LaunchPlan, name: str) -> dict:
    tasks = max(1, plan.gpus_per_job)
    params = dict(
        job_name=name,
        time=math.ceil(plan.time_min),
        nodes=plan.nodes,
        ntasks_per_node=tasks,
        stderr_to_stdout=True,
    )
    optional = dict(
        gpus_per_node=plan.gpus_per_job or None,
        cpus_per_task=max(1, plan.cpus_per_job // tasks) if plan.cpus_per_job else None,
        partition=plan.partition,
        mem=plan.mem,
        array_parallelism=plan.jobs,
        additional_parameters=plan.sbatch_options or None,
    )
    return params | {key: value for key, value in optional.items() if value is not None}


@contextlib.contextmanager
def _sbatch_errors(what: str):
    """Turn a refused sbatch into one MmptError line (submitit prints sbatch's error itself: it is captured)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except (FailedJobError, FailedSubmissionError, OSError) as exc:
        text = (str(exc).strip() or captured.getvalue().strip() or type(exc).__name__).splitlines()[0]
        raise MmptError(
            f"sbatch refused {what} ({text}); check --partition, --time, --mem, --gpus-per-job and --slurm-args"
        ) from None


def _launch_slurm(members, todo, busy, root, plan, record, series, counts, name, fresh) -> int:
    labels = member_labels(members)
    folder = SeriesDir(root).slurm_jobs
    params = _slurm_parameters(plan, name)
    gpus = f"{plan.gpus_per_job} GPU{'s' if plan.gpus_per_job > 1 else ''} per node" if plan.gpus_per_job else "no GPU"
    print(
        f"slurm launcher: {counts}; "
        + (f"at most {plan.jobs} at a time; " if plan.jobs else "")
        + f"each job: {plan.nodes} node{'s' if plan.nodes > 1 else ''}, {gpus}, time limit {params['time']} min"
        + (f", partition {plan.partition}" if plan.partition else "")
    )
    submission = submission_entry(plan, todo)
    if todo:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_REQUEUES)
        executor.update_parameters(**params)
        with _sbatch_errors(f"the job array of {len(todo)} members"), executor.batch():
            # each job on the CPU threads it asked for (--cpus-per-job), not on every core of the node it lands on
            command = record.get("command", "")
            jobs = [executor.submit(m.job(labels[m.path], plan.cpus_per_job, m.path in fresh, command)) for m in todo]
        submission["array"] = jobs[0].job_id.split("_")[0]
        for member, job in zip(todo, jobs):
            record["members"][member.path] = {
                **attempts(root, record, member.path),
                "launcher": "slurm",
                "job_id": job.job_id,
                "log": relative(job.paths.stdout, root),
                "submitted": now(),
            }
        record["submissions"].append(submission)
        write_jobs(root, record)  # at once: a job the record misses could be submitted twice
        for member, job in zip(todo, jobs):
            link_log(member.folder, job.paths.stdout)
        print(
            f"submitted job array {submission['array']}: {len(jobs)} job{'s' if len(jobs) > 1 else ''}; "
            f"each member's {RunDir(root).job_log.name} links its log"
        )
    # the summary waits for every job of the series folder (another command's members too: mm-PT and individual)
    others = [path for path in record["members"] if path not in {m.path for m in members}]
    busy = busy + [s for s in member_states(root, others, record).values() if s.state in (RUNNING, QUEUED)]
    waits = sorted({job_id.split("_")[0] for job_id in [s.job_id for s in busy] + [submission.get("array")] if job_id})
    if not waits:
        print("every member is finished")
        if series:
            summarize(root)
        return 0
    if series:
        previous = record.get("summary_job")
        if previous and slurm_states(folder, [previous]).get(previous) in SLURM_QUEUED:
            submitit.SlurmJob(folder=folder, job_id=previous).cancel(check=False)  # the new one waits for all
        summary = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
        summary.update_parameters(
            **{k: v for k, v in params.items() if k in ("partition", "additional_parameters")},
            job_name=f"{name}-summary",
            time=SUMMARY_TIME_MIN,
            nodes=1,
            ntasks_per_node=1,
            cpus_per_task=1,
            stderr_to_stdout=True,
            dependency="afterany:" + ":".join(waits),
        )
        with _sbatch_errors("the summary job"):
            job = summary.submit(summarize_series, str(root))
        record["summary_job"] = submission["summary_job"] = job.job_id
        print(f"summary job {job.job_id} writes sweep.md when they have ended (afterany:{':'.join(waits)})")
        if not todo:
            record["submissions"].append(submission)
        write_jobs(root, record)
    print(f"watch them with: python evaluate.py status {root}")
    return 0


# ---------------------------------------------------------------- retries after the SLURM array (the summary job)


def retry_crashed(root: Path) -> bool:
    """Resubmit the members of a SLURM-launched series whose jobs crashed, within launch.retries (the summary job
    runs this when the array has ended; a new summary job then waits for the resubmitted ones). Returns whether
    any was resubmitted."""
    record = read_jobs(root)
    settings = (record.get("submissions") or [{}])[-1].get("settings") or {}
    retries = int(settings.get("retries") or 0)
    recorded = read_series(root)
    if settings.get("launcher") != "slurm" or not retries or recorded is None:
        return False
    variants = [Variant(path, recorded_config(config)) for path, config in recorded["members"].items()]
    states = member_states(root, [v.path for v in variants], record)
    crashed = [
        v
        for v in variants
        if states[v.path].state == FAILED
        and failure_kind(states[v.path].log) == CRASH
        and len(record["members"].get(v.path, {}).get("attempts", [])) < retries
    ]
    if not crashed:
        return False
    launch_settings = load_config(overrides=[{"launch": settings}]).launch
    plan = plan_launch(launch_settings, len(crashed), crashed[0].cfg.checkpoint.every_minutes)
    print(f"{len(crashed)} member(s) crashed: submitting them again (launch.retries {retries})", flush=True)
    members = [TrainMember(v) for v in crashed]
    launch(members, False, root=root, plan=plan, series=True, command=record.get("command", ""))
    return True


def summarize_series(root: str) -> None:
    """The SLURM summary job: resubmit the members whose jobs crashed (launch.retries; a new summary job follows
    them), else summarize the series (as a sequential series does at its end)."""
    try:
        if not retry_crashed(Path(root)):
            summarize(Path(root))
    except MmptError as exc:
        print(f"error: {exc}", file=sys.stderr)
