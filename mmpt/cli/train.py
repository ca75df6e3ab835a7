"""The command line of `train.py` / `mmpt-train`: one run, a series (--individual, --sweep, --seeds), or their
members as jobs (--launcher). Its named flags come from the keys' declarations (`flag` in mmpt.config) and are
checked as those keys are.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys

from mmpt.cli.common import LAUNCH_KEYS, Parser, add_setting_flag, check_launch_resources, flag_overrides
from mmpt.config import NAMED_FLAGS, load_config
from mmpt.config.docs import annotated_yaml
from mmpt.config.settings import parse_override
from mmpt.errors import MmptError
from mmpt.runs.members import read_series, series_of
from mmpt.runs.rundir import RunDir


def train_parser() -> argparse.ArgumentParser:
    p = Parser(
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
        add_setting_flag(launcher if key in LAUNCH_KEYS else p, flag, key)
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


def build_train_config(args: argparse.Namespace):
    """Defaults <- YAML (--config, or the run's config.yaml with --resume) <- --set <- named flags."""
    overrides = [parse_override(s) for s in args.set] + [flag_overrides(args, NAMED_FLAGS)]
    if args.resume:
        run = RunDir(args.resume)
        if args.config:
            raise MmptError(f"--resume takes the run's own {run.config.name}; drop --config")
        if not run.config.is_file():
            raise MmptError(
                f"cannot resume {run.path}: it has no {run.config.name}; pass a run folder written by train.py"
            )
        overrides.append({"output": str(run.path)})
        owner = series_of(run.path)
        if args.launcher is None:
            # a resume trains here, whatever launcher trained the run before (a member's config records its own)
            overrides.append({"launch": {"launcher": "sequential"}})
        elif owner is not None and owner[1] in (read_series(owner[0]) or {}).get("members", {}):
            raise MmptError(
                f"{run.path} is a member of the series in {owner[0]}, whose launcher keeps its jobs: continue it "
                "with the series' own command, or here (in this process) without --launcher"
            )
        return load_config(run.config, overrides, recorded=True)
    return load_config(args.config, overrides)


def train_command(argv: list[str]) -> int:
    args = train_parser().parse_args(argv)
    # the command that continues what this one starts (a stopped member's job names it): the same, less --overwrite
    args.again = "python train.py " + shlex.join(a for a in argv if a != "--overwrite")
    cfg = build_train_config(args)
    check_launch_resources(args, cfg.launch.launcher)
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
        return _train_series(cfg, variants, overwrite=args.overwrite, command=args.again)
    # imported here, as in every command of mmpt.cli: training imports timm and TorchJD, slow for --help and errors
    from mmpt.experiments.series import check_single_run_folder
    from mmpt.training.loop import Stopped, run

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


def _train_series(cfg, variants: list, *, overwrite: bool, command: str = "") -> int:
    from mmpt.experiments.series import run_series
    from mmpt.experiments.summary import summarize
    from mmpt.training.loop import Stopped

    if cfg.launch.launcher != "sequential":
        from mmpt.experiments.launch_plan import plan_launch
        from mmpt.experiments.launcher import launch_series

        # this machine or cluster, checked before series.json is written
        plan = plan_launch(cfg.launch, len(variants), cfg.checkpoint.every_minutes)
        print(f"series of {len(variants)} runs under {cfg.run_dir}")
        train = functools.partial(launch_series, root=cfg.run_dir, plan=plan, series=True, command=command)
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
    from mmpt.experiments.launcher import launch_series
    from mmpt.experiments.series import Variant, check_member

    plan = plan_launch(cfg.launch, 1, cfg.checkpoint.every_minutes)
    variant = Variant("", cfg)
    check_member(variant, overwrite=args.overwrite)
    return launch_series([variant], args.overwrite, root=cfg.run_dir, plan=plan, series=False, command=args.again)
