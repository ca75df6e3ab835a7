"""What `evaluate.py compare` writes: the Markdown tables (also printed), compare.{json,csv} and two plots."""

from __future__ import annotations

import math
from pathlib import Path

from mmpt.evaluation.plots import plot_differences, plot_forest, plot_grouped_bars
from mmpt.io import markdown_table, write_csv, write_json, write_text
from mmpt.runs.rundir import Results


def _num(x: float | None, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:+.4f}" if sign else f"{x:.4f}"


def format_compare(result: dict) -> str:
    """Markdown tables, one per metric: each run's value [95% CI] (± std over seeds) and Δ to the reference."""
    runs = result["runs"]
    b = result["bootstrap"]
    lines = [
        f"# Comparison against {result['reference']}",
        "",
        f"Values with {int(b['confidence_level'] * 100)}% bootstrap intervals over test images "
        f"({b['n_resamples']} paired resamples, percentile, seed {b['seed']}); Δ: difference to the "
        "reference with its paired interval; ± std over seeds where a run has several.",
        "",
    ]
    if result.get("auc_interval") == "delong":
        lines[-2] += " AUC intervals: DeLong's (normal, paired for Δ), not the bootstrap."
    if result["left_out"]:
        lines += [f"Datasets not in every run, left out: {', '.join(result['left_out'])}", ""]
    if result.get("unmeasured"):
        lines += [
            f"Datasets none of {', '.join(result['metrics'])} applies to, left out: {', '.join(result['unmeasured'])}",
            "",
        ]
    if result.get("left_out_runs"):
        lines += [
            "Runs left out of the statistics: "
            + "; ".join(f"{folder} ({why})" for folder, why in result["left_out_runs"].items()),
            "",
        ]
    for m in result["metrics"]:
        header = ["dataset"] + [f"{r['name']}" for r in runs] + [f"Δ {r['name']}" for r in runs[1:]]
        rows = []
        for flag in result["datasets"]:
            cells = [flag]
            for r in runs:
                c = r["datasets"][flag].get(m)
                cells.append(
                    "-"
                    if c is None
                    else _num(c["value"])
                    + (f" ± {c['std']:.4f}" if "std" in c else "")
                    + f" [{_num(c['ci_low'])}, {_num(c['ci_high'])}]"
                )
            for r in runs[1:]:
                c = r["datasets"][flag].get(m)
                cells.append(
                    "-"
                    if c is None
                    else f"{_num(c['diff'], True)} [{_num(c['diff_ci_low'], True)}, {_num(c['diff_ci_high'], True)}]"
                )
            rows.append(cells)
        mean = ["**mean**"] + [_num(r["mean"].get(m, {}).get("value")) for r in runs]
        mean += [_num(r["mean"].get(m, {}).get("diff"), True) for r in runs[1:]]
        lines += [f"## {m}", "", markdown_table(header, [*rows, mean]), ""]
    undefined = _undefined_intervals(result)
    if undefined:
        lines += ["## Intervals that cannot be computed (nan above)", ""]
        lines += [f"- {flag} {m}: {why}" for (flag, m), why in undefined.items()] + [""]
    lines += [
        f"## Δm over {', '.join(result['metrics'])} (LibMTL, % relative to the reference)",
        "",
        f"[{int(b['confidence_level'] * 100)}% interval]: the paired bootstrap over the test images of every dataset "
        f"({b['n_resamples']} joint resamples, each dataset resampled on its own, percentile); the spread over "
        "training seeds is not in it.",
        "",
    ]
    for r in runs[1:]:
        why = r.get("delta_m_undefined") or r.get("delta_m_ci_undefined")
        interval = f" [{_num(r.get('delta_m_ci_low'), True)}, {_num(r.get('delta_m_ci_high'), True)}]"
        lines.append(f"- {r['name']}: {_num(r['delta_m'], True)} %{interval}" + (f" ({why})" if why else ""))
    tested = [r for r in runs[1:] if "wilcoxon" in r]
    if tested:
        lines += ["", "## Wilcoxon signed-rank test over datasets (seed means, two-sided)", ""]
        for r in tested:
            for m, t in r["wilcoxon"].items():
                lines.append(
                    f"- {r['name']} {m}: p = {_num(t['p_value'])}, better on {t['better']}, "
                    f"worse on {t['worse']} of {t['datasets']} datasets"
                )
    return "\n".join(lines) + "\n"


def _undefined_intervals(result: dict) -> dict[tuple[str, str], str]:
    """(dataset, metric) -> why its interval (or its difference's) is NaN, over every run."""
    found: dict[tuple[str, str], str] = {}
    for r in result["runs"]:
        for flag, cells in r["datasets"].items():
            for m, c in cells.items():
                why = c.get("ci_undefined") or c.get("diff_ci_undefined")
                if why:
                    found.setdefault((flag, m), why)
    return found


def write_compare(result: dict, output: Path) -> list[Path]:
    """compare.{json,csv,md}, compare_auc.png (values with intervals), compare_diff.png (paired differences) and
    compare_forest.png (Δm and every dataset's difference, one row per run)."""
    written = Results(output)
    json_path, csv_path, md_path = written.compare_files
    write_json(json_path, result)
    fields = ["value", "ci_low", "ci_high", "std", "diff", "diff_ci_low", "diff_ci_high"]
    fields += ["ci_undefined", "diff_ci_undefined"]  # why an interval is nan
    rows = [["run", "dataset", "metric", *fields]]
    for r in result["runs"]:
        for flag, cells in r["datasets"].items():
            for m, c in cells.items():
                rows.append([r["name"], flag, m, *(c.get(k, "") for k in fields)])
        for m, c in r["mean"].items():
            rows.append([r["name"], "mean", m, c["value"], "", "", "", c.get("diff", ""), "", "", "", ""])
        interval = [r.get("delta_m_ci_low", ""), r.get("delta_m_ci_high", ""), "", "", "", ""]
        why = r.get("delta_m_undefined") or r.get("delta_m_ci_undefined", "")
        rows.append([r["name"], "delta_m_percent", ",".join(result["metrics"]), r["delta_m"], *interval, why, ""])
    write_csv(csv_path, rows)
    write_text(md_path, format_compare(result))
    metric = "auc" if "auc" in result["metrics"] else result["metrics"][0]
    bars = {
        r["name"]: {
            f: (c[metric]["value"], c[metric]["ci_low"], c[metric]["ci_high"])
            for f, c in r["datasets"].items()
            if metric in c
        }
        for r in result["runs"]
    }
    diffs = {
        r["name"]: {
            f: (c[metric]["diff"], c[metric]["diff_ci_low"], c[metric]["diff_ci_high"])
            for f, c in r["datasets"].items()
            if metric in c
        }
        for r in result["runs"][1:]
    }
    paths = list(written.compare_files)
    paths.append(
        plot_grouped_bars(bars, written.compare_plot(metric), f"test {metric} (95% CI)", f"{metric} per dataset")
    )
    paths.append(
        plot_differences(
            diffs,
            written.compare_diff_plot,
            f"Δ {metric} vs {result['reference']} (paired 95% CI)",
            "difference to the reference",
        )
    )
    paths.append(plot_forest(*forest_rows(result, metric), written.compare_forest_plot, forest_title(result, metric)))
    return paths


def forest_rows(result: dict, metric: str) -> tuple[dict[str, dict[str, tuple]], list[str]]:
    """The forest plot's rows (run -> column -> (estimate, low, high)) and columns: Δm in %, then the difference in
    `metric` of every dataset, each with its paired interval."""
    delta_m = f"Δm (%, {','.join(result['metrics'])})"
    rows = {}
    for r in result["runs"][1:]:
        rows[r["name"]] = {
            delta_m: (r["delta_m"], r.get("delta_m_ci_low", math.nan), r.get("delta_m_ci_high", math.nan))
        }
        for flag, cells in r["datasets"].items():
            if metric in cells:
                c = cells[metric]
                rows[r["name"]][f"Δ {metric} {flag.removesuffix('mnist')}"] = (
                    c["diff"],
                    c["diff_ci_low"],
                    c["diff_ci_high"],
                )
    columns = [delta_m, *(f"Δ {metric} {flag.removesuffix('mnist')}" for flag in result["datasets"])]
    return rows, columns


def forest_title(result: dict, metric: str) -> str:
    b = result["bootstrap"]
    return (
        f"against {result['reference']}: Δm and Δ {metric}, {int(b['confidence_level'] * 100)}% paired intervals over "
        "the test images (blue: above 0, red: below)"
    )
