"""The local launcher: --jobs members at a time on this machine, each a submitit LocalExecutor job in a session of
its own (its own GPUs, or its share of the cores), started as slots free up, retried after a crash
(launch.retries), and the series summarized at the end (mmpt.experiments.launcher plans and records the launch)."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import submitit
import submitit.local.local
from submitit.helpers import environment_variables

from mmpt.experiments.job_records import attempts, finish, link_log, member_labels, now, relative, submission_entry
from mmpt.experiments.launch_plan import LaunchPlan, cpu_cores
from mmpt.experiments.member_job import Member
from mmpt.experiments.status import CRASH, failure_kind, last_log_line, process_alive, process_start, write_jobs
from mmpt.runs.seriesdir import SeriesDir

MAX_REQUEUES = 100  # times a member may reach its time limit and be requeued (as for SLURM's)
NO_LIMIT_MIN = 365 * 24 * 60  # a local job without --time
POLL_S = 0.5  # how often the local launcher looks at its jobs


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


def launch_local(members, todo, busy, root, plan, record, series, counts, fresh) -> int:
    labels = member_labels(members)
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
    record["submissions"].append(submission_entry(plan, todo))
    failed: list[str] = []
    me = {"pid": os.getpid(), "started": process_start(os.getpid())}
    try:
        while queue or running:
            if record.get("feeder", {}).get("pid") != me["pid"]:
                _write_local(root, record, me, queue)
            while queue and free:
                with _signals_held():  # a job started is a job recorded: no Ctrl-C between the two
                    member, slot = queue.pop(0), free.pop(0)
                    job = _submit_local(
                        member, plan.slots[slot], labels[member.path], root, plan, member.path in fresh, record
                    )
                    _record_local(root, record, me, queue, member, job, slot, plan, running)
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
                    continue
                tried = len(record["members"][path].get("attempts", [])) + 1
                if failure_kind(log) == CRASH and tried <= plan.retries:
                    queue.insert(0, by_path[path])  # next free slot; it continues from last.pt
                    print(
                        f"{labels[path]}: crashed (local job {job.job_id}): {last_log_line(log)}; retrying "
                        f"(attempt {tried + 1} of {plan.retries + 1}, launch.retries {plan.retries})",
                        flush=True,
                    )
                    continue
                failed.append(path)
                print(f"{labels[path]}: failed (local job {job.job_id}): {last_log_line(log)}; log {log}", flush=True)
    except KeyboardInterrupt:
        # the jobs run in sessions of their own (_submit_local): the Ctrl-C reached this process only
        going = [path for path, job in running.items() if job.alive()]
        one = len(going) == 1
        print(
            f"interrupted: the launcher stopped; its {len(going)} running job{'' if one else 's'} "
            f"go{'es' if one else ''} on in the background (python evaluate.py status {root}; stop a job with kill "
            f"-TERM <job id>: it saves last.pt); {len(queue)} member{'s' if len(queue) != 1 else ''} not started: run "
            "the same command again to start " + ("them and summarize" if series else "them"),
            file=sys.stderr,
        )
        return 130
    finally:
        record.pop("feeder", None)
        write_jobs(root, record)
    return finish(root, series, members, failed)


@contextlib.contextmanager
def _signals_held():
    """Defer SIGINT and SIGTERM to the end of the block (what the block starts, it also records). Handlers, not a
    blocked signal mask: a process started in the block would inherit the mask and never hear a stop."""
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in received[:1]:
            signal.raise_signal(signum)


def _record_local(root, record, me, queue, member, job, slot, plan, running) -> None:
    """Record a local job at once (a job the record misses could start twice) and link its log."""
    pid = int(job.job_id)
    running[member.path] = _LocalJob(member.path, job.job_id, slot, pid, process_start(pid), job)
    record["members"][member.path] = {
        **attempts(root, record, member.path),
        "launcher": "local",
        "job_id": job.job_id,
        "pid": pid,
        "started": running[member.path].started,
        "gpus": list(plan.slots[slot]),
        "threads": plan.threads,
        "log": relative(job.paths.stdout, root),
        "submitted": now(),
    }
    _write_local(root, record, me, queue)
    link_log(member.folder, job.paths.stdout)


def _write_local(root: Path, record: dict, me: dict, queue: list[Member]) -> None:
    """Write the job record with this process as the one that starts the members still queued (status shows them)."""
    record["feeder"] = {**me, "pending": [m.path for m in queue]}
    write_jobs(root, record)


class _SessionExecutor(submitit.LocalExecutor):
    """submitit's LocalExecutor, its job controllers started in sessions of their own.

    submitit starts a local job's controller in the launcher's process group, so a Ctrl-C in the terminal reached
    every job twice (directly, and forwarded by its controller, which then kills it a second later): the stop
    checkpoint was lost. In its own session a job hears only the signals sent to it, and goes on when the launcher
    stops, as the launcher says.
    """

    def _submit_command(self, command: str):
        own_session = functools.partial(subprocess.Popen, start_new_session=True)
        with mock.patch.object(submitit.local.local.subprocess, "Popen", own_session):
            return super()._submit_command(command)


def _submit_local(
    member: Member, gpus: tuple[int, ...], label: str, root: Path, plan: LaunchPlan, fresh: bool, record: dict
):
    # one folder per member: submitit names a local job's files by its pid, which the system reuses
    executor = _SessionExecutor(folder=SeriesDir(root).local_jobs(member.path), max_num_timeout=MAX_REQUEUES)
    executor.update_parameters(
        timeout_min=plan.time_min or NO_LIMIT_MIN,
        gpus_per_node=len(gpus),
        visible_gpus=gpus,
        tasks_per_node=max(1, len(gpus)),
        stderr_to_stdout=True,
    )
    threads = str(max(1, plan.threads // max(1, len(gpus))))
    with environment_variables(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads):
        return executor.submit(member.job(label, plan.threads, fresh, record.get("command", "")))
