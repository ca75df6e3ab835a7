"""The gradient-conflict diagnostic: it changes no result, its cosines are the gradients' own, and its outputs."""

from __future__ import annotations

import copy
import dataclasses
import json

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmpt.config import InputConfig, ModelConfig
from mmpt.data.loader import Part
from mmpt.data.store import open_data
from mmpt.evaluation.plots import conflict_figure, conflict_title, plot_gradient_conflicts
from mmpt.model.build import build_model
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.rundir import RunDir
from mmpt.tasks import FLAGS, resolve_tasks
from mmpt.training.build import build_sampler, build_step
from mmpt.training.conflicts import AUTO_EVERY_STEPS, BATCHES, GRAMIAN, STEP, conflict_interval, conflict_source
from mmpt.training.loop import run
from tests.helpers import assert_png, crash_at_step, refuse_reads_from_mmpt, summary, tiny_config

THREE = ["breast", "retina", "chest"]  # medmnist order: chest, retina, breast
SOURCE_SETTINGS = {
    BATCHES: {},  # one dataset per step
    STEP: {"sampler": {"tasks_per_step": 2}},  # several per step, a static weighting
    GRAMIAN: {"sampler": {"tasks_per_step": 2}, "loss": {"weighting": "pcgrad"}},  # several, a Jacobian method
}


def conflict_config(root, output, source: str, every: int, **train):
    """Three datasets, 2 epochs, dropout and augmentation on: the diagnostic must leave every random draw alone."""
    return tiny_config(
        root,
        output,
        data={"datasets": THREE},
        model={"backbone": "test_resnet", "drop_rate": 0.2},
        input={"mode": "native", "augment": {"hflip": True, "rotate_degrees": 10.0}},
        train={"epochs": 2, "conflict_every_steps": every, **train},
        **SOURCE_SETTINGS[source],
    )


# every test that uses this fixture is marked slow: its runs and theirs take more than about 5 s
@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory):
    """For each source: the run folder with the diagnostic every 3 steps, and the summaries with it on and off."""
    out = {}
    for source in SOURCE_SETTINGS:
        base = tmp_path_factory.mktemp(source)
        run(conflict_config(synthetic_root, base / "on", source, 3))
        run(conflict_config(synthetic_root, base / "off", source, 0))
        out[source] = (base / "on", summary(base / "on"), summary(base / "off"))
    return out


@pytest.mark.parametrize("source", list(SOURCE_SETTINGS))
@pytest.mark.slow
def test_the_diagnostic_changes_no_result(runs, source):
    run_dir, on, off = runs[source]
    assert on["final_digest"] == off["final_digest"] and on["best_digest"] == off["best_digest"]
    assert on["test_mean"] == off["test_mean"]
    record = json.loads(RunDir(run_dir).gradient_conflicts.read_text())
    assert record["source"] == source and record["every_steps"] == 3
    assert record["datasets"] == [f for f in FLAGS if f.removesuffix("mnist") in THREE]
    steps = [m["step"] for m in record["measurements"]]
    assert steps == list(range(3, on["steps"] + 1, 3))
    for m in record["measurements"]:
        cosine = np.array([[np.nan if v is None else v for v in row] for row in m["cosine"]])
        covered = ~np.isnan(cosine)
        # a step of several datasets covers its own pairs; one batch of each dataset covers every pair
        assert covered.sum() == (9 if source == BATCHES else 4)
        assert np.allclose(np.diag(cosine)[np.diag(covered)], 1, atol=1e-5)
        assert np.allclose(cosine[covered], cosine.T[covered]) and np.all(np.abs(cosine[covered]) <= 1 + 1e-5)
        # each measured dataset's gradient norm, and its ratio to the mean of those measured with it
        norms = {t: v for t, v in m["grad_norm"].items() if v is not None}
        assert len(norms) == (3 if source == BATCHES else 2) and all(v > 0 for v in norms.values())
        mean = sum(norms.values()) / len(norms)
        assert all(m["grad_norm_ratio"][t] == pytest.approx(v / mean) for t, v in norms.items())
    assert_png(RunDir(run_dir).gradient_conflicts_plot)


@pytest.mark.slow
def test_the_record_continues_exactly_across_a_resume(synthetic_root, tmp_path, runs, monkeypatch):
    run_dir, reference, _ = runs[BATCHES]
    out = tmp_path / "crashed"
    cfg = conflict_config(synthetic_root, out, BATCHES, 3)
    crash_at_step(monkeypatch, 16)  # mid-epoch 2, after an epoch-end checkpoint at step 12
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg)
    monkeypatch.undo()
    assert ckpt.load(RunDir(out).last)[ckpt.STEP]["conflicts"]["steps"].tolist() == [3, 6, 9, 12]
    run(cfg, resume=True)
    assert summary(out)["final_digest"] == reference["final_digest"]
    written = json.loads(RunDir(out).gradient_conflicts.read_text())
    assert written == json.loads(RunDir(run_dir).gradient_conflicts.read_text())


def step_with_conflicts(root, source: str, norm: str = "auto"):
    """A TrainStep of three datasets measuring at every step, with its model and the train splits."""
    cfg = conflict_config(root, root / "unused", source, 1)
    # no dropout, no augmentation: the gradients by hand see the same computation
    cfg = dataclasses.replace(
        cfg, model=ModelConfig(backbone="test_resnet", norm=norm), input=InputConfig(mode="native")
    )
    tasks = resolve_tasks(cfg.data.datasets)
    data = open_data(cfg.data, tasks)
    splits = {f: d.splits["train"] for f, d in data.items()}
    torch.manual_seed(0)
    model, losses = build_model(cfg, tasks)
    model.train()
    sampler = build_sampler(cfg, {f: len(s) for f, s in splits.items()})
    step = build_step(cfg, model, losses, sampler, torch.device("cpu"), train_splits=splits)
    return step, model, losses, splits


def gradient_by_hand(model, losses, task: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The flattened gradient of `task`'s loss on (x, y) w.r.t. the backbone, by .backward() on a copy of the model."""
    model = copy.deepcopy(model)
    loss = losses[task](model(x, task), y)
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.backbone.parameters()])


@pytest.mark.parametrize("norm", ["shared", "per_dataset_stats"])
def test_one_batch_of_each_dataset_gives_the_cosines_of_their_gradients_and_leaves_the_model_alone(
    synthetic_root, norm, monkeypatch
):
    step, model, losses, _ = step_with_conflicts(synthetic_root, BATCHES, norm)
    conflicts = step.conflicts
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    calls = refuse_reads_from_mmpt(monkeypatch)  # the measurement never waits on the device either
    conflicts.measure_batches(
        4,
        model,
        losses,
        lambda im: step.transform(im),
        step.shared_params,
        forward=step._diagnostic_forward,
        device=torch.device("cpu"),
    )
    monkeypatch.undo()
    assert calls == []
    ((at, matrix, norms),) = conflicts.fresh()
    assert at == 5
    # by hand: each dataset's batch for that step, its gradient on the backbone, the cosine of each pair
    grads = {}
    for task in conflicts.tasks:
        images, labels = conflicts.batch_of(task, 4)
        assert len(images) == 32
        grads[task] = gradient_by_hand(
            model, losses, task, step.transform(torch.from_numpy(images)), torch.from_numpy(labels)
        )
    for i, a in enumerate(conflicts.tasks):
        # the magnitude beside the angle: each dataset's gradient norm on the backbone
        assert norms[i] == pytest.approx(grads[a].norm().item(), rel=2e-5), a
        for j, b in enumerate(conflicts.tasks):
            expected = F.cosine_similarity(grads[a], grads[b], dim=0).item()
            assert matrix[i][j] == pytest.approx(expected, abs=2e-5), (a, b)
    assert len({round(matrix[i][j], 3) for i in range(3) for j in range(i)}) == 3  # three different pairs
    # the model, its BatchNorm statistics, its gradients and the RNG are as they were
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("source", [STEP, GRAMIAN])
def test_a_step_of_several_datasets_gives_the_cosines_of_its_own_gradients(synthetic_root, source, monkeypatch):
    step, model, losses, splits = step_with_conflicts(synthetic_root, source)
    before = copy.deepcopy(model)
    parts = []
    for task in ("breastmnist", "chestmnist"):
        idx = np.arange(0, 32) if task == "breastmnist" else np.arange(40, 72)
        images = np.ascontiguousarray(splits[task].open_images()[idx])
        parts.append(Part(task, torch.from_numpy(images), torch.from_numpy(splits[task].labels[idx]), len(idx)))
    if source == STEP:  # (an aggregator's solver reads from the device by design)
        calls = refuse_reads_from_mmpt(monkeypatch)
    step(parts, 0)
    monkeypatch.undo()
    assert source != STEP or calls == []  # the measurement adds no read from the device to the step
    ((_, matrix, norms),) = step.conflicts.fresh()
    # by hand: the step's forward of both slices together (as it normalises them), each dataset's loss backward
    x = torch.cat([step.transform(p.images) for p in parts])
    grads = []
    for k, part in enumerate(parts):
        model_copy = copy.deepcopy(before)
        model_copy.set_norm_layout([(p.task, len(p.labels)) for p in parts])
        features = model_copy.backbone(x).split([len(p.labels) for p in parts])
        losses[part.task](model_copy.heads[part.task](features[k]), part.labels).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model_copy.backbone.parameters()]))
    row = {t: i for i, t in enumerate(step.conflicts.tasks)}
    expected = F.cosine_similarity(grads[0], grads[1], dim=0).item()
    assert matrix[row["breastmnist"]][row["chestmnist"]] == pytest.approx(expected, abs=2e-5)
    assert np.isnan(matrix[row["retinamnist"]][row["chestmnist"]])  # not in the step
    assert norms[row["breastmnist"]] == pytest.approx(grads[0].norm().item(), rel=2e-5)
    assert norms[row["chestmnist"]] == pytest.approx(grads[1].norm().item(), rel=2e-5)
    assert np.isnan(norms[row["retinamnist"]])


def test_the_heat_map_has_one_cell_per_pair_coloured_by_its_value(tmp_path):
    tasks = ("chestmnist", "pneumoniamnist", "retinamnist", "breastmnist")
    mean = np.eye(4)
    pairs = {(1, 0): -0.42, (2, 0): 0.31, (2, 1): 0.05, (3, 0): -0.08, (3, 1): 0.0, (3, 2): 0.6}
    for (i, j), v in pairs.items():
        mean[i, j] = mean[j, i] = v
    path = plot_gradient_conflicts(mean, tasks, [100, 200, 300], 100, tmp_path / "conflicts.png")
    assert_png(path)
    image = matplotlib.image.imread(path)[..., :3]
    # the same figure, drawn again, says where each cell is and what it prints
    fig, ax = conflict_figure(mean, tasks, conflict_title([100, 200, 300], 100))
    fig.tight_layout()
    fig.canvas.draw()
    assert "mean of 3 measurements, steps 100-300, every 100" in ax.get_title()
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert len(texts) == len(pairs) == 6
    height = image.shape[0]
    colours = ax.images[0]
    for (i, j), v in pairs.items():
        assert texts[(i - 1, j)] == f"{v:+.2f}"
        # a point inside the cell, off its centred text
        x, y = ax.transData.transform((j - 0.35, i - 1 - 0.35))
        pixel = image[round(height - y), round(x)]
        expected = np.array(colours.cmap(colours.norm(v))[:3])
        assert np.abs(pixel - expected).max() < 0.03, ((i, j), v, pixel, expected)
    # above the diagonal: no cell (the figure's white)
    x, y = ax.transData.transform((2, 0))
    assert np.all(image[round(height - y), round(x)] > 0.97)
    # the colours are centred on 0: a conflict is red, an agreement blue
    red, blue = (np.array(colours.cmap(colours.norm(v))[:3]) for v in (-0.42, 0.6))
    assert red[0] > red[2] and blue[2] > blue[0]


def test_the_diagnostic_is_on_by_default_only_where_it_costs_nothing():
    assert conflict_source(True, True, 1) == GRAMIAN and conflict_source(True, False, 1) == STEP
    assert conflict_source(False, False, 1) == conflict_source(True, False, 2) == BATCHES
    assert conflict_interval(None, GRAMIAN, 3) == AUTO_EVERY_STEPS
    assert conflict_interval(None, STEP, 3) == conflict_interval(None, BATCHES, 12) == 0
    assert conflict_interval(50, BATCHES, 12) == 50 and conflict_interval(0, GRAMIAN, 3) == 0
    assert conflict_interval(50, BATCHES, 1) == 0  # one dataset: no pair
