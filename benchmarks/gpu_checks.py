"""The GPU check's seven checks (sync, throughput, determinism, compile, fp16, memory, loader), each a function of
the shared `Context` returning its rows (see benchmarks.gpu for what each measures and its pass criterion)."""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from benchmarks.common import synchronize
from benchmarks.gpu_context import (
    FP16_DATASETS,
    FP16_FACTOR,
    MEMORY_GROWTH,
    MEMORY_SLACK_BYTES,
    MMPT_DIR,
    RESNET_TARGET_IMG_S,
    VIT_MFU_TARGET,
    VIT_VS_BARE_TARGET,
    Context,
    row,
)
from benchmarks.train import run_train_benchmark
from mmpt.config import load_config
from mmpt.data.loader import plan_loader
from mmpt.data.sampler import Sampler
from mmpt.data.store import open_data
from mmpt.data.synthetic import write_synthetic
from mmpt.errors import MmptError
from mmpt.evaluation.predict import evaluate_all, split_loader
from mmpt.runs import checkpoint as ckpt
from mmpt.tasks import FLAGS, TASKS
from mmpt.training.build import calibrate_step

# ---------------------------------------------------------------------------------------------
# sync audit


@contextlib.contextmanager
def count_syncs(device: torch.device) -> Iterator[list[str]]:
    """Yield a list that fills with one entry (`file:line`) per host synchronisation inside the block.

    CUDA: torch.cuda.set_sync_debug_mode("warn") and its warnings, wherever they come from. CPU, which has no such
    mode: the host reads from mmpt's own code that would sync on a device (Tensor.item, bool, float, int, tolist).
    """
    found: list[str] = []
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield found
            finally:
                torch.cuda.synchronize(device)
                torch.cuda.set_sync_debug_mode(0)
        found += [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
        return
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "__float__", "__int__", "tolist")}

    def counting(name: str) -> Callable:
        real = originals[name]

        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(MMPT_DIR):
                found.append(f"{frame.f_code.co_filename}:{frame.f_lineno}")
            return real(self, *args, **kwargs)

        return read

    for name in originals:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield found
    finally:
        for name, real in originals.items():
            setattr(torch.Tensor, name, real)


SYNC_CASES = (  # (weighting, family, datasets per step); only static and loss-based steps must not sync at all
    ("none", "static", 1),
    ("none", "static", 4),
    ("uw", "loss-based", 1),
    ("uw", "loss-based", 4),
    ("jd_mean", "gradient-based", 1),
    ("jd_mean", "gradient-based", 4),
    ("upgrad", "gradient-based", 4),
)


def check_sync(ctx: Context) -> dict:
    n = ctx.sizes.sync_steps
    cases, rows = [], []
    for method, family, k in SYNC_CASES:
        cfg = ctx.config(sampler={"tasks_per_step": k}, loss={"weighting": method})
        step, batches, _ = ctx.step_and_batches(cfg, 2 + n)
        for i, parts in enumerate(batches[:2]):  # warm-up: lazy initialisation may sync once
            step(parts, i)
        synchronize(ctx.device)
        with count_syncs(ctx.device) as syncs:
            for i, parts in enumerate(batches[2:], start=2):
                step(parts, i)
        ours = [s for s in syncs if s.startswith(MMPT_DIR)]
        strict = family != "gradient-based"
        passed = (not syncs) if strict else (not ours)
        cases.append(
            {
                "weighting": method,
                "family": family,
                "tasks_per_step": k,
                "steps": n,
                "syncs": len(syncs),
                "from_mmpt": len(ours),
                "where": sorted(set(syncs))[:10],
            }
        )
        where = f" ({', '.join(sorted({Path(s).name for s in syncs})[:3])})" if syncs else ""
        rows.append(
            row(
                f"syncs in {n} steps: {method} ({family}), {k} per step",
                f"{len(syncs)}{where}",
                "0" if strict else "0 from mmpt (its host solver may)",
                passed,
            )
        )
    return {"cases": cases, "rows": rows}


# ---------------------------------------------------------------------------------------------
# throughput


def check_throughput(ctx: Context, results: dict) -> dict:
    z = ctx.sizes
    rows, runs = [], {}
    common = dict(
        steps=z.bench_steps,
        warmup_steps=z.bench_warmup,
        repeats=z.bench_repeats,
        device=str(ctx.device),
        mtl_methods=(),
        conflict_sources=(),
        log=ctx.log,
    )
    for batch in z.resnet_batches:
        ctx.log(f"throughput: {z.resnet} at 28 px, batch {batch}")
        r = run_train_benchmark(
            backbone=z.resnet,
            resolution=28,
            input_size=None if z.judged else 32,
            batch_size=batch,
            workdir=ctx.work / f"resnet{batch}",
            **common,
        )
        runs[f"resnet_{batch}"] = _throughput_figures(r)
        target = batch == max(z.resnet_batches)
        rows.append(
            row(
                f"{z.resnet} 28 px, batch {batch}: engine img/s "
                f"({r['settings']['precision']}; bare {r['bare_img_s']:,.0f})",
                f"{r['engine_img_s']:,.0f}",
                f">= {RESNET_TARGET_IMG_S:,}" if target else "-",
                (r["engine_img_s"] >= RESNET_TARGET_IMG_S if ctx.judged else None) if target else None,
            )
        )
    ctx.log(f"throughput: {z.vit} at {z.vit_resolution} px, bf16, batch {z.vit_batch}")
    r = run_train_benchmark(
        backbone=z.vit,
        resolution=z.vit_resolution,
        input_size=z.vit_input,
        batch_size=z.vit_batch,
        precision="bf16",
        workdir=ctx.work / "vit",
        **common,
    )
    runs["vit"] = figures = _throughput_figures(r)
    results["vit_engine_img_s"] = r["engine_img_s"]
    rows.append(
        row(
            f"{z.vit} {z.vit_resolution} px bf16, batch {z.vit_batch}: engine / bare "
            f"({r['engine_img_s']:,.0f} / {r['bare_img_s']:,.0f} img/s)",
            f"{r['engine_vs_bare']:.3f}",
            f">= {VIT_VS_BARE_TARGET}",
            r["engine_vs_bare"] >= VIT_VS_BARE_TARGET if ctx.judged else None,
        )
    )
    mfu = figures["mfu"]
    rows.append(
        row(
            f"{z.vit} MFU (engine; {figures['engine_tflop_s']:.0f} TFLOP/s of {_peak_text(figures['peak_flop_s'])})",
            "-" if mfu is None else f"{mfu:.1%}",
            f">= {VIT_MFU_TARGET:.0%}",
            (mfu is not None and mfu >= VIT_MFU_TARGET) if ctx.judged else None,
        )
    )
    return {"runs": runs, "rows": rows}


def _throughput_figures(r: dict) -> dict:
    keys = (
        "bare_img_s",
        "engine_img_s",
        "engine_vs_bare",
        "mfu",
        "bare_mfu",
        "engine_tflop_s",
        "peak_flop_s",
        "flops_per_image",
        "engine_loader_wait_fraction",
        "peak_memory_bytes",
    )
    return {**{k: r[k] for k in keys}, "settings": r["settings"]}


def _peak_text(peak: float | None) -> str:
    return "an unknown peak" if peak is None else f"{peak / 1e12:,.0f}"


# ---------------------------------------------------------------------------------------------
# determinism


def check_determinism(ctx: Context) -> dict:
    z = ctx.sizes
    runs, rows = {}, []
    cases = {
        f"{z.resnet} per-dataset statistics": (
            ctx.config(model={"norm": "per_dataset_stats", "norm_calibration_batches": 2}),
            z.determinism_steps,
        ),
        f"{z.vit} bf16": (
            ctx.config(
                backbone=z.vit,
                batch_size=32 if z.judged else 8,
                model={"img_size": z.vit_input or 224},
                train={"precision": "bf16"},
            ),
            z.determinism_vit_steps,
        ),
    }
    for name, (cfg, steps) in cases.items():
        digests = []
        for _ in range(2):
            step, batches, data = ctx.step_and_batches(cfg, steps)
            for i, parts in enumerate(batches):
                step(parts, i)
            calibrate_step(cfg, step, {f: d.splits["train"] for f, d in data.items()}, epoch=0)
            synchronize(ctx.device)
            digests.append(ckpt.state_digest(step.model.state_dict()))
            del step
        runs[name] = {"digests": digests, "steps": steps, "precision": cfg.train.precision}
        same = digests[0] == digests[1]
        rows.append(
            row(f"{name}: two runs of {steps} steps", "one digest" if same else "two digests", "one digest", same)
        )
    return {"runs": runs, "rows": rows}


# ---------------------------------------------------------------------------------------------
# compile


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def check_compile(ctx: Context) -> dict:
    z = ctx.sizes
    rows, out = [], {}
    # one dataset per step over all 12, each split ending in a partial batch
    cfg = ctx.config(batch_size=z.compile_batch, train={"compile": True}, model={"norm": "per_dataset_stats"})
    sizes_total = sum(math.ceil(z.train_samples / z.compile_batch) for _ in FLAGS)
    torch._dynamo.reset()
    before = compiled_graphs()
    # Dynamo's graphs are the same whatever the backend: the dry run counts them with the eager one (no AOTAutograd,
    # which the UPGrad part below runs, also through per-dataset statistics)
    step, batches, _ = ctx.step_and_batches(cfg, sizes_total, compile_backend=None if z.judged else "eager")
    for i, parts in enumerate(batches):
        step(parts, i)
    synchronize(ctx.device)
    graphs = compiled_graphs() - before
    trained = sorted({p.task for parts in batches for p in parts})
    shapes = sorted({sum(len(p.labels) for p in parts) for parts in batches})
    out["per_dataset_stats"] = {"graphs": graphs, "steps": len(batches), "datasets": len(trained), "batches": shapes}
    rows.append(
        row(
            f"graphs compiled: {z.resnet}, per-dataset statistics, {len(trained)} datasets one per step, batch sizes "
            f"{', '.join(map(str, shapes))}",
            str(graphs),
            "<= 3",
            graphs <= 3,
        )
    )
    del step
    # a gradient-based method at two datasets per step: TorchJD's Jacobian through the compiled backward
    try:
        cfg = ctx.config(
            batch_size=z.compile_batch,
            train={"compile": True},
            sampler={"tasks_per_step": 2},
            loss={"weighting": "upgrad"},
        )
    except MmptError as exc:
        out["upgrad"] = {"refused": str(exc)}
        rows.append(row("UPGrad, 2 datasets per step, compiled", "refused", "runs or one error line", True))
        return {**out, "rows": rows}
    torch._dynamo.reset()
    before = compiled_graphs()
    step, batches, _ = ctx.step_and_batches(cfg, len(FLAGS))
    for i, parts in enumerate(batches):
        step(parts, i)
    _, nonfinite = step.read_losses()
    graphs = compiled_graphs() - before
    out["upgrad"] = {"graphs": graphs, "steps": len(batches), "finite": not nonfinite}
    rows.append(
        row(
            f"UPGrad, 2 datasets per step, compiled: {len(batches)} steps ({graphs} graphs)",
            "runs" if not nonfinite else "non-finite loss",
            "runs or one error line; <= 3 graphs",
            not nonfinite and graphs <= 3,
        )
    )
    return {**out, "rows": rows}


# ---------------------------------------------------------------------------------------------
# fp16 against bf16


FP16_METHODS = ("none", "upgrad", "nash_mtl", "fairgrad")


def first_update(ctx: Context, method: str, precision: str, attempts: int = 8) -> tuple[float, int]:
    """The norm of the backbone's first update (SGD, no weight decay) on one fixed step of 4 datasets, and the
    steps the fp16 scaler skipped before it (an overflow at its first scale)."""
    cfg = ctx.config(
        datasets=FP16_DATASETS,
        batch_size=32 if ctx.sizes.judged else 8,
        sampler={"tasks_per_step": "all"},
        loss={"weighting": method},
        optim={"name": "sgd", "lr": 0.05, "weight_decay": 0.0},
        train={"precision": precision},
    )
    step, batches, _ = ctx.step_and_batches(cfg, 1)
    params = [p for p in step.model.backbone.parameters() if p.requires_grad]
    for skipped in range(attempts):
        before = [p.detach().clone() for p in params]
        step(batches[0], skipped)
        moved = torch.stack([(p.detach() - b).float().norm() for p, b in zip(params, before)]).norm().item()
        if moved > 0:
            return moved, skipped
    return 0.0, attempts


def check_fp16(ctx: Context) -> dict:
    rows, out = [], {}
    for method in FP16_METHODS:
        try:
            fp16, skipped = first_update(ctx, method, "fp16")
            bf16, _ = first_update(ctx, method, "bf16")
        except MmptError as exc:
            out[method] = {"refused": str(exc)}
            rows.append(row(f"fp16 / bf16 update norm: {method}", "refused", "runs or one error line", True))
            continue
        ratio = fp16 / bf16 if bf16 > 0 else math.inf
        out[method] = {"fp16": fp16, "bf16": bf16, "ratio": ratio, "fp16_skipped_steps": skipped}
        rows.append(
            row(
                f"fp16 / bf16 update norm: {method} (SGD; fp16 skipped {skipped} step(s) first)",
                f"{ratio:.3f}",
                f"within {1 / FP16_FACTOR:g} to {FP16_FACTOR:g}",
                1 / FP16_FACTOR <= ratio <= FP16_FACTOR,
            )
        )
    return {**out, "rows": rows}


# ---------------------------------------------------------------------------------------------
# memory


def memory_now(device: torch.device) -> int:
    """Allocated device memory (CUDA), or this process's resident set (CPU), in bytes."""
    if device.type == "cuda":
        synchronize(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def check_memory(ctx: Context) -> dict:
    first, last = ctx.sizes.memory_steps
    cfg = ctx.config(model={"norm": "per_dataset_stats", "norm_calibration_batches": 2})
    step, batches, data = ctx.step_and_batches(cfg, last)
    val = split_loader(data, "val", ctx.device, batch_size=64, num_workers=0)
    specs = {flag: d.task for flag, d in data.items()}
    at = {}
    for i, parts in enumerate(batches, start=1):
        step(parts, i - 1)
        if i % cfg.train.log_every_steps == 0:
            step.read_losses()
        if i == (first + last) // 2:  # a validation as training makes one: calibration, then every val split
            calibrate_step(cfg, step, {f: d.splits["train"] for f, d in data.items()}, epoch=0)
            evaluate_all(step.model, val, specs, step.losses, step.transform, ctx.device, precision=step.precision)
            step.model.train()
        if i in (first, last):
            at[i] = memory_now(ctx.device)
    growth = at[last] - at[first]
    allowed = max(MEMORY_GROWTH * at[first], MEMORY_SLACK_BYTES)
    meter = "allocated" if ctx.device.type == "cuda" else "resident set"
    return {
        "bytes": {str(k): v for k, v in at.items()},
        "growth_bytes": growth,
        "meter": meter,
        "rows": [
            row(
                f"memory ({meter}) at step {last} against step {first}, a validation between "
                f"({at[first] / 2**20:,.0f} MiB)",
                f"{growth / 2**20:+,.1f} MiB",
                f"<= +{MEMORY_GROWTH:.0%} or +{MEMORY_SLACK_BYTES >> 20} MiB",
                growth <= allowed if ctx.judged else None,
            )
        ],
    }


# ---------------------------------------------------------------------------------------------
# loader


def check_loader(ctx: Context, results: dict) -> dict:
    z = ctx.sizes
    rows, out = [], {}
    task = TASKS["pathmnist"]  # RGB: the most bytes per image
    for resolution in z.loader_resolutions:
        root = ctx.work / f"loader{resolution}"
        write_synthetic(root, resolution, [task], train_samples=z.loader_images, seed=0)
        cfg = load_config(overrides=[{"data": {"root": str(root), "datasets": [task.flag], "resolution": resolution}}])
        split = open_data(cfg.data, [task])[task.flag].splits["train"]
        batch = 256 if resolution <= 64 else 64
        batch = min(batch, len(split) // 2)
        plan = Sampler({task.flag: len(split)}, batch, 0, steps_per_epoch=z.loader_batches + 2).plan(0)
        figures = {}
        for workers in z.loader_workers:
            loader = iter(
                plan_loader({task.flag: split}, plan, num_workers=workers, pin_memory=ctx.device.type == "cuda")
            )
            for _ in range(2):  # the workers start and fill their queues
                next(loader)
            start, images = time.perf_counter(), 0
            for parts in loader:
                images += sum(len(p.labels) for p in parts)
            figures[workers] = images / (time.perf_counter() - start)
            del loader
        out[str(resolution)] = {"img_s": {str(w): v for w, v in figures.items()}, "batch_size": batch}
        best = max(figures.values())
        if resolution <= 28:
            need, criterion = RESNET_TARGET_IMG_S, f">= {RESNET_TARGET_IMG_S:,} (the ResNet-18 target)"
        else:
            need = results.get("vit_engine_img_s")
            criterion = "-" if need is None else f">= {need:,.0f} (the ViT-B/16 engine's img/s)"
        rows.append(
            row(
                f"loader alone, {resolution} px, batch {batch}: img/s with "
                + ", ".join(f"{w}" for w in figures)
                + " workers",
                ", ".join(f"{v:,.0f}" for v in figures.values()),
                criterion,
                (best >= need if need is not None else None) if ctx.judged else None,
            )
        )
    return {**out, "rows": rows}
