"""What training computes, as a user sees it: the runs behind the regression tests and the commit comparison.

The runs: a quickstart-like run (all 12 datasets, padded input, warm-up) and one short run of every loss.weighting
method, each logging every step. Of each run, `values` keeps what a user would notice change: the per-step training
loss of each dataset and each dataset's effective weight (TensorBoard's `train/loss/<flag>` and `weight/<flag>`, as
the run wrote them), the test metrics of its best checkpoint (summary.json's `test_mean`), and the digest of its
final weights (which only a comparison on one machine may read: another processor rounds differently).

    python -m tests.training.regression OUT.json [CHANGE] [RUN ...]   # the values of these runs (default: all)

trains them in this process, in this process's kernel configuration, and writes them as JSON. CHANGE changes what
training computes, for the test that such a change fails: --plan-order (each epoch's steps in reverse order: the
same batches, another order), --weights-scale (one dataset's static weight 1 % larger), --lr-ulp (the learning rate one
float32 ulp larger). The regression test
(test_regression.py), the measurement of their spread (tests/kernel_configs.py) and the comparison of two commits
(tests/compare_commits.py) all read this one module.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mmpt.config.methods import GRADIENT, METHODS, missing_solvers
from mmpt.data.sampler import Sampler
from mmpt.data.synthetic import write_synthetic
from mmpt.mtl.static import StaticMethod
from mmpt.runs.rundir import RunDir
from mmpt.tasks import TASKS
from mmpt.training.loop import run
from tests.helpers import tiny_config

QUICKSTART = "quickstart"
# unequal train sizes, so that size, inverse_size and sqrt_size give different weights
SIZES = {"pneumoniamnist": 24, "retinamnist": 40, "breastmnist": 56}
MANUAL = {"pneumoniamnist": 1.0, "retinamnist": 2.0, "breastmnist": 0.5}
LOSS_TAG, WEIGHT_TAG = "train/loss/", "weight/"


ONE_PASS = ".one_pass"  # a gradient-based method's run on the one-pass Jacobian path (per-dataset statistics)


def run_names() -> list[str]:
    """Every run this machine can train: the quickstart-like one, each method whose solvers are installed, and each
    gradient-based one also on the one-pass path (loss.jacobian: its runs above, with shared BatchNorm statistics,
    take TorchJD's mtl_backward)."""
    methods = [m for m in METHODS if not missing_solvers(m)]
    return [QUICKSTART, *methods, *(m + ONE_PASS for m in methods if METHODS[m].kind == GRADIENT)]


def quickstart_config(root, output, lr: float = 0.003):
    """configs/quickstart.yaml in small: all 12 datasets, padded to 32 px, warm-up, a few steps per epoch."""
    return tiny_config(
        root,
        output,
        data={"datasets": "all"},
        # model.norm shared and loss.ordinal coral: the engine as it was when these runs were first pinned
        model={"backbone": "test_resnet", "img_size": 32, "norm": "shared"},
        input={"mode": "pad"},
        loss={"ordinal": "coral"},
        optim={"lr": lr, "warmup_epochs": 0.5},
        sampler={"steps_per_epoch": 6},
        train={"epochs": 2, "batch_size": 8, "log_every_steps": 1},
    )


def method_config(root, output, method: str, lr: float = 0.01):
    method, one_pass = method.removesuffix(ONE_PASS), method.endswith(ONE_PASS)
    tasks_per_step = "all" if METHODS[method].tasks == "all" else 2
    loss = {"weighting": method, "weights": MANUAL if method == "manual" else {}, "ordinal": "coral"}
    return tiny_config(
        root,
        output,
        data={"datasets": list(SIZES)},
        sampler={"tasks_per_step": tasks_per_step, "steps_per_epoch": 3},
        # shared statistics, as when these runs were first pinned; per-dataset ones for the one-pass Jacobian
        model={"norm": "per_dataset_stats" if one_pass else "shared"},
        loss=loss,
        optim={"lr": lr},
        train={"epochs": 2, "batch_size": 8, "log_every_steps": 1},
    )


def config_of(name: str, root: Path, output: Path, lr_ulp: bool = False):
    """The config of run `name` (QUICKSTART or a method); `lr_ulp`: its learning rate one float32 ulp larger."""
    cfg = quickstart_config(root, output) if name == QUICKSTART else method_config(root, output, name)
    if not lr_ulp:
        return cfg
    lr = float(np.nextafter(np.float32(cfg.optim.lr), np.float32(1)))
    return quickstart_config(root, output, lr) if name == QUICKSTART else method_config(root, output, name, lr)


def write_data(root: Path) -> None:
    """Small synthetic files of all 12 tasks, three of them with unequal train splits."""
    others = [spec for flag, spec in TASKS.items() if flag not in SIZES]
    write_synthetic(root, 28, others, train_samples=16, seed=0)
    for flag, samples in SIZES.items():
        write_synthetic(root, 28, [TASKS[flag]], train_samples=samples, seed=0)


def scalars(tb_dir: Path, prefix: str) -> dict[str, list[list[float]]]:
    """flag -> [[step, value], ...] of every TensorBoard scalar whose tag starts with `prefix`."""
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag.removeprefix(prefix): [[e.step, e.value] for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith(prefix)
    }


def values(run_dir: Path) -> dict:
    """What the regression test compares of one finished run, read from the files it wrote."""
    folder = RunDir(run_dir)
    summary = json.loads(folder.summary.read_text())
    return {
        "loss": scalars(folder.tb, LOSS_TAG),
        "weight": scalars(folder.tb, WEIGHT_TAG),
        "test_mean": summary["test_mean"],
        "final_digest": summary["final_digest"],
        "jacobian": summary.get("jacobian"),
    }


def train_values(names: list[str], folder: Path, **changes) -> dict[str, dict]:
    """Train each named run in `folder` in this process and return its values."""
    write_data(folder / "data")
    out = {}
    for name in names:
        cfg = config_of(name, folder / "data", folder / name, **changes)
        run(cfg)
        out[name] = values(cfg.run_dir)
    return out


def apply_change(change: str) -> dict:
    """Make training compute something else (in this process); returns the config changes it needs."""
    if change == "--plan-order":
        plan = Sampler.plan
        Sampler.plan = lambda self, epoch: list(reversed(plan(self, epoch)))
    elif change == "--weights-scale":
        # one dataset's: scaling every weight alike would change nothing that Adam does (it divides by the scale)
        init = StaticMethod.__init__
        StaticMethod.__init__ = lambda self, weights: init(
            self, {t: w * (1.01 if t == min(weights) else 1.0) for t, w in weights.items()}
        )
    elif change == "--lr-ulp":
        return {"lr_ulp": True}
    else:
        raise SystemExit(f"unknown change {change}: --plan-order, --weights-scale or --lr-ulp")
    return {}


def main(argv: list[str]) -> None:
    out, names, changes = Path(argv[0]), argv[1:], {}
    if names[:1] and names[0].startswith("--"):
        changes, names = apply_change(names[0]), names[1:]
    names = names or run_names()
    unknown = [n for n in names if n not in run_names()]
    assert not unknown, f"not a run of this module: {unknown}"
    with tempfile.TemporaryDirectory(prefix="mmpt-regression-") as folder:
        out.write_text(json.dumps(train_values(names, Path(folder), **changes), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
