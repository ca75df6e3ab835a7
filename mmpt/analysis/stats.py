"""Paired statistics over test images: a vectorised paired bootstrap of every metric, and DeLong's AUC interval.

Bootstrap. One resampling engine (`resample_metrics`) serves the per-dataset intervals and Δm's
(mmpt.analysis.delta_m): each resample of a dataset's test images is one row of `rng.integers(0, n, (resamples, n))`,
drawn once, and every model of every run is evaluated on it. These are the draws scipy.stats.bootstrap makes with
`paired=True` and that generator, and the intervals are its percentile ones (NaN resamples left out), so they equal
the per-resample loop over scipy (benchmarks/baselines.py, the tests' oracle and the benchmark's baseline) to
rounding. A resample is turned into counts (how often each image was drawn), and every metric is a function of
weighted counts, computed for a chunk of resamples at once:
- AUC (Mann–Whitney form, ties counted half): per score column, one sort of the smaller side (positives
  or negatives) and, for each image of the other side, how many of those lie below it (ties half); a
  resample's AUC is then one cumulative sum of the smaller side's counts and one sparse product that sums
  the other side's counts by that number. One-vs-rest per class for multi-class and ordinal (the mean
  over classes, as medmnist), per label for multi-label, the positive column for binary.
- acc, balanced_acc, kappa, qwk, mae: from each resample's weighted confusion matrix, one sparse product.
- ece: each image's calibration gap (correct − confidence) sits in its confidence bin, which no resample moves; a
  resample's ECE is one sparse product (the gap sums per bin), their absolute values summed over its images;
  brier and nll: weighted means of per-image values, one dense product.
DeLong. `delong_components` gives each AUC and each test image's structural component (DeLong, DeLong &
Clarke-Pearson 1988, computed from midranks as Sun & Xu 2014, O(n log n)); the variance of any linear
combination of AUCs on the same images (a seed mean, a paired difference) is the squared norm of the
same combination of components. For a binary AUC and for the difference of two binary AUCs this is
exactly DeLong's (co)variance S10/m + S01/n. medmnist's multi-class and multi-label AUC is a mean of
per-class (one-vs-rest) or per-label AUCs whose positive/negative split differs from class to class;
its interval is that of this mean, with the covariance of the per-class AUCs estimated from the same
per-image components (each class's components scaled by its own split, as DeLong scales one AUC's).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse
from scipy import stats

from mmpt.evaluation.metrics import (
    CALIBRATION,
    ECE_BINS,
    THRESHOLD,
    calibration_problems,
    confidence_bins,
    f1_score,
    per_class_predictions,
    predicted_grades,
)
from mmpt.tasks import BINARY, MULTI_LABEL, ORDINAL, TaskSpec

CONFIDENCE = 0.95
CHUNK_VALUES = 1 << 22  # resamples × images per chunk: bounds memory (a few float64 arrays of this size)


# ---------------------------------------------------------------- per-model inputs, independent of the resample


@dataclass
class _AucColumn:
    """One binary AUC problem of one model, prepared once. The smaller side (positives or negatives) is
    `cumulated`, sorted by score; `slots` maps every image of the other side to the number of cumulated
    images scoring below it (a tie counts half: half a 1 at `below`, half at `at most as high`)."""

    cumulated: np.ndarray  # indices of the smaller side, sorted by score
    slots: scipy.sparse.csr_matrix  # (cumulated + 1) × images
    cumulated_positives: bool


def _auc_column(positive: np.ndarray, score: np.ndarray) -> _AucColumn:
    # the cumulative sum runs over the smaller side (a class is a small share of the images)
    cumulated_positives = bool(positive.sum() < len(positive) / 2)
    cumulated = np.flatnonzero(positive if cumulated_positives else ~positive)
    cumulated = cumulated[np.argsort(score[cumulated], kind="stable")]
    other = np.flatnonzero(~positive if cumulated_positives else positive)
    below = np.searchsorted(score[cumulated], score[other], side="left")
    through = np.searchsorted(score[cumulated], score[other], side="right")
    # duplicate entries add up: an image without ties gets 0.5 + 0.5 at one slot
    slots = scipy.sparse.csr_matrix(
        (np.full(2 * len(other), 0.5), (np.concatenate([below, through]), np.concatenate([other, other]))),
        shape=(len(cumulated) + 1, len(positive)),
    )
    return _AucColumn(cumulated, slots, cumulated_positives)


def _auc_problems(task: TaskSpec, labels: np.ndarray, scores: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(positive mask, score) of each binary AUC whose mean is medmnist's AUC of the task."""
    if task.task_type == BINARY:
        return [(labels[:, 0] == 1, scores[:, -1])]
    if task.task_type == MULTI_LABEL:
        return [(labels[:, k] == 1, scores[:, k]) for k in range(task.num_classes)]
    return [(labels[:, 0] == k, scores[:, k]) for k in range(task.num_classes)]


def auc_interval_undefined(task: TaskSpec, labels: np.ndarray) -> str | None:
    """Why no interval of medmnist's AUC of `task` on these test labels can be computed, or None: one of the binary
    problems it averages (a class one-vs-rest, a label, the positive class) has fewer than two test images on a
    side. DeLong's variance divides by m(m−1) and n(n−1); a bootstrap that draws one image again and again says
    nothing about its class. The reason names the first such class."""
    labels = np.asarray(labels).reshape(len(labels), -1)
    width = max(2, task.num_classes)
    for k, (positive, _) in enumerate(_auc_problems(task, labels, np.zeros((len(labels), width)))):
        m, n = int(positive.sum()), int((~positive).sum())
        if min(m, n) >= 2:
            continue
        count = min(m, n)
        images = f"{count} test image{'' if count == 1 else 's'}"
        if task.task_type == BINARY:
            shown = 1 if m < 2 else 0
            what = f"class {shown} ({task.class_names[shown]}) has {images}"
        elif task.task_type == MULTI_LABEL:
            what = f"label {k} ({task.class_names[k]}) is {'positive' if m < 2 else 'negative'} in {images}"
        elif m < 2:
            what = f"class {k} ({task.class_names[k]}) has {images}"
        else:
            what = f"all but {images} are class {k} ({task.class_names[k]})"
        return f"{what}; an AUC interval needs two on each side of every class"
    return None


def clipped(low: float, high: float, lowest: float, highest: float) -> tuple[float, float]:
    """(low, high) within [lowest, highest]. NaN stays NaN: Python's max and min would turn it into a bound, and an
    interval that cannot be computed would print as [0, 1]."""
    return float(np.clip(low, lowest, highest)), float(np.clip(high, lowest, highest))


def _class_problems(task: TaskSpec, labels: np.ndarray, scores: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(true class, predicted class, classes) of each problem whose mean acc/balanced_acc/kappa is the task's."""
    if task.task_type == BINARY:
        return [(labels[:, 0], (scores[:, -1] > THRESHOLD).astype(np.int64), 2)]
    if task.task_type == MULTI_LABEL:
        return [(labels[:, k], (scores[:, k] > THRESHOLD).astype(np.int64), 2) for k in range(task.num_classes)]
    return [(labels[:, 0], scores.argmax(axis=1), task.num_classes)]


@dataclass
class _Model:
    """One model's (one seed's) prepared inputs and where its confusion counts sit in the shared sparse matrix."""

    auc: list[_AucColumn]
    confusions: list[tuple[int, int]]  # (first column, classes) of each class problem
    grades: tuple[int, int] | None  # (first column, classes) of the ordinal grade confusion
    # (first gap column, problems) in the calibration-gap matrix and (brier, nll) columns of the per-image values
    calibration: tuple[int, int, int, int] | None = None
    per_class: tuple[int, int] | None = None  # (first column, classes) of the (hits, true, predicted) counts


class PreparedDataset:
    """All models of all runs on one dataset's test images, prepared for weighted evaluation."""

    def __init__(
        self,
        task: TaskSpec,
        labels: np.ndarray,
        runs: list[tuple[list[np.ndarray], str]],
        metrics: list[str],
        bins: int = ECE_BINS,
    ):
        self.task, self.metrics, self.n, self.bins = task, list(metrics), len(labels), bins
        labels = np.asarray(labels).reshape(len(labels), -1)
        need_confusion = bool({"acc", "balanced_acc", "kappa"} & set(metrics))
        need_grades = task.task_type == ORDINAL and bool({"qwk", "mae"} & set(metrics))
        need_calibration = bool(set(CALIBRATION) & set(metrics))
        # per-class metrics are named <metric>@<class index> (mmpt.evaluation.metrics.PER_CLASS)
        need_per_class = any("@" in m for m in metrics)
        gap_rows, gap_cols, gap_values, gap_width, per_image = [], [], [], 0, []
        rows, cols, width = [], [], 0
        self.runs: list[list[_Model]] = []
        for seeds, grade_rule in runs:
            models = []
            for scores in seeds:
                scores = np.asarray(scores, dtype=np.float64)
                want_auc = "auc" in metrics or any(m.startswith("auc@") for m in metrics)
                auc = [_auc_column(p, s) for p, s in _auc_problems(task, labels, scores)] if want_auc else []
                confusions = []
                if need_confusion:
                    for true, predicted, classes in _class_problems(task, labels, scores):
                        rows.append(np.arange(self.n))
                        cols.append(width + true * classes + predicted)
                        confusions.append((width, classes))
                        width += classes * classes
                grades = None
                if need_grades:
                    k = task.num_classes
                    rows.append(np.arange(self.n))
                    cols.append(width + labels[:, 0] * k + predicted_grades(scores, grade_rule))
                    grades = (width, k)
                    width += k * k
                per_class = None
                if need_per_class:
                    problems = per_class_predictions(task, labels, scores, grade_rule)
                    for k, (true, predicted, _) in enumerate(problems):
                        for j, hit in enumerate((true & predicted, true, predicted)):
                            rows.append(np.flatnonzero(hit))
                            cols.append(np.full(int(hit.sum()), width + 3 * k + j))
                    per_class = (width, len(problems))
                    width += 3 * len(problems)
                calibration = None
                if need_calibration:
                    problems = calibration_problems(task, labels, scores, grade_rule)
                    for p, (confidence, correct, _, _) in enumerate(problems):
                        gap_rows.append(np.arange(self.n))
                        gap_cols.append(gap_width + p * bins + confidence_bins(confidence, bins))
                        gap_values.append(correct - confidence)
                    per_image += [
                        np.mean([b for *_, b, _ in problems], axis=0),
                        np.mean([n for *_, n in problems], axis=0),
                    ]
                    calibration = (gap_width, len(problems), len(per_image) - 2, len(per_image) - 1)
                    gap_width += len(problems) * bins
                models.append(_Model(auc, confusions, grades, calibration, per_class))
            self.runs.append(models)
        # images × (bins of every calibration problem of every model): each image's gap in its confidence bin
        self.gaps = (
            scipy.sparse.csc_matrix(
                (np.concatenate(gap_values), (np.concatenate(gap_rows), np.concatenate(gap_cols))),
                shape=(self.n, gap_width),
            )
            if gap_rows
            else None
        )
        self.per_image = np.stack(per_image, axis=1) if per_image else None  # images × (brier, nll of each model)
        # images × (confusion cells of every problem of every model): one 1 per image and problem
        self.cells = (
            scipy.sparse.csc_matrix(
                (np.ones(sum(len(r) for r in rows)), (np.concatenate(rows), np.concatenate(cols))),
                shape=(self.n, width),
            )
            if rows
            else None
        )

    def metric_values(self, counts: np.ndarray) -> list[np.ndarray]:
        """Per run: resamples × metrics, the seed mean of each metric per resample (counts: images × resamples)."""
        cells = np.asarray((self.cells.T @ counts).T) if self.cells is not None else None  # resamples × cells
        gaps = np.asarray((self.gaps.T @ counts).T) if self.gaps is not None else None  # resamples × bins
        sums = (counts.T @ self.per_image) if self.per_image is not None else None  # resamples × per-image columns
        out = []
        for models in self.runs:
            per_seed = [self._model_metrics(model, counts, cells, gaps, sums) for model in models]
            out.append(np.mean(np.stack(per_seed), axis=0))
        return out

    def _model_metrics(self, model: _Model, counts: np.ndarray, cells, gaps, sums) -> np.ndarray:
        b = counts.shape[1]
        values = {}
        if model.calibration is not None:
            first, problems, brier, nll = model.calibration
            total = counts.sum(axis=0)
            per_problem = np.abs(gaps[:, first : first + problems * self.bins]).reshape(b, problems, self.bins)
            values["ece"] = per_problem.sum(axis=2).mean(axis=1) / total
            values["brier"], values["nll"] = sums[:, brier] / total, sums[:, nll] / total
        if model.auc:
            # sum then divide, in class order, as medmnist does
            total = counts.sum(axis=0)
            aucs = [_weighted_auc(c, counts, total) for c in model.auc]
            values["auc"] = sum(aucs) / len(aucs)
            for k in range(len(model.auc) if len(model.auc) > 1 else 2):  # binary: one AUC serves both classes
                values[f"auc@{k}"] = aucs[min(k, len(aucs) - 1)]
        if model.per_class is not None:
            first, classes = model.per_class
            hits, true, predicted = cells[:, first : first + 3 * classes].reshape(b, classes, 3).transpose(2, 0, 1)
            with np.errstate(invalid="ignore", divide="ignore"):
                precision, recall = hits / predicted, hits / true
            f1 = f1_score(precision, recall)
            for k in range(classes):
                values[f"precision@{k}"], values[f"recall@{k}"], values[f"f1@{k}"] = (
                    precision[:, k],
                    recall[:, k],
                    f1[:, k],
                )
        if model.confusions:
            per_problem = [_confusion_metrics(cells[:, s : s + k * k].reshape(b, k, k)) for s, k in model.confusions]
            for name in ("acc", "balanced_acc", "kappa"):
                values[name] = sum(p[name] for p in per_problem) / len(per_problem)
        if model.grades is not None:
            s, k = model.grades
            confusion = cells[:, s : s + k * k].reshape(b, k, k)
            grade = np.arange(k)
            distance = grade[:, None] - grade[None, :]
            values["qwk"] = _kappa(confusion, distance.astype(np.float64) ** 2)
            values["mae"] = (confusion * np.abs(distance)).sum(axis=(1, 2)) / confusion.sum(axis=(1, 2))
        return np.stack([values[m] for m in self.metrics], axis=1)  # resamples × metrics


def _weighted_auc(column: _AucColumn, counts: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Mann–Whitney AUC (ties half) of each resample (counts: images × resamples; total: the images of each
    resample); NaN where a side is empty."""
    # image rows are contiguous: the gather copies rows, the cumulative sum adds rows
    cumulated = counts[column.cumulated]  # smaller side × resamples, in score order
    cumulative = np.zeros((cumulated.shape[0] + 1, counts.shape[1]))
    np.cumsum(cumulated, axis=0, out=cumulative[1:])
    # other-side counts by how many cumulated images lie below them: (cumulated + 1) × resamples
    by_slot = column.slots @ counts
    below_pairs = np.einsum("ij,ij->j", cumulative, by_slot)  # (other, cumulated) pairs, cumulated below
    pairs = (total - cumulative[-1]) * cumulative[-1]
    # positives cumulated: a positive beats a negative unless it lies below it
    beaten = pairs - below_pairs if column.cumulated_positives else below_pairs
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, beaten / pairs, np.nan)


def _kappa(confusion: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Cohen's kappa of each resample's confusion (resamples × K × K), as scikit-learn; NaN where undefined."""
    total = confusion.sum(axis=(1, 2))
    # outer(predicted totals, true totals) / total, as scikit-learn (the weights are symmetric)
    expected = confusion.sum(axis=1)[:, :, None] * confusion.sum(axis=2)[:, None, :] / total[:, None, None]
    numerator = (weights * confusion).sum(axis=(1, 2))
    denominator = (weights * expected).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator != 0, 1 - numerator / denominator, np.nan)


def _confusion_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """acc, balanced_acc (mean recall over the true classes present), kappa from resamples × true × predicted."""
    k = confusion.shape[1]
    total = confusion.sum(axis=(1, 2))
    correct = np.trace(confusion, axis1=1, axis2=2)
    true_totals = confusion.sum(axis=2)
    present = true_totals > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, np.diagonal(confusion, axis1=1, axis2=2) / true_totals, 0.0)
    return {
        "acc": correct / total,
        "balanced_acc": recall.sum(axis=1) / present.sum(axis=1),
        "kappa": _kappa(confusion, 1.0 - np.eye(k)),
    }


def draw_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """resamples × n draws of image indices -> n × resamples counts (float64)."""
    b = len(indices)
    flat = (indices * b + np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(n, b).astype(np.float64)


def percentile_interval(distribution: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) per output of a resamples × outputs distribution: the percentile interval (linear interpolation,
    as scipy.stats.bootstrap's), over the resamples where the output is defined (AUC when a class is absent from a
    resample is NaN there); NaN where it is defined in none."""
    alpha = (1 - confidence) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-NaN outputs stay NaN
        low, high = np.nanquantile(np.asarray(distribution, dtype=float), [alpha, 1 - alpha], axis=0)
    return low, high


def resamples_per_chunk(n_resamples: int, n: int, chunk_values: int = CHUNK_VALUES) -> int:
    """How many resamples of n images to evaluate at once: about `chunk_values` (resample, image) values."""
    return max(1, min(n_resamples, chunk_values // max(n, 1)))


def resample_metrics(
    task: TaskSpec,
    labels: np.ndarray,
    runs: list[tuple[list[np.ndarray], str]],
    metrics: list[str],
    *,
    n_resamples: int,
    rng: np.random.Generator,
    chunk_values: int = CHUNK_VALUES,
    bins: int = ECE_BINS,
) -> list[np.ndarray]:
    """Per run (its seeds' scores, its grade rule): resamples × metrics, the seed mean of each metric on each
    resample of the test images. The resamples are the rows of `rng.integers(0, n, (n_resamples, n))`, drawn in
    chunks of about `chunk_values` values (the same rows whatever the chunk)."""
    labels = np.asarray(labels).reshape(len(labels), -1)
    n = len(labels)
    prepared = PreparedDataset(task, labels, runs, metrics, bins)
    batch = resamples_per_chunk(n_resamples, n, chunk_values)
    chunks = []
    for start in range(0, n_resamples, batch):
        indices = rng.integers(0, n, (min(batch, n_resamples - start), n))
        chunks.append(prepared.metric_values(draw_counts(indices, n)))
    return [np.concatenate([chunk[r] for chunk in chunks]) for r in range(len(runs))]


def bootstrap_dataset(
    task: TaskSpec,
    labels: np.ndarray,
    runs: list[tuple[list[np.ndarray], str]],
    metrics: list[str],
    *,
    n_resamples: int,
    seed: int,
    chunk_values: int = CHUNK_VALUES,
    bins: int = ECE_BINS,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Percentile intervals of every run on one dataset, from one paired resampling of its test images (`seed`'s
    generator: scipy.stats.bootstrap's draws).

    `runs`: per run, its seeds' score arrays and its grade rule; the first run is the reference. Returns per
    run (low, high): for the reference len(metrics) values (its seed-mean metrics); for every other run
    2 × len(metrics): its metrics, then each difference (run − reference) on the same resamples.
    """
    rng = np.random.default_rng(seed)
    values = resample_metrics(
        task, labels, runs, metrics, n_resamples=n_resamples, rng=rng, chunk_values=chunk_values, bins=bins
    )
    reference = values[0]
    intervals = [percentile_interval(reference)]
    for mine in values[1:]:
        intervals.append(percentile_interval(np.concatenate([mine, mine - reference], axis=1)))
    return intervals


# ---------------------------------------------------------------- DeLong


def delong_components(positive: np.ndarray, score: np.ndarray) -> tuple[float, np.ndarray]:
    """(AUC, per-image structural components ψ) of one binary problem, from midranks (Sun & Xu 2014).

    ψ of a positive image is (V10 − AUC)/√(m(m−1)), of a negative (V01 − AUC)/√(n(n−1)) (m positives,
    n negatives; V10: the share of negatives it beats, ties half; V01: the share of positives that beat
    it), so Σψ_a ψ_b over images is DeLong's covariance S10/m + S01/n of two AUCs on the same images.
    NaN (AUC and every ψ) when either side has fewer than two images.
    """
    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    m, k = int(positive.sum()), int((~positive).sum())
    psi = np.full(len(score), np.nan)
    if m < 2 or k < 2:
        return (math.nan if min(m, k) == 0 else _mann_whitney(positive, score, m, k)), psi
    combined = stats.rankdata(score)
    v10 = (combined[positive] - stats.rankdata(score[positive])) / k
    v01 = 1.0 - (combined[~positive] - stats.rankdata(score[~positive])) / m
    auc = float(v10.mean())
    psi[positive] = (v10 - auc) / math.sqrt(m * (m - 1))
    psi[~positive] = (v01 - auc) / math.sqrt(k * (k - 1))
    return auc, psi


def _mann_whitney(positive, score, m, k) -> float:
    ranks = stats.rankdata(score)
    return float((ranks[positive].sum() - m * (m + 1) / 2) / (m * k))


def delong_intervals(
    task: TaskSpec,
    labels: np.ndarray,
    runs: list[list[np.ndarray]],
    confidence: float = CONFIDENCE,
) -> list[tuple[float, float, float, float] | tuple[float, float]]:
    """DeLong intervals of medmnist's AUC (the seed mean) of each run on one dataset's test images.

    Returns for the reference (low, high); for every other run (low, high, diff_low, diff_high), the
    difference being run − reference, paired on the same images. Normal intervals value ± z·√var,
    clipped to [0, 1] (differences to [−1, 1]); NaN, never a clipped bound, where a class (or label) has
    fewer than two images on a side.
    """
    labels = np.asarray(labels).reshape(len(labels), -1)
    z = stats.norm.ppf(0.5 + confidence / 2)
    values, components = [], []
    for seeds in runs:
        # a run's AUC is the mean over seeds of the mean over classes: one mean of its (seed, class) AUCs
        aucs, psis = [], []
        for scores in seeds:
            for positive, score in _auc_problems(task, labels, np.asarray(scores, dtype=np.float64)):
                a, p = delong_components(positive, score)
                aucs.append(a)
                psis.append(p)
        values.append(float(np.mean(aucs)))
        components.append(np.mean(psis, axis=0))  # images: ψ of the run's mean AUC

    def interval(value: float, psi: np.ndarray, lowest: float) -> tuple[float, float]:
        half = z * math.sqrt(float(psi @ psi))  # NaN where a class has fewer than two images on a side
        return clipped(value - half, value + half, lowest, 1.0)

    out = [interval(values[0], components[0], 0.0)]
    for value, psi in zip(values[1:], components[1:]):
        out.append(interval(value, psi, 0.0) + interval(value - values[0], psi - components[0], -1.0))
    return out
