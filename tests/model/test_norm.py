"""Per-dataset normalization (model.norm): each dataset's own BatchNorm statistics, in training and evaluation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from torch import nn

import mmpt.training.step
from mmpt.errors import MmptError
from mmpt.model.build import build_model
from mmpt.model.norm import NormLayout, convert_norms, task_norms
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.rundir import Results, RunDir
from mmpt.tasks import resolve_tasks
from mmpt.training.build import build_sampler
from mmpt.training.loop import run
from tests.helpers import REPO, crash_at_step, finish, summary, tiny_config, torchrun, write_config
from tests.tolerances import above, below

TWO = resolve_tasks("breast,retina")


def model_with(norm: str, backbone: str = "test_resnet", tasks=TWO):
    cfg = tiny_config("/nonexistent", "/nonexistent", model={"backbone": backbone, "norm": norm})
    torch.manual_seed(0)
    return build_model(cfg, tasks)[0]


def batch(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed)) + shift


@pytest.mark.parametrize("norm", ["per_dataset_stats", "per_dataset"])
def test_training_on_one_dataset_leaves_the_others_statistics_unchanged(norm):
    model = model_with(norm)
    before = copy.deepcopy(model.state_dict())
    model.train()
    model(batch(8, 0, shift=2.0), "breastmnist")
    after = model.state_dict()
    layers = task_norms(model.backbone)
    assert len(layers) == 15  # every BatchNorm of test_resnet
    breast, retina = model.norm_tasks.index("breastmnist"), model.norm_tasks.index("retinamnist")
    for name, _ in layers:
        key = f"backbone.{name}.running_mean"
        assert torch.equal(after[key][retina], before[key][retina])  # untouched
        assert not torch.equal(after[key][breast], before[key][breast])  # moved
        assert after[f"backbone.{name}.num_batches_tracked"][[breast, retina]].tolist() == [1, 0]


def test_a_dataset_is_evaluated_with_its_own_statistics_and_weights():
    """The per-dataset model on retina equals the plain timm backbone holding retina's statistics and weights."""
    model = model_with("per_dataset").eval()
    state = model.backbone.state_dict()
    generator = torch.Generator().manual_seed(1)
    for key in state:
        if "running_" in key or "task_" in key:  # distinct values per dataset
            state[key] = torch.rand(state[key].shape, generator=generator) + 0.5
    model.backbone.load_state_dict(state)
    plain = timm.create_model("test_resnet", num_classes=0).eval()
    row = model.norm_tasks.index("retinamnist")
    oracle = {}
    for key in plain.state_dict():
        layer, _, leaf = key.rpartition(".")
        if f"{layer}.task_weight.1" in state and leaf in ("weight", "bias"):
            oracle[key] = state[f"{layer}.task_{leaf}.{row}"]
        elif (
            leaf in ("running_mean", "running_var", "num_batches_tracked")
            and state[key].dim() >= 1
            and f"{layer}.running_mean" in state
            and state[f"{layer}.running_mean"].dim() == 2
        ):
            oracle[key] = state[key][row]
        else:
            oracle[key] = state[key]
    plain.load_state_dict(oracle)
    x = batch(4, 2)
    with torch.no_grad():
        expected = plain(x)
        assert torch.allclose(model.features(x, "retinamnist"), expected, atol=1e-6)
        assert not torch.allclose(model.features(x, "breastmnist"), expected, atol=1e-3)
        assert torch.allclose(model(x, "retinamnist"), model.heads["retinamnist"](expected), atol=1e-6)


def test_a_layer_normalises_with_the_datasets_running_statistics_by_hand():
    layer = nn.BatchNorm2d(3)
    layout = NormLayout()
    wrapped = convert_norms(nn.Sequential(layer), 2, "per_dataset_stats", layout)[0]
    wrapped.running_mean.copy_(torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 3.0]]))
    wrapped.running_var.copy_(torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.25, 9.0]]))
    wrapped.eval()
    layout.segments = ((1, 5),)
    x = batch(5, 3)[:, :3, :4, :4]
    by_hand = (x - torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1)) / torch.sqrt(
        torch.tensor([4.0, 0.25, 9.0]).view(1, 3, 1, 1) + layer.eps
    )
    assert torch.allclose(wrapped(x), by_hand, atol=1e-6)


@pytest.mark.parametrize("kind", ["batchnorm", "timm_batchnorm_act"])
@pytest.mark.parametrize("norm", ["per_dataset_stats", "per_dataset"])
def test_each_slice_of_a_several_dataset_batch_is_normalised_on_its_own(kind, norm):
    """k >= 2: one pass over the concatenated batch equals each slice through its own BatchNorm (the oracle)."""
    if kind == "batchnorm":
        source = nn.BatchNorm2d(4)
    else:
        source = timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU)
    with torch.no_grad():
        source.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        source.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    oracles = [copy.deepcopy(source).train() for _ in range(3)]
    layout = NormLayout()
    wrapped = convert_norms(nn.Sequential(copy.deepcopy(source)), 3, norm, layout)[0].train()
    slices = [batch(5, 10)[:, :3].repeat(1, 2, 1, 1)[:, :4], batch(3, 11, 4.0)[:, :3].repeat(1, 2, 1, 1)[:, :4]]
    layout.segments = ((2, 5), (0, 3))  # dataset 2's slice first, then dataset 0's; dataset 1 not in the step
    out = wrapped(torch.cat(slices))
    expected = torch.cat([oracles[2](slices[0]), oracles[0](slices[1])])
    assert torch.allclose(out, expected, atol=1e-5)
    for row, oracle in ((2, oracles[2]), (0, oracles[0]), (1, oracles[1])):
        assert torch.allclose(wrapped.running_mean[row], oracle.running_mean, atol=1e-6)
        assert torch.allclose(wrapped.running_var[row], oracle.running_var, atol=1e-6)
    assert wrapped.num_batches_tracked.tolist() == [1, 0, 1]
    assert torch.equal(wrapped.running_mean[1], torch.zeros(4))  # untouched: its initial value


def test_a_backbone_without_batchnorm_refuses_a_per_dataset_norm():
    with pytest.raises(MmptError, match=r"test_vit has no BatchNorm.*LayerNorm"):
        model_with("per_dataset_stats", backbone="test_vit")
    assert model_with("shared", backbone="test_vit") is not None


def test_per_dataset_affine_with_a_gradient_based_weighting_is_refused(synthetic_root, tmp_path):
    """Refused where the config is loaded, before any run folder exists."""
    with pytest.raises(MmptError, match="per_dataset_stats"):
        tiny_config(
            synthetic_root,
            tmp_path / "run",
            data={"datasets": ["breast", "retina"]},
            model={"norm": "per_dataset"},
            sampler={"tasks_per_step": 2},
            loss={"weighting": "upgrad"},
        )
    assert not (tmp_path / "run").exists()


def norm_config(root, output, norm, model=None, **sections):
    """test_resume's config (three tiny tasks, 3 epochs, dropout and augmentation) with `norm` (and `model` keys)."""
    return tiny_config(
        root,
        output,
        data={"datasets": ["breast", "retina", "chest"], "num_workers": 0},
        model={"backbone": "test_resnet", "drop_rate": 0.2, "img_size": 32, "norm": norm, **(model or {})},
        input={"mode": "pad", "augment": {"hflip": True, "rotate_degrees": 10.0}},
        train={"epochs": 3, "batch_size": 16},
        **sections,
    )


# every test that uses this fixture is marked slow: its runs and theirs take more than about 5 s
@pytest.fixture(scope="module", params=["per_dataset_stats", "per_dataset"])
def norm_reference(request, synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"reference-{request.param}") / "run"
    run(norm_config(synthetic_root, out, request.param, sampler={"tasks_per_step": 2}))
    return request.param, summary(out), out


@pytest.mark.slow
def test_a_per_dataset_norm_run_resumes_to_the_uninterrupted_digests(
    synthetic_root, tmp_path, monkeypatch, norm_reference
):
    norm, reference, _ = norm_reference
    out = tmp_path / "crashed"
    cfg = norm_config(synthetic_root, out, norm, sampler={"tasks_per_step": 2}, checkpoint={"every_steps": 4})
    with monkeypatch.context() as patch:
        crash_at_step(patch, 9)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(cfg)
    run(cfg, resume=True)
    assert summary(out)["final_digest"] == reference["final_digest"]
    assert summary(out)["best_digest"] == reference["best_digest"]


@pytest.mark.slow
def test_a_per_dataset_norm_run_learns_and_checkpoints_its_statistics(norm_reference):
    norm, reference, out = norm_reference
    assert above(reference["test_mean"]["auc"], 0.6)  # synthetic data carry a learnable signal; chance is 0.5
    state = ckpt.load(RunDir(out).best)[ckpt.MODEL]
    assert state["backbone.bn1.running_mean"].shape[0] == 3  # one row per dataset
    assert ("backbone.bn1.task_weight.2" in state) == (norm == "per_dataset")


def test_model_norm_cannot_change_on_resume(synthetic_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        crash_at_step(patch, 3)
        with pytest.raises(RuntimeError):
            run(norm_config(synthetic_root, out, "shared", checkpoint={"every_steps": 2}))
    with pytest.raises(MmptError, match=r"model.norm=shared, not per_dataset_stats"):
        run(norm_config(synthetic_root, out, "per_dataset_stats"), resume=True)


def test_shared_and_per_dataset_runs_of_one_seed_see_the_same_plan(synthetic_root, tmp_path, monkeypatch):
    seen: dict[str, list] = {}
    real_step = mmpt.training.step.TrainStep.__call__

    def record(self, parts, step):
        seen.setdefault(self.model.norm, []).append(
            [(p.task, p.images.sum().item(), p.labels.sum().item()) for p in parts]
        )
        return real_step(self, parts, step)

    monkeypatch.setattr(mmpt.training.step.TrainStep, "__call__", record)
    for norm in ("shared", "per_dataset_stats"):
        run(
            tiny_config(
                synthetic_root,
                tmp_path / norm,
                data={"datasets": ["breast", "retina", "chest"]},
                model={"norm": norm},
                sampler={"tasks_per_step": 2},
                train={"batch_size": 16},
            )
        )
    assert len(seen["shared"]) == 12 and seen["shared"] == seen["per_dataset_stats"]
    assert summary(tmp_path / "shared")["final_digest"] != summary(tmp_path / "per_dataset_stats")["final_digest"]


def saved_model(tmp_path, norm: str, datasets: str):
    """A checkpoint file of a freshly built model with distinct per-dataset statistics and weights."""
    from mmpt.config import to_dict

    cfg = tiny_config(
        "/nonexistent",
        "/nonexistent",
        data={"datasets": datasets.split(",")},
        model={"backbone": "test_resnet", "norm": norm},
    )
    model = build_model(cfg, resolve_tasks(datasets))[0]
    state = model.state_dict()
    generator = torch.Generator().manual_seed(5)
    for key in state:
        if "running_" in key or ".task_" in key or key.endswith("bn1.weight"):
            state[key] = torch.rand(state[key].shape, generator=generator) + 0.5
    path = tmp_path / f"{norm}.pt"
    ckpt.save(path, {ckpt.MODEL: state, ckpt.CONFIG: to_dict(cfg)})
    return path, state, model.norm_tasks


def target_model(norm: str, datasets: str, source):
    from mmpt.model.build import load_initial_weights

    cfg = tiny_config(
        "/nonexistent",
        "/nonexistent",
        data={"datasets": datasets.split(",")},
        model={"backbone": "test_resnet", "norm": norm},
    )
    model = build_model(cfg, resolve_tasks(datasets))[0]
    load_initial_weights(model, source, cfg)
    return model, model.backbone.state_dict()


def test_init_from_gives_a_seen_dataset_its_own_statistics_and_an_unseen_one_the_size_weighted_mixture(
    tmp_path, capsys
):
    source, theirs, source_tasks = saved_model(tmp_path, "per_dataset", "breast,retina,chest")
    model, ours = target_model("per_dataset", "breast,pneumonia", source)
    assert "pneumoniamnist, not in the source, from the train-size-weighted mixture" in capsys.readouterr().out
    b_src, b_dst = source_tasks.index("breastmnist"), model.norm_tasks.index("breastmnist")
    p_dst = model.norm_tasks.index("pneumoniamnist")
    sizes = {t.flag: t.split_size("train") for t in resolve_tasks("breast,retina,chest")}
    share = torch.tensor([sizes[t] for t in source_tasks], dtype=torch.float64)
    share /= share.sum()
    for layer in ("bn1", "layer1.0.bn1"):
        mean, var = theirs[f"backbone.{layer}.running_mean"], theirs[f"backbone.{layer}.running_var"]
        assert torch.equal(ours[f"{layer}.running_mean"][b_dst], mean[b_src])
        assert torch.equal(ours[f"{layer}.task_weight.{b_dst}"], theirs[f"backbone.{layer}.task_weight.{b_src}"])
        mixed_mean = (share[:, None] * mean.double()).sum(0)
        mixed_var = (share[:, None] * (var.double() + (mean.double() - mixed_mean) ** 2)).sum(0)
        assert torch.allclose(ours[f"{layer}.running_mean"][p_dst].double(), mixed_mean, atol=1e-5)
        assert torch.allclose(ours[f"{layer}.running_var"][p_dst].double(), mixed_var, atol=1e-5)
    # a single-dataset fine-tune with shared norm takes that dataset's own statistics and weights
    _, single = target_model("shared", "retina", source)
    r_src = source_tasks.index("retinamnist")
    assert torch.equal(single["bn1.running_var"], theirs["backbone.bn1.running_var"][r_src])
    assert torch.equal(single["bn1.weight"], theirs[f"backbone.bn1.task_weight.{r_src}"])
    assert torch.equal(single["conv1.0.weight"], theirs["backbone.conv1.0.weight"])


def test_init_from_a_per_dataset_run_into_shared_affine_weights_says_they_are_averaged(tmp_path, capsys):
    """From model.norm per_dataset to per_dataset_stats (or shared), the affine weights become one tensor: the
    start line says whose they are (one dataset's, or the train-size-weighted mean), and they are exactly that."""
    source, theirs, source_tasks = saved_model(tmp_path, "per_dataset", "breast,retina,chest")
    capsys.readouterr()
    _, ours = target_model("per_dataset_stats", "breast,retina", source)
    line = capsys.readouterr().out
    assert "each dataset starts from its own statistics" in line
    assert "the shared affine weights are the train-size-weighted mean of the source's per-dataset ones" in line
    assert "over retinamnist, breastmnist" in line
    sizes = {t.flag: float(t.split_size("train")) for t in resolve_tasks("breast,retina")}
    rows = [source_tasks.index(flag) for flag in sizes]
    share = torch.tensor(list(sizes.values()), dtype=torch.float64) / sum(sizes.values())
    weight = torch.stack([theirs[f"backbone.bn1.task_weight.{r}"].double() for r in rows])
    assert torch.allclose(ours["bn1.weight"].double(), (share[:, None] * weight).sum(0), atol=1e-6)
    # one dataset of the source: its own weights, exactly, and the line names it
    _, single = target_model("per_dataset_stats", "retina,pneumonia", source)
    assert "the shared affine weights are retinamnist's own in the source" in capsys.readouterr().out
    r_src = source_tasks.index("retinamnist")
    assert torch.equal(single["bn1.weight"], theirs[f"backbone.bn1.task_weight.{r_src}"])
    # the same from a per_dataset_stats source: its one shared weight, bit for bit, and no word of averaging
    stats_source, stats_theirs, _ = saved_model(tmp_path, "per_dataset_stats", "breast,retina,chest")
    _, copied = target_model("per_dataset_stats", "breast,pneumonia", stats_source)
    assert "affine" not in capsys.readouterr().out
    assert torch.equal(copied["bn1.weight"], stats_theirs["backbone.bn1.weight"])


def test_init_from_a_shared_norm_run_copies_its_statistics_to_every_dataset(tmp_path):
    source, theirs, _ = saved_model(tmp_path, "shared", "breast,retina")
    _model, ours = target_model("per_dataset", "breast,retina,chest", source)
    for row in range(3):
        assert torch.equal(ours["bn1.running_mean"][row], theirs["backbone.bn1.running_mean"])
        assert torch.equal(ours[f"bn1.task_weight.{row}"], theirs["backbone.bn1.weight"])
    _, stats_only = target_model("per_dataset_stats", "breast", source)
    assert torch.equal(stats_only["bn1.weight"], theirs["backbone.bn1.weight"])
    assert torch.equal(stats_only["bn1.running_var"][0], theirs["backbone.bn1.running_var"])


@pytest.mark.slow
def test_under_torchrun_every_rank_ends_with_the_same_per_dataset_statistics_and_weights(synthetic_root, tmp_path):
    """2 gloo processes, per-dataset affine weights (left out of DDP, averaged by the step) and statistics
    (DDP's buffer broadcast): the replicas' digests, buffers included, agree."""
    raw = {
        "name": "ddp",
        "output": str(tmp_path / "run"),
        "data": {"root": str(synthetic_root), "datasets": ["breast", "chest", "retina"], "num_workers": 0},
        "model": {"backbone": "test_resnet", "norm": "per_dataset"},
        "input": {"mode": "native"},
        "sampler": {"tasks_per_step": 2},
        "optim": {"lr": 0.003},
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "progress": False, "log_every_steps": 4},
    }
    finish(torchrun("--config", str(write_config(tmp_path / "ddp.yaml", raw))))
    digests = summary(tmp_path / "run")["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


# every test that uses this fixture is marked slow: its runs and theirs take more than about 5 s
@pytest.fixture(scope="module")
def shared_run(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared") / "run"
    run(
        tiny_config(
            synthetic_root,
            out,
            data={"datasets": ["breast", "retina", "chest"]},
            model={"norm": "shared"},
            train={"batch_size": 16},
        )
    )
    return out


@pytest.mark.slow
def test_recalibrate_norm_is_deterministic_and_leaves_the_checkpoint_unchanged(shared_run, tmp_path):
    import hashlib
    import json

    from mmpt.cli import evaluate_main

    best = RunDir(shared_run).best
    before = hashlib.sha256(best.read_bytes()).hexdigest()
    assert evaluate_main([str(shared_run), "--recalibrate-norm", "--recalibrate-images", "100"]) == 0
    assert (
        evaluate_main(
            [str(shared_run), "--recalibrate-norm", "--recalibrate-images", "100", "--output", str(tmp_path / "again")]
        )
        == 0
    )
    assert evaluate_main([str(shared_run)]) == 0
    assert hashlib.sha256(best.read_bytes()).hexdigest() == before
    first = json.loads(RunDir(shared_run).eval("test", recalibrated=True).metrics.read_text())
    assert first == json.loads(Results(tmp_path / "again").metrics.read_text())
    assert first != json.loads(RunDir(shared_run).eval("test").metrics.read_text())  # the statistics moved
    record = json.loads(RunDir(shared_run).eval("test", recalibrated=True).recalibration.read_text())
    assert record["from"] == "shared" and record["images_per_dataset"] == {
        "breastmnist": 100,
        "retinamnist": 100,
        "chestmnist": 100,
    }


@pytest.mark.parametrize("batch_size", ["1", "2"])
@pytest.mark.slow
def test_recalibration_at_the_smallest_evaluation_batch_sizes_trains_no_single_image_batch(
    shared_run, tmp_path, batch_size
):
    """101 images at --batch-size 1 or 2 once made a one-image BatchNorm batch (a traceback in evaluate and probe);
    the batches are near-equal with two or more images each, as the one batch rule (mmpt.data.sampler) says."""
    import json

    from mmpt.cli import evaluate_main

    common = ["--recalibrate-norm", "--recalibrate-images", "101", "--batch-size", batch_size, "--device", "cpu"]
    assert evaluate_main([str(shared_run), *common, "--output", str(tmp_path / "eval")]) == 0
    assert json.loads(Results(tmp_path / "eval").recalibration.read_text())["images_per_dataset"] == {
        "breastmnist": 101,
        "retinamnist": 101,
        "chestmnist": 101,
    }
    assert evaluate_main(["probe", str(shared_run), "--method", "knn", *common, "--output", str(tmp_path / "p")]) == 0
    assert Results(tmp_path / "p").metrics.is_file()


@pytest.mark.slow
def test_recalibration_sets_each_datasets_statistics_to_its_own_images(shared_run):
    """With the whole split in one batch the first BatchNorm's statistics are exactly the batch's (by hand)."""
    from mmpt.data.store import open_data
    from mmpt.model.build import build_transform
    from mmpt.model.calibration import recalibrate

    state = ckpt.load(RunDir(shared_run).best)
    from mmpt.config import from_dict

    cfg = from_dict(state[ckpt.CONFIG])
    tasks = resolve_tasks(cfg.data.datasets)
    model = build_model(cfg, tasks)[0]
    model.load_state_dict(state[ckpt.MODEL])
    transform = build_transform(cfg, model)
    data = open_data(cfg.data, tasks)
    splits = {flag: d.splits["train"] for flag, d in data.items()}
    used = recalibrate(model, splits, transform, torch.device("cpu"), images=10_000, batch_size=1024)
    assert used == dict.fromkeys(splits, 128)  # the whole split (smaller than the request)
    assert model.norm == "per_dataset_stats" and not model.training
    layer = model.backbone.conv1[1]
    for flag, split in splits.items():
        x = transform(torch.from_numpy(np.array(split.open_images())))
        with torch.no_grad():
            z = model.backbone.conv1[0](x)
        row = model.norm_tasks.index(flag)
        assert torch.allclose(layer.running_mean[row], z.mean(dim=(0, 2, 3)), atol=1e-5)
        assert torch.allclose(layer.running_var[row], z.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    assert torch.equal(layer.weight, state[ckpt.MODEL]["backbone.conv1.1.weight"])  # affine untouched


@pytest.mark.slow
def test_probe_features_of_a_dataset_come_through_its_own_statistics(shared_run, tmp_path):
    from mmpt.cli import evaluate_main
    from mmpt.data.store import open_data
    from mmpt.evaluation.probe import extract_features
    from mmpt.model.build import load_backbone

    model, cfg = load_backbone(shared_run)
    model.split_norm_statistics()
    layer = model.backbone.conv1[1]
    layer.running_mean[model.norm_tasks.index("retinamnist")] += 3.0  # retina's statistics differ from breast's
    split = open_data(cfg.data, resolve_tasks("breast"))["breastmnist"].splits["test"]
    breast = extract_features(model, cfg, split, torch.device("cpu"), 64, task="breastmnist")
    retina = extract_features(model, cfg, split, torch.device("cpu"), 64, task="retinamnist")
    assert breast.shape == retina.shape and not np.allclose(breast, retina, atol=1e-3)
    assert (
        evaluate_main(["probe", str(shared_run), "--method", "knn", "--recalibrate-norm", "--recalibrate-images", "64"])
        == 0
    )
    assert Results(shared_run / "probe-knn-recalibrated").metrics.is_file()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"last_batch": "drop"},
        {"tasks_per_step": 3},
        {"tasks_per_step": "all"},
        {"steps_per_epoch": 5000},
        {"replacement": True, "alpha": 0.5},
        {"replacement": True, "alpha": 0.3, "tasks_per_step": 2},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_start_lines_state_each_datasets_share_of_steps_and_passes_over_its_images(options):
    """dataset_exposure against the realised epoch plans, with every train split size in medmnist.INFO."""
    import medmnist

    from mmpt.data.sampler import Sampler

    sizes = {flag: medmnist.INFO[flag]["n_samples"]["train"] for flag in (t.flag for t in resolve_tasks("all"))}
    epochs, batch_size = 2, 64
    sampler = Sampler(sizes, batch_size, 0, **options)
    exposure = sampler.exposure(epochs)
    images = dict.fromkeys(sizes, 0)
    steps_with = dict.fromkeys(sizes, 0)
    total_steps = 0
    for epoch in range(epochs):
        plan = sampler.plan(epoch)
        total_steps += len(plan)
        for item in plan:
            for task, idx in item:
                images[task] += len(idx)
                steps_with[task] += 1
    exact = (
        not options.get("replacement") and "steps_per_epoch" not in options and options.get("tasks_per_step") != "all"
    )
    for task, n in sizes.items():
        share, passes = exposure[task]
        realised_share, realised_passes = steps_with[task] / total_steps, images[task] / n
        tolerance = 1e-9 if exact else 0.1 * passes + 0.02
        if options.get("tasks_per_step") == "all":  # a smaller split's last pass of an epoch is a prefix
            tolerance = epochs * batch_size / n
        exact_share = exact or options.get("tasks_per_step") == "all"
        assert abs(share - realised_share) <= (1e-9 if exact_share else 0.1 * share + 0.005), (
            task,
            share,
            realised_share,
        )
        assert abs(passes - realised_passes) <= tolerance, (task, passes, realised_passes)
    if options.get("tasks_per_step", 1) == 1:
        assert sum(s for s, _ in exposure.values()) == pytest.approx(1.0)
    if not options:
        assert all(passes == pytest.approx(epochs) for _, passes in exposure.values())  # Algorithm 1: every image once


def test_the_start_lines_show_the_exposure_and_the_norm(tmp_path):
    from pathlib import Path

    from mmpt.runtime.distributed import SINGLE
    from mmpt.training.log import describe

    cfg = tiny_config(
        "/nonexistent",
        tmp_path,
        model={"norm": "per_dataset_stats"},
        sampler={"replacement": True, "alpha": 0.5},
        train={"epochs": 4, "batch_size": 50},
    )
    sizes = {"breastmnist": 546, "retinamnist": 1080}
    sampler = build_sampler(cfg, sizes)
    text = describe(cfg, model_with("per_dataset_stats"), sampler, torch.device("cpu"), SINGLE, Path("cache"))
    # p ∝ sqrt(n): 23.37 and 32.86 -> 41.6% and 58.4% of 11 + 22 = 33 steps per epoch
    assert "41.6% of steps" in text and "58.4% of steps" in text
    assert f"{4 * 33 * 0.41562 * 50 / 546:.2f} passes" in text.replace("  ", " ").replace("  ", " ")
    assert "expected values: sampling with replacement, alpha 0.5" in text
    assert "each of the 2 datasets has its own BatchNorm running statistics (model.norm per_dataset_stats)" in text


def test_a_batch_of_one_is_refused_with_per_dataset_batchnorm_too():
    from mmpt.model.net import check_batch_size

    with pytest.raises(MmptError, match="cannot train on one image"):
        check_batch_size(model_with("per_dataset"), 1)


def test_a_datasets_plain_state_dict_loads_into_timm_and_gives_its_features():
    from mmpt.model.transfer import plain_state_dict

    model = model_with("per_dataset").eval()
    with torch.no_grad():
        for _, layer in task_norms(model.backbone):
            for row in range(2):
                layer.running_mean[row].uniform_(-1, 1)
                layer.task_weight[row].uniform_(0.5, 1.5)
    plain = timm.create_model("test_resnet", num_classes=0).eval()
    row = model.norm_tasks.index("breastmnist")
    plain.load_state_dict(plain_state_dict(model.backbone, row))  # strict: every timm key, nothing else
    x = batch(3, 7)
    with torch.no_grad():
        assert torch.allclose(plain(x), model.features(x, "breastmnist"), atol=1e-6)


@pytest.mark.parametrize(
    ("backbone", "datasets", "expected"),
    [
        ("test_resnet", "breast,retina", "per_dataset_stats"),
        ("test_resnet", "breast", "shared"),
        ("test_vit", "breast,retina", "shared"),
    ],
)
def test_auto_keeps_statistics_apart_only_where_there_is_batchnorm_and_more_than_one_dataset(
    backbone, datasets, expected
):
    model = model_with("auto", backbone, resolve_tasks(datasets))
    assert model.norm == expected
    assert (len(task_norms(model.backbone)) > 0) == (expected == "per_dataset_stats")


@pytest.mark.parametrize("norm_reference", ["per_dataset_stats"], indirect=True)  # what auto resolves to
@pytest.mark.slow
def test_an_auto_run_is_the_per_dataset_stats_run_and_its_checkpoint_says_so(
    synthetic_root, tmp_path, norm_reference, capsys
):
    from mmpt.model.norm import saved_norm

    norm, reference, _out = norm_reference
    assert norm == "per_dataset_stats"
    auto = tmp_path / "auto"
    run(norm_config(synthetic_root, auto, "auto", sampler={"tasks_per_step": 2}))
    assert "(model.norm auto: per_dataset_stats)" in capsys.readouterr().out
    assert summary(auto)["final_digest"] == reference["final_digest"]
    weights = ckpt.load(RunDir(auto).best)[ckpt.MODEL]
    assert saved_norm({k.removeprefix("backbone."): v for k, v in weights.items()}) == "per_dataset_stats"
    # a single-dataset fine-tune from it (auto -> shared) starts from that dataset's own statistics
    source, theirs, source_tasks = saved_model(tmp_path, "per_dataset_stats", "breast,retina")
    _, single = target_model("auto", "retina", source)
    assert torch.equal(single["bn1.running_var"], theirs["backbone.bn1.running_var"][source_tasks.index("retinamnist")])


def test_a_run_recorded_without_model_norm_reads_as_shared_whatever_the_default(tmp_path):
    """Configs recorded without model.norm (config.yaml, checkpoints, series.json) are read
    with model.norm shared, the setting they trained with; a new recipe without it gets the default."""
    import yaml

    from mmpt.config import Config, load_config, recorded_config, to_dict

    old = to_dict(Config())
    del old["model"]["norm"]
    assert recorded_config(old).model.norm == "shared"
    RunDir(tmp_path).config.write_text(yaml.safe_dump(old))
    assert load_config(RunDir(tmp_path).config, recorded=True).model.norm == "shared"
    assert load_config(RunDir(tmp_path).config).model.norm == Config().model.norm
    assert recorded_config({**old, "model": {**old["model"], "norm": "per_dataset"}}).model.norm == "per_dataset"


def test_a_run_recorded_before_norm_calibration_reads_as_uncalibrated(tmp_path):
    """Runs recorded without model.norm_calibration_batches trained with the running averages alone (0)."""
    from mmpt.config import Config, recorded_config, to_dict

    old = to_dict(Config())
    del old["model"]["norm_calibration_batches"]
    assert recorded_config(old).model.norm_calibration_batches == 0
    assert Config().model.norm_calibration_batches > 0


# --- precise per-dataset statistics during training (model.norm_calibration_batches) ------------------------------

# every batch size from 2 (BatchNorm's least) to 1,024, and powers of two beyond every split size
CALIBRATION_BATCH_SIZES = [*range(2, 1025), *(2**k for k in range(11, 19))]


def test_no_calibration_batch_or_rank_shard_of_one_holds_a_single_image_for_any_medmnist_split():
    """Every train split size in medmnist.INFO, every batch size, 1 to 8 processes (the global batch at least
    4 per process, as check_run requires): each rank's shard of each calibration batch holds 2 or more images."""
    import medmnist

    from mmpt.config import Config
    from mmpt.data.loader import shard
    from mmpt.data.sampler import batch_count
    from mmpt.model.calibration import calibration_batches

    sizes = sorted({info["n_samples"]["train"] for info in medmnist.INFO.values()})
    assert len(sizes) == 18 and sizes[0] == 546
    for n in sizes:
        for batches in (1, 2, Config().model.norm_calibration_batches, 100):
            for batch_size in CALIBRATION_BATCH_SIZES:
                images = min(n, batches * batch_size)
                count = batch_count(images, batch_size)
                smallest = images // count  # near-equal batches: sizes images // count and one more
                assert smallest >= 2 and (count == batches or images == n), (n, batches, batch_size)
                for world_size in (1, 2, 4, 8):
                    if world_size == 1 or batch_size >= 4 * world_size:
                        assert smallest // world_size >= 2, (n, batches, batch_size, world_size)
    # the index arrays themselves, at the batch sizes the configs use and at the extremes
    for flag in (t.flag for t in resolve_tasks("all")):
        n = medmnist.INFO[flag]["n_samples"]["train"]
        for batch_size in (2, 3, 32, 64, 256, 1000, 2**18):
            chunks = calibration_batches(flag, n, 16, batch_size, seed=0, epoch=0)
            images = min(n, 16 * batch_size)
            assert len(chunks) == batch_count(images, batch_size)
            assert min(map(len, chunks)) >= 2 and sum(map(len, chunks)) == images
            for world_size in (2, 4, 8):
                if batch_size >= 4 * world_size:
                    shards = [len(c[shard(len(c), r, world_size)]) for c in chunks for r in range(world_size)]
                    assert min(shards) >= 2, (flag, batch_size, world_size)


def test_calibration_batches_are_a_pure_function_of_seed_and_epoch_and_draw_from_no_training_stream():
    import random

    from mmpt.model.calibration import calibration_batches

    np.random.seed(3)
    random.seed(3)
    torch.manual_seed(3)
    states = np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state()
    first = calibration_batches("pathmnist", 89996, 16, 64, seed=0, epoch=2)
    assert np.random.get_state()[1].tolist() == states[0].tolist() and random.getstate() == states[1]
    assert torch.equal(torch.get_rng_state(), states[2])
    again = calibration_batches("pathmnist", 89996, 16, 64, seed=0, epoch=2)
    assert len(first) == 16 and all(len(c) == 64 and np.all(np.diff(c) > 0) for c in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    chosen = np.concatenate(first)
    assert len(np.unique(chosen)) == 16 * 64 and chosen.min() >= 0 and chosen.max() < 89996
    for other in (
        calibration_batches("pathmnist", 89996, 16, 64, seed=0, epoch=3),
        calibration_batches("pathmnist", 89996, 16, 64, seed=1, epoch=2),
        calibration_batches("octmnist", 89996, 16, 64, seed=0, epoch=2),
    ):
        assert not np.array_equal(np.concatenate(other), chosen)
    # a split smaller than the request: every image once, in near-equal batches of at most the batch size
    small = calibration_batches("breastmnist", 546, 16, 64, seed=0, epoch=0)
    assert sorted(np.concatenate(small).tolist()) == list(range(546))
    assert [len(c) for c in small] == [61] * 6 + [60] * 3


def calibration_model(synthetic_root, norm="per_dataset_stats"):
    from mmpt.data.store import open_data
    from mmpt.model.build import build_transform

    cfg = tiny_config(synthetic_root, "/nonexistent", data={"datasets": ["breast", "retina"]}, model={"norm": norm})
    tasks = resolve_tasks(cfg.data.datasets)
    torch.manual_seed(0)
    model = build_model(cfg, tasks)[0]
    model.train()
    with torch.no_grad():  # statistics and counts far from any calibration's values
        for _, layer in task_norms(model.backbone):
            layer.running_mean.fill_(5.0)
            layer.num_batches_tracked.fill_(7)
    data = open_data(cfg.data, tasks)
    return model, build_transform(cfg, model), {flag: d.splits["train"] for flag, d in data.items()}


def test_calibration_sets_each_datasets_statistics_to_the_average_over_its_batches_by_hand(synthetic_root):
    from mmpt.model.calibration import calibrate_norms, calibration_batches

    model, transform, splits = calibration_model(synthetic_root)
    before = copy.deepcopy(model.state_dict())
    assert calibrate_norms(model, splits, transform, torch.device("cpu"), batches=3, batch_size=16, seed=4, epoch=1)
    after = model.state_dict()
    layer = model.backbone.conv1[1]
    for flag, split in splits.items():
        means, variances = [], []
        for chunk in calibration_batches(flag, len(split), 3, 16, seed=4, epoch=1):
            x = transform(torch.from_numpy(np.array(split.open_images()[chunk])))
            with torch.no_grad():
                z = model.backbone.conv1[0](x)  # what the first BatchNorm sees
            means.append(z.mean(dim=(0, 2, 3)))
            variances.append(z.var(dim=(0, 2, 3), unbiased=True))
        row = model.norm_tasks.index(flag)
        assert torch.allclose(layer.running_mean[row], torch.stack(means).mean(0), atol=1e-5)
        assert torch.allclose(layer.running_var[row], torch.stack(variances).mean(0), rtol=1e-4, atol=1e-6)
    for key, value in before.items():  # only the running statistics moved; the counts of training batches stay
        moved = key.endswith(("running_mean", "running_var"))
        assert torch.equal(after[key], value) != moved, key
    assert not model.training
    assert not calibrate_norms(model, splits, transform, torch.device("cpu"), batches=0, batch_size=16, seed=4, epoch=1)
    shared, transform, splits = calibration_model(synthetic_root, norm="shared")
    before = copy.deepcopy(shared.state_dict())
    assert not calibrate_norms(
        shared, splits, transform, torch.device("cpu"), batches=3, batch_size=16, seed=4, epoch=1
    )
    assert all(torch.equal(v, before[k]) for k, v in shared.state_dict().items())


def is_statistic(key: str) -> bool:
    return key.endswith(("running_mean", "running_var"))


@pytest.mark.parametrize("norm_reference", ["per_dataset_stats"], indirect=True)
@pytest.mark.slow
def test_calibration_changes_the_statistics_and_no_other_weight_of_a_run(synthetic_root, tmp_path, norm_reference):
    """With dropout and augmentation drawing random numbers: a run calibrated before each validation ends with
    the same weights (statistics aside) as the run without, so calibration draws from no training stream."""
    norm, reference, out = norm_reference
    off = tmp_path / "off"
    run(norm_config(synthetic_root, off, norm, sampler={"tasks_per_step": 2}, model={"norm_calibration_batches": 0}))
    calibrated = ckpt.load(RunDir(out).last)[ckpt.MODEL]
    plain = ckpt.load(RunDir(off).last)[ckpt.MODEL]
    assert calibrated.keys() == plain.keys()
    for key in calibrated:
        assert torch.equal(calibrated[key], plain[key]) != is_statistic(key), key
    assert summary(off)["final_digest"] != reference["final_digest"]


@pytest.mark.parametrize("norm_reference", ["per_dataset_stats", "per_dataset"], indirect=True)
@pytest.mark.slow
def test_best_checkpoint_holds_the_statistics_calibrated_for_its_weights(synthetic_root, norm_reference):
    """best.pt, which the test evaluates, holds its weights' statistics as calibrated before the validation that
    chose it: calibrating its weights again with that epoch's batches gives them bit for bit."""
    from mmpt.config import recorded_config
    from mmpt.data.store import open_data
    from mmpt.model.build import build_transform, calibrate_statistics

    _norm, reference, out = norm_reference
    best = ckpt.load(RunDir(out).best)
    cfg = recorded_config(best[ckpt.CONFIG])
    tasks = resolve_tasks(cfg.data.datasets)
    model = build_model(cfg, tasks)[0]
    model.load_state_dict(best[ckpt.MODEL])
    with torch.no_grad():
        for _, layer in task_norms(model.backbone):
            layer.running_mean.zero_()
    splits = {flag: d.splits["train"] for flag, d in open_data(cfg.data, tasks).items()}
    epoch = best[ckpt.EARLY_STOPPING]["best_epoch"] - 1
    assert calibrate_statistics(cfg, model, splits, build_transform(cfg, model), torch.device("cpu"), epoch=epoch)
    for key, value in model.state_dict().items():
        assert torch.equal(value, best[ckpt.MODEL][key]), key
    assert reference["best_digest"] == ckpt.state_digest(best[ckpt.MODEL])


@pytest.mark.slow
def test_under_torchrun_without_sync_norm_the_calibration_averages_the_ranks_shards(synthetic_root, tmp_path):
    """2 gloo processes, model.sync_norm false: every rank calibrates its shard of each batch and the ranks' averages
    are averaged, so
    the replicas agree and their statistics are the mean of the two shards' calibrations (not rank 0's alone)."""
    from mmpt.config import recorded_config
    from mmpt.data.loader import shard
    from mmpt.data.store import open_data
    from mmpt.model.build import build_transform
    from mmpt.model.calibration import calibration_batches, estimate_statistics

    raw = {
        "name": "ddp",
        "output": str(tmp_path / "run"),
        "data": {"root": str(synthetic_root), "datasets": ["breast", "retina"], "num_workers": 0},
        "model": {
            "backbone": "test_resnet",
            "norm": "per_dataset_stats",
            "norm_calibration_batches": 3,
            "sync_norm": False,
        },
        "input": {"mode": "native"},
        "optim": {"lr": 0.003},
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "progress": False, "log_every_steps": 4},
    }
    finish(torchrun("--config", str(write_config(tmp_path / "ddp.yaml", raw))))
    s = summary(tmp_path / "run")
    assert s["rank_digests"] == [s["final_digest"]] * 2
    last = ckpt.load(RunDir(tmp_path / "run").last)
    cfg = recorded_config(last[ckpt.CONFIG])
    tasks = resolve_tasks(cfg.data.datasets)
    splits = {flag: d.splits["train"] for flag, d in open_data(cfg.data, tasks).items()}
    shards = []
    for rank in range(2):
        model = build_model(cfg, tasks)[0]
        model.load_state_dict(last[ckpt.MODEL])
        batches = {
            flag: [c[shard(len(c), rank, 2)] for c in calibration_batches(flag, len(split), 3, 16, seed=0, epoch=0)]
            for flag, split in splits.items()
        }
        estimate_statistics(model, splits, batches, build_transform(cfg, model), torch.device("cpu"))
        shards.append(model.state_dict())
    for key, value in last[ckpt.MODEL].items():
        if is_statistic(key):
            assert torch.allclose(value, (shards[0][key] + shards[1][key]) / 2, rtol=1e-5, atol=1e-6), key
    rank0 = [k for k in last[ckpt.MODEL] if is_statistic(k)]
    assert not all(torch.allclose(last[ckpt.MODEL][k], shards[0][k], rtol=1e-5, atol=1e-6) for k in rank0)


@pytest.mark.slow
def test_on_a_short_budget_the_calibrated_default_keeps_up_with_shared_statistics(synthetic_root, tmp_path):
    """12 synthetic datasets of 128 train images, configs/quickstart.yaml for 2 epochs (8 updates of each
    dataset's statistics): the running averages lag (mean test AUC 0.58 against 0.73 with shared statistics);
    calibrated before each validation, the default is within 0.02 of shared statistics or ahead."""

    from mmpt.config import load_config

    quickstart = REPO / "configs" / "quickstart.yaml"
    auc = {}
    for name, model in (("default", {}), ("shared", {"norm": "shared"})):
        cfg = load_config(
            quickstart,
            [
                {
                    "output": str(tmp_path / name),
                    "data": {"root": str(synthetic_root), "synthetic_samples": 128},
                    "model": model,
                    "train": {"epochs": 2, "progress": False},
                }
            ],
        )
        auc[name] = run(cfg)["mean"]["auc"]
    assert above(auc["default"] - auc["shared"], -0.02), auc


def test_the_layout_as_a_tensor_normalises_as_the_per_segment_batchnorm(synthetic_root):
    """The compiled (and synchronised) form of per-dataset BatchNorm, `normalize_rows`, gives the per-segment
    F.batch_norm's features, gradients and running statistics up to float rounding."""
    from mmpt.config import load_config

    cfg = load_config(
        overrides=[
            {
                "data": {"root": str(synthetic_root), "datasets": ["breast", "retina"]},
                "model": {"backbone": "test_resnet", "img_size": 32, "norm": "per_dataset_stats"},
            }
        ]
    )
    torch.manual_seed(0)
    eager = build_model(cfg, resolve_tasks(cfg.data.datasets))[0].train()
    rows = copy.deepcopy(eager)
    x = torch.randn(13, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    weights = torch.linspace(-1, 1, 13 * 256).view(13, -1)
    results = []
    for model, as_tensor in ((eager, False), (rows, True)):
        model.set_norm_layout([("breastmnist", 6), ("retinamnist", 7)], as_tensor=as_tensor)
        features = model.backbone(x)
        (features * weights[:, : features.shape[1]]).sum().backward()
        grads = {n: p.grad for n, p in model.backbone.named_parameters()}
        results.append((features.detach(), grads, model.backbone.state_dict()))
    (f1, g1, s1), (f2, g2, s2) = results
    assert torch.allclose(f1, f2, atol=1e-4)
    assert below(max(float((g1[k] - g2[k]).norm() / (1e-4 * g1[k].norm() + 1e-6)) for k in g1), 1.0)
    assert all(torch.allclose(s1[k].float(), s2[k].float(), atol=1e-5) for k in s1)
