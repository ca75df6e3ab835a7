"""Compare runs on their saved test predictions, with bootstrap intervals, paired differences, Δm and Wilcoxon.

A run given to `compare` is one of
- a single run (a folder with predictions/, as train.py, evaluate.py --output or probe write it),
- an individual folder (one subfolder per dataset, each a single-dataset run: together one model per dataset),
- a folder of seeds (seed0/, seed1/, ...: each a single run or an individual folder).

The first run is the reference. Every number is recomputed from the prediction files (medmnist Evaluator CSV)
and the labels of the data files, with the medmnist-exact metrics of mmpt.evaluation.metrics. The resampling
(mmpt.analysis.stats.resample_metrics: scipy.stats.bootstrap's paired draws) applies one resample of test images to
every model of every run, so a difference's interval is paired; a fixed seed gives the same resamples to every run
and dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from joblib import Parallel, delayed
from scipy import stats

from mmpt.analysis.delta_m import LOWER_IS_BETTER, delta_m, delta_m_bootstrap, delta_m_interval, delta_m_undefined
from mmpt.analysis.stats import (
    CONFIDENCE,
    auc_interval_undefined,
    bootstrap_dataset,
    delong_intervals,
)
from mmpt.config.settings import load_yaml
from mmpt.errors import MmptError
from mmpt.evaluation.metrics import compute_metrics
from mmpt.evaluation.predict import labels_digest
from mmpt.io import read_json
from mmpt.runs.members import SEED_DIR, left_out_error, member_status
from mmpt.runs.names import DATA_RECORD, PREDICTION_FILE
from mmpt.runs.rundir import Results, RunDir
from mmpt.tasks import FLAGS, TASKS

METRICS = ("auc", "acc", "balanced_acc", "kappa", "qwk", "mae")


@dataclass(frozen=True)
class Prediction:
    """One model's test scores of one dataset, and what they were evaluated on."""

    path: Path
    resolution: int
    images: int
    labels_sha256: str
    data_root: str | None
    grade_rule: str = "argmax"  # how the ordinal grade follows from the scores (the run's loss)


@dataclass
class Run:
    """A run as compared: its name, per seed the prediction of each dataset, and the runs left out of it."""

    name: str
    path: Path
    seeds: list[dict[str, Prediction]]
    left_out: list[tuple[Path, str]] = field(default_factory=list)  # unfinished or of another recipe, and why

    @property
    def datasets(self) -> list[str]:
        return [f for f in FLAGS if all(f in member for member in self.seeds)]


def _nearest_data_root(folder: Path) -> str | None:
    """data.root of the config.yaml in `folder` or the closest folder above it."""
    for parent in [folder, *folder.parents]:
        path = RunDir(parent).config
        if path.is_file():
            try:
                return (load_yaml(path.read_text()) or {}).get("data", {}).get("root")
            except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
                raise MmptError(f"{path} is not a config written by train.py; pass --data-root DIR") from None
    return None


def read_predictions(folder: Path) -> dict[str, Prediction]:
    """The test prediction files in `folder` (a predictions/ folder with its data.json) by dataset."""
    record_path = folder / DATA_RECORD
    evaluated = RunDir(folder.parent).eval("test").path
    again = f"evaluate the run again (python evaluate.py {folder.parent}) and compare {evaluated}"
    if not record_path.is_file():
        raise MmptError(
            f"{folder} has no {DATA_RECORD} (what the predictions were evaluated on; runs before it lack it): {again}"
        )
    record = read_json(record_path, again)
    entries = record.get("datasets") if isinstance(record, dict) else None
    if (
        not isinstance(entries, dict)
        or not isinstance(record.get("resolution"), int)
        or not all(
            isinstance(e, dict) and isinstance(e.get("images"), int) and isinstance(e.get("labels_sha256"), str)
            for e in entries.values()
        )
    ):
        raise MmptError(f"{record_path} is not a record of evaluated data written by mmpt; {again}")
    root = record.get("data_root") or _nearest_data_root(folder.parent)
    found: dict[str, Prediction] = {}
    for path in sorted(folder.glob("*.csv")):
        match = PREDICTION_FILE.fullmatch(path.name)
        if not match or match["split"] != "test" or match["flag"] not in record["datasets"]:
            continue
        flag = match["flag"]
        if flag in found:
            raise MmptError(
                f"{folder} has several test prediction files of {flag} ({found[flag].path.name}, "
                f"{path.name}); keep the one of the evaluated checkpoint and remove the others"
            )
        entry = record["datasets"][flag]
        found[flag] = Prediction(
            path,
            int(record["resolution"]),
            int(entry["images"]),
            entry["labels_sha256"],
            root,
            entry.get("grade_rule", "argmax"),
        )
    return found


def _counts(folder: Path, left_out: list[tuple[Path, str]]) -> bool:
    """Whether a folder's predictions count: a training run only once finished with its series' recipe
    (mmpt.runs.members.member_status); evaluate.py and probe outputs always. Else noted in `left_out`."""
    if not RunDir(folder).is_run():
        return True
    why = member_status(folder)
    if why is not None:
        left_out.append((folder, why))
    return why is None


def _member(folder: Path, left_out: list[tuple[Path, str]]) -> dict[str, Prediction]:
    """One model's predictions: a run folder, or an individual folder joining its datasets' runs."""
    predictions = Results(folder).predictions
    if predictions.is_dir() or RunDir(folder).is_run():
        if not _counts(folder, left_out) or not predictions.is_dir():
            return {}
        return read_predictions(predictions)
    member = {}
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and p.name in FLAGS):
        own_predictions = Results(child).predictions
        if (own_predictions.is_dir() or RunDir(child).is_run()) and _counts(child, left_out):
            own = read_predictions(own_predictions) if own_predictions.is_dir() else {}
            if child.name in own:
                member[child.name] = own[child.name]
    return member


def load_run(path: Path, name: str | None = None) -> Run:
    """Read a single run, an individual folder or a folder of seeds; MmptError when none has predictions.

    Training runs count as in `summarize` (finished, with their series' recipe); the others are named in
    `Run.left_out` and not read.
    """
    path = Path(path)
    if not path.is_dir():
        raise MmptError(f"run folder {path} not found; pass folders written by train.py, evaluate.py or probe")
    seed_dirs = sorted(
        (p for p in path.iterdir() if p.is_dir() and SEED_DIR.fullmatch(p.name)),
        key=lambda p: int(SEED_DIR.fullmatch(p.name).group(1)),
    )
    left_out: list[tuple[Path, str]] = []
    member = _member(path, left_out)
    seeds = [member] if member or left_out else [m for m in (_member(d, left_out) for d in seed_dirs) if m]
    if not seeds or not any(seeds):
        reason = f" ({left_out[0][0]} is {left_out[0][1]})" if left_out else ""
        raise MmptError(
            f"{path} holds no test predictions of a finished run{reason}: pass a finished run, "
            "an individual/ folder or a folder of seed<k>/ runs"
        )
    return Run(name or str(path), path, seeds, left_out)


def check_same_data(runs: list[Run], datasets: list[str]) -> None:
    """Raise MmptError (one line) when two runs were evaluated on different images of a compared dataset."""
    reference = {}
    for run in runs:
        for member in run.seeds:
            for flag, pred in member.items():
                seen = (pred.resolution, pred.images, pred.labels_sha256)
                if flag not in datasets:
                    continue
                if flag not in reference:
                    reference[flag] = (seen, run.name)
                    continue
                (res, images, digest), other = reference[flag]
                if pred.resolution != res:
                    raise MmptError(
                        f"{run.name} was evaluated at {pred.resolution} px and {other} at {res} px; "
                        "compare runs evaluated on the same data"
                    )
                if (pred.images, pred.labels_sha256) != (images, digest):
                    raise MmptError(
                        f"{run.name} and {other} were evaluated on different {flag} test sets "
                        f"({pred.images} vs {images} images, or other labels); "
                        "compare runs evaluated on the same data files"
                    )


def read_labels(pred: Prediction, flag: str, data_root: str | None = None) -> np.ndarray:
    """The test labels of `flag` from its npz data file, checked against the predictions' record."""
    root = data_root or pred.data_root
    if root is None:
        raise MmptError(f"cannot tell where the {flag} data of {pred.path.parent} lie; pass --data-root DIR")
    path = Path(root).expanduser() / TASKS[flag].filename(pred.resolution)
    if not path.is_file():
        raise MmptError(f"{path} not found (the labels of {flag}); pass --data-root DIR with the evaluated files")
    with np.load(path) as npz:
        labels = np.asarray(npz["test_labels"], dtype=np.int64)
    labels = labels.reshape(len(labels), -1)
    if labels_digest(labels) != pred.labels_sha256:
        raise MmptError(
            f"the {flag} test labels in {path} differ from those {pred.path.parent} was evaluated on; "
            "pass --data-root DIR with the files the runs were evaluated on"
        )
    return labels


SCORE_TOLERANCE = 1e-6  # float32 softmax and sigmoid outputs written as text may stray this far outside [0, 1]


def read_scores(pred: Prediction) -> np.ndarray:
    """N×C scores of a prediction file, sorted by image index. Raises MmptError naming the file (and the row)
    when it is unreadable, has another number of rows, or holds a score that is not finite or outside [0, 1]."""
    try:
        table = pd.read_csv(pred.path, index_col=0, header=None)
        order = np.argsort(table.index.to_numpy(), kind="stable")
        scores = table.to_numpy(dtype=np.float64)[order]
        index = table.index.to_numpy()[order]
    except (OSError, ValueError, TypeError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MmptError(f"{pred.path} is not a prediction file of numbers ({reason}); evaluate the run again") from None
    if len(scores) != pred.images:
        raise MmptError(f"{pred.path} has {len(scores)} rows, not {pred.images}; evaluate the run again")
    bad = ~np.isfinite(scores) | (scores < -SCORE_TOLERANCE) | (scores > 1 + SCORE_TOLERANCE)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        line = int(np.flatnonzero(table.index.to_numpy() == index[row])[0]) + 1
        raise MmptError(
            f"{pred.path} line {line} (image {index[row]}) holds the score {float(scores[row, column])!r}, "
            "not a probability in [0, 1]; evaluate the run again (python evaluate.py RUN)"
        )
    return scores


CI_METHODS = ("bootstrap", "delong")


def _intervals(runs, datasets, labels, scores, rules, present, *, n_resamples, seed, jobs, ci) -> dict:
    """(low, high) per (run index, dataset): the reference's metrics, every other run's metrics and differences."""
    delong = ci == "delong"
    booted = {f: [m for m in present[f] if not (delong and m == "auc")] for f in datasets}
    # one resampling per dataset, every run evaluated on it
    shown = [f for f in datasets if booted[f]]
    found = Parallel(n_jobs=jobs)(
        delayed(bootstrap_dataset)(
            TASKS[f],
            labels[f],
            [(scores[i][f], rules[i][f]) for i in range(len(runs))],
            booted[f],
            n_resamples=n_resamples,
            seed=seed,
        )
        for f in shown
    )
    booted_interval = {(i, f): per_run[i] for f, per_run in zip(shown, found) for i in range(len(runs))}
    if not delong:
        return booted_interval
    interval = {}
    for f in datasets:
        analytic = (
            delong_intervals(TASKS[f], labels[f], [scores[i][f] for i in range(len(runs))])
            if "auc" in present[f]
            else None
        )
        width, kept = len(present[f]), len(booted[f])
        for i in range(len(runs)):
            sides = 1 if i == 0 else 2  # the run's values, then its differences to the reference
            low, high = np.full(sides * width, np.nan), np.full(sides * width, np.nan)
            for side in range(sides):
                for j, m in enumerate(present[f]):
                    if m == "auc":
                        low[side * width + j], high[side * width + j] = analytic[i][2 * side : 2 * side + 2]
                    else:
                        k = side * kept + booted[f].index(m)
                        low[side * width + j], high[side * width + j] = (
                            booted_interval[(i, f)][0][k],
                            booted_interval[(i, f)][1][k],
                        )
            interval[(i, f)] = (low, high)
    return interval


def _bounds(name: str, low: float, high: float, reason: str | None) -> dict:
    """The one place an interval becomes numbers: {name_low, name_high}, both NaN (null in compare.json) with
    {name_undefined: why} where the interval cannot be computed; never a bound made up from an undefined one."""
    if reason is None and math.isfinite(low) and math.isfinite(high):
        return {f"{name}_low": float(low), f"{name}_high": float(high)}
    why = reason or "the metric is undefined in every resample of the test images"
    return {f"{name}_low": math.nan, f"{name}_high": math.nan, f"{name}_undefined": why}


def wilcoxon_over_datasets(differences: list[float], lower_is_better: bool) -> dict:
    """Paired Wilcoxon signed-rank test over datasets of seed-mean differences; counts better/worse."""
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    sign = -1.0 if lower_is_better else 1.0
    p = math.nan
    if np.any(d != 0):
        p = float(stats.wilcoxon(d).pvalue)
    return {
        "p_value": p,
        "better": int(np.sum(sign * d > 0)),
        "worse": int(np.sum(sign * d < 0)),
        "datasets": len(d),
    }


def compare_runs(
    paths: list[Path],
    *,
    metrics: list[str] = ("auc", "acc"),
    n_resamples: int = 1000,
    seed: int = 0,
    data_root: str | None = None,
    jobs: int = 1,
    require_complete: bool = False,
    ci: str = "bootstrap",
) -> dict:
    """Everything compare.json holds (see the module docstring); raises MmptError for unusable input.

    `jobs` processes run the bootstrap of datasets in parallel (joblib); the result is the same.
    `ci`: "bootstrap" (every metric), or "delong" (AUC from DeLong's variance, the others bootstrapped).
    Runs left out (unfinished, or of another recipe than their series asks) are named in "left_out_runs";
    with `require_complete` they are an MmptError.
    """
    metrics = list(metrics)
    if len(paths) < 2:
        raise MmptError("compare needs at least two runs: the reference first, then the others")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise MmptError(f"unknown metric '{(unknown or [''])[0]}' in --metrics; choose from {', '.join(METRICS)}")
    # one run under two spellings of its path (runs/a, ./runs/a/, a link) would be compared with itself
    resolved = [Path(p).resolve() for p in paths]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise MmptError(
                f"{paths[resolved.index(path)]} and {paths[i]} are the same run ({path}); pass each run once"
            )
    runs = [load_run(p) for p in paths]
    left_out_runs = [(folder, why) for r in runs for folder, why in r.left_out]
    if left_out_runs and require_complete:
        raise left_out_error(left_out_runs, "a compared series is not complete")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise MmptError("a run is given twice; pass each run once")
    datasets = [f for f in FLAGS if all(f in r.datasets for r in runs)]
    if not datasets:
        raise MmptError("the runs share no dataset with test predictions; compare runs trained on the same datasets")
    check_same_data(runs, datasets)

    labels = {f: read_labels(runs[0].seeds[0][f], f, data_root) for f in datasets}
    scores = [{f: [read_scores(member[f]) for member in run.seeds] for f in datasets} for run in runs]
    # each run's ordinal grades follow its own loss's rule (CE: argmax; CORAL, CORN: the median)
    rules = [{f: run.seeds[0][f].grade_rule for f in datasets} for run in runs]
    # per run, dataset and metric: the value of each seed, and their mean
    per_seed = [{f: {m: [] for m in metrics} for f in datasets} for _ in runs]
    for i in range(len(runs)):
        for f in datasets:
            for s in scores[i][f]:
                for m, v in compute_metrics(TASKS[f], labels[f], s, metrics, rules[i][f]).items():
                    per_seed[i][f][m].append(v)
    values = [
        {f: {m: float(np.mean(v)) for m, v in per_seed[i][f].items() if v} for f in datasets} for i in range(len(runs))
    ]
    present = {f: [m for m in metrics if m in values[0][f]] for f in datasets}
    unmeasured = [f for f in datasets if not present[f]]  # none of `metrics` applies (qwk, mae: ordinal only)
    datasets = [f for f in datasets if present[f]]
    if not datasets:
        raise MmptError(
            f"--metrics {','.join(metrics)} applies to none of the compared datasets ({', '.join(unmeasured)}): "
            "qwk and mae are for ordinal datasets (retinamnist); add a metric such as auc or acc"
        )
    if ci not in CI_METHODS:
        raise MmptError(f"unknown interval '{ci}' in --ci; choose from {', '.join(CI_METHODS)}")
    interval = _intervals(
        runs,
        datasets,
        labels,
        scores,
        rules,
        present,
        n_resamples=n_resamples,
        seed=seed,
        jobs=jobs,
        ci=ci,
    )
    # Δm's interval: every dataset resampled from its own generator, Δm on each joint resample
    models = {f: [(scores[i][f], rules[i][f]) for i in range(len(runs))] for f in datasets}
    replicates = delta_m_bootstrap(labels, models, present, n_resamples=n_resamples, seed=seed, jobs=jobs)
    # an AUC whose class has fewer than two test images on a side has no interval, by either method
    undefined_auc = {f: auc_interval_undefined(TASKS[f], labels[f]) for f in datasets if "auc" in present[f]}
    # nor has Δm, when one of its terms has none
    no_auc_interval = next(
        (f"the auc interval of {f} is undefined: {why}" for f, why in undefined_auc.items() if why), None
    )

    out = {
        "reference": names[0],
        "metrics": metrics,
        "datasets": datasets,
        "left_out": sorted({f for r in runs for f in r.datasets} - set(datasets) - set(unmeasured)),
        "unmeasured": unmeasured,
        "left_out_runs": {str(folder): why for folder, why in left_out_runs},
        "bootstrap": {
            "n_resamples": n_resamples,
            "confidence_level": CONFIDENCE,
            "method": "percentile",
            "paired": True,
            "seed": seed,
        },
        "auc_interval": "delong" if ci == "delong" and "auc" in metrics else "bootstrap",
        "runs": [],
    }
    for i, run in enumerate(runs):
        entry = {"name": run.name, "path": str(run.path), "seeds": len(run.seeds), "datasets": {}, "mean": {}}
        for f in datasets:
            low, high = interval[(i, f)]
            cells = {}
            for j, m in enumerate(present[f]):
                reason = undefined_auc.get(f) if m == "auc" else None
                cell = {"value": values[i][f][m], **_bounds("ci", low[j], high[j], reason)}
                if len(run.seeds) > 1:
                    cell["std"] = float(np.std(per_seed[i][f][m], ddof=1))
                if i > 0:
                    k = len(present[f]) + j
                    cell.update(diff=values[i][f][m] - values[0][f][m], **_bounds("diff_ci", low[k], high[k], reason))
                cells[m] = cell
            entry["datasets"][f] = cells
        for m in metrics:
            mine = [values[i][f][m] for f in datasets if m in values[i][f]]
            if mine:
                entry["mean"][m] = {"value": float(np.mean(mine))}
                if i > 0:
                    entry["mean"][m]["diff"] = entry["mean"][m]["value"] - out["runs"][0]["mean"][m]["value"]
        entry["delta_m"] = 0.0 if i == 0 else delta_m(values[0], values[i], metrics)
        if i > 0:
            why = delta_m_undefined(values[0], values[i], metrics)
            low, high, why_interval = delta_m_interval(replicates[i - 1])
            entry.update(_bounds("delta_m_ci", low, high, why or no_auc_interval or why_interval))
            if why:
                entry["delta_m_undefined"] = why
        if i > 0 and len(run.seeds) > 1 and len(runs[0].seeds) > 1:
            tests = {
                m: wilcoxon_over_datasets(
                    [values[i][f][m] - values[0][f][m] for f in datasets if m in values[i][f]], m in LOWER_IS_BETTER
                )
                for m in metrics
                if m in entry["mean"]
            }
            entry["wilcoxon"] = tests
            entry["p_value"] = {m: t["p_value"] for m, t in tests.items()}
        out["runs"].append(entry)
    return out
