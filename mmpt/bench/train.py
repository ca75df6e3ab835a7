"""Training benchmark: the engine's own step against a bare PyTorch loop, in one process on one device.

    python -m mmpt.bench train [--backbone B] [--resolution R] [--input-size S] [--batch-size N] [--steps S]
        [--precision auto|fp32|bf16|fp16] [--compile] [--channels-last] [--device D] [--no-determinism] [--no-tf32]
        [--json PATH]

(a) bare: the timm backbone (`mmpt.backbones.create_backbone`), one linear head and the same optimizer
    (`mmpt.optim.build_optimizers`, one optimizer over both), on one float S×S batch already on the device:
    forward under autocast, cross-entropy, backward, optimizer step, zero-grad. Nothing else.
(b) engine: `mmpt.step.TrainStep` with all 12 datasets' heads and their optimizers, fed by the real
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
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mmpt.backbones import resolve_backbone
from mmpt.bench.common import (
    engine_step,
    machine,
    markdown_table,
    median,
    peak_rss_bytes,
    synchronize,
    work_folder,
    write_result,
    write_synthetic_files,
)
from mmpt.bench.loops import BareLoop, EngineLoop, time_steps
from mmpt.choices import DEVICE_NAMES, PRECISIONS
from mmpt.config import Config, DataConfig, TrainConfig, from_dict, load_config, to_dict
from mmpt.conflicts import AUTO_EVERY_STEPS, BATCHES, GRAMIAN, STEP
from mmpt.data.loader import plan_loader
from mmpt.data.sampler import Sampler, batches_per_task
from mmpt.data.store import open_data
from mmpt.distributed import select_device
from mmpt.errors import MmptError
from mmpt.precision import resolve_precision
from mmpt.recipe import calibrate_step, check_run
from mmpt.runtime import configure_determinism
from mmpt.tasks import FLAGS, resolve_tasks

# Dense peak FLOP/s (no 2:4 sparsity) by GPU, from NVIDIA's data sheets, which print the tensor-core figures with
# sparsity (twice these); "tf32" is float32 on tensor cores (train.tf32). The first pattern found as a whole word in
# torch.cuda.get_device_name() wins, so the NVL and PCIe cards come before the SXM part of their name.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    # H100 data sheet: NVL 1,671 TFLOPS bf16 with sparsity, TF32 835, FP32 60; PCIe 1,513, 756, 51; SXM 1,979, 989, 67
    (r"H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (r"H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    # H200 data sheet: NVL as the H100 NVL; SXM as the H100 SXM (the same GH100 compute, more memory)
    (r"H200 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    # GH200 data sheet: its Hopper GPU as the H100 SXM (990 TFLOPS bf16 dense, 1,979 with sparsity)
    (r"GH200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    # H20 product brief: 148 TFLOPS fp16/bf16 dense, TF32 74, FP32 44
    (r"H20", {"bf16": 148e12, "fp16": 148e12, "tf32": 74e12, "fp32": 44e12}),
    # HGX B200 data sheet, per GPU: 4.5 PFLOPS fp16/bf16 with sparsity, TF32 2.2, FP32 75
    (r"B200", {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12, "fp32": 75e12}),
    # A100 data sheet: 624 TFLOPS bf16 with sparsity, TF32 312, FP32 19.5 (SXM and PCIe alike)
    (r"A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
]


# ---------------------------------------------------------------------------------------------
# the whole benchmark


# loss weightings whose step time the benchmark compares at several datasets per step: the static sum (the
# weighted mean's cost) and two Jacobian aggregators (one backward per dataset, then the aggregation)
MTL_METHODS = ("none", "upgrad", "pcgrad")
# the gradient-conflict diagnostic's sources, each timed as (datasets per step, loss weighting) of a run that uses it
CONFLICT_CASES = {BATCHES: (1, "none"), STEP: (4, "none"), GRAMIAN: (4, "upgrad")}


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
        "input": _input_description(resolution, input_size),
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
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(root)))
        data = open_data(cfg.data, tasks)
        sizes = {flag: len(d.splits["train"]) for flag, d in data.items()}
        splits = {flag: d.splits["train"] for flag, d in data.items()}

        configure_determinism(cfg.train.seed, cfg.determinism, cfg.train.tf32)
        bare = BareLoop(cfg, torch_device)
        flops_per_step = bare.flops()
        step = engine_step(cfg, tasks, sizes, torch_device)

        total_steps = warmup_steps + compile_warmup + repeats * steps
        plan = Sampler(sizes, batch_size, cfg.train.seed, steps_per_epoch=total_steps, last_batch="drop").plan(0)
        loader = plan_loader(
            splits,
            plan,
            num_workers=workers,
            pin_memory=cfg.data.pin_memory and torch_device.type == "cuda",
            prefetch_factor=cfg.data.prefetch_factor,
            seed=cfg.train.seed,
            epoch=0,
        )
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
            tasks,
            sizes,
            splits,
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
            tasks,
            sizes,
            splits,
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
    """Seconds of one calibration batch of every dataset, as `mmpt.train.run` calibrates before a validation (the
    benchmark's splits hold one batch each, so the default reads that batch); None for a backbone without
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


def measure_mtl_steps(
    cfg,
    tasks,
    sizes: dict[str, int],
    splits: dict,
    device: torch.device,
    methods: tuple[str, ...],
    k: int,
    *,
    steps: int,
    warmup_steps: int,
    repeats: int,
    log: Callable[[str], None] = print,
) -> dict:
    """Step time of the engine with `k` datasets per step under each loss weighting `methods` (the first is the
    reference), timed in turns; returns {"ratios": {method: median s/step over the reference's}, ...}. A method
    that a run of these settings would refuse (e.g. one that needs every dataset in every step, or a solver that is
    not installed) is not timed: "refused" maps it to the reason."""
    if not methods:
        return {"ratios": {}, "refused": {}}
    # compiled: the warm-up also covers every combination's first graph of each size (k datasets from 12: a pass)
    total = warmup_steps + (len(tasks) if cfg.train.compile else 0) + repeats * steps
    loops, refused = {}, {}
    for method in methods:
        try:
            mcfg = runnable(
                dataclasses.replace(
                    cfg,
                    sampler=dataclasses.replace(cfg.sampler, tasks_per_step=k, steps_per_epoch=total),
                    loss=dataclasses.replace(cfg.loss, weighting=method),
                )
            )
        except MmptError as exc:
            refused[method] = str(exc)
            log(f"{method} at {k} datasets per step: refused ({exc})")
            continue
        torch.manual_seed(cfg.train.seed)
        step = engine_step(mcfg, tasks, sizes, device)
        plan = Sampler(
            sizes, cfg.train.batch_size, cfg.train.seed, steps_per_epoch=total, last_batch="drop", tasks_per_step=k
        ).plan(0)
        loader = plan_loader(splits, plan, num_workers=0, pin_memory=device.type == "cuda")
        loops[method] = EngineLoop(step, loader, cfg.train.log_every_steps)
        for _ in range(total - repeats * steps):
            loops[method]()
    seconds = {method: [] for method in loops}
    for _ in range(repeats):
        for method, loop in loops.items():
            seconds[method].append(time_steps(loop, device, steps)["seconds"] / steps)
    per_step = {method: median(values) for method, values in seconds.items()}
    reference = next(iter(per_step), None)
    ratios = {method: per_step[method] / per_step[reference] for method in per_step}
    log("datasets per step " + str(k) + ": " + ", ".join(f"{m} {per_step[m] * 1e3:.0f} ms" for m in per_step))
    return {
        "ratios": ratios,
        "seconds_per_step": per_step,
        "refused": refused,
        "tasks_per_step": k,
        "reference": reference,
        "turns": repeats,
    }


def runnable(cfg: Config, world_size: int = 1) -> Config:
    """`cfg` if a run would accept it (the schema's rules between keys, then this machine's), else MmptError with the
    one line a run prints: the benchmarks derive configs with dataclasses.replace, which checks nothing."""
    checked = from_dict(to_dict(cfg))
    check_run(checked, world_size)
    return checked


def measure_conflicts(
    cfg,
    tasks,
    sizes: dict[str, int],
    splits: dict,
    device: torch.device,
    sources: tuple[str, ...],
    *,
    steps: int,
    warmup_steps: int,
    repeats: int,
    log: Callable[[str], None] = print,
) -> dict:
    """What the gradient-conflict diagnostic costs, per source: the engine measuring at every step against the same
    engine without it, timed in turns; the extra time of one measurement, as a fraction of the steps between two
    measurements at the default interval (AUTO_EVERY_STEPS) and the interval that keeps it at 2 %."""
    out = {}
    total = warmup_steps + repeats * steps
    for source in sources:
        k, method = CONFLICT_CASES[source]
        loops = {}
        for every in (0, 1):
            mcfg = dataclasses.replace(
                cfg,
                sampler=dataclasses.replace(cfg.sampler, tasks_per_step=k, steps_per_epoch=total),
                loss=dataclasses.replace(cfg.loss, weighting=method),
                train=dataclasses.replace(cfg.train, conflict_every_steps=every),
            )
            torch.manual_seed(cfg.train.seed)
            step = engine_step(mcfg, tasks, sizes, device, splits)
            assert every == 0 or step.conflicts.source == source, f"{source} case measures {step.conflicts.source}"
            plan = Sampler(
                sizes, cfg.train.batch_size, cfg.train.seed, steps_per_epoch=total, last_batch="drop", tasks_per_step=k
            ).plan(0)
            loader = plan_loader(splits, plan, num_workers=0, pin_memory=device.type == "cuda")
            loops[every] = EngineLoop(step, loader, cfg.train.log_every_steps)
            for _ in range(warmup_steps):
                loops[every]()
        seconds = {every: [] for every in loops}
        for _ in range(repeats):
            for every, loop in loops.items():
                seconds[every].append(time_steps(loop, device, steps)["seconds"] / steps)
        off, on = median(seconds[0]), median(seconds[1])
        extra = max(0.0, on - off)
        out[source] = {
            "tasks_per_step": k,
            "weighting": method,
            "seconds_per_step": off,
            "seconds_per_measuring_step": on,
            "extra_seconds_per_measurement": extra,  # 0 where the measuring step timed faster (noise)
            "default_every_steps": AUTO_EVERY_STEPS,
            "cost_at_default": extra / (AUTO_EVERY_STEPS * off),
            "every_steps_for_2_percent": max(1, math.ceil(extra / (0.02 * off))),
            "turns": repeats,
        }
        log(
            f"gradient conflicts from {source} ({k} per step, {method}): step {off * 1e3:.0f} ms, measuring step "
            f"{on * 1e3:.0f} ms: {out[source]['cost_at_default']:.2%} every {AUTO_EVERY_STEPS} steps"
        )
    return out


def _input_description(resolution: int, input_size: int) -> str:
    if input_size == resolution:
        return f"{resolution} px as stored"
    how = "zero-padded" if input_size > resolution else "resized"
    return f"{resolution} px {how} to {input_size} px"


def peak_flops(device_name: str, precision: str) -> float | None:
    """The GPU's dense peak FLOP/s for `precision` (resolved; fp32 means TF32 when torch allows it), or None for a
    GPU the table does not know."""
    kind = precision if precision != "fp32" else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
    for pattern, peaks in PEAK_FLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){pattern}(?![A-Za-z0-9])", device_name):
            return peaks[kind]
    return None


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


def format_table(result: dict) -> str:
    """The figures as a Markdown table: measurement | engine | bare loop (the baseline) | engine / bare."""
    s = result["settings"]
    medians = result["img_s_median_over_turns"]
    bare, engine = result["bare_img_s"], result["engine_img_s"]
    rows = [
        ("measurement", "engine", "bare loop", "engine / bare"),
        ("img/s (median turn)", f"{engine:,.1f}", f"{bare:,.1f}", f"{result['engine_vs_bare']:.3f}"),
        (
            "img/s, median over turns",
            f"{medians['engine']:,.1f}",
            f"{medians['bare']:,.1f}",
            f"{medians['engine'] / medians['bare']:.3f}",
        ),
        ("MFU", "-" if result["mfu"] is None else f"{result['mfu']:.1%}", "-", "-"),
        ("time blocked on the loader", f"{result['engine_loader_wait_fraction']:.1%}", "-", "-"),
        *_calibration_rows(result["norm_calibration"]),
        ("peak memory (the larger loop)", f"{result['peak_memory_bytes'] / 2**20:,.0f} MiB", "-", "-"),
        ("model GFLOP per image (fwd+bwd)", f"{result['flops_per_image'] / 1e9:.3f}", "-", "-"),
    ]
    mtl = result["mtl"]
    reference = mtl.get("seconds_per_step", {}).get(mtl.get("reference"))
    for method, ratio in mtl["ratios"].items():
        label = f"step time, {mtl['tasks_per_step']} datasets per step: {method} against {mtl['reference']}"
        ms = f"{mtl['seconds_per_step'][method] * 1e3:,.0f} ms"
        rows.append((label, ms, f"{reference * 1e3:,.0f} ms", f"{ratio:.2f}x"))
    for method, reason in mtl.get("refused", {}).items():
        rows.append((f"step time, {mtl['tasks_per_step']} datasets per step: {method}", "refused", "-", reason))
    for source, c in result["conflicts"].items():
        label = (
            f"gradient-conflict diagnostic from {source} ({c['tasks_per_step']} per step, {c['weighting']}): "
            "a measuring step against one without"
        )
        on, off = c["seconds_per_measuring_step"], c["seconds_per_step"]
        rows.append((label, f"{on * 1e3:,.0f} ms", f"{off * 1e3:,.0f} ms", f"{on / off:.2f}x"))
        rows.append(
            (
                f"  its cost every {c['default_every_steps']} steps "
                f"(+{c['extra_seconds_per_measurement'] * 1e3:,.0f} ms per measurement)",
                f"{c['cost_at_default']:.2%}",
                "-",
                f"2 % from every {c['every_steps_for_2_percent']} steps",
            )
        )
    m = result["machine"]
    return "\n".join(
        [
            markdown_table(rows),
            f"{s['timm_name']}, input {s['input']}, batch {s['batch_size']}, {s['precision']}"
            + (f" (train.precision {s['precision_setting']})" if s["precision_setting"] != s["precision"] else "")
            + (", compiled" if s["compile"] else "")
            + (", channels_last" if s["channels_last"] else "")
            + f", determinism {'on' if s['deterministic'] else 'off'}, TF32 {'on' if s['tf32'] else 'off'}"
            + (" (as training runs)" if s["as_training"] else " (training runs with determinism on, TF32 on)")
            + f"; {s['device']} ({s['device_name'] or 'unknown'}), {m['cpus']} CPUs, {s['workers']} loader workers, "
            f"{s['repeats']} turns of {s['steps']} timed steps each, load average {m['load_avg_at_start'][0]:.1f} "
            f"at start, wall time {result['wall_s']:.0f} s",
        ]
    )


def _calibration_rows(calibration: dict | None) -> list[tuple[str, str, str, str]]:
    """The precise statistics' cost (model.norm_calibration_batches at its default) as a share of a MedMNIST+ epoch,
    with a calibration batch against an engine step; no row for a backbone without BatchNorm."""
    if calibration is None:
        return []
    label = f"norm calibration ({calibration['batches_per_dataset']} batches per dataset) / MedMNIST+ epoch"
    value = f"{calibration['vs_epoch']:.2%} (a batch {calibration['batch_vs_step']:.2f}x a step)"
    return [(label, value, "-", "-")]


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `train` command to `python -m mmpt.bench`."""
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
