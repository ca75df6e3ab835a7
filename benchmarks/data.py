"""Data benchmark: mmpt's loader against the original mm-PT PIL pipeline, memory while iterating, data wait.

    python -m benchmarks data [--images N] [--workers W] [--batch-size B] [--json PATH] [--workdir DIR]

Three measurements in one run, on synthetic MedMNIST-format files written into one work folder:

1. throughput: images/s of mmpt's loader (uint8 batches out; and with the DeviceTransform to a
   224 input, run on the CPU) against the original mm-PT pipeline (medmnist's dataset class reading
   the npz into RAM, per-sample PIL, torchvision ToTensor/Normalize/Pad, DataLoader with shuffle),
   at 28 -> 224 pad and at native 224, same workers, batch size and number of timed images;
2. memory: peak unreclaimable memory (the proportional share of anonymous + shared memory, summed
   over the main process and its DataLoader workers; page cache excluded) while iterating one epoch
   over a 224 px RGB set, memory-mapped (mmpt's store) against loaded into RAM (np.load, as the original
   code did), each in a fresh subprocess, above the process's own interpreter/torch baseline;
3. data wait: the share of a training step's time spent blocked in next(loader) for a small
   backbone on the CPU, each step the engine's own (`mmpt.training.step.TrainStep`).

A benchmark, not a test: the figures are printed beside their baseline, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import operator
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    MEMORY_INTERVAL_S,
    MemorySampler,
    machine,
    pss_anon_shmem,
    rss_anon_shmem,
    work_folder,
    write_result,
)
from benchmarks.datafiles import (
    INPUT_SIZE,
    THROUGHPUT_TASK,
    memory_split,
    mmpt_loader,
    pil_loader,
    write_memory_set,
    write_throughput_files,
)
from benchmarks.loops import engine
from mmpt.config import load_config
from mmpt.data.loader import plan_loader
from mmpt.data.sampler import Sampler
from mmpt.data.store import TaskData, open_task
from mmpt.data.transforms import IMAGENET_MEAN, IMAGENET_STD, DeviceTransform
from mmpt.errors import MmptError
from mmpt.io import markdown_table
from mmpt.tasks import TASKS

PIPELINES = ("loader", "loader+transform", "pil")
MEMORY_TASK = "pathmnist"  # the memory set is RGB 224 px, the largest images MedMNIST+ has

# ---------------------------------------------------------------------------------------------
# 1. throughput


def _part_images(parts: list) -> torch.Tensor:
    return parts[0].images


def _unchanged(images: torch.Tensor) -> torch.Tensor:
    return images


def _time_batches(
    batches: Iterator, images_of: Callable, consume: Callable, warmup_batches: int, timed_batches: int
) -> tuple[int, float]:
    """Skip `warmup_batches`, then return (images, seconds) over the next `timed_batches` consumed batches."""
    for _ in range(warmup_batches):
        consume(images_of(next(batches)))
    images = 0
    start = time.perf_counter()
    for _ in range(timed_batches):
        x = images_of(next(batches))
        consume(x)
        images += len(x)
    return images, time.perf_counter() - start


def measure_throughput(
    root: Path,
    resolution: int,
    *,
    pipeline: str,
    workers: int,
    batch_size: int,
    warmup_batches: int,
    timed_batches: int,
    task: str = THROUGHPUT_TASK,
    input_size: int = INPUT_SIZE,
) -> dict:
    """Return {"images", "seconds", "img_s", "img_s_per_worker"} of one pipeline on `task` at `resolution`.

    pipeline: "loader" (mmpt, uint8 batches out), "loader+transform" (mmpt plus DeviceTransform to
    `input_size` on the CPU, in the timed loop), or "pil" (the original per-sample pipeline).
    The train split must hold at least (warmup_batches + timed_batches) * batch_size images.
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")
    if pipeline == "pil":
        loader = pil_loader(root, task, resolution, batch_size=batch_size, workers=workers, input_size=input_size)
        images_of = operator.itemgetter(0)  # (images, labels)
    else:
        loader = mmpt_loader(root, task, resolution, batch_size=batch_size, workers=workers)
        images_of = _part_images  # [Part(task, images, labels, global_size)]
    assert len(loader) >= warmup_batches + timed_batches, (
        f"{task} at {resolution} px has {len(loader)} batches, fewer than the {warmup_batches + timed_batches} timed"
    )
    consume: Callable = _unchanged
    if pipeline == "loader+transform":
        consume = DeviceTransform(input_size=input_size, mode="pad", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    batches = iter(loader)
    images, seconds = _time_batches(batches, images_of, consume, warmup_batches, timed_batches)
    del batches  # shuts the workers down before the next pipeline starts its own
    gc.collect()
    img_s = images / seconds
    return {"images": images, "seconds": seconds, "img_s": img_s, "img_s_per_worker": img_s / max(workers, 1)}


def _median_run(runs: list[dict]) -> dict:
    """The run with the median img/s (the lower middle of an even count), all runs' figures under "repeats"."""
    ranked = sorted(runs, key=lambda run: run["img_s"])
    return {**ranked[(len(ranked) - 1) // 2], "repeats": runs}


# ---------------------------------------------------------------------------------------------
# 2. memory


def memory_scenario(
    path: Path, *, in_ram: bool, workers: int, batch_size: int, interval_s: float = MEMORY_INTERVAL_S
) -> dict:
    """Iterate one epoch of mmpt's loader over the .npy at `path`, memory-mapped or loaded into RAM first.

    Returns baseline_bytes (this process before touching the data), peak_bytes (largest Pss_Anon +
    Pss_Shmem of this process and its workers while loading and iterating), peak_rss_bytes (the same
    with RssAnon + RssShmem), batches and samples. Meant to run in a fresh process (see measure_memory).
    """
    shape = np.load(path, mmap_mode="r").shape
    plan = Sampler({MEMORY_TASK: shape[0]}, batch_size).plan(0)
    gc.collect()
    baseline, baseline_rss = pss_anon_shmem(os.getpid()), rss_anon_shmem(os.getpid())
    batches = 0
    with MemorySampler(os.getpid(), interval_s) as sampler:
        split = memory_split(path, in_ram)
        for _ in plan_loader({MEMORY_TASK: split}, plan, num_workers=workers, seed=0):
            batches += 1
    return {
        "baseline_bytes": baseline,
        "peak_bytes": sampler.peak_bytes,
        "baseline_rss_bytes": baseline_rss,
        "peak_rss_bytes": sampler.peak_rss_bytes,
        "processes": sampler.peak_processes,
        "batches": batches,
        "samples": sampler.samples,
    }


def measure_memory(path: Path, *, in_ram: bool, workers: int, batch_size: int) -> dict:
    """Run memory_scenario in a fresh `python -m benchmarks _memory` process and return its figures
    plus data_bytes, above_baseline_bytes and fraction = (peak - baseline) / data_bytes.

    Raises RuntimeError when the subprocess fails.
    """
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "_memory",
        "--path",
        str(path),
        "--workers",
        str(workers),
        "--batch-size",
        str(batch_size),
        *(["--in-ram"] if in_ram else []),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory scenario failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    shape = np.load(path, mmap_mode="r").shape
    figures["data_bytes"] = math.prod(shape)
    figures["above_baseline_bytes"] = figures["peak_bytes"] - figures["baseline_bytes"]
    figures["fraction"] = figures["above_baseline_bytes"] / figures["data_bytes"]
    return figures


# ---------------------------------------------------------------------------------------------
# 3. data wait


def measure_data_wait(
    path: Path,
    *,
    backbone: str,
    workers: int,
    batch_size: int,
    warmup_steps: int,
    timed_steps: int,
    input_size: int = INPUT_SIZE,
) -> dict:
    """Train `backbone` on the CPU with the engine's own step (`mmpt.training.step.TrainStep`: transform to
    `input_size`, forward, loss, backward, optimizer steps) on batches from plan_loader over the
    memory-mapped .npy at `path` (as MEMORY_TASK).

    Returns wait_s (time blocked in next(loader)), step_s (whole steps) and fraction = wait_s / step_s
    over `timed_steps` after `warmup_steps`.
    """
    split = memory_split(path, in_ram=False)
    steps = warmup_steps + timed_steps
    available = len(split) // batch_size + (len(split) % batch_size > 0)
    assert available >= steps, f"{len(split)} images give {available} batches of {batch_size}, fewer than {steps} steps"
    cfg = load_config(
        overrides=[
            {
                "data": {"datasets": [MEMORY_TASK], "num_workers": workers},
                "model": {"backbone": backbone, "img_size": input_size},
                "input": {"mode": "pad"},
                "sampler": {"steps_per_epoch": steps},
                "train": {"batch_size": batch_size, "epochs": 1, "device": "cpu"},
            }
        ]
    )
    torch.manual_seed(0)
    # the run's own step and loader over the memory-mapped file
    data = {MEMORY_TASK: TaskData(TASKS[MEMORY_TASK], split.shape[1], {"train": split})}
    setup = engine(cfg, torch.device("cpu"), data=data)
    step = setup.step
    batches = iter(setup.train_loader(0))
    wait_s = step_s = 0.0
    for number in range(steps):
        start = time.perf_counter()
        parts = next(batches)
        ready = time.perf_counter()
        step(parts, number)
        end = time.perf_counter()
        if number >= warmup_steps:
            wait_s += ready - start
            step_s += end - start
    del batches
    step.read_losses()  # as the training loop does at each logging interval
    return {
        "backbone": backbone,
        "batch_size": batch_size,
        "steps": timed_steps,
        "wait_s": wait_s,
        "step_s": step_s,
        "seconds_per_step": step_s / timed_steps,
        "fraction": wait_s / step_s,
    }


# ---------------------------------------------------------------------------------------------
# the whole benchmark


def run_data_benchmark(
    *,
    images: int = 20_000,
    workers: int = 2,
    batch_size: int = 64,
    workdir: str | Path | None = None,
    warmup_batches: int | None = None,
    timed_batches: int = 32,
    repeats: int = 3,
    backbone: str = "test_resnet",
    wait_batch_size: int = 32,
    wait_steps: int = 12,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the three measurements on one set of synthetic files; return the figures as a JSON-able dict.

    `images`: images in the 224 px RGB memory set (also the data-wait data). The throughput files hold
    (warmup_batches + timed_batches) * batch_size train images (warmup_batches defaults to 2 per worker);
    each pipeline is timed `repeats` times, in turns, and the median run counts.
    `workdir`: where files go; None = a temporary folder, deleted afterwards (a given folder is kept).
    The top-level keys loader_vs_pil_pad, loader_vs_pil_native, rss_fraction and data_wait_fraction
    are the headline figures.
    Raises MmptError for settings out of range (or too few images for the data-wait steps).
    """
    _check_settings(images, workers, batch_size, timed_batches, repeats, wait_batch_size, wait_steps)
    started = tick = time.perf_counter()
    phase_s: dict[str, float] = {}
    warmup_batches = max(2, 2 * workers) if warmup_batches is None else warmup_batches
    machine_info = machine()
    with work_folder(workdir, "mmpt-bench-") as work:
        root = work / "medmnist"
        log(f"writing synthetic {THROUGHPUT_TASK} files into {root}")
        train_images = (warmup_batches + timed_batches) * batch_size
        write_throughput_files(root, train_images)
        phase_s["write_throughput_files"] = time.perf_counter() - tick
        tick = time.perf_counter()
        throughput = {}
        for name, resolution in (("pad", 28), ("native", INPUT_SIZE)):
            open_task(root, TASKS[THROUGHPUT_TASK], resolution)  # unpack once, outside the timed runs
            repeats_of: dict[str, list[dict]] = {pipeline: [] for pipeline in PIPELINES}
            # pipelines take turns, so a change in the machine's load falls on all of them alike
            for _ in range(repeats):
                for pipeline in PIPELINES:
                    repeats_of[pipeline].append(
                        measure_throughput(
                            root,
                            resolution,
                            pipeline=pipeline,
                            workers=workers,
                            batch_size=batch_size,
                            warmup_batches=warmup_batches,
                            timed_batches=timed_batches,
                        )
                    )
            runs = {pipeline: _median_run(repeats_of[pipeline]) for pipeline in PIPELINES}
            for pipeline, run in runs.items():
                log(
                    f"throughput {resolution} -> {INPUT_SIZE} {pipeline}: {run['img_s']:.0f} img/s "
                    f"(median of {[round(r['img_s']) for r in run['repeats']]})"
                )
            pil = runs["pil"]["img_s_per_worker"]
            throughput[name] = {
                "resolution": resolution,
                "input_size": INPUT_SIZE,
                "runs": runs,
                "loader_vs_pil": runs["loader"]["img_s_per_worker"] / pil,
                "loader_transform_vs_pil": runs["loader+transform"]["img_s_per_worker"] / pil,
            }
        phase_s["throughput"] = time.perf_counter() - tick
        tick = time.perf_counter()

        memory_path = work / "memory_set.npy"
        log(f"writing the memory set: {images} RGB images at {INPUT_SIZE} px into {memory_path}")
        data_bytes = write_memory_set(memory_path, images)
        memory = {"images": images, "data_bytes": data_bytes}
        phase_s["write_memory_set"] = time.perf_counter() - tick
        tick = time.perf_counter()
        for name, in_ram in (("mmap", False), ("ram", True)):
            memory[name] = measure_memory(memory_path, in_ram=in_ram, workers=workers, batch_size=batch_size)
            log(
                f"memory {name}: peak {memory[name]['peak_bytes'] / 2**20:.0f} MiB, baseline "
                f"{memory[name]['baseline_bytes'] / 2**20:.0f} MiB, {memory[name]['fraction']:.1%} of the data"
            )
        phase_s["memory"] = time.perf_counter() - tick
        tick = time.perf_counter()

        log(f"data wait: {backbone}, batch {wait_batch_size}, {wait_steps} steps")
        data_wait = measure_data_wait(
            memory_path,
            backbone=backbone,
            workers=workers,
            batch_size=wait_batch_size,
            warmup_steps=2,
            timed_steps=wait_steps,
        )
        phase_s["data_wait"] = time.perf_counter() - tick

    result = {
        "loader_vs_pil_pad": throughput["pad"]["loader_vs_pil"],
        "loader_vs_pil_native": throughput["native"]["loader_vs_pil"],
        "rss_fraction": memory["mmap"]["fraction"],
        "data_wait_fraction": data_wait["fraction"],
        "throughput": throughput,
        "memory": memory,
        "data_wait": data_wait,
        "settings": {
            "workers": workers,
            "batch_size": batch_size,
            "warmup_batches": warmup_batches,
            "timed_batches": timed_batches,
            "repeats": repeats,
            "throughput_task": THROUGHPUT_TASK,
            "memory_task": MEMORY_TASK,
            "memory_meter": "Pss_Anon + Pss_Shmem (/proc/<pid>/smaps_rollup), main process + workers",
        },
        "machine": machine_info,
    }
    result["phase_s"] = phase_s
    result["wall_s"] = time.perf_counter() - started
    return result


def _check_settings(
    images: int, workers: int, batch_size: int, timed_batches: int, repeats: int, wait_batch_size: int, wait_steps: int
) -> None:
    problems = [
        f"{name} must be >= {least}, got {value}"
        for name, value, least in (
            ("--workers", workers, 0),
            ("--batch-size", batch_size, 1),
            ("--timed-batches", timed_batches, 1),
            ("--repeats", repeats, 1),
            ("--wait-batch-size", wait_batch_size, 1),
            ("--wait-steps", wait_steps, 1),
        )
        if value < least
    ]
    # the data-wait run takes its batches from the memory set: 2 warm-up steps plus the timed ones
    least_images = (2 + wait_steps) * wait_batch_size
    if not problems and images < least_images:
        problems.append(f"--images must be >= (2 + --wait-steps) * --wait-batch-size = {least_images}")
    if problems:
        raise MmptError("; ".join(problems))


def format_table(result: dict) -> str:
    """Return the benchmark's figures as a Markdown table: measurement | mmpt | baseline | ratio."""
    workers = result["settings"]["workers"]
    rows = [("measurement", "mmpt", "baseline", "ratio")]
    for name, label in (("pad", "28 -> 224 pad"), ("native", "native 224")):
        t = result["throughput"][name]
        loader, transformed, pil = (t["runs"][p]["img_s_per_worker"] for p in ("loader", "loader+transform", "pil"))
        rows.append(
            (f"img/s per worker, {label}, uint8 out", f"{loader:,.0f}", f"{pil:,.0f}", f"{t['loader_vs_pil']:.1f}x")
        )
        ratio = f"{t['loader_transform_vs_pil']:.1f}x"
        rows.append((f"img/s per worker, {label}, + transform on CPU", f"{transformed:,.0f}", f"{pil:,.0f}", ratio))
    memory = result["memory"]
    mmap, ram = memory["mmap"], memory["ram"]
    above = [m["above_baseline_bytes"] for m in (mmap, ram)]
    label = f"peak memory above baseline, {memory['images']:,} imgs ({memory['data_bytes'] / 2**30:.2f} GiB)"
    rows.append((label, f"{above[0] / 2**20:,.0f} MiB", f"{above[1] / 2**20:,.0f} MiB", f"{above[0] / above[1]:.3f}"))
    rows.append(("  as a fraction of the data's bytes", f"{mmap['fraction']:.1%}", f"{ram['fraction']:.1%}", "-"))
    rss = [(m["peak_rss_bytes"] - m["baseline_rss_bytes"]) / m["data_bytes"] for m in (mmap, ram)]
    label = "  same from RssAnon+RssShmem (counts fork-shared pages per process)"
    rows.append((label, f"{rss[0]:.1%}", f"{rss[1]:.1%}", "-"))
    base = [f"{m['baseline_bytes'] / 2**20:,.0f} MiB" for m in (mmap, ram)]
    rows.append(("  interpreter/torch baseline (not counted)", *base, "-"))
    wait = result["data_wait"]
    label = f"data wait, {wait['backbone']} batch {wait['batch_size']}, {wait['seconds_per_step']:.2f} s/step"
    rows.append((label, f"{wait['fraction']:.1%}", "-", "-"))
    lines = [markdown_table(rows[0], rows[1:])]
    load = result["machine"]["load_avg_at_start"][0]
    lines.append(
        f"\n{result['machine']['cpus']} CPUs, {workers} workers, batch {result['settings']['batch_size']}, "
        f"load average {load:.1f} at start, wall time {result['wall_s']:.0f} s; baseline: the per-sample PIL "
        "pipeline (throughput), the split read into RAM (memory)"
    )
    return "\n".join(lines)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `data` command and the internal `_memory` command to `python -m benchmarks`."""
    data = commands.add_parser("data", help="loader throughput, memory while iterating, data wait")
    data.add_argument("--images", type=int, default=20_000, help="images in the 224 px RGB memory set (150 KB each)")
    data.add_argument("--workers", type=int, default=2, help="DataLoader workers, the same for every pipeline")
    data.add_argument("--batch-size", type=int, default=64)
    data.add_argument("--timed-batches", type=int, default=32, help="batches timed per throughput run")
    data.add_argument("--repeats", type=int, default=3, help="throughput runs per pipeline (the median counts)")
    data.add_argument("--backbone", default="test_resnet", help="timm model of the data-wait steps")
    data.add_argument("--wait-batch-size", type=int, default=32)
    data.add_argument("--wait-steps", type=int, default=12, help="timed training steps of the data-wait run")
    data.add_argument("--json", help="write the figures to this JSON file")
    data.add_argument("--workdir", help="folder for the synthetic files (kept); default a temporary one (deleted)")
    memory = commands.add_parser("_memory")  # internal: one memory scenario, figures as JSON on stdout
    memory.add_argument("--path", required=True)
    memory.add_argument("--in-ram", action="store_true")
    memory.add_argument("--workers", type=int, required=True)
    memory.add_argument("--batch-size", type=int, required=True)


def run_command(args: argparse.Namespace) -> int:
    """Run `data` (table on stdout, progress on stderr) or `_memory` (JSON on stdout); return the exit code.

    Raises MmptError for settings out of range.
    """
    if args.command == "_memory":
        figures = memory_scenario(Path(args.path), in_ram=args.in_ram, workers=args.workers, batch_size=args.batch_size)
        print(json.dumps(figures))
        return 0
    result = run_data_benchmark(
        images=args.images,
        workers=args.workers,
        batch_size=args.batch_size,
        workdir=args.workdir,
        timed_batches=args.timed_batches,
        repeats=args.repeats,
        backbone=args.backbone,
        wait_batch_size=args.wait_batch_size,
        wait_steps=args.wait_steps,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(format_table(result))
    if args.json:
        write_result(args.json, result)
    return 0
