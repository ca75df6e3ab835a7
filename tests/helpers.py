"""Helpers shared by the test modules: import them with `from tests.helpers import ...` (fixtures live in conftest.py).

Configs (tiny_config, ddp_config), a run's summary, a simulated crash, a guard against reads from the device,
a PNG check, torchrun with 2 CPU processes as users launch it, and what the launcher's tests read (a command's
output, `evaluate.py status` as rows, the job record, the stand-in sbatch's options).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import torch
import yaml

import mmpt
import mmpt.training.step
from mmpt.config import load_config
from mmpt.runs.rundir import RunDir
from mmpt.runs.seriesdir import SeriesDir

# the repository root: train.py, evaluate.py, configs/
REPO = Path(__file__).resolve().parents[1]
MMPT_DIR = str(Path(mmpt.__file__).parent)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
DDP_DATASETS = ["breast", "chest", "retina"]  # binary, multi-label, ordinal


# The flags of a tiny, fast training command: a data root and an output folder are added per use, and a later flag
# overrides one of these (argparse keeps the last).
TINY_RUN = (
    *("--backbone", "test_resnet", "--epochs", "1", "--batch-size", "16", "--device", "cpu"),
    *("--set", "input.mode=native", "--set", "data.num_workers=0", "--set", "train.progress=false"),
    *("--set", "data.eval_batch_size=64"),
)


def tiny_config(root, output, **sections):
    """A small, fast config on the synthetic files in `root`; `sections` override (section -> dict)."""
    raw = {
        "name": "tiny",
        "output": str(output),
        "data": {"root": str(root), "num_workers": 0, "eval_batch_size": 128},
        # a tiny run's precise statistics over 2 batches of each dataset, not the default 16 (its whole train split
        # here, a third of an epoch's cost before every validation); the tests of the calibration set their own
        "model": {"backbone": "test_resnet", "norm_calibration_batches": 2},
        "input": {"mode": "native"},
        "optim": {"lr": 0.003},
        "train": {"epochs": 1, "batch_size": 32, "device": "cpu", "progress": False, "log_every_steps": 5},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return load_config(overrides=[raw])


def summary(run_dir: Path) -> dict:
    """The run's summary.json (final and best digests, steps, weighting, test means)."""
    return json.loads(RunDir(run_dir).summary.read_text())


def crash_at_step(monkeypatch, crash_step: int) -> None:
    """Make training raise when it reaches `crash_step` (0-based), as a crash between two steps would."""
    real_step = mmpt.training.step.TrainStep.__call__

    def crash_at(self, parts, step):
        if step == crash_step:
            raise RuntimeError("simulated crash")
        return real_step(self, parts, step)

    monkeypatch.setattr(mmpt.training.step.TrainStep, "__call__", crash_at)


def refuse_reads_from_mmpt(monkeypatch) -> list[str]:
    """Make Tensor.item, bool(tensor), float(tensor) and tolist raise when mmpt's own code calls them."""
    calls = []
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        real = getattr(torch.Tensor, name)

        def guarded(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(MMPT_DIR):
                calls.append(f"{_name} from {caller}:{sys._getframe(1).f_lineno}")
                raise AssertionError(f"host-device synchronisation: Tensor.{_name} called from {caller}")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)
    return calls


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert 200 <= width <= 5000 and 150 <= height <= 5000, (path, image.shape)
    assert image[..., :3].std() > 0.02, f"{path} is (nearly) one flat colour"


def ddp_config(root: Path, output: Path, **train) -> dict:
    # test_vit has no BatchNorm: its forward does not depend on how the batch is split, so a 2-process run
    # differs from the single-process one only by floating-point summation order
    return {
        "name": "ddp",
        "output": str(output),
        "data": {"root": str(root), "datasets": DDP_DATASETS, "num_workers": 0, "eval_batch_size": 64},
        "model": {"backbone": "test_vit", "img_size": 32},
        "input": {"mode": "pad"},
        "optim": {"lr": 0.003},
        "train": {"epochs": 2, "batch_size": 16, "device": "cpu", "progress": False, "log_every_steps": 4, **train},
    }


def write_config(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def torchrun(*args: str, script: str = "train.py") -> subprocess.Popen:
    """`python -m torch.distributed.run --standalone --nproc_per_node 2 train.py ARGS` in its own session (`script`:
    another script, relative to the repository)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [*TORCHRUN, script, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-3000:]
    return out


# ---------------------------------------------------------------- the launcher's tests


def quiet(fn, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a command's main function (train_main(argv), evaluate_main(argv)) run in this
    process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = fn(*args)
    return code, out.getvalue(), err.getvalue()


def folder_snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every entry under `folder`: a file's relative path -> (sha256 of its bytes, mtime_ns), a folder's -> ("dir", 0);
    {} when `folder` does not exist. Equal snapshots: nothing was written, removed or touched."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        if p.is_file()
        else ("dir", 0)
        for p in sorted(folder.rglob("*"))
    }


def digests(folder: Path, seeds: str) -> dict[str, str]:
    """seed<k> -> final_digest of a series' seed runs."""
    return {
        f"seed{s}": json.loads(RunDir(folder / f"seed{s}").summary.read_text())["final_digest"]
        for s in seeds.split(",")
    }


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.01):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def job_status(folder: Path) -> dict[str, list[str]]:
    """evaluate.py status: member -> its row's cells (state, job, detail); "_text": the whole output."""
    from mmpt.cli import evaluate_main

    code, out, err = quiet(evaluate_main, ["status", str(folder)])
    assert code == 0, err
    rows = {}
    for line in out.splitlines()[2:]:
        if line.startswith(("progress:", "summary job")):
            break
        member, rest = line.split(maxsplit=1)
        state = "not started" if rest.startswith("not started") else rest.split()[0]
        rows[member] = [state, *rest.removeprefix(state).split(maxsplit=1)]
    return rows | {"_text": out}


def job_record(folder: Path) -> dict:
    return json.loads(SeriesDir(folder).jobs_record.read_text())


def sbatch_options(state: Path, job_id: str) -> dict:
    """The options the stand-in sbatch (tests/experiments/slurm_standin.py) got for a job."""
    return json.loads((state / "jobs" / f"{job_id}.json").read_text())["options"]
