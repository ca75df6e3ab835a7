"""Fixtures shared by the whole test suite (its helpers are in tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mmpt.data.synthetic import write_synthetic
from mmpt.tasks import TASKS
from tests import tolerances

# the real MedMNIST files: the folder MMPT_REAL_DATA names, else the project's CI location beside the repository
REAL_DATA_VARIABLE = "MMPT_REAL_DATA"
REAL_ROOT = Path(
    os.environ.get(REAL_DATA_VARIABLE) or Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"
).expanduser()


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n N`), each worker trains on its share of the cores, and so do the processes its tests
    start: N workers with torch's default of one thread per core would oversubscribe them (on 2 cores, 4 threads
    that wait on each other make every run several times slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers > 1:
        threads = str(max(1, len(os.sched_getaffinity(0)) // workers))
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(variable, threads)
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if os.environ.get(tolerances.VARIABLE):
        tolerances.install()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """With MMPT_RECORD_TOLERANCES set: each worker writes the tolerance its comparisons used (tests/tolerances.py)."""
    if os.environ.get(tolerances.VARIABLE):
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        tolerances.write(Path(os.environ[tolerances.VARIABLE]), worker)


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
