"""The rules between keys of a config (no environment: the same result on every machine), checked where a config
is loaded (mmpt.config.from_dict), so `--print-config` refuses what a run refuses. `cfg` is a mmpt.config.Config
(typed Any: the schema imports this module, so this module cannot import the schema)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mmpt.config.methods import GRADIENT, METHODS, method_problems
from mmpt.errors import MmptError
from mmpt.tasks import resolve_tasks

# A run name: one safe path component (no separators, not '.' or '..').
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def run_name_problem(name: str) -> str | None:
    """What is wrong with the run name `name`, or None: it is a folder under runs/ and the @run part of prediction
    files, so it must not hold a path."""
    if RUN_NAME.fullmatch(name) and name not in (".", ".."):
        return None
    return (
        f"must be letters, digits, '.', '_' or '-' (it names runs/<name> and the prediction files), "
        f"got {name!r}; to write elsewhere, set output (--output DIR)"
    )


def datasets_problem(names: tuple[str, ...]) -> str | None:
    """What is wrong with data.datasets, or None."""
    try:
        resolve_tasks(names)
    except MmptError as exc:
        return f"must name MedMNIST+ datasets: {exc}"
    return None


def tasks_per_step_problem(k: int | str, datasets: int | None = None) -> str | None:
    """What is wrong with sampler.tasks_per_step `k` for that many datasets (None: not known yet), or None."""
    if k == "all" or (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= (datasets or k)):
        return None
    count = f" ({datasets})" if datasets else ""
    return f"must be a whole number from 1 to the number of datasets{count} or all, got {k!r}"


def dataset_flag(name: str) -> str:
    """A dataset's medmnist flag from its flag or short name (breast -> breastmnist)."""
    name = name.strip().lower()
    return name if name.endswith("mnist") else f"{name}mnist"


def cross_problems(cfg: Any, default_root: str) -> list[str]:
    """Every rule between keys that `cfg` breaks, one line each (`default_root`: data.root's default)."""
    problems = []
    if cfg.data.synthetic and Path(cfg.data.root).expanduser() == Path(default_root).expanduser():
        problems.append(
            f"data.synthetic writes generated files under medmnist's names; give it a folder of its own "
            f"(data.root: data/synthetic), not {default_root}"
        )
    problems += _probe_problems(cfg)
    flags = [t.flag for t in resolve_tasks(cfg.data.datasets)]
    problems += _monitor_problems(cfg)
    k = cfg.sampler.tasks_per_step
    problem = tasks_per_step_problem(k, len(flags))
    if problem:
        return [*problems, f"sampler.tasks_per_step {problem}"]
    if cfg.model.norm == "per_dataset" and METHODS[cfg.loss.weighting].kind == GRADIENT:
        # its per-dataset affine weights sit inside the backbone but outside the Jacobian the method aggregates
        problems.append(
            f"model.norm per_dataset gives each dataset its own BatchNorm weights, which "
            f"loss.weighting={cfg.loss.weighting} (a gradient-based method, aggregating the Jacobian of the shared "
            "backbone) does not train; use model.norm per_dataset_stats or a static or loss-based weighting"
        )
    problems += _jacobian_problems(cfg)
    if cfg.train.compile and cfg.model.norm == "per_dataset":
        # its per-dataset affine weights are picked by host integers: a compiled graph per dataset and mix of them
        problems.append(
            "train.compile cannot compile model.norm per_dataset (each dataset's own BatchNorm weights would need one "
            "graph per dataset); use model.norm per_dataset_stats, whose statistics compile into one graph, or "
            "train.compile false"
        )
    weights = {dataset_flag(name): value for name, value in cfg.loss.weights.items()}
    return problems + method_problems(
        cfg.loss.weighting,
        dict(cfg.loss.weighting_args),
        tasks_per_step=k,
        weights=weights,
        datasets=flags,
    )


def _jacobian_problems(cfg: Any) -> list[str]:
    """loss.jacobian names a path only a gradient-based method takes; one_pass forwards each dataset on its own, which a
    compiled backbone and fp16's loss scaling do not (a backbone's shared BatchNorm is checked once it is built)."""
    path = cfg.loss.jacobian
    if path == "auto":
        return []
    if METHODS[cfg.loss.weighting].kind != GRADIENT:
        return [
            f"loss.jacobian {path} chooses how a gradient-based method gets its Jacobian, but "
            f"loss.weighting={cfg.loss.weighting} takes none; leave loss.jacobian auto"
        ]
    problems = []
    if path == "one_pass" and cfg.train.compile:
        problems.append(
            "loss.jacobian one_pass runs each dataset's own forward pass, which train.compile does not "
            "compile; set loss.jacobian autojac (or auto) or train.compile false"
        )
    if path == "one_pass" and cfg.train.precision == "fp16":
        problems.append(
            "loss.jacobian one_pass does not take fp16's loss scaling; set loss.jacobian autojac (or auto) "
            "or train.precision bf16"
        )
    return problems


def _monitor_problems(cfg: Any) -> list[str]:
    """train.monitor_reference goes with val_delta_m, which needs it; the folder itself is read before training
    (mmpt.training.build.check_run)."""
    monitor, reference = cfg.train.monitor, cfg.train.monitor_reference
    if monitor == "val_delta_m" and reference is None:
        return [
            "train.monitor val_delta_m is relative to individually trained runs: set train.monitor_reference to "
            "their individual/ folder, or use train.monitor val_auc_gain (no reference needed)"
        ]
    if reference is not None and monitor != "val_delta_m":
        return [f"train.monitor_reference is read by train.monitor val_delta_m only (monitor: {monitor}); drop it"]
    return []


def _probe_problems(cfg: Any) -> list[str]:
    """LP-FT (train.probe_epochs) probes trained features with the heads' own optimizers, then fine-tunes."""
    probe = cfg.train.probe_epochs
    if not probe:
        return []
    problems = []
    if not (cfg.model.init_from or cfg.model.pretrained):
        problems.append(
            f"train.probe_epochs {probe} trains the heads on a frozen backbone, which needs trained weights: set "
            "model.init_from (--init-from RUN) or model.pretrained true, or train.probe_epochs 0"
        )
    if probe >= cfg.train.epochs:
        problems.append(
            f"train.probe_epochs {probe} must be less than train.epochs {cfg.train.epochs} (the probe epochs count "
            "within train.epochs, so the backbone would never train); raise --epochs or lower train.probe_epochs"
        )
    if not cfg.optim.per_head:
        problems.append(
            "train.probe_epochs needs one optimizer and schedule per head (optim.per_head true): the backbone's "
            "schedule starts when it unfreezes"
        )
    return problems
