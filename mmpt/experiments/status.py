"""Where a series' members stand, from the job records a launcher keeps and from the scheduler.

Each member is finished (summary.json), running, queued, failed (its job ended without summary.json: the log
names why) or not started. The records live in the series folder (`jobs/jobs.json`, written by
mmpt.experiments.launcher; submitit's own files beside it in `jobs/`), each member's folder links its job's log
as `job.log`. A local job is running while its submitit controller process lives (its pid and start time are
recorded, so a reused pid does not count); a SLURM job's state comes from sacct through submitit's watcher,
and from squeue for a job sacct does not know (yet).

    python evaluate.py status runs/<series>
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import submitit

from mmpt.errors import MmptError
from mmpt.io import read_json, write_json
from mmpt.runs.members import member_status, probe_stale, read_series, series_of
from mmpt.runs.rundir import Results, RunDir, in_use
from mmpt.runs.seriesdir import SeriesDir

FINISHED, RUNNING, QUEUED, FAILED, NOT_STARTED = "finished", "running", "queued", "failed", "not started"
INTERRUPTED = "interrupted"  # stopped with last.pt written (a signal, Ctrl-C): the same command continues it
TRAIN, PROBE = "train", "probe"  # what a job record's members do (its "kind"; train when it names none)
UNKNOWN = "unknown"  # a SLURM job, where SLURM cannot be asked (the status command only)
STATES = (FINISHED, RUNNING, QUEUED, INTERRUPTED, FAILED, NOT_STARTED, UNKNOWN)
LAUNCHERS = ("local", "slurm")  # what a job record's entries may name

# SLURM job states (sacct/squeue) a member waits in, and those it trains in; every other state has ended. submitit
# (1.5.3 and later) counts PREEMPTED as not done: SLURM requeues a preempted job, so its member is still running
SLURM_QUEUED = frozenset(
    {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED", "RESV_DEL_HOLD", "READY"}
)
SLURM_RUNNING = frozenset({"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "PREEMPTED"})
# why a job ended without finishing its member (failure_kind): bad input (its `error:` line; never retried), a stop
# signal (the member saved last.pt; the same command continues it), or a crash (a node failure, an out-of-memory
# kill, an exception without an `error:` line: launch.retries resubmits it)
INPUT, STOPPED, CRASH, COMPLETED = "input", "stopped", "crash", "completed"
STOP_LINE = "stopped by "  # what a member's job prints when a signal stopped it (mmpt.experiments.member_job)
COMPLETED_LINE = "Job completed successfully"  # what submitit logs when a job's function returned


@dataclass(frozen=True)
class MemberState:
    """One member: its state, its latest job, a detail for the status table, and its job's log."""

    path: str
    state: str
    job_id: str | None = None
    launcher: str | None = None
    detail: str = ""
    log: Path | None = None


# ---------------------------------------------------------------- job records


def read_jobs(root: Path) -> dict:
    """The job records of a series folder: {"members": {path: job}, "submissions": [...], "feeder": ...}.
    Raises MmptError, naming the entry, when the record or one of its entries is not what a launcher writes."""
    path = SeriesDir(root).jobs_record
    if not path.is_file():
        return {"members": {}, "submissions": []}
    record = read_json(path, "it records the jobs a launcher submitted; restore it, or delete it to submit again")
    if not isinstance(record, dict) or not isinstance(record.get("members"), dict):
        raise MmptError(f"{path} is not a job record written by train.py's launcher; restore it, or delete it")
    for member, job in record["members"].items():
        problem = _entry_problem(job)
        if problem:
            raise MmptError(
                f"{path}: the entry of member {member or '.'} {problem}; restore the record, or delete that entry "
                "(the member is then submitted again when it is not finished)"
            )
    record.setdefault("submissions", [])
    return record


def _entry_problem(job) -> str | None:
    """What is wrong with one member's job record entry, or None."""
    if not isinstance(job, dict):
        return "is not a mapping"
    if job.get("launcher") not in LAUNCHERS:
        return f"names the launcher {job.get('launcher')!r}, not one of {', '.join(LAUNCHERS)}"
    if not isinstance(job.get("job_id"), str) or not job["job_id"]:
        return "has no job id"
    if job["launcher"] == "local" and not isinstance(job.get("pid"), int):
        return "has no process id"
    return None


def write_jobs(root: Path, record: dict) -> None:
    write_json(SeriesDir(root).jobs_record, record)


# ---------------------------------------------------------------- local jobs: processes


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (/proc/<pid>/stat), or None when it is gone.

    With the pid it names one process for good: a pid the system hands out again starts at another time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3, starttime field 22
    return None if fields[0] in ("Z", "X") else fields[19]


def process_alive(pid: int | None, start: str | None) -> bool:
    """Whether the process recorded as (`pid`, `start`) still runs (a zombie does not)."""
    if pid is None:
        return False
    if not Path("/proc").is_dir():  # no /proc (macOS): the pid alone
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return start is not None and process_start(pid) == start


# ---------------------------------------------------------------- SLURM jobs: sacct and squeue


def slurm_states(folder: Path, job_ids: list[str]) -> dict[str, str]:
    """Each SLURM job's state (PENDING, RUNNING, COMPLETED, FAILED, ...; GONE: neither sacct nor squeue knows it).

    sacct answers through submitit's SlurmJob watcher (one call for all jobs); a job it does not know yet (sacct
    lags behind a submission, and some clusters keep no accounting) is looked up with squeue. Raises MmptError
    when neither can be asked, so that nothing is submitted twice on a guess.
    """
    if not job_ids:
        return {}
    jobs = [submitit.SlurmJob(folder=folder, job_id=job_id) for job_id in job_ids]
    quiet = logging.getLogger("submitit")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a failing sacct is answered below (squeue), not with submitit's warning
    try:
        submitit.SlurmJob.watcher.update()
    finally:
        quiet.setLevel(level)
    states = {job.job_id: job.watcher.get_state(job.job_id, mode="cache").split()[0] for job in jobs}
    unknown = [job_id for job_id, state in states.items() if state == "UNKNOWN"]
    if unknown:
        queue = squeue_states()
        for job_id in unknown:
            states[job_id] = queue.get(job_id, "GONE")
    return states


def squeue_states() -> dict[str, str]:
    """State of every job of this user that SLURM holds (one per array task). Raises MmptError when squeue fails."""
    try:
        out = subprocess.run(
            ["squeue", "--noheader", "--array", "--format=%i|%T", f"--user={getpass.getuser()}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise MmptError(f"cannot ask SLURM about the jobs (squeue: {exc}); try again on a node with squeue") from None
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or ["no output"])[0]
        raise MmptError(f"cannot ask SLURM about the jobs (squeue: {reason}); try again when SLURM answers")
    states = {}
    for line in out.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id:
            states[job_id] = state.strip()
    return states


# ---------------------------------------------------------------- members


def _log_tail(log: Path | None) -> list[str]:
    """The non-empty lines of the last 64 KiB of a job's log ([] without one)."""
    if log is None or not log.is_file():
        return []
    with log.open("rb") as f:
        f.seek(max(0, log.stat().st_size - 65536))
        return [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]


def last_log_line(log: Path | None) -> str:
    """The line that says why a job ended: the last `error:` line of its log, else its last stop line (a signal
    stopped it), else its last line ("" without one)."""
    lines = _log_tail(log)
    errors = [line for line in lines if line.startswith("error:")]
    stops = [line for line in lines if STOP_LINE in line]
    return (errors or stops or lines or [""])[-1]


def failure_kind(log: Path | None) -> str:
    """How a job ended, from its log's last telling line: COMPLETED (submitit's own line), INPUT (an `error:`
    line), STOPPED (a stop signal, last.pt written), else CRASH (killed, or an exception without an `error:`)."""
    for line in reversed(_log_tail(log)):
        if line.startswith("error:"):
            return INPUT
        if STOP_LINE in line:
            return STOPPED
        if COMPLETED_LINE in line:
            return COMPLETED
    return CRASH


def _age(path: Path) -> str:
    minutes = (time.time() - path.stat().st_mtime) / 60
    return f"{minutes:.0f} min ago" if minutes < 120 else f"{minutes / 60:.1f} h ago"


def probe_finished(results: Results, request: dict | None, weights: str | None = None) -> bool:
    """Whether `results` hold a probe with exactly this request (method, k, datasets, ...; None: any) and, where
    `weights` is given, of exactly these weights (the probed run's best_digest, or an export's digest)."""
    try:
        written = json.loads(results.probe_record.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(written, dict) or not results.metrics.is_file():
        return False
    return (request is None or written.get("request") == request) and (
        weights is None or written.get("weights") == weights
    )


def _finished_by_record(root: Path, record: dict) -> Callable[[str], bool]:
    """What finished means for the members of a job record: summary.json for training (a series, or a run),
    a probe.json of the record's request for a series' probes (`evaluate.py probe --launcher`)."""
    if record.get("kind") == PROBE:
        # and still of the weights the probed run has: a probe of a run trained again since is stale
        return lambda path: (
            probe_finished(Results(root / path), record.get("request")) and (probe_stale(Results(root / path)) is None)
        )
    return lambda path: RunDir(root / path).summary.is_file()


def member_states(
    root: Path,
    paths: list[str],
    record: dict | None = None,
    *,
    strict: bool = True,
    finished: Callable[[str], bool] | None = None,
) -> dict[str, MemberState]:
    """The state of each member (`paths` relative to the series folder `root`; "" for a single run).

    `finished(path)`: whether a member's outputs are complete (default: as its job record's kind says).
    Raises MmptError when SLURM cannot be asked about a member's job; with `strict` off, such a member is UNKNOWN.
    """
    root = Path(root)
    record = read_jobs(root) if record is None else record
    finished = finished or _finished_by_record(root, record)
    training = record.get("kind", TRAIN) == TRAIN
    jobs = {path: record["members"].get(path) for path in paths}
    slurm_ids = [job["job_id"] for job in jobs.values() if job and job.get("launcher") == "slurm"]
    try:
        slurm = slurm_states(SeriesDir(root).slurm_jobs, slurm_ids)
    except MmptError as exc:
        if strict:
            raise
        slurm = dict.fromkeys(slurm_ids, f"{UNKNOWN}: {exc}")
    feeder = record.get("feeder") or {}
    waiting = set(feeder.get("pending", [])) if process_alive(feeder.get("pid"), feeder.get("started")) else set()
    out = {}
    for path in paths:
        folder = RunDir(root / path)
        job = jobs[path]
        log = root / job["log"] if job and job.get("log") else None
        if log is not None and folder.job_log.is_symlink():
            log = folder.job_log  # the member's own link to it
        common = dict(job_id=job["job_id"] if job else None, launcher=job["launcher"] if job else None, log=log)
        attempts = _attempts(job)
        # a live job first: one submitted with --overwrite starts the member over, whatever it holds now
        alive, scheduler = _job_alive(job, slurm)
        if alive == UNKNOWN:
            out[path] = MemberState(path, UNKNOWN, detail=scheduler, **common)
            continue
        last = folder.last
        saved = f"last.pt written {_age(last)}" if last.is_file() else ""
        if alive:
            state = QUEUED if alive == QUEUED else RUNNING
            over = "to start over (--overwrite)" if job.get("fresh") else ""
            shown = scheduler if state == QUEUED or scheduler not in ("", "SLURM RUNNING") else ""  # e.g. PREEMPTED
            detail = "; ".join(filter(None, [shown, over, attempts, saved]))
            out[path] = MemberState(path, state, detail=detail, **common)
            continue
        if finished(path):
            detail = ""
            if training:  # a probe has no summary.json to read
                why = member_status(folder.path)
                detail = f"left out of statistics: {why}" if why else _took(folder)
            out[path] = MemberState(path, FINISHED, detail=detail, **common)
            continue
        if path in waiting:
            out[path] = MemberState(path, QUEUED, detail=saved or "waiting for a free slot", **common)
            continue
        if training and in_use(folder.path):  # trained by a process no record names (a sequential series)
            out[path] = MemberState(path, RUNNING, detail="; ".join(filter(None, ["in this folder's lock", saved])))
            continue
        if job is None:
            state = INTERRUPTED if last.is_file() else NOT_STARTED
            out[path] = MemberState(path, state, detail=saved)
            continue
        kind = failure_kind(log)
        if kind == STOPPED and last.is_file():
            detail = "; ".join(filter(None, [scheduler, saved, "the same command continues it"]))
            out[path] = MemberState(path, INTERRUPTED, detail=detail, **common)
            continue
        why = last_log_line(log)
        detail = "; ".join(filter(None, [scheduler, attempts, saved, f"log {log}: {why}" if why else f"log {log}"]))
        out[path] = MemberState(path, FAILED, detail=detail, **common)
    return out


def _attempts(job: dict | None) -> str:
    """ "attempt k" of a job resubmitted after a crash (launch.retries), else ""."""
    earlier = (job or {}).get("attempts") or []
    return f"attempt {len(earlier) + 1} (after {', '.join(a['job_id'] for a in earlier)})" if earlier else ""


def _job_alive(job: dict | None, slurm: dict[str, str]) -> tuple[bool | str, str]:
    """(False, RUNNING, QUEUED or UNKNOWN; what the scheduler says) of a member's latest job."""
    if job is None:
        return False, ""
    if job["launcher"] == "local":
        alive = process_alive(job.get("pid"), job.get("started"))
        return (RUNNING if alive else False), ("" if alive else "local job ended")
    state = slurm[job["job_id"]]
    if state.startswith(UNKNOWN):
        return UNKNOWN, state.partition(": ")[2]
    alive = QUEUED if state in SLURM_QUEUED else RUNNING if state in SLURM_RUNNING else False
    return alive, f"SLURM {state}"


def _took(folder: RunDir) -> str:
    """How long a finished member's last session trained, and on what, e.g. "12.5 min on cuda x 2"."""
    try:
        summary = json.loads(folder.summary.read_text())
        device = json.loads(folder.env.read_text()).get("device", "?")
    except (OSError, ValueError):
        return ""
    world = int(summary.get("world_size") or 1)
    return f"{float(summary.get('wall_time_s') or 0) / 60:.1f} min on {device}" + (f" x {world}" if world > 1 else "")


def member_hours(folder: RunDir) -> tuple[float, float]:
    """(GPU-hours, CPU core-hours) of a finished member: summary.json's wall time × its processes (GPUs), or × its
    processes and threads on CPU (env.json)."""
    try:
        summary = json.loads(folder.summary.read_text())
        env = json.loads(folder.env.read_text())
    except (OSError, ValueError):
        return 0.0, 0.0
    hours = float(summary.get("wall_time_s") or 0) / 3600 * int(summary.get("world_size") or 1)
    if str(env.get("device", "cpu")).startswith("cuda"):
        return hours, 0.0
    return 0.0, hours * int(env.get("torch_threads") or 1)


# ---------------------------------------------------------------- the status command


def series_members(root: Path) -> list[str]:
    """The members of the series in `root` (series.json's order), or [""] for a single run's folder."""
    root = Path(root)
    run, series = RunDir(root), SeriesDir(root)
    if series.record.is_file():
        return list(read_series(root)["members"])
    if series.jobs_record.is_file():
        record = read_jobs(root)
        if record.get("kind") == PROBE:  # the probes of a series (evaluate.py probe --launcher)
            return list(record.get("order") or record["members"])
    if series.jobs_record.is_file() or run.config.is_file() or run.summary.is_file():
        return [""]
    raise MmptError(
        f"{root} is neither a series folder ({series.record.name}) nor a run folder; pass the folder a train.py "
        "command wrote (runs/<name>), or the results folder of evaluate.py probe --launcher"
    )


def format_status(root: Path) -> str:
    """The status of a series (or single run) folder, its progress and hours, as `evaluate.py status` prints it."""
    root = Path(root)
    if not root.exists():
        raise MmptError(f"{root} does not exist; pass the folder a train.py command wrote (runs/<name>)")
    if not root.is_dir():
        raise MmptError(f"{root} is a file; pass the folder a train.py command wrote (runs/<name>)")
    owner = series_of(root)
    members = list((read_series(owner[0]) or {}).get("members", {})) if owner is not None else []
    inside = [m for m in members if owner is not None and m.startswith(owner[1] + "/")]
    if owner is not None and owner[1] in members:
        root, paths, kind = owner[0], [owner[1]], "member of the series"  # its job is in the series' record
    elif inside:  # a part of a series: its individual/ folder, a variant, a seed
        root, paths, kind = owner[0], inside, f"{owner[1]}/ of the series"
    else:
        paths = series_members(root)
        kind = "series" if paths != [""] else "run"
    record = read_jobs(root)
    if record.get("kind") == PROBE:
        request = record.get("request") or {}
        kind = f"{request.get('method', 'the')} probes in"
    states = member_states(root, paths, record, strict=False)
    counts = {s: sum(m.state == s for m in states.values()) for s in STATES}
    launchers = sorted({m.launcher for m in states.values() if m.launcher})
    head = f"{kind} {root}: {len(paths)} member{'s' if len(paths) > 1 else ''}"
    lines = [head + (f" (launcher: {', '.join(launchers)})" if launchers else "")]
    rows = [("member", "state", "job", "detail")] + [
        (m.path or ".", m.state, m.job_id or "-", m.detail) for m in states.values()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    gpu = cpu = 0.0
    for m in states.values():
        if m.state == FINISHED:
            g, c = member_hours(RunDir(root / m.path))
            gpu, cpu = gpu + g, cpu + c
    done = counts[FINISHED]
    progress = f"progress: {done} of {len(paths)} finished ({100 * done / len(paths):.0f}%)"
    progress += "".join(f", {counts[s]} {s}" for s in STATES[1:] if counts[s])
    used = [f"{gpu:.3g} GPU-hours"] if gpu else []
    used += [f"{cpu:.3g} CPU core-hours"] if cpu else []
    if done and record.get("kind") != PROBE:  # a probe records no wall time
        lines.append(
            f"{progress}; {' and '.join(used) or 'no hours'} in the finished members (summary.json wall times)"
        )
    else:
        lines.append(progress)
    summary_job = record.get("summary_job")
    if summary_job:
        try:
            state = slurm_states(SeriesDir(root).slurm_jobs, [summary_job])[summary_job]
        except MmptError:
            state = UNKNOWN
        lines.append(f"summary job {summary_job}: SLURM {state} (writes sweep.md when the members' jobs end)")
    return "\n".join(lines) + "\n"
