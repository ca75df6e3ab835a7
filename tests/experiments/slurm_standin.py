"""Stand-ins for SLURM's sbatch, srun, scontrol, sacct, squeue and scancel that run the jobs on this machine.

    python slurm_standin.py TOOL ARGS...      (the tests put one small shell script per tool on PATH)

State lives in $SLURM_STANDIN_DIR: jobs/<id>.json (the sbatch options, the script, the tasks), state/<task>
(PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, REQUEUED), pid/<task> (the running task's processes),
requeue/<task> (asked by scontrol), runs/<task> (how many times it started). sbatch hands each job to a
background runner that waits for its dependencies (afterany), runs its array tasks (at most the array's
%parallelism at a time) through the script, and runs a task again when scontrol requeued it. srun runs the
command once per task of the job (one node: SLURM_PROCID and SLURM_LOCALID 0..SLURM_NTASKS-1), each into the
job's output file of its task, and, when $SLURM_STANDIN_PREEMPT is "<array index>:<file>", sends SIGUSR2 to the
first run of that array task as soon as the file exists (a preemption while it trains: the file is the member's
last.pt). With $SLURM_STANDIN_HOLD set, sbatch records the jobs and runs nothing (they stay PENDING); with
$SLURM_STANDIN_PARTITIONS (comma-separated), sbatch refuses any other --partition, as a cluster does.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

STATE = Path(os.environ.get("SLURM_STANDIN_DIR", "/nonexistent"))
ENDED = ("COMPLETED", "FAILED", "CANCELLED")


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(text)
    os.replace(temp, path)


def _next_id() -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "counter.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        number = int(_read(STATE / "counter", "1000")) + 1
        _write(STATE / "counter", str(number))
    return number


def sbatch(args: list[str]) -> int:
    script = Path(args[-1])
    text = script.read_text()
    options = {}
    for line in text.splitlines():
        match = re.fullmatch(r"#SBATCH --([a-z-]+)(?:=(.*))?", line.strip())
        if match:
            value = match.group(2)
            options[match.group(1)] = True if value is None else value.strip("'")
    partitions = os.environ.get("SLURM_STANDIN_PARTITIONS")  # the cluster's partitions, where a test names them
    if partitions and options.get("partition") not in (None, *partitions.split(",")):
        print("sbatch: error: invalid partition specified: " + options["partition"], file=sys.stderr)
        print("sbatch: error: Batch job submission failed: Invalid partition name specified", file=sys.stderr)
        return 1
    job_id = str(_next_id())
    array = re.fullmatch(r"0-(\d+)%(\d+)", options.get("array", ""))
    tasks = [f"{job_id}_{i}" for i in range(int(array.group(1)) + 1)] if array else [job_id]
    parallel = int(array.group(2)) if array else 1
    record = {"id": job_id, "options": options, "script": text, "tasks": tasks, "parallel": parallel}
    _write(STATE / "jobs" / f"{job_id}.json", json.dumps(record))
    for task in tasks:
        _write(STATE / "state" / task, "PENDING")
    saved = STATE / "scripts" / f"{job_id}.sh"
    _write(saved, text)
    if os.environ.get("SLURM_STANDIN_HOLD"):  # recorded, never run: the jobs stay PENDING
        print(f"Submitted batch job {job_id}")
        return 0
    log = open(STATE / f"runner_{job_id}.log", "w")
    subprocess.Popen(
        [sys.executable, __file__, "__run__", job_id],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    print(f"Submitted batch job {job_id}")
    return 0


def _ended(job: str) -> bool:
    states = [_read(p) for p in (STATE / "state").glob("*") if p.name == job or p.name.startswith(job + "_")]
    return bool(states) and all(s in ENDED for s in states)


def _run_task(record: dict, task: str) -> None:
    options = record["options"]
    main, _, index = task.partition("_")
    env = dict(os.environ)
    env.update(
        SLURM_JOB_ID=str(int(main) * 1000 + int(index or 0)) if index else main,
        SLURM_JOB_NUM_NODES=str(options.get("nodes", 1)),
        SLURM_JOB_NODELIST="localhost",
        SLURM_NTASKS=str(int(options.get("nodes", 1)) * int(options.get("ntasks-per-node", 1))),
        SLURM_NODEID="0",
    )
    if index:
        env.update(SLURM_ARRAY_JOB_ID=main, SLURM_ARRAY_TASK_ID=index)
    output = options["output"].replace("%A", main).replace("%a", index).replace("%j", env["SLURM_JOB_ID"])
    script = STATE / "scripts" / f"{main}.sh"
    while True:
        _write(STATE / "state" / task, "RUNNING")
        runs = int(_read(STATE / "runs" / task, "0")) + 1
        _write(STATE / "runs" / task, str(runs))
        with open(output, "a") as out:
            code = subprocess.call(["bash", str(script)], env=env, stdout=out, stderr=subprocess.STDOUT)
        if (STATE / "requeue" / task).exists():
            (STATE / "requeue" / task).unlink()
            _write(STATE / "state" / task, "REQUEUED")
            continue
        if _read(STATE / "state" / task) != "CANCELLED":
            _write(STATE / "state" / task, "COMPLETED" if code == 0 else "FAILED")
        return


def runner(job_id: str) -> int:
    record = json.loads((STATE / "jobs" / f"{job_id}.json").read_text())
    dependency = record["options"].get("dependency", "")
    waits = dependency.removeprefix("afterany:").split(":") if dependency else []
    while not all(_ended(job) for job in waits):
        time.sleep(0.1)
    pending = list(record["tasks"])
    running: list[threading.Thread] = []
    while pending or running:
        running = [t for t in running if t.is_alive()]
        while pending and len(running) < record["parallel"]:
            thread = threading.Thread(target=_run_task, args=(record, pending.pop(0)))
            thread.start()
            running.append(thread)
        time.sleep(0.05)
    return 0


def srun(args: list[str]) -> int:
    i, output = 0, None
    while args[i].startswith("--"):
        if args[i] in ("--output", "--error"):
            output = args[i + 1] if args[i] == "--output" else output
            i += 2
        else:
            i += 1
    command = args[i:]
    main = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
    index = os.environ.get("SLURM_ARRAY_TASK_ID", "")
    task = f"{main}_{index}" if index else main
    output = output.replace("%A", main).replace("%a", index).replace("%j", os.environ["SLURM_JOB_ID"])
    children = []
    for rank in range(int(os.environ.get("SLURM_NTASKS", "1"))):  # one node: every task on it
        env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))
        with open(output.replace("%t", str(rank)), "a") as out:
            children.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT))
    _write(STATE / "pid" / task, " ".join(str(child.pid) for child in children))
    preempt = os.environ.get("SLURM_STANDIN_PREEMPT", "")
    target_index, _, trigger = preempt.partition(":")
    armed = bool(preempt) and target_index == index and _read(STATE / "runs" / task) == "1"
    while any(child.poll() is None for child in children):
        if armed and Path(trigger).exists():
            for child in children:
                child.send_signal(signal.SIGUSR2)
            armed = False
        time.sleep(0.005)
    return max(abs(child.returncode) for child in children)


def scontrol(args: list[str]) -> int:
    assert args[0] == "requeue", args
    _write(STATE / "requeue" / args[1], "1")
    return 0


def scancel(args: list[str]) -> int:
    sig = None
    ids = []
    for i, arg in enumerate(args):
        if arg.startswith("--signal"):
            sig = arg.partition("=")[2] or args[i + 1]
        elif not arg.startswith("-") and (i == 0 or not args[i - 1] == "--signal"):
            ids.append(arg)
    for job in ids:
        tasks = [p.name for p in (STATE / "state").glob("*") if p.name == job or p.name.startswith(job + "_")]
        for task in tasks:
            pids = _read(STATE / "pid" / task).split()
            if sig is None:
                if _read(STATE / "state" / task) not in ENDED:
                    _write(STATE / "state" / task, "CANCELLED")
                sig = "TERM"
            for pid in pids if _read(STATE / "state" / task) in ("RUNNING", "CANCELLED") else ():
                try:
                    os.kill(int(pid), getattr(signal, "SIG" + sig.removeprefix("SIG")))
                except ProcessLookupError:
                    pass
    return 0


def sacct(args: list[str]) -> int:
    jobs = [args[i + 1] for i, arg in enumerate(args) if arg == "-j"]
    print("JobID|State|NodeList")
    for job in jobs:
        for path in sorted((STATE / "state").glob("*")):
            if path.name == job or path.name.startswith(job + "_"):
                print(f"{path.name}|{_read(path)}|localhost")
    return 0


def squeue(args: list[str]) -> int:
    for path in sorted((STATE / "state").glob("*")):
        state = _read(path)
        if state not in ENDED:
            print(f"{path.name}|{state}")
    return 0


if __name__ == "__main__":
    tool, rest = sys.argv[1], sys.argv[2:]
    if tool == "__run__":
        sys.exit(runner(rest[0]))
    sys.exit(
        {"sbatch": sbatch, "srun": srun, "scontrol": scontrol, "scancel": scancel, "sacct": sacct, "squeue": squeue}[
            tool
        ](rest)
    )
