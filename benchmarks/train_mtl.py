"""The training benchmark's multi-task parts: the step time of weighting methods at several datasets per step
(`measure_mtl_steps`) and the cost of the gradient-conflict diagnostic for each of its sources
(`measure_conflicts`), each against the same engine without it, in turns (see benchmarks.train)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from benchmarks.common import median
from benchmarks.loops import EngineLoop, engine, time_steps
from mmpt.config import Config, from_dict, to_dict
from mmpt.config.methods import GRADIENT, METHODS
from mmpt.errors import MmptError
from mmpt.training.build import check_run
from mmpt.training.conflicts import AUTO_EVERY_STEPS, BATCHES, GRAMIAN, STEP

# loss weightings whose step time the benchmark compares at several datasets per step: the static sum (the
# weighted mean's cost) and two Jacobian aggregators, each on both Jacobian paths (loss.jacobian)
MTL_METHODS = ("none", "upgrad", "pcgrad")
JACOBIAN_PATHS = ("one_pass", "autojac")
# the gradient-conflict diagnostic's sources, each timed as (datasets per step, loss weighting) of a run that uses it
CONFLICT_CASES = {BATCHES: (1, "none"), STEP: (4, "none"), GRAMIAN: (4, "upgrad")}


def measure_mtl_steps(
    cfg,
    datasets: int,
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
    reference), timed in turns; returns {"ratios": {label: median s/step over the reference's}, ...}. A gradient-based
    method is timed on both Jacobian paths (loss.jacobian one_pass and autojac: labels `<method>.one_pass`,
    `<method>.autojac`). A method or path that a run of these settings would refuse (e.g. one that needs every dataset
    in every step, or a solver that is not installed) is not timed: "refused" maps its label to the reason."""
    if not methods:
        return {"ratios": {}, "refused": {}}
    # compiled: the warm-up also covers every combination's first graph of each size (k datasets from 12: a pass)
    total = warmup_steps + (datasets if cfg.train.compile else 0) + repeats * steps
    loops, refused = {}, {}
    variants = [
        (f"{method}.{path}" if METHODS[method].kind == GRADIENT else method, method, path)
        for method in methods
        for path in (JACOBIAN_PATHS if METHODS[method].kind == GRADIENT else ("auto",))
    ]
    for label, method, path in variants:
        try:
            mcfg = runnable(
                dataclasses.replace(
                    cfg,
                    data=dataclasses.replace(cfg.data, num_workers=0),
                    sampler=dataclasses.replace(
                        cfg.sampler, tasks_per_step=k, steps_per_epoch=total, last_batch="drop"
                    ),
                    loss=dataclasses.replace(cfg.loss, weighting=method, jacobian=path),
                )
            )
            torch.manual_seed(cfg.train.seed)
            setup = engine(mcfg, device)
        except MmptError as exc:
            refused[label] = str(exc)
            log(f"{label} at {k} datasets per step: refused ({exc})")
            continue
        loops[label] = EngineLoop(setup.step, setup.train_loader(0), cfg.train.log_every_steps)
        for _ in range(total - repeats * steps):
            loops[label]()
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
                data=dataclasses.replace(cfg.data, num_workers=0),
                sampler=dataclasses.replace(cfg.sampler, tasks_per_step=k, steps_per_epoch=total, last_batch="drop"),
                loss=dataclasses.replace(cfg.loss, weighting=method),
                train=dataclasses.replace(cfg.train, conflict_every_steps=every),
            )
            torch.manual_seed(cfg.train.seed)
            setup = engine(mcfg, device)
            step = setup.step
            assert every == 0 or step.conflicts.source == source, f"{source} case measures {step.conflicts.source}"
            loops[every] = EngineLoop(step, setup.train_loader(0), cfg.train.log_every_steps)
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
