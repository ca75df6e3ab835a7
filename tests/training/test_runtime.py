"""Runtime: determinism switches and what env.json records of them; the run folder's --overwrite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mmpt.errors import MmptError
from mmpt.io import write_text
from mmpt.runs.rundir import RunDir, prepare_run_dir
from mmpt.runtime.process import configure_determinism

# The switches are global, so they are set in a fresh interpreter (off first: on sets an env variable for good).
PROBE = textwrap.dedent(
    """
    import json, os, torch
    from mmpt.runtime.process import configure_determinism, environment
    result = {}
    for mode in (False, True):
        configure_determinism(0, mode)
        env = environment(torch.device("cpu"), mode)
        result["on" if mode else "off"] = {
            "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "tf32": torch.backends.cuda.matmul.allow_tf32,
            "env": {k: env[k] for k in ("determinism", "cublas_workspace_config", "tf32", "cudnn_benchmark", "torch",
                                        "timm", "medmnist", "device", "git_commit")},
            "first_draw": torch.rand(1).item(),
        }
    print(json.dumps(result))
    """
)


# every test that uses this fixture is marked slow: its runs and theirs take more than about 5 s
@pytest.fixture(scope="module")
def probe() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


@pytest.mark.slow
def test_determinism_on_sets_cublas_workspace_and_deterministic_kernels_and_env_json_says_so(probe):
    on = probe["on"]
    assert on["cublas"] == ":4096:8" and on["env"]["cublas_workspace_config"] == ":4096:8"
    assert on["algorithms"] and on["cudnn_deterministic"] and not on["cudnn_benchmark"] and not on["tf32"]
    assert on["env"]["determinism"] is True and on["env"]["tf32"] is False and on["env"]["cudnn_benchmark"] is False
    assert on["env"]["torch"] == torch.__version__ and on["env"]["device"] == "cpu"
    assert on["env"]["timm"] and on["env"]["medmnist"]
    assert (
        on["first_draw"] == torch.rand(1, generator=torch.Generator().manual_seed(0)).item()
    )  # torch seeded from seed 0


@pytest.mark.slow
def test_determinism_off_allows_cudnn_benchmark_leaves_tf32_to_its_setting_and_env_json_says_so(probe):
    off = probe["off"]
    assert off["cublas"] is None
    assert not off["algorithms"] and off["cudnn_benchmark"] and not off["tf32"]  # train.tf32 is its own setting
    assert off["env"]["determinism"] is False and off["env"]["tf32"] is False and off["env"]["cudnn_benchmark"] is True


def test_determinism_warns_when_cuda_started_before_the_cublas_setting(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.warns(UserWarning, match="CUDA was initialised before mmpt set CUBLAS_WORKSPACE_CONFIG"):
        configure_determinism(0, True)


# The --overwrite tests below check the on-disk layout itself: they spell the run folder's names out on purpose
# (not through RunDir or mmpt.runs.names), so that a renamed output fails here.


def test_overwrite_clears_mmpt_outputs_by_name_and_keeps_everything_else(tmp_path, capsys):
    run = tmp_path / "run"
    prediction = "breastmnist_test_[AUC]0.812_[ACC]0.750@tiny.csv"
    mmpt_files = [
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "tb/events.out.tfevents.1700000000.host.1.0",
        f"predictions/{prediction}",
        "eval/test/metrics.json",
        f"eval/val/predictions/{prediction}",
        "summary.json",
        "env.json",
        "val_history.json",
        "config.yaml",
        "config.before-resume-at-step5.yaml",
        "metrics.md",
        "metrics.csv",
        "metrics.json",
        "val_auc.png",
        ".config.yaml.tmp",
        "loss_curves.png",
        "features/breastmnist_28_test.npy",
        "features/manifest.json",
        "compare.md",
        "compare_auc.png",
        "predictions/data.json",
        "eval/test/confusion_breastmnist.png",
    ]
    user_files = [
        "notes.txt",
        "results.json",
        "my_analysis/plot.py",
        "checkpoints/epoch3-copy.pt",
        "tb/README",
        "predictions/mine.csv",
        "eval/test/my_table.csv",
        "eval/ablation/metrics.json",
    ]
    for name in mmpt_files + user_files:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    with pytest.raises(MmptError, match="already has outputs"):
        prepare_run_dir(run, resume=False, overwrite=False)
    kept = prepare_run_dir(run, resume=False, overwrite=True)
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert left == sorted(user_files)
    # a folder mmpt does not write is kept whole and named once
    assert kept == sorted(
        [
            "notes.txt",
            "results.json",
            "my_analysis",
            "checkpoints/epoch3-copy.pt",
            "tb/README",
            "predictions/mine.csv",
            "eval/test/my_table.csv",
            "eval/ablation",
        ]
    )
    assert "--overwrite kept what mmpt did not write" in capsys.readouterr().out


def test_overwrite_removes_the_recalibrated_evaluations_and_features_of_the_replaced_weights(tmp_path):
    run = tmp_path / "run"
    prediction = "breastmnist_test_[AUC]0.812_[ACC]0.750@tiny.csv"
    written = [  # what evaluate.py --recalibrate-norm and probe --recalibrate-norm wrote for the old weights
        "eval/test-recalibrated/metrics.json",
        "eval/test-recalibrated/metrics.md",
        "eval/test-recalibrated/recalibration.json",
        "eval/test-recalibrated/confusion_breastmnist.png",
        f"eval/test-recalibrated/predictions/{prediction}",
        "eval/test-recalibrated/predictions/data.json",
        "eval/val-recalibrated/metrics.csv",
        "features-recalibrated/breastmnist_28_train.npy",
        "features-recalibrated/manifest.json",
        "checkpoints/best.pt",
    ]
    mine = ["eval/test-recalibrated/notes.txt", "eval/train-recalibrated/metrics.json", "features-recalibrated/x.csv"]
    for name in written + mine:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    kept = prepare_run_dir(run, resume=False, overwrite=True)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) == sorted(mine)
    assert kept == ["eval/test-recalibrated/notes.txt", "eval/train-recalibrated", "features-recalibrated/x.csv"]


def test_overwrite_unlinks_symbolic_links_and_never_touches_what_they_point_to(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("last.pt", "best.pt", "notes.txt"):
        (outside / name).write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(outside, target_is_directory=True)
    (run / "summary.json").symlink_to(outside / "notes.txt")
    (run / "config.yaml").write_text("x")
    prepare_run_dir(run, resume=False, overwrite=True)
    assert sorted(p.name for p in outside.iterdir()) == ["best.pt", "last.pt", "notes.txt"]
    assert all((outside / n).read_text() == "precious" for n in ("last.pt", "best.pt", "notes.txt"))
    assert not any(run.iterdir())


@pytest.mark.parametrize(
    "name, kind",
    [("checkpoints", "file"), ("tb", "file"), ("config.yaml", "folder"), ("checkpoints/last.pt", "folder")],
)
def test_a_file_where_mmpt_writes_a_folder_or_the_reverse_is_one_error(tmp_path, name, kind):
    run = tmp_path / "run"
    (run / name).parent.mkdir(parents=True, exist_ok=True)
    (run / name).mkdir() if kind == "folder" else (run / name).write_text("mine")
    with pytest.raises(MmptError, match=f"has a {kind} named {name} where mmpt writes a"):
        prepare_run_dir(run, resume=False, overwrite=True)
    assert (run / name).exists()


def test_a_record_rewritten_on_resume_keeps_its_earlier_text(tmp_path):
    run = RunDir(tmp_path)
    path, kept = run.config, run.before_resume(run.config, 3)
    assert kept == tmp_path / "config.before-resume-at-step3.yaml"
    write_text(path, "lr: 1\n")
    write_text(path, "lr: 1\n", keep_previous_as=kept)
    assert not kept.exists()  # unchanged: nothing to keep
    write_text(path, "lr: 2\n", keep_previous_as=kept)
    assert path.read_text() == "lr: 2\n"
    assert (tmp_path / "config.before-resume-at-step3.yaml").read_text() == "lr: 1\n"
