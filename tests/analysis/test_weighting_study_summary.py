"""The loss-weighting study's learning-rate tuning (docs/results/weighting_real3/summarize.py) chooses each arm's
rate on validation, never on the test images, and only once its three rates have finished every seed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "results" / "weighting_real3" / "summarize.py"


@pytest.fixture(scope="module")
def summarize():
    spec = importlib.util.spec_from_file_location("weighting_summarize", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _series(folder: Path, lr: float, val_losses: list[float], test_auc: float) -> None:
    """A finished series of one seed per val loss: what train.py writes that the tuning reads."""
    for seed, val in enumerate(val_losses):
        run = folder / f"seed{seed}"
        run.mkdir(parents=True)
        summary = {"monitor": "val_loss", "best_metric": val, "best_epoch": 2, "epochs": 2, "wall_time_s": 10.0}
        (run / "summary.json").write_text(json.dumps(summary))
        (run / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": lr}}))
        (run / "metrics.json").write_text(json.dumps({"mean": {"auc": test_auc + 0.001 * seed, "acc": 0.7}}))


def test_the_rate_with_the_lowest_mean_validation_loss_is_chosen_even_where_another_has_the_better_test_auc(
    tmp_path, summarize
):
    budget = tmp_path / "e2"
    # equal: 3e-3 has the best test AUC but 1e-3 the lowest mean validation loss (one seed of 3e-4 is lower still)
    _series(budget / "equal_lr3e-4", 3e-4, [0.20, 0.40, 0.40], test_auc=0.80)
    _series(budget / "equal", 1e-3, [0.30, 0.30, 0.30], test_auc=0.82)
    _series(budget / "equal_lr3e-3", 3e-3, [0.35, 0.35, 0.35], test_auc=0.90)
    # default: 3e-4 lowest; size: a rate with two seeds of three is not a finished tuning
    _series(budget / "default_lr3e-4", 3e-4, [0.25, 0.25, 0.25], test_auc=0.70)
    _series(budget / "default", 1e-3, [0.26, 0.26, 0.26], test_auc=0.75)
    _series(budget / "default_lr3e-3", 3e-3, [0.27, 0.27, 0.27], test_auc=0.76)
    _series(budget / "size", 1e-3, [0.3, 0.3, 0.3], test_auc=0.8)
    _series(budget / "size_lr3e-4", 3e-4, [0.1, 0.1], test_auc=0.8)
    _series(budget / "size_lr3e-3", 3e-3, [0.3, 0.3, 0.3], test_auc=0.8)

    assert summarize.selection(budget) == {"default": "default_lr3e-4", "equal": "equal"}

    table = summarize.tuning_table(budget)
    equal_rows = [line for line in table.splitlines() if line.startswith("| equal |")]
    assert [row.split(" | ")[1] for row in equal_rows] == ["0.0003", "0.001", "0.003"]  # read from config.yaml
    assert [row.rstrip(" |").endswith("**yes**") for row in equal_rows] == [False, True, False]
    assert "0.3333 ± 0.1155" in equal_rows[0]  # the mean and spread over seeds of the validation loss
    assert all(row.rstrip(" |").endswith("(unfinished)") for row in table.splitlines() if row.startswith("| size |"))


def test_select_prints_the_chosen_folders_default_first_and_refuses_an_unfinished_default(tmp_path, summarize, capsys):
    budget = tmp_path / "e2"
    for suffix, lr, val in (("_lr3e-4", 3e-4, 0.3), ("", 1e-3, 0.2), ("_lr3e-3", 3e-3, 0.4)):
        _series(budget / f"equal{suffix}", lr, [val] * 3, test_auc=0.8)
    with pytest.raises(SystemExit, match="the default's three learning rates have not all finished"):
        summarize.main([str(tmp_path), "--select", "e2"])
    for suffix, lr, val in (("_lr3e-4", 3e-4, 0.3), ("", 1e-3, 0.4), ("_lr3e-3", 3e-3, 0.2)):
        _series(budget / f"default{suffix}", lr, [val] * 3, test_auc=0.8)
    summarize.main([str(tmp_path), "--select", "e2"])
    assert capsys.readouterr().out.split() == [str(budget / "default_lr3e-3"), str(budget / "equal")]
