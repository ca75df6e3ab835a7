"""The GPU check: `python -m benchmarks gpu`, what the first GPU run of the engine must show, in one command.

    python -m benchmarks gpu [--device D] [--only CHECK,...] [--json PATH] [--workdir DIR] [--compile-backend B]

Seven checks, each printed beside its pass criterion and written to --json after it ran (a later failure keeps
the earlier figures), on synthetic MedMNIST-format files the check writes itself:

- sync: the training step under torch.cuda.set_sync_debug_mode("warn") for a static, a loss-based and two
  gradient-based weightings at 1 and 4 datasets per step: no host synchronisation in static and loss-based steps,
  none from mmpt's own code in gradient-based ones (UPGrad's solver runs on the host, which is counted and named);
- throughput: ResNet-18 at 28 px (batch 64 and 256) and ViT-B/16 at 224 px in bf16, the engine against the bare
  loop (`python -m benchmarks train`) as training runs (determinism on, train.precision and train.tf32 defaults),
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
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import machine, work_folder, write_result
from benchmarks.gpu_checks import (
    check_compile,
    check_determinism,
    check_fp16,
    check_loader,
    check_memory,
    check_sync,
    check_throughput,
)
from benchmarks.gpu_context import CHECKS, GPU, TINY, Context
from mmpt.config.choices import DEVICE_NAMES
from mmpt.errors import MmptError
from mmpt.io import markdown_table
from mmpt.runtime.distributed import select_device

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
            markdown_table(rows[0], rows[1:]),
            f"{m['device_name']} ({result['device']}), torch {m['torch']}, {m['cpus']} CPUs, compile backend "
            f"{result['compile_backend']}, wall time {result['wall_s']:.0f} s: {overall[result['passed']]}",
        ]
    )


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `gpu` command to `python -m benchmarks`."""
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
