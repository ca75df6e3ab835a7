"""Compare benchmark: `evaluate.py compare` of two seed series over MedMNIST+'s test sets, its bootstrap against the
per-resample loop.

    python -m benchmarks compare [--resamples 1000] [--old-resamples 20] [--jobs 1] [--json PATH]

Writes, in a work folder, what `compare` reads: one npz of test labels per dataset (random, every class
present) and two folders of 3 seeds (seed<k>/predictions/, the engine's own prediction writer), random
scores at the real test sizes of all 12 datasets (medmnist.INFO). Then times `compare_runs` whole (every file
read, every metric, both sides, Δm's interval) at --resamples, and Δm's resampling alone; and the per-dataset
intervals of every run two ways on the same scores: the package's vectorised bootstrap (one resampling per dataset,
every run on it) at --resamples, and the per-resample loop (benchmarks/baselines.py, the baseline) at
--old-resamples, extrapolated linearly to --resamples (its cost is one loop turn per resample). Both run once on
the same --old-resamples draws and their largest interval difference is reported.

A benchmark, not a test: the figures are printed beside their baseline (the loop) and written to --json, never
asserted.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed

from benchmarks.baselines import loop_intervals
from benchmarks.common import machine, work_folder, write_result
from mmpt.analysis.compare import compare_runs
from mmpt.analysis.delta_m import delta_m_bootstrap
from mmpt.analysis.inputs import load_run, read_labels, read_scores
from mmpt.analysis.stats import bootstrap_dataset
from mmpt.errors import MmptError
from mmpt.evaluation.predict import TaskResult, write_predictions
from mmpt.io import markdown_table
from mmpt.runs.rundir import Results
from mmpt.tasks import BINARY, MULTI_LABEL, TASKS, resolve_tasks

METRICS = ("auc", "acc")


def write_series(root: Path, flags: list[str], seeds: int, max_images: int | None, seed: int = 0) -> list[Path]:
    """Write test labels under root/data and two series root/{a,b}/seed<k>/predictions; return the series folders.

    Labels and scores are random (a fixed seed); each dataset has its real test size, or `max_images`.
    """
    rng = np.random.default_rng(seed)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    labels = {}
    for flag in flags:
        task = TASKS[flag]
        n = task.split_size("test") if max_images is None else min(max_images, task.split_size("test"))
        if task.task_type == MULTI_LABEL:
            y = (rng.random((n, task.num_classes)) < 0.2).astype(np.int64)
        else:
            y = rng.integers(0, task.num_classes, (n, 1))
            y[: task.num_classes, 0] = np.arange(min(n, task.num_classes))  # every class present
        labels[flag] = y
        np.savez(data / task.filename(28), test_labels=y)
    series = []
    for side in ("a", "b"):
        for k in range(seeds):
            results = {}
            for flag, y in labels.items():
                task = TASKS[flag]
                width = 2 if task.task_type == BINARY else task.num_classes
                scores = rng.random((len(y), width))
                if task.task_type != MULTI_LABEL:
                    scores /= scores.sum(axis=1, keepdims=True)  # class probabilities, as the heads give them
                results[flag] = TaskResult(y, scores, {"auc": math.nan, "acc": math.nan})
            predictions = Results(root / side / f"seed{k}").predictions
            write_predictions(predictions, results, 28, "test", f"{side}{k}", data_root=str(data))
        series.append(root / side)
    return series


def run_compare_benchmark(
    *,
    datasets: str = "all",
    seeds: int = 3,
    resamples: int = 1000,
    old_resamples: int = 20,
    jobs: int = 1,
    max_images: int | None = None,
    workdir: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict:
    """Time compare, Δm's interval, and the per-dataset intervals vectorised and by the loop (extrapolated)."""
    if resamples < 1 or old_resamples < 0 or seeds < 1:
        raise MmptError("--resamples and --seeds must be at least 1, --old-resamples at least 0")
    if max_images is not None and max_images < 16:
        raise MmptError(f"--max-images must be at least 16 (every class present), got {max_images}")
    flags = [t.flag for t in resolve_tasks(datasets)]
    result = {
        "machine": machine(),
        "datasets": flags,
        "seeds_per_side": seeds,
        "resamples": resamples,
        "metrics": list(METRICS),
        "jobs": jobs,
        "max_images": max_images,
        "test_images": {
            f: (TASKS[f].split_size("test") if max_images is None else min(max_images, TASKS[f].split_size("test")))
            for f in flags
        },
    }
    with work_folder(workdir, "mmpt-bench-compare-") as work:
        log(f"writing labels and 2 × {seeds} prediction folders of {len(flags)} datasets in {work}")
        series = write_series(work, flags, seeds, max_images)

        start = time.perf_counter()
        compare_runs(series, metrics=METRICS, n_resamples=resamples, seed=0, jobs=jobs)
        result["compare_s"] = time.perf_counter() - start
        log(f"compare, {resamples} resamples: {result['compare_s']:.1f} s")
        labels, models = _inputs(series, flags)
        log("of which Δm's interval (a second resampling of every dataset) ...")
        start = time.perf_counter()
        delta_m_bootstrap(labels, models, {f: list(METRICS) for f in flags}, n_resamples=resamples, seed=0, jobs=jobs)
        result["delta_m_s"] = time.perf_counter() - start
        log(f"  {result['delta_m_s']:.1f} s")
        log(f"the per-dataset intervals, vectorised, {resamples} resamples ...")
        result["new_s"], _ = _vectorised(labels, models, resamples, jobs)
        log(f"  {result['new_s']:.1f} s")
        if old_resamples:
            log(f"the per-dataset intervals, loop, {old_resamples} resamples (extrapolated to {resamples}) ...")
            start = time.perf_counter()
            old = loop_intervals(labels, models, list(METRICS), n_resamples=old_resamples, seed=0, jobs=jobs)
            old_s = time.perf_counter() - start
            _, new = _vectorised(labels, models, old_resamples, jobs)
            result["old_measured_s"] = old_s
            result["old_measured_resamples"] = old_resamples
            result["old_s"] = old_s * resamples / old_resamples
            result["old_extrapolated"] = old_resamples != resamples
            result["ratio"] = result["old_s"] / result["new_s"]
            result["max_interval_difference"] = float(
                max(np.nanmax(np.abs(np.asarray(old[key]) - np.asarray(new[key]))) for key in old)
            )
            log(f"  {old_s:.1f} s measured, {result['old_s']:.0f} s extrapolated")
    result["load_avg_at_end"] = os.getloadavg()
    return result


def _inputs(series: list[Path], flags: list[str]) -> tuple[dict, dict]:
    """What compare reads of the series: each dataset's test labels, and per run its seeds' scores and grade rule."""
    runs = [load_run(path) for path in series]
    labels = {f: read_labels(runs[0].seeds[0][f], f) for f in flags}
    models = {f: [([read_scores(member[f]) for member in run.seeds], "argmax") for run in runs] for f in flags}
    return labels, models


def _vectorised(labels: dict, models: dict, resamples: int, jobs: int) -> tuple[float, dict]:
    """Seconds of the package's per-dataset intervals of every run, and the intervals per (run index, dataset)."""
    start = time.perf_counter()
    found = Parallel(n_jobs=jobs)(
        delayed(bootstrap_dataset)(TASKS[f], labels[f], models[f], list(METRICS), n_resamples=resamples, seed=0)
        for f in models
    )
    seconds = time.perf_counter() - start
    return seconds, {(i, f): per_run[i] for f, per_run in zip(models, found) for i in range(len(per_run))}


def format_table(result: dict) -> str:
    """The figures as a Markdown table: the vectorised path, the loop beside it, and how the loop's was obtained."""
    rows = [
        ["part", "wall s", "note"],
        ["compare, whole", f"{result['compare_s']:.1f}", f"{result['resamples']} resamples"],
        ["Δm's interval", f"{result['delta_m_s']:.1f}", f"{result['delta_m_s'] / result['compare_s']:.0%} of compare"],
        ["per-dataset intervals, vectorised", f"{result['new_s']:.1f}", f"{result['resamples']} resamples"],
    ]
    if "old_s" in result:
        note = (
            f"extrapolated linearly from {result['old_measured_resamples']} resamples "
            f"({result['old_measured_s']:.1f} s)"
            if result["old_extrapolated"]
            else "measured"
        )
        rows.append(["per-dataset intervals, per-resample loop (baseline)", f"{result['old_s']:.0f}", note])
        rows.append(["ratio", f"{result['ratio']:.0f}×", "loop / vectorised"])
    sizes = "full test sizes" if result["max_images"] is None else f"at most {result['max_images']} images"
    lines = [
        f"compare of 2 × {result['seeds_per_side']} seeds, {len(result['datasets'])} datasets, "
        f"metrics {','.join(result['metrics'])}, jobs {result['jobs']}, {sizes}; "
        f"load average {result['machine']['load_avg_at_start'][0]:.1f} at start, "
        f"{result['load_avg_at_end'][0]:.1f} at end",
        "",
        markdown_table(rows[0], rows[1:]),
        "",
    ]
    if "max_interval_difference" in result:
        lines.append(
            f"largest interval difference, both paths on the same {result['old_measured_resamples']} "
            f"resamples: {result['max_interval_difference']:.1e}"
        )
    return "\n".join(lines)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `compare` command to `python -m benchmarks`."""
    p = commands.add_parser("compare", help="evaluate.py compare: vectorised bootstrap against the per-resample loop")
    p.add_argument("--datasets", default="all", help="comma-separated datasets (default all 12)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per side (default 3)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument(
        "--old-resamples",
        type=int,
        default=20,
        help="resamples the loop is timed at, extrapolated to --resamples (default 20; 0 skips it)",
    )
    p.add_argument("--jobs", type=int, default=1, help="compare's --jobs (default 1; 2 uses both cores of 2)")
    p.add_argument("--max-images", type=int, help="cap each test set at this many images (default: full size)")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--workdir", help="folder for the prediction files (kept); default a temporary one (deleted)")


def run_command(args: argparse.Namespace) -> int:
    """Run the benchmark (table on stdout, progress on stderr); return the exit code. Raises MmptError."""
    result = run_compare_benchmark(
        datasets=args.datasets,
        seeds=args.seeds,
        resamples=args.resamples,
        old_resamples=args.old_resamples,
        jobs=args.jobs,
        max_images=args.max_images,
        workdir=args.workdir,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(format_table(result))
    if args.json:
        write_result(args.json, result)
    return 0
