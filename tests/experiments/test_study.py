"""Experiments end to end on a tiny synthetic sweep_study: series (sweep × seeds, interrupted and resumed; individual),
summaries, comparisons with statistics recomputed independently, frozen-backbone probes, plots, --print-config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
import yaml
from medmnist.evaluator import getACC, getAUC

import mmpt.evaluation.probe as probe_module
import mmpt.training.loop
import mmpt.training.step
from mmpt.analysis.report import forest_rows
from mmpt.cli import evaluate_main, train_main
from mmpt.config import load_config
from mmpt.data.synthetic import write_synthetic
from mmpt.errors import MmptError
from mmpt.experiments.series import plan_series
from mmpt.model.build import build_model, build_transform, load_backbone, load_initial_weights
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.rundir import Results, RunDir
from mmpt.tasks import TASKS, resolve_tasks
from tests.helpers import assert_png, quiet

DATASETS = ["pneumoniamnist", "breastmnist"]  # in medmnist's order, as every table lists them
TRAIN_IMAGES = 64  # per dataset (val and test: 16 each)
STEPS_PER_RUN = 4  # 64 train images of each of 2 datasets in batches of 32
STOP_AT = 2 * STEPS_PER_RUN + 3  # in the third run of the sweep, after its third step


def write_recipe(path: Path, data_root: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "name": "study",
                "data": {
                    "root": str(data_root),
                    "datasets": ["breast", "pneumonia"],
                    "num_workers": 0,
                    "eval_batch_size": 128,
                },
                "model": {"backbone": "test_resnet"},
                "input": {"mode": "native"},
                "optim": {"lr": 0.003},
                "train": {"epochs": 1, "batch_size": 32, "device": "cpu", "progress": False, "log_every_steps": 4},
            }
        )
    )
    return path


def stop_after(steps: int, mp: pytest.MonkeyPatch):
    """A StopSignal stand-in that reports SIGINT once `steps` training steps have run, counted over every run of
    the series (as a Ctrl-C during that step would: the step finishes, then the loop sees the signal)."""
    taken = {"n": 0}
    real_step = mmpt.training.step.TrainStep.__call__

    def counting_step(self, parts, step):
        taken["n"] += 1
        return real_step(self, parts, step)

    mp.setattr(mmpt.training.step.TrainStep, "__call__", counting_step)

    class StopAfter:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        @property
        def received(self):
            return "SIGINT" if taken["n"] >= steps else None

    return StopAfter


# every test that uses this fixture is marked slow: its runs and theirs take more than about 5 s
@pytest.fixture(scope="module")
def sweep_study(tmp_path_factory):
    """A sweep (loss.weighting=none,size × seeds 0,1) stopped in its third run and resumed, and an individual
    series (2 datasets × seeds 0,1) in the same folder: 8 runs of 1 epoch on 64 synthetic images per dataset."""
    base = tmp_path_factory.mktemp("study")
    data_root = base / "data"
    write_synthetic(data_root, 28, resolve_tasks(DATASETS), train_samples=TRAIN_IMAGES, seed=0)
    recipe = write_recipe(base / "recipe.yaml", data_root)
    out = base / "runs" / "study"
    sweep = ["--config", str(recipe), "--output", str(out), "--sweep", "loss.weighting=none,size", "--seeds", "0,1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mmpt.training.loop, "StopSignal", stop_after(STOP_AT, mp))
        stopped = quiet(train_main, sweep)
    state_after_stop = {
        p.relative_to(out).as_posix(): (RunDir(p).summary.is_file(), RunDir(p).last.is_file())
        for p in out.glob("weighting-*/seed*")
    }
    resumed = quiet(train_main, sweep)
    individual = quiet(train_main, ["--config", str(recipe), "--output", str(out), "--individual", "--seeds", "0,1"])
    return SimpleNamespace(
        out=out,
        recipe=recipe,
        data=data_root,
        stopped=stopped,
        resumed=resumed,
        individual=individual,
        state_after_stop=state_after_stop,
    )


@pytest.mark.slow
def test_series_stops_cleanly_and_resumes_where_it_stopped(sweep_study):
    code, out, err = sweep_study.stopped
    assert code == 130 and "run the same command again" in err
    assert sweep_study.state_after_stop == {
        "weighting-none/seed0": (True, True),
        "weighting-none/seed1": (True, True),
        "weighting-size/seed0": (False, True),  # stopped after its third step, last.pt written
    }
    code, out, _ = sweep_study.resumed
    assert code == 0
    assert "[1/4] weighting-none/seed0: finished, skipped" in out
    assert "[3/4] weighting-size/seed0: continuing from last.pt" in out and "resumed at epoch 0, step 3" in out
    for run in ("weighting-none/seed0", "weighting-none/seed1", "weighting-size/seed0", "weighting-size/seed1"):
        result = json.loads(RunDir(sweep_study.out / run).summary.read_text())
        assert result["steps"] == STEPS_PER_RUN, run
    # it resumed with its own config (exactness of a resume from last.pt: tests/training/test_resume.py)
    cfg = load_config(RunDir(sweep_study.out / "weighting-size" / "seed0").config)
    assert (cfg.loss.weighting, cfg.train.seed) == ("size", 0)


@pytest.mark.slow
def test_individual_series_trains_one_single_dataset_model_per_dataset_and_seed(sweep_study):
    code, _, _ = sweep_study.individual
    assert code == 0
    for seed in (0, 1):
        for flag in DATASETS:
            run_dir = sweep_study.out / "individual" / f"seed{seed}" / flag
            state = ckpt.load(RunDir(run_dir).best)
            assert {k.split(".")[1] for k in state[ckpt.MODEL] if k.startswith("heads.")} == {flag}
            config = load_config(RunDir(run_dir).config)
            # the same recipe as the mm-PT side, apart from the dataset and seed
            assert (config.train.seed, config.model.backbone, config.optim.lr) == (seed, "test_resnet", 0.003)
            assert_png(Results(run_dir).loss_curves)


@pytest.mark.slow
def test_summary_holds_mean_and_std_over_seeds_per_variant(sweep_study):
    summary = json.loads((sweep_study.out / "sweep.json").read_text())["variants"]
    assert set(summary) == {"weighting-none", "weighting-size", "individual"}
    for variant, entry in summary.items():
        assert entry["seeds"] == [0, 1]
        for flag in DATASETS:
            runs = [sweep_study.out / variant / f"seed{s}" / (flag if variant == "individual" else "") for s in (0, 1)]
            aucs = [json.loads(Results(r).metrics.read_text())[flag]["auc"] for r in runs]
            stats = entry["datasets"][flag]["auc"]
            assert stats["mean"] == pytest.approx(np.mean(aucs), abs=1e-12)
            assert stats["std"] == pytest.approx(np.std(aucs, ddof=1), abs=1e-12)
        per_seed_mean = [np.mean([entry["datasets"][f]["acc"]["values"][s] for f in DATASETS]) for s in (0, 1)]
        assert entry["mean"]["acc"]["mean"] == pytest.approx(np.mean(per_seed_mean), abs=1e-12)
    rows = pd.read_csv(sweep_study.out / "sweep.csv")
    assert set(rows["variant"]) == set(summary)
    assert "± " in (sweep_study.out / "sweep.md").read_text()
    assert_png(sweep_study.out / "sweep.png")
    # summarize on demand rewrites the same numbers
    before = (sweep_study.out / "sweep.json").read_text()
    assert quiet(evaluate_main, ["summarize", str(sweep_study.out)])[0] == 0
    assert (sweep_study.out / "sweep.json").read_text() == before


def _scores(run_dir: Path, flag: str) -> np.ndarray:
    (path,) = Results(run_dir).predictions.glob(f"{flag}_test_*.csv")
    return pd.read_csv(path, index_col=0, header=None).sort_index().values


@pytest.mark.slow
def test_compare_reports_delta_m_and_paired_intervals_recomputed_independently(sweep_study, tmp_path):
    a, b = sweep_study.out / "weighting-none" / "seed0", sweep_study.out / "weighting-size" / "seed0"
    code, out, _ = quiet(evaluate_main, ["compare", str(a), str(b), "--bootstrap", "100", "--output", str(tmp_path)])
    assert code == 0 and "Δm" in out
    result = json.loads((tmp_path / "compare.json").read_text())
    labels = {f: np.load(sweep_study.data / f"{f}.npz")["test_labels"] for f in DATASETS}
    kinds = {f: TASKS[f].task_type for f in DATASETS}
    # Δm (LibMTL): mean over datasets and metrics of the relative change, in percent
    terms = []
    for flag in DATASETS:
        for metric in (getAUC, getACC):
            m_a = metric(labels[flag], _scores(a, flag), kinds[flag])
            m_b = metric(labels[flag], _scores(b, flag), kinds[flag])
            terms.append((m_b - m_a) / m_a)
    assert result["runs"][0]["delta_m"] == 0.0
    assert result["runs"][1]["delta_m"] == pytest.approx(100 * np.mean(terms), abs=1e-9)
    # the paired interval of the breast AUC difference: the same resampled images on both sides
    y, s_a, s_b = labels["breastmnist"], _scores(a, "breastmnist"), _scores(b, "breastmnist")

    def interval(statistic):
        res = scipy.stats.bootstrap(
            (np.arange(len(y)),),
            statistic,
            vectorized=False,
            n_resamples=100,
            method="percentile",
            rng=np.random.default_rng(0),
        )
        return res.confidence_interval.low, res.confidence_interval.high

    cell = result["runs"][1]["datasets"]["breastmnist"]["auc"]
    low, high = interval(lambda i: getAUC(y[i], s_b[i], "binary-class") - getAUC(y[i], s_a[i], "binary-class"))
    assert (cell["diff_ci_low"], cell["diff_ci_high"]) == (
        pytest.approx(low, abs=1e-12),
        pytest.approx(high, abs=1e-12),
    )
    assert cell["diff"] == pytest.approx(getAUC(y, s_b, "binary-class") - getAUC(y, s_a, "binary-class"), abs=1e-12)
    low, high = interval(lambda i: getAUC(y[i], s_b[i], "binary-class"))
    assert (cell["ci_low"], cell["ci_high"]) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert cell["ci_low"] <= cell["value"] <= cell["ci_high"]
    for name in ("compare.md", "compare.csv"):
        assert (tmp_path / name).is_file()
    assert_png(tmp_path / "compare_auc.png")
    assert_png(tmp_path / "compare_diff.png")
    # the forest plot: Δm and each dataset's AUC difference of the other run, with the intervals above
    rows, columns = forest_rows(result, "auc")
    name = result["runs"][1]["name"]
    assert columns == ["Δm (%, auc,acc)", *(f"Δ auc {f.removesuffix('mnist')}" for f in result["datasets"])]
    other = result["runs"][1]
    assert rows[name][columns[0]] == (other["delta_m"], other["delta_m_ci_low"], other["delta_m_ci_high"])
    assert rows[name]["Δ auc breast"] == (cell["diff"], cell["diff_ci_low"], cell["diff_ci_high"])
    assert_png(tmp_path / "compare_forest.png")


@pytest.mark.slow
def test_compare_of_seed_folders_gives_std_and_wilcoxon_over_datasets(sweep_study, tmp_path):
    mmpt_side, individual = sweep_study.out / "weighting-none", sweep_study.out / "individual"
    code, _, _ = quiet(
        evaluate_main, ["compare", str(mmpt_side), str(individual), "--bootstrap", "20", "--output", str(tmp_path)]
    )
    assert code == 0
    result = json.loads((tmp_path / "compare.json").read_text())
    ref, other = result["runs"]
    assert (ref["seeds"], other["seeds"]) == (2, 2)
    diffs = []
    for flag in DATASETS:
        mine = [json.loads(Results(individual / f"seed{s}" / flag).metrics.read_text())[flag]["auc"] for s in (0, 1)]
        theirs = [json.loads(Results(mmpt_side / f"seed{s}").metrics.read_text())[flag]["auc"] for s in (0, 1)]
        cell = other["datasets"][flag]["auc"]
        assert cell["value"] == pytest.approx(np.mean(mine), abs=1e-12)
        assert cell["std"] == pytest.approx(np.std(mine, ddof=1), abs=1e-12)
        diffs.append(np.mean(mine) - np.mean(theirs))
    test = other["wilcoxon"]["auc"]
    expected = scipy.stats.wilcoxon(diffs).pvalue if any(diffs) else float("nan")
    assert test["p_value"] == pytest.approx(expected, nan_ok=True)
    assert (test["better"], test["worse"]) == (sum(d > 0 for d in diffs), sum(d < 0 for d in diffs))
    assert other["p_value"]["auc"] == test["p_value"]


@pytest.mark.slow
def test_compare_refuses_runs_evaluated_on_other_data_in_one_line(sweep_study, tmp_path):
    a = sweep_study.out / "weighting-none" / "seed0"
    for change, message in (({"resolution": 64}, "64 px"), ("labels", "different breastmnist test sets")):
        other = tmp_path / f"other_{len(message)}"
        shutil.copytree(Results(a).predictions, Results(other).predictions)
        shutil.copy(RunDir(a).config, RunDir(other).config)
        record_path = Results(other).predictions / "data.json"
        record = json.loads(record_path.read_text())
        if change == "labels":
            record["datasets"]["breastmnist"]["labels_sha256"] = "0" * 64
        else:
            record.update(change)
        record_path.write_text(json.dumps(record))
        output = tmp_path / "out"
        code, _, err = quiet(evaluate_main, ["compare", str(a), str(other), "--output", str(output)])
        assert code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1
        assert not output.exists()


@pytest.mark.slow
def test_knn_probe_on_a_folder_of_seeds_uses_frozen_features_and_caches_them(sweep_study, tmp_path, monkeypatch):
    from sklearn.neighbors import KNeighborsClassifier

    source = sweep_study.out / "weighting-none"
    code, _, _ = quiet(evaluate_main, ["probe", str(source), "--method", "knn", "--k", "5", "--device", "cpu"])
    assert code == 0
    run_dir, result_dir = source / "seed0", source / "probe-knn" / "seed0"
    table = json.loads(Results(result_dir).metrics.read_text())
    assert set(table) == {*DATASETS, "mean"}
    # features are the eval-mode backbone's (BatchNorm statistics frozen)
    model, cfg = load_backbone(run_dir)
    model.eval()
    split = np.load(sweep_study.data / "breastmnist.npz")
    test_features = np.load(run_dir / "features" / "breastmnist_28_test.npy")
    with torch.no_grad():
        # through breast's own BatchNorm statistics (model.norm auto keeps them per dataset)
        expected = model.features(
            build_transform(cfg, model)(torch.from_numpy(split["test_images"])), "breastmnist"
        ).numpy()
    np.testing.assert_allclose(test_features, expected, rtol=1e-4, atol=1e-5)
    # the scores are those of a cosine 5-NN on the training features
    train_features = np.load(run_dir / "features" / "breastmnist_28_train.npy")
    knn = KNeighborsClassifier(5, metric="cosine").fit(train_features, split["train_labels"][:, 0])
    np.testing.assert_allclose(_scores(result_dir, "breastmnist"), knn.predict_proba(test_features), atol=1e-6)
    assert table["breastmnist"]["auc"] == pytest.approx(
        getAUC(split["test_labels"], knn.predict_proba(test_features), "binary-class"), abs=1e-12
    )
    # a second probe reads the cached features instead of running the backbone again
    monkeypatch.setattr(probe_module, "extract_features", lambda *a, **k: pytest.fail("features were re-extracted"))
    out = tmp_path / "again"
    assert quiet(evaluate_main, ["probe", str(run_dir), "--method", "knn", "--output", str(out)])[0] == 0
    assert Results(out).metrics.is_file()


@pytest.mark.slow
def test_linear_probe_chooses_regularisation_on_val_and_compare_takes_probe_results(sweep_study, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    individual = sweep_study.out / "individual"
    assert quiet(evaluate_main, ["probe", str(individual), "--method", "linear", "--device", "cpu"])[0] == 0
    result_dir = individual / "probe-linear" / "seed0" / "breastmnist"
    chosen = json.loads((result_dir / "probe.json").read_text())["chosen"]["breastmnist"]
    features = individual / "seed0" / "breastmnist" / "features"
    x = {s: np.load(features / f"breastmnist_28_{s}.npy") for s in ("train", "val")}
    split = np.load(sweep_study.data / "breastmnist.npz")
    val_aucs = []
    for c in probe_module.C_GRID:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        clf.fit(x["train"], split["train_labels"][:, 0])
        val_aucs.append(getAUC(split["val_labels"], clf.predict_proba(x["val"]), "binary-class"))
    assert chosen["C"] == probe_module.C_GRID[int(np.argmax(val_aucs))]
    assert chosen["val_auc"] == pytest.approx(max(val_aucs), abs=1e-9)
    # compare takes probe results as it takes runs: kNN of mm-PT vs linear of individual models, seeds both sides
    knn = sweep_study.out / "weighting-none" / "probe-knn"
    if not knn.exists():
        assert quiet(evaluate_main, ["probe", str(sweep_study.out / "weighting-none"), "--method", "knn"])[0] == 0
    code, _, _ = quiet(
        evaluate_main,
        ["compare", str(knn), str(individual / "probe-linear"), "--bootstrap", "20", "--output", str(tmp_path)],
    )
    assert code == 0
    assert json.loads((tmp_path / "compare.json").read_text())["datasets"] == DATASETS


@pytest.mark.slow
def test_probe_of_a_bare_backbone_is_the_untrained_reference(sweep_study, tmp_path):
    out = tmp_path / "bare"
    code, _, _ = quiet(
        evaluate_main,
        [
            "probe",
            "--backbone",
            "test_resnet",
            "--config",
            str(sweep_study.recipe),
            "--method",
            "knn",
            "--output",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert code == 0
    assert set(json.loads(Results(out).metrics.read_text())) == {*DATASETS, "mean"}
    assert (Results(out).predictions / "data.json").is_file() and list((out / "features").glob("*.npy"))


@pytest.mark.slow
def test_init_from_copies_backbone_and_matching_heads_only(sweep_study):
    source = sweep_study.out / "weighting-none" / "seed0"
    cfg = load_config(sweep_study.recipe, [{"data": {"datasets": ["breast", "chest"]}}])
    model, _ = build_model(cfg, resolve_tasks(cfg.data.datasets))
    chest_before = {k: v.clone() for k, v in model.heads["chestmnist"].state_dict().items()}
    assert load_initial_weights(model, source, cfg) == ["breastmnist"]
    saved = ckpt.load(RunDir(source).best)[ckpt.MODEL]
    # model.norm auto: both keep per-dataset statistics; breast's row is copied (chest's comes from the mixture)
    ours, theirs = model.norm_tasks.index("breastmnist"), ["pneumoniamnist", "breastmnist"].index("breastmnist")
    for name, value in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.startswith("backbone.") and name.endswith(("running_mean", "running_var")):
            assert value.dim() == 2 and torch.equal(value[ours], saved[name][theirs]), name
        elif name.startswith(("backbone.", "heads.breastmnist.")):
            assert torch.equal(value, saved[name]), name
    for name, value in model.heads["chestmnist"].state_dict().items():
        assert torch.equal(value, chest_before[name])
    for other in ({"model": {"backbone": "test_vit"}}, {"model": {"img_size": 32}, "input": {"mode": "pad"}}):
        cfg = load_config(sweep_study.recipe, [other])
        model, _ = build_model(cfg, resolve_tasks(cfg.data.datasets))
        with pytest.raises(MmptError, match="initialise from a run with the same backbone"):
            load_initial_weights(model, source, cfg)


@pytest.mark.slow
def test_init_from_on_the_command_line(sweep_study, tmp_path):
    source = sweep_study.out / "weighting-none" / "seed0"
    refused = tmp_path / "vit"
    code, _, err = quiet(
        train_main,
        [
            "--config",
            str(sweep_study.recipe),
            "--init-from",
            str(source),
            "--backbone",
            "test_vit",
            "--output",
            str(refused),
        ],
    )
    assert code == 2 and err.startswith("error: model.init_from") and err.count("\n") == 1
    assert not refused.exists()
    tuned = tmp_path / "tuned"
    code, out, _ = quiet(
        train_main,
        [
            "--config",
            str(sweep_study.recipe),
            "--datasets",
            "breast",
            "--init-from",
            str(source),
            "--output",
            str(tuned),
        ],
    )
    assert code == 0 and "backbone and heads of breastmnist" in out
    assert load_config(RunDir(tuned).config).model.init_from == str(source)
    # mm-PFT: each seed of an individual series starts from the same seed of the mm-PT series
    cfg = load_config(sweep_study.recipe, [{"model": {"init_from": str(sweep_study.out / "weighting-none")}}])
    variants = plan_series(cfg, individual=True, seeds=[0, 1])
    assert [(v.path, v.cfg.model.init_from) for v in variants] == [
        (f"individual/seed{s}/{f}", str(sweep_study.out / "weighting-none" / f"seed{s}"))
        for s in (0, 1)
        for f in DATASETS
    ]


@pytest.mark.slow
def test_evaluate_writes_confusion_matrices_and_loss_curves(sweep_study, tmp_path):
    run_dir = sweep_study.out / "weighting-none" / "seed0"
    assert quiet(evaluate_main, [str(run_dir), "--output", str(tmp_path), "--device", "cpu"])[0] == 0
    for name in ("confusion_breastmnist.png", "confusion_pneumoniamnist.png", "loss_curves.png"):
        assert_png(tmp_path / name)


@pytest.mark.slow
def test_series_flags_with_bad_values_are_one_line_errors(sweep_study, tmp_path):
    for flags, message in (
        (["--sweep", "optim.nope=1,2"], "unknown key 'optim.nope'"),
        (["--sweep", "loss.weighting=none,heavy"], "loss.weighting must be one of"),
        (["--seeds", "0,x"], "--seeds expects"),
    ):
        output = tmp_path / "never"
        code, _, err = quiet(train_main, ["--config", str(sweep_study.recipe), "--output", str(output), *flags])
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert not output.exists()
