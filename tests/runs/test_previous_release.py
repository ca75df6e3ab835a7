"""A run folder written by the previous release loads in this one: the run in tests/fixtures/previous_release was
trained by commit c8b3d76 (before the flat modules moved into packages): test_efficientnet on synthetic BreastMNIST
and RetinaMNIST, per-dataset BatchNorm statistics, 2 epochs; its data files beside it. Checkpoints hold tensors and
plain values only, so no module path of the earlier release is read back."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml
from submitit.helpers import DelayedSubmission

from mmpt.cli import evaluate_main, train_main
from mmpt.config import load_config
from mmpt.experiments.series import Variant, plan_series, train_member
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.rundir import RunDir
from tests.helpers import TINY_RUN, quiet, summary

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "previous_release"


@pytest.fixture
def old_run(tmp_path) -> tuple[Path, Path]:
    """A copy of the previous release's run folder and its data (the fixture itself is never written to)."""
    shutil.copytree(FIXTURE, tmp_path / "previous")
    return tmp_path / "previous" / "run", tmp_path / "previous" / "data"


def test_evaluate_reproduces_the_test_metrics_the_previous_release_wrote(old_run, tmp_path):
    run, data = old_run
    code, _, err = quiet(evaluate_main, [str(run), "--data-root", str(data), "--output", str(tmp_path / "eval")])
    assert code == 0, err
    then = json.loads((run / "metrics.json").read_text())
    now = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(now) == set(then) == {"breastmnist", "retinamnist", "mean"}
    for flag, metrics in then.items():
        # the same weights on the same images: AUC and ACC rank and threshold the scores, the loss may differ by
        # another processor's rounding (float32, about 1e-7 of it)
        assert now[flag]["auc"] == pytest.approx(metrics["auc"], abs=1e-12), flag
        assert now[flag]["acc"] == pytest.approx(metrics["acc"], abs=1e-12), flag
        assert now[flag]["loss"] == pytest.approx(metrics["loss"], rel=1e-5), flag


def test_its_weights_start_a_new_run_and_export_as_a_timm_model(old_run, tmp_path):
    run, data = old_run
    argv = ["--data-root", str(data), "--output", str(tmp_path / "tuned"), *TINY_RUN, "--backbone", "test_efficientnet"]
    code, out, err = quiet(train_main, [*argv, "--datasets", "breast", "--init-from", str(run)])
    assert code == 0, err
    assert "backbone and heads of breastmnist" in out
    code, _, err = quiet(evaluate_main, ["export", str(run), "--output", str(tmp_path / "exported")])
    assert code == 0, err
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def test_its_last_checkpoint_resumes_for_more_epochs(old_run):
    run, data = old_run
    before = ckpt.load(RunDir(run).last)[ckpt.PROGRESS]["step"]
    # the data files were copied here (another mtime), so the resume says they are the run's own
    argv = ["--resume", str(run), "--data-root", str(data), "--epochs", "3", "--set", "data.allow_changed=true"]
    code, _, err = quiet(train_main, argv)
    assert code == 0, err
    assert summary(run)["steps"] == before + 4  # one more epoch of 4 steps


def test_a_slurm_job_the_previous_release_queued_resumes_after_the_upgrade(old_run, tmp_path, capsys):
    """submitit unpickles a job again when it requeues it after a time limit. job.pkl is a member's job as the
    previous release pickled it (its config as that release's classes, the launch: section's from a module since
    moved); it loads, its config reads as the record it was, and the member continues from its last.pt."""
    run, data = old_run
    job = DelayedSubmission.load(FIXTURE / "job.pkl").function
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    recorded["data"]["root"], recorded["output"] = "/previous-release/data", "/previous-release/series"
    assert (job.label, job.threads, job.variant.path) == ("seed0", 1, "seed0")
    asked = load_config(overrides=[{k: v for k, v in recorded.items() if k != "name"}])
    assert job.variant == plan_series(asked, seeds=[0])[0]
    # the member stopped by its time limit: its folder holds last.pt and no summary yet
    member = tmp_path / "series" / "seed0"
    shutil.copytree(run, member)
    RunDir(member).summary.unlink()
    cfg = job.variant.cfg
    moved = dataclasses.replace(
        cfg,
        output=str(member),
        data=dataclasses.replace(cfg.data, root=str(data), allow_changed=True),  # the files were copied here
    )
    train_member(Variant(job.variant.path, moved), overwrite=False, label=job.label)
    assert "seed0: continuing from last.pt" in capsys.readouterr().out
    assert summary(member)["steps"] == ckpt.load(RunDir(member).last)[ckpt.PROGRESS]["step"] == 8
