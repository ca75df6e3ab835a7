"""Behaviour pinned by digests: the final weights of a quickstart-like run and of every loss.weighting method.

A refactor that changes any of these digests changed what training computes (the plan, the step, a method's
weights or its state), not only how the code is arranged. They were recorded at commit 58e377f.

The digests hold on every machine because they are computed in one fresh process in a portable numerics mode.
torch's CPU kernels (oneDNN, MKL, OpenBLAS) choose their code by the processor's instruction set (AVX2, AVX-512,
AMX), and each choice rounds differently, so digests recorded on one machine failed on another with the same code.
The process starts with ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE and OPENBLAS_CORETYPE=Prescott in its
environment (read when torch loads, hence a new process), turns oneDNN and NNPACK off and uses one thread (the
thread count changes the order of sums). In this mode the digests are the same under every MKL_ENABLE_INSTRUCTIONS
value. Only methods whose solvers are missing (cagrad and nash_mtl without the mtl-solvers extra) are skipped.

    python -m tests.training.test_digests quickstart none upgrad      # prints the digests of these runs as JSON
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from mmpt.data.synthetic import write_synthetic
from mmpt.mtl import METHODS, missing_solvers
from mmpt.rundir import RunDir
from mmpt.tasks import TASKS
from mmpt.train import run
from tests.helpers import REPO, tiny_config

# every test reads the digests of one process that trains every method
pytestmark = pytest.mark.slow

# read by torch, MKL and OpenBLAS when they load: the kernels every processor runs alike
PORTABLE_ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "OPENBLAS_CORETYPE": "Prescott",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
# unequal train sizes, so that size, inverse_size and sqrt_size give different weights
SIZES = {"pneumoniamnist": 24, "retinamnist": 40, "breastmnist": 56}
MANUAL = {"pneumoniamnist": 1.0, "retinamnist": 2.0, "breastmnist": 0.5}

QUICKSTART = "quickstart"
# final_digest of summary.json in the portable numerics mode at 58e377f
# (dualproj equals jd_mean because the synthetic tasks' gradients do not conflict)
DIGESTS = {
    "quickstart": "fd676bfd160ada9adc95d661527feaf98007e69e6e7c0e35b5eb5b50025847a8",
    "none": "9f7910fa9e7d5acb605179c23322ca61693856e009cfefbeb263e59af5528e70",
    "size": "a2d2fb03fb06b5df24d0f2883201fecb7bfa6b8b2f7c2df326a993e799b8c3f4",
    "inverse_size": "f117c0acb7fafd1430b74526e54db82b45624a715645baeca5baf519e6b23bb9",
    "sqrt_size": "7ceef1c32b7cc9f25322362c9ef7d77e5d4ad186d1434078550b7bb9decdabc3",
    "manual": "db0dcd12359347a51a80a743cb5d85dcd3f36f71db6d76876e03ac2d632fbf27",
    "uw": "d0453984d6489784d4c15cf402a0371e3f2b251fa0698bf04f9e57e1b95f1891",
    "imtl_l": "fe3c00a1b76af8b79b3646f856d5a43ceb9fcdc93fae513954d51ffa1945d1e2",
    "rlw": "4f721cb35103c32f74928da9644f7e83112fa4d22b052f96c4f4de5b1cc5cf94",
    "dwa": "ec3d57f8f59c40147529197ed2f716751fcffbc46df5ea4b863ddfab7edc978d",
    "famo": "e0a31667f41af261714af9ad7980445ce69fed70179419de91f4b1ba621ad990",
    "geometric_mean": "7b03290dae17c98cf4159081d1f40048fdf972726303a7857b41c798a6a89073",
    "stch": "1a5cef5062c140b310200f16dd2735213e4b3bb7d814d0efd414d560e2dbc345",
    "upgrad": "a8b74d32eba4945da5987e1cfc3537c571c012655fd562dc8b7d990fa103e9e9",
    "pcgrad": "105ba7f0986c4a30cec2d323c1214cac63e0163dfb1e17c0297259f4fdddf48d",
    "mgda": "dadf499fd3c38efa6d8d51edfd902116f5a75bd5e2b62432902949b7ae63900d",
    "cagrad": "8e56034870b625551a4f973a9308ad89ef93bff554450ac0b83b36d847739055",
    "nash_mtl": "83d3434747b96b7ce30afca17d4a6652484b0feac2867054a94ae6f9f7aa787c",
    "imtl_g": "992ed3493ff22e1fa9794e425a012c5486f29139ee4815a09e1bac3f6ea5a8cd",
    "aligned_mtl": "e16dac590c4b015fe6bc72496c9dcb80ed799cccf7360fe3432e06f44b7015e6",
    "graddrop": "ead10c20564cea556efc1c05aa477359403d7921b3c45ebf899181487fd35aea",
    "dualproj": "5f29817347b1adcacd551c289ce53dc1d29c92fc6cff7f9ab37ca4b0d2d8c798",
    "config": "ebd7a65da68d4d8f9b6296bc9dc9e03c598c0b1c96512fbffa37dbafbabd4453",
    "fairgrad": "5d4083d1bfb4819a352c72eea36e7cf3a1b13081adf283e54c07dbdad12c532e",
    "jd_mean": "5f29817347b1adcacd551c289ce53dc1d29c92fc6cff7f9ab37ca4b0d2d8c798",
}


def quickstart_config(root, output):
    """configs/quickstart.yaml in small: all 12 datasets, padded to 32 px, warm-up, a few steps per epoch."""
    return tiny_config(
        # model.norm shared and loss.ordinal coral: the engine as it was when the first digests were recorded
        # (the defaults are now auto and corn)
        root,
        output,
        data={"datasets": "all"},
        model={"backbone": "test_resnet", "img_size": 32, "norm": "shared"},
        input={"mode": "pad"},
        loss={"ordinal": "coral"},
        optim={"lr": 0.003, "warmup_epochs": 0.5},
        sampler={"steps_per_epoch": 6},
        train={"epochs": 2, "batch_size": 8, "log_every_steps": 4},
    )


def method_config(root, output, method):
    tasks_per_step = "all" if METHODS[method].tasks == "all" else 2
    loss = {"weighting": method, "weights": MANUAL if method == "manual" else {}, "ordinal": "coral"}
    return tiny_config(
        root,
        output,
        data={"datasets": list(SIZES)},
        sampler={"tasks_per_step": tasks_per_step, "steps_per_epoch": 3},
        model={"norm": "shared"},  # as when the first digests were recorded
        loss=loss,
        optim={"lr": 0.01},
        train={"epochs": 2, "batch_size": 8, "log_every_steps": 2},
    )


def final_digest(cfg) -> str:
    run(cfg)
    return json.loads(RunDir(cfg.run_dir).summary.read_text())["final_digest"]


def write_data(root: Path) -> None:
    """Small synthetic files of all 12 tasks, three of them with unequal train splits."""
    others = [spec for flag, spec in TASKS.items() if flag not in SIZES]
    write_synthetic(root, 28, others, train_samples=16, seed=0)
    for flag, samples in SIZES.items():
        write_synthetic(root, 28, [TASKS[flag]], train_samples=samples, seed=0)


def digests_of(names: list[str], folder: Path) -> dict[str, str]:
    """The final digest of each named run (QUICKSTART or a method), trained in `folder`, in this process."""
    write_data(folder / "data")
    return {
        name: final_digest(
            quickstart_config(folder / "data", folder / name)
            if name == QUICKSTART
            else method_config(folder / "data", folder / name, name)
        )
        for name in names
    }


@pytest.fixture(scope="module")
def digests(tmp_path_factory) -> dict[str, str]:
    """Every digest this machine can compute, from one process in the portable numerics mode."""
    names = [QUICKSTART, *(m for m in METHODS if not missing_solvers(m))]
    done = subprocess.run(
        [sys.executable, "-m", __name__, "--folder", str(tmp_path_factory.mktemp("digests")), *names],
        cwd=REPO,
        env={**os.environ, **PORTABLE_ENVIRONMENT},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_quickstart_like_run_keeps_its_digest(digests):
    assert digests[QUICKSTART] == DIGESTS[QUICKSTART]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_weighting_method_keeps_its_digest(digests, method):
    record = f"python -m tests.training.test_digests {method}"
    assert method in DIGESTS, f"record {method}'s digest: {record} (see the docstring)"
    if missing_solvers(method):
        pytest.skip(f"{method} needs {', '.join(missing_solvers(method))} (the mtl-solvers extra)")
    assert digests[method] == DIGESTS[method]


if __name__ == "__main__":
    # in the process the fixture starts, or by hand to record digests: torch read the environment when it loaded,
    # so without the portable one this process starts again with it
    if any(os.environ.get(key) != value for key, value in PORTABLE_ENVIRONMENT.items()):
        os.execve(
            sys.executable, [sys.executable, "-m", __spec__.name, *sys.argv[1:]], {**os.environ, **PORTABLE_ENVIRONMENT}
        )
    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.set_flags(False)
    torch.set_num_threads(1)
    arguments = sys.argv[1:]
    if arguments[:1] == ["--folder"]:
        folder, arguments = Path(arguments[1]), arguments[2:]
    else:
        folder = Path(tempfile.mkdtemp(prefix="mmpt-digests-"))
    missing = [name for name in arguments if name != QUICKSTART and name not in METHODS]
    assert not missing, f"not a weighting method: {missing}"
    print(json.dumps(digests_of(arguments, folder)))
