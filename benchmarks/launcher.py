"""Launcher benchmark: a series of small members as local jobs, N at a time, against the sequential series.

    python -m benchmarks launcher [--members 4] [--jobs 2] [--epochs 3] [--train-images 512] [--repeats 1]
        [--workdir DIR] [--json PATH]

Writes synthetic files of two datasets, a recipe (timm's test_resnet at 28 px, no loader workers, CPU), and times
two commands end to end as a user runs them, in turns: `train.py --seeds 0,..,M-1` (the sequential series, one
process with every core's thread) and the same with `--launcher local --jobs N` (N jobs, each with cores / N
threads; each job is a fresh process that imports torch and timm). The figure is the wall-time ratio
local / sequential of each turn (median over --repeats); both runs see the same machine load, turn by turn.
The final digests of both series are compared as well: they are equal when each job has as many threads as the
sequential run (on CPU, a different thread count may round differently).

A benchmark, not a test: the local launcher's figures are printed beside their baseline (the sequential series)
and written to --json, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.common import machine, median, work_folder, write_result, write_synthetic_files
from mmpt.errors import MmptError
from mmpt.experiments.launch_plan import cpu_cores
from mmpt.io import markdown_table
from mmpt.tasks import resolve_tasks

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("breast", "pneumonia")


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `launcher` command to `python -m benchmarks`."""
    p = commands.add_parser("launcher", help="a series as local jobs, N at a time, against the sequential series")
    p.add_argument("--members", type=int, default=4, help="members of the series (seeds; default 4)")
    p.add_argument("--jobs", type=int, default=2, help="members at a time (default 2)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per member (default 3)")
    p.add_argument("--train-images", type=int, default=512, help="train images per dataset (default 512)")
    p.add_argument("--repeats", type=int, default=1, help="turns of (sequential, local); the median ratio counts")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--workdir", help="folder for data and runs (kept); default a temporary one (deleted)")


def run_command(args: argparse.Namespace) -> int:
    """Run the benchmark (table on stdout, progress on stderr); return the exit code. Raises MmptError."""
    for name in ("members", "jobs", "epochs", "repeats"):
        if getattr(args, name) < 1:
            raise MmptError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.train_images < 16:
        raise MmptError(f"--train-images must be >= 16, got {args.train_images}")
    result = run_launcher_benchmark(
        members=args.members,
        jobs=args.jobs,
        epochs=args.epochs,
        train_images=args.train_images,
        repeats=args.repeats,
        workdir=args.workdir,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(format_table(result))
    if args.json:
        write_result(args.json, result)
    return 0


def _timed(argv: list[str], threads: int, log_path: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.call(
            [sys.executable, str(REPO / "train.py"), *argv], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    seconds = time.perf_counter() - start
    if code != 0:
        raise MmptError(f"train.py {' '.join(argv)} exited with {code}; see {log_path}")
    return seconds


def _digests(folder: Path, members: int) -> list[str]:
    return [json.loads((folder / f"seed{k}" / "summary.json").read_text())["final_digest"] for k in range(members)]


def run_launcher_benchmark(
    *, members: int, jobs: int, epochs: int, train_images: int, repeats: int, workdir: str | None, log
) -> dict:
    """Time the sequential series and the local launcher's, in turns; return the figures."""
    cores = cpu_cores()
    info = machine()
    with work_folder(workdir, "mmpt-bench-launcher-") as work:
        data = work / "data"
        write_synthetic_files(data, 28, resolve_tasks(",".join(DATASETS)), train_images)
        recipe = work / "recipe.yaml"
        recipe.write_text(
            yaml.safe_dump(
                {
                    "name": "bench",
                    "data": {"root": str(data), "datasets": list(DATASETS), "num_workers": 0},
                    "model": {"backbone": "test_resnet"},
                    "input": {"mode": "native"},
                    "train": {"epochs": epochs, "batch_size": 32, "device": "cpu", "progress": False},
                }
            )
        )
        seeds = ",".join(str(k) for k in range(members))
        turns = []
        for turn in range(repeats):
            common = ["--config", str(recipe), "--seeds", seeds]
            seq_out, local_out = work / f"seq{turn}", work / f"local{turn}"
            log(f"turn {turn + 1}/{repeats}: sequential series of {members} members ({cores} threads)")
            seq_s = _timed([*common, "--output", str(seq_out)], cores, work / f"seq{turn}.log")
            each = max(1, cores // jobs)
            threads = f"{each} thread{'s' if each > 1 else ''} each"
            log(f"turn {turn + 1}/{repeats}: --launcher local --jobs {jobs} ({threads})")
            local_s = _timed(
                [*common, "--output", str(local_out), "--launcher", "local", "--jobs", str(jobs)],
                cores,
                work / f"local{turn}.log",
            )
            same = _digests(seq_out, members) == _digests(local_out, members)
            turns.append({"sequential_s": seq_s, "local_s": local_s, "ratio": local_s / seq_s, "same_digests": same})
    ratio = median([t["ratio"] for t in turns])
    return {
        "ratio": ratio,
        "turns": turns,
        "settings": {
            "members": members,
            "jobs": jobs,
            "epochs": epochs,
            "train_images": train_images,
            "cores": cores,
            "sequential_threads": cores,
            "job_threads": max(1, cores // jobs),
        },
        "machine": info,
    }


def format_table(result: dict) -> str:
    s = result["settings"]
    rows = [
        [
            "turn",
            f"--launcher local --jobs {s['jobs']}, wall s",
            "sequential series (baseline), wall s",
            "ratio",
            "same final digests",
        ]
    ]
    for k, turn in enumerate(result["turns"], 1):
        rows.append(
            [
                str(k),
                f"{turn['local_s']:.1f}",
                f"{turn['sequential_s']:.1f}",
                f"{turn['ratio']:.3f}",
                "yes" if turn["same_digests"] else "no",
            ]
        )
    rows.append([f"median of {len(result['turns'])}", "-", "-", f"{result['ratio']:.3f}", "-"])
    head = (
        f"{s['members']} members of {s['epochs']} epochs ({s['train_images']} train images x {len(DATASETS)} "
        f"datasets, test_resnet, CPU), {s['cores']} cores: sequential with {s['sequential_threads']} threads, "
        f"{s['jobs']} jobs with {s['job_threads']} each; load average at start "
        f"{result['machine']['load_avg_at_start'][0]:.1f}"
    )
    return head + "\n\n" + markdown_table(rows[0], rows[1:])
