"""Training benchmark: the engine's own step against a bare PyTorch loop, in one process on one device.

    python -m benchmarks train [--backbone B] [--resolution R] [--input-size S] [--batch-size N] [--steps S]
        [--precision auto|fp32|bf16|fp16] [--compile] [--channels-last] [--device D] [--no-determinism] [--no-tf32]
        [--json PATH]

(a) bare: the timm backbone (`mmpt.model.backbones.create_backbone`), one linear head and the same optimizer
    (`mmpt.training.optim.build_optimizers`, one optimizer over both), on one float S×S batch already on the device:
    forward under autocast, cross-entropy, backward, optimizer step, zero-grad. Nothing else.
(b) engine: `mmpt.training.step.TrainStep` with all 12 datasets' heads and their optimizers, fed by the real
    sampler (`Sampler.plan`), loader (`plan_loader`, workers as configured) and `DeviceTransform`, over
    synthetic files the benchmark writes; the loss sums are read at every logging interval, as in training.

Both see the same S×S input (`--input-size`, default the resolution: nothing is padded). They run in
short turns (2 bare steps, 2 engine steps, ... 25 times by default) and the turn with the median
engine/bare ratio gives the figures, so load on a shared machine falls on both alike; warm-up steps are not timed
(compiled, the warm-up reaches every dataset, so no timed step compiles), and on CUDA the benchmark synchronises
before reading a clock (on a GPU, use longer turns: `--steps 10 --repeats 5`). Both loops run as training runs by
default: determinism on, TF32 as train.tf32, train.precision auto. The JSON file is written after each part, so a
part that fails leaves the earlier ones' figures; a weighting that a run would refuse is recorded with its reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import (
    machine,
    median,
    peak_rss_bytes,
    synchronize,
    work_folder,
    write_result,
    write_synthetic_files,
)
from benchmarks.loops import BareLoop, EngineLoop, engine, time_steps
from benchmarks.train_mtl import CONFLICT_CASES, MTL_METHODS, measure_conflicts, measure_mtl_steps
from benchmarks.train_report import format_table, input_description, peak_flops
from mmpt.config import Config, DataConfig, TrainConfig, load_config
from mmpt.config.choices import DEVICE_NAMES, PRECISIONS
from mmpt.data.sampler import batches_per_task
from mmpt.errors import MmptError
from mmpt.model.backbones import resolve_backbone
from mmpt.runtime.distributed import select_device
from mmpt.runtime.precision import resolve_precision
from mmpt.runtime.process import configure_determinism
from mmpt.tasks import FLAGS, resolve_tasks
from mmpt.training.build import calibrate_step

# ---------------------------------------------------------------------------------------------
# the whole benchmark


def run_train_benchmark(
    *,
    backbone: str = "resnet18",
    resolution: int = 28,
    input_size: int | None = None,
    batch_size: int = 64,
    steps: int = 2,
    warmup_steps: int = 3,
    repeats: int = 25,
    precision: str = TrainConfig.precision,
    compile: bool = False,
    channels_last: bool = False,
    device: str = "auto",
    workers: int = DataConfig.num_workers,
    deterministic: bool = True,
    tf32: bool = TrainConfig.tf32,
    workdir: str | Path | None = None,
    mtl_methods: tuple[str, ...] = MTL_METHODS,
    mtl_tasks_per_step: int = 4,
    conflict_sources: tuple[str, ...] = tuple(CONFLICT_CASES),
    json_path: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Time the bare loop and the engine in turns, `repeats` times each; return the figures as a JSON-able dict.

    `input_size`: the model's input side, default `resolution` (no padding); images are zero-padded to it.
    Each loop first runs `warmup_steps` untimed (compiled: also until the engine has trained every dataset once);
    then `repeats` turns each time `steps` steps of the bare loop, then `steps` of the engine (whose loader and
    workers live through the whole run, as in an epoch). `deterministic`, `tf32` and `precision`: as training's
    determinism, train.tf32 and train.precision (their defaults are training's). `json_path`: written after each
    part with the figures so far. Raises MmptError for settings out of range or a backbone that cannot take the input.
    """
    input_size = resolution if input_size is None else input_size
    _check_settings(batch_size, steps, warmup_steps, repeats, workers, input_size, resolution)
    started = time.perf_counter()
    tasks = resolve_tasks(list(FLAGS))
    # compiled, the warm-up runs until every dataset has had a step: at most one pass over the 12 one-batch splits
    compile_warmup = len(tasks) if compile else 0
    cfg = load_config(
        overrides=[
            {
                "name": "bench",
                "determinism": deterministic,
                "data": {"datasets": list(FLAGS), "resolution": resolution, "num_workers": workers},
                "model": {"backbone": backbone, "img_size": input_size},
                "input": {"mode": "pad"},
                # every step a full batch; one epoch of warm-up plus all timed steps (passes repeat as needed)
                "sampler": {
                    "steps_per_epoch": warmup_steps + compile_warmup + repeats * steps,
                    "last_batch": "drop",
                },
                # epochs only size the LR schedules (long ones, as in training); the benchmark runs part of one
                "train": {
                    "batch_size": batch_size,
                    "epochs": 1000,
                    "precision": precision,
                    "tf32": tf32,
                    "compile": compile,
                    "channels_last": channels_last,
                    "device": device,
                },
            }
        ]
    )
    torch_device = select_device(cfg.train.device)
    machine_info = machine(torch_device)
    runs_in = resolve_precision(precision, torch_device)

    settings = {
        "backbone": backbone,
        "timm_name": resolve_backbone(backbone),
        "resolution": resolution,
        "input_size": input_size,
        "input": input_description(resolution, input_size),
        "batch_size": batch_size,
        "steps": steps,
        "warmup_steps": warmup_steps,
        "repeats": repeats,
        "precision": runs_in,
        "precision_setting": precision,
        "compile": compile,
        "channels_last": channels_last,
        "device": str(torch_device),
        "device_type": torch_device.type,
        "device_name": machine_info["device_name"],
        "workers": workers,
        "deterministic": deterministic,
        "tf32": tf32,
        "as_training": deterministic and tf32 == TrainConfig.tf32 and precision == TrainConfig.precision,
        "datasets": len(tasks),
        "optimizer": cfg.optim.name,
        "lr": cfg.optim.lr,
        "weight_decay": cfg.optim.weight_decay,
        "log_every_steps": cfg.train.log_every_steps,
    }
    log(
        f"{settings['timm_name']}, input {settings['input']}, batch {batch_size}, {runs_in}, {torch_device}"
        + (" compiled" if compile else "")
        + (" channels_last" if channels_last else "")
        + f", determinism {'on' if deterministic else 'off'}, TF32 {'on' if tf32 else 'off'}"
    )
    result: dict = {"settings": settings, "machine": machine_info, "complete": False}

    def save() -> None:  # after each part: a later failure keeps what was measured
        if json_path is not None:
            result["wall_s"] = time.perf_counter() - started
            write_result(json_path, result)

    with work_folder(workdir, "mmpt-bench-train-") as work:
        root = work / "medmnist"
        log(f"writing synthetic files of {len(tasks)} datasets at {resolution} px into {root}")
        # one full batch per dataset and pass: each step reads a whole split, through the real store
        write_synthetic_files(root, resolution, tasks, train_samples=batch_size)
        total_steps = warmup_steps + compile_warmup + repeats * steps
        # the run's own data, plan and loader: `total_steps` full batches, the benchmark's loader workers
        timed = dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, root=str(root), num_workers=workers),
            sampler=dataclasses.replace(cfg.sampler, steps_per_epoch=total_steps, last_batch="drop"),
        )
        configure_determinism(cfg.train.seed, cfg.determinism, cfg.train.tf32)
        bare = BareLoop(cfg, torch_device)
        flops_per_step = bare.flops()
        setup = engine(timed, torch_device)
        step, splits, loader = setup.step, setup.train_splits, setup.train_loader(0)
        cfg = timed
        loops = {"bare": bare, "engine": EngineLoop(step, loader, cfg.train.log_every_steps)}
        for loop in loops.values():
            for _ in range(warmup_steps):
                loop()
        while compile and len(loops["engine"].seen) < len(tasks):  # every dataset's layout before the clock
            loops["engine"]()
        loops["engine"].wait_s = 0.0
        runs: dict[str, list[dict]] = {"bare": [], "engine": []}
        peaks = {"bare": 0, "engine": 0}
        calibration_s: list[float] = []  # one calibration batch of every dataset per turn, after the engine's steps
        for repeat in range(repeats):
            for name, loop in loops.items():
                if torch_device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(torch_device)
                runs[name].append(time_steps(loop, torch_device, steps))
                if torch_device.type == "cuda":
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(torch_device))
            seconds = _time_calibration(step, splits, cfg, torch_device, repeat)
            if seconds is not None:
                calibration_s.append(seconds)
            if (repeat + 1) % max(1, repeats // 5) == 0 or repeat + 1 == repeats:
                log(
                    f"turn {repeat + 1}/{repeats}: bare {runs['bare'][-1]['img_s']:,.1f} img/s, "
                    f"engine {runs['engine'][-1]['img_s']:,.1f} img/s"
                )
        wait_s = loops["engine"].wait_s
        del loops, loader  # stops the loader's workers
        bare_runs, engine_runs = runs["bare"], runs["engine"]
        result.update(
            _main_figures(
                bare_runs,
                engine_runs,
                peaks,
                wait_s,
                calibration_s,
                tasks,
                steps,
                batch_size,
                flops_per_step,
                torch_device,
                machine_info["device_name"],
                runs_in,
            )
        )
        result["repeats"] = {"bare": bare_runs, "engine": engine_runs}
        save()
        mtl = measure_mtl_steps(
            cfg,
            len(tasks),
            torch_device,
            mtl_methods,
            mtl_tasks_per_step,
            steps=steps,
            warmup_steps=warmup_steps,
            repeats=max(3, repeats // 5),
            log=log,
        )
        result.update({f"mtl_step_ratio.{method}": ratio for method, ratio in mtl["ratios"].items()}, mtl=mtl)
        save()
        conflicts = measure_conflicts(
            cfg,
            torch_device,
            conflict_sources,
            steps=steps,
            warmup_steps=warmup_steps,
            repeats=max(3, repeats // 5),
            log=log,
        )
        result.update({f"conflict_cost.{source}": c["cost_at_default"] for source, c in conflicts.items()})
        result["conflicts"] = conflicts
    result["complete"] = True
    result["wall_s"] = time.perf_counter() - started
    save()
    return result


def _main_figures(
    bare_runs: list[dict],
    engine_runs: list[dict],
    peaks: dict[str, int],
    wait_s: float,
    calibration_s: list[float],
    tasks,
    steps: int,
    batch_size: int,
    flops_per_step: float,
    torch_device: torch.device,
    device_name: str,
    precision: str,
) -> dict:
    """The engine against the bare loop from their turns: the median turn's figures, MFU, memory, calibration."""
    repeats = len(bare_runs)
    calibration = _calibration_figures(calibration_s, engine_runs, tasks, steps, batch_size)
    # the turn whose engine/bare ratio is the median (the lower middle of an even count): a ratio of two
    # loops timed side by side, robust to load that changes during the run, as medians of each loop are not
    ratios = [e["img_s"] / b["img_s"] for b, e in zip(bare_runs, engine_runs)]
    middle = sorted(range(repeats), key=ratios.__getitem__)[(repeats - 1) // 2]
    bare_img_s, engine_img_s = bare_runs[middle]["img_s"], engine_runs[middle]["img_s"]
    flops_per_image = flops_per_step / batch_size
    peak = peak_flops(device_name, precision) if torch_device.type == "cuda" else None
    return {
        "bare_img_s": bare_img_s,
        "engine_img_s": engine_img_s,
        "engine_vs_bare": engine_img_s / bare_img_s,
        "median_turn": middle,
        "img_s_median_over_turns": {
            "bare": median([r["img_s"] for r in bare_runs]),
            "engine": median([r["img_s"] for r in engine_runs]),
        },
        "peak_memory_bytes": max(peaks.values()) if torch_device.type == "cuda" else peak_rss_bytes(),
        "mfu": engine_img_s * flops_per_image / peak if peak else None,
        "bare_mfu": bare_img_s * flops_per_image / peak if peak else None,
        "flops_per_image": flops_per_image,
        "engine_tflop_s": engine_img_s * flops_per_image / 1e12,
        "peak_flop_s": peak,
        "engine_loader_wait_fraction": wait_s / sum(r["seconds"] for r in engine_runs),
        "memory_meter": (
            "torch.cuda.max_memory_allocated, the larger of the two loops"
            if torch_device.type == "cuda"
            else "peak resident set of the benchmark process (ru_maxrss), both loops, workers excluded"
        ),
        **(
            {"bare_peak_memory_bytes": peaks["bare"], "engine_peak_memory_bytes": peaks["engine"]}
            if torch_device.type == "cuda"
            else {}
        ),
        "norm_calibration_vs_epoch": calibration["vs_epoch"] if calibration else None,
        "norm_calibration": calibration,
    }


def _time_calibration(step, splits: dict, cfg: Config, device: torch.device, turn: int) -> float | None:
    """Seconds of one calibration batch of every dataset, as `mmpt.training.loop.run` calibrates before a validation
    (the benchmark's splits hold one batch each, so the default reads that batch); None for a backbone without
    per-dataset statistics."""
    synchronize(device)
    start = time.perf_counter()
    done = calibrate_step(cfg, step, splits, epoch=turn)
    synchronize(device)
    step.model.train()  # calibration leaves the model in eval mode; the engine's next turn trains it
    return time.perf_counter() - start if done else None


def _calibration_figures(
    calibration_s: list[float], engine_runs: list[dict], tasks, steps: int, batch_size: int
) -> dict | None:
    """The calibration's cost at the default model.norm_calibration_batches against an epoch of the 12 MedMNIST+
    train splits (medmnist.INFO's sizes) at this batch size: from each turn's seconds per calibration batch over
    the engine's seconds per step, the median over turns."""
    if not calibration_s:
        return None
    batches = Config().model.norm_calibration_batches
    sizes = {t.flag: t.split_size("train") for t in tasks}
    # images the calibration reads (at most `batches` full batches per dataset), in batches of batch_size
    calibration_batches = sum(min(n, batches * batch_size) for n in sizes.values()) / batch_size
    epoch_steps = sum(batches_per_task(sizes, batch_size).values())
    per_turn = [
        (seconds / len(tasks)) / (engine["seconds"] / steps) for seconds, engine in zip(calibration_s, engine_runs)
    ]
    batch_vs_step = median(per_turn)
    return {
        "vs_epoch": batch_vs_step * calibration_batches / epoch_steps,
        "batch_vs_step": batch_vs_step,
        "batches_per_dataset": batches,
        "calibration_batches": calibration_batches,
        "epoch_steps": epoch_steps,
    }


def _check_settings(
    batch_size: int, steps: int, warmup_steps: int, repeats: int, workers: int, input_size: int, resolution: int
) -> None:
    problems = [
        f"{name} must be >= {least}, got {value}"
        for name, value, least in (
            ("--batch-size", batch_size, 2),
            ("--steps", steps, 1),
            ("--warmup-steps", warmup_steps, 1),
            ("--repeats", repeats, 1),
            ("--workers", workers, 0),
            ("--input-size", input_size, 8),
        )
        if value < least
    ]
    if not problems and input_size < resolution:
        problems.append(
            f"--input-size {input_size} is smaller than --resolution {resolution}; the engine pads up "
            "to the input size: give an input size of at least the resolution"
        )
    if problems:
        raise MmptError("; ".join(problems))


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `train` command to `python -m benchmarks`."""
    train = commands.add_parser("train", help="the engine's training step against a bare PyTorch loop")
    train.add_argument("--backbone", default="resnet18", help="an alias (vit_b16, resnet18, ...) or a timm name")
    train.add_argument("--resolution", type=int, default=28, help="stored image size: 28, 64, 128 or 224")
    train.add_argument(
        "--input-size",
        type=int,
        help="model input side; images are zero-padded to it (default: the resolution, nothing padded)",
    )
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--steps", type=int, default=2, help="timed steps per turn and loop")
    train.add_argument("--warmup-steps", type=int, default=3, help="untimed steps of each loop before the turns")
    train.add_argument(
        "--repeats",
        type=int,
        default=25,
        help="turns: timed runs per loop, alternating (the turn with the median ratio counts)",
    )
    train.add_argument(
        "--precision", choices=PRECISIONS, default=TrainConfig.precision, help="as train.precision (default: its)"
    )
    train.add_argument("--compile", action="store_true", help="torch.compile the backbone (both loops)")
    train.add_argument("--channels-last", action="store_true", help="channels-last memory format (both loops)")
    train.add_argument("--device", default="auto", help=DEVICE_NAMES)
    train.add_argument("--workers", type=int, default=DataConfig.num_workers, help="the engine's loader workers")
    train.add_argument(
        "--no-determinism",
        dest="deterministic",
        action="store_false",
        help="cuDNN autotuning and nondeterministic kernels (training's default is determinism on, as measured)",
    )
    train.add_argument("--no-tf32", dest="tf32", action="store_false", help="full float32 (train.tf32 false)")
    train.add_argument(
        "--mtl-methods",
        default=",".join(MTL_METHODS),
        help="loss weightings to time at several datasets per step, the first the reference "
        "(JSON mtl_step_ratio.<method>; empty to skip)",
    )
    train.add_argument("--mtl-tasks-per-step", type=int, default=4, help="datasets per step of that comparison")
    train.add_argument(
        "--conflict-sources",
        default=",".join(CONFLICT_CASES),
        help="gradient-conflict diagnostic sources to time, on against off (JSON conflict_cost.<source>: the cost "
        "at the default interval; empty to skip)",
    )
    train.add_argument("--json", help="write the figures to this JSON file")
    train.add_argument("--workdir", help="folder for the synthetic files (kept); default a temporary one (deleted)")


def run_command(args: argparse.Namespace) -> int:
    """Run the benchmark (table on stdout, progress on stderr); return the exit code. Raises MmptError."""
    result = run_train_benchmark(
        backbone=args.backbone,
        resolution=args.resolution,
        input_size=args.input_size,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        repeats=args.repeats,
        precision=args.precision,
        compile=args.compile,
        channels_last=args.channels_last,
        device=args.device,
        workers=args.workers,
        deterministic=args.deterministic,
        tf32=args.tf32,
        workdir=args.workdir,
        mtl_methods=tuple(m for m in args.mtl_methods.split(",") if m),
        mtl_tasks_per_step=args.mtl_tasks_per_step,
        conflict_sources=tuple(s for s in args.conflict_sources.split(",") if s),
        json_path=args.json,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(format_table(result))
    return 0
