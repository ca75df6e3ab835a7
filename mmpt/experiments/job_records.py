"""What a launcher records about its jobs and says about them: the members' labels, each submission's entry, a
member's attempts after crashes (launch.retries), its job.log link, and the end of a launch (the summary, the
members that failed). The record itself is read and written by mmpt.experiments.status."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from mmpt.experiments.launch_plan import LaunchPlan
from mmpt.experiments.member_job import Member
from mmpt.experiments.status import CRASH, FINISHED, failure_kind, last_log_line, member_states
from mmpt.experiments.summary import summarize
from mmpt.runs.rundir import RunDir


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def relative(path: Path, root: Path) -> str:
    return os.path.relpath(Path(path).absolute(), Path(root).absolute())


def link_log(member_dir: Path, log: Path) -> None:
    """Point `member_dir`/job.log at the member's current job log (a relative link, replaced atomically)."""
    member_dir.mkdir(parents=True, exist_ok=True)
    link = RunDir(member_dir).job_log
    temp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    temp.unlink(missing_ok=True)
    temp.symlink_to(os.path.relpath(Path(log).absolute(), member_dir.absolute()))
    os.replace(temp, link)


def attempts(root: Path, record: dict, path: str) -> dict:
    """The "attempts" of a member submitted again: the earlier jobs of its run of crashes (launch.retries counts
    them), this member's last job included when it crashed; {} after any other end."""
    previous = record["members"].get(path)
    if not previous:
        return {}
    log = root / previous["log"] if previous.get("log") else None
    if failure_kind(log) != CRASH:
        return {}
    earlier = previous.get("attempts", [])
    return {"attempts": [*earlier, {"job_id": previous["job_id"], "why": last_log_line(log)[:300], "at": now()}]}


def finished_by(members: list[Member]) -> Callable[[str], bool]:
    by_path = {m.path: m for m in members}
    return lambda path: by_path[path].finished()


def member_labels(members: list[Member]) -> dict[str, str]:
    return {m.path: f"[{i}/{len(members)}] {m.path or m.folder}" for i, m in enumerate(members, 1)}


def submission_entry(plan: LaunchPlan, todo: list[Member], **extra) -> dict:
    return {
        "at": now(),
        "launcher": plan.launcher,
        "settings": plan.settings,
        "members": [m.path for m in todo],
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **extra,
    }


def finish(root: Path, series: bool, members: list[Member], failed: list[str]) -> int:
    """Summarize the series as a sequential one does (when a member has finished); 1 when a member failed."""
    states = member_states(root, [m.path for m in members], finished=finished_by(members))
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
