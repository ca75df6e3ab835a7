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
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from scipy import stats

from mmpt.analysis.delta_m import delta_m, delta_m_bootstrap, delta_m_interval, delta_m_undefined
from mmpt.analysis.inputs import check_same_data, load_run, read_labels, read_scores
from mmpt.analysis.stats import (
    CONFIDENCE,
    auc_interval_undefined,
    bootstrap_dataset,
    delong_intervals,
)
from mmpt.errors import MmptError
from mmpt.evaluation.metrics import (
    CALIBRATION,
    ECE_BINS,
    LOWER_IS_BETTER,
    PER_CLASS,
    class_labels,
    compute_metrics,
    per_class_metrics,
)
from mmpt.runs.members import left_out_error
from mmpt.tasks import FLAGS, TASKS

METRICS = ("auc", "acc", "balanced_acc", "kappa", "qwk", "mae", *CALIBRATION)


CI_METHODS = ("bootstrap", "delong")


def _intervals(runs, datasets, labels, scores, rules, present, *, n_resamples, seed, jobs, ci, bins) -> dict:
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
            bins=bins,
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
    ece_bins: int = ECE_BINS,
    per_class: bool = False,
) -> dict:
    """Everything compare.json holds (see the module docstring); raises MmptError for unusable input.

    `jobs` processes run the bootstrap of datasets in parallel (joblib); the result is the same.
    `ci`: "bootstrap" (every metric), or "delong" (AUC from DeLong's variance, the others bootstrapped).
    `ece_bins`: the ECE's confidence bins. `per_class`: also each class's (each label's) precision, recall, F1 and
    one-vs-rest AUC, with intervals and paired differences ("per_class"), for runs of the same datasets.
    Runs left out (unfinished, or of another recipe than their series asks) are named in "left_out_runs";
    with `require_complete` they are an MmptError.
    """
    metrics = list(metrics)
    if len(paths) < 2:
        raise MmptError("compare needs at least two runs: the reference first, then the others")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise MmptError(f"unknown metric '{(unknown or [''])[0]}' in --metrics; choose from {', '.join(METRICS)}")
    repeated = sorted({m for m in metrics if metrics.count(m) > 1})
    if repeated:
        # a metric named twice would count twice in Δm
        raise MmptError(f"--metrics names {', '.join(repeated)} more than once; name each metric once")
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
    if per_class and any(r.datasets != runs[0].datasets for r in runs):
        differ = next(r for r in runs if r.datasets != runs[0].datasets)
        raise MmptError(
            f"--per-class compares the classes of the same datasets, but {runs[0].name} has "
            f"{', '.join(runs[0].datasets)} and {differ.name} {', '.join(differ.datasets)}; compare runs of the same "
            "datasets, or leave out --per-class"
        )
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
                for m, v in compute_metrics(TASKS[f], labels[f], s, metrics, rules[i][f], ece_bins).items():
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
        bins=ece_bins,
    )
    # Δm's interval: every dataset resampled from its own generator, Δm on each joint resample
    models = {f: [(scores[i][f], rules[i][f]) for i in range(len(runs))] for f in datasets}
    replicates = delta_m_bootstrap(
        labels, models, present, n_resamples=n_resamples, seed=seed, jobs=jobs, bins=ece_bins
    )
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
        "ece_bins": ece_bins,
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
    if per_class:
        per_class_cells(out, runs, datasets, labels, models, n_resamples=n_resamples, seed=seed, jobs=jobs)
    return out


def per_class_cells(out: dict, runs, datasets, labels, models, *, n_resamples: int, seed: int, jobs: int) -> None:
    """Each run's per-class cells into `out` ("per_class" of every run entry: dataset -> class -> metric -> value
    with its interval, ± std over seeds, and the paired difference to the reference), and each class's support
    ("support": dataset -> class -> test images)."""
    names = {f: [f"{m}@{k}" for k in range(len(class_labels(TASKS[f]))) for m in PER_CLASS] for f in datasets}
    found = Parallel(n_jobs=jobs)(
        delayed(bootstrap_dataset)(TASKS[f], labels[f], models[f], names[f], n_resamples=n_resamples, seed=seed)
        for f in datasets
    )
    out["support"] = {}
    for f, intervals in zip(datasets, found):
        # per run, its seeds' per-class metrics, seed-averaged
        means = []
        for i, (seeds, rule) in enumerate(models[f]):
            per_seed = [per_class_metrics(TASKS[f], labels[f], scores, rule) for scores in seeds]
            cells = {}
            for k, name in enumerate(class_labels(TASKS[f])):
                cells[name] = {}
                for m in PER_CLASS:
                    values = [p[name][m] for p in per_seed]
                    j = names[f].index(f"{m}@{k}")
                    low, high = intervals[i][0][j], intervals[i][1][j]
                    cell = {"value": float(np.mean(values)), **_bounds("ci", low, high, None)}
                    if len(values) > 1:
                        cell["std"] = float(np.std(values, ddof=1))
                    if i > 0:
                        low, high = intervals[i][0][len(names[f]) + j], intervals[i][1][len(names[f]) + j]
                        diff = cell["value"] - means[0][name][m]["value"]
                        cell.update(diff=diff, **_bounds("diff_ci", low, high, None))
                    cells[name][m] = cell
            means.append(cells)
            out["runs"][i].setdefault("per_class", {})[f] = cells
        out["support"][f] = {name: v["support"] for name, v in per_seed[0].items()}
