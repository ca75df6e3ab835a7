"""Fixtures of the launcher's tests: a small series trained sequentially (the reference of its jobs), and PATH with
stand-in SLURM tools (slurm_standin.py) that run the jobs on this machine."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mmpt.cli import train_main
from mmpt.data.synthetic import write_synthetic
from mmpt.tasks import resolve_tasks
from tests.helpers import digests, quiet

STANDIN = Path(__file__).resolve().parent / "slurm_standin.py"
SEEDS = "0,1,2"
_CLUSTERS = itertools.count(1)  # each test's stand-in cluster numbers its jobs from its own thousand


@pytest.fixture(scope="session")
def sequential_series(tmp_path_factory):
    """Data and recipe of a 3-seed series (2 epochs of 8 steps, last.pt every 4 steps: a stop or a kill after the
    first one continues mid-epoch), and the sequential series' digests, trained in this process with one thread:
    (folder, recipe, digests); the series is folder/seq (read it, never write into it)."""
    base = tmp_path_factory.mktemp("launcher")
    data = base / "data"
    write_synthetic(data, 28, resolve_tasks("breast,pneumonia"), train_samples=64, seed=0)
    recipe = base / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "jobs",
                "data": {"root": str(data), "datasets": ["breast", "pneumonia"], "num_workers": 0},
                "model": {"backbone": "test_resnet"},
                "input": {"mode": "native"},
                "optim": {"lr": 0.003},
                "train": {"epochs": 2, "batch_size": 16, "device": "cpu", "progress": False, "log_every_steps": 4},
                "checkpoint": {"every_steps": 4},
            }
        )
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = quiet(train_main, ["--config", str(recipe), "--output", str(base / "seq"), "--seeds", SEEDS])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    return base, recipe, digests(base / "seq", SEEDS)


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """PATH with stand-in sbatch, srun, scontrol, sacct, squeue and scancel; their state folder."""
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    for tool in ("sbatch", "srun", "scontrol", "sacct", "squeue", "scancel"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDIN}" {tool} "$@"\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_STANDIN_DIR", str(state))
    # job ids never repeat within the test session, as on a cluster: submitit's watcher keeps the states of the
    # jobs it has seen for the life of the process
    state.mkdir()
    (state / "counter").write_text(str(1000 * next(_CLUSTERS)))
    return state
