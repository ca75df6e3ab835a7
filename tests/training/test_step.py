"""The training step: it never reads a value back from the device, and it trains in every precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmpt.config import load_config
from mmpt.data.loader import plan_loader
from mmpt.data.store import open_data
from mmpt.model.build import build_model
from mmpt.tasks import resolve_tasks
from mmpt.training.build import build_sampler, build_step
from tests.helpers import refuse_reads_from_mmpt


def make_step(root: Path, precision: str = "fp32"):
    cfg = load_config(
        overrides=[
            {
                "data": {"root": str(root), "datasets": ["breast", "chest", "retina"], "num_workers": 0},
                "model": {"backbone": "test_resnet", "img_size": 32},
                "input": {
                    "mode": "pad",
                    "augment": {"hflip": True, "rotate_degrees": 10.0, "random_resized_crop": True},
                },
                "optim": {"lr": 0.003, "clip_grad_norm": 1.0},
                "loss": {"weighting": "size"},
                "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "precision": precision},
            }
        ]
    )
    tasks = resolve_tasks(cfg.data.datasets)
    data = open_data(cfg.data, tasks)
    torch.manual_seed(0)
    model, losses = build_model(cfg, tasks)
    sampler = build_sampler(cfg, {f: len(d.splits["train"]) for f, d in data.items()})
    step = build_step(cfg, model, losses, sampler, torch.device("cpu"))
    loader = plan_loader({f: d.splits["train"] for f, d in data.items()}, sampler.plan(0), num_workers=0)
    return step, model, loader


def test_step_never_reads_a_value_back_from_the_device(synthetic_root, monkeypatch):
    step, _, loader = make_step(synthetic_root)
    batches = [parts for _, parts in zip(range(8), loader)]
    calls = refuse_reads_from_mmpt(monkeypatch)
    for i, parts in enumerate(batches):
        step(parts, i)
    monkeypatch.undo()
    assert calls == []
    # the caller reads the losses once, at its logging interval
    sums, nonfinite = step.read_losses()
    assert not nonfinite and sum(count for _, count in sums.values()) == 8


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_step_trains_in_reduced_precision(synthetic_root, precision):
    step, model, loader = make_step(synthetic_root, precision)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    for i, parts in zip(range(6), loader):
        step(parts, i)
    sums, nonfinite = step.read_losses()
    assert not nonfinite and all(torch.isfinite(torch.tensor(s)) for s, _ in sums.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.backbone.parameters()))
    # the fp16 gradient scaler's state is part of the step's resume state
    assert ("scaler" in step.state_dict()) == (precision == "fp16")


def test_augmentation_differs_across_ranks_and_replays_from_seed_step_and_rank():
    from mmpt.training.step import augmentation_seed

    assert augmentation_seed(0, 5, 0) == augmentation_seed(0, 5, 0)
    assert (
        len(
            {
                augmentation_seed(0, 5, 0),
                augmentation_seed(0, 5, 1),
                augmentation_seed(0, 6, 0),
                augmentation_seed(1, 5, 0),
            }
        )
        == 4
    )
