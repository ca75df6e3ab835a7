"""A study that survives the cluster and the keyboard: no finished member lost to a refused --overwrite launch, a
Ctrl-C that stops the launcher and not its jobs, one stop however often it is delivered, crashed members retried,
no fine-tuning from a run still training, and a launcher, resume and status that agree on every member (PREEMPTED
is running, an interrupted member is named so, a foreign launcher is refused)."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit.slurm.slurm

from mmpt.cli import evaluate_main, train_main
from mmpt.experiments.launch_plan import SIGNAL_MARGIN_S
from mmpt.experiments.status import SLURM_QUEUED, SLURM_RUNNING
from mmpt.runs.rundir import RunDir
from mmpt.runs.seriesdir import SeriesDir
from mmpt.runtime.process import StopSignal
from tests.experiments.test_launcher import JOB, children, series, train_process
from tests.helpers import digests, job_record, job_status, quiet, wait_for


def finished_copy(sequential_series, folder):
    """A copy of the finished sequential series (3 seeds) to launch into."""
    shutil.copytree(sequential_series[0] / "seq", folder, symlinks=True)
    return folder


def test_a_stop_signal_delivered_twice_is_one_stop_and_a_late_one_stops_now():
    with StopSignal(window_s=0.5) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # srun, submitit and a terminal may each deliver one
        time.sleep(0.05)
        assert stop.received == "SIGTERM"
        time.sleep(0.6)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)


def test_status_follows_submitits_state_model_and_the_signal_margins_are_submitits():
    """Every SLURM state submitit counts as not done is running or queued here (PREEMPTED: SLURM requeues it)."""
    source = inspect.getsource(submitit.core.core.InfoWatcher.is_done)
    incomplete = set(eval(source[source.index("[") : source.index("]") + 1]))  # its literal list
    assert incomplete - {"UNKNOWN"} <= SLURM_QUEUED | SLURM_RUNNING
    assert "PREEMPTED" in SLURM_RUNNING
    slurm_default = inspect.signature(submitit.slurm.slurm._make_sbatch_string).parameters["signal_delay_s"].default
    assert SIGNAL_MARGIN_S == {"local": 30, "slurm": slurm_default}


@pytest.mark.slow
def test_an_overwrite_that_sbatch_refuses_keeps_every_finished_member(sequential_series, tmp_path, slurm, monkeypatch):
    out = finished_copy(sequential_series, tmp_path / "series")
    before = {m: RunDir(out / m).summary.read_bytes() for m in ("seed0", "seed1", "seed2")}
    monkeypatch.setenv("SLURM_STANDIN_PARTITIONS", "gpu")
    argv = series(sequential_series, out, "--launcher", "slurm", "--partition", "gpux", "--time", "60", "--overwrite")
    code, _, err = quiet(train_main, argv)
    assert code == 2 and "sbatch refused" in err and "invalid partition specified: gpux" in err
    assert len(err.splitlines()) == 1
    assert {m: RunDir(out / m).summary.read_bytes() for m in before} == before  # nothing removed
    assert digests(out, "0,1,2") == sequential_series[2]
    assert not SeriesDir(out).jobs_record.exists()


@pytest.mark.slow
def test_an_accepted_overwrite_starts_each_member_over_when_its_job_runs(sequential_series, tmp_path, slurm):
    out = finished_copy(sequential_series, tmp_path / "series")
    marker = out / "seed1" / "val_history.json"
    argv = series(sequential_series, out, "--launcher", "slurm", "--time", "60", "--overwrite", *JOB, seeds="1")
    code, stdout, err = quiet(train_main, argv)
    assert code == 0, err + stdout
    job = job_record(out)["members"]["seed1"]
    assert job_status(out)["seed1"][0] in ("queued", "running")  # the old results stand until the job runs
    wait_for(lambda: (slurm / "state" / job["job_id"]).read_text() in ("COMPLETED", "FAILED"), 300, "the job", 0.2)
    assert (slurm / "state" / job["job_id"]).read_text() == "COMPLETED"
    assert "seed1" in (out / "seed1" / "job.log").read_text() and marker.is_file()
    assert "continuing from last.pt" not in (out / "seed1" / "job.log").read_text()  # started over
    assert digests(out, "1") == {"seed1": sequential_series[2]["seed1"]}


@pytest.mark.slow
def test_ctrl_c_stops_the_local_launcher_and_its_jobs_go_on_in_their_own_sessions(sequential_series, tmp_path):
    out = tmp_path / "series"
    argv = series(sequential_series, out, "--launcher", "local", "--jobs", "1", *JOB, seeds="0,1")
    log = tmp_path / "launcher.log"
    launcher = train_process(argv, log, new_session=True)  # as a terminal's foreground job
    try:
        wait_for(lambda: RunDir(out / "seed0").last.is_file(), 240, "seed0's last.pt")
        job = job_record(out)["members"]["seed0"]
        assert os.getsid(job["pid"]) != os.getsid(launcher.pid)  # the job's controller: a session of its own
        os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C
        assert launcher.wait(timeout=60) == 130
    finally:
        launcher.kill()
    said = log.read_text()
    assert "interrupted: the launcher stopped; its 1 running job goes on" in said and "Traceback" not in said
    assert "1 member not started" in said
    # the job was not touched: it trains on and finishes, with no stop and no traceback
    wait_for(lambda: job_status(out)["seed0"][0] == "finished", 300, "seed0's job to end")
    job_log = (out / "seed0" / "job.log").read_text()
    assert "Traceback" not in job_log and "stopped by" not in job_log
    assert digests(out, "0") == {"seed0": sequential_series[2]["seed0"]}
    assert job_status(out)["seed1"][0] == "not started"


def signal_seed0(argv: list[str], out: Path, log: Path, *signals: int, wait: float) -> tuple[int, dict, float]:
    """Start the launcher, wait for seed0's first last.pt, send `signals` to its training process; the launcher's exit
    code, seed0's job record as it was then, and the time the signals were sent."""
    launcher = train_process(argv, log)
    try:
        wait_for(lambda: RunDir(out / "seed0").last.is_file(), 240, "seed0's last.pt")
        job = job_record(out)["members"]["seed0"]
        (task,) = children(job["pid"])
        signalled = time.time()
        for number in signals:
            os.kill(task, number)
        return launcher.wait(timeout=wait), job, signalled
    finally:
        launcher.kill()


@pytest.mark.slow
def test_a_job_stopped_twice_saves_once_and_is_interrupted_until_the_command_continues_it(sequential_series, tmp_path):
    out = tmp_path / "series"
    # 30 epochs: time enough to stop it while it trains, however fast the machine
    argv = series(sequential_series, out, "--launcher", "local", *JOB, "--epochs", "30", seeds="0")
    # SIGINT delivered at once after SIGTERM: one stop
    code, _, signalled = signal_seed0(argv, out, tmp_path / "launcher.log", signal.SIGTERM, signal.SIGINT, wait=120)
    assert code == 1
    job_log = (out / "seed0" / "job.log").read_text()
    # pending together, the two are handled in signal order: the first is the stop, the second changes nothing
    assert job_log.count("with last.pt written; to continue it") == 1 and "KeyboardInterrupt" not in job_log
    assert f"to continue it, run again: python train.py {' '.join(argv)}" in job_log
    assert RunDir(out / "seed0").last.stat().st_mtime >= signalled  # the stop checkpoint, written after the signal
    assert job_status(out)["seed0"][0] == "interrupted"
    code, stdout, err = quiet(train_main, argv)  # the command it names continues it
    assert code == 0, err + stdout
    assert "continuing from last.pt" in (out / "seed0" / "job.log").read_text()
    assert job_status(out)["seed0"][0] == "finished"


@pytest.mark.slow
def test_a_crashed_member_is_retried_and_the_attempt_recorded(sequential_series, tmp_path):
    out = tmp_path / "series"
    argv = series(sequential_series, out, "--launcher", "local", *JOB, "--retries", "1", seeds="0")
    # SIGKILL, as an out-of-memory kill or a lost node would
    log = tmp_path / "launcher.log"
    code, first, _ = signal_seed0(argv, out, log, signal.SIGKILL, wait=300)
    assert code == 0
    said = log.read_text()
    assert "seed0: crashed" in said and "retrying (attempt 2 of 2, launch.retries 1)" in said
    record = job_record(out)["members"]["seed0"]
    assert [a["job_id"] for a in record["attempts"]] == [first["job_id"]] and record["job_id"] != first["job_id"]
    assert digests(out, "0") == {"seed0": sequential_series[2]["seed0"]}  # continued from last.pt, exactly


@pytest.mark.slow
def test_a_preempted_member_is_running_and_a_rerun_submits_nothing(sequential_series, tmp_path, slurm, monkeypatch):
    out = tmp_path / "series"
    monkeypatch.setenv("SLURM_STANDIN_HOLD", "1")
    argv = series(sequential_series, out, "--launcher", "slurm", "--time", "60", *JOB, seeds="0,1")
    assert quiet(train_main, argv)[0] == 0
    record = job_record(out)
    for member in ("seed0", "seed1"):
        (slurm / "state" / record["members"][member]["job_id"]).write_text("PREEMPTED")
    rows = job_status(out)
    assert rows["seed0"][0] == "running" and "SLURM PREEMPTED" in rows["seed0"][2]
    jobs_before = set((slurm / "jobs").iterdir())
    code, stdout, _ = quiet(train_main, argv)
    assert code == 0 and "0 finished, 2 running or queued, 0 to submit" in stdout
    new = set((slurm / "jobs").iterdir()) - jobs_before  # at most the summary job that waits for them
    assert all(json.loads(f.read_text())["options"]["job-name"].endswith("-summary") for f in new), new
    assert job_record(out)["members"] == record["members"]
    # and a local launch while they run is refused: one launcher keeps every running member
    code, _, err = quiet(train_main, series(sequential_series, out, "--launcher", "local", *JOB, seeds="0,1"))
    assert code == 2 and "is running as a slurm job" in err and "--launcher slurm" in err


def test_status_validates_the_record_and_reads_an_individual_folder(sequential_series, tmp_path):
    out = finished_copy(sequential_series, tmp_path / "series")
    SeriesDir(out).jobs.mkdir(parents=True, exist_ok=True)
    SeriesDir(out).jobs_record.write_text(json.dumps({"members": {"seed1": {"launcher": "local", "log": "x"}}}))
    code, _, err = quiet(evaluate_main, ["status", str(out)])
    assert code == 2 and "the entry of member seed1 has no job id" in err and len(err.splitlines()) == 1
    code, _, err = quiet(evaluate_main, ["status", str(out / "seed1" / "summary.json")])
    assert code == 2 and "is a file" in err
    code, _, err = quiet(evaluate_main, ["status", str(out / "nowhere")])
    assert code == 2 and "does not exist" in err


@pytest.mark.slow
def test_status_of_an_individual_folder_and_an_interrupted_sequential_member(sequential_series, tmp_path):
    out = tmp_path / "series"
    code, _, err = quiet(train_main, series(sequential_series, out, "--individual", seeds="0"))
    assert code == 0, err
    rows = job_status(out / "individual")
    assert set(rows) - {"_text"} == {"individual/seed0/breastmnist", "individual/seed0/pneumoniamnist"}
    # a member stopped with last.pt written (no job): interrupted, not "not started"
    member = RunDir(out / "individual" / "seed0" / "breastmnist")
    member.summary.unlink()
    assert job_status(out)["individual/seed0/breastmnist"][0] == "interrupted"


@pytest.mark.slow
def test_resume_of_a_launched_member_trains_here_and_a_launcher_for_it_is_refused(sequential_series, tmp_path):
    out = tmp_path / "series"
    code, _, err = quiet(train_main, series(sequential_series, out, "--launcher", "local", *JOB, seeds="0"))
    assert code == 0, err
    member = RunDir(out / "seed0")
    record = job_record(out)
    member.summary.unlink()  # as if stopped before its end
    code, stdout, err = quiet(train_main, ["--resume", str(member.path)])
    assert code == 0, err + stdout
    assert job_record(out) == record  # trained in this process: no job, the series' record untouched
    code, _, err = quiet(train_main, ["--resume", str(member.path), "--launcher", "local"])
    assert code == 2 and "is a member of the series" in err


@pytest.mark.slow
def test_init_from_a_run_that_is_training_or_unfinished_is_refused_and_the_start_is_recorded(
    sequential_series, tmp_path
):
    source = tmp_path / "source"
    shutil.copytree(sequential_series[0] / "seq" / "seed0", source, symlinks=True)
    common = ["--config", str(sequential_series[1]), "--epochs", "1"]
    # a run training now: its folder locked by another process
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)",
            str(source),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = quiet(train_main, [*common, "--init-from", str(source), "--output", str(tmp_path / "a")])
        assert code == 2 and "is training now" in err and not (tmp_path / "a").exists()
    finally:
        holder.kill()
        holder.wait()
    best_digest = json.loads(RunDir(source).summary.read_text())["best_digest"]
    code, _, err = quiet(train_main, [*common, "--init-from", str(source), "--output", str(tmp_path / "b")])
    assert code == 0, err
    start = json.loads(RunDir(tmp_path / "b").summary.read_text())["start"]
    assert start["init_from"] == str(source) and start["init_from_best_digest"] == best_digest
    assert len(start["weights_sha256"]) == 64
    RunDir(source).summary.unlink()  # unfinished
    code, _, err = quiet(train_main, [*common, "--init-from", str(source), "--output", str(tmp_path / "c")])
    assert code == 2 and "has not finished" in err and not (tmp_path / "c").exists()
