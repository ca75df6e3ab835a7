"""Training keeps computing what it computed: pinned losses, weights and test metrics, within measured tolerances.

For the quickstart-like run and every loss.weighting method (tests/training/regression.py), the per-step training
loss of every dataset, each dataset's effective weight per step and the test metrics of the best checkpoint
(mean AUC and mean loss) are pinned in regression_pinned.json, each with its tolerance. A refactor that changes
what training computes (the plan, the step, a method's weights or its state) fails here on any machine; one that
only rearranges code passes.

The tolerances are measured, not guessed. Float32 training rounds differently on another processor (torch's
kernels, oneDNN, MKL and OpenBLAS choose their code by instruction set, and the thread count orders the sums), and
a short run amplifies the first difference about tenfold per step (Adam turns a gradient whose sign is rounding
noise into a full step). `python -m tests.kernel_configs values DIR --record` trains the runs under every kernel
configuration this machine offers (ATEN_CPU_CAPABILITY default/avx2/avx512, oneDNN and NNPACK on and off,
MKL_ENABLE_INSTRUCTIONS, MKL_CBWR, OpenBLAS core types, 1 and 2 threads) and pins the reference configuration's
values with a tolerance of TOLERANCE_MULTIPLE times the largest deviation any configuration showed: per run and
per step for the losses and weights (the running maximum over the steps so far, since deviations grow), per run
and metric for the test metrics; never below FLOOR (a few float32 rounding steps) where every configuration agreed.
The measurement (machine, configurations, the spread per run) is recorded in the file beside the values.

What this cannot see: a change as small as rounding itself. A learning rate one float32 ulp larger moves a step's
loss about a hundred times less than another processor's rounding does (measured, docs/reproducibility-and-errors.md
#what-the-regression-tests-catch); comparing two commits on one machine bit for bit (tests/compare_commits.py) sees it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mmpt.config.methods import GRADIENT, METHODS, missing_solvers
from tests.helpers import REPO
from tests.training.regression import ONE_PASS, QUICKSTART, run_names

# every test reads the values of one process that trains every run
pytestmark = pytest.mark.slow

PINNED = Path(__file__).with_name("regression_pinned.json")
TOLERANCE_MULTIPLE = 10
FLOOR = 1e-6  # where every configuration gave the same value (static weights): 8 float32 ulps at 1.0
PINNED_METRICS = ("auc", "loss")
POOLED_METRICS = ("auc",)  # moves in steps (a rank flip): its tolerance from the largest step any run showed


def violations(actual: dict, pinned: dict) -> list[str]:
    """What of one run's values lies outside its pinned tolerances (empty when nothing does)."""
    problems = []
    for kind in ("loss", "weight"):
        if set(actual[kind]) != set(pinned[kind]):
            problems.append(f"{kind}: datasets {sorted(actual[kind])}, pinned {sorted(pinned[kind])}")
            continue
        for flag, series in pinned[kind].items():
            got = dict(actual[kind][flag])
            if sorted(got) != [step for step, _, _ in series]:
                problems.append(f"{kind}/{flag}: logged at steps {sorted(got)}, pinned {[s for s, _, _ in series]}")
                continue
            for step, value, tolerance in series:
                # None: NaN pinned (an aggregator without weights), which the run must log too
                if not (math.isnan(got[step]) if value is None else abs(got[step] - value) <= tolerance):
                    problems.append(f"{kind}/{flag} step {step}: {got[step]!r}, pinned {value!r} ± {tolerance:.2g}")
    for metric, (value, tolerance) in pinned["test_mean"].items():
        if not abs(actual["test_mean"][metric] - value) <= tolerance:
            problems.append(f"test mean {metric}: {actual['test_mean'][metric]!r}, pinned {value!r} ± {tolerance:.2g}")
    return problems


def train_in_process(folder: Path, names: list[str], *args: str) -> dict[str, dict]:
    """The values of the named runs, trained in a fresh Python process that inherits this one's environment."""
    out = folder / "values.json"
    done = subprocess.run(
        [sys.executable, "-m", "tests.training.regression", str(out), *args, *names],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def pinned() -> dict:
    return json.loads(PINNED.read_text())


@pytest.fixture(scope="module")
def values(tmp_path_factory) -> dict[str, dict]:
    """Every run this machine can train, from one fresh process."""
    return train_in_process(tmp_path_factory.mktemp("regression"), run_names())


def test_quickstart_like_run_keeps_its_losses_and_test_metrics(values, pinned):
    assert violations(values[QUICKSTART], pinned["runs"][QUICKSTART]) == []


EVERY_RUN = [*METHODS, *(m + ONE_PASS for m in METHODS if METHODS[m].kind == GRADIENT)]


@pytest.mark.parametrize("method", EVERY_RUN)
def test_every_weighting_method_keeps_its_losses_weights_and_test_metrics(values, pinned, method):
    """Every method, and every gradient-based one again on the one-pass Jacobian path (`<method>.one_pass`)."""
    record = "python -m tests.kernel_configs values DIR --record (see the docstring)"
    assert method in pinned["runs"], f"pin {method}'s values: {record}"
    missing = missing_solvers(method.removesuffix(ONE_PASS))
    if missing:
        pytest.skip(f"{method} needs {', '.join(missing)} (the mtl-solvers extra)")
    assert violations(values[method], pinned["runs"][method]) == []


def test_the_runs_take_the_jacobian_path_they_pin(values):
    """The one-pass runs take it (per-dataset statistics); the others, with statistics shared across the step's
    datasets, take mtl_backward (loss.jacobian auto); a method without a Jacobian takes neither."""
    for name, run in values.items():
        method = name.removesuffix(ONE_PASS)
        expected = None if name == QUICKSTART or METHODS[method].kind != GRADIENT else "autojac"
        assert run["jacobian"] == ("one_pass" if name.endswith(ONE_PASS) else expected), name


@pytest.mark.parametrize(
    "change, runs",
    [
        # the sampler's order: each epoch's batches in reverse order
        ("--plan-order", ["quickstart", "upgrad"]),
        # a method's weights: one dataset's static weight 1 % larger
        ("--weights-scale", ["size"]),
    ],
)
def test_a_change_to_what_training_computes_fails_the_pinned_values(tmp_path, pinned, change, runs):
    changed = train_in_process(tmp_path, runs, change)
    for name in runs:
        assert violations(changed[name], pinned["runs"][name]) != [], name
