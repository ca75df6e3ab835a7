"""The GPU check: `python -m mmpt.bench gpu`, what the first GPU run of the engine must show, in one command.

    python -m mmpt.bench gpu [--device D] [--only CHECK,...] [--json PATH] [--workdir DIR] [--compile-backend B]

Seven checks, each printed beside its pass criterion and written to --json after it ran (a later failure keeps
the earlier figures), on synthetic MedMNIST-format files the check writes itself:

- sync: the training step under torch.cuda.set_sync_debug_mode("warn") for a static, a loss-based and two
  gradient-based weightings at 1 and 4 datasets per step: no host synchronisation in static and loss-based steps,
  none from mmpt's own code in gradient-based ones (UPGrad's solver runs on the host, which is counted and named);
- throughput: ResNet-18 at 28 px (batch 64 and 256) and ViT-B/16 at 224 px in bf16, the engine against the bare
  loop (`python -m mmpt.bench train`) as training runs (determinism on, train.precision and train.tf32 defaults),
  with MFU against the device's dense peak;
- determinism: two runs of the engine with one seed give one digest (ResNet-18 with per-dataset BatchNorm
  statistics and their calibration; ViT-B/16 in bf16);
- compile: graphs Dynamo compiles for ResNet-18 with per-dataset statistics over all 12 datasets (one dataset per
  step, with a partial batch), and UPGrad at 2 datasets per step compiled (or the line a run refuses it with);
- fp16: the backbone's first update in fp16 (with its gradient scaler) against bf16, SGD, for none, UPGrad,
  Nash-MTL and FairGrad: within a factor of 2;
- memory: allocated device memory at step 10 and at step 100, with a calibration and a validation in between;
- loader: the loader alone at 28 and 224 px with 2, 4 and 8 workers, images/s.

About five minutes on one GPU (the compile check, which compiles ResNet-18 three or four times, is half of it).
`--device cpu` runs every check's code path on timm's tiny test models and a few images, in seconds to a minute:
its figures say only that the check runs (CPU: host reads stand in for device syncs, and memory is the resident set).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

import mmpt
from mmpt import checkpoint as ckpt
from mmpt.bench.common import engine_step, machine, markdown_table, synchronize, work_folder, write_result
from mmpt.bench.train import run_train_benchmark, runnable
from mmpt.choices import DEVICE_NAMES
from mmpt.config import Config, load_config
from mmpt.data.loader import plan_loader
from mmpt.data.sampler import Sampler
from mmpt.data.store import open_data
from mmpt.data.synthetic import write_synthetic
from mmpt.distributed import select_device
from mmpt.errors import MmptError
from mmpt.predict import evaluate_all, split_loader
from mmpt.recipe import calibrate_step
from mmpt.runtime import configure_determinism
from mmpt.tasks import FLAGS, TASKS, resolve_tasks

CHECKS = ("sync", "throughput", "determinism", "compile", "fp16", "memory", "loader")
# the targets a GPU run is judged by
RESNET_TARGET_IMG_S = 10_000  # ResNet-18 at 28 px, batch 256, engine
VIT_VS_BARE_TARGET = 0.95  # ViT-B/16 at 224 px in bf16: the engine against the bare loop
VIT_MFU_TARGET = 0.35
FP16_FACTOR = 2.0  # fp16 and bf16 updates within this factor of each other
MEMORY_GROWTH = 0.02  # allocated memory at step 100 at most 2 % (and 16 MiB) above step 10
MEMORY_SLACK_BYTES = 16 << 20
# where a sync may come from in a gradient-based step: the aggregator's host solver (TorchJD and its solvers)
MMPT_DIR = str(Path(mmpt.__file__).parent)
FP16_DATASETS = ("breastmnist", "retinamnist", "chestmnist", "dermamnist")


@dataclass(frozen=True)
class Sizes:
    """The models and sizes a check runs at: the GPU's, or tiny ones that only exercise the code on a CPU."""

    resnet: str = "resnet18"
    vit: str = "vit_b16"
    vit_resolution: int = 224
    vit_input: int | None = None  # None: the backbone's (224)
    resnet_batches: tuple[int, ...] = (64, 256)
    vit_batch: int = 64
    # train images per dataset of the synthetic files at 28 px (val/test: a quarter): 2.5 batches of the compile
    # check, so each dataset ends with a partial batch
    train_samples: int = 80
    bench_steps: int = 10  # timed steps per turn of the throughput check
    bench_repeats: int = 5
    bench_warmup: int = 5
    sync_steps: int = 3
    determinism_steps: int = 30
    determinism_vit_steps: int = 10
    compile_batch: int = 32
    memory_steps: tuple[int, int] = (10, 100)
    loader_batches: int = 40
    loader_images: int = 2048
    loader_workers: tuple[int, ...] = (2, 4, 8)
    loader_resolutions: tuple[int, ...] = (28, 224)
    judged: bool = True  # False: figures from a CPU, not judged against the GPU targets


GPU = Sizes()
TINY = Sizes(
    resnet="test_resnet",
    vit="test_vit",
    vit_resolution=28,
    vit_input=32,
    resnet_batches=(8, 16),
    vit_batch=8,
    train_samples=12,
    bench_steps=1,
    bench_repeats=1,
    bench_warmup=1,
    sync_steps=1,
    determinism_steps=3,
    determinism_vit_steps=2,
    compile_batch=8,
    memory_steps=(2, 6),
    loader_batches=3,
    loader_images=48,
    loader_workers=(2,),
    loader_resolutions=(28, 64),
    judged=False,
)


def row(label: str, value: str, criterion: str, passed: bool | None) -> dict:
    """One line of the table: a figure beside its pass criterion (passed None: not judged, e.g. on a CPU)."""
    return {"label": label, "value": value, "criterion": criterion, "passed": passed}


class Context:
    """What every check shares: the device, the sizes, the synthetic files and the engine's configs."""

    def __init__(self, device: torch.device, sizes: Sizes, work: Path, compile_backend: str, log) -> None:
        self.device, self.sizes, self.work, self.compile_backend, self.log = device, sizes, work, compile_backend, log
        self.root = work / "medmnist"
        self.tasks = resolve_tasks(list(FLAGS))
        write_synthetic(self.root, 28, self.tasks, train_samples=sizes.train_samples, seed=0)
        self.judged = sizes.judged and device.type == "cuda"

    def config(self, *, backbone: str | None = None, datasets=None, batch_size: int = 64, **sections) -> Config:
        """A run's config on the synthetic 28 px files (`sections`: section -> dict of overrides)."""
        raw = {
            "name": "gpu-check",
            "data": {"root": str(self.root), "datasets": list(datasets or FLAGS), "num_workers": 0},
            "model": {"backbone": backbone or self.sizes.resnet, "img_size": 28 if self.sizes.judged else 32},
            "input": {"mode": "pad"},
            "train": {"batch_size": batch_size, "epochs": 1000, "device": str(self.device), "progress": False},
        }
        for section, values in sections.items():
            raw[section] = {**raw.get(section, {}), **values}
        return runnable(load_config(overrides=[raw]))

    def step_and_batches(self, cfg: Config, steps: int, pin: bool = True, compile_backend: str | None = None):
        """The engine's step for `cfg` (seeded) and the first `steps` steps of its plan's batches, already loaded
        (`compile_backend`: torch.compile's under train.compile, default the check's)."""
        configure_determinism(cfg.train.seed, cfg.determinism, cfg.train.tf32)
        tasks = resolve_tasks(cfg.data.datasets)
        data = open_data(cfg.data, tasks)
        splits = {flag: d.splits["train"] for flag, d in data.items()}
        sizes = {flag: len(split) for flag, split in splits.items()}
        backend = compile_backend or self.compile_backend
        step = engine_step(cfg, tasks, sizes, self.device, splits, compile_backend=backend)
        s = cfg.sampler
        plan = Sampler(
            sizes,
            cfg.train.batch_size,
            cfg.train.seed,
            steps_per_epoch=steps,
            tasks_per_step=s.tasks_per_step,
            last_batch=s.last_batch,
        ).plan(0)
        pin = pin and self.device.type == "cuda"
        batches = list(plan_loader(splits, plan, num_workers=0, pin_memory=pin))
        return step, batches, data


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


# ---------------------------------------------------------------------------------------------
# the whole check


def run_gpu_check(
    *,
    device: str = "auto",
    only: tuple[str, ...] = CHECKS,
    workdir: str | Path | None = None,
    json_path: str | Path | None = None,
    compile_backend: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the checks `only` (in CHECKS order) on `device`; return {"checks": {name: figures and rows}, ...}.

    A CUDA device runs the GPU sizes, any other the tiny ones (`TINY`). `compile_backend`: torch.compile's (default
    inductor on CUDA, aot_eager elsewhere). The JSON file is written after every check. Raises MmptError for an
    unknown check or device.
    """
    unknown = [name for name in only if name not in CHECKS]
    if unknown:
        raise MmptError(f"--only takes {', '.join(CHECKS)}, got {', '.join(unknown)}")
    torch_device = select_device(device)
    sizes = GPU if torch_device.type == "cuda" else TINY
    backend = compile_backend or ("inductor" if torch_device.type == "cuda" else "aot_eager")
    started = time.perf_counter()
    result: dict = {
        "device": str(torch_device),
        "sizes": dataclasses.asdict(sizes),
        "compile_backend": backend,
        "machine": machine(torch_device),
        "checks": {},
        "complete": False,
    }
    log(f"GPU check on {result['machine']['device_name']} ({torch_device}), checks: {', '.join(only)}")
    with work_folder(workdir, "mmpt-bench-gpu-") as work:
        ctx = Context(torch_device, sizes, work, backend, log)
        shared: dict = {}
        run = {
            "sync": lambda: check_sync(ctx),
            "throughput": lambda: check_throughput(ctx, shared),
            "determinism": lambda: check_determinism(ctx),
            "compile": lambda: check_compile(ctx),
            "fp16": lambda: check_fp16(ctx),
            "memory": lambda: check_memory(ctx),
            "loader": lambda: check_loader(ctx, shared),
        }
        for name in CHECKS:
            if name not in only:
                continue
            log(f"check {name} ...")
            check_started = time.perf_counter()
            figures = run[name]()
            figures["seconds"] = time.perf_counter() - check_started
            result["checks"][name] = figures
            result["wall_s"] = time.perf_counter() - started
            if json_path is not None:
                write_result(json_path, result)
            for r in figures["rows"]:
                log(f"  {r['label']}: {r['value']} (criterion: {r['criterion']}) {verdict(r['passed'])}")
    result["complete"] = True
    result["wall_s"] = time.perf_counter() - started
    judged = [r["passed"] for c in result["checks"].values() for r in c["rows"] if r["passed"] is not None]
    result["passed"] = all(judged) if judged else None
    if json_path is not None:
        write_result(json_path, result)
    return result


def verdict(passed: bool | None) -> str:
    return "-" if passed is None else ("pass" if passed else "FAIL")


def format_table(result: dict) -> str:
    """Every check's figures beside their criteria, as a Markdown table, and a line on the machine and the verdict."""
    rows = [("check", "measurement", "figure", "criterion", "pass")]
    for name, figures in result["checks"].items():
        for r in figures["rows"]:
            rows.append((name, r["label"], r["value"], r["criterion"], verdict(r["passed"])))
    m = result["machine"]
    overall = {None: "not judged (not a CUDA device)", True: "every judged figure passes", False: "some figure FAILS"}
    return "\n".join(
        [
            markdown_table(rows),
            f"{m['device_name']} ({result['device']}), torch {m['torch']}, {m['cpus']} CPUs, compile backend "
            f"{result['compile_backend']}, wall time {result['wall_s']:.0f} s: {overall[result['passed']]}",
        ]
    )


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `gpu` command to `python -m mmpt.bench`."""
    gpu = commands.add_parser(
        "gpu",
        help="the GPU check: sync audit, throughput and MFU, determinism, compile, fp16, memory, loader",
        description=__doc__.split("\n\n")[0],
    )
    gpu.add_argument("--device", default="auto", help=f"{DEVICE_NAMES} (cpu: tiny sizes, every code path)")
    gpu.add_argument("--only", default=",".join(CHECKS), help=f"checks to run, comma-separated: {', '.join(CHECKS)}")
    gpu.add_argument("--compile-backend", help="torch.compile backend (default: inductor on CUDA, aot_eager on CPU)")
    gpu.add_argument("--json", help="write the figures to this JSON file (after every check)")
    gpu.add_argument("--workdir", help="folder for the synthetic files (kept); default a temporary one (deleted)")


def run_command(args: argparse.Namespace) -> int:
    """Run the check (table on stdout, progress on stderr); return 0, or 1 when a judged figure fails."""
    result = run_gpu_check(
        device=args.device,
        only=tuple(name for name in args.only.split(",") if name),
        workdir=args.workdir,
        json_path=args.json,
        compile_backend=args.compile_backend,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(format_table(result))
    return 1 if result["passed"] is False else 0
