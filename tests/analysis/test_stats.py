from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import scipy.stats
from medmnist.evaluator import getAUC

from benchmarks.baselines import loop_intervals, paired_bootstrap
from mmpt.analysis.compare import compare_runs
from mmpt.analysis.inputs import load_run, read_labels, read_scores
from mmpt.analysis.stats import PreparedDataset, bootstrap_dataset, delong_components, delong_intervals
from mmpt.errors import MmptError
from mmpt.evaluation.metrics import CALIBRATION, PER_CLASS, class_labels, compute_metrics, per_class_metrics
from mmpt.runs.rundir import Results
from mmpt.tasks import BINARY, MULTI_LABEL, ORDINAL, TASKS

# one dataset of each task type
FLAGS = {"breastmnist": BINARY, "bloodmnist": "multi-class", "chestmnist": MULTI_LABEL, "retinamnist": ORDINAL}


def _data(flag: str, n: int, seeds: int, rng: np.random.Generator):
    """Random labels (every class present) and `seeds` score arrays rounded to one decimal: many ties."""
    task = TASKS[flag]
    if task.task_type == MULTI_LABEL:
        labels = (rng.random((n, task.num_classes)) < 0.3).astype(np.int64)
    else:
        labels = rng.integers(0, task.num_classes, (n, 1))
        labels[: task.num_classes, 0] = np.arange(task.num_classes)
    width = 2 if task.task_type == BINARY else task.num_classes
    scores = []
    for _ in range(seeds):
        s = np.round(rng.random((n, width)), 1)
        if task.task_type != MULTI_LABEL:
            s = (s + 0.05) / (s + 0.05).sum(axis=1, keepdims=True)
            s = np.round(s, 2)  # probabilities with ties, and ties at the 0.5 threshold
        scores.append(s)
    return task, labels, scores


def _metrics(task) -> list[str]:
    ordinal = ["qwk", "mae"] if task.task_type == ORDINAL else []
    return ["auc", "acc", "balanced_acc", "kappa", *ordinal, *CALIBRATION]


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("n", [12, 90])
def test_weighted_metrics_equal_compute_metrics_on_the_resampled_rows(flag, n):
    """The bootstrap's metrics of weighted counts (each image counted as often as a resample drew it) are medmnist's
    metrics recomputed on the resampled rows."""
    rng = np.random.default_rng(n)
    task, labels, scores = _data(flag, n, 2, rng)
    metrics = _metrics(task)
    indices = rng.integers(0, n, (15, n))
    counts = np.stack([np.bincount(i, minlength=n) for i in indices])
    for rule in ("argmax", "median") if task.task_type == ORDINAL else ("argmax",):
        got = PreparedDataset(task, labels, [(scores, rule)], metrics).metric_values(counts.T.astype(float))[0]
        for b, i in enumerate(indices):
            per_seed = [compute_metrics(task, labels[i], s[i], metrics, rule) for s in scores]
            expected = [np.mean([v[m] for v in per_seed]) for m in metrics]
            # n=12 leaves classes out of some resamples: AUC (and kappa) NaN exactly where scikit-learn's is
            np.testing.assert_allclose(got[b], expected, rtol=0, atol=1e-9, equal_nan=True)
    if n == 12 and task.task_type != BINARY:
        assert np.isnan(got[:, 0]).any()  # the undefined case was exercised


@pytest.mark.parametrize("flag", FLAGS)
def test_weighted_per_class_metrics_equal_per_class_metrics_on_the_resampled_rows(flag):
    """compare --per-class's bootstrap: each class's precision, recall, F1 and AUC of weighted counts are those of
    the resampled rows."""
    rng = np.random.default_rng(3)
    task, labels, scores = _data(flag, 60, 2, rng)
    classes = class_labels(task)
    names = [f"{m}@{k}" for k in range(len(classes)) for m in PER_CLASS]
    indices = rng.integers(0, 60, (6, 60))
    counts = np.stack([np.bincount(i, minlength=60) for i in indices])
    rule = "median" if task.task_type == ORDINAL else "argmax"
    got = PreparedDataset(task, labels, [(scores, rule)], names).metric_values(counts.T.astype(float))[0]
    for b, i in enumerate(indices):
        per_seed = [per_class_metrics(task, labels[i], s[i], rule) for s in scores]
        expected = [np.mean([p[classes[int(n.split("@")[1])]][n.split("@")[0]] for p in per_seed]) for n in names]
        np.testing.assert_allclose(got[b], expected, rtol=0, atol=1e-9, equal_nan=True)


# the 14-label chest task takes over 5 s
@pytest.mark.parametrize("flag", [pytest.param(f, marks=pytest.mark.slow) if f == "chestmnist" else f for f in FLAGS])
def test_vectorised_bootstrap_gives_the_intervals_of_the_per_resample_loop(flag):
    rng = np.random.default_rng(5)
    task, labels, scores = _data(flag, 40, 3, rng)
    metrics = _metrics(task)
    reference, other = scores[:2], scores[2:]
    rules = ("argmax", "median") if task.task_type == ORDINAL else ("argmax", "argmax")
    # a small chunk: several chunks of resamples, as at full size
    vectorised = bootstrap_dataset(
        task, labels, [(reference, rules[0]), (other, rules[1])], metrics, n_resamples=30, seed=7, chunk_values=40 * 8
    )
    loop = [
        paired_bootstrap(task, labels, reference, None, metrics, n_resamples=30, seed=7, grade_rules=rules),
        paired_bootstrap(task, labels, reference, other, metrics, n_resamples=30, seed=7, grade_rules=rules),
    ]
    for (low, high), (old_low, old_high) in zip(vectorised, loop):
        assert len(low) == len(old_low)
        np.testing.assert_allclose(low, old_low, rtol=0, atol=1e-9, equal_nan=True)
        np.testing.assert_allclose(high, old_high, rtol=0, atol=1e-9, equal_nan=True)
    assert np.all(vectorised[1][0] < vectorised[1][1])  # intervals with width: the comparison compared something


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    from benchmarks.compare import write_series

    root = tmp_path_factory.mktemp("series")
    return write_series(root, list(FLAGS), seeds=2, max_images=70, seed=3)


@pytest.mark.slow
def test_compare_gives_the_intervals_of_the_per_resample_loop(series):
    metrics = ["auc", "acc", "balanced_acc", "kappa", "qwk", "mae"]
    result = compare_runs(series, metrics=metrics, n_resamples=10, seed=2)
    runs = [load_run(path) for path in series]
    labels = {f: read_labels(runs[0].seeds[0][f], f) for f in FLAGS}
    models = {f: [([read_scores(m[f]) for m in run.seeds], run.seeds[0][f].grade_rule) for run in runs] for f in FLAGS}
    checked = 0
    for flag in FLAGS:
        present = [m for m in metrics if m in result["runs"][0]["datasets"][flag]]
        loop = loop_intervals({flag: labels[flag]}, {flag: models[flag]}, present, n_resamples=10, seed=2)
        for i, run in enumerate(result["runs"]):
            low, high = loop[(i, flag)]
            for j, m in enumerate(present):
                cell = run["datasets"][flag][m]
                assert cell["ci_low"] == pytest.approx(low[j], abs=1e-9, nan_ok=True), (flag, m)
                assert cell["ci_high"] == pytest.approx(high[j], abs=1e-9, nan_ok=True), (flag, m)
                if i:
                    k = len(present) + j
                    assert cell["diff_ci_low"] == pytest.approx(low[k], abs=1e-9, nan_ok=True), (flag, m)
                    assert cell["diff_ci_high"] == pytest.approx(high[k], abs=1e-9, nan_ok=True), (flag, m)
                checked += 1
    assert checked > 30


def test_compare_delong_replaces_only_the_auc_intervals(series):
    boot = compare_runs(series, metrics=["auc", "acc"], n_resamples=25, seed=2)
    delong = compare_runs(series, metrics=["auc", "acc"], n_resamples=25, seed=2, ci="delong")
    assert delong["auc_interval"] == "delong" and boot["auc_interval"] == "bootstrap"
    labels = np.load(series[0].parent / "data" / "breastmnist.npz")["test_labels"]
    from mmpt.analysis.inputs import load_run, read_scores

    scores = [[read_scores(m["breastmnist"]) for m in load_run(s).seeds] for s in series]
    expected = delong_intervals(TASKS["breastmnist"], labels, scores)
    cell = delong["runs"][1]["datasets"]["breastmnist"]["auc"]
    assert (cell["ci_low"], cell["ci_high"], cell["diff_ci_low"], cell["diff_ci_high"]) == pytest.approx(expected[1])
    assert cell["ci_low"] < cell["value"] < cell["ci_high"]
    assert cell["ci_low"] != pytest.approx(boot["runs"][1]["datasets"]["breastmnist"]["auc"]["ci_low"])
    assert delong["runs"][1]["datasets"]["breastmnist"]["acc"] == boot["runs"][1]["datasets"]["breastmnist"]["acc"]


# ---------------------------------------------------------------- DeLong


def _brute_force_delong(positive, score_a, score_b):
    """DeLong et al. 1988 by definition, O(n²): AUCs, and var(A), var(B), cov(A, B) from V10 / V01."""

    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    m, n = len(pos), len(neg)
    v10 = np.array([[np.mean([psi(s[i], s[j]) for j in neg]) for i in pos] for s in (score_a, score_b)])
    v01 = np.array([[np.mean([psi(s[i], s[j]) for i in pos]) for j in neg] for s in (score_a, score_b)])
    auc = v10.mean(axis=1)
    s10, s01 = np.cov(v10), np.cov(v01)  # 2×2, divisor m−1 and n−1
    cov = s10 / m + s01 / n
    return auc, cov


def test_delong_variance_and_paired_covariance_match_the_definition():
    rng = np.random.default_rng(0)
    positive = rng.random(70) < 0.4
    score_a = np.round(positive * 0.6 + rng.random(70), 1)  # ties within and across classes
    score_b = np.round(positive * 0.3 + rng.random(70), 1)
    auc, cov = _brute_force_delong(positive, score_a, score_b)
    a, psi_a = delong_components(positive, score_a)
    b, psi_b = delong_components(positive, score_b)
    assert (a, b) == pytest.approx(tuple(auc), abs=1e-12)
    assert psi_a @ psi_a == pytest.approx(cov[0, 0], rel=1e-10)
    assert psi_a @ psi_b == pytest.approx(cov[0, 1], rel=1e-10)
    # the paired difference's interval uses var(A − B) = var A + var B − 2 cov
    task = TASKS["breastmnist"]
    labels = positive.astype(np.int64)[:, None]
    as_scores = [np.stack([1 - s, s], axis=1) for s in (score_a, score_b)]
    (low, high), (_, _, diff_low, diff_high) = delong_intervals(task, labels, [[as_scores[0]], [as_scores[1]]])
    z = 1.959963984540054
    assert (low, high) == pytest.approx((auc[0] - z * math.sqrt(cov[0, 0]), min(1, auc[0] + z * math.sqrt(cov[0, 0]))))
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert (diff_low, diff_high) == pytest.approx((auc[1] - auc[0] - z * se, auc[1] - auc[0] + z * se))


def test_delong_on_hanley_and_mcneil_rating_data():
    # Hanley & McNeil 1982, Radiology 143:29, table 1: 109 CT images rated 1-5 (58 normal, 51 abnormal);
    # the paper's area is 0.893 with standard error 0.032 (its exponential approximation)
    normal, abnormal = [33, 6, 6, 11, 2], [3, 2, 2, 11, 33]
    score = np.concatenate([np.repeat(np.arange(1, 6), normal), np.repeat(np.arange(1, 6), abnormal)]).astype(float)
    positive = np.r_[np.zeros(58, bool), np.ones(51, bool)]
    auc, psi = delong_components(positive, score)
    assert auc == pytest.approx(0.893, abs=5e-4)
    assert math.sqrt(psi @ psi) == pytest.approx(0.032, abs=0.004)


def test_delong_interval_of_a_multi_class_mean_auc_matches_the_bootstrap_spread():
    # medmnist's multi-class AUC is the mean of one-vs-rest AUCs whose splits differ: its DeLong variance
    # (and that of a paired difference) agrees with the spread of the bootstrap distribution
    rng = np.random.default_rng(1)
    task, n = TASKS["bloodmnist"], 1500
    labels = rng.integers(0, task.num_classes, (n, 1))
    onehot = np.eye(task.num_classes)[labels[:, 0]]
    runs = [[rng.random((n, task.num_classes)) + strength * onehot] for strength in (0.3, 0.5)]
    (low, high), (_, _, diff_low, diff_high) = delong_intervals(task, labels, runs)
    counts = rng.multinomial(n, np.full(n, 1 / n), size=1500)
    values = PreparedDataset(task, labels, [(r, "argmax") for r in runs], ["auc"]).metric_values(counts.T.astype(float))
    z = 1.959963984540054
    boot_se, boot_diff_se = values[0][:, 0].std(ddof=1), (values[1] - values[0])[:, 0].std(ddof=1)
    assert (high - low) / (2 * z) == pytest.approx(boot_se, rel=0.12)
    assert (diff_high - diff_low) / (2 * z) == pytest.approx(boot_diff_se, rel=0.12)


# ---------------------------------------------------------------- intervals that cannot be computed


def _runs_with_labels(root, labels: dict, rng) -> list:
    """Two single-seed runs (random scores) evaluated on these test labels, as compare reads them."""
    from mmpt.evaluation.predict import TaskResult, write_predictions

    data = root / "data"
    data.mkdir(parents=True)
    for flag, y in labels.items():
        np.savez(data / TASKS[flag].filename(28), test_labels=y)
    runs = []
    for side in ("a", "b"):
        results = {}
        for flag, y in labels.items():
            task = TASKS[flag]
            scores = rng.random((len(y), 2 if task.task_type == BINARY else task.num_classes))
            if task.task_type != MULTI_LABEL:
                scores /= scores.sum(axis=1, keepdims=True)
            results[flag] = TaskResult(y, scores, {"auc": math.nan, "acc": math.nan})
        write_predictions(Results(root / side).predictions, results, 28, "test", side, data_root=str(data))
        runs.append(root / side)
    return runs


@pytest.mark.parametrize("ci", ["delong", "bootstrap"])
def test_an_auc_with_a_one_image_class_has_no_interval_and_says_why(ci, tmp_path):
    """DeLong's variance needs two images on each side of every class; such an AUC's interval and its difference's
    are NaN (null in compare.json, `nan` with the reason in compare.md), by either method, where they used to be
    clipped to [0, 1] and [−1, 1]; the other datasets keep their intervals, DeLong's equal to the definition's."""

    from mmpt.analysis.report import write_compare

    rng = np.random.default_rng(4)
    breast = np.zeros((60, 1), np.int64)
    breast[17] = 1  # one test image of class 1 (normal, benign)
    blood = rng.integers(0, 7, (80, 1))
    blood[:7, 0] = np.arange(7)
    blood[40, 0] = 7  # class 7 (platelet): one image
    pneumonia = (rng.random((90, 1)) < 0.4).astype(np.int64)
    labels = {"pneumoniamnist": pneumonia, "breastmnist": breast, "bloodmnist": blood}
    runs = _runs_with_labels(tmp_path, labels, rng)
    result = compare_runs(runs, metrics=["auc", "acc"], n_resamples=200, seed=1, ci=ci)
    why = {
        "breastmnist": "class 1 (normal, benign) has 1 test image; an AUC interval needs two on each side",
        "bloodmnist": "class 7 (platelet) has 1 test image",
    }
    for flag, reason in why.items():
        for r, run in enumerate(result["runs"]):
            cell = run["datasets"][flag]["auc"]
            assert math.isfinite(cell["value"])  # the AUC itself is defined (one positive, many negatives)
            assert math.isnan(cell["ci_low"]) and math.isnan(cell["ci_high"]), (flag, cell)
            assert reason in cell["ci_undefined"]
            if r:
                assert math.isnan(cell["diff_ci_low"]) and math.isnan(cell["diff_ci_high"])
                assert reason in cell["diff_ci_undefined"]
            acc = run["datasets"][flag]["acc"]
            assert acc["ci_low"] < acc["ci_high"] and "ci_undefined" not in acc
    for run in result["runs"]:
        cell = run["datasets"]["pneumoniamnist"]["auc"]
        assert cell["ci_low"] < cell["value"] < cell["ci_high"] and "ci_undefined" not in cell
    other = result["runs"][1]  # Δm itself is defined; its interval is not, as one of its terms has none
    assert math.isfinite(other["delta_m"]) and math.isnan(other["delta_m_ci_low"])
    assert other["delta_m_ci_undefined"].startswith("the auc interval of breastmnist is undefined: class 1")
    if ci == "delong":  # where defined, DeLong's interval is the definition's
        scores = [read_scores(load_run(run).seeds[0]["pneumoniamnist"]) for run in runs]  # as compare read them
        positive = pneumonia[:, 0] == 1
        auc, cov = _brute_force_delong(positive, scores[0][:, 1], scores[1][:, 1])
        z = 1.959963984540054
        cell = result["runs"][1]["datasets"]["pneumoniamnist"]["auc"]
        assert (cell["ci_low"], cell["ci_high"]) == pytest.approx(
            (auc[1] - z * math.sqrt(cov[1, 1]), auc[1] + z * math.sqrt(cov[1, 1])), abs=1e-12
        )
        se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
        assert (cell["diff_ci_low"], cell["diff_ci_high"]) == pytest.approx(
            (auc[1] - auc[0] - z * se, auc[1] - auc[0] + z * se), abs=1e-12
        )
    write_compare(result, tmp_path / "out")
    markdown = (tmp_path / "out" / "compare.md").read_text()
    breast_row = next(
        line for line in markdown.splitlines() if line.startswith("| breastmnist") and "[nan, nan]" in line
    )
    assert "[+nan, +nan]" not in breast_row and "[nan, nan]" in breast_row.split("|")[-2]  # the difference too
    assert "[0.0000, 1.0000]" not in markdown and "[-1.0000, +1.0000]" not in markdown
    assert f"- breastmnist auc: {why['breastmnist']}" in markdown
    assert f"% [nan, nan] (the auc interval of breastmnist is undefined: {why['breastmnist']}" in markdown
    import csv

    rows = list(csv.DictReader((tmp_path / "out" / "compare.csv").open()))
    row = next(r for r in rows if r["run"] == str(runs[1]) and (r["dataset"], r["metric"]) == ("breastmnist", "auc"))
    assert (row["ci_low"], row["diff_ci_high"]) == ("nan", "nan")
    assert why["breastmnist"] in row["ci_undefined"] and why["breastmnist"] in row["diff_ci_undefined"]
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    cell = saved["runs"][1]["datasets"]["breastmnist"]["auc"]
    assert cell["ci_low"] is None and cell["diff_ci_high"] is None and cell["ci_undefined"].startswith("class 1")


def test_delta_m_is_undefined_not_a_mean_over_fewer_terms():
    from mmpt.analysis.delta_m import delta_m, delta_m_undefined

    reference = {"a": {"auc": 0.8, "acc": 0.5}, "b": {"auc": math.nan, "acc": 0.5}}
    other = {"a": {"auc": 0.9, "acc": 0.5}, "b": {"auc": 0.7, "acc": 0.6}}
    assert math.isnan(delta_m(reference, other, ["auc", "acc"]))
    assert delta_m_undefined(reference, other, ["auc", "acc"]) == "auc of b is undefined"
    assert delta_m(reference, other, ["acc"]) == pytest.approx(10.0)
    assert delta_m_undefined(reference, other, ["acc"]) is None


# ---------------------------------------------------------------- Δm's interval


def test_delta_m_replicates_are_delta_m_on_each_joint_resample_of_independently_drawn_test_sets():
    """Each replicate is LibMTL's Δm of the seed means recomputed by compute_metrics on the resampled rows of
    every dataset (mae lower is better, the ordinal grade rule of each side), each dataset drawn from its own
    generator; the chunking of the draws changes nothing."""
    from mmpt.analysis.delta_m import delta_m, delta_m_bootstrap, resampled_metrics
    from mmpt.tasks import FLAGS as ORDER

    rng = np.random.default_rng(11)
    data = {flag: _data(flag, n, 3, rng) for flag, n in (("breastmnist", 30), ("bloodmnist", 30), ("retinamnist", 36))}
    rules = {f: ("median", "argmax") if TASKS[f].task_type == ORDINAL else ("argmax", "argmax") for f in data}
    models = {f: [(scores[:1], rules[f][0]), (scores[1:], rules[f][1])] for f, (_, _, scores) in data.items()}
    metrics = ["auc", "acc", "kappa", "mae"]
    present = {f: [m for m in _metrics(task) if m in metrics] for f, (task, _, _) in data.items()}
    labels = {f: y for f, (_, y, _) in data.items()}
    (replicates,) = delta_m_bootstrap(labels, models, present, n_resamples=12, seed=4)
    draws = {f: np.random.default_rng([4, ORDER.index(f)]).integers(0, len(y), (12, len(y))) for f, y in labels.items()}
    assert not np.array_equal(draws["breastmnist"], draws["bloodmnist"])  # same size, independent draws
    for b in range(12):
        sides = [{}, {}]
        for f, (task, y, _) in data.items():
            rows = draws[f][b]
            for side, (seeds, rule) in enumerate(models[f]):
                per_seed = [compute_metrics(task, y[rows], s[rows], present[f], rule) for s in seeds]
                sides[side][f] = {m: float(np.mean([v[m] for v in per_seed])) for m in present[f]}
        assert replicates[b] == pytest.approx(delta_m(sides[0], sides[1], metrics), abs=1e-9, nan_ok=True)
    assert np.isfinite(replicates).sum() >= 6 and np.ptp(replicates[np.isfinite(replicates)]) > 1.0
    one_chunk = resampled_metrics(
        "retinamnist", labels["retinamnist"], models["retinamnist"], present["retinamnist"], n_resamples=12, seed=4
    )
    chunks = resampled_metrics(
        "retinamnist",
        labels["retinamnist"],
        models["retinamnist"],
        present["retinamnist"],
        n_resamples=12,
        seed=4,
        chunk_values=36 * 5,
    )
    for whole, chunked in zip(one_chunk, chunks):
        np.testing.assert_array_equal(whole, chunked)


def test_compare_gives_delta_m_an_interval_zero_for_a_copy_of_the_reference(series, tmp_path):
    """A copy of the reference: Δm 0 on every resample, so [0, 0]; another run: an interval with width around
    its Δm, the same whichever --ci the per-dataset AUC intervals take, written to compare.md and compare.csv."""
    import csv

    from mmpt.analysis.report import write_compare

    copy = tmp_path / "copy"
    shutil.copytree(series[0], copy)
    result = compare_runs([series[0], copy, series[1]], metrics=["auc", "acc"], n_resamples=200, seed=3)
    same, other = result["runs"][1], result["runs"][2]
    assert (same["delta_m"], same["delta_m_ci_low"], same["delta_m_ci_high"]) == (0.0, 0.0, 0.0)
    assert other["delta_m_ci_low"] < other["delta_m"] < other["delta_m_ci_high"]
    assert other["delta_m_ci_high"] - other["delta_m_ci_low"] > 1.0  # random scores on 70 images: wide
    delong = compare_runs([series[0], series[1]], metrics=["auc", "acc"], n_resamples=200, seed=3, ci="delong")
    assert (delong["runs"][1]["delta_m_ci_low"], delong["runs"][1]["delta_m_ci_high"]) == (
        other["delta_m_ci_low"],
        other["delta_m_ci_high"],
    )
    write_compare(result, tmp_path / "out")
    line = f"- {series[1]}: {other['delta_m']:+.4f} % [{other['delta_m_ci_low']:+.4f}, {other['delta_m_ci_high']:+.4f}]"
    assert line in (tmp_path / "out" / "compare.md").read_text()
    rows = list(csv.DictReader((tmp_path / "out" / "compare.csv").open()))
    row = next(r for r in rows if r["run"] == str(series[1]) and r["dataset"] == "delta_m_percent")
    assert float(row["ci_low"]) == pytest.approx(other["delta_m_ci_low"])


def test_compare_leaves_out_a_dataset_none_of_the_metrics_applies_to(tmp_path):
    """qwk and mae exist for ordinal datasets only: asked for alone, a binary dataset has nothing to compare and is
    left out (named); with no dataset left, one line says what to do (it was a KeyError traceback)."""
    from benchmarks.compare import write_series
    from mmpt.analysis.report import format_compare

    series = write_series(tmp_path, ["breastmnist", "retinamnist"], seeds=1, max_images=40)
    result = compare_runs(series, metrics=["qwk"], n_resamples=30, seed=0)
    assert result["datasets"] == ["retinamnist"] and result["unmeasured"] == ["breastmnist"]
    assert result["left_out"] == []
    other = result["runs"][1]
    assert other["delta_m_ci_low"] <= other["delta_m"] <= other["delta_m_ci_high"]
    assert "Datasets none of qwk applies to, left out: breastmnist" in format_compare(result)
    only_breast = write_series(tmp_path / "breast", ["breastmnist"], seeds=1, max_images=40)
    with pytest.raises(MmptError, match=r"^--metrics qwk,mae applies to none of the compared datasets \(breastmnist\)"):
        compare_runs(only_breast, metrics=["qwk", "mae"], n_resamples=30)


@pytest.mark.parametrize("flag", ["retinamnist", pytest.param("chestmnist", marks=pytest.mark.slow)])
def test_the_bootstrap_resamples_whole_rows_of_multi_column_labels_and_scores_as_scipy_does(flag):
    """compare's intervals are scipy.stats.bootstrap's (paired, percentile) of medmnist's own getAUC."""
    task, rng = TASKS[flag], np.random.default_rng(1)
    n, k = 80, task.num_classes
    labels = rng.integers(0, 2 if task.label_width > 1 else k, (n, task.label_width))
    if task.label_width == 1:
        labels[:k, 0] = np.arange(k)  # every grade present
    scores_a, scores_b = rng.random((n, k)), rng.random((n, k))
    _, (low, high) = bootstrap_dataset(
        task, labels, [([scores_a], "argmax"), ([scores_b], "argmax")], ["auc"], n_resamples=30, seed=3
    )
    kind = task.task_type

    def interval(statistic):
        res = scipy.stats.bootstrap(
            (np.arange(n),),
            statistic,
            vectorized=False,
            n_resamples=30,
            method="percentile",
            rng=np.random.default_rng(3),
        )
        return res.confidence_interval.low, res.confidence_interval.high

    expected_value = interval(lambda i: getAUC(labels[i], scores_b[i], kind))
    expected_diff = interval(lambda i: getAUC(labels[i], scores_b[i], kind) - getAUC(labels[i], scores_a[i], kind))
    np.testing.assert_allclose([low[0], high[0]], expected_value, atol=1e-12)
    np.testing.assert_allclose([low[1], high[1]], expected_diff, atol=1e-12)
