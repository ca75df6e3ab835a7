"""Fixtures and helpers shared by the whole test suite (import helpers with `from conftest import ...`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mmpt.config import load_config
from mmpt.data.synthetic import write_synthetic
from mmpt.tasks import TASKS

# the real MedMNIST files: the folder MMPT_REAL_DATA names, else the project's CI location beside the repository
REAL_DATA_VARIABLE = "MMPT_REAL_DATA"
REAL_ROOT = Path(
    os.environ.get(REAL_DATA_VARIABLE) or Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"
).expanduser()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic 28 px files of all 12 tasks (128 train images each, seed 0); never modify its npz files."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, 28, list(TASKS.values()), train_samples=128, seed=0)
    return root


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The real MedMNIST 28 px files (breast, pneumonia, retina), or a skip; open them with cache_dir=tmp_path."""
    if not REAL_ROOT.is_dir():
        pytest.skip(
            f"real MedMNIST files not found at {REAL_ROOT}: set {REAL_DATA_VARIABLE} to a folder with "
            "breastmnist.npz, pneumoniamnist.npz and retinamnist.npz"
        )
    # the folder is shared and may be writable, so its default cache ({root}/.mmpt-cache) must not be used
    return REAL_ROOT


def tiny_config(root, output, **sections):
    """A small, fast config on the synthetic files in `root`; `sections` override (section -> dict)."""
    raw = {
        "name": "tiny",
        "output": str(output),
        "data": {"root": str(root), "num_workers": 0, "eval_batch_size": 128},
        "model": {"backbone": "test_resnet"},
        "input": {"mode": "native"},
        "optim": {"lr": 0.003},
        "train": {"epochs": 1, "batch_size": 32, "device": "cpu", "progress": False, "log_every_steps": 5},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return load_config(overrides=[raw])


def summary(run_dir: Path) -> dict:
    """The run's summary.json (final and best digests, steps, weighting, test means)."""
    return json.loads((run_dir / "summary.json").read_text())
