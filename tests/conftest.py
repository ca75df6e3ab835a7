"""Fixtures shared by the whole test suite (its helpers are in tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
