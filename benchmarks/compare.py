"""Compare benchmark: `evaluate.py compare` of two seed series over MedMNIST+'s test sets, vectorised against the loop.

    python -m benchmarks compare [--resamples 1000] [--old-resamples 20] [--jobs 1] [--json PATH]

Writes, in a work folder, what `compare` reads: one npz of test labels per dataset (random, every class
present) and two folders of 3 seeds (seed<k>/predictions/, the engine's own prediction writer), random
scores at the real test sizes of all 12 datasets (medmnist.INFO). Then times `compare_runs` (every file
read, every metric, both sides) with the vectorised bootstrap at --resamples, and the per-resample loop (the
baseline) at --old-resamples, extrapolated linearly to --resamples (its cost is one loop turn per resample; the
file reading it also scales is a second or so, so the estimate errs high by that). Both paths run once on
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

from benchmarks.common import machine, markdown_table, work_folder, write_result
from mmpt.analysis.compare import compare_runs, load_run, read_labels, read_scores
from mmpt.analysis.delta_m import delta_m_bootstrap
from mmpt.errors import MmptError
from mmpt.evaluation.predict import TaskResult, write_predictions
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
    """Time compare's vectorised path and its per-resample loop (extrapolated); return the figures."""
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

        def timed(resampling: str, n: int) -> tuple[float, dict]:
            start = time.perf_counter()
            out = compare_runs(series, metrics=METRICS, n_resamples=n, seed=0, jobs=jobs, resampling=resampling)
            return time.perf_counter() - start, out

        log(f"vectorised, {resamples} resamples ...")
        result["new_s"], _ = timed("vectorised", resamples)
        log(f"  {result['new_s']:.1f} s")
        log("of which Δm's interval (a second resampling of every dataset) ...")
        result["delta_m_s"] = _time_delta_m_interval(series, flags, resamples, jobs)
        log(f"  {result['delta_m_s']:.1f} s")
        if old_resamples:
            log(f"loop, {old_resamples} resamples (extrapolated to {resamples}) ...")
            old_s, old = timed("loop", old_resamples)
            _, new = timed("vectorised", old_resamples)
            result["old_measured_s"] = old_s
            result["old_measured_resamples"] = old_resamples
            result["old_s"] = old_s * resamples / old_resamples
            result["old_extrapolated"] = old_resamples != resamples
            result["ratio"] = result["old_s"] / result["new_s"]
            result["max_interval_difference"] = max(
                abs(a[k] - b[k])
                for ra, rb in zip(old["runs"], new["runs"])
                for f in ra["datasets"]
                for m in ra["datasets"][f]
                for a, b in [(ra["datasets"][f][m], rb["datasets"][f][m])]
                for k in ("ci_low", "ci_high", "diff_ci_low", "diff_ci_high")
                if k in a
            )
            log(f"  {old_s:.1f} s measured, {result['old_s']:.0f} s extrapolated")
    result["load_avg_at_end"] = os.getloadavg()
    return result


def _time_delta_m_interval(series: list[Path], flags: list[str], resamples: int, jobs: int) -> float:
    """Seconds of Δm's resampling alone, on the files compare reads (read before the clock starts)."""
    runs = [load_run(path) for path in series]
    labels = {f: read_labels(runs[0].seeds[0][f], f) for f in flags}
    models = {f: [([read_scores(member[f]) for member in run.seeds], "argmax") for run in runs] for f in flags}
    present = {f: list(METRICS) for f in flags}
    start = time.perf_counter()
    delta_m_bootstrap(labels, models, present, n_resamples=resamples, seed=0, jobs=jobs)
    return time.perf_counter() - start


def format_table(result: dict) -> str:
    """The figures as a Markdown table: the vectorised path, the loop beside it, and how the loop's was obtained."""
    rows = [["path", "wall s", "note"], ["vectorised", f"{result['new_s']:.1f}", f"{result['resamples']} resamples"]]
    if "delta_m_s" in result:
        share = f"{result['delta_m_s'] / result['new_s']:.0%} of the vectorised compare"
        rows.append(["of which Δm's interval", f"{result['delta_m_s']:.1f}", share])
    if "old_s" in result:
        note = (
            f"extrapolated linearly from {result['old_measured_resamples']} resamples "
            f"({result['old_measured_s']:.1f} s)"
            if result["old_extrapolated"]
            else "measured"
        )
        rows.append(["per-resample loop (baseline)", f"{result['old_s']:.0f}", note])
        rows.append(["ratio", f"{result['ratio']:.0f}×", "loop / vectorised"])
    sizes = "full test sizes" if result["max_images"] is None else f"at most {result['max_images']} images"
    lines = [
        f"compare of 2 × {result['seeds_per_side']} seeds, {len(result['datasets'])} datasets, "
        f"metrics {','.join(result['metrics'])}, jobs {result['jobs']}, {sizes}; "
        f"load average {result['machine']['load_avg_at_start'][0]:.1f} at start, "
        f"{result['load_avg_at_end'][0]:.1f} at end",
        "",
        markdown_table(rows),
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
