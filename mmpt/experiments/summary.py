"""The summary of a series: sweep.{json,csv,md,png} over the finished runs of a series folder.

Written at the end of a series (sequential, or the launcher's), and on demand by `evaluate.py summarize`. Only
runs that `series_runs` counts enter (finished, and trained with the recipe series.json records for them); the
others are named and left out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mmpt.errors import MmptError
from mmpt.evaluation.metrics import mean_metrics
from mmpt.evaluation.plots import plot_grouped_bars
from mmpt.evaluation.tables import COLUMNS
from mmpt.io import markdown_table, write_csv, write_json, write_text
from mmpt.runs.members import SEED_DIR, left_out_error, left_out_line, series_runs
from mmpt.runs.rundir import RunDir
from mmpt.runs.seriesdir import SeriesDir
from mmpt.tasks import FLAGS

SUMMARY_METRICS = ("auc", "acc", "balanced_acc", "kappa", "qwk", "mae")


def group_runs(root: Path, runs: list[Path]) -> dict[str, dict[int | None, dict[str, dict[str, float]]]]:
    """variant -> seed -> dataset -> metrics; an individual variant joins its single-dataset runs per seed."""
    groups: dict[str, dict] = {}
    for folder in runs:
        parts = list(folder.relative_to(root).parts)
        table = json.loads(RunDir(folder).results.metrics.read_text())
        datasets = [name for name in table if name != "mean"]
        if parts and parts[-1] in FLAGS and datasets == [parts[-1]]:
            parts.pop()
        seed = None
        if parts and SEED_DIR.fullmatch(parts[-1]):
            seed = int(SEED_DIR.fullmatch(parts.pop()).group(1))
        variant = "/".join(parts) or root.name
        per_seed = groups.setdefault(variant, {}).setdefault(seed, {})
        for name in datasets:
            if name in per_seed:
                raise MmptError(
                    f"{folder} and another run of variant {variant} both report {name}; "
                    "keep one run per dataset and seed"
                )
            per_seed[name] = table[name]
    return groups


def _stats(values: list[float]) -> dict:
    finite = [v for v in values if v is not None]
    mean = float(np.mean(finite)) if finite else math.nan
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return {"mean": mean, "std": std, "values": finite}


def summarize(root: Path, quiet: bool = False, require_complete: bool = False) -> dict:
    """Write sweep.{json,csv,md,png} for the finished runs under `root`; return the sweep.json content.

    Per variant: per dataset each metric's mean ± std over seeds, and the mean over datasets (per seed,
    then over seeds). Only runs that `series_runs` counts enter; the others are named (sweep.json's
    "left_out", a line of sweep.md). Raises MmptError when `root` holds no finished run, or with
    `require_complete` when a run is left out.
    """
    root = Path(root)
    if not root.is_dir():
        raise MmptError(f"series folder {root} not found; pass the folder a series command wrote (runs/<name>)")
    run = RunDir(root)
    if (run.is_run() or run.config.is_file()) and not SeriesDir(root).record.is_file():
        raise MmptError(
            f"{root} is a single run, not a series: its test metrics are {run.results.metrics_files[2].name} "
            "there; summarize the folder a series command wrote (--seeds, --sweep, --individual), or compare "
            "runs with evaluate.py compare"
        )
    runs, left_out = series_runs(root)
    if left_out and require_complete:
        raise left_out_error(left_out, f"the series in {root} is not complete")
    if not runs:
        raise MmptError(
            f"no finished run (with summary.json) under {root}"
            + (f" ({left_out_line(left_out, root)})" if left_out else "")
            + "; train the series first (train.py ... )"
        )
    groups = group_runs(root, runs)
    summary = {}
    for variant, per_seed in groups.items():
        datasets = [f for f in FLAGS if any(f in tables for tables in per_seed.values())]
        entry = {"seeds": [s for s in per_seed if s is not None], "datasets": {}, "mean": {}}
        for flag in datasets:
            metrics = [m for m in SUMMARY_METRICS if any(m in t.get(flag, {}) for t in per_seed.values())]
            entry["datasets"][flag] = {
                m: _stats([t[flag].get(m) for t in per_seed.values() if flag in t]) for m in metrics
            }
        seed_means = [
            mean_metrics({f: {m: v for m, v in t[f].items() if m in SUMMARY_METRICS} for f in t})
            for t in per_seed.values()
        ]
        for m in SUMMARY_METRICS:
            if any(m in means for means in seed_means):
                entry["mean"][m] = _stats([means.get(m) for means in seed_means])
        summary[variant] = entry
    skipped = {p.relative_to(root).as_posix() or ".": why for p, why in left_out}
    sweep_json, sweep_csv, sweep_md, sweep_png = SeriesDir(root).sweep_files
    write_json(sweep_json, {"variants": summary, "left_out": skipped})
    _write_sweep_csv(sweep_csv, summary)
    markdown = format_sweep(summary) + (f"\n{left_out_line(left_out, root)}\n" if left_out else "")
    write_text(sweep_md, markdown)
    bars = {
        variant: {f: _interval(s["auc"]) for f, s in entry["datasets"].items() if "auc" in s}
        for variant, entry in summary.items()
    }
    plot_grouped_bars(bars, sweep_png, "test AUC (mean ± std over seeds)", f"{root.name}: AUC by variant")
    if not quiet:
        print(markdown)
        print(f"written: {sweep_md}, {sweep_csv.name}, {sweep_json.name}, {sweep_png.name}")
    return {"variants": summary, "left_out": skipped}


def _interval(stats: dict) -> tuple[float, float, float]:
    spread = stats["std"] or 0.0
    return stats["mean"], stats["mean"] - spread, stats["mean"] + spread


def _fmt(stats: dict | None) -> str:
    if stats is None:
        return "-"
    text = "nan" if math.isnan(stats["mean"]) else f"{stats['mean']:.4f}"
    return text + (f" ± {stats['std']:.4f}" if stats["std"] is not None else "")


def format_sweep(summary: dict) -> str:
    """Markdown: one table per variant, datasets by metrics, `mean ± std` over seeds."""
    blocks = []
    for variant, entry in summary.items():
        columns = [
            c
            for c in COLUMNS
            if c in SUMMARY_METRICS and (c in entry["mean"] or any(c in s for s in entry["datasets"].values()))
        ]
        seeds = ", ".join(map(str, entry["seeds"])) or "one run"
        rows = [
            [flag, *(_fmt(stats.get(c)) for c in columns)]
            for flag, stats in [*entry["datasets"].items(), ("mean", entry["mean"])]
        ]
        blocks.append(f"### {variant} (seeds: {seeds})\n\n" + markdown_table(["dataset", *columns], rows))
    return "\n\n".join(blocks) + "\n"


def _write_sweep_csv(path: Path, summary: dict) -> None:
    rows = [["variant", "dataset", "metric", "mean", "std", "seeds", "values"]]
    for variant, entry in summary.items():
        for flag, stats in [*entry["datasets"].items(), ("mean", entry["mean"])]:
            for metric, s in stats.items():
                rows.append(
                    [
                        variant,
                        flag,
                        metric,
                        s["mean"],
                        "" if s["std"] is None else s["std"],
                        len(s["values"]),
                        " ".join(f"{v:.6g}" for v in s["values"]),
                    ]
                )
    write_csv(path, rows)
