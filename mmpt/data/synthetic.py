"""Synthetic MedMNIST+ files: medmnist's names, keys, dtypes and shapes, with a class signal a small CNN learns.

Each class has a fixed, seeded, smooth template (a few low-frequency waves plus a blob); an image is
128 + brightness offset + amplitude * (its classes' templates) + pixel noise, clipped to uint8.
Multi-label images sum the templates of their active labels; ordinal grades scale one template
by the grade, so the signal grows monotonically with it.

    python -m mmpt.data.synthetic --out data/synthetic --resolution 28 --datasets all
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from mmpt.errors import MmptError
from mmpt.io import atomic_write
from mmpt.tasks import FLAGS, MULTI_LABEL, ORDINAL, RESOLUTIONS, TaskSpec, resolve_tasks

# The extra key that marks a file as generated here; the store skips MD5 checks for such files.
SYNTHETIC_KEY = "mmpt_synthetic"
SYNTHETIC_MARKER = b"mmpt-synthetic-v1"

WAVES_PER_TEMPLATE = 3
AMPLITUDE = 24.0  # template std is 1, so the class signal has std AMPLITUDE grey levels
NOISE_STD = 40.0  # strong enough that tasks are learnable but not all solved perfectly
MULTI_LABEL_PREVALENCE = 0.2


def split_sizes(task: TaskSpec, train_samples: int) -> dict[str, int]:
    """Return {split: samples}: train max(train_samples, 2*classes), val/test max(train_samples // 4, 2*classes)."""
    floor = 2 * task.num_classes
    held_out = max(train_samples // 4, floor)
    return {"train": max(train_samples, floor), "val": held_out, "test": held_out}


def _templates(rng: np.random.Generator, count: int, resolution: int, channels: int) -> np.ndarray:
    """Return count smooth patterns, count × R × R × channels float32, each channel zero-mean, unit-std."""
    # patterns are functions of the unit square, so a seed gives the same picture at every resolution
    coords = (np.arange(resolution) + 0.5) / resolution
    y, x = np.meshgrid(coords, coords, indexing="ij")
    out = np.empty((count, resolution, resolution, channels), np.float32)
    for i in range(count):
        for c in range(channels):
            fx = rng.integers(1, 4, size=WAVES_PER_TEMPLATE)
            fy = rng.integers(-3, 4, size=WAVES_PER_TEMPLATE)
            phase = rng.uniform(0, 2 * np.pi, size=WAVES_PER_TEMPLATE)
            pattern = sum(np.cos(2 * np.pi * (fx[k] * x + fy[k] * y) + phase[k]) for k in range(WAVES_PER_TEMPLATE))
            cy, cx = rng.uniform(0.2, 0.8, size=2)
            sigma = rng.uniform(0.1, 0.25)
            pattern = pattern + 3 * rng.choice([-1, 1]) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
            out[i, :, :, c] = (pattern - pattern.mean()) / pattern.std()
    return out


def _labels(rng: np.random.Generator, task: TaskSpec, n: int, class_probs: np.ndarray) -> np.ndarray:
    """Return n labels as medmnist stores them (uint8, n × label_width), every class or label value present."""
    if task.task_type == MULTI_LABEL:
        labels = (rng.random((n, task.num_classes)) < MULTI_LABEL_PREVALENCE).astype(np.uint8)
        # one all-positive and one all-negative row make every label's AUC defined
        labels[0], labels[1] = 1, 0
    else:
        drawn = rng.choice(task.num_classes, n - task.num_classes, p=class_probs)
        labels = np.concatenate([np.arange(task.num_classes), drawn]).astype(np.uint8)[:, None]
    return labels[rng.permutation(n)]


def _images(rng: np.random.Generator, task: TaskSpec, labels: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Return uint8 images for `labels`: N × R × R (grey) or N × R × R × 3, like medmnist."""
    n = len(labels)
    if task.task_type == MULTI_LABEL:
        weights = labels.astype(np.float32)
    elif task.task_type == ORDINAL:
        # one template scaled by the grade: the signal grows monotonically with it
        weights = np.zeros((n, len(templates)), np.float32)
        weights[:, 0] = labels[:, 0] / (task.num_classes - 1)
    else:
        weights = np.eye(len(templates), dtype=np.float32)[labels[:, 0]]
    weights *= AMPLITUDE * rng.uniform(0.7, 1.3, size=(n, 1)).astype(np.float32)
    pixels = weights @ templates.reshape(len(templates), -1)  # N × (R*R*channels)
    # uniform noise (std NOISE_STD) is several times faster to draw than Gaussian at 224 px
    noise = rng.random(pixels.shape, dtype=np.float32)
    noise -= 0.5
    noise *= NOISE_STD * np.sqrt(12)
    pixels += noise
    pixels += 128.5 + rng.normal(0, 10, size=(n, 1)).astype(np.float32)  # +0.5 rounds in the cast below
    pixels = np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)
    shape = (n, *templates.shape[1:3]) if task.channels == 1 else (n, *templates.shape[1:])
    return pixels.reshape(shape)


def synthetic_arrays(task: TaskSpec, resolution: int, train_samples: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    """Return the arrays of one synthetic file: medmnist's six keys plus the SYNTHETIC_KEY marker.

    The result depends only on (task, resolution, train_samples, seed).
    """
    # the task's index in the seed keeps each file independent of which other tasks are generated
    rng = np.random.default_rng([seed, FLAGS.index(task.flag)])
    templates = _templates(rng, task.num_classes, resolution, task.channels)
    class_probs = rng.dirichlet(np.full(task.num_classes, 5.0))  # mild class imbalance, as in real data
    arrays: dict[str, np.ndarray] = {}
    for split, n in split_sizes(task, train_samples).items():
        labels = _labels(rng, task, n, class_probs)
        arrays[f"{split}_images"] = _images(rng, task, labels, templates)
        arrays[f"{split}_labels"] = labels
    arrays[SYNTHETIC_KEY] = np.array(SYNTHETIC_MARKER)
    return arrays


def write_synthetic(
    root: str | Path, resolution: int, tasks: list[TaskSpec], train_samples: int = 256, seed: int = 0
) -> list[Path]:
    """Write one synthetic file per task into `root` under medmnist's name; return the paths written.

    Files are written atomically (mmpt.io). Raises MmptError for an unsupported
    resolution, a sample count below 1 or a folder that cannot be written.
    """
    if resolution not in RESOLUTIONS:
        sizes = ", ".join(map(str, RESOLUTIONS))
        raise MmptError(f"resolution must be one of {sizes} (MedMNIST+ sizes), got {resolution}")
    if train_samples < 1:
        raise MmptError(f"synthetic train samples must be at least 1, got {train_samples}")
    root = Path(root).expanduser()  # the config's default root is medmnist's "~/.medmnist"
    paths = []
    try:
        root.mkdir(parents=True, exist_ok=True)
        for task in tasks:
            path = root / task.filename(resolution)
            arrays = synthetic_arrays(task, resolution, train_samples, seed)
            atomic_write(path, lambda f, arrays=arrays: np.savez_compressed(f, **arrays))
            paths.append(path)
    except OSError as exc:
        reason = exc.strerror or exc
        raise MmptError(f"cannot write synthetic data into {root} ({reason}); choose a writable folder") from None
    return paths


def ensure_synthetic(
    root: str | Path, resolution: int, tasks: list[TaskSpec], train_samples: int = 256, seed: int = 0
) -> None:
    """Write synthetic files for the tasks whose file is missing from `root`; existing files are left alone.

    Raises MmptError like write_synthetic.
    """
    missing = [t for t in tasks if not (Path(root).expanduser() / t.filename(resolution)).exists()]
    if missing:
        write_synthetic(root, resolution, missing, train_samples, seed)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: write synthetic files and print their paths. Returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m mmpt.data.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the npz files into")
    parser.add_argument("--resolution", type=int, default=28, help="image size: 28, 64, 128 or 224")
    parser.add_argument("--datasets", default="all", help="comma-separated names (path,chest) or all")
    parser.add_argument("--samples", type=int, default=256, help="train images per dataset (val/test: a quarter)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        paths = write_synthetic(args.out, args.resolution, resolve_tasks(args.datasets), args.samples, args.seed)
    except MmptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
