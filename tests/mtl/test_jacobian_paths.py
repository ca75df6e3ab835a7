"""The two ways a gradient-based method gets its Jacobian (loss.jacobian): one backward pass for the whole Jacobian
(one_pass: each dataset's own forward pass with views of the shared weights) gives the step TorchJD's mtl_backward
gives (autojac: one backward pass per dataset), for every method; auto takes one_pass wherever it computes the same
Jacobian and says which path ran; a path a run cannot take is one error line before anything is written."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmpt.cli import train_main
from mmpt.config import load_config
from mmpt.config.methods import ALL, GRADIENT, METHODS, missing_solvers
from mmpt.errors import MmptError
from mmpt.runtime.process import configure_determinism
from mmpt.training.setup import set_up
from tests.helpers import TINY_RUN, folder_snapshot, quiet, tiny_config
from tests.tolerances import below

DATASETS = ["breastmnist", "retinamnist", "chestmnist", "pneumoniamnist"]
GRADIENT_METHODS = [m for m, spec in METHODS.items() if spec.kind == GRADIENT and not missing_solvers(m)]
# measured over every method, test_resnet (per-dataset statistics) and test_vit, first step: the gradients' relative
# difference at most 1.0e-6 and a dataset weight's 7.2e-7 (float32 summation order): bounds ten times that
GRADIENT_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-5


def first_step(root, method: str, path: str, backbone: str = "test_resnet") -> tuple[dict, dict, str]:
    """The gradient of every parameter and the dataset weights of a run's first step on `path`, and the path taken."""
    tasks_per_step = "all" if METHODS[method].tasks == ALL else 3
    vit = {"img_size": 32} if backbone == "test_vit" else {}
    cfg = tiny_config(
        root,
        root / "unused",
        data={"datasets": DATASETS},
        model={"backbone": backbone, **vit},
        input={"mode": "pad" if vit else "native"},
        sampler={"tasks_per_step": tasks_per_step},
        loss={"weighting": method, "jacobian": path},
        train={"batch_size": 8},
    )
    configure_determinism(cfg.train.seed, cfg.determinism, cfg.train.tf32)
    setup = set_up(cfg)
    setup.model.train()
    grads = {}
    step = setup.step
    real = step.optimizers.step

    def keep_gradients(tasks, scaler):
        grads.update({n: p.grad.clone() for n, p in setup.model.named_parameters() if p.grad is not None})
        return real(tasks, scaler)

    step.optimizers.step = keep_gradients
    step(next(iter(setup.train_loader(0))), 0)
    return grads, {t: float(w) for t, w in step.method_run.dataset_weights().items()}, step.jacobian


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    difference = sum(((a[k] - b[k]).double() ** 2).sum() for k in a).sqrt()
    return float(difference / sum((v.double() ** 2).sum() for v in b.values()).sqrt())


@pytest.mark.slow
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_the_one_pass_jacobian_gives_the_step_mtl_backward_gives(synthetic_root, method):
    one, weights_one, path_one = first_step(synthetic_root, method, "one_pass")
    autojac, weights_autojac, path_autojac = first_step(synthetic_root, method, "autojac")
    assert (path_one, path_autojac) == ("one_pass", "autojac")
    assert below(relative_difference(one, autojac), GRADIENT_TOLERANCE), method
    for task, weight in weights_autojac.items():
        if not math.isnan(weight):  # an aggregator without weights logs NaN on both paths
            assert below(abs(weights_one[task] - weight), WEIGHT_TOLERANCE), (method, task)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["upgrad", "mgda"])
def test_the_one_pass_jacobian_of_a_vit_gives_the_step_mtl_backward_gives(synthetic_root, method):
    """A ViT has no BatchNorm and parameters outside its blocks (the class token, the position embedding)."""
    one, _, _ = first_step(synthetic_root, method, "one_pass", backbone="test_vit")
    autojac, _, _ = first_step(synthetic_root, method, "autojac", backbone="test_vit")
    assert below(relative_difference(one, autojac), GRADIENT_TOLERANCE)


def _path(synthetic_root, tmp_path, **sections) -> str | None:
    sections = {"loss": {"weighting": "upgrad"}, "sampler": {"tasks_per_step": 2}, **sections}
    cfg = tiny_config(synthetic_root, tmp_path, data={"datasets": DATASETS[:2]}, **sections)
    return set_up(cfg).step.jacobian


@pytest.mark.parametrize(
    "sections, path",
    [
        ({}, "one_pass"),  # per-dataset statistics (model.norm auto): each dataset's pass is its own
        ({"model": {"backbone": "test_resnet", "norm": "shared"}}, "autojac"),  # statistics over the whole step
        ({"model": {"backbone": "test_vit", "img_size": 32}, "input": {"mode": "pad"}}, "one_pass"),  # no BatchNorm
        ({"loss": {"weighting": "upgrad", "jacobian": "autojac"}}, "autojac"),
        ({"loss": {"weighting": "none"}}, None),  # no Jacobian to get
    ],
)
def test_auto_takes_the_one_pass_jacobian_where_it_is_the_steps(synthetic_root, tmp_path, sections, path):
    assert _path(synthetic_root, tmp_path, **sections) == path


def test_the_run_records_and_says_which_path_its_jacobian_took(synthetic_root, tmp_path):
    out = tmp_path / "run"
    argv = ["--data-root", str(synthetic_root), "--output", str(out), *TINY_RUN, "--datasets", "breast,retina"]
    code, printed, err = quiet(
        train_main, [*argv, "--set", "loss.weighting=upgrad", "--set", "sampler.tasks_per_step=2"]
    )
    assert code == 0, err
    assert "Jacobian in one pass" in printed
    assert json.loads((out / "summary.json").read_text())["jacobian"] == "one_pass"


@pytest.mark.parametrize(
    "sets, words",
    [
        (["loss.weighting=none", "loss.jacobian=one_pass"], ["loss.jacobian one_pass", "loss.weighting=none"]),
        (["loss.jacobian=one_pass", "train.compile=true"], ["train.compile", "loss.jacobian autojac"]),
        (["loss.jacobian=one_pass", "train.precision=fp16"], ["fp16", "loss.jacobian autojac"]),
        (["loss.jacobian=one_pass", "model.norm=shared"], ["model.norm shared", "loss.jacobian autojac"]),
    ],
)
def test_a_path_the_run_cannot_take_is_one_error_line_and_writes_nothing(synthetic_root, tmp_path, sets, words):
    out = tmp_path / "run"
    argv = ["--data-root", str(synthetic_root), "--output", str(out), *TINY_RUN, "--datasets", "breast,retina"]
    argv += ["--set", "loss.weighting=upgrad", "--set", "sampler.tasks_per_step=2"]
    for setting in sets:
        argv += ["--set", setting]
    code, _, err = quiet(train_main, argv)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert folder_snapshot(out) == {}


def test_one_pass_is_refused_for_a_config_that_cannot_take_it_wherever_it_is_loaded(synthetic_root):
    with pytest.raises(MmptError, match=r"loss\.jacobian one_pass"):
        load_config(overrides=[{"loss": {"weighting": "upgrad", "jacobian": "one_pass"}, "train": {"compile": True}}])


def test_the_one_pass_forward_leaves_the_backbones_own_parameters_in_place(synthetic_root, tmp_path):
    """functional_call swaps the views in for one pass only: after a step the backbone holds its Parameters."""
    cfg = tiny_config(
        synthetic_root,
        tmp_path,
        data={"datasets": DATASETS[:2]},
        loss={"weighting": "upgrad"},
        sampler={"tasks_per_step": 2},
    )
    setup = set_up(cfg)
    before = dict(setup.model.backbone.named_parameters())
    setup.step(next(iter(setup.train_loader(0))), 0)
    after = dict(setup.model.backbone.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert all(isinstance(p, torch.nn.Parameter) and p.grad is None for p in after.values())
