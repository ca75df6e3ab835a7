"""The tables of docs/results/weighting_real3.md from the study's folders (see that page for the commands).

    python docs/results/weighting_real3/summarize.py runs/w3 > tables.md

For each budget (e2, e10): each arm's Δm against the default, against training alone and against equal weighting
(all datasets per step, the same sampling as every weighting arm; where runs/w3/e<N>/vs_equal exists) with their
intervals,
its per-dataset AUC and ACC differences to the default (from the compare.json files the page's compare commands
write into runs/w3/e<N>/vs_default and vs_alone), the spread over seeds of its mean test AUC and ACC (metrics.json
of each seed), its wall time per epoch relative to the default's (summary.json), and its gradient conflicts and
magnitudes (gradient_conflicts.json: the mean cosine of each pair of datasets, the share of measurements with a
negative cosine, each dataset's mean gradient-norm ratio to the mean of the three).

The learning-rate tuning: the arms of TUNED at lr 3e-4 and 3e-3 are folders <arm>_lr3e-4 and <arm>_lr3e-3 beside
<arm> (the recipe's 1e-3). Each arm's learning rate is chosen on validation only (the lowest mean over seeds of the
best mean validation loss, the recipe's early-stopping monitor), never on the test images, and

    python docs/results/weighting_real3/summarize.py runs/w3 --select e2

prints the chosen folders, the default's first, for the tuned comparison's compare command.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from statistics import mean, stdev

import yaml

from mmpt.io import markdown_table
from mmpt.runs.members import seed_folders

DATASETS = ("pneumoniamnist", "retinamnist", "breastmnist")  # medmnist's order
SHORT = {f: f.removesuffix("mnist") for f in DATASETS}
# the static arms and the two best methods at 2 epochs (Δm over equal weighting)
TUNED = ("default", "equal", "size", "sqrt_size", "rlw", "pcgrad")
LR_SUFFIXES = ("_lr3e-4", "", "_lr3e-3")  # the three learning rates' folders, the recipe's 1e-3 unsuffixed


def _folder(arm: Path) -> Path:
    """An arm's folder of seeds (training alone: its individual/ folder)."""
    return arm / "individual" if (arm / "individual").is_dir() else arm


def _seeds(arm: Path) -> list[Path]:
    """The finished seed folders of an arm (training alone: each seed's folder of one run per dataset)."""
    folder = _folder(arm)
    if not folder.is_dir():
        return []
    return [
        p
        for p in seed_folders(folder)
        if (p / "summary.json").is_file() or all((p / f / "summary.json").is_file() for f in DATASETS)
    ]


def _per_epoch(seed: Path) -> float:
    """A seed's training wall time per epoch (training alone: the sum over its datasets' runs)."""
    runs = [seed] if (seed / "summary.json").is_file() else [seed / f for f in DATASETS]
    total = 0.0
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        total += summary["wall_time_s"] / summary["epochs"]
    return total


def _interval(low, high) -> str:
    if low is None or high is None or (isinstance(low, float) and math.isnan(low)):
        return ""
    return f" [{low:+.2f}, {high:+.2f}]"


def _runs(result: dict) -> dict[str, dict]:
    """Arm name -> its entry of a compare.json (training alone: named after the folder above individual/)."""
    return {
        (Path(r["path"]).parent if Path(r["path"]).name == "individual" else Path(r["path"])).name: r
        for r in result["runs"]
    }


def delta_table(budget: Path) -> str:
    """Arm, Δm vs the default and vs training alone (with intervals), per-dataset AUC and ACC differences to the
    default (with intervals), seed spread."""
    vs_default = _runs(json.loads((budget / "vs_default" / "compare.json").read_text()))
    vs_alone = _runs(json.loads((budget / "vs_alone" / "compare.json").read_text()))
    equal_file = budget / "vs_equal" / "compare.json"
    vs_equal = _runs(json.loads(equal_file.read_text())) if equal_file.is_file() else {}
    header = ["arm", "Δm vs default (%)", "Δm vs alone (%)", "Δm vs equal (%)"]
    header += [f"Δ{m.upper()} {SHORT[f]}" for m in ("auc", "acc") for f in DATASETS]
    header += ["mean AUC ± sd (seeds)", "mean ACC ± sd (seeds)"]
    rows = []
    for arm, r in vs_alone.items():
        d = vs_default.get(arm)
        row = [arm]
        if d is None or arm == "default":
            row.append("0 (reference)" if arm == "default" else "-")
        else:
            row.append(_delta(d))
        if arm == "indiv":
            row.append("0 (reference)")
        else:
            row.append(_delta(r))
        e = vs_equal.get(arm)
        if arm == "equal":
            row.append("0 (reference)")
        elif e is None:
            row.append("-")
        else:
            row.append(_delta(e))
        row += _differences(d)
        row += seed_spread(budget / arm)
        rows.append(row)
    return markdown_table(header, rows)


def _interval3(low, high) -> str:
    if low is None or high is None:
        return ""
    return f" [{low:+.3f}, {high:+.3f}]"


def seed_spread(arm: Path) -> list[str]:
    """Mean ± standard deviation over seeds of each seed's mean test AUC and ACC (an individual folder: the mean
    over its datasets' runs)."""
    out = []
    for metric in ("auc", "acc"):
        values = []
        for seed in _seeds(arm):
            if (seed / "metrics.json").is_file():
                values.append(json.loads((seed / "metrics.json").read_text())["mean"][metric])
            else:  # one run per dataset
                per = [json.loads((seed / f / "metrics.json").read_text())[f][metric] for f in DATASETS]
                values.append(mean(per))
        out.append(f"{mean(values):.3f} ± {stdev(values):.3f}" if len(values) > 1 else "-")
    return out


def _epochs(seeds: list[Path]) -> str:
    """Each seed's best epoch (the checkpoint its test metrics come from) over the epochs it trained, e.g. "1/6":
    early stopping ended it at 6. Training alone: "-" (one run per dataset)."""
    if not all((seed / "summary.json").is_file() for seed in seeds):
        return "-"
    summaries = [json.loads((seed / "summary.json").read_text()) for seed in seeds]
    return ", ".join(f"{s['best_epoch']}/{s['epochs']}" for s in summaries)


def cost_and_conflict_table(budget: Path, arms: list[str]) -> str:
    """Arm, wall time per epoch (s, mean over seeds) and relative to the default, each seed's best and last epoch,
    the gradient path, the mean cosine of each pair, the share of negative cosines, each dataset's mean
    gradient-norm ratio."""
    pairs = [(a, b) for i, a in enumerate(DATASETS) for b in DATASETS[i + 1 :]]
    per_epoch = {arm: mean(_per_epoch(s) for s in _seeds(budget / arm)) for arm in arms if _seeds(budget / arm)}
    base = per_epoch.get("default")
    header = ["arm", "s / epoch", "× default", "best / last epoch (seeds)", "Jacobian"]
    header += [f"cos {SHORT[a]}~{SHORT[b]}" for a, b in pairs] + ["cos < 0"]
    header += [f"‖g‖ ratio {SHORT[f]}" for f in DATASETS]
    rows = []
    for arm in arms:
        seeds = _seeds(budget / arm)
        if not seeds:
            continue
        first = seeds[0] / "summary.json"
        summary = json.loads(first.read_text()) if first.is_file() else {}
        cos = {p: [] for p in pairs}
        ratios = {f: [] for f in DATASETS}
        negative, count = 0, 0
        for seed in seeds:
            path = seed / "gradient_conflicts.json"
            if not path.is_file():
                continue
            record = json.loads(path.read_text())
            order = record["datasets"]
            for m in record["measurements"]:
                for a, b in pairs:
                    value = m["cosine"][order.index(a)][order.index(b)]
                    if value is not None and not math.isnan(value):
                        cos[(a, b)].append(value)
                        negative += value < 0
                        count += 1
                for f in DATASETS:
                    ratio = m.get("grad_norm_ratio", {}).get(f)
                    if ratio is not None and not math.isnan(ratio):
                        ratios[f].append(ratio)
        row = [arm, f"{per_epoch[arm]:.0f}", f"{per_epoch[arm] / base:.2f}" if base else "-"]
        row.append(_epochs(seeds))
        row.append(summary.get("jacobian") or "-")
        row += [f"{mean(cos[p]):+.3f}" if cos[p] else "-" for p in pairs]
        row.append(f"{negative / count:.0%}" if count else "-")
        row += [f"{mean(ratios[f]):.2f}" if ratios[f] else "-" for f in DATASETS]
        rows.append(row)
    return markdown_table(header, rows)


def _lr(seed: Path) -> float:
    return yaml.safe_load((seed / "config.yaml").read_text())["optim"]["lr"]


def _val_losses(arm: Path) -> list[float]:
    """Each finished seed's best mean validation loss (the monitor early stopping and the best checkpoint use)."""
    out = []
    for seed in _seeds(arm):
        summary = json.loads((seed / "summary.json").read_text())
        if summary["monitor"] != "val_loss":
            raise SystemExit(f"error: {seed} monitors {summary['monitor']}, not val_loss; the tuning compares val_loss")
        out.append(summary["best_metric"])
    return out


def selection(budget: Path) -> dict[str, str]:
    """Arm -> the folder name of its chosen learning rate, for each arm of TUNED whose three learning rates have
    finished every seed (3 each): the lowest mean best validation loss."""
    chosen = {}
    for arm in TUNED:
        folders = [budget / f"{arm}{suffix}" for suffix in LR_SUFFIXES]
        if not all(len(_seeds(f)) == 3 for f in folders):
            continue
        chosen[arm] = min(folders, key=lambda f: mean(_val_losses(f))).name
    return chosen


def tuning_table(budget: Path) -> str:
    """Arm, learning rate, best mean validation loss ± sd over seeds, the seeds' best epochs, mean test AUC and ACC
    ± sd (seeds), and which learning rate validation chose."""
    chosen = selection(budget)
    header = ["arm", "lr", "val loss ± sd (seeds)", "best epochs", "mean AUC ± sd (seeds)", "mean ACC ± sd (seeds)"]
    header.append("chosen on val")
    rows = []
    for arm in TUNED:
        for suffix in LR_SUFFIXES:
            folder = budget / f"{arm}{suffix}"
            seeds = _seeds(folder)
            if not seeds:
                continue
            losses = _val_losses(folder)
            epochs = [json.loads((s / "summary.json").read_text())["best_epoch"] for s in seeds]
            spread = f"{mean(losses):.4f} ± {stdev(losses):.4f}" if len(losses) > 1 else f"{losses[0]:.4f}"
            row = [arm, f"{_lr(seeds[0]):g}", spread, ", ".join(map(str, epochs)), *seed_spread(folder)]
            row.append("**yes**" if chosen.get(arm) == folder.name else ("" if arm in chosen else "(unfinished)"))
            rows.append(row)
    return markdown_table(header, rows)


def tuned_table(budget: Path) -> str:
    """Each tuned arm at its chosen learning rate: Δm against the tuned default and against tuned equal weighting
    (budget/tuned_vs_default, tuned_vs_equal), per-dataset AUC and ACC differences to the tuned default."""
    chosen = selection(budget)
    by_folder = {folder: arm for arm, folder in chosen.items()}
    vs_default = _runs(json.loads((budget / "tuned_vs_default" / "compare.json").read_text()))
    equal_file = budget / "tuned_vs_equal" / "compare.json"
    vs_equal = _runs(json.loads(equal_file.read_text())) if equal_file.is_file() else {}
    header = ["arm (tuned)", "lr", "Δm vs tuned default (%)", "Δm vs tuned equal (%)"]
    header += [f"Δ{m.upper()} {SHORT[f]}" for m in ("auc", "acc") for f in DATASETS]
    rows = []
    for folder, d in vs_default.items():
        if folder not in by_folder:
            raise SystemExit(f"error: {budget}/tuned_vs_default compares {folder}, which validation did not choose")
        row = [by_folder[folder], f"{_lr(_seeds(budget / folder)[0]):g}"]
        row.append("0 (reference)" if by_folder[folder] == "default" else _delta(d))
        e = vs_equal.get(folder)
        row.append("0 (reference)" if by_folder[folder] == "equal" else (_delta(e) if e else "-"))
        row += _differences(d)
        rows.append(row)
    return markdown_table(header, rows)


def _differences(entry: dict | None) -> list[str]:
    """An arm's per-dataset AUC and ACC differences to the reference of its compare.json, with their intervals."""
    out = []
    for m in ("auc", "acc"):
        for f in DATASETS:
            cell = (entry or {}).get("datasets", {}).get(f, {}).get(m)
            if cell is None or "diff" not in cell:
                out.append("-")
            else:
                out.append(f"{cell['diff']:+.3f}{_interval3(cell.get('diff_ci_low'), cell.get('diff_ci_high'))}")
    return out


def _delta(entry: dict) -> str:
    return f"{entry['delta_m']:+.2f}{_interval(entry.get('delta_m_ci_low'), entry.get('delta_m_ci_high'))}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the study's folder (runs/w3)")
    parser.add_argument("--select", metavar="eN", help="print the folders validation chose in budget eN and exit")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.select:
        chosen = selection(root / args.select)
        if "default" not in chosen:
            raise SystemExit(f"error: {root / args.select}: the default's three learning rates have not all finished")
        print(" ".join(str(root / args.select / f) for f in chosen.values()))
        return
    for budget in sorted(root.glob("e*"), key=lambda p: int(p.name[1:])):
        if not (budget / "vs_alone" / "compare.json").is_file():
            continue
        compared = _runs(json.loads((budget / "vs_alone" / "compare.json").read_text()))
        base = [p.name for p in sorted(budget.iterdir()) if p.name in compared]
        print(f"## {budget.name.removeprefix('e')} epochs\n")
        print(delta_table(budget) + "\n")
        print(cost_and_conflict_table(budget, base) + "\n")
        if any(_seeds(p) for p in budget.glob("*_lr*")):
            print(f"### Learning rates, {budget.name.removeprefix('e')} epochs\n")
            print(tuning_table(budget) + "\n")
        if (budget / "tuned_vs_default" / "compare.json").is_file():
            print(tuned_table(budget) + "\n")


if __name__ == "__main__":
    main()
