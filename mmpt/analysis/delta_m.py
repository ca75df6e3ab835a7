"""Δm, LibMTL's mean relative difference of a run to the reference, and its paired bootstrap interval.

Δm = 100 × the mean over datasets and metrics of (−1)^{lower is better} (M − M_ref) / |M_ref|, M a metric's seed
mean on the dataset's test images. LibMTL divides by M_ref; a metric that can be negative (kappa, QWK) would then
flip the sign of its term (a run better than a reference of −0.1 would count as worse), so the divisor is its
magnitude, which is M_ref itself for the positive metrics LibMTL meant (AUC, ACC, ...). Its interval resamples the
test images of every dataset with replacement, one resample for every model of every run (paired, as the
per-dataset intervals), and computes Δm on each joint resample; the interval is the percentile one. The datasets'
test sets are independent samples, so each is resampled from its own generator (`np.random.default_rng([seed,
position in medmnist's order])`): drawing every dataset from one seed would give datasets of the same size the same
draws. Like every interval of `compare`, it is over the test images of the seed means: the spread over training
seeds is not in it.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from joblib import Parallel, delayed

from mmpt.analysis.stats import CHUNK_VALUES, CONFIDENCE, resample_metrics
from mmpt.evaluation.metrics import ECE_BINS, relative_change
from mmpt.tasks import FLAGS, TASKS


def _terms(reference: dict[str, dict[str, float]], other: dict[str, dict[str, float]], metrics: list[str]):
    """(dataset, metric) pairs Δm averages over: every metric of `metrics` both sides have for the dataset."""
    return [(flag, m) for flag, ref in reference.items() for m in metrics if m in ref and m in other.get(flag, {})]


def delta_m(reference: dict[str, dict[str, float]], other: dict[str, dict[str, float]], metrics: list[str]) -> float:
    """LibMTL's Δm in percent: mean over datasets and metrics of (−1)^{lower is better} (M − M_ref) / |M_ref|; NaN
    when a term is undefined (`delta_m_undefined` says which), never a mean over fewer terms than it states."""
    terms = [relative_change(m, reference[flag][m], other[flag][m]) for flag, m in _terms(reference, other, metrics)]
    return 100.0 * float(np.mean(terms)) if terms else math.nan


def delta_m_undefined(
    reference: dict[str, dict[str, float]], other: dict[str, dict[str, float]], metrics: list[str]
) -> str | None:
    """Why delta_m is NaN: the first term with an undefined value or a reference value of 0, or None."""
    for flag, m in _terms(reference, other, metrics):
        if not math.isfinite(reference[flag][m] + other[flag][m]):
            return f"{m} of {flag} is undefined"
        if reference[flag][m] == 0:
            return f"the reference's {m} of {flag} is 0, so its relative change is undefined"
    return None


def resampled_metrics(
    flag: str,
    labels: np.ndarray,
    runs: list[tuple[list[np.ndarray], str]],
    metrics: list[str],
    *,
    n_resamples: int,
    seed: int,
    chunk_values: int = CHUNK_VALUES,
    bins: int = ECE_BINS,
) -> list[np.ndarray]:
    """Per run (its seeds' scores, its grade rule): resamples × metrics on each resample of `flag`'s test images,
    drawn by the one resampling engine (mmpt.analysis.stats.resample_metrics) from this dataset's own generator."""
    rng = np.random.default_rng([seed, FLAGS.index(flag)])
    return resample_metrics(
        TASKS[flag], labels, runs, metrics, n_resamples=n_resamples, rng=rng, chunk_values=chunk_values, bins=bins
    )


def delta_m_replicates(resampled: dict[str, list[np.ndarray]], present: dict[str, list[str]]) -> list[np.ndarray]:
    """Per run after the reference: Δm of each joint resample (NaN where a term is undefined in it), from
    `resampled_metrics` of every dataset (`present[flag]`: the metrics it computed, in its column order)."""
    runs = len(next(iter(resampled.values())))
    out = []
    for r in range(1, runs):
        terms = [
            relative_change(m, per_run[0][:, j], per_run[r][:, j])
            for flag, per_run in resampled.items()
            for j, m in enumerate(present[flag])
        ]
        out.append(100.0 * np.mean(np.stack(terms, axis=1), axis=1))
    return out


def delta_m_bootstrap(
    labels: dict[str, np.ndarray],
    models: dict[str, list[tuple[list[np.ndarray], str]]],
    present: dict[str, list[str]],
    *,
    n_resamples: int,
    seed: int,
    jobs: int = 1,
    bins: int = ECE_BINS,
) -> list[np.ndarray]:
    """Per run after the reference: Δm of each joint resample of the datasets' test images. `models[flag]`: per
    run, its seeds' scores and grade rule; `present[flag]`: the metrics Δm takes of that dataset (at least one:
    compare leaves out a dataset none of its metrics applies to). `jobs` processes resample the datasets in parallel
    (joblib); the result is the same."""
    resampled = Parallel(n_jobs=jobs)(
        delayed(resampled_metrics)(
            flag, labels[flag], models[flag], present[flag], n_resamples=n_resamples, seed=seed, bins=bins
        )
        for flag in models
    )
    return delta_m_replicates(dict(zip(models, resampled)), present)


def delta_m_interval(replicates: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, str | None]:
    """(low, high, why undefined) of a percentile interval over the resamples where Δm is defined."""
    defined = replicates[np.isfinite(replicates)]
    if not len(defined):
        return math.nan, math.nan, "Δm is undefined in every resample of the test images"
    alpha = (1 - confidence) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low, high = np.quantile(defined, [alpha, 1 - alpha])
    return float(low), float(high), None
