"""Exact resume: a run stopped at any step, by a crash, SIGTERM or SIGKILL, ends bitwise identical."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import mmpt.training.loop
import mmpt.training.step
from mmpt.config import to_dict
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.rundir import RunDir
from mmpt.training.loop import run
from tests.helpers import REPO, crash_at_step, summary, tiny_config

SMALL = {"datasets": ["breast", "retina", "chest"], "num_workers": 0}


def resume_config(root, output, **sections):
    """Three tiny tasks, 3 epochs, dropout and augmentation on: every source of randomness is exercised."""
    sections.setdefault("train", {})
    sections["train"] = {"epochs": 3, "batch_size": 16, **sections["train"]}
    return tiny_config(
        root,
        output,
        data=SMALL,
        model={"backbone": "test_resnet", "drop_rate": 0.2, "img_size": 32},
        input={"mode": "pad", "augment": {"hflip": True, "rotate_degrees": 10.0}},
        **sections,
    )


# every test that uses this fixture is marked slow: its runs and theirs take more than about 5 s
@pytest.fixture(scope="module")
def reference(synthetic_root, tmp_path_factory):
    """The uninterrupted run's summary (no intermediate checkpoints)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run(resume_config(synthetic_root, out))
    return {**summary(out), "history": history(out)}


def history(out: Path) -> list[dict]:
    return json.loads(RunDir(out).val_history.read_text())["history"]


def assert_same_history(out: Path, reference: dict) -> None:
    """The resumed run's val_history.json is the uninterrupted one's: each epoch's validation and weights exactly,
    its mean train loss to float summation order (the loss sums are read at other steps when checkpoints differ)."""
    resumed = history(out)
    assert [e["epoch"] for e in resumed] == [e["epoch"] for e in reference["history"]]
    for mine, theirs in zip(resumed, reference["history"]):
        assert mine["val"] == theirs["val"] and mine["weights"] == theirs["weights"] and mine["step"] == theirs["step"]
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-6)


@pytest.mark.slow
def test_checkpointing_every_step_does_not_change_the_trajectory(synthetic_root, tmp_path, reference):
    out = tmp_path / "every5"
    run(resume_config(synthetic_root, out, checkpoint={"every_steps": 5}))
    assert summary(out)["final_digest"] == reference["final_digest"]
    assert summary(out)["best_digest"] == reference["best_digest"]


@pytest.mark.parametrize("crash_step", [7, 30, 47])  # mid-epoch 1, mid-epoch 2, last step of epoch 2
@pytest.mark.slow
def test_resume_after_crash_matches_uninterrupted_run(synthetic_root, tmp_path, reference, monkeypatch, crash_step):
    out = tmp_path / "crashed"
    cfg = resume_config(synthetic_root, out, checkpoint={"every_steps": 4})
    crash_at_step(monkeypatch, crash_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg)
    monkeypatch.undo()
    saved = ckpt.load(RunDir(out).last)[ckpt.PROGRESS]
    assert 0 < saved["step"] <= crash_step

    run(cfg, resume=True)
    assert summary(out)["final_digest"] == reference["final_digest"]
    assert summary(out)["best_digest"] == reference["best_digest"]
    assert summary(out)["steps"] == reference["steps"]
    assert_same_history(out, reference)  # the interrupted epoch's train loss included


def _start_training(config_path: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "--config", str(config_path), *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


@pytest.mark.slow
def test_sigterm_finishes_the_step_writes_last_and_resumes_exactly(synthetic_root, tmp_path, reference):
    out = tmp_path / "sigterm"
    cfg = resume_config(synthetic_root, out)
    # a checkpoint every 2 steps (which leaves the trajectory as it is) marks a moment inside training: the
    # signal then arrives mid-epoch however fast the machine is
    marked = resume_config(synthetic_root, out, checkpoint={"every_steps": 2})
    proc = _start_training(_write_config(marked, tmp_path / "cfg.yaml"))
    _wait_for(RunDir(out).last, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert f"--resume {out}" in stderr and "SIGTERM" in stderr
    assert RunDir(out).last.is_file()

    run(cfg, resume=True)
    assert summary(out)["final_digest"] == reference["final_digest"]
    assert_same_history(out, reference)


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_matches(synthetic_root, tmp_path, reference):
    out = tmp_path / "sigkill"
    # a checkpoint every step: the kill very likely lands during a write
    cfg = resume_config(synthetic_root, out, checkpoint={"every_steps": 1})
    proc = _start_training(_write_config(cfg, tmp_path / "cfg.yaml"))
    _wait_for(RunDir(out).last, proc)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.5))
    proc.kill()
    proc.communicate(timeout=60)
    # no temp file may pass for a checkpoint; last.pt is whole
    state = ckpt.load(RunDir(out).last)
    assert state[ckpt.PROGRESS]["step"] > 0

    run(cfg, resume=True)
    assert summary(out)["final_digest"] == reference["final_digest"]


@pytest.mark.slow
def test_resume_cli_continues_a_stopped_run(synthetic_root, tmp_path, reference, monkeypatch):
    from mmpt.cli import train_main

    out = tmp_path / "cli"
    cfg = resume_config(synthetic_root, out, checkpoint={"every_steps": 10})
    crash_at_step(monkeypatch, 25)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg)
    monkeypatch.undo()
    assert train_main(["--resume", str(out)]) == 0
    assert summary(out)["final_digest"] == reference["final_digest"]


def test_time_based_checkpoint_bounds_what_a_crash_costs(synthetic_root, tmp_path, monkeypatch):
    # every_minutes tiny: last.pt is due after every step (one process checks the clock each step), so a crash
    # in step 14 keeps the 13 steps before it; with every_minutes 0, nothing is written before the epoch ends
    for minutes, kept in ((1e-9, 13), (0, None)):
        out = tmp_path / f"minutes{minutes}"
        cfg = resume_config(synthetic_root, out, checkpoint={"every_minutes": minutes})
        crash_at_step(monkeypatch, 13)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(cfg)
        monkeypatch.undo()
        last = RunDir(out).last
        assert (ckpt.load(last)[ckpt.PROGRESS]["step"] if last.exists() else None) == kept


@pytest.mark.parametrize("call, phase", [(1, "during validation"), (4, "during the test evaluation")])
@pytest.mark.slow
def test_stop_during_validation_or_test_resumes_to_the_uninterrupted_result(
    synthetic_root, tmp_path, reference, monkeypatch, call, phase
):
    # evaluate_all runs once per epoch (3) and once for the test report: a signal arrives in its `call`-th run
    out = tmp_path / "a run; with spaces"
    real, calls = mmpt.training.loop.evaluate_all, []

    def signalled(*args, stop, **kwargs):
        calls.append(1)
        if len(calls) == call:
            stop.received = "SIGTERM"
        return real(*args, stop=stop, **kwargs)

    monkeypatch.setattr(mmpt.training.loop, "evaluate_all", signalled)
    with pytest.raises(mmpt.training.loop.Stopped) as stopped:
        run(resume_config(synthetic_root, out))
    monkeypatch.undo()
    # the printed command pastes into a shell as it is, whatever the folder's name
    assert phase in str(stopped.value) and f"python train.py --resume {shlex.quote(str(out))}" in str(stopped.value)
    assert not RunDir(out).summary.exists()
    run(resume_config(synthetic_root, out), resume=True)
    assert summary(out)["final_digest"] == reference["final_digest"]
    assert summary(out)["best_digest"] == reference["best_digest"]


def test_a_last_pt_without_any_part_of_the_training_state_is_refused_and_left_as_it_was(synthetic_root, tmp_path):
    from mmpt.errors import MmptError

    out = tmp_path / "run"
    run(resume_config(synthetic_root, out, train={"epochs": 1}))
    last = RunDir(out).last
    full = ckpt.load(last)
    parts = set(full) - {ckpt.FORMAT}
    state = {ckpt.MODEL, ckpt.OPTIMIZERS, ckpt.WEIGHTING, ckpt.STEP, ckpt.PROGRESS, ckpt.EARLY_STOPPING, ckpt.RNG}
    assert parts == state | {ckpt.CONFIG, ckpt.DATA}
    # without the model or the config a file is not a checkpoint at all (ckpt.load says so); every other part is
    # named by the training state, which iterates the same mapping it saves
    for part in sorted(set(parts) - {ckpt.MODEL, ckpt.CONFIG}):
        ckpt.save(last, {k: v for k, v in full.items() if k not in (part, ckpt.FORMAT)})
        before = (last.read_bytes(), RunDir(out).config.read_bytes())
        with pytest.raises(MmptError, match=f"has no {part} state, so training cannot continue from it"):
            run(resume_config(synthetic_root, out, train={"epochs": 2}), resume=True)
        assert (last.read_bytes(), RunDir(out).config.read_bytes()) == before
