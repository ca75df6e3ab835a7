"""The weighting methods in isolation, on a toy two-layer model: one shared backbone, one head per dataset."""

import importlib.util
import io
import math
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchjd import scalarization

from mmpt.config import load_config
from mmpt.config.methods import METHODS, environment_problems, method_problems, missing_solvers
from mmpt.errors import MmptError
from mmpt.mtl import torchjd_state
from mmpt.mtl.build import build_method
from mmpt.runtime.precision import LossScale
from tests.helpers import REPO

SIZES = {"pathmnist": 89996, "breastmnist": 546, "retinamnist": 1080}
# every method this machine can run (cagrad and nash_mtl need the mtl-solvers extra)
RUNNABLE = [name for name in METHODS if not missing_solvers(name)]


class Toy(nn.Module):
    def __init__(self, flags, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(6, 2) for t in flags})

    def losses(self, flags, seed):
        """Per-dataset mean losses of a step and the backbone's features (slices concatenated in `flags` order)."""
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(4 * len(flags), 5, generator=generator)
        y = torch.randint(0, 2, (4 * len(flags),), generator=generator)
        features = self.backbone(x)
        losses = {}
        for i, t in enumerate(flags):
            rows = slice(4 * i, 4 * i + 4)
            losses[t] = nn.functional.cross_entropy(self.heads[t](features[rows]), y[rows])
        return losses, features


def _build(name, model, **kwargs):
    if name == "manual":
        kwargs["manual_weights"] = {"pathmnist": 0.5, "breastmnist": 2.0, "retinamnist": 1.0}
    return build_method(name, SIZES, shared_params=model.backbone.parameters(), lr=0.05, steps_per_epoch=2, **kwargs)


def _train(weighting, model, steps, first_seed=0, flags=tuple(SIZES)):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(first_seed, first_seed + steps):
        torch.manual_seed(1000 + step)  # PCGrad's and GradDrop's draws come from the global RNG
        losses, features = model.losses(list(flags), seed=step)
        optimizer.zero_grad()
        weighting.backward(losses, features, LossScale())
        optimizer.step()


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_pcgrad_projects_two_conflicting_gradients_as_by_hand():
    # the backbone is one shared vector w; the features are w itself, and head t's loss is a_t · w, so the
    # Jacobian's rows are g1 = a_1 = [1, 0] and g2 = a_2 = [-1, 1] (g1 · g2 = -1: they conflict)
    w = nn.Parameter(torch.tensor([0.3, -0.7]))
    heads = {
        "pathmnist": nn.Parameter(torch.tensor([1.0, 0.0])),
        "breastmnist": nn.Parameter(torch.tensor([-1.0, 1.0])),
    }
    weighting = build_method(
        "pcgrad",
        {"pathmnist": 10, "breastmnist": 10},
        shared_params=[w],
    )
    features = (w * 1.0).unsqueeze(0)  # 1×2
    losses = {t: (features @ a).sum() for t, a in heads.items()}
    weighting.backward(losses, features, LossScale())
    # by hand: g1 - (g1·g2)/|g2|² g2 = [0.5, 0.5]; g2 - (g2·g1)/|g1|² g1 = [0, 1]; PCGrad sums them
    assert torch.allclose(w.grad, torch.tensor([0.5, 1.5]))
    # as weights on the rows: 2 g1 + 1.5 g2
    weights = weighting.dataset_weights()
    assert weights["pathmnist"].item() == pytest.approx(2.0) and weights["breastmnist"].item() == pytest.approx(1.5)
    # each head gets its own loss's gradient, unchanged
    assert torch.allclose(heads["pathmnist"].grad, w.detach()) and torch.allclose(heads["breastmnist"].grad, w.detach())


def test_static_weights_follow_the_train_sizes():
    model = Toy(SIZES)
    expected = {
        "none": dict.fromkeys(SIZES, 1.0),
        "size": {t: 546 / n for t, n in SIZES.items()},
        "inverse_size": {t: 89996 / n for t, n in SIZES.items()},
        "sqrt_size": {t: math.sqrt(546 / n) for t, n in SIZES.items()},
        "manual": {"pathmnist": 0.5, "breastmnist": 2.0, "retinamnist": 1.0},
    }
    for name, weights in expected.items():
        weighting = _build(name, model)
        _train(weighting, model, 1)
        assert {t: w.item() for t, w in weighting.dataset_weights().items()} == pytest.approx(weights), name


def test_uw_gives_torchjds_gradient_and_its_log_variances_move():
    flags = list(SIZES)
    model, reference = Toy(flags), Toy(flags)
    weighting = _build("uw", model)
    losses, features = model.losses(flags, seed=0)
    weighting.backward(losses, features, LossScale())
    # the same objective straight through torchjd's UW: sum_t 0.5 exp(-s_t) L_t + 0.5 s_t, s = 0
    ref_losses, _ = reference.losses(flags, seed=0)
    scalarization.UW(len(flags))(torch.stack([ref_losses[t] for t in flags])).backward()
    assert torch.allclose(_grads(model), _grads(reference), atol=1e-7)
    assert all(w.item() == pytest.approx(0.5) for w in weighting.dataset_weights().values())
    # the weighting's own optimizer has already stepped the log-variances (dL/ds = 0.5 - 0.5 L != 0)
    log_vars = weighting.state_dict()["state"]["module"]
    assert all(abs(v.item()) > 0.01 for v in log_vars.values())
    _train(weighting, model, 5, first_seed=1)
    assert len({round(w.item(), 6) for w in weighting.dataset_weights().values()}) == len(flags)


def test_famo_logits_move_and_change_the_weights():
    model = Toy(SIZES)
    weighting = _build("famo", model)
    logits = weighting.method.module._w
    assert torch.equal(logits, torch.zeros(3))
    _train(weighting, model, 6)
    assert logits.abs().min().item() > 1e-3
    weights = [w.item() for w in weighting.dataset_weights().values()]
    assert max(weights) / min(weights) > 1.01


def test_the_fp16_scale_reaches_the_model_but_not_the_methods_parameters():
    flags = list(SIZES)
    plain, scaled = Toy(flags), Toy(flags)
    a, b = _build("uw", plain), _build("uw", scaled)
    for weighting in (a, b):  # plain SGD: Adam's steps would hide a scaled gradient
        weighting.method.optimizer = torch.optim.SGD(weighting.method.learned, lr=1.0)
    for model, weighting, factor in ((plain, a, 1.0), (scaled, b, 1024.0)):
        losses, features = model.losses(flags, seed=0)
        weighting.backward(losses, features, lambda loss, factor=factor: loss * factor)
    assert torch.allclose(_grads(scaled), 1024.0 * _grads(plain))
    log_vars = [torch.stack(list(w.state_dict()["state"]["module"].values())) for w in (a, b)]
    assert torch.allclose(log_vars[0], log_vars[1])
    assert log_vars[0].abs().min() > 0.01


@pytest.mark.parametrize("name", ["dwa", "famo"])
def test_methods_that_need_every_dataset_do_not_depend_on_the_steps_order(name):
    flags = list(SIZES)
    weightings = []
    for order in (flags, flags[::-1]):
        model = Toy(flags)
        weighting = _build(name, model)
        for step in range(5):
            losses, features = model.losses(flags, seed=step)
            weighting.backward({t: losses[t] for t in order}, features, LossScale())
        weightings.append({t: w.item() for t, w in weighting.dataset_weights().items()})
    assert weightings[0] == pytest.approx(weightings[1])


def test_dwa_weights_follow_the_loss_ratio_of_the_last_two_epochs():
    flags = list(SIZES)
    model = Toy(flags)
    weighting = _build("dwa", model)  # steps_per_epoch=2
    _train(weighting, model, 4)
    assert all(w.item() == pytest.approx(1.0) for w in weighting.dataset_weights().values())  # two epochs: uniform
    dwa = weighting.method.module
    older, newer = dwa._previous_averages
    expected = 3 * torch.softmax((newer / older) / 2.0, dim=0)
    _train(weighting, model, 1, first_seed=4)
    assert torch.allclose(torch.stack(list(weighting.dataset_weights().values())), expected)


@pytest.mark.parametrize("name", RUNNABLE)
def test_state_survives_a_weights_only_checkpoint(name):
    """A method resumed from its state_dict takes the same next step as the uninterrupted one."""
    flags = list(SIZES)
    model = Toy(flags)
    weighting = _build(name, model)
    _train(weighting, model, 3)
    buffer = io.BytesIO()
    torch.save({"weighting": weighting.state_dict(), "model": model.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    _train(weighting, model, 2, first_seed=3)

    resumed_model = Toy(flags, seed=1)
    resumed_model.load_state_dict(saved["model"])
    resumed = _build(name, resumed_model)
    resumed.load_state_dict(saved["weighting"])
    _train(resumed, resumed_model, 2, first_seed=3)
    assert torch.equal(_grads(resumed_model), _grads(model))
    for t, w in weighting.dataset_weights().items():
        assert torch.equal(resumed.dataset_weights()[t], w) or (w.isnan() and resumed.dataset_weights()[t].isnan())


@pytest.mark.parametrize("name", [n for n in RUNNABLE if METHODS[n].kind != "static"])
def test_every_method_trains_the_toy(name):
    """Five steps of every method lower the mean loss of a fixed batch."""
    flags = list(SIZES)
    model = Toy(flags)
    weighting = _build(name, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    before = sum(model.losses(flags, seed=99)[0].values()).item()
    for step in range(5):
        torch.manual_seed(step)
        losses, features = model.losses(flags, seed=99)
        optimizer.zero_grad()
        weighting.backward(losses, features, LossScale())
        optimizer.step()
    assert sum(model.losses(flags, seed=99)[0].values()).item() < before
    assert set(weighting.dataset_weights()) == set(flags)


@pytest.mark.parametrize("name", ["uw", "imtl_l", "rlw", "none"])
def test_methods_that_act_per_dataset_run_one_dataset_per_step(name):
    model = Toy(SIZES)
    weighting = _build(name, model)
    for step, flag in enumerate(SIZES):
        losses, features = model.losses([flag], seed=step)
        weighting.backward(losses, features, LossScale())
        assert list(weighting.dataset_weights()) == [flag]


def test_rlw_draws_new_weights_with_mean_one():
    model = Toy(SIZES)
    weighting = _build("rlw", model)
    draws = []
    losses, features = model.losses(["pathmnist"], seed=0)
    for _ in range(200):
        losses = {"pathmnist": losses["pathmnist"].detach().requires_grad_()}
        weighting.backward(losses, features, LossScale())
        draws.append(weighting.dataset_weights()["pathmnist"].item())
    assert len(set(draws)) == len(draws)
    assert sum(draws) / len(draws) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize(
    "name,tasks_per_step,setting",
    [
        ("famo", 1, "tasks_per_step=all"),
        ("dwa", 3, "tasks_per_step=all"),
        ("pcgrad", 1, "tasks_per_step to 2"),
        ("stch", 1, "tasks_per_step to 2"),
        ("nash_mtl", 2, "tasks_per_step=all"),
    ],
)
def test_a_method_that_cannot_run_with_tasks_per_step_names_the_setting(name, tasks_per_step, setting):
    (problem,) = method_problems(name, {}, tasks_per_step=tasks_per_step)
    assert setting in problem
    assert method_problems(name, {}, tasks_per_step="all") == []


def test_gradient_methods_refuse_distributed_training_and_scalarizers_accept_it():
    (problem,) = environment_problems("upgrad", world_size=2)
    assert "distributed" in problem
    assert environment_problems("upgrad", world_size=1) == []
    for name in ("uw", "famo", "dwa", "rlw", "size"):
        assert environment_problems(name, world_size=2) == []


def test_weighting_args_are_checked_against_the_method():
    assert method_problems("dwa", {"temperature": 1.0}, tasks_per_step="all") == []
    (problem,) = method_problems("dwa", {"temp": 1.0}, tasks_per_step="all")
    assert "temp" in problem and "temperature" in problem
    (problem,) = method_problems("mgda", {"max_iters": 2.5}, tasks_per_step="all")
    assert "whole number" in problem
    (problem,) = method_problems("famo", {"lr": -1.0}, tasks_per_step="all")
    assert "> 0" in problem


def test_manual_weights_must_name_every_trained_dataset():
    weights = {"pathmnist": 1.0, "breastmnist": 1.0, "bloodmnist": 1.0}
    (problem,) = method_problems("manual", {}, tasks_per_step=1, weights=weights, datasets=list(SIZES))
    assert re.search(r"missing retinamnist.*not trained: bloodmnist", problem)


@pytest.mark.parametrize("name", ["cagrad", "nash_mtl"])
def test_a_method_without_its_solver_says_which_extra_to_install(name, monkeypatch):
    # the solvers may be installed here: the method is made to find none of its own
    find_spec = importlib.util.find_spec
    absent = METHODS[name].needs
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda module, *a: None if module in absent else find_spec(module, *a)
    )
    (problem,) = environment_problems(name, world_size=1)
    assert "mtl-solvers" in problem


def test_resuming_with_another_method_is_an_error():
    model = Toy(SIZES)
    state = _build("uw", model).state_dict()
    with pytest.raises(MmptError, match=r"loss.weighting=uw"):
        _build("famo", model).load_state_dict(state)


def test_unknown_weighting_lists_the_valid_names():
    with pytest.raises(MmptError) as info:
        load_config(overrides=[{"loss": {"weighting": "uncertainty"}}])
    assert "loss.weighting must be one of" in str(info.value)
    assert "uw" in str(info.value) and "upgrad" in str(info.value)


def test_manual_weight_that_is_not_a_number_is_reported_once(tmp_path):
    with pytest.raises(MmptError) as info:
        load_config(
            overrides=[
                {"data": {"datasets": ["pathmnist"]}, "loss": {"weighting": "manual", "weights": {"pathmnist": "abc"}}}
            ]
        )
    assert "pathmnist must be a number" in str(info.value)
    assert "missing" not in str(info.value)


def test_all_zero_manual_weights_are_refused():
    """A zero loss would train nothing, silently."""
    zero = dict.fromkeys(SIZES, 0.0)
    (problem,) = method_problems("manual", {}, tasks_per_step=1, weights=zero, datasets=list(SIZES))
    assert problem.startswith("loss.weights are all 0")
    assert (
        method_problems("manual", {}, tasks_per_step=1, weights={**zero, "pathmnist": 0.5}, datasets=list(SIZES)) == []
    )


@pytest.mark.parametrize("installed", ["0.18.0", "0.18.4"])
def test_torchjd_0_18_releases_are_accepted(installed):
    torchjd_state.check_version(installed)


@pytest.mark.parametrize("installed", ["0.19.0", "0.17.2", "0.180.1", "1.0.0", None])
def test_another_torchjd_release_is_refused_naming_both_versions(installed):
    with pytest.raises(MmptError, match=r"mmpt supports TorchJD 0\.18\.x") as refused:
        torchjd_state.check_version(installed)
    assert isinstance(refused.value, ImportError)  # raised at import of mmpt.mtl.build
    assert (f"TorchJD {installed} is installed" if installed else "has no version") in str(refused.value)
    assert "pip install 'torchjd[quadprog-projector]~=0.18.0'" in str(refused.value)


@pytest.mark.slow
def test_a_training_command_with_another_torchjd_is_one_error_line_and_writes_nothing(tmp_path):
    # importlib.metadata reports another TorchJD release; mmpt.mtl.build refuses it when it is imported
    script = (
        "import importlib.metadata as m, sys; real = m.version; "
        "m.version = lambda name: '0.19.0' if name == 'torchjd' else real(name); "
        "from mmpt.cli import train_main; sys.exit(train_main(sys.argv[1:]))"
    )
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", script, "--config", "configs/quickstart.yaml", "--output", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith(
        "error: mmpt supports TorchJD 0.18.x"
    )
    assert "TorchJD 0.19.0 is installed" in done.stderr
    assert not out.exists()
