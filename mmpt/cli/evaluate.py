"""The command line of `evaluate.py` / `mmpt-evaluate`: one subcommand each to evaluate a run, compare runs,
summarize a series, probe and export backbones, and show where a series' jobs stand (`evaluate.py RUN` is
`evaluate.py run RUN`). Its flags that stand for a config key (`evaluate_flag` in mmpt.config) are checked as
those keys are.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from mmpt.cli.common import LAUNCH_FLAGS, Parser, add_setting_flag, check_launch_resources, flag_dest, flag_overrides
from mmpt.config import EVALUATE_FLAGS, SETTINGS, load_config, parse_flag
from mmpt.config.choices import CALIBRATIONS
from mmpt.errors import MmptError
from mmpt.io import check_output_folder
from mmpt.model.calibration import RECALIBRATION_IMAGES
from mmpt.runs.rundir import RunDir
from mmpt.runtime.process import Interrupted, interrupt_on_signals

REQUIRE_COMPLETE = "refuse a series with an unfinished run (default: name it and leave it out)"
ECE_BINS = "equal-width confidence bins of the ECE (default: the run's evaluation.ece_bins)"
COMPARE_ECE_BINS = "equal-width confidence bins of the ECE (default: evaluation.ece_bins's default, 15)"
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
    p.add_argument(
        "--calibrate",
        choices=CALIBRATIONS,
        help="also fit a temperature per dataset (per label of chestmnist) on the val split and write the "
        "evaluation of the scaled scores into OUTPUT/calibrated/ (the raw results unchanged beside it)",
    )
    p.add_argument("--ece-bins", help=ECE_BINS)


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="runs (single, individual/ folder, folder of seed<k>/ runs, or probe-<method>/ results); "
        "the first is the reference",
    )
    p.add_argument("--output", help="where to write compare.{md,csv,json,png} (default: the first run's folder)")
    p.add_argument(
        "--metrics",
        default="auc,acc",
        help="comma-separated metrics (default auc,acc; qwk and mae: ordinal datasets only)",
    )
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", default="0", help="seed of the resampling (default 0), checked as train.seed")
    p.add_argument("--data-root", help="folder with the npz files the runs were evaluated on (default: the runs')")
    p.add_argument("--jobs", type=int, default=1, help="processes for the bootstrap (default 1; -1: every core)")
    p.add_argument("--require-complete", action="store_true", help=REQUIRE_COMPLETE)
    p.add_argument(
        "--per-class",
        action="store_true",
        help="also each class's (each label's) precision, recall, F1 and AUC with intervals and paired differences "
        "(runs of the same datasets)",
    )
    p.add_argument("--ece-bins", help=COMPARE_ECE_BINS)
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
    launcher = p.add_argument_group(
        "launcher",
        "probe the runs of a series as jobs through submitit, one job per run: several at a time on this machine "
        "(local) or as a SLURM job array (slurm); run the same command again to submit the probes that are missing "
        "or stale, and watch them with: evaluate.py status OUTPUT",
    )
    for flag, key in LAUNCH_FLAGS.items():
        add_setting_flag(launcher, flag, key)


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
    p = Parser(
        prog="evaluate.py",
        description="Evaluate runs, compare them, summarize a series, probe and export backbones, and show where a "
        "series' jobs stand.",
        epilog="evaluate.py RUN_DIR [...] is evaluate.py run RUN_DIR [...]; each command has its own --help.",
    )
    commands = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser, required=True)
    for name, (summary, description, add_arguments) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=description)
        add_arguments(sub)
        sub.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _check_evaluation_flags(args: argparse.Namespace) -> argparse.Namespace:
    """The flags that stand for a config key (mmpt.config.EVALUATE_FLAGS) as checked values of their keys."""
    for flag, key in EVALUATE_FLAGS.items():
        if getattr(args, flag_dest(flag), None) is not None:
            setattr(args, flag_dest(flag), parse_flag(flag, key, getattr(args, flag_dest(flag))))
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
    from mmpt.evaluation.evaluate import evaluate_checkpoint

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
                calibrate=args.calibrate,
                ece_bins=args.ece_bins,
            )
    except Interrupted as exc:
        # evaluation keeps no state worth saving: stop at once; files already written are whole (atomic writes)
        print(f"{exc} received: evaluation stopped; run the same command again to evaluate", file=sys.stderr)
        return 130
    return 0


def _compare(args: argparse.Namespace) -> int:
    args = _check_evaluation_flags(args)
    seed = parse_flag("--seed", "train.seed", args.seed)  # the resampling seed has the train seed's range
    _check_flags(bootstrap=args.bootstrap, jobs=args.jobs, metrics=args.metrics, output=args.output)
    from mmpt.analysis.compare import compare_runs
    from mmpt.analysis.report import format_compare, write_compare

    result = compare_runs(
        [Path(r) for r in args.runs],
        metrics=[m.strip() for m in args.metrics.split(",") if m.strip()],
        n_resamples=args.bootstrap,
        seed=seed,
        data_root=args.data_root,
        jobs=args.jobs,
        require_complete=args.require_complete,
        ci=args.ci,
        ece_bins=SETTINGS["evaluation.ece_bins"].default if args.ece_bins is None else args.ece_bins,
        per_class=args.per_class,
    )
    paths = write_compare(
        result,
        Path(args.output) if args.output else Path(args.runs[0]),
        command=f"python evaluate.py {shlex.join(args.argv)}",
    )
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
    from mmpt.evaluation.probe import probe_backbone, probe_runs

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
    settings = load_config(None, [flag_overrides(a, LAUNCH_FLAGS)]).launch  # checked as the launch.* keys are
    check_launch_resources(a, settings.launcher)
    if settings.launcher != "sequential":
        if a.backbone:
            raise MmptError("a bare --backbone is one probe, run in this process; drop --launcher")
        from mmpt.experiments.probe_launch import launch_probes

        return launch_probes(Path(a.run), settings, output=output, require_complete=a.require_complete, **common)
    if a.backbone:
        probe_backbone(
            a.backbone, pretrained=a.pretrained, config=a.config, resolution=a.resolution, output=output, **common
        )
    else:
        probe_runs(Path(a.run), output=output, require_complete=a.require_complete, **common)
    return 0


def _export(args: argparse.Namespace) -> int:
    from mmpt.model.export import export_run

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


def evaluate_command(argv: list[str]) -> int:
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        argv = ["run", *argv]  # the default subcommand
    args = evaluate_parser().parse_args(argv)
    args.argv = list(argv)  # the command line, for the records that name it (compare.html)
    return COMMANDS[args.command](args)
