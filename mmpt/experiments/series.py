"""Series of runs with one recipe: individual baselines, sweeps over config keys, repeats over seeds.

Layout under the series folder (the config's run folder, runs/<name>/), each part present only when asked for:

    [individual/] [<variant>/] [seed<k>/] [<dataset>/]      e.g. runs/q/individual/seed1/breastmnist/

A series is resumable: a run with summary.json is finished and skipped, one with checkpoints/last.pt
continues from it exactly (as `train.py --resume` does), the others start. At the end `summarize`
(mmpt.experiments.summary) writes sweep.{md,csv,json,png} into the series folder.

The series folder records in series.json the recipe it was asked for and each member's resolved config.
A rerun checks them before anything starts: a finished member trained with another recipe, or an unfinished
one that `--resume` would refuse, is a one-line error. `summarize`, `compare` and `probe` count a member
only once it is finished and trained with the recipe series.json records for it (`series_runs`,
`member_status`); the others are named and left out.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from mmpt.config import RESULT_NEUTRAL, RESUME_MAY_CHANGE, Config, check_value, config_differences, from_dict
from mmpt.config.settings import deep_merge, load_yaml, nested, to_dict
from mmpt.errors import MmptError
from mmpt.io import json_text, write_bytes, write_json
from mmpt.model.weights import require_weights
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.members import (
    SEED_DIR,
    _first_difference,
    _recorded_config,
    read_run_config,
    read_series,
    series_of,
)
from mmpt.runs.rundir import RunDir
from mmpt.runs.seriesdir import SeriesDir
from mmpt.training.loop import run


@dataclass(frozen=True)
class Variant:
    """One run of a series: its folder relative to the series folder, and its resolved config."""

    path: str
    cfg: Config


def parse_sweep(text: str) -> tuple[str, list]:
    """`KEY=V1,V2[,...]` -> (KEY, [V1, V2, ...]), each value read as YAML (so 1e-3, true, none work).

    Raises MmptError for a missing key, an empty value (`a,,b`, a trailing comma) or a value given twice.
    """
    key, sep, raw = text.partition("=")
    items = [v.strip() for v in raw.split(",")]
    if not sep or not key.strip() or not raw.strip():
        raise MmptError(f"--sweep expects KEY=V1,V2 (e.g. loss.weighting=none,size), got '{text}'")
    if "" in items:
        raise MmptError(
            f"--sweep {text} has an empty value; give each value once, separated by single commas "
            "(e.g. loss.weighting=none,size)"
        )
    values = []
    for item in items:
        try:
            values.append(load_yaml(item))
        except yaml.YAMLError:
            raise MmptError(
                f"--sweep {text}: '{item}' is not a value; quote it or give a number, true/false or a word"
            ) from None
    if len(set(items)) != len(items):
        raise MmptError(f"--sweep {text} names a value twice; give each value once")
    return key.strip(), values


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` -> [0, 1, 2], each checked as train.seed; an empty item or a repeated seed is an MmptError."""
    seeds: list[int] = []
    for item in text.split(","):
        seed, problem = check_value("train.seed", item.strip())
        if problem is None and seed in seeds:
            problem = f"must not repeat, got {seed} twice"
        if problem:
            raise MmptError(
                f"--seeds expects distinct seeds separated by single commas, such as 0,1,2; each seed {problem} "
                f"(in '{text}')"
            )
        seeds.append(seed)
    return seeds


def check_sweep_keys(sweeps: list[tuple[str, list]], *, individual: bool, seeds: list[int] | None) -> None:
    """Raise MmptError for a sweep over a key the series sets itself or that does not change what a run computes."""
    for key, _ in sweeps:
        if key in RESULT_NEUTRAL:
            raise MmptError(
                f"--sweep {key}: {key} does not change what a run computes, so every variant would "
                "train the same model; sweep a key of the recipe (e.g. loss.weighting, optim.lr)"
            )
        if key == "train.seed" and seeds is not None:
            raise MmptError("--sweep train.seed and --seeds both set the seed; give the seeds once, with --seeds")
        if key == "data.datasets" and individual:
            raise MmptError(
                "--sweep data.datasets with --individual: the individual series sets each run's "
                "dataset; restrict them with --datasets instead"
            )
        if key == "model.norm" and individual:
            raise MmptError(
                "--sweep model.norm with --individual: each run trains one dataset, which has nothing to keep apart, "
                "so every model.norm value trains the same model; sweep model.norm over the mm-PT series "
                "(without --individual)"
            )


def individual_norm_note(cfg: Config, individual: bool) -> str | None:
    """The line that says a per-dataset model.norm does nothing in an individual series (one dataset per run)."""
    if not individual or cfg.model.norm not in ("per_dataset_stats", "per_dataset"):
        return None
    return (
        f"note: model.norm {cfg.model.norm} keeps BatchNorm statistics apart per dataset, but each run of "
        "--individual trains one dataset, which has nothing to keep apart: these runs normalise as model.norm "
        "shared does"
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def variant_name(assignments: tuple[tuple[str, object], ...]) -> str:
    """A readable folder name for one grid point, e.g. `lr-0.001_weighting-size`."""
    return "_".join(f"{_slug(key.split('.')[-1])}-{_slug(str(value))}" for key, value in assignments)


def _init_source(init_from: str | None, seed: int | None) -> str | None:
    """With seeds, a series folder to initialise from gives each seed its own seed<k> run; a folder of seeds without
    that seed is an MmptError (seed k never starts from another seed's run)."""
    if init_from is None or seed is None:
        return init_from
    source = Path(init_from)
    if (source / f"seed{seed}").is_dir():
        return str(source / f"seed{seed}")
    held = sorted(
        (p.name for p in source.glob("seed*") if p.is_dir() and SEED_DIR.fullmatch(p.name)),
        key=lambda name: int(name.removeprefix("seed")),
    )
    if held:
        raise MmptError(
            f"model.init_from {init_from} is a folder of seeds ({', '.join(held)}) without seed{seed}/, which "
            f"--seeds asks to fine-tune from; pass seeds it holds, or train its seed{seed} first"
        )
    return init_from


def plan_series(
    cfg: Config,
    *,
    individual: bool = False,
    sweeps: list[tuple[str, list]] = (),
    seeds: list[int] | None = None,
) -> list[Variant]:
    """Every run of the series, in the order they train; each config validated before anything runs.

    Raises MmptError naming a sweep key or value the config does not accept.
    """
    root = cfg.run_dir
    base = to_dict(cfg)
    keys = [key for key, _ in sweeps]
    if len(set(keys)) != len(keys):
        raise MmptError(f"--sweep names a key twice ({', '.join(keys)}); give each key once with all its values")
    grid = list(itertools.product(*[[(key, value) for value in values] for key, values in sweeps]))
    variants = []
    for assignments in grid:
        for seed in seeds or [None]:
            for flag in cfg.data.datasets if individual else [None]:
                parts = (["individual"] if individual else []) + ([variant_name(assignments)] if assignments else [])
                parts += ([f"seed{seed}"] if seed is not None else []) + ([flag] if flag else [])
                raw = base
                for key, value in assignments:
                    raw = _set(raw, key, value)
                # a swept model.init_from is the source of that variant (seed<k> of it with --seeds)
                init_from = raw.get("model", {}).get("init_from") if isinstance(raw.get("model"), dict) else None
                raw = deep_merge(
                    raw,
                    {
                        "name": _slug("-".join([cfg.name, *parts])),
                        "output": str(root.joinpath(*parts)),
                        "model": {"init_from": _init_source(init_from, seed)},
                    },
                )
                if seed is not None:
                    raw = deep_merge(raw, {"train": {"seed": seed}})
                if flag is not None:
                    raw = deep_merge(raw, {"data": {"datasets": [flag]}})
                try:
                    variants.append(Variant("/".join(parts), from_dict(raw)))
                except MmptError as exc:
                    where = f" (--sweep {', '.join(f'{k}={v}' for k, v in assignments)})" if assignments else ""
                    raise MmptError(f"{exc}{where}") from None
    paths = [v.path for v in variants]
    twice = next((p for p in paths if paths.count(p) > 1), None)
    if twice is not None:
        raise MmptError(
            f"two variants of the sweep would share the folder {twice}; give values that differ "
            "in letters, digits, '.', '_' or '-'"
        )
    return variants


def _set(raw: dict, key: str, value) -> dict:
    """`raw` with the dotted `key` set to `value` (a YAML-parsed sweep value)."""
    return deep_merge(raw, nested(key, value))


def check_single_run_folder(run_dir: Path, *, resume: bool) -> None:
    """Refuse to start a single run in a series folder, or in the folder of a series' member (resume is fine)."""
    run_dir, series_file = Path(run_dir), SeriesDir(run_dir).record
    if series_file.is_file():
        raise MmptError(
            f"{run_dir} is a series folder ({series_file.name}), and a folder is a run or a series, never "
            "both; pass --output DIR for this run, or run the series command again to continue it"
        )
    owner = series_of(run_dir)
    if owner is not None and not resume:
        root, member = owner
        record = read_series(root)
        if record is not None and member in record["members"]:
            raise MmptError(
                f"{run_dir} is run {member} of the series in {root}; run the series command again to "
                "continue it (or --resume an interrupted run), or pass --output DIR for a new run"
            )


def check_series_folder(root: Path, base: Config, variants: list[Variant], *, overwrite: bool) -> dict:
    """Check, before anything runs, that the series may train in `root`; return the series.json to write.

    A series folder holds one recipe: a rerun with another one (a key other than the series' own axes
    and RESULT_NEUTRAL) is refused unless --overwrite, and then the earlier recipe's runs stop being
    members. Raises MmptError (one line, the folder untouched) when `root` is a single run's folder, when
    the recorded recipe differs, or when a member's folder holds a run of another recipe (`check_member`).
    """
    root, run = Path(root), RunDir(root)
    if run.is_run() or run.config.is_file():
        present = [p.name for p in (run.config, run.summary, run.checkpoints) if p.exists()]
        raise MmptError(
            f"{root} is a single run's folder ({', '.join(present)}), "
            "and a folder is a run or a series, never both; pass --output DIR for the series"
        )
    owner = series_of(root)
    if owner is not None:
        raise MmptError(f"{root} lies inside the series folder {owner[0]}; pass --output DIR outside it")
    record = read_series(root) if root.is_dir() else None
    members = {}
    if record is not None:
        # the datasets are an axis too: an individual series restricted by --datasets shares the folder
        diffs = config_differences(
            _recorded_config(record["recipe"], SeriesDir(root).record), base, RESULT_NEUTRAL | {"data.datasets"}
        )
        if diffs and not overwrite:
            key, text = _first_difference(diffs)
            raise MmptError(
                f"the series in {root} was trained with {text} as asked now; {key} is part of the "
                "recipe: pass --overwrite to train the series again with it, or --output DIR for a "
                "new series"
            )
        if not diffs:
            members = dict(record["members"])
    for variant in variants:
        if check_member(variant, overwrite=overwrite) == "start" and variant.cfg.model.init_from:
            require_weights(variant.cfg.model.init_from)  # before any member trains, not when this one starts
        members[variant.path] = to_dict(variant.cfg)
    return {"recipe": to_dict(base), "members": members}


def check_member(variant: Variant, *, overwrite: bool) -> str:
    """What a rerun does with one member: "finished", "resume" or "start"; MmptError when that would mix recipes.

    A finished member must have been trained with the recipe asked for (RESULT_NEUTRAL keys aside); an
    unfinished one with last.pt follows --resume's rule (mmpt.config.RESUME_MAY_CHANGE may differ).
    """
    run_dir, run = variant.cfg.run_dir, RunDir(variant.cfg.run_dir)
    if SeriesDir(run_dir).record.is_file():
        raise MmptError(
            f"{run_dir} is a series folder, where this series trains its run {variant.path}; "
            "pass --output DIR for the series"
        )
    if overwrite:
        return "start"
    advice = "pass --overwrite to train it again with the recipe asked for, or --output DIR for a new series"
    if run.summary.is_file():
        diffs = config_differences(read_run_config(run_dir), variant.cfg, RESULT_NEUTRAL)
        if diffs:
            _, text = _first_difference(diffs)
            raise MmptError(f"finished run {run_dir} was trained with {text} as this series asks; {advice}")
        return "finished"
    last = run.last
    if last.is_file():
        saved = ckpt.load(last).get(ckpt.CONFIG)
        diffs = config_differences(_recorded_config(saved, last), variant.cfg, RESUME_MAY_CHANGE)
        if diffs:
            key, text = _first_difference(diffs)
            raise MmptError(
                f"interrupted run {run_dir} was trained with {text} as this series asks; {key} cannot "
                f"change mid-run: {advice}"
            )
        return "resume"
    return "start"


def run_series(
    variants: list[Variant],
    *,
    overwrite: bool = False,
    base: Config | None = None,
    train: Callable[[list[Variant], bool], object] | None = None,
):
    """Check every member (see check_series_folder), record series.json, then train the members with `train`
    (default: each variant in turn in this process, skipping finished runs and continuing interrupted ones; a
    launcher passes its own, which runs the same `train_member` as jobs). Returns what `train` returns.

    Raises MmptError before anything runs when a member would mix recipes; mmpt.training.loop.Stopped when a run was
    stopped by SIGINT/SIGTERM/SIGUSR2 (its last.pt written).
    """
    train = train or _train_variants
    if base is None:
        return train(variants, overwrite)
    root = base.run_dir
    record = check_series_folder(root, base, variants, overwrite=overwrite)
    path = SeriesDir(root).record
    root_existed = root.is_dir()
    previous = path.read_bytes() if path.is_file() else None
    times = path.stat() if previous is not None else None
    absent = [v.cfg.run_dir for v in variants if not v.cfg.run_dir.exists()]
    if previous is None or previous != json_text(record).encode():
        write_json(path, record)
    try:
        return train(variants, overwrite)
    except MmptError:
        # refused before any new run folder was made (e.g. a missing data file): leave the folder as it was
        if not any(folder.exists() for folder in absent):
            if previous is None:
                path.unlink(missing_ok=True)
                if not root_existed and not any(root.iterdir()):
                    root.rmdir()
            elif path.read_bytes() != previous:
                write_bytes(path, previous)
                os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
        raise


def train_member(variant: Variant, *, overwrite: bool, label: str) -> None:
    """Train one member of a series, as a sequential series and a launcher's job both do: skip it when finished,
    continue it from checkpoints/last.pt when interrupted, else start it (`label` opens its line)."""
    folder = RunDir(variant.cfg.run_dir)
    if not overwrite and folder.summary.is_file():
        print(f"{label}: finished, skipped")
        return
    resume = not overwrite and folder.last.is_file()
    print(label + (": continuing from last.pt" if resume else ""))
    # a folder without last.pt holds only the outputs of a start that never reached a checkpoint
    run(variant.cfg, resume=resume, overwrite=overwrite or not resume)


def _train_variants(variants: list[Variant], overwrite: bool) -> None:
    for i, variant in enumerate(variants, 1):
        train_member(variant, overwrite=overwrite, label=f"[{i}/{len(variants)}] {variant.path or variant.cfg.run_dir}")
