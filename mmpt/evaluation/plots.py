"""PNG pictures of runs, evaluations, series and comparisons (matplotlib, Agg backend, no display needed).

Each function writes one file beside the numbers it shows and returns its path.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mmpt.io import atomic_write
from mmpt.tasks import FLAGS


def _pyplot():
    # imported here: matplotlib is slow to import and only a plot needs it; the Agg backend is chosen before pyplot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _datasets(values: dict[str, dict]) -> list[str]:
    """Datasets of any run, in medmnist's order (others after them)."""
    names = list(dict.fromkeys(d for per in values.values() for d in per))
    return sorted(names, key=lambda d: FLAGS.index(d) if d in FLAGS else len(FLAGS))


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    _pyplot().close(fig)
    return path


def plot_history(history: list[dict], path: Path, metric: str = "auc") -> Path | None:
    """Each dataset's validation `metric` per epoch, the mean in bold; None when there is nothing to plot."""
    if not history:
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    epochs = [entry["epoch"] for entry in history]
    for name in history[-1]["val"]:
        values = [entry["val"].get(name, {}).get(metric, float("nan")) for entry in history]
        ax.plot(epochs, values, marker="o", label=name, linewidth=2.5 if name == "mean" else 1)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_loss_curves(history: list[dict], path: Path) -> Path | None:
    """One small panel per dataset: train loss (history entries' "train_loss": {flag: value}, when present)
    and validation loss ("val": {flag: {"loss": value}}) per epoch. None when the history is empty."""
    if not history:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator  # after _pyplot: matplotlib only when plotting

    flags = [name for name in history[-1]["val"] if name != "mean"]
    rows, cols = _grid(len(flags))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    epochs = [entry["epoch"] for entry in history]
    for ax, flag in zip(axes.flat, flags):
        val = [entry["val"].get(flag, {}).get("loss", np.nan) for entry in history]
        ax.plot(epochs, val, marker="o", markersize=3, label="val")
        train = [entry.get("train_loss", {}).get(flag, np.nan) for entry in history]
        if not all(np.isnan(train)):
            ax.plot(epochs, train, marker="o", markersize=3, label="train")
        ax.set_title(flag.removesuffix("mnist"), fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(flags) :]:
        ax.axis("off")
    return _save(fig, path)


def plot_reliability(panels: dict[str, dict[str, np.ndarray]], path: Path, title: str) -> Path:
    """Reliability diagrams: per panel (`panels`: title -> mmpt.evaluation.metrics.reliability's bins), each bin's
    accuracy as a bar over its confidence range, the diagonal of perfect calibration, the gap between the bar and
    the bin's mean confidence shaded, and each bin's image count above it (empty bins left blank)."""
    plt = _pyplot()
    rows, cols = _grid(len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False)
    for ax, (panel, bins) in zip(axes.flat, panels.items()):
        edges, count = bins["edges"], bins["count"]
        left, width = edges[:-1], np.diff(edges)
        filled = count > 0
        accuracy = np.where(filled, bins["accuracy"], 0.0)
        confidence = np.where(filled, bins["confidence"], 0.0)
        ax.bar(
            left[filled],
            accuracy[filled],
            width[filled],
            align="edge",
            color="tab:blue",
            edgecolor="white",
            label="accuracy",
        )
        gap_low, gap_high = np.minimum(accuracy, confidence), np.maximum(accuracy, confidence)
        ax.bar(
            left[filled],
            (gap_high - gap_low)[filled],
            width[filled],
            bottom=gap_low[filled],
            align="edge",
            color=(0.84, 0.15, 0.16, 0.25),
            edgecolor="tab:red",
            linewidth=0.6,
            label="gap to the mean confidence",
        )
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        for x, w, a, n in zip(left[filled], width[filled], accuracy[filled], count[filled]):
            ax.text(x + w / 2, min(a, 0.93) + 0.02, f"{int(n)}", ha="center", va="bottom", fontsize=5, rotation=90)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("confidence", fontsize=7)
        ax.set_ylabel("accuracy", fontsize=7)
        ax.set_title(panel, fontsize=8)
        ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_confusion(matrices: dict[str, np.ndarray], names: dict[str, list[str]], path: Path, title: str) -> Path:
    """Panels of confusion matrices (rows: true class, columns: predicted), each with its counts.

    `matrices`: panel title -> K×K counts; `names`: panel title -> the K class names.
    """
    plt = _pyplot()
    rows, cols = _grid(len(matrices))
    size = max(len(n) for n in names.values())
    side = 2.4 + 0.35 * size
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows), squeeze=False)
    for ax, (panel, matrix) in zip(axes.flat, matrices.items()):
        ax.imshow(matrix, cmap="Blues")
        k = len(matrix)
        ticks = [n[:12] for n in names[panel]]
        ax.set_xticks(range(k), ticks, rotation=60, ha="right", fontsize=6)
        ax.set_yticks(range(k), ticks, fontsize=6)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
        ax.set_title(panel, fontsize=8)
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(int(matrix[i, j])),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if matrix[i, j] > threshold else "black",
                )
    for ax in list(axes.flat)[len(matrices) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _mark_undefined(ax, at: np.ndarray, value: np.ndarray, errors: np.ndarray, vertical: bool) -> None:
    """Write "no CI" where a value has no interval: an error bar of zero length would read as an exact value."""
    for position, v, e in zip(at, value, errors.T):
        if np.isfinite(v) and not np.isfinite(e).all():
            xy = (position, v) if vertical else (v, position)
            ax.annotate("no CI", xy, fontsize=6, ha="center", va="bottom", color="dimgray")


def plot_grouped_bars(
    values: dict[str, dict[str, tuple[float, float, float]]], path: Path, ylabel: str, title: str
) -> Path:
    """Grouped bars: one group per dataset, one bar per run, each with an error bar.

    `values`: run -> dataset -> (value, low, high); a missing dataset leaves a gap.
    """
    plt = _pyplot()
    runs = list(values)
    datasets = _datasets(values)
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(datasets) * max(1, len(runs) / 2)), 3.8))
    x = np.arange(len(datasets))
    for i, run in enumerate(runs):
        v = np.array([values[run].get(d, (np.nan,) * 3) for d in datasets], dtype=float)
        errors = np.abs(np.stack([v[:, 0] - v[:, 1], v[:, 2] - v[:, 0]]))
        at = x + (i - (len(runs) - 1) / 2) * width
        ax.bar(at, v[:, 0], width, yerr=np.nan_to_num(errors), capsize=2, label=run)
        _mark_undefined(ax, at, v[:, 0], errors, vertical=True)
    finite = [val for per in values.values() for t in per.values() for val in t if np.isfinite(val)]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.05) if max(finite) <= 1 else None)
    ax.set_xticks(x, [d.removesuffix("mnist") for d in datasets], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_differences(
    diffs: dict[str, dict[str, tuple[float, float, float]]], path: Path, xlabel: str, title: str
) -> Path:
    """Dot plot of per-dataset differences with their intervals, one row per dataset, one colour per run.

    `diffs`: run -> dataset -> (difference, low, high); a dashed line marks no difference.
    """
    plt = _pyplot()
    runs = list(diffs)
    datasets = _datasets(diffs)
    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.45 * len(datasets) * max(1, len(runs) / 2)))
    y = np.arange(len(datasets))
    step = 0.6 / max(1, len(runs))
    for i, run in enumerate(runs):
        v = np.array([diffs[run].get(d, (np.nan,) * 3) for d in datasets], dtype=float)
        errors = np.abs(np.stack([v[:, 0] - v[:, 1], v[:, 2] - v[:, 0]]))
        at = y + (i - (len(runs) - 1) / 2) * step
        ax.errorbar(v[:, 0], at, xerr=np.nan_to_num(errors), fmt="o", capsize=3, label=run)
        _mark_undefined(ax, at, v[:, 0], errors, vertical=False)
    ax.axvline(0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(y, [d.removesuffix("mnist") for d in datasets], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def conflict_figure(mean: np.ndarray, tasks: tuple[str, ...] | list[str], title: str, norm_ratios=None):
    """(figure, axes) of the gradient-conflict heat map: one cell per pair of datasets (rows tasks[1:], columns
    tasks[:-1], the lower triangle), its value printed in it, a diverging colormap centred on 0; with `norm_ratios`
    (one per dataset), a second panel of bars: each dataset's mean gradient-norm ratio, 1 (equal magnitudes) marked."""
    from matplotlib.colors import TwoSlopeNorm

    plt = _pyplot()
    n = len(tasks)
    names = [t.removesuffix("mnist") for t in tasks]
    cells = np.full((n - 1, n - 1), np.nan)
    for i in range(1, n):
        for j in range(i):
            cells[i - 1, j] = mean[i, j]
    finite = np.abs(cells[np.isfinite(cells)])
    # the colour scale: symmetric about 0, at least ±0.05 so that noise around 0 stays pale
    bound = max(0.05, float(np.ceil(finite.max() * 20) / 20)) if finite.size else 1.0
    size = (2.2 + 0.62 * n, 1.6 + 0.5 * n)
    if norm_ratios is None:
        fig, ax = plt.subplots(figsize=size, dpi=110)
    else:
        fig, (ax, bars) = plt.subplots(
            1, 2, figsize=(size[0] + 2.4, size[1]), dpi=110, gridspec_kw={"width_ratios": [3, 1.2]}
        )
    image = ax.imshow(np.ma.masked_invalid(cells), cmap="RdBu", norm=TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound))
    for i in range(n - 1):
        for j in range(i + 1):
            value = cells[i, j]
            text = "n/a" if not np.isfinite(value) else f"{value:+.2f}"
            dark = np.isfinite(value) and abs(value) > 0.6 * bound
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(n - 1), names[:-1], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n - 1), names[1:], fontsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine (< 0: conflict)")
    ax.set_title(title, fontsize=9)
    if norm_ratios is not None:
        values = np.nan_to_num(np.asarray(norm_ratios, dtype=float), nan=0.0)
        bars.barh(range(n), values, color="0.45")
        bars.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        bars.set_yticks(range(n), names, fontsize=7)
        bars.invert_yaxis()
        bars.set_xlabel("gradient norm / mean", fontsize=8)
        bars.set_title("magnitude", fontsize=9)
        bars.tick_params(axis="x", labelsize=7)
        for side in ("top", "right"):
            bars.spines[side].set_visible(False)
    return fig, ax


def conflict_title(steps: list[int], every_steps: int) -> str:
    """The heat map's title: what it shows and the steps it averages."""
    span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
    count = "1 measurement" if len(steps) == 1 else f"{len(steps)} measurements"
    return f"gradient cosine between datasets on the shared backbone\nmean of {count}, {span}, every {every_steps}"


def plot_gradient_conflicts(
    mean: np.ndarray,
    tasks: tuple[str, ...] | list[str],
    steps: list[int],
    every_steps: int,
    path: Path,
    norm_ratios: np.ndarray | None = None,
) -> Path:
    """The heat map of the mean gradient cosine of every pair of datasets and, beside it, each dataset's mean
    gradient-norm ratio (its gradient's norm over the mean of the datasets measured with it; 1: equal magnitudes):
    angle and magnitude in one picture (see conflict_figure)."""
    fig, _ = conflict_figure(mean, tasks, conflict_title(steps, every_steps), norm_ratios)
    return _save(fig, path)


def plot_forest(rows: dict[str, dict[str, tuple[float, float, float]]], columns: list[str], path: Path, title: str):
    """A forest plot: one row per run (`rows`: run -> column -> (estimate, low, high)), one panel per column (Δm,
    then each dataset's difference), each estimate a dot on its interval's line, 0 (no difference) dashed; a run
    without a column leaves it blank. Read down a panel to rank the runs, across a row to see where a run's Δm comes
    from."""
    plt = _pyplot()
    runs = list(rows)
    fig, axes = plt.subplots(
        1,
        len(columns),
        figsize=(2.0 + 2.2 * len(columns), max(2.6, 1.6 + 0.34 * len(runs))),
        sharey=True,
        squeeze=False,
    )
    y = np.arange(len(runs))
    for ax, column in zip(axes[0], columns):
        v = np.array([rows[r].get(column, (np.nan,) * 3) for r in runs], dtype=float)
        errors = np.abs(np.stack([v[:, 0] - v[:, 1], v[:, 2] - v[:, 0]]))
        colours = ["tab:blue" if lo > 0 else "tab:red" if hi < 0 else "0.3" for _, lo, hi in v]
        for i in range(len(runs)):
            ax.errorbar(v[i, 0], y[i], xerr=np.nan_to_num(errors[:, i : i + 1]), fmt="o", color=colours[i], capsize=2)
        _mark_undefined(ax, y, v[:, 0], errors, vertical=False)
        ax.axvline(0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(column, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, runs, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)
