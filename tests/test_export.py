"""evaluate.py export: a run's backbone as a timm model folder that plain timm loads, with heads and a model card."""

import contextlib
import io
import json
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
from mmpt.recipe import build_model, load_backbone, load_initial_weights
from mmpt.tasks import resolve_tasks


def quiet(fn, *args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = fn(*args)
    return code, out.getvalue(), err.getvalue()


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
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=0, atol=1e-6)
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
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert keys == {k.removeprefix("heads.") for k in state if k.startswith("heads.")}
    card = (export / "README.md").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
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
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    code, _out, err = quiet(
        evaluate_main, ["probe", str(export), "--method", "knn", "--k", "3", "--output", str(tmp_path / "probe")]
    )
    assert code == 0, err
    assert len(list((tmp_path / "probe" / "predictions").glob("*_test_*.csv"))) == 2


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
