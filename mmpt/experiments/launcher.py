"""A series' members as jobs through submitit: several at a time on this machine, or one SLURM job array.

    train.py --config C --seeds 0,1,2 --launcher local --jobs 2
    train.py --config C --individual --seeds 0,1,2 --launcher slurm --partition gpu --gpus-per-job 1 --time 4:00:00

Every member is one job that runs `MemberJob` (mmpt.experiments.member_job), which calls the same `train_member`
as a sequential series (skip when finished, continue from last.pt, else start). The settings are checked first
(mmpt.experiments.launch_plan), and series.json is written and checked before anything is submitted
(mmpt.experiments.series.run_series); the jobs, the settings they were submitted with, and submitit's
files go to the series folder's jobs/ (mmpt.experiments.status reads them); each member's folder links its
job's log as job.log.

- local: submitit's LocalExecutor runs each member as its own process group; this process starts --jobs of them,
  starts the next when one ends, and summarizes the series at the end. Each job gets its own GPUs
  (CUDA_VISIBLE_DEVICES) or, on a machine without GPUs, its share of the cores (OMP_NUM_THREADS).
- slurm: one job array (submitit's SlurmExecutor, `executor.batch()`), at most --jobs running at once, and a
  summary job that runs when they have all ended (dependency afterany); this process returns after submitting.
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
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError
from submitit.helpers import environment_variables

from mmpt.errors import MmptError
from mmpt.experiments.launch_plan import LaunchPlan, cpu_cores
from mmpt.experiments.member_job import Member, TrainMember, summarize_series
from mmpt.experiments.series import Variant
from mmpt.experiments.status import (
    FINISHED,
    QUEUED,
    RUNNING,
    SLURM_QUEUED,
    last_log_line,
    member_states,
    process_alive,
    process_start,
    read_jobs,
    slurm_states,
    write_jobs,
)
from mmpt.experiments.summary import summarize
from mmpt.runs.rundir import RunDir
from mmpt.runs.seriesdir import SeriesDir

# times a member may reach its time limit and be requeued; each requeue continues from last.pt, so it progresses
MAX_REQUEUES = 100
NO_LIMIT_MIN = 365 * 24 * 60  # a local job without --time
POLL_S = 0.5  # how often the local launcher looks at its jobs
SUMMARY_TIME_MIN = 30  # the SLURM summary job reads metrics files and draws one plot


# ---------------------------------------------------------------- submitting


def launch_series(
    variants: list[Variant], overwrite: bool, *, root: Path, plan: LaunchPlan, series: bool = True
) -> int:
    """`launch` for the members of a training series (a single run: a series of one member, `series` False)."""
    name = "" if series else variants[0].cfg.name
    return launch([TrainMember(v) for v in variants], overwrite, root=root, plan=plan, series=series, name=name)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _relative(path: Path, root: Path) -> str:
    return os.path.relpath(Path(path).absolute(), Path(root).absolute())


def link_log(member_dir: Path, log: Path) -> None:
    """Point `member_dir`/job.log at the member's current job log (a relative link, replaced atomically)."""
    member_dir.mkdir(parents=True, exist_ok=True)
    link = RunDir(member_dir).job_log
    temp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    temp.unlink(missing_ok=True)
    temp.symlink_to(os.path.relpath(Path(log).absolute(), member_dir.absolute()))
    os.replace(temp, link)


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
) -> int:
    """Submit the `members` that are neither finished nor running nor queued (with `overwrite`: every
    member not running or queued, its earlier outputs removed first) as jobs; return the exit code.

    local: waits for its jobs and summarizes the series (`series`) at the end: 0, or 1 when a member failed;
    130 when interrupted. slurm: returns 0 after submitting the array and the summary job. `name`: the SLURM
    jobs' name (default: the folder's). `record`: entries of the job record that say what the members are (the
    probes' kind and request; mmpt.experiments.status reads them).
    Raises MmptError before submitting anything when a member is busy and `overwrite` asks to train it again,
    or when sbatch refuses the jobs.
    """
    root = Path(root)
    jobs = SeriesDir(root).jobs
    made = [folder for folder in (root, jobs) if not folder.exists()]
    try:
        with series_lock(root, read_jobs(root)):
            return _launch(
                members, overwrite, root=root, plan=plan, series=series, name=name or root.name, extra=record or {}
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
    states = member_states(root, [m.path for m in members], record, finished=_finished(members))
    busy = [states[m.path] for m in members if states[m.path].state in (RUNNING, QUEUED)]
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
    for m in todo if overwrite else ():
        m.clear()
    if plan.launcher == "slurm":
        return _launch_slurm(members, todo, busy, root, plan, record, series, counts, name)
    return _launch_local(members, todo, busy, root, plan, record, series, counts)


def _finished(members: list[Member]) -> Callable[[str], bool]:
    by_path = {m.path: m for m in members}
    return lambda path: by_path[path].finished()


def _labels(members: list[Member]) -> dict[str, str]:
    return {m.path: f"[{i}/{len(members)}] {m.path or m.folder}" for i, m in enumerate(members, 1)}


def _submission(plan: LaunchPlan, todo: list[Member], **extra) -> dict:
    return {
        "at": _now(),
        "launcher": plan.launcher,
        "settings": plan.settings,
        "members": [m.path for m in todo],
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **extra,
    }


def _finish(root: Path, series: bool, members: list[Member], failed: list[str]) -> int:
    """Summarize the series as a sequential one does (when a member has finished); 1 when a member failed."""
    states = member_states(root, [m.path for m in members], finished=_finished(members))
    if series and any(s.state == FINISHED for s in states.values()):
        summarize(root)
    if failed:
        print(
            f"{len(failed)} of {len(members)} members failed: "
            + "; ".join(f"{path or root} (log {states[path].log})" for path in failed)
            + "; fix the cause and run the same command again to train them",
            file=sys.stderr,
        )
        return 1
    return 0


# ---------------------------------------------------------------- local: N jobs at a time on this machine


@dataclass
class _LocalJob:
    path: str
    job_id: str
    slot: int | None
    pid: int
    started: str | None
    job: submitit.LocalJob | None = None  # None: started by an earlier launch

    def alive(self) -> bool:
        # our own child is polled (and reaped) through its Popen; one from an earlier launch by its pid
        return self.job.state == "RUNNING" if self.job is not None else process_alive(self.pid, self.started)


def _launch_local(members, todo, busy, root, plan, record, series, counts) -> int:
    labels = _labels(members)
    by_path = {m.path: m for m in members}
    each = (
        f"{plan.gpus_per_job} GPU{'s' if plan.gpus_per_job > 1 else ''} (CUDA_VISIBLE_DEVICES) and "
        if plan.gpus_per_job
        else ""
    )
    print(
        f"local launcher: {counts}; {plan.jobs} at a time, each on {each}{plan.threads} CPU thread"
        f"{'s' if plan.threads > 1 else ''} (OMP_NUM_THREADS={plan.threads}; {cpu_cores()} cores)"
        + (f", time limit {plan.time_min:g} min" if plan.time_min else "")
    )
    free = list(range(len(plan.slots)))
    running: dict[str, _LocalJob] = {}
    for state in busy:  # started by an earlier launch: they hold their GPUs and count against --jobs
        job = record["members"][state.path]
        slot = next((i for i in free if list(plan.slots[i]) == job.get("gpus")), free[0] if free else None)
        if slot is not None:
            free.remove(slot)
        running[state.path] = _LocalJob(state.path, state.job_id, slot, job["pid"], job.get("started"))
        print(f"{labels[state.path]}: running as local job {state.job_id} (started earlier)")
    queue = list(todo)
    record["submissions"].append(_submission(plan, todo))
    failed: list[str] = []
    me = {"pid": os.getpid(), "started": process_start(os.getpid())}
    try:
        while queue or running:
            if record.get("feeder", {}).get("pid") != me["pid"]:
                _write_local(root, record, me, queue)
            while queue and free:
                member, slot = queue.pop(0), free.pop(0)
                job = _submit_local(member, plan.slots[slot], labels[member.path], root, plan)
                pid = int(job.job_id)
                running[member.path] = _LocalJob(member.path, job.job_id, slot, pid, process_start(pid), job)
                record["members"][member.path] = {
                    "launcher": "local",
                    "job_id": job.job_id,
                    "pid": pid,
                    "started": running[member.path].started,
                    "gpus": list(plan.slots[slot]),
                    "threads": plan.threads,
                    "log": _relative(job.paths.stdout, root),
                    "submitted": _now(),
                }
                _write_local(root, record, me, queue)  # at once: a job the record misses could start twice
                link_log(member.folder, job.paths.stdout)
                where = f" on GPU {','.join(map(str, plan.slots[slot]))}" if plan.slots[slot] else ""
                print(f"{labels[member.path]}: started as local job {job.job_id}{where}", flush=True)
            time.sleep(POLL_S)
            for path, job in list(running.items()):
                if job.alive():
                    continue
                del running[path]
                if job.slot is not None:
                    free.append(job.slot)
                log = root / record["members"][path]["log"]
                if by_path[path].finished():
                    print(f"{labels[path]}: finished (local job {job.job_id})", flush=True)
                else:
                    failed.append(path)
                    print(
                        f"{labels[path]}: failed (local job {job.job_id}): {last_log_line(log)}; log {log}", flush=True
                    )
    except KeyboardInterrupt:
        print(
            "interrupted: jobs that still run go on (python evaluate.py status "
            f"{root}); run the same command again to start the rest" + (" and summarize" if series else ""),
            file=sys.stderr,
        )
        return 130
    finally:
        record.pop("feeder", None)
        write_jobs(root, record)
    return _finish(root, series, members, failed)


def _write_local(root: Path, record: dict, me: dict, queue: list[Member]) -> None:
    """Write the job record with this process as the one that starts the members still queued (status shows them)."""
    record["feeder"] = {**me, "pending": [m.path for m in queue]}
    write_jobs(root, record)


def _submit_local(member: Member, gpus: tuple[int, ...], label: str, root: Path, plan: LaunchPlan):
    # one folder per member: submitit names a local job's files by its pid, which the system reuses
    executor = submitit.LocalExecutor(folder=SeriesDir(root).local_jobs(member.path), max_num_timeout=MAX_REQUEUES)
    executor.update_parameters(
        timeout_min=plan.time_min or NO_LIMIT_MIN,
        gpus_per_node=len(gpus),
        visible_gpus=gpus,
        tasks_per_node=max(1, len(gpus)),
        stderr_to_stdout=True,
    )
    threads = str(max(1, plan.threads // max(1, len(gpus))))
    with environment_variables(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads):
        return executor.submit(member.job(label, plan.threads))


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


def _launch_slurm(members, todo, busy, root, plan, record, series, counts, name) -> int:
    labels = _labels(members)
    folder = SeriesDir(root).slurm_jobs
    params = _slurm_parameters(plan, name)
    gpus = f"{plan.gpus_per_job} GPU{'s' if plan.gpus_per_job > 1 else ''} per node" if plan.gpus_per_job else "no GPU"
    print(
        f"slurm launcher: {counts}; "
        + (f"at most {plan.jobs} at a time; " if plan.jobs else "")
        + f"each job: {plan.nodes} node{'s' if plan.nodes > 1 else ''}, {gpus}, time limit {params['time']} min"
        + (f", partition {plan.partition}" if plan.partition else "")
    )
    submission = _submission(plan, todo)
    if todo:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_REQUEUES)
        executor.update_parameters(**params)
        with _sbatch_errors(f"the job array of {len(todo)} members"), executor.batch():
            # each job on the CPU threads it asked for (--cpus-per-job), not on every core of the node it lands on
            jobs = [executor.submit(m.job(labels[m.path], plan.cpus_per_job)) for m in todo]
        submission["array"] = jobs[0].job_id.split("_")[0]
        for member, job in zip(todo, jobs):
            record["members"][member.path] = {
                "launcher": "slurm",
                "job_id": job.job_id,
                "log": _relative(job.paths.stdout, root),
                "submitted": _now(),
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
