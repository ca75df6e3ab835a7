"""Tables and plots of per-dataset metrics: terminal, JSON, CSV, Markdown, PNG."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from mmpt.io import atomic_write, write_json, write_text

# Columns in display order; a dataset shows "-" for a metric it does not have.
COLUMNS = ("auc", "acc", "balanced_acc", "kappa", "qwk", "mae", "loss")


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
    lines = ["| dataset | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_metrics(folder: Path, table: dict[str, dict[str, float]], stem: str = "metrics") -> list[Path]:
    """Write `{stem}.json`, `{stem}.csv` and `{stem}.md` into `folder`; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path, md_path = (folder / f"{stem}.{ext}" for ext in ("json", "csv", "md"))
    write_json(json_path, table)
    columns = _columns(table)
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["dataset", *columns])
    for name, row in table.items():
        writer.writerow([name, *(row.get(c, "") for c in columns)])
    write_text(csv_path, rows.getvalue())
    write_text(md_path, format_markdown(table))
    return [json_path, csv_path, md_path]


def read_metrics(path: Path) -> dict[str, dict[str, float]]:
    return json.loads(Path(path).read_text())


def compare_table(tables: dict[str, dict[str, dict[str, float]]], metric: str) -> dict[str, dict[str, float]]:
    """dataset -> run -> `metric`, for datasets in any run; a run without a dataset is left out of its row."""
    datasets = list(dict.fromkeys(name for table in tables.values() for name in table))
    return {
        name: {run: table[name][metric] for run, table in tables.items() if metric in table.get(name, {})}
        for name in datasets
    }


def plot_history(history: list[dict], path: Path, metric: str = "auc") -> Path | None:
    """Plot each dataset's validation `metric` per epoch into a PNG; None when there is nothing to plot."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    epochs = [entry["epoch"] for entry in history]
    for name in history[-1]["val"]:
        values = [entry["val"].get(name, {}).get(metric, float("nan")) for entry in history]
        ax.plot(epochs, values, marker="o", label=name, linewidth=2.5 if name == "mean" else 1)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path
