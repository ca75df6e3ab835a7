"""Series of runs with one recipe: individual baselines, sweeps over config keys, repeats over seeds.

Layout under the series folder (the config's run folder, runs/<name>/), each part present only when asked for:

    [individual/] [<variant>/] [seed<k>/] [<dataset>/]      e.g. runs/q/individual/seed1/breastmnist/

A series is resumable: a run with summary.json is finished and skipped, one with checkpoints/last.pt
continues from it exactly (as `train.py --resume` does), the others start. At the end `summarize` writes
sweep.{md,csv,json,png} into the series folder.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from mmpt.config import Config, deep_merge, from_dict, to_dict
from mmpt.errors import MmptError
from mmpt.report import COLUMNS
from mmpt.tasks import FLAGS

SEED_DIR = re.compile(r"seed(\d+)")
SUMMARY_METRICS = ("auc", "acc", "balanced_acc", "kappa", "qwk", "mae")
# folders inside a series that hold no runs of it
NOT_RUNS = ("checkpoints", "tb", "predictions", "eval", "features")


@dataclass(frozen=True)
class Variant:
    """One run of a series: its folder relative to the series folder, and its resolved config."""

    path: str
    cfg: Config


def parse_sweep(text: str) -> tuple[str, list]:
    """`KEY=V1,V2[,...]` -> (KEY, [V1, V2, ...]), each value read as YAML (so 1e-3, true, none work)."""
    key, sep, raw = text.partition("=")
    values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
    if not sep or not key.strip() or not values:
        raise MmptError(f"--sweep expects KEY=V1,V2 (e.g. loss.weighting=none,size), got '{text}'")
    return key.strip(), values


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` -> [0, 1, 2]; anything else is an MmptError."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise MmptError(f"--seeds expects distinct non-negative integers such as 0,1,2, got '{text}'")
    return seeds


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def variant_name(assignments: tuple[tuple[str, object], ...]) -> str:
    """A readable folder name for one grid point, e.g. `lr-0.001_weighting-size`."""
    return "_".join(f"{_slug(key.split('.')[-1])}-{_slug(str(value))}" for key, value in assignments)


def _init_source(init_from: str | None, seed: int | None) -> str | None:
    """With seeds, a series folder to initialise from gives each seed its own seed<k> run when it has one."""
    if init_from is None or seed is None:
        return init_from
    seeded = Path(init_from) / f"seed{seed}"
    return str(seeded) if seeded.is_dir() else init_from


def plan_series(
    cfg: Config,
    *,
    individual: bool = False,
    sweeps: list[tuple[str, list]] = (),
    seeds: list[int] | None = None,
) -> list[Variant]:
    """Every run of the series, in the order they train; each config validated before anything runs.

    Raises MmptError naming a sweep key or value the config does not accept.
    """
    root = cfg.run_dir
    base = to_dict(cfg)
    keys = [key for key, _ in sweeps]
    if len(set(keys)) != len(keys):
        raise MmptError(f"--sweep names a key twice ({', '.join(keys)}); give each key once with all its values")
    grid = list(itertools.product(*[[(key, value) for value in values] for key, values in sweeps]))
    variants = []
    for assignments in grid:
        for seed in seeds or [None]:
            for flag in cfg.data.datasets if individual else [None]:
                parts = (["individual"] if individual else []) + ([variant_name(assignments)] if assignments else [])
                parts += ([f"seed{seed}"] if seed is not None else []) + ([flag] if flag else [])
                raw = base
                for key, value in assignments:
                    raw = _set(raw, key, value)
                raw = deep_merge(raw, {
                    "name": _slug("-".join([cfg.name, *parts])),
                    "output": str(root.joinpath(*parts)),
                    "model": {"init_from": _init_source(cfg.model.init_from, seed)},
                })
                if seed is not None:
                    raw = deep_merge(raw, {"train": {"seed": seed}})
                if flag is not None:
                    raw = deep_merge(raw, {"data": {"datasets": [flag]}})
                try:
                    variants.append(Variant("/".join(parts), from_dict(raw)))
                except MmptError as exc:
                    where = f" (--sweep {', '.join(f'{k}={v}' for k, v in assignments)})" if assignments else ""
                    raise MmptError(f"{exc}{where}") from None
    return variants


def _set(raw: dict, key: str, value) -> dict:
    """`raw` with the dotted `key` set to `value` (a YAML-parsed sweep value)."""
    node: dict = {}
    cursor = node
    parts = key.split(".")
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return deep_merge(raw, node)


def run_series(variants: list[Variant], *, overwrite: bool = False) -> None:
    """Train every variant in turn, skipping finished runs and continuing interrupted ones.

    Raises mmpt.train.Stopped when a run was stopped by SIGINT/SIGTERM (its last.pt written).
    """
    from mmpt.train import run

    for i, variant in enumerate(variants, 1):
        run_dir = variant.cfg.run_dir
        label = variant.path or str(run_dir)
        if not overwrite and (run_dir / "summary.json").is_file():
            print(f"[{i}/{len(variants)}] {label}: finished, skipped")
            continue
        resume = not overwrite and (run_dir / "checkpoints" / "last.pt").is_file()
        print(f"[{i}/{len(variants)}] {label}" + (": continuing from last.pt" if resume else ""))
        # a folder without last.pt holds only the outputs of a start that never reached a checkpoint
        run(variant.cfg, resume=resume, overwrite=overwrite or not resume)


# ---------------------------------------------------------------- summary of a series


def find_runs(root: Path) -> list[Path]:
    """Finished runs (folders with summary.json and metrics.json) at or under `root`, sorted."""
    root = Path(root)
    found = []
    for summary in sorted(root.rglob("summary.json")):
        folder = summary.parent
        rel = folder.relative_to(root).parts
        if any(part in NOT_RUNS or part.startswith("probe-") for part in rel):
            continue
        if (folder / "metrics.json").is_file():
            found.append(folder)
    return found


def group_runs(root: Path, runs: list[Path]) -> dict[str, dict[int | None, dict[str, dict[str, float]]]]:
    """variant -> seed -> dataset -> metrics; an individual variant joins its single-dataset runs per seed."""
    groups: dict[str, dict] = {}
    for folder in runs:
        parts = list(folder.relative_to(root).parts)
        table = json.loads((folder / "metrics.json").read_text())
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
                raise MmptError(f"{folder} and another run of variant {variant} both report {name}; "
                                "keep one run per dataset and seed")
            per_seed[name] = table[name]
    return groups


def _stats(values: list[float]) -> dict:
    finite = [v for v in values if v is not None]
    mean = float(np.mean(finite)) if finite else math.nan
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return {"mean": mean, "std": std, "values": finite}


def summarize(root: Path, quiet: bool = False) -> dict:
    """Write sweep.{json,csv,md,png} for the finished runs under `root`; return the sweep.json content.

    Per variant: per dataset each metric's mean ± std over seeds, and the mean over datasets (per seed,
    then over seeds). Raises MmptError when `root` holds no finished run.
    """
    from mmpt.metrics import mean_metrics
    from mmpt.plots import plot_grouped_bars
    from mmpt.io import write_json, write_text

    root = Path(root)
    runs = find_runs(root)
    if not runs:
        raise MmptError(f"no finished run (with summary.json) under {root}; train the series first (train.py ... )")
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
        seed_means = [mean_metrics({f: {m: v for m, v in t[f].items() if m in SUMMARY_METRICS} for f in t})
                      for t in per_seed.values()]
        for m in SUMMARY_METRICS:
            if any(m in means for means in seed_means):
                entry["mean"][m] = _stats([means.get(m) for means in seed_means])
        summary[variant] = entry
    write_json(root / "sweep.json", {"variants": summary})
    _write_sweep_csv(root / "sweep.csv", summary)
    markdown = format_sweep(summary)
    write_text(root / "sweep.md", markdown)
    bars = {
        variant: {f: _interval(s["auc"]) for f, s in entry["datasets"].items() if "auc" in s}
        for variant, entry in summary.items()
    }
    plot_grouped_bars(bars, root / "sweep.png", "test AUC (mean ± std over seeds)", f"{root.name}: AUC by variant")
    if not quiet:
        print(markdown)
        print(f"written: {root / 'sweep.md'}, sweep.csv, sweep.json, sweep.png")
    return {"variants": summary}


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
        columns = [c for c in COLUMNS if c in SUMMARY_METRICS and (
            c in entry["mean"] or any(c in s for s in entry["datasets"].values()))]
        seeds = ", ".join(map(str, entry["seeds"])) or "one run"
        lines = [f"### {variant} (seeds: {seeds})", "", "| dataset | " + " | ".join(columns) + " |",
                 "|---|" + "---:|" * len(columns)]
        for flag, stats in [*entry["datasets"].items(), ("mean", entry["mean"])]:
            lines.append(f"| {flag} | " + " | ".join(_fmt(stats.get(c)) for c in columns) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _write_sweep_csv(path: Path, summary: dict) -> None:
    from mmpt.io import write_csv

    rows = [["variant", "dataset", "metric", "mean", "std", "seeds", "values"]]
    for variant, entry in summary.items():
        for flag, stats in [*entry["datasets"].items(), ("mean", entry["mean"])]:
            for metric, s in stats.items():
                rows.append([variant, flag, metric, s["mean"], "" if s["std"] is None else s["std"],
                             len(s["values"]), " ".join(f"{v:.6g}" for v in s["values"])])
    write_csv(path, rows)
