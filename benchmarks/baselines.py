"""Baselines the engine is measured against, kept outside the package: the per-resample bootstrap loop.

`paired_bootstrap` is the paired bootstrap as compare once computed it: scipy.stats.bootstrap over the test images,
each resample's metrics recomputed with mmpt.evaluation.metrics.compute_metrics (medmnist's own arithmetic), one
run and dataset at a time. `python -m benchmarks compare` times the package's vectorised engine
(mmpt.analysis.stats.bootstrap_dataset: one resampling per dataset, every run on it) against it, and the tests take
it as the oracle the vectorised intervals must equal.
"""

from __future__ import annotations

import warnings

import numpy as np
from joblib import Parallel, delayed
from scipy import stats

from mmpt.analysis.stats import CONFIDENCE
from mmpt.evaluation.metrics import compute_metrics
from mmpt.tasks import TASKS

BOOTSTRAP_BATCH = 20  # resamples per statistic call: bounds memory (batch × images × classes)


def metric_vector(
    task, labels: np.ndarray, scores: list[np.ndarray], metrics: list[str], grade_rule: str = "argmax"
) -> np.ndarray:
    """Mean over the models (seeds) of each metric: len(metrics) values."""
    values = [compute_metrics(task, labels, s, metrics, grade_rule) for s in scores]
    return np.array([np.mean([v[m] for v in values]) for m in metrics])


def paired_bootstrap(
    task,
    labels: np.ndarray,
    reference: list[np.ndarray],
    other: list[np.ndarray] | None,
    metrics: list[str],
    *,
    n_resamples: int,
    seed: int,
    grade_rules: tuple[str, str] = ("argmax", "argmax"),
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile intervals (2 × outputs) from scipy.stats.bootstrap with paired=True over test images.

    Outputs: the seed-mean of each metric of `reference` when `other` is None; else that of `other`
    followed by each difference (other − reference) on the same resampled images. Returns (low, high).
    Resamples in which a metric is undefined (AUC when a class is absent) are left out of its interval.
    """
    samples = [labels, *reference, *(other or [])]
    width = labels.shape[1]
    n_ref = len(reference)

    def statistic(*arrays, axis=-1):
        # each array: columns × resamples × images (scipy moved the image axis last and indexed it)
        out = []
        for b in range(arrays[0].shape[1]):
            y = arrays[0][:, b, :].T[:, :width]
            s = [a[:, b, :].T for a in arrays[1:]]
            ref = metric_vector(task, y, s[:n_ref], metrics, grade_rules[0])
            if other is None:
                out.append(ref)
            else:
                mine = metric_vector(task, y, s[n_ref:], metrics, grade_rules[1])
                out.append(np.concatenate([mine, mine - ref]))
        return np.stack(out, axis=-1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an undefined AUC in some resample makes the interval NaN, reported as such
        result = stats.bootstrap(
            samples,
            statistic,
            n_resamples=n_resamples,
            batch=BOOTSTRAP_BATCH,
            vectorized=True,
            paired=True,
            axis=0,
            confidence_level=CONFIDENCE,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    low = np.atleast_1d(result.confidence_interval.low).astype(float)
    high = np.atleast_1d(result.confidence_interval.high).astype(float)
    undefined = np.isnan(low) | np.isnan(high)
    if undefined.any():  # resamples that miss a class are left out of that AUC's interval
        distribution = np.atleast_2d(result.bootstrap_distribution)
        alpha = (1 - CONFIDENCE) / 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # all-NaN rows stay NaN
            q = np.nanquantile(distribution, [alpha, 1 - alpha], axis=-1)
        low, high = np.where(undefined, q[0], low), np.where(undefined, q[1], high)
    return low, high


def loop_intervals(
    labels: dict[str, np.ndarray],
    models: dict[str, list[tuple[list[np.ndarray], str]]],
    metrics: list[str],
    *,
    n_resamples: int,
    seed: int,
    jobs: int = 1,
) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """(low, high) per (run index, dataset), one `paired_bootstrap` per pair as compare once did: the reference's
    metrics, then each other run's metrics and differences. `models[flag]`: per run, its seeds' scores and grade
    rule."""
    pairs = [(i, flag) for flag, runs in models.items() for i in range(len(runs))]
    found = Parallel(n_jobs=jobs)(
        delayed(paired_bootstrap)(
            TASKS[flag],
            labels[flag],
            models[flag][0][0],
            None if i == 0 else models[flag][i][0],
            metrics,
            n_resamples=n_resamples,
            seed=seed,
            grade_rules=(models[flag][0][1], models[flag][i][1]),
        )
        for i, flag in pairs
    )
    return dict(zip(pairs, found))
