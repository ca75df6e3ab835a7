"""What `evaluate.py compare` writes: the Markdown tables (also printed), compare.{json,csv} and two plots."""

from __future__ import annotations

import math
from pathlib import Path

from mmpt.analysis.pages import write_pages
from mmpt.evaluation.metrics import PER_CLASS
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
        header, rows = metric_table(result, m)
        lines += [f"## {m}", "", markdown_table(header, rows), ""]
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
    if "per_class" in runs[0]:
        lines += [
            "",
            "## Per class (one-vs-rest; a multi-label dataset: per label)",
            "",
            "Each class's value for the reference [interval], then each run's paired difference [interval]; "
            "support: the class's test images. Precision is nan for a class never predicted.",
            "",
        ]
        for flag in result["datasets"]:
            header, rows = per_class_table(result, flag)
            lines += [f"### {flag}", "", markdown_table(header, rows, align="ll" + "r" * (len(header) - 2)), ""]
    return "\n".join(lines) + "\n"


def _value_cell(c: dict | None) -> str:
    """value ± std [low, high] of a compare cell ("-" where the run has none)."""
    if c is None:
        return "-"
    return (
        _num(c["value"])
        + (f" ± {c['std']:.4f}" if "std" in c else "")
        + f" [{_num(c['ci_low'])}, {_num(c['ci_high'])}]"
    )


def _diff_cell(c: dict | None) -> str:
    """difference [low, high] of a compare cell to the reference."""
    if c is None:
        return "-"
    return f"{_num(c['diff'], True)} [{_num(c['diff_ci_low'], True)}, {_num(c['diff_ci_high'], True)}]"


def metric_table(result: dict, metric: str) -> tuple[list[str], list[list[str]]]:
    """The table of one metric: a row per dataset (each run's value ± std [interval], then each other run's paired
    difference [interval]) and the mean row."""
    runs = result["runs"]
    header = ["dataset"] + [r["name"] for r in runs] + [f"Δ {r['name']}" for r in runs[1:]]
    rows = []
    for flag in result["datasets"]:
        cells = [flag, *(_value_cell(r["datasets"][flag].get(metric)) for r in runs)]
        rows.append(cells + [_diff_cell(r["datasets"][flag].get(metric)) for r in runs[1:]])
    mean = ["**mean**"] + [_num(r["mean"].get(metric, {}).get("value")) for r in runs]
    mean += [_num(r["mean"].get(metric, {}).get("diff"), True) for r in runs[1:]]
    return header, [*rows, mean]


def per_class_table(result: dict, flag: str) -> tuple[list[str], list[list[str]]]:
    """One dataset's per-class table: a row per class and metric, with its support, the reference's value and
    every other run's paired difference."""
    runs = result["runs"]
    header = ["class", "metric", "support", runs[0]["name"], *(f"Δ {r['name']}" for r in runs[1:])]
    rows = []
    for name, support in result["support"][flag].items():
        for m in PER_CLASS:
            cells = [name, m, f"{int(support)}", _value_cell(runs[0]["per_class"][flag][name][m])]
            rows.append(cells + [_diff_cell(r["per_class"][flag][name][m]) for r in runs[1:]])
    return header, rows


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


def write_compare(result: dict, output: Path, command: str = "") -> list[Path]:
    """compare.{json,csv,md}, compare_auc.png (values with intervals), compare_diff.png (paired differences),
    compare_forest.png (Δm and every dataset's difference, one row per run), compare_per_class.csv (with per-class
    cells), and compare.html and compare.tex (mmpt.analysis.pages; `command`: the command line the page names)."""
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
    markdown = format_compare(result)
    write_text(md_path, markdown)
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
    if "per_class" in result["runs"][0]:
        paths.append(write_per_class_csv(result, written.compare_per_class))
    tables = {m: metric_table(result, m) for m in result["metrics"]}
    paths += write_pages(result, markdown, tables, written, command)
    return paths


def write_per_class_csv(result: dict, path: Path) -> Path:
    """compare_per_class.csv: a row per run, dataset, class and metric, with the values of compare.csv."""
    fields = ["value", "ci_low", "ci_high", "std", "diff", "diff_ci_low", "diff_ci_high"]
    rows = [["run", "dataset", "class", "support", "metric", *fields]]
    for r in result["runs"]:
        for flag, classes in r["per_class"].items():
            for name, cells in classes.items():
                support = result["support"][flag][name]
                rows += [
                    [r["name"], flag, name, int(support), m, *(c.get(k, "") for k in fields)] for m, c in cells.items()
                ]
    write_csv(path, rows)
    return path


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
