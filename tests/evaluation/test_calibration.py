"""What a reviewer of a medical imaging paper asks of an evaluation, end to end on one tiny run of a dataset of each
task type: calibration metrics and reliability diagrams, per-class tables, temperature scaling (fitted on val,
predictions unchanged), compare --per-class, and the comparison as a page (compare.html) and a table (compare.tex)."""

from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from mmpt.cli import evaluate_main, train_main
from mmpt.data.synthetic import write_synthetic
from mmpt.errors import MmptError
from mmpt.evaluation import temperature
from mmpt.evaluation.metrics import ECE_BINS, compute_metrics, per_class_metrics
from mmpt.model.losses import CrossEntropyLoss
from mmpt.runs.rundir import Results
from mmpt.tasks import MULTI_LABEL, TASKS, resolve_tasks
from tests.helpers import TINY_RUN, assert_png, folder_snapshot, quiet

DATASETS = ["breastmnist", "chestmnist", "dermamnist", "retinamnist"]  # binary, multi-label, multi-class, ordinal


@pytest.fixture(scope="module")
def calibration_run(tmp_path_factory):
    """One run of 2 epochs on the four datasets, evaluated plainly and with --calibrate temperature."""
    base = tmp_path_factory.mktemp("calibration")
    data = base / "data"
    write_synthetic(data, 28, resolve_tasks(DATASETS), train_samples=96, seed=0)
    run = base / "run"
    trained = quiet(
        train_main,
        [*TINY_RUN, "--data-root", str(data), "--datasets", ",".join(DATASETS), "--epochs", "2", "--output", str(run)],
    )
    assert trained[0] == 0, trained[2]
    plain, calibrated = base / "plain", base / "calibrated"
    evaluated = quiet(evaluate_main, [str(run), "--output", str(plain)])
    assert evaluated[0] == 0, evaluated[2]
    scaled = quiet(evaluate_main, [str(run), "--output", str(calibrated), "--calibrate", "temperature"])
    assert scaled[0] == 0, scaled[2]
    return SimpleNamespace(base=base, data=data, run=run, plain=plain, calibrated=calibrated, output=scaled[1])


def _labels(data, flag, split="test"):
    with np.load(data / f"{flag}.npz") as npz:
        return npz[f"{split}_labels"].astype(np.int64)


def _scores(folder, flag):
    (path,) = Results(folder).predictions.glob(f"{flag}_test_*.csv")
    return pd.read_csv(path, index_col=0, header=None).sort_index().to_numpy()


@pytest.mark.slow
def test_evaluate_writes_calibration_metrics_reliability_diagrams_and_per_class_tables(calibration_run):
    folder = calibration_run.plain
    table = json.loads((folder / "metrics.json").read_text())
    per_class = pd.read_csv(folder / "metrics_per_class.csv")
    grade_rules = json.loads((folder / "predictions" / "data.json").read_text())["datasets"]
    for flag in DATASETS:
        task, labels, scores = TASKS[flag], _labels(calibration_run.data, flag), _scores(folder, flag)
        rule = grade_rules[flag]["grade_rule"]
        expected = compute_metrics(task, labels, scores, ["ece", "brier", "nll"], rule, ECE_BINS)
        for m in ("ece", "brier", "nll"):
            assert table[flag][m] == pytest.approx(expected[m], rel=1e-6)  # from the scores as written to text
        rows = per_class[per_class.dataset == flag]
        assert list(rows["class"]) == list(task.class_names)  # every class (every label of chest), in order
        direct = per_class_metrics(task, labels, scores, rule)
        for _, row in rows.iterrows():
            assert row["support"] == direct[row["class"]]["support"]
            for m in ("precision", "recall", "f1", "auc"):
                assert row[m] == pytest.approx(direct[row["class"]][m], rel=1e-6, nan_ok=True)
        assert_png(folder / f"reliability_{flag}.png")
    assert "| dataset | class | precision |" in (folder / "metrics_per_class.md").read_text()
    # the run's own test report has them too
    assert "ece" in json.loads((calibration_run.run / "metrics.json").read_text())["breastmnist"]
    assert (calibration_run.run / "metrics_per_class.csv").is_file()


@pytest.mark.slow
def test_temperature_scaling_lowers_the_validation_nll_and_keeps_the_predictions(calibration_run):
    plain, scaled = calibration_run.plain, calibration_run.calibrated
    # the raw results are those of an evaluation without --calibrate
    for name in ("metrics.json", "metrics_per_class.csv"):
        assert (scaled / name).read_bytes() == (plain / name).read_bytes()
    for flag in DATASETS:
        assert (_scores(scaled, flag) == _scores(plain, flag)).all()
    record = json.loads((scaled / "temperature.json").read_text())
    assert set(record["datasets"]) == {"breastmnist", "chestmnist", "dermamnist"}
    assert "CORN head" in record["not_calibrated"]["retinamnist"]  # its grade could move: refused, said
    assert "retinamnist: not calibrated" in calibration_run.output
    for flag, entry in record["datasets"].items():
        assert entry["val_nll_after"] < entry["val_nll_before"], flag
    assert len(record["datasets"]["chestmnist"]["temperature"]) == 14  # one per label
    raw = json.loads((plain / "metrics.json").read_text())
    calibrated = json.loads((scaled / "calibrated" / "metrics.json").read_text())
    for flag in record["datasets"]:
        assert calibrated[flag]["acc"] == raw[flag]["acc"]  # the argmax, and the side of 0.5, never move
        assert calibrated[flag]["balanced_acc"] == raw[flag]["balanced_acc"]
        predicted = _scores(scaled / "calibrated", flag)
        if TASKS[flag].task_type != MULTI_LABEL:
            assert (predicted.argmax(axis=1) == _scores(plain, flag).argmax(axis=1)).all()
    for flag in ("breastmnist", "chestmnist"):  # a monotone map of each score: the AUC is the same
        assert calibrated[flag]["auc"] == pytest.approx(raw[flag]["auc"], abs=1e-12)
    # the mean validation NLL of the calibrated datasets fell
    before = np.mean([e["val_nll_before"] for e in record["datasets"].values()])
    after = np.mean([e["val_nll_after"] for e in record["datasets"].values()])
    assert after < before
    assert_png(scaled / "calibrated" / "reliability_dermamnist.png")
    assert not (scaled / "calibrated" / "confusion_dermamnist.png").exists()  # the same predictions as the raw ones


def test_fitted_temperature_recovers_the_one_that_made_the_labels():
    """Labels drawn from softmax(z / 2): the NLL's minimum is near T = 2 (and AUC of a binary task unchanged)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(20_000, 4))
    probabilities = torch.softmax(torch.as_tensor(logits) / 2.0, dim=1).numpy()
    labels = np.array([rng.choice(4, p=p) for p in probabilities])[:, None]
    fitted = temperature.fit(TASKS["octmnist"], logits, labels)  # 4 classes
    assert fitted.values[0] == pytest.approx(2.0, rel=0.05)
    assert fitted.val_nll_after < fitted.val_nll_before
    scaled = temperature.apply(CrossEntropyLoss(4), logits, fitted)
    assert (scaled.argmax(axis=1) == logits.argmax(axis=1)).all()


def test_a_validation_split_with_one_class_cannot_be_fitted():
    with pytest.raises(MmptError, match="breastmnist's val split has one class only"):
        temperature.fit(TASKS["breastmnist"], np.zeros((10, 2)), np.zeros((10, 1), dtype=np.int64))


@pytest.mark.slow
def test_bad_calibration_input_is_one_error_line_and_writes_nothing(calibration_run, tmp_path):
    # a validation split with one class: a copy of the data whose breast val labels are all 0
    data = tmp_path / "data"
    shutil.copytree(calibration_run.data, data)
    with np.load(data / "breastmnist.npz") as npz:
        arrays = dict(npz)
    arrays["val_labels"] = np.zeros_like(arrays["val_labels"])
    np.savez_compressed(data / "breastmnist.npz", **arrays)
    output = tmp_path / "out"
    run = str(calibration_run.run)
    for argv, message in (
        ([run, "--data-root", str(data), "--calibrate", "temperature"], "breastmnist's val split has one class only"),
        ([run, "--ece-bins", "0"], "--ece-bins"),
        (["compare", str(calibration_run.plain), str(calibration_run.calibrated), "--ece-bins", "0"], "--ece-bins"),
        (
            ["compare", str(calibration_run.plain), str(calibration_run.calibrated / "calibrated"), "--per-class"],
            "--per-class compares the classes of the same datasets",
        ),
        ([run, "--calibrate", "platt"], "invalid choice: 'platt'"),
    ):
        before = folder_snapshot(calibration_run.plain)
        code, _, err = quiet(evaluate_main, [*argv, "--output", str(output)])
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not output.exists() and folder_snapshot(calibration_run.plain) == before


@pytest.mark.slow
def test_compare_per_class_and_the_page_and_table_a_reader_opens(calibration_run, tmp_path):
    raw = calibration_run.plain
    scaled = calibration_run.calibrated / "calibrated"
    argv = [
        "compare",
        str(raw),
        str(scaled),
        "--metrics",
        "auc,ece,nll",
        "--bootstrap",
        "50",
        "--output",
        str(tmp_path),
    ]
    code, _, err = quiet(evaluate_main, argv)
    assert code == 0, err
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["datasets"] == ["chestmnist", "dermamnist", "breastmnist"]  # retina: not calibrated
    ece = result["runs"][1]["datasets"]["dermamnist"]["ece"]
    assert ece["ci_low"] <= ece["value"] <= ece["ci_high"] and "diff_ci_low" in ece  # ECE with its interval
    # the page: self-contained (no link, script or address outside it), every picture embedded
    page = (tmp_path / "compare.html").read_text()
    assert "<script" not in page and "http" not in page and "<link" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    for name in ("compare_forest.png", "compare_auc.png", "reliability_dermamnist.png", "confusion_dermamnist.png"):
        assert f'alt="{name}' in page
    assert "<h2>ece</h2>" in page and "<table>" in page and "python evaluate.py compare" in page
    assert page.count("<details><summary>recipe") == 2  # each run's config.yaml, found above its eval folder
    # the LaTeX table: booktabs, one table per metric, a row per dataset, the mean and Δm
    tex = (tmp_path / "compare.tex").read_text()
    assert tex.count("\\toprule") == 3 and tex.count("\\bottomrule") == 3
    assert "dermamnist &" in tex and "$\\Delta m$ (\\%, auc,ece,nll)" in tex
    # --per-class on the same datasets: each class's values and paired differences
    code, _, err = quiet(
        evaluate_main,
        [
            "compare",
            str(raw),
            str(calibration_run.calibrated),
            "--per-class",
            "--bootstrap",
            "30",
            "--output",
            str(tmp_path / "per_class"),
        ],
    )
    assert code == 0, err
    result = json.loads((tmp_path / "per_class" / "compare.json").read_text())
    labels, scores = _labels(calibration_run.data, "dermamnist"), _scores(raw, "dermamnist")
    direct = per_class_metrics(TASKS["dermamnist"], labels, scores)
    for name, cells in result["runs"][0]["per_class"]["dermamnist"].items():
        for m in ("precision", "recall", "f1", "auc"):
            value = cells[m]["value"]  # compare.json is strict JSON: NaN (a class never predicted) is null
            assert (np.nan if value is None else value) == pytest.approx(direct[name][m], nan_ok=True)
        assert result["support"]["dermamnist"][name] == direct[name]["support"]
    assert (tmp_path / "per_class" / "compare_per_class.csv").is_file()
    assert "## Per class" in (tmp_path / "per_class" / "compare.md").read_text()
