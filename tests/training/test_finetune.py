"""Fine-tuning from a trained run (mm-PFT): LP-FT's probe phase, its refusals, and its exact resume."""

from __future__ import annotations

import contextlib
import dataclasses
import io

import pytest
import torch

from mmpt.cli import train_main
from mmpt.config import CheckpointConfig
from mmpt.errors import MmptError
from mmpt.model.build import build_model, load_initial_weights
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.rundir import RunDir
from mmpt.tasks import resolve_tasks
from mmpt.training.loop import run
from mmpt.training.optim import BACKBONE
from tests.helpers import REPO, crash_at_step, summary, tiny_config

SMALL = {"datasets": ["breast", "retina", "chest"], "num_workers": 0}
STEPS_PER_EPOCH = 12  # 3 datasets x 128 images / batch 32


# every test that uses this fixture is marked slow: its runs and theirs take more than about 5 s
@pytest.fixture(scope="module")
def source(synthetic_root, tmp_path_factory):
    """A 1-epoch mm-PT run of the three datasets: the weights the fine-tuning starts from."""
    out = tmp_path_factory.mktemp("source") / "run"
    run(tiny_config(synthetic_root, out, data=SMALL))
    return out


def lpft_config(root, source, output, **train):
    """LP-FT from `source`: 1 probe epoch of 3, with dropout, augmentation, warmup and layer decay on."""
    return tiny_config(
        root,
        output,
        data=SMALL,
        model={"backbone": "test_resnet", "init_from": str(source), "drop_rate": 0.2},
        input={"mode": "native", "augment": {"hflip": True}},
        optim={"lr": 0.003, "warmup_epochs": 0.5, "layer_decay": 0.7},
        train={"epochs": 3, "probe_epochs": 1, **train},
    )


@pytest.fixture(scope="module")
def reference(synthetic_root, source, tmp_path_factory):
    """The uninterrupted LP-FT run's summary."""
    out = tmp_path_factory.mktemp("lpft") / "run"
    run(lpft_config(synthetic_root, source, out))
    return summary(out)


@pytest.mark.slow
def test_the_probe_epochs_train_the_heads_on_a_frozen_backbone_whose_statistics_stay_as_loaded(
    synthetic_root, source, tmp_path, reference, monkeypatch
):
    out = tmp_path / "boundary"
    cfg = lpft_config(synthetic_root, source, out)
    crash_at_step(monkeypatch, STEPS_PER_EPOCH)  # the first fine-tuning step: last.pt holds the probe's end
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg)
    monkeypatch.undo()
    saved = ckpt.load(RunDir(out).last)
    assert saved[ckpt.PROGRESS]["step"] == STEPS_PER_EPOCH
    loaded, _ = build_model(cfg, resolve_tasks(cfg.data.datasets))
    load_initial_weights(loaded, source, cfg)
    assert loaded.norm == "per_dataset_stats"  # three datasets: each its own statistics, each as loaded
    for name, value in loaded.state_dict().items():
        if name.startswith("backbone."):  # weights, running statistics and their counts
            assert torch.equal(saved[ckpt.MODEL][name], value), name
        else:  # every head trained (CORAL's included)
            assert not torch.equal(saved[ckpt.MODEL][name], value), name
    # the backbone's optimizer has not stepped, so its schedule has not started; each head stepped 4 times
    updates = saved[ckpt.OPTIMIZERS]["updates"]
    assert BACKBONE not in updates and updates == dict.fromkeys(cfg.data.datasets, 4)
    # resumed at the phase boundary, the run ends as the uninterrupted one, which did fine-tune the backbone
    run(cfg, resume=True)
    assert summary(out)["final_digest"] == reference["final_digest"]
    final = ckpt.load(RunDir(out).last)
    assert final[ckpt.OPTIMIZERS]["updates"][BACKBONE] == 2 * STEPS_PER_EPOCH
    assert not torch.equal(final[ckpt.MODEL]["backbone.conv1.0.weight"], loaded.state_dict()["backbone.conv1.0.weight"])


@pytest.mark.parametrize("crash_step", [6, 19])  # mid-probe, mid-fine-tuning
@pytest.mark.slow
def test_resume_mid_probe_or_mid_fine_tuning_matches_the_uninterrupted_run(
    synthetic_root, source, tmp_path, reference, monkeypatch, crash_step
):
    out = tmp_path / "crashed"
    every4 = dataclasses.replace(
        lpft_config(synthetic_root, source, out), checkpoint=CheckpointConfig(every_steps=4, every_minutes=0)
    )
    crash_at_step(monkeypatch, crash_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(every4)
    monkeypatch.undo()
    assert ckpt.load(RunDir(out).last)[ckpt.PROGRESS]["step"] == crash_step // 4 * 4
    run(every4, resume=True)
    assert summary(out)["final_digest"] == reference["final_digest"]
    assert summary(out)["best_digest"] == reference["best_digest"]


def test_lp_ft_without_trained_weights_is_refused_in_one_line(synthetic_root, tmp_path):
    with pytest.raises(MmptError, match=r"train.probe_epochs 1 trains the heads on a frozen backbone, which needs"):
        tiny_config(synthetic_root, tmp_path / "run", train={"epochs": 3, "probe_epochs": 1})
    # pretrained weights are trained weights too (only the config is built here: nothing is downloaded)
    cfg = tiny_config(
        synthetic_root, tmp_path / "run", model={"pretrained": True}, train={"probe_epochs": 1, "epochs": 2}
    )
    assert cfg.train.probe_epochs == 1
    with pytest.raises(MmptError, match=r"train.probe_epochs 3 must be less than train.epochs 3"):
        tiny_config(synthetic_root, tmp_path / "run", model={"init_from": "x"}, train={"epochs": 3, "probe_epochs": 3})
    with pytest.raises(MmptError, match=r"needs one optimizer and schedule per head"):
        tiny_config(
            synthetic_root,
            tmp_path / "run",
            model={"init_from": "x"},
            optim={"per_head": False},
            train={"epochs": 3, "probe_epochs": 1},
        )
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train_main(
            [
                "--config",
                str(REPO / "configs" / "quickstart.yaml"),
                "--set",
                "train.probe_epochs=1",
                "--output",
                str(tmp_path / "q"),
            ]
        )
    assert code == 2 and err.getvalue().startswith("error: invalid config: train.probe_epochs 1")
    assert err.getvalue().count("\n") == 1 and not (tmp_path / "q").exists()
