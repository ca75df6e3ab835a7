"""Command lines of `train.py` / `mmpt-train` and `evaluate.py` / `mmpt-evaluate`.

A user-caused error prints one line `error: ...` and exits 2; `--debug` shows the traceback instead. The named
flags of train.py, and the flags of evaluate.py and probe that stand for a config key, come from the keys'
declarations (`flag`, `evaluate_flag` in mmpt.config) and are checked as those keys are.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

from mmpt.config import EVALUATE_FLAGS, NAMED_FLAGS, SETTINGS, load_config, parse_flag
from mmpt.configdoc import annotated_yaml, flag_help
from mmpt.errors import MmptError
from mmpt.io import check_output_folder
from mmpt.norm import RECALIBRATION_IMAGES
from mmpt.rundir import RunDir
from mmpt.runtime import Interrupted, interrupt_on_signals
from mmpt.settings import deep_merge, nested, parse_override


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


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


# the launch.* keys (where a series' members train); their flags form train.py's launcher group
LAUNCH_KEYS = frozenset(key for key in SETTINGS if key.startswith("launch."))


# ---------------------------------------------------------------- train


def train_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="train.py",
        description="mm-PT: train one timm backbone with one head per MedMNIST+ dataset.",
        epilog="Any other config key: --set section.key=value (e.g. --set loss.weighting=size).",
    )
    p.add_argument("--config", help="YAML recipe (deep-merged over the defaults), e.g. configs/quickstart.yaml")
    launcher = p.add_argument_group(
        "launcher",
        "train a series' members (or a single run) as jobs through submitit: several at a time on this machine "
        "(local) or as a SLURM job array (slurm); run the same command again to submit what is neither finished "
        "nor running, and watch them with: evaluate.py status RUN",
    )
    for flag, key in NAMED_FLAGS.items():
        help_text = flag_help(key).replace("%", "%%")
        group = launcher if key in LAUNCH_KEYS else p
        if SETTINGS[key].hint is bool:  # a switch: sets the key to the value that is not its default
            group.add_argument(flag, action="store_true", help=help_text)
        else:
            group.add_argument(flag, metavar=key.rsplit(".", 1)[-1].upper(), help=help_text)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true", help="start over in an existing run folder")
    series = p.add_argument_group(
        "series",
        "several runs with one recipe under runs/<name>/[individual/][<variant>/][seed<k>/][<dataset>/]; "
        "run the same command again to continue a stopped series",
    )
    series.add_argument(
        "--individual",
        action="store_true",
        help="one single-dataset model per dataset of the config (--datasets restricts them)",
    )
    series.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="one variant per value; repeat for a grid (e.g. --sweep loss.weighting=none,size)",
    )
    series.add_argument("--seeds", metavar="0,1,2", help="repeat each variant with these train.seed values")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML, each key's allowed values as a comment, and exit",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _flag_overrides(args: argparse.Namespace) -> dict:
    """The named flags as a nested override dict (only those given); their text is checked as the key's value."""
    out: dict = {}
    for flag, key in NAMED_FLAGS.items():
        value = getattr(args, _dest(flag))
        if SETTINGS[key].hint is bool:
            value = (not SETTINGS[key].default) if value else None
        if value is not None:
            out = deep_merge(out, nested(key, value))
    return out


def build_train_config(args: argparse.Namespace):
    """Defaults <- YAML (--config, or the run's config.yaml with --resume) <- --set <- named flags."""
    overrides = [parse_override(s) for s in args.set] + [_flag_overrides(args)]
    if args.resume:
        run = RunDir(args.resume)
        if args.config:
            raise MmptError(f"--resume takes the run's own {run.config.name}; drop --config")
        if not run.config.is_file():
            raise MmptError(
                f"cannot resume {run.path}: it has no {run.config.name}; pass a run folder written by train.py"
            )
        overrides.append({"output": str(run.path)})
        return load_config(run.config, overrides, recorded=True)
    return load_config(args.config, overrides)


def _train(argv: list[str]) -> int:
    args = train_parser().parse_args(argv)
    cfg = build_train_config(args)
    resources = [
        flag
        for flag, key in NAMED_FLAGS.items()
        if key in LAUNCH_KEYS and key != "launch.launcher" and getattr(args, _dest(flag)) is not None
    ]
    if resources and cfg.launch.launcher == "sequential":
        raise MmptError(
            f"{resources[0]} is a job's setting and goes with --launcher local or slurm; add --launcher, "
            f"or drop {resources[0]}"
        )
    # a series is planned (every member's config checked) before --print-config, so it refuses what a run refuses
    variants = _plan_series(args, cfg) if args.individual or args.sweep or args.seeds is not None else None
    if args.print_config:
        print(annotated_yaml(cfg), end="")
        return 0
    if variants is not None:
        from mmpt.experiments.series import individual_norm_note

        note = individual_norm_note(cfg, args.individual)
        if note:
            print(note)
        return _train_series(cfg, variants, overwrite=args.overwrite)
    # imported here, as in every command below: training imports timm and TorchJD, slow for --help and errors
    from mmpt.experiments.series import check_single_run_folder
    from mmpt.train import Stopped, run

    check_single_run_folder(cfg.run_dir, resume=bool(args.resume))
    if cfg.launch.launcher != "sequential":
        return _launch_run(args, cfg)

    try:
        run(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    except Stopped as exc:
        if os.environ.get("RANK", "0") == "0":
            print(str(exc), file=sys.stderr)
        return 130
    return 0


def _plan_series(args: argparse.Namespace, cfg) -> list:
    """The runs of the series the flags ask for, every flag and member config checked (mmpt.experiments.series)."""
    from mmpt.experiments.series import check_sweep_keys, parse_seeds, parse_sweep, plan_series

    if args.resume:
        raise MmptError("--resume continues one run; to continue a series, run the same series command again")
    sweeps = [parse_sweep(s) for s in args.sweep]
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    if seeds is not None and (
        args.seed is not None or any(o.partition("=")[0].strip() == "train.seed" for o in args.set)
    ):
        raise MmptError("--seed and --seeds both set the seed; give the seeds once, with --seeds")
    check_sweep_keys(sweeps, individual=args.individual, seeds=seeds)
    return plan_series(cfg, individual=args.individual, sweeps=sweeps, seeds=seeds)


def _train_series(cfg, variants: list, *, overwrite: bool) -> int:
    from mmpt.experiments.series import run_series
    from mmpt.experiments.summary import summarize
    from mmpt.train import Stopped

    if cfg.launch.launcher != "sequential":
        from mmpt.experiments.launch_plan import plan_launch
        from mmpt.experiments.launcher import launch

        plan = plan_launch(cfg, len(variants))  # this machine or cluster, before series.json is written
        print(f"series of {len(variants)} runs under {cfg.run_dir}")
        train = functools.partial(launch, root=cfg.run_dir, plan=plan, series=True)
        return run_series(variants, overwrite=overwrite, base=cfg, train=train)
    print(f"series of {len(variants)} runs under {cfg.run_dir}")
    try:
        run_series(variants, overwrite=overwrite, base=cfg)
    except (Stopped, KeyboardInterrupt) as exc:
        print(f"{exc or 'interrupted'}\nseries stopped: run the same command again to continue it", file=sys.stderr)
        return 130
    summarize(cfg.run_dir)
    return 0


def _launch_run(args: argparse.Namespace, cfg) -> int:
    """A single run with a launcher: a series of one member, the run folder itself."""
    from mmpt.experiments.launch_plan import plan_launch
    from mmpt.experiments.launcher import launch
    from mmpt.experiments.series import Variant, check_member

    plan = plan_launch(cfg, 1)
    variant = Variant("", cfg)
    check_member(variant, overwrite=args.overwrite)
    return launch([variant], args.overwrite, root=cfg.run_dir, plan=plan, series=False)


def train_main(argv: list[str] | None = None) -> int:
    return _guarded(_train, argv)


# ---------------------------------------------------------------- evaluate

REQUIRE_COMPLETE = "refuse a series with an unfinished run (default: name it and leave it out)"
RECALIBRATE_IMAGES = (
    f"with --recalibrate-norm: train images per dataset (default {RECALIBRATION_IMAGES}, or the whole split if smaller)"
)


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="the run folder")
    p.add_argument("--checkpoint", help="a checkpoint file instead of RUN_DIR/checkpoints/best.pt")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--datasets", help="comma-separated subset of the run's datasets")
    p.add_argument("--data-root", help="folder with the npz files (default: the run's data.root)")
    p.add_argument(
        "--cache-dir", help="folder for the unpacked .npy cache (default: the run's, or DATA_ROOT/.mmpt-cache)"
    )
    p.add_argument("--output", help="where to write metrics and predictions (default RUN_DIR/eval/<split>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size")
    p.add_argument(
        "--recalibrate-norm",
        action="store_true",
        help="first re-estimate each dataset's BatchNorm statistics on its own train images (in memory; "
        "the checkpoint is not changed); results go to RUN_DIR/eval/<split>-recalibrated",
    )
    p.add_argument("--recalibrate-images", type=int, metavar="N", help=RECALIBRATE_IMAGES)


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="runs (single, individual/ folder, folder of seed<k>/ runs, or probe-<method>/ results); "
        "the first is the reference",
    )
    p.add_argument("--output", help="where to write compare.{md,csv,json,png} (default: the first run's folder)")
    p.add_argument("--metrics", default="auc,acc", help="comma-separated metrics (default auc,acc)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", default="0", help="seed of the resampling (default 0), checked as train.seed")
    p.add_argument("--data-root", help="folder with the npz files the runs were evaluated on (default: the runs')")
    p.add_argument("--jobs", type=int, default=1, help="processes for the bootstrap (default 1; -1: every core)")
    p.add_argument("--require-complete", action="store_true", help=REQUIRE_COMPLETE)
    p.add_argument(
        "--ci",
        choices=("bootstrap", "delong"),
        default="bootstrap",
        help="AUC interval: paired bootstrap (default) or DeLong's analytic variance",
    )


def _summarize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("series", metavar="SERIES_DIR", help="the series folder, runs/<name>")
    p.add_argument("--require-complete", action="store_true", help=REQUIRE_COMPLETE)


def _probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run",
        nargs="?",
        metavar="RUN",
        help="a run, an individual/ folder or a folder of seeds (every trained run under it)",
    )
    p.add_argument("--method", choices=("linear", "knn"), required=True)
    p.add_argument("--k", type=int, default=11, help="neighbours of the k-NN probe (default 11)")
    p.add_argument("--backbone", help="probe a bare timm backbone instead of a run (untrained, or --pretrained)")
    p.add_argument("--pretrained", action="store_true", help="with --backbone: its pretrained (ImageNet) weights")
    p.add_argument("--config", help="with --backbone: the recipe for data and input (default: the defaults)")
    p.add_argument("--resolution", help="with --backbone: the image size")
    p.add_argument("--datasets", help="comma-separated subset of datasets")
    p.add_argument("--data-root", help="folder with the npz files (default: the run's data.root)")
    p.add_argument("--cache-dir", help="folder for the unpacked .npy cache")
    p.add_argument("--output", help="results folder (default RUN/probe-<method>, or runs/backbone-.../probe-<method>)")
    p.add_argument(
        "--recalibrate-norm",
        action="store_true",
        help="first re-estimate each dataset's BatchNorm statistics on its own train images, so each "
        "dataset's features come through its own statistics (default output RUN/probe-<method>-recalibrated)",
    )
    p.add_argument("--recalibrate-images", type=int, metavar="N", help=RECALIBRATE_IMAGES)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size")
    p.add_argument("--require-complete", action="store_true", help=REQUIRE_COMPLETE)


def _status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="the series folder (runs/<name>), or a run trained by a launcher")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="the run folder")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint (default best)")
    p.add_argument("--output", required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty DIR")


# name -> (what it does, its description, its arguments); `run` is the default: evaluate.py RUN = evaluate.py run RUN
SUBCOMMANDS = {
    "run": (
        "evaluate a run's best checkpoint per dataset (the default: evaluate.py RUN_DIR)",
        "Evaluate a run's best checkpoint (or --checkpoint) on one split of each of its datasets: metrics and "
        "medmnist-format prediction files.",
        _run_arguments,
    ),
    "compare": (
        "compare runs on their test predictions (intervals, paired differences, Δm)",
        "Compare runs on their test predictions: bootstrap intervals, paired differences to the first run, Δm, "
        "and a Wilcoxon test over datasets when both sides have seeds.",
        _compare_arguments,
    ),
    "summarize": (
        "write the table and plot of a series",
        "Write sweep.{md,csv,json,png} for the finished runs of a series folder.",
        _summarize_arguments,
    ),
    "probe": (
        "frozen-backbone probe (linear or k-NN) of a run or a bare timm backbone",
        "Frozen-backbone probe: a linear (logistic regression, C chosen on val) or k-NN (cosine) classifier per "
        "dataset on cached backbone features; writes evaluate.py's files.",
        _probe_arguments,
    ),
    "export": (
        "write a run's backbone as a timm model, its heads and a model card",
        "Write a run's backbone as a timm model (model.safetensors + config.json, as timm saves for the Hugging "
        "Face hub), its heads (heads.safetensors) and a model card.",
        _export_arguments,
    ),
    "status": (
        "where a series' members stand, trained as jobs (finished, running, queued, failed, not started)",
        "Where a series' members stand (finished, running, queued, failed, not started), with each member's job, "
        "the last line of a failed job's log, and the study's progress and GPU-hours.",
        _status_arguments,
    ),
}


def evaluate_parser() -> argparse.ArgumentParser:
    """evaluate.py with one subparser per subcommand (so --help lists them all)."""
    p = _Parser(
        prog="evaluate.py",
        description="Evaluate runs, compare them, summarize a series, probe and export backbones, and show where a "
        "series' jobs stand.",
        epilog="evaluate.py RUN_DIR [...] is evaluate.py run RUN_DIR [...]; each command has its own --help.",
    )
    commands = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)
    for name, (summary, description, add_arguments) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=description)
        add_arguments(sub)
        sub.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _check_evaluation_flags(args: argparse.Namespace) -> argparse.Namespace:
    """The flags that stand for a config key (mmpt.config.EVALUATE_FLAGS) as checked values of their keys."""
    for flag, key in EVALUATE_FLAGS.items():
        if getattr(args, _dest(flag), None) is not None:
            setattr(args, _dest(flag), parse_flag(flag, key, getattr(args, _dest(flag))))
    return args


# 100,000 paired resamples put the Monte Carlo error of a 95% percentile bound far below the third decimal
# (the default 1000 is already within about 0.01 of it); more costs minutes per dataset and changes nothing shown
MAX_BOOTSTRAP = 100_000


def _check_flags(**values) -> None:
    """Validate subcommand flags the way the config validates keys: one MmptError naming the flag and its range."""
    for flag, value in values.items():
        if value is None:
            continue
        name = "--" + flag.replace("_", "-")
        if flag == "bootstrap" and not 1 <= value <= MAX_BOOTSTRAP:
            raise MmptError(
                f"{name} must be 1..{MAX_BOOTSTRAP:,} resamples, got {value}; 1000 gives intervals "
                "precise to about 0.01"
            )
        if flag == "jobs" and not (value >= 1 or value == -1):
            raise MmptError(f"{name} must be a number of processes >= 1, or -1 for every core, got {value}")
        if flag == "k" and value < 1:
            raise MmptError(f"{name} must be >= 1, got {value}")
        if flag in ("metrics", "datasets") and any(not item.strip() for item in value.split(",")):
            raise MmptError(f"{name} '{value}' has an empty item; give names separated by single commas")
        if flag == "output":
            check_output_folder(Path(value), name)


def _recalibrate_images(recalibrate_norm: bool, images: int | None) -> int | None:
    """Train images per dataset for --recalibrate-norm (None: no recalibration); raises MmptError for a bad pair."""
    if images is not None and not recalibrate_norm:
        raise MmptError("--recalibrate-images goes with --recalibrate-norm; add it, or drop --recalibrate-images")
    if images is not None and images < 2:
        raise MmptError(f"--recalibrate-images must be >= 2 (BatchNorm needs two images), got {images}")
    return (images or RECALIBRATION_IMAGES) if recalibrate_norm else None


def _evaluate_run(args: argparse.Namespace) -> int:
    args = _check_evaluation_flags(args)
    if not args.runs and not args.checkpoint:
        raise MmptError("pass a run folder (evaluate.py runs/NAME) or --checkpoint PATH")
    if len(args.runs) > 1:
        raise MmptError("evaluate one run at a time, or compare several with evaluate.py compare")
    _check_flags(datasets=args.datasets, output=args.output)
    recalibrate_images = _recalibrate_images(args.recalibrate_norm, args.recalibrate_images)
    from mmpt.evaluate import evaluate_checkpoint

    run = RunDir(args.runs[0]) if args.runs else None
    checkpoint = Path(args.checkpoint) if args.checkpoint else run.best
    # default output: eval/<split> of the run folder (of a checkpoint's: two folders up, as RUN/checkpoints/best.pt)
    run = run or RunDir(checkpoint.parent.parent)
    output = Path(args.output) if args.output else run.eval(args.split, args.recalibrate_norm).path
    try:
        with interrupt_on_signals():
            evaluate_checkpoint(
                checkpoint,
                output,
                split=args.split,
                datasets=args.datasets,
                data_root=args.data_root,
                cache_dir=args.cache_dir,
                device=args.device,
                batch_size=args.batch_size,
                recalibrate_images=recalibrate_images,
            )
    except Interrupted as exc:
        # evaluation keeps no state worth saving: stop at once; files already written are whole (atomic writes)
        print(f"{exc} received: evaluation stopped; run the same command again to evaluate", file=sys.stderr)
        return 130
    return 0


def _compare(args: argparse.Namespace) -> int:
    seed = parse_flag("--seed", "train.seed", args.seed)  # the resampling seed has the train seed's range
    _check_flags(bootstrap=args.bootstrap, jobs=args.jobs, metrics=args.metrics, output=args.output)
    from mmpt.experiments.compare import compare_runs
    from mmpt.experiments.compare_report import format_compare, write_compare

    result = compare_runs(
        [Path(r) for r in args.runs],
        metrics=[m.strip() for m in args.metrics.split(",") if m.strip()],
        n_resamples=args.bootstrap,
        seed=seed,
        data_root=args.data_root,
        jobs=args.jobs,
        require_complete=args.require_complete,
        ci=args.ci,
    )
    paths = write_compare(result, Path(args.output) if args.output else Path(args.runs[0]))
    print(format_compare(result))
    print(f"written: {', '.join(str(p) for p in paths)}")
    return 0


def _summarize(args: argparse.Namespace) -> int:
    from mmpt.experiments.summary import summarize

    summarize(Path(args.series), require_complete=args.require_complete)
    return 0


def _probe(args: argparse.Namespace) -> int:
    a = _check_evaluation_flags(args)
    _check_flags(k=a.k, datasets=a.datasets, output=a.output)
    if a.backbone and a.run:
        raise MmptError("probe a run or a bare --backbone, not both")
    if not a.backbone and not a.run:
        raise MmptError("pass a run folder to probe, or --backbone NAME for a bare backbone")
    from mmpt.experiments.probe import probe_backbone, probe_runs

    common = dict(
        method=a.method,
        k=a.k,
        datasets=a.datasets,
        data_root=a.data_root,
        cache_dir=a.cache_dir,
        device=a.device,
        batch_size=a.batch_size,
        recalibrate_images=_recalibrate_images(a.recalibrate_norm, a.recalibrate_images),
    )
    output = Path(a.output) if a.output else None
    if a.backbone:
        probe_backbone(
            a.backbone, pretrained=a.pretrained, config=a.config, resolution=a.resolution, output=output, **common
        )
    else:
        probe_runs(Path(a.run), output=output, require_complete=a.require_complete, **common)
    return 0


def _export(args: argparse.Namespace) -> int:
    from mmpt.experiments.export import export_run

    paths = export_run(Path(args.run), Path(args.output), checkpoint=args.checkpoint, overwrite=args.overwrite)
    print(f"written: {', '.join(str(p) for p in paths)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from mmpt.experiments.status import format_status

    print(format_status(Path(args.run)), end="")
    return 0


COMMANDS = {
    "run": _evaluate_run,
    "compare": _compare,
    "summarize": _summarize,
    "probe": _probe,
    "export": _export,
    "status": _status,
}
assert COMMANDS.keys() == SUBCOMMANDS.keys(), "every subcommand has a parser and a function"


def _evaluate(argv: list[str]) -> int:
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        argv = ["run", *argv]  # the default subcommand
    args = evaluate_parser().parse_args(argv)
    return COMMANDS[args.command](args)


def evaluate_main(argv: list[str] | None = None) -> int:
    return _guarded(_evaluate, argv)
