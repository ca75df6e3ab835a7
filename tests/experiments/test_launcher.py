"""A series' members as jobs (local in parallel, SLURM arrays through submitit): the same digests as the sequential
series, nothing trained twice, a killed, preempted or failing member continued or reported, bad input refused.

The SLURM path runs through submitit against stand-in sbatch, srun, scontrol, sacct, squeue and scancel scripts
(slurm_standin.py beside this file) that run the jobs on this machine. Each job imports torch and timm afresh, so
the tests that run jobs take tens of seconds: they are marked slow, and the local launcher's tests share one series
(`local_series`: a killed member, a failing one, a launch while it runs, the reruns).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmpt.cli import train_main
from mmpt.config import load_config
from mmpt.config.launch import time_minutes
from mmpt.errors import MmptError
from mmpt.experiments.launch_plan import parse_slurm_args
from mmpt.experiments.status import process_start
from mmpt.runs.rundir import RunDir
from mmpt.runs.seriesdir import SeriesDir
from tests.helpers import REPO, digests, job_record, job_status, quiet, sbatch_options, wait_for

SEEDS = "0,1,2"  # the seeds of the `study` series (conftest.py)
JOB = ["--cpus-per-job", "1"]  # one thread per job, as the sequential reference trains


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def series(sequential_series, out: Path, *extra: str, seeds: str = SEEDS) -> list[str]:
    return ["--config", str(sequential_series[1]), "--output", str(out), "--seeds", seeds, *extra]


def train_process(argv: list[str], log: Path, new_session: bool = False) -> subprocess.Popen:
    """train.py in its own process (so that the test can kill it), its output to `log`; `new_session`: in a session
    of its own, as a terminal's foreground job (a Ctrl-C there goes to its whole process group)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=new_session,
        )


# ---------------------------------------------------------------- local: N members at a time on this machine


@pytest.fixture(scope="module")
def local_series(sequential_series, tmp_path_factory):
    """One series of 3 seeds with the local launcher, shared by the local tests; returns what each step left.

    1. train.py, in its own process, 2 jobs at a time: seed2's job fails (a file where mmpt writes a folder),
       seed0's training process is killed (kill -9) once it has written last.pt, and a second launch is tried
       while the first one runs.
    2. seed2's cause removed, the same command with one job at a time, in its own process: once it has started
       seed0's job, that job is frozen (SIGSTOP) and the launching process is killed; its job lives on.
    3. The same command in this process: it counts seed0's job as running (which then goes on), and starts
       seed2 when that job has ended. 4. The same command once more, on the finished series.
    """
    work = tmp_path_factory.mktemp("local")
    out = work / "series"
    (out / "seed2").mkdir(parents=True)
    RunDir(out / "seed2").checkpoints.write_text("a file where mmpt writes a folder")  # seed2's job fails
    # no retry: seed0's kill stays a failure that the next launch continues (retries: test_launcher_safety.py)
    argv = series(sequential_series, out, "--launcher", "local", "--jobs", "2", "--retries", "0", *JOB)
    feeder = train_process(argv, work / "first.log")
    try:
        wait_for(lambda: RunDir(out / "seed0").last.is_file(), 240, "seed0's last.pt")
        controller = job_record(out)["members"]["seed0"]["pid"]
        (task,) = children(controller)
        os.kill(task, signal.SIGKILL)
        os.kill(feeder.pid, signal.SIGSTOP)  # held while the second launch tries: only the second may write
        try:
            during = job_record(out)["members"]
            second = quiet(train_main, argv)  # while the first launch runs
            after_second = job_record(out)["members"]
        finally:
            os.kill(feeder.pid, signal.SIGCONT)
        code = feeder.wait(timeout=300)
    finally:
        feeder.kill()
    first = SimpleNamespace(
        code=code,
        log=(work / "first.log").read_text(),
        record=job_record(out),
        status=job_status(out),
        seed0_finished=RunDir(out / "seed0").summary.is_file(),
        summarized=(out / "sweep.md").is_file(),
    )

    RunDir(out / "seed2").checkpoints.unlink()
    argv = series(sequential_series, out, "--launcher", "local", "--jobs", "1", *JOB)
    feeder = train_process(argv, work / "orphan.log")
    held: list[int] = []
    try:
        killed_job = first.record["members"]["seed0"]["job_id"]
        wait_for(lambda: job_record(out)["members"]["seed0"]["job_id"] != killed_job, 240, "seed0's new job", 0.05)
        job = job_record(out)["members"]["seed0"]
        held = [job["pid"], *wait_for(lambda: children(job["pid"]), 60, "seed0's process")]
        for pid in held:  # seed0 keeps running, frozen until the next launch has seen it
            os.kill(pid, signal.SIGSTOP)
        feeder.kill()  # the launching process dies; its job lives on
        feeder.wait()
        orphaned = job_status(out)
        log, err = io.StringIO(), io.StringIO()

        def release() -> None:  # seed0 goes on once the launch in this process has counted it as running
            try:
                wait_for(lambda: "(started earlier)" in log.getvalue(), 120, "the rerun's start", poll_s=0.05)
            finally:
                for pid in held:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)

        releaser = threading.Thread(target=release)
        releaser.start()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(err):
                rerun_code = train_main(argv)
        finally:
            releaser.join()
    finally:
        feeder.kill()
        for pid in held:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    record = job_record(out)
    return SimpleNamespace(
        out=out,
        first=first,
        second=second,
        records_around_second=(during, after_second),
        orphan_log=(work / "orphan.log").read_text(),
        orphaned_job=job,
        orphaned_status=orphaned,
        rerun=(rerun_code, log.getvalue(), err.getvalue()),
        record=record,
        again=quiet(train_main, argv),
        record_after_again=job_record(out),
    )


@pytest.mark.slow
def test_local_jobs_give_the_digests_of_the_sequential_series(sequential_series, local_series):
    out, record = local_series.out, local_series.record
    assert "2 at a time, each on 1 CPU thread (OMP_NUM_THREADS=1" in local_series.first.log
    code, stdout, err = local_series.rerun
    assert code == 0, err + stdout
    # seed1 trained once, seed0 killed and continued, seed2 started after its failure
    assert digests(out, SEEDS) == sequential_series[2]
    assert set(record["members"]) == {"seed0", "seed1", "seed2"}
    assert [s["settings"]["jobs"] for s in record["submissions"]] == [2, 1, 1]
    for member in ("seed0", "seed1", "seed2"):
        job = record["members"][member]
        assert (out / member / "job.log").resolve() == (out / job["log"]).resolve()
        assert f"job {job['job_id']}" in (out / member / "job.log").read_text()
    assert (out / "sweep.md").is_file()  # summarized as a sequential series is
    rows = job_status(out)
    assert [rows[f"seed{k}"][:2] for k in range(3)] == [
        ["finished", record["members"][f"seed{k}"]["job_id"]] for k in range(3)
    ]
    assert "progress: 3 of 3 finished (100%)" in rows["_text"] and "CPU core-hours" in rows["_text"]


@pytest.mark.slow
def test_a_killed_member_continues_exactly_and_a_failing_member_does_not_stop_the_others(
    sequential_series, local_series
):
    out, first = local_series.out, local_series.first
    assert first.code == 1
    assert "2 of 3 members failed" in first.log and "seed1: finished" in first.log
    assert not first.seed0_finished and first.summarized  # seed1 summarized
    rows = first.status
    assert [rows[m][0] for m in ("seed0", "seed1", "seed2")] == ["failed", "finished", "failed"]
    assert "last.pt written" in rows["seed0"][2] and "has a file named checkpoints" in rows["seed2"][2]
    assert f"log {out / 'seed2' / 'job.log'}: error: " in rows["seed2"][2]

    # fixed, and the same command again: seed0 continues from its last.pt, seed2 starts, seed1 is left alone
    assert "1 finished, 0 running or queued, 2 to start" in local_series.orphan_log
    assert local_series.record["members"]["seed1"] == first.record["members"]["seed1"]
    assert "seed0: continuing from last.pt" in (out / "seed0" / "job.log").read_text()
    assert digests(out, SEEDS) == sequential_series[2]


@pytest.mark.slow
def test_a_second_launch_while_the_first_runs_is_refused_and_submits_nothing(local_series):
    code, _, err = local_series.second
    assert code == 2 and err.startswith("error: the series in") and "being launched by another train.py" in err
    assert len(err.splitlines()) == 1
    before, after = local_series.records_around_second
    assert after == before


@pytest.mark.slow
def test_a_rerun_counts_the_jobs_of_a_launch_that_died_and_submits_nothing_twice(sequential_series, local_series):
    job, rows = local_series.orphaned_job, local_series.orphaned_status
    assert rows["seed0"][:2] == ["running", job["job_id"]]
    # seed2 waited for a slot of the launch that died: its latest job is still the one that failed
    assert rows["seed2"][:2] == ["failed", local_series.first.record["members"]["seed2"]["job_id"]]
    code, stdout, err = local_series.rerun
    assert code == 0, err + stdout
    assert "1 finished, 1 running or queued, 1 to start" in stdout
    assert f"seed0: running as local job {job['job_id']} (started earlier)" in stdout
    # one job at a time: seed2 started once seed0's job had ended
    assert stdout.index(f"finished (local job {job['job_id']})") < stdout.index("seed2: started as local job")
    assert local_series.record["members"]["seed0"] == job  # not submitted a second time
    assert digests(local_series.out, SEEDS) == sequential_series[2]


@pytest.mark.slow
def test_the_same_command_on_a_finished_series_starts_nothing(local_series):
    code, stdout, err = local_series.again
    assert code == 0, err + stdout
    assert "3 finished, 0 running or queued, 0 to start" in stdout
    assert local_series.record_after_again["members"] == local_series.record["members"]


@pytest.mark.slow
def test_a_single_run_with_a_launcher_is_one_job_in_its_own_folder(sequential_series, tmp_path):
    single = tmp_path / "single"
    code, stdout, err = quiet(
        train_main, ["--config", str(sequential_series[1]), "--output", str(single), "--launcher", "local", *JOB]
    )
    assert code == 0, err + stdout
    assert json.loads(RunDir(single).summary.read_text())["final_digest"] == sequential_series[2]["seed0"]
    assert not (single / "series.json").exists() and (single / "job.log").is_symlink()
    assert job_record(single)["members"][""]["job_id"] in (single / "job.log").read_text()
    assert job_status(single)["."][0] == "finished"


# ---------------------------------------------------------------- slurm: one job array, through stand-in tools


@pytest.mark.slow
def test_slurm_array_requeue_after_sigusr2_failed_member_and_status(sequential_series, tmp_path, slurm, monkeypatch):
    out = tmp_path / "series"
    (out / "seed2").mkdir(parents=True)
    RunDir(out / "seed2").checkpoints.write_text("a file where mmpt writes a folder")  # seed2's job fails
    monkeypatch.setenv("SLURM_STANDIN_PREEMPT", f"0:{RunDir(out / 'seed0').last}")
    argv = series(
        sequential_series,
        out,
        *("--launcher", "slurm", "--partition", "gpu", "--time", "1:30:00", "--mem", "4G", "--jobs", "2"),
        *JOB,
        "--slurm-args=--qos=high --account lab",
    )
    code, stdout, err = quiet(train_main, argv)
    assert code == 0, err + stdout
    record = job_record(out)
    array = record["members"]["seed0"]["job_id"].split("_")[0]
    assert [record["members"][f"seed{k}"]["job_id"] for k in range(3)] == [f"{array}_{k}" for k in range(3)]
    rows = job_status(out)  # two at a time: seed2 waits while seed0 and seed1 start
    assert rows["seed2"][:2] == ["queued", f"{array}_2"] and "SLURM PENDING" in rows["seed2"][2]
    # the array and its resources, as sbatch got them from submitit
    options = sbatch_options(slurm, array)
    assert options["array"] == "0-2%2" and options["partition"] == "gpu" and options["time"] == "90"
    assert options["mem"] == "4G" and options["cpus-per-task"] == "1" and options["signal"] == "USR2@90"
    assert options["qos"] == "high" and options["account"] == "lab" and "gpus-per-node" not in options
    assert options["output"] == str(SeriesDir(out).slurm_jobs / "%A_%a_0_log.out")
    summary_job = record["summary_job"]
    assert sbatch_options(slurm, summary_job)["dependency"] == f"afterany:{array}"

    # everything runs on the stand-in; the summary job ends last
    wait_for(lambda: (slurm / "state" / summary_job).read_text() == "COMPLETED", 300, "the summary job", 0.2)
    log = (out / "seed0" / "job.log").read_text()
    assert "SIGUSR2: stopped at step" in log and "submitit requeues the job" in log
    assert "Requeued job" in log and "seed0: continuing from last.pt" in log
    assert [(slurm / "runs" / f"{array}_{k}").read_text() for k in range(3)] == ["2", "1", "1"]
    assert digests(out, "0,1") == {k: v for k, v in sequential_series[2].items() if k in ("seed0", "seed1")}
    assert json.loads((out / "sweep.json").read_text())["left_out"] == {"seed2": "unfinished"}
    rows = job_status(out)
    assert rows["seed0"][:2] == ["finished", f"{array}_0"] and rows["seed1"][:2] == ["finished", f"{array}_1"]
    assert rows["seed2"][:2] == ["failed", f"{array}_2"] and "SLURM FAILED" in rows["seed2"][2]
    assert f"log {out / 'seed2' / 'job.log'}: error: " in rows["seed2"][2] and "named checkpoints" in rows["seed2"][2]
    assert "progress: 2 of 3 finished (67%), 1 failed" in rows["_text"]
    assert f"summary job {summary_job}: SLURM COMPLETED" in rows["_text"]

    # the same command again submits only the member that is not finished, and a summary job after it (which
    # the stand-in holds: they stay queued)
    monkeypatch.setenv("SLURM_STANDIN_HOLD", "1")
    code, stdout, _ = quiet(train_main, argv)
    assert code == 0 and "2 finished, 0 running or queued, 1 to submit" in stdout
    again = job_record(out)
    assert {m: again["members"][m] for m in ("seed0", "seed1")} == {m: record["members"][m] for m in ("seed0", "seed1")}
    resubmitted = again["members"]["seed2"]["job_id"]
    assert "_" not in resubmitted and "array" not in sbatch_options(slurm, resubmitted)  # one job, not an array
    assert sbatch_options(slurm, again["summary_job"])["dependency"] == f"afterany:{resubmitted}"
    rows = job_status(out)
    assert rows["seed2"][:2] == ["queued", resubmitted] and "SLURM PENDING" in rows["seed2"][2]
    assert f"summary job {again['summary_job']}: SLURM PENDING" in rows["_text"]


@pytest.mark.slow
def test_a_slurm_job_with_several_processes_trains_one_run_under_torch_distributed(sequential_series, tmp_path, slurm):
    # a single run with a launcher is a one-member series; 2 "GPUs" give 2 processes (gloo on the CPU here)
    out = tmp_path / "run"
    argv = ["--config", str(sequential_series[1]), "--output", str(out), "--launcher", "slurm", "--gpus-per-job", "2"]
    code, stdout, err = quiet(train_main, argv)
    assert code == 0, err + stdout
    job_id = job_record(out)["members"][""]["job_id"]
    options = sbatch_options(slurm, job_id)
    assert options["gpus-per-node"] == "2" and options["ntasks-per-node"] == "2" and "array" not in options
    assert "summary_job" not in job_record(out)  # one run: nothing to summarize
    wait_for(lambda: (slurm / "state" / job_id).read_text() in ("COMPLETED", "FAILED"), 300, "the job", 0.2)
    assert (slurm / "state" / job_id).read_text() == "COMPLETED", (out / "job.log").read_text()
    result = json.loads(RunDir(out).summary.read_text())
    assert result["world_size"] == 2 and result["rank_digests"] == [result["final_digest"]] * 2
    assert f"job {job_id} on " in (out / "job.log").read_text() and "2 process(es)" in (out / "job.log").read_text()
    assert job_status(out)["."][:2] == ["finished", job_id]


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing submitted


def refused(argv: list[str], folder: Path) -> str:
    code, _, err = quiet(train_main, argv)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert not folder.exists(), sorted(folder.rglob("*"))  # no series.json, no jobs
    return lines[0]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--launcher", "slurm", "--time", "60"], ["--launcher slurm needs SLURM's sbatch and srun on PATH"]),
        (["--launcher", "local", "--jobs", "0"], ["launch.jobs must be >= 1, got 0"]),
        (["--launcher", "local", "--gpus-per-job", "1"], ["--gpus-per-job 1", "none visible"]),
        (
            ["--launcher", "local", "--time", "5"],
            ["than the local launcher's stop signal margin (30 s", "every_minutes=2"],
        ),
        (
            ["--launcher", "local", "--time", "0:20", "--set", "checkpoint.every_minutes=0"],
            ["(0.333333 min) is not longer than the local", "--time 2 or longer"],
        ),
        (["--launcher", "local", "--partition", "gpu"], ["--partition is a SLURM setting"]),
        (["--jobs", "2"], ["--jobs is a job's setting", "--launcher"]),
        (["--launcher", "cluster"], ["launch.launcher must be one of sequential, local, slurm"]),
        (["--launcher", "local", "--time", "tomorrow"], ["launch.time must be minutes"]),
    ],
)
def test_bad_launch_settings_are_one_line_before_anything_is_submitted(
    sequential_series, tmp_path, monkeypatch, extra, words
):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch here
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # and no GPU
    line = refused(series(sequential_series, tmp_path / "series", *extra), tmp_path / "series")
    assert all(w in line for w in words), line


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--partition", "gpu", "--set", "checkpoint.every_minutes=300"], ["(240 min) is not longer than the slurm"]),
        (["--time", "60", "--slurm-args=-q high"], ["'-q' is not a long sbatch option"]),
        (["--time", "60", "--slurm-args=--time=10"], ["--slurm-args sets --time", "from --time"]),
        (["--time", "60", "--slurm-args=--qos='high"], ["cannot be read"]),
        (["--time", "60", "--slurm-args=--qos=a --qos=b"], ["--qos twice"]),
        (["--time", "60", "--mem", "lots"], ["launch.mem must be memory as SLURM writes it"]),
    ],
)
def test_bad_slurm_settings_are_one_line_before_anything_is_submitted(sequential_series, tmp_path, slurm, extra, words):
    line = refused(series(sequential_series, tmp_path / "series", "--launcher", "slurm", *extra), tmp_path / "series")
    assert all(w in line for w in words), line
    assert not (slurm / "jobs").exists()  # sbatch never ran


def test_status_names_the_members_that_never_started(sequential_series, tmp_path):
    out = tmp_path / "series"
    out.mkdir()
    shutil.copyfile(
        SeriesDir(sequential_series[0] / "seq").record, SeriesDir(out).record
    )  # the series, none of its runs
    rows = job_status(out)
    assert [rows[f"seed{k}"][:2] for k in range(3)] == [["not started", "-"]] * 3
    assert "progress: 0 of 3 finished (0%), 3 not started" in rows["_text"]


def test_overwrite_refuses_a_member_that_is_still_running(sequential_series, tmp_path, monkeypatch):
    out = tmp_path / "series"
    SeriesDir(out).jobs.mkdir(parents=True)
    me = process_start(os.getpid())
    SeriesDir(out).jobs_record.write_text(
        json.dumps(
            {
                "members": {
                    "seed0": {
                        "launcher": "local",
                        "job_id": str(os.getpid()),
                        "pid": os.getpid(),
                        "started": me,
                        "log": "x",
                    }
                }
            }
        )
    )
    code, _, err = quiet(
        train_main, series(sequential_series, out, "--launcher", "local", *JOB, "--overwrite", seeds="0,1")
    )
    assert code == 2 and "seed0 is running as job" in err and "--overwrite would train it a second time" in err
    assert not (out / "seed1").exists()


def test_launcher_benchmark_refuses_bad_settings_in_one_line(capsys):
    from benchmarks.__main__ import main

    assert main(["launcher", "--jobs", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --jobs must be >= 1, got 0"]


def test_time_limits_read_as_slurm_writes_them():
    cases = {"240": 240, 90: 90, "30:00": 30, "4:00:00": 240, "1-12": 2160, "1-12:30": 2190, "2-0:0:30": 2880.5}
    for text, minutes in cases.items():
        assert time_minutes(load_config(overrides=[{"launch": {"time": text}}]).launch.time) == minutes, text
    assert parse_slurm_args("--qos=high --account lab --exclusive --gres gpu:a100:1") == {
        "qos": "high",
        "account": "lab",
        "exclusive": True,
        "gres": "gpu:a100:1",
    }
    with pytest.raises(MmptError, match="which the launcher sets itself"):
        parse_slurm_args("--output=x.log")
