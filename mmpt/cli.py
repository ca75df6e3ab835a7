"""Command lines of `train.py` / `mmpt-train` and `evaluate.py` / `mmpt-evaluate`.

A user-caused error prints one line `error: ...` and exits 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mmpt.errors import MmptError

# cuBLAS reads this when CUDA starts, so it is set before torch can start CUDA (determinism: true)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _guarded(main, argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        return main(argv) or 0
    except MmptError as exc:
        if debug:
            raise
        # under torchrun every rank raises the same error; one line is enough
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        return 2


class _Parser(argparse.ArgumentParser):
    """argparse that raises MmptError for a bad flag, so it prints as one `error:` line like every other input error."""

    def error(self, message: str):
        raise MmptError(f"{message}; see {self.prog} --help")


# ---------------------------------------------------------------- train

def train_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="train.py",
        description="mm-PT: train one timm backbone with one head per MedMNIST+ dataset.",
        epilog="Any other config key: --set section.key=value (e.g. --set loss.weighting=size).",
    )
    p.add_argument("--config", help="YAML recipe (deep-merged over the defaults), e.g. configs/quickstart.yaml")
    p.add_argument("--backbone", help="alias (vit_b16, resnet18, ...) or any timm model name")
    p.add_argument("--resolution", type=int, help="MedMNIST+ image size: 28, 64, 128 or 224")
    p.add_argument("--datasets", help="comma-separated datasets (path,chest,...) or all; one = individual training")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="backbone learning rate (heads: optim.head_lr, default the same)")
    p.add_argument("--seed", type=int)
    p.add_argument("--data-root", help="folder with medmnist's npz files (default ~/.medmnist)")
    p.add_argument("--output", help="run folder (default runs/<name>)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--download", action="store_true", help="fetch missing files through medmnist (needs network)")
    p.add_argument("--no-verify", action="store_true", help="skip the MD5 check of files with official names")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true", help="start over in an existing run folder")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _flag_overrides(args: argparse.Namespace) -> dict:
    """The named flags as a nested override dict (only those given)."""
    flags = {
        ("model", "backbone"): args.backbone,
        ("data", "resolution"): args.resolution,
        ("data", "datasets"): args.datasets,
        ("data", "root"): args.data_root,
        ("train", "epochs"): args.epochs,
        ("train", "batch_size"): args.batch_size,
        ("optim", "lr"): args.lr,
        ("train", "seed"): args.seed,
        ("train", "device"): args.device,
        ("data", "download"): True if args.download else None,
        ("data", "verify"): False if args.no_verify else None,
    }
    out: dict = {}
    for (section, key), value in flags.items():
        if value is not None:
            out.setdefault(section, {})[key] = value
    if args.output is not None:
        out["output"] = args.output
    return out


def build_train_config(args: argparse.Namespace):
    """Defaults <- YAML (--config, or the run's config.yaml with --resume) <- --set <- named flags."""
    from mmpt.config import load_config, parse_override

    overrides = [parse_override(s) for s in args.set] + [_flag_overrides(args)]
    if args.resume:
        run_dir = Path(args.resume)
        if args.config:
            raise MmptError("--resume takes the run's own config.yaml; drop --config")
        if not (run_dir / "config.yaml").is_file():
            raise MmptError(f"cannot resume {run_dir}: it has no config.yaml; pass a run folder written by train.py")
        overrides.append({"output": str(run_dir)})
        return load_config(run_dir / "config.yaml", overrides)
    return load_config(args.config, overrides)


def _train(argv: list[str]) -> int:
    args = train_parser().parse_args(argv)
    cfg = build_train_config(args)
    from mmpt.train import Stopped, run

    try:
        run(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    except Stopped as exc:
        if os.environ.get("RANK", "0") == "0":
            print(str(exc), file=sys.stderr)
        return 130
    return 0


def train_main(argv: list[str] | None = None) -> int:
    return _guarded(_train, argv)


# ---------------------------------------------------------------- evaluate

def evaluate_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="evaluate.py",
        description="Evaluate a run's best checkpoint per dataset, or compare runs' metrics.",
    )
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run folder(s); several with --compare")
    p.add_argument("--checkpoint", help="a checkpoint file instead of RUN_DIR/checkpoints/best.pt")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--datasets", help="comma-separated subset of the run's datasets")
    p.add_argument("--data-root", help="folder with the npz files (default: the run's data.root)")
    p.add_argument("--cache-dir",
                   help="folder for the unpacked .npy cache (default: the run's, or DATA_ROOT/.mmpt-cache)")
    p.add_argument("--output", help="where to write metrics and predictions (default RUN_DIR/eval/<split>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--compare", action="store_true", help="print a dataset x run table of the runs' metrics.json")
    p.add_argument("--metric", default="auc", help="the metric --compare shows (default auc)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _evaluate(argv: list[str]) -> int:
    args = evaluate_parser().parse_args(argv)
    if args.compare:
        return _compare(args)
    if not args.runs and not args.checkpoint:
        raise MmptError("pass a run folder (evaluate.py runs/NAME) or --checkpoint PATH")
    if len(args.runs) > 1:
        raise MmptError("evaluate one run at a time, or add --compare to compare several")
    from mmpt.evaluate import evaluate_checkpoint

    run_dir = Path(args.runs[0]) if args.runs else None
    checkpoint = Path(args.checkpoint) if args.checkpoint else run_dir / "checkpoints" / "best.pt"
    output = Path(args.output) if args.output else (run_dir or checkpoint.parent.parent) / "eval" / args.split
    evaluate_checkpoint(
        checkpoint, output, split=args.split, datasets=args.datasets, data_root=args.data_root,
        cache_dir=args.cache_dir, device=args.device, batch_size=args.batch_size,
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from mmpt.report import compare_table, format_table, read_metrics

    if len(args.runs) < 2:
        raise MmptError("--compare needs at least two run folders")
    tables = {}
    for run in args.runs:
        path = Path(run) / "metrics.json"
        if not path.is_file():
            raise MmptError(f"{path} not found; finish the run or evaluate it first (evaluate.py {run})")
        tables[Path(run).name] = read_metrics(path)
    print(f"{args.metric} per dataset")
    print(format_table(compare_table(tables, args.metric)))
    return 0


def evaluate_main(argv: list[str] | None = None) -> int:
    return _guarded(_evaluate, argv)
