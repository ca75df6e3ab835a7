"""Tables and plots of per-dataset metrics: terminal, JSON, CSV, Markdown, PNG."""

from __future__ import annotations

import math
from pathlib import Path

from mmpt.errors import MmptError
from mmpt.io import markdown_table, read_json, write_csv, write_json, write_text
from mmpt.runs.rundir import Results

# Columns in display order; a dataset shows "-" for a metric it does not have.
COLUMNS = ("auc", "acc", "balanced_acc", "kappa", "qwk", "mae", "ece", "brier", "nll", "loss")


def _columns(table: dict[str, dict[str, float]]) -> list[str]:
    present = {k for row in table.values() for k in row}
    return [c for c in COLUMNS if c in present] + sorted(present - set(COLUMNS))


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{value:.4f}"


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A fixed-width text table, one row per dataset and the mean last."""
    columns = _columns(table)
    width = max(len(name) for name in table) + 2
    lines = ["dataset".ljust(width) + "".join(c.rjust(13) for c in columns)]
    for name, row in table.items():
        lines.append(name.ljust(width) + "".join(_cell(row.get(c)).rjust(13) for c in columns))
    return "\n".join(lines)


def format_markdown(table: dict[str, dict[str, float]]) -> str:
    columns = _columns(table)
    rows = [[name, *(_cell(row.get(c)) for c in columns)] for name, row in table.items()]
    return markdown_table(["dataset", *columns], rows) + "\n"


def write_metrics(results: Results, table: dict[str, dict[str, float]]) -> list[Path]:
    """Write metrics.json, metrics.csv and metrics.md into the `results` folder; return their paths."""
    results.path.mkdir(parents=True, exist_ok=True)
    json_path, csv_path, md_path = results.metrics_files
    write_json(json_path, table)
    columns = _columns(table)
    write_csv(
        csv_path, [["dataset", *columns], *([name, *(row.get(c, "") for c in columns)] for name, row in table.items())]
    )
    write_text(md_path, format_markdown(table))
    return [json_path, csv_path, md_path]


PER_CLASS_COLUMNS = ("precision", "recall", "f1", "auc", "support")


def per_class_rows(per_class: dict[str, dict[str, dict[str, float]]]) -> list[list]:
    """One row per dataset and class (label): dataset, class, then PER_CLASS_COLUMNS."""
    return [
        [flag, name, *(cells[c] for c in PER_CLASS_COLUMNS)]
        for flag, classes in per_class.items()
        for name, cells in classes.items()
    ]


def write_per_class(results: Results, per_class: dict[str, dict[str, dict[str, float]]]) -> list[Path]:
    """metrics_per_class.csv and .md: each class's (each label's) precision, recall, F1, one-vs-rest AUC and support
    (`per_class`: dataset -> class -> metric -> value, mmpt.evaluation.metrics.per_class_metrics)."""
    csv_path, md_path = results.per_class_files
    rows = per_class_rows(per_class)
    header = ["dataset", "class", *PER_CLASS_COLUMNS]
    write_csv(csv_path, [header, *rows])
    shown = [[flag, name, *(_cell(v) for v in values[:-1]), f"{int(values[-1])}"] for flag, name, *values in rows]
    write_text(md_path, markdown_table(header, shown) + "\n")
    return [csv_path, md_path]


def read_history(path: Path) -> list[dict]:
    """The per-epoch history in a run's val_history.json. Raises MmptError if it is malformed."""
    data = read_json(path, "it is damaged: restore it from a backup, or train the run again")
    if not isinstance(data, dict) or not isinstance(data.get("history"), list):
        raise MmptError(f"{path} has no per-epoch history list; restore it from a backup, or train the run again")
    return data["history"]
