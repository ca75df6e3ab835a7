"""Did a change keep what training computes bit for bit? Train the same runs at two commits on this machine.

    python -m tests.compare_commits BASE [HEAD]     # HEAD defaults to the working tree as it is now

Bitwise equality is a property of one machine, one thread count and one set of library versions: the regression
tests compare with tolerances because another processor rounds differently, but a reorganisation meant to change
nothing must give the very same weights here. For each side this script trains, in a fresh process with one
thread, (a) the quickstart through the command line a user types (`train.py --config configs/quickstart.yaml`) with
its default settings, and with `model.norm=shared loss.ordinal=coral` for `none`, `upgrad` at 4 datasets per step
and `famo` at all of them, and (b) where both sides have it, every run of tests/training/regression.py. It prints
each run's final digest side by side and exits 1 if any differs. BASE is checked out with `git worktree` in a
temporary folder (the working tree is not touched); both sides use this environment's packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = ["--set", "model.norm=shared", "--set", "loss.ordinal=coral"]
QUICKSTART_RUNS = {
    "quickstart (defaults)": [],
    "quickstart none": [*SHARED, "--set", "loss.weighting=none"],
    "quickstart upgrad, 4 per step": [*SHARED, "--set", "loss.weighting=upgrad", "--set", "sampler.tasks_per_step=4"],
    "quickstart famo, all per step": [*SHARED, "--set", "loss.weighting=famo", "--set", "sampler.tasks_per_step=all"],
}


def environment(tree: Path) -> dict[str, str]:
    """One thread, and the tree's own package first on the path (the installed one may be another checkout)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(tree)}


def digests(tree: Path, work: Path) -> dict[str, str]:
    """The final digest of every run this tree can train."""
    env = environment(tree)
    found = subprocess.run(
        [sys.executable, "-c", "import mmpt; print(mmpt.__file__)"], cwd=tree, env=env, capture_output=True, text=True
    ).stdout.strip()
    assert Path(found).resolve().is_relative_to(tree.resolve()), f"{tree} imports mmpt from {found}"
    out = {}
    for name, args in QUICKSTART_RUNS.items():
        folder = work / name.replace(" ", "_").replace(",", "")
        command = [sys.executable, "train.py", "--config", "configs/quickstart.yaml", "--output", str(folder), *args]
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{tree}: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
        out[name] = json.loads((folder / "summary.json").read_text())["final_digest"]
    if (tree / "tests" / "training" / "regression.py").is_file():
        target = work / "regression.json"
        done = subprocess.run(
            [sys.executable, "-m", "tests.training.regression", str(target)], cwd=tree, env=env, capture_output=True
        )
        if done.returncode != 0:
            raise SystemExit(f"{tree}: the regression runs failed:\n{done.stderr.decode()[-2000:]}")
        out |= {f"regression {run}": v["final_digest"] for run, v in json.loads(target.read_text()).items()}
    return out


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    base, head = argv[0], argv[1] if len(argv) > 1 else None
    with tempfile.TemporaryDirectory(prefix="mmpt-compare-") as folder:
        work = Path(folder)
        sides = {}
        for label, rev in (("base", base), ("head", head)):
            if rev is None:
                tree = REPO
            else:
                tree = work / f"{label}-tree"
                subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=REPO, check=True)
            try:
                print(f"{label}: {rev or 'the working tree'}", flush=True)
                sides[label] = digests(tree, work / label)
            finally:
                if rev is not None:
                    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=True)
    runs = [r for r in sides["base"] if r in sides["head"]]
    differ = [r for r in runs if sides["base"][r] != sides["head"][r]]
    for run in runs:
        mark = "DIFFERS" if run in differ else "same"
        print(f"{mark:>8}  {run:<36} {sides['base'][run][:16]}  {sides['head'][run][:16]}")
    only = sorted(set(sides["base"]) ^ set(sides["head"]))
    if only:
        print(f"on one side only (not compared): {', '.join(only)}")
    print(f"{len(runs) - len(differ)} of {len(runs)} runs bitwise the same")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
