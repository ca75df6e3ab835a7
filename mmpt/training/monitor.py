"""What early stopping and best.pt follow (train.monitor): one number per epoch from the validation metrics.

- val_loss: the unweighted mean over datasets of each dataset's validation loss (lower is better).
- val_auc: the unweighted mean over datasets of each dataset's validation AUC.
- val_delta_m: Δm on validation against individually trained runs (train.monitor_reference): 100 × the mean over
  datasets and over AUC and ACC of (M − M_ref) / |M_ref|, M_ref the reference run's value at its own best epoch.
  Every dataset counts as much as any other *relative to what it reaches alone*, the criterion multi-task
  libraries choose checkpoints by (LibMTL's Δp on validation).
- val_auc_gain: the mean over datasets of the share of each dataset's AUC headroom closed since epoch 1,
  (AUC_e − AUC_1) / (1 − AUC_1): reference-free, and a dataset whose AUC is already high at epoch 1 (a large, easy
  one) cannot hide another getting worse, because each counts by its own headroom.

A mean AUC moves by (ΔAUC of one dataset) / (number of datasets) whatever the dataset, so one dataset improving by
0.01 hides another falling by 0.01; the two relative criteria weigh a fall where a dataset has little room as the
large change it is.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from mmpt.config.settings import load_yaml
from mmpt.errors import MmptError
from mmpt.evaluation.metrics import relative_change
from mmpt.io import read_json
from mmpt.runs.members import seed_folders
from mmpt.runs.rundir import RunDir

HIGHER_IS_BETTER = {"val_loss": False, "val_auc": True, "val_delta_m": True, "val_auc_gain": True}
DELTA_M_METRICS = ("auc", "acc")  # Δm's metrics on validation, as `evaluate.py compare`'s default


def monitored(monitor: str, val: dict, history: list[dict], reference: dict | None = None) -> float:
    """The monitored number of an epoch: `val` its validation table (dataset -> metric -> value, with "mean"),
    `history` every epoch so far (val_history.json's entries, this one last), `reference` val_delta_m's."""
    if monitor == "val_loss":
        return val["mean"]["loss"]
    if monitor == "val_auc":
        return val["mean"]["auc"]
    datasets = [f for f in val if f != "mean"]
    if monitor == "val_delta_m":
        terms = [relative_change(m, reference[f][m], val[f][m]) for f in datasets for m in DELTA_M_METRICS]
        return 100.0 * float(np.mean(terms))
    assert monitor == "val_auc_gain", f"unknown monitor {monitor!r}"
    first = history[0]["val"]
    gains = []
    for f in datasets:
        start, now = first[f]["auc"], val[f]["auc"]
        headroom = 1.0 - start
        gains.append((now - start) / headroom if headroom > 0 else now - start)
    return float(np.mean(gains))


def _reference_runs(folder: Path) -> list[Path]:
    """The folders holding one run per dataset: `folder` itself, its individual/, or its seed<k>/ folders."""
    if (folder / "individual").is_dir():
        folder = folder / "individual"
    return seed_folders(folder) or [folder]


def _best_validation(run: RunDir) -> dict[str, float] | None:
    """A finished run's validation metrics at its best epoch (None: not a finished run)."""
    if not run.summary.is_file() or not run.val_history.is_file():
        return None
    summary = read_json(run.summary, "train the reference run again")
    history = read_json(run.val_history, "train the reference run again").get("history", [])
    best = summary.get("best_epoch") if isinstance(summary, dict) else None
    entry = next((e for e in history if e.get("epoch") == best), None)
    return None if entry is None else entry["val"]


def load_reference(folder: str | Path, datasets: list[str], resolution: int) -> dict[str, dict[str, float]]:
    """Each dataset's validation AUC and ACC at the best epoch of its individually trained run in `folder` (an
    individual/ folder of `train.py --individual`, the series holding it, or a folder of seed<k>/ such folders:
    the seed mean). Raises MmptError, one line, when a dataset has no finished reference run, when one was trained
    at another resolution or with several datasets, or when a value is undefined (NaN)."""
    folder = Path(folder).expanduser()
    again = "pass train.monitor_reference the individual/ folder of finished single-dataset runs of these datasets"
    if not folder.is_dir():
        raise MmptError(f"train.monitor_reference {folder} is not a folder; {again}")
    found: dict[str, dict[str, list[float]]] = {}
    for holder in _reference_runs(folder):
        for flag in datasets:
            run = RunDir(holder / flag)
            val = _best_validation(run)
            if val is None:
                raise MmptError(f"train.monitor_reference: {run.path} is not a finished run of {flag}; {again}")
            trained = [f for f in val if f != "mean"]
            if trained != [flag]:
                raise MmptError(
                    f"train.monitor_reference: {run.path} trained {', '.join(trained)}, not {flag} alone; {again}"
                )
            recorded = _resolution(run.config)
            if recorded is not None and recorded != resolution:
                raise MmptError(
                    f"train.monitor_reference: {run.path} was trained at {recorded} px, this run at {resolution} px; "
                    f"{again}"
                )
            for m in DELTA_M_METRICS:
                found.setdefault(flag, {}).setdefault(m, []).append(float(val[flag][m]))
    reference = {flag: {m: float(np.mean(v)) for m, v in metrics.items()} for flag, metrics in found.items()}
    undefined = [f"{f} {m}" for f, ms in reference.items() for m, v in ms.items() if not math.isfinite(v) or v == 0]
    if undefined:
        raise MmptError(
            f"train.monitor_reference: the reference's validation {', '.join(undefined)} is undefined or 0, so Δm "
            "cannot be relative to it; use train.monitor val_auc_gain"
        )
    return reference


def _resolution(config: Path) -> int | None:
    """data.resolution of a run's config.yaml (None when unreadable)."""
    try:
        return int(load_yaml(config.read_text())["data"]["resolution"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None
