"""train.monitor's multi-task criteria: Δm on validation against individually trained runs (val_delta_m) and the
share of AUC headroom closed since epoch 1 (val_auc_gain): their values, the checkpoint they choose, and the one-line
errors of a reference that does not exist or does not match."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmpt.cli import train_main
from mmpt.data.synthetic import write_synthetic
from mmpt.errors import MmptError
from mmpt.runs.rundir import RunDir
from mmpt.tasks import resolve_tasks
from mmpt.training.monitor import monitored
from mmpt.training.state import EarlyStopping
from tests.helpers import TINY_RUN, quiet


def _val(**aucs_accs):
    table = {f: {"auc": a, "acc": c, "loss": 1.0} for f, (a, c) in aucs_accs.items()}
    table["mean"] = {"auc": np.mean([a for a, _ in aucs_accs.values()]), "loss": 1.0}
    return table


def test_the_relative_criteria_weigh_a_fall_where_a_dataset_has_little_room():
    """A large easy dataset gaining 0.02 AUC and a hard one losing 0.01: the mean AUC rises, both relative
    criteria see what the hard dataset lost against what it had."""
    first = _val(easy=(0.95, 0.9), hard=(0.60, 0.6))
    later = _val(easy=(0.97, 0.9), hard=(0.59, 0.6))
    history = [{"val": first}, {"val": later}]
    assert later["mean"]["auc"] > first["mean"]["auc"]
    # val_auc_gain: mean of (AUC_e − AUC_1) / (1 − AUC_1)
    gain = monitored("val_auc_gain", later, history)
    assert gain == pytest.approx(np.mean([(0.97 - 0.95) / 0.05, (0.59 - 0.60) / 0.40]))
    assert monitored("val_auc_gain", first, history[:1]) == 0.0
    # val_delta_m: 100 × mean over datasets and (auc, acc) of (M − M_ref) / |M_ref|
    reference = {"easy": {"auc": 0.98, "acc": 0.9}, "hard": {"auc": 0.62, "acc": 0.5}}
    expected = 100 * np.mean([(0.97 - 0.98) / 0.98, 0.0, (0.59 - 0.62) / 0.62, (0.6 - 0.5) / 0.5])
    assert monitored("val_delta_m", later, history, reference) == pytest.approx(expected)
    assert monitored("val_loss", later, history) == 1.0


def test_a_resume_against_other_reference_values_is_refused():
    saved = EarlyStopping(higher_is_better=True, patience=None, reference={"breastmnist": {"auc": 0.8, "acc": 0.7}})
    now = EarlyStopping(higher_is_better=True, patience=None, reference={"breastmnist": {"auc": 0.9, "acc": 0.7}})
    with pytest.raises(MmptError, match="give other validation values than when this run started"):
        now.load_state_dict(saved.state_dict())


@pytest.mark.slow
def test_val_delta_m_chooses_best_pt_relative_to_the_individual_runs(tmp_path):
    data = tmp_path / "data"
    write_synthetic(data, 28, resolve_tasks(["breast", "pneumonia"]), train_samples=64, seed=0)
    common = [*TINY_RUN, "--data-root", str(data), "--datasets", "breast,pneumonia"]
    individual = tmp_path / "alone"
    assert quiet(train_main, [*common, "--individual", "--output", str(individual)])[0] == 0
    run = tmp_path / "mmpt"
    monitor = ["--set", "train.monitor=val_delta_m", "--set", f"train.monitor_reference={individual}"]
    code, out, err = quiet(train_main, [*common, "--epochs", "3", *monitor, "--output", str(run)])
    assert code == 0, err
    history = json.loads(RunDir(run).val_history.read_text())["history"]
    reference = {}
    for flag in ("breastmnist", "pneumoniamnist"):
        alone = RunDir(individual / "individual" / flag)
        best = json.loads(alone.summary.read_text())["best_epoch"]
        entries = json.loads(alone.val_history.read_text())["history"]
        reference[flag] = next(e["val"][flag] for e in entries if e["epoch"] == best)
    values = []
    for entry in history:
        val = entry["val"]
        terms = [(val[f][m] - reference[f][m]) / abs(reference[f][m]) for f in reference for m in ("auc", "acc")]
        assert entry["monitor"]["val_delta_m"] == pytest.approx(100 * np.mean(terms), rel=1e-9)
        values.append(entry["monitor"]["val_delta_m"])
    summary = json.loads(RunDir(run).summary.read_text())
    assert summary["best_epoch"] == int(np.argmax(values)) + 1  # the first epoch of the highest Δm
    assert summary["monitor"] == "val_delta_m" and summary["best_metric"] == max(values)
    assert "val_delta_m" in out


@pytest.mark.slow
def test_a_reference_that_does_not_fit_is_one_error_line_before_training(tmp_path):
    data = tmp_path / "data"
    write_synthetic(data, 28, resolve_tasks(["breast", "pneumonia"]), train_samples=32, seed=0)
    common = [*TINY_RUN, "--data-root", str(data)]
    alone = tmp_path / "alone"
    assert quiet(train_main, [*common, "--datasets", "breast", "--individual", "--output", str(alone)])[0] == 0
    run = tmp_path / "run"
    for flags, message in (
        (["--set", "train.monitor=val_delta_m"], "set train.monitor_reference"),
        (
            ["--set", "train.monitor=val_delta_m", "--set", f"train.monitor_reference={tmp_path / 'nowhere'}"],
            "is not a folder",
        ),
        (
            ["--set", "train.monitor=val_delta_m", "--set", f"train.monitor_reference={alone}"],
            "is not a finished run of pneumoniamnist",
        ),
        (["--set", f"train.monitor_reference={alone}"], "is read by train.monitor val_delta_m only"),
    ):
        code, _, err = quiet(train_main, [*common, "--datasets", "breast,pneumonia", *flags, "--output", str(run)])
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not run.exists()
