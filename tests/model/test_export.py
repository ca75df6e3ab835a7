"""evaluate.py export: a run's backbone as a timm model folder that plain timm loads, with heads and a model card."""

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from medmnist import INFO

from mmpt.cli import evaluate_main, train_main
from mmpt.config import load_config
from mmpt.data.synthetic import write_synthetic
from mmpt.model.build import build_model, load_backbone, load_initial_weights
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.rundir import Results, RunDir
from mmpt.tasks import resolve_tasks
from tests.helpers import TINY_RUN, quiet

DATASETS = ["breastmnist", "retinamnist"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch test_vit run (32 px input, images padded) on 32 synthetic images of 2 datasets."""
    base = tmp_path_factory.mktemp("export")
    write_synthetic(base / "data", 28, resolve_tasks(DATASETS), train_samples=32, seed=0)
    recipe = base / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "data": {"root": str(base / "data"), "datasets": DATASETS, "num_workers": 0},
                "model": {"backbone": "test_vit", "img_size": 32},
                "input": {"mode": "pad"},
                "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "progress": False},
            }
        )
    )
    code, _, err = quiet(train_main, ["--config", str(recipe), "--output", str(base / "run")])
    assert code == 0, err
    code, _out, err = quiet(evaluate_main, ["export", str(base / "run"), "--output", str(base / "export")])
    assert code == 0, err
    return base / "run", base / "export"


LOAD_WITH_TIMM = textwrap.dedent("""
    import json, sys
    import numpy as np, timm, torch
    model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
    config = timm.data.resolve_data_config({}, model=model)
    x = torch.from_numpy(np.load(sys.argv[2]))
    with torch.no_grad():
        np.save(sys.argv[3], model(x).numpy())
    print(json.dumps({"input_size": config["input_size"], "mean": config["mean"], "std": config["std"],
                      "mmpt_imported": any(m.split(".")[0] == "mmpt" for m in sys.modules)}))
""")


@pytest.mark.slow
def test_export_loads_in_plain_timm_with_the_engines_features(run, tmp_path):
    run_dir, export = run
    x = torch.randn(3, 3, 32, 32)
    np.save(tmp_path / "x.npy", x.numpy())
    done = subprocess.run(
        [sys.executable, "-c", LOAD_WITH_TIMM, str(export), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    model, _ = load_backbone(run_dir)
    with torch.no_grad():
        expected = model.eval().features(x).numpy()
    # the loading process runs with torch's own kernel choice, this one with the suite's: over the 12 kernel
    # configurations the features differed by up to 1.55e-6; 1e-5 is 6 times that (a wrong weight moves them by ~1)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=0, atol=1e-5)
    assert not loaded["mmpt_imported"]
    assert loaded["input_size"] == [3, 32, 32]
    assert loaded["mean"] == pytest.approx(list(model.mean_std[0])) and loaded["std"] == pytest.approx(
        list(model.mean_std[1])
    )
    config = json.loads((export / "config.json").read_text())
    assert config["architecture"] == "test_vit" and config["num_classes"] == 0


def test_export_carries_the_heads_with_medmnist_label_names_and_a_model_card(run):
    from safetensors import safe_open

    run_dir, export = run
    with safe_open(str(export / "heads.safetensors"), "pt") as f:
        heads = json.loads(f.metadata()["mmpt_heads"])
        keys = set(f.keys())
    assert heads["retinamnist"]["labels"] == [INFO["retinamnist"]["label"][str(i)] for i in range(5)]
    assert heads["breastmnist"]["task"] == "binary-class"
    state = torch.load(RunDir(run_dir).best, weights_only=True)["model"]
    assert keys == {k.removeprefix("heads.") for k in state if k.startswith("heads.")}
    card = (export / "README.md").read_text()
    metrics = json.loads(Results(run_dir).metrics.read_text())
    assert "breastmnist, retinamnist" in card and f"{metrics['retinamnist']['auc']:.4f}" in card
    assert "local-dir:" in card and "test_vit" in card


def test_export_refuses_a_non_empty_folder_without_overwrite(run, tmp_path):
    run_dir, _ = run
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = quiet(evaluate_main, ["export", str(run_dir), "--output", str(tmp_path)])
    assert code == 2 and err.startswith("error:") and "--overwrite" in err and err.count("\n") == 1
    assert not (tmp_path / "model.safetensors").exists() and (tmp_path / "notes.txt").read_text() == "mine"
    code, _, err = quiet(
        evaluate_main, ["export", str(run_dir), "--output", str(tmp_path), "--overwrite", "--checkpoint", "last"]
    )
    assert code == 0 and (tmp_path / "model.safetensors").is_file()


def test_init_from_and_probe_accept_an_export(run, tmp_path):
    run_dir, export = run
    cfg = load_config(export / "mmpt-config.yaml", [{"data": {"datasets": ["breastmnist"]}}])
    model, _ = build_model(cfg, resolve_tasks(cfg.data.datasets))
    assert load_initial_weights(model, export, cfg) == ["breastmnist"]
    state = torch.load(RunDir(run_dir).best, weights_only=True)["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    code, _out, err = quiet(
        evaluate_main, ["probe", str(export), "--method", "knn", "--k", "3", "--output", str(tmp_path / "probe")]
    )
    assert code == 0, err
    assert len(list(Results(tmp_path / "probe").predictions.glob("*_test_*.csv"))) == 2


@pytest.mark.parametrize("norm", ["per_dataset_stats", "per_dataset"])
def test_a_per_dataset_norm_export_carries_each_datasets_statistics(tmp_path, norm):
    """model.safetensors holds the size-weighted mixture; norm.safetensors each dataset's statistics (and weights),
    which make plain timm normalise as that dataset; --init-from/probe read the export back per dataset."""
    import timm
    from safetensors.torch import load_file

    write_synthetic(tmp_path / "data", 28, resolve_tasks(DATASETS), train_samples=32, seed=0)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "bn",
                "data": {"root": str(tmp_path / "data"), "datasets": DATASETS, "num_workers": 0},
                "model": {"backbone": "test_resnet", "norm": norm},
                "input": {"mode": "native"},
                "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "progress": False},
            }
        )
    )
    code, _, err = quiet(train_main, ["--config", str(recipe), "--output", str(tmp_path / "run")])
    assert code == 0, err
    code, _, err = quiet(evaluate_main, ["export", str(tmp_path / "run"), "--output", str(tmp_path / "export")])
    assert code == 0, err
    export = tmp_path / "export"
    assert f"model.norm {norm}" in (export / "README.md").read_text()
    engine, _ = load_backbone(tmp_path / "run")
    back, _ = load_backbone(export)
    plain = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    per_dataset = load_file(str(export / "norm.safetensors"))
    x = torch.randn(3, 3, 28, 28)
    outputs = {}
    with torch.no_grad():
        for flag in DATASETS:
            expected = engine.eval().features(x, flag)
            # float32 rounding at the features' scale (tens, with statistics calibrated on the data): the export's
            # shared affine weights are the share-weighted mean of identical rows, equal to within an ulp
            scale = max(1.0, expected.abs().max().item())
            torch.testing.assert_close(back.eval().features(x, flag), expected, rtol=0, atol=1e-6 * scale)
            own = {k.partition(".")[2]: v for k, v in per_dataset.items() if k.startswith(flag + ".")}
            plain.load_state_dict(own, strict=False)
            outputs[flag] = plain(x)
            torch.testing.assert_close(outputs[flag], expected, rtol=0, atol=1e-5 * scale)
    assert not torch.allclose(outputs[DATASETS[0]], outputs[DATASETS[1]], atol=1e-4)  # really per dataset


# ---------------------------------------------------------------- an export is the trained model, and says which

NORMS = ("shared", "per_dataset_stats", "per_dataset", "auto")
# unequal train splits of the synthetic files: an export mixes by these, the run's own sizes, never medmnist's
OWN_SIZES = {"pneumoniamnist": 24, "retinamnist": 40}


@pytest.fixture(scope="module")
def own_sizes_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_sizes") / "data"
    for flag, n in OWN_SIZES.items():
        write_synthetic(root, 28, resolve_tasks(flag), train_samples=n, seed=0)
    write_synthetic(root, 28, resolve_tasks("breast"), train_samples=32, seed=0)  # a dataset the source never saw
    return root


def _train(root, output, *extra):
    argv = ["--data-root", str(root), "--output", str(output), *TINY_RUN, "--batch-size", "8", *extra]
    code, _, err = quiet(train_main, argv)
    assert code == 0, err
    return output


@pytest.fixture(scope="module", params=NORMS)
def norm_export(request, own_sizes_data, tmp_path_factory):
    """(run, export) of a 1-epoch run on pneumonia and retina (24 and 40 train images) with model.norm `param`."""
    base = tmp_path_factory.mktemp(f"export_{request.param}")
    run = _train(own_sizes_data, base / "run", "--datasets", "pneumonia,retina", "--set", f"model.norm={request.param}")
    code, _, err = quiet(evaluate_main, ["export", str(run), "--output", str(base / "export")])
    assert code == 0, err
    return request.param, run, base / "export"


def test_init_from_the_export_trains_bit_for_bit_as_init_from_the_run(norm_export, own_sizes_data, tmp_path):
    """For every model.norm: the export read back is the run's checkpoint, so fine-tuning from either (here on a
    dataset the source never saw, too, which takes the mixture by the run's own sizes) gives the same digest."""
    norm, run, export = norm_export
    digests = []
    for source in (run, export):
        out = tmp_path / source.name
        _train(
            own_sizes_data,
            out,
            "--datasets",
            "breast,retina",
            "--set",
            f"model.norm={norm}",
            "--init-from",
            str(source),
        )
        digests.append(json.loads(RunDir(out).summary.read_text())["final_digest"])
    assert digests[0] == digests[1]


def test_the_export_copies_every_shared_tensor_and_mixes_only_what_is_per_dataset(norm_export):
    from safetensors import safe_open
    from safetensors.torch import load_file

    norm, run, export = norm_export
    trained = {
        k.removeprefix("backbone."): v
        for k, v in torch.load(RunDir(run).best, weights_only=True)["model"].items()
        if k.startswith("backbone.")
    }
    exported = load_file(str(export / "model.safetensors"))
    # the layers that keep statistics per dataset (T×C), and which of their tensors are per dataset
    per_dataset = {k.rpartition(".")[0] for k, v in trained.items() if k.endswith("running_mean") and v.dim() == 2}
    own_affine = any(".task_weight." in k for k in trained)
    leaves = ("running_mean", "running_var", "num_batches_tracked") + (("weight", "bias") if own_affine else ())
    mixed = {f"{layer}.{leaf}" for layer in per_dataset for leaf in leaves}
    copied = [k for k in exported if k not in mixed]
    assert len(copied) + len(mixed) == len(exported) and len(copied) >= 15
    for key in copied:  # convolutions, shared BatchNorm weights, everything one tensor in the model: bit for bit
        assert torch.equal(exported[key], trained[key]), key
    if per_dataset and not own_affine:  # per_dataset_stats: the shared affine weights are among them
        assert all(f"{layer}.weight" in copied and f"{layer}.bias" in copied for layer in per_dataset)
    applied = "per_dataset_stats" if norm == "auto" else norm
    assert bool(per_dataset) == (applied != "shared")
    if not per_dataset:
        assert not (export / "norm.safetensors").exists()
        return
    with safe_open(str(export / "norm.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["mmpt_train_images"]) == OWN_SIZES
    card = (export / "README.md").read_text()
    assert "pneumoniamnist 24, retinamnist 40 (the splits the run trained on)" in card
    # the mixture of statistics is weighted by the run's own train sizes (24, 40), not medmnist's (4,708, 1,080)
    share = torch.tensor([OWN_SIZES["pneumoniamnist"], OWN_SIZES["retinamnist"]], dtype=torch.float64)
    share /= share.sum()
    layer = sorted(per_dataset)[0]
    mean, var = trained[f"{layer}.running_mean"].double(), trained[f"{layer}.running_var"].double()
    mixed_mean = (share[:, None] * mean).sum(0)
    assert torch.allclose(exported[f"{layer}.running_mean"].double(), mixed_mean, rtol=0, atol=1e-6)
    mixed_var = (share[:, None] * (var + (mean - mixed_mean) ** 2)).sum(0)
    assert torch.allclose(exported[f"{layer}.running_var"].double(), mixed_var, rtol=0, atol=1e-6)
    official = torch.tensor([4708.0, 1080.0], dtype=torch.float64) / 5788
    assert not torch.allclose(exported[f"{layer}.running_mean"].double(), (official[:, None] * mean).sum(0), atol=1e-4)
    if applied == "per_dataset":  # the per-dataset affine weights are per dataset: mixed too
        weight = torch.stack([trained[f"{layer}.task_weight.{i}"].double() for i in range(2)])
        assert torch.allclose(exported[f"{layer}.weight"].double(), (share[:, None] * weight).sum(0), atol=1e-6)


def test_the_per_dataset_snippet_of_the_card_loads_a_dataset_of_the_export(norm_export):
    """The card's snippet names a dataset the export has (this run has no BreastMNIST), and running it makes plain
    timm give that dataset's features as the engine computes them."""
    import re

    import timm

    _, run, export = norm_export
    card = (export / "README.md").read_text()
    if not (export / "norm.safetensors").exists():
        assert "## Normalization" not in card
        return
    snippet = re.search(r"```python\n(from safetensors.*?)```", card, re.S).group(1)
    assert "breastmnist" not in snippet and 'k.startswith("pneumoniamnist.")' in snippet
    assert "plain timm normalises every input with the mixture" in card
    model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    scope = {"model": model}
    cwd = os.getcwd()
    os.chdir(export)
    try:
        exec(snippet, scope)
    finally:
        os.chdir(cwd)
    assert len(scope["own"]) > 10
    engine, _ = load_backbone(run)
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), engine.eval().features(x, "pneumoniamnist"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_export_files_get_the_mode_the_rest_of_the_run_folder_gets(run, tmp_path, umask):
    run_dir, _ = run
    previous = os.umask(umask)
    try:
        code, _, err = quiet(evaluate_main, ["export", str(run_dir), "--output", str(tmp_path / "export")])
    finally:
        os.umask(previous)
    assert code == 0, err
    files = sorted((tmp_path / "export").iterdir())
    assert {p.name for p in files} == {"model.safetensors", "config.json", "heads.safetensors"} | {
        "mmpt-config.yaml",
        "README.md",
    }
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~umask for p in files}


def test_the_card_reports_only_the_metrics_of_the_checkpoint_it_exports(run, tmp_path):
    """--checkpoint last gets last's metrics or none, never best's; an unfinished run says so, with epoch and step."""
    run_dir, _ = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    last = RunDir(copy).last
    state = ckpt.load(last)
    for key in ("heads.breastmnist.weight", "heads.breastmnist.bias"):  # the head's scores reversed: AUC 1 - AUC
        state[ckpt.MODEL][key] = -state[ckpt.MODEL][key]
    ckpt.save(last, state)  # last's weights now differ from best's, whose test report metrics.json is
    best_metrics = json.loads(Results(copy).metrics.read_text())
    best_row = f"| breastmnist | {best_metrics['breastmnist']['auc']:.4f} | {best_metrics['breastmnist']['acc']:.4f}"

    def card(*extra):
        out = tmp_path / "export"
        code, _, err = quiet(evaluate_main, ["export", str(copy), "--output", str(out), "--overwrite", *extra])
        assert code == 0, err
        return (out / "README.md").read_text()

    best = card()
    assert best_row in best and "`checkpoints/best.pt`, written at step 4 after epoch 1 of 1" in best
    assert "the run finished" in best
    text = card("--checkpoint", "last")
    assert "No test metrics of these weights were computed" in text and best_row not in text
    assert f"--checkpoint {last}" in text
    # evaluated: the card reports last's own metrics from eval/test
    code, _, err = quiet(evaluate_main, [str(copy), "--checkpoint", str(last), "--device", "cpu"])
    assert code == 0, err
    evaluated = json.loads(RunDir(copy).eval("test").metrics.read_text())
    assert evaluated["breastmnist"]["auc"] != best_metrics["breastmnist"]["auc"]
    text = card("--checkpoint", "last")
    assert f"| breastmnist | {evaluated['breastmnist']['auc']:.4f}" in text and "`eval/test/metrics.json`" in text
    # an unfinished run: its card says so, and which epoch and step the weights are from
    RunDir(copy).summary.unlink()
    text = card("--checkpoint", "last")
    assert "written at step 4 after epoch 1 of 1; the run is unfinished" in text
