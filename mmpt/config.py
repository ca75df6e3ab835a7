"""Typed, frozen configuration: one declaration per setting, YAML deep-merged over the defaults, CLI overrides on top.

Each key is a dataclass field declared with `setting(...)`: its default, a one-line doc, what it accepts (the
field's type, plus choices, bounds or a check) and whether a resume may change it. Validation, the coercion of
`--set` and named-flag values, `--print-config`, docs/settings.md (mmpt.configdoc) and the resume policy
(`RESUME_MAY_CHANGE`, `recipe_changes`) all read these declarations. Every problem is collected and raised as
one MmptError naming each key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmpt.distributed import DEVICE_NAMES, device_problem
from mmpt.errors import MmptError
from mmpt.mtl import METHODS, check_weighting, method_problems
from mmpt.settings import Key, check, declared, section, setting
from mmpt.tasks import FLAGS, RESOLUTIONS, TASKS, resolve_tasks

# A run name: one safe path component (no separators, not '.' or '..').
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _run_name_problem(name: str) -> str | None:
    # the name is a folder under runs/ and the @run part of prediction files, so it must not hold a path
    if RUN_NAME.fullmatch(name) and name not in (".", ".."):
        return None
    return (
        f"must be letters, digits, '.', '_' or '-' (it names runs/<name> and the prediction files), "
        f"got {name!r}; to write elsewhere, set output (--output DIR)"
    )


def _datasets_problem(names: tuple[str, ...]) -> str | None:
    try:
        resolve_tasks(names)
    except MmptError as exc:
        return f"must name MedMNIST+ datasets: {exc}"
    return None


def _tasks_per_step_problem(k: int | str) -> str | None:
    if k == "all" or (isinstance(k, int) and k >= 1):
        return None
    return f"must be a whole number from 1 to the number of datasets or all, got {k!r}"


@dataclass(frozen=True)
class DataConfig:
    root: str = setting("~/.medmnist", "folder with medmnist's npz files (medmnist's own default)", resume=True)
    cache_dir: str | None = setting(None, "unpacked .npy cache; null = {root}/.mmpt-cache", resume=True)
    datasets: tuple[str, ...] = setting(
        FLAGS,
        "the datasets trained together (one: individual training)",
        check=_datasets_problem,
        allowed="all, or a list of: " + ", ".join(t.short for t in TASKS.values()),
    )
    resolution: int = setting(28, "MedMNIST+ image size", choices=RESOLUTIONS)
    synthetic: bool = setting(False, "generate MedMNIST-format files with a learnable signal when absent", resume=True)
    synthetic_samples: int = setting(256, "train images per dataset for synthetic data (val/test: a quarter)", ge=8)
    download: bool = setting(False, "fetch missing files through medmnist (needs network)", resume=True)
    verify: bool = setting(True, "check MD5 of files with medmnist's official names", resume=True)
    num_workers: int = setting(2, "loader worker processes (per rank)", ge=0, resume=True)
    pin_memory: bool = setting(True, "pinned host memory for batches bound for CUDA", resume=True)
    prefetch_factor: int = setting(4, "batches each loader worker prepares ahead", ge=1, resume=True)
    eval_batch_size: int = setting(256, "batch size of validation and test (per rank)", ge=1, resume=True)
    allow_changed: bool = setting(
        False, "resume even if a data file differs from the one the checkpoint was trained on", resume=True
    )


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = setting(False, "random horizontal flips")
    vflip: bool = setting(False, "random vertical flips")
    rotate_degrees: float = setting(0.0, "random rotation within ± this many degrees", ge=0)
    random_resized_crop: bool = setting(False, "random resized crops")
    crop_scale_min: float = setting(0.8, "smallest crop, as a fraction of the image area", gt=0, le=1)


@dataclass(frozen=True)
class InputConfig:
    mode: str = setting(
        "pad",
        "pad: zero-pad to the model input (Doerrich/Bachmeier protocol); resize; native: the stored size",
        choices=("pad", "resize", "native"),
    )
    pad_value: str = setting("normalized_zero", "what input.mode pad pads with", choices=("normalized_zero", "black"))
    interpolation: str = setting("bilinear", "how input.mode resize resamples", choices=("bilinear", "bicubic"))
    augment: AugmentConfig = section(AugmentConfig, "batch augmentations on the training device, off by default")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = setting(
        "resnet18",
        "the shared backbone",
        allowed="an alias (see mmpt.model.BACKBONES: vit_b16, resnet18, ...) or any timm model name",
    )
    pretrained: bool = setting(False, "start from timm's pretrained weights (opt-in; needs them locally or network)")
    img_size: int | None = setting(
        None, "input side for pad/resize (ViTs are built for it); null = the backbone's pretrained size", ge=8
    )
    drop_rate: float = setting(0.0, "dropout before the heads", ge=0, lt=1)
    init_from: str | None = setting(None, "run folder or .pt: start from its backbone (and heads of shared datasets)")
    norm: str = setting(
        "auto",
        "BatchNorm statistics: one set for all datasets (shared), each dataset its own running mean and "
        "variance (per_dataset_stats), also its own affine weights (per_dataset), or auto (per_dataset_stats for a "
        "BatchNorm backbone trained on 2+ datasets, else shared); the per-dataset settings need a BatchNorm backbone",
        choices=("auto", "shared", "per_dataset_stats", "per_dataset"),
        recorded="shared",
    )


@dataclass(frozen=True)
class SamplerConfig:
    replacement: bool = setting(
        False, "false: every batch of every train split once per epoch (Algorithm 1); true: draw a task per step"
    )
    alpha: float = setting(1.0, "with replacement: p(task) ~ |D|^alpha (1 proportional, 0 uniform)", ge=0, le=50)
    steps_per_epoch: int | None = setting(None, "null = the number of batches in all train splits", ge=1)
    last_batch: str = setting("keep", "the policy for a split's last partial batch", choices=("keep", "drop"))
    tasks_per_step: int | str = setting(
        1,
        "datasets per step, each with a batch of train.batch_size: 1 (Algorithm 1), k distinct, or all",
        check=_tasks_per_step_problem,
        allowed="1 to the number of datasets, or all",
    )


@dataclass(frozen=True)
class LossConfig:
    ordinal: str = setting(
        "coral", "the loss of the ordinal-regression task (RetinaMNIST)", choices=("ce", "coral", "corn")
    )
    weighting: str = setting(
        "none", "how a step's losses become one backward pass (docs/multi-task-optimization.md)", choices=tuple(METHODS)
    )
    weighting_args: dict[str, float] = setting(
        {}, "the weighting method's options, e.g. {temperature: 2}", allowed="a mapping of the method's options"
    )
    weights: dict[str, float] = setting(
        {}, "loss.weighting manual: one weight per trained dataset", allowed="a mapping of dataset to weight >= 0"
    )


@dataclass(frozen=True)
class OptimConfig:
    name: str = setting(
        "adamw",
        "the optimizer of the backbone and of every head",
        allowed="any timm optimizer name (adamw, sgd, lamb, ...)",
    )
    lr: float = setting(1e-4, "backbone learning rate", gt=0, resume=True)
    head_lr: float | None = setting(None, "learning rate of the heads; null = optim.lr", gt=0, resume=True)
    weight_decay: float = setting(0.05, "weight decay (not on 1-D parameters)", ge=0)
    per_head: bool = setting(True, "false: one shared optimizer and schedule (thesis code, for ablation)")
    schedule: str = setting(
        "cosine", "learning-rate schedule, with linear warmup", choices=("cosine", "constant"), resume=True
    )
    warmup_epochs: float = setting(0.0, "in each parameter group's own updates per epoch", ge=0, resume=True)
    min_lr_ratio: float = setting(0.0, "the cosine schedule's final learning rate over its peak", ge=0, resume=True)
    clip_grad_norm: float | None = setting(
        None, "clip the gradient norm to this; null = no clipping", gt=0, resume=True
    )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(10, "passes of the epoch plan", ge=1, resume=True)
    batch_size: int = setting(64, "images per dataset in a step, over all processes (the global batch)", ge=1)
    seed: int = setting(0, "seed of every random choice (np.random.seed takes 0..2**32-1)", ge=0, le=2**32 - 1)
    device: str = setting(
        "auto",
        "auto: CUDA when present, else CPU",
        check=device_problem,
        allowed=DEVICE_NAMES.replace(", ", " | ").replace(" or ", " | "),
        resume=True,
    )
    precision: str = setting(
        "fp32", "autocast precision; fp16 with a gradient scaler", choices=("fp32", "bf16", "fp16")
    )
    channels_last: bool = setting(False, "channels-last memory format (faster convolutions on GPUs)")
    compile: bool = setting(False, "torch.compile the backbone")
    patience: int | None = setting(
        None, "early stopping after this many epochs without improvement; null = off", ge=1, resume=True
    )
    monitor: str = setting(
        "val_loss",
        "val_loss (unweighted mean over datasets, lower is better) or val_auc (mean, higher)",
        choices=("val_loss", "val_auc"),
    )
    log_every_steps: int = setting(
        20, "steps between loss reads, log lines and the non-finite check", ge=1, resume=True
    )
    progress: bool = setting(True, "tqdm progress bar", resume=True)


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = setting(0, "also write last.pt every N steps (0 = only at epoch end)", ge=0, resume=True)
    # a ViT-B/16 checkpoint with its AdamW state takes seconds to write, under 1% of 10 minutes
    every_minutes: float = setting(
        10.0, "also write last.pt when this many minutes have passed since the last write (0 = off)", ge=0, resume=True
    )


@dataclass(frozen=True)
class Config:
    name: str = setting("mmpt", "the run's name", check=_run_name_problem, resume=True)
    output: str | None = setting(None, "run folder; null = runs/{name}", resume=True)
    determinism: bool = setting(
        True, "deterministic kernels and no TF32 (false: faster, not bitwise reproducible)", resume=True
    )
    data: DataConfig = section(DataConfig, "where the data is and how it is read")
    input: InputConfig = section(InputConfig, "how a stored image becomes the model's input")
    model: ModelConfig = section(ModelConfig, "the backbone (the heads follow the datasets)")
    sampler: SamplerConfig = section(SamplerConfig, "the epoch plan: which datasets each step trains on")
    loss: LossConfig = section(LossConfig, "per-task losses and how they are weighted")
    optim: OptimConfig = section(OptimConfig, "optimizers and learning-rate schedules")
    train: TrainConfig = section(TrainConfig, "the training loop")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "when last.pt is written besides epoch ends")

    @property
    def run_dir(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / self.name


# Every setting, by dotted key, in declaration order.
SETTINGS: dict[str, Key] = declared(Config)
# Config keys a resume may change: where and how fast the run goes, how long, what it logs and keeps, and the
# learning rate and clipping (the fixes the NaN message suggests). Every other key defines the recipe.
RESUME_MAY_CHANGE = frozenset(key for key, k in SETTINGS.items() if k.spec.resume)
# Allowed values of the keys with choices (the transforms and the sampler name them in their errors).
CHOICES: dict[str, tuple] = {key: k.spec.choices for key, k in SETTINGS.items() if k.spec.choices}


def value_of(cfg: Config, key: str) -> Any:
    """The value of a dotted key, e.g. value_of(cfg, "optim.lr")."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def to_dict(cfg: Any) -> Any:
    """The config as plain Python values (tuples become lists), for YAML and checkpoints."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def config_differences(
    old: Config, new: Config, may_differ: frozenset | set = frozenset()
) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every declared key outside `may_differ` whose whole value differs.

    Mappings (loss.weighting_args, loss.weights) and lists are compared whole, as plain values.
    """
    changes = []
    for key in SETTINGS:
        if key in may_differ:
            continue
        before, after = to_dict(value_of(old, key)), to_dict(value_of(new, key))
        if before != after or type(before) is not type(after):
            changes.append((key, before, after))
    return changes


def recipe_changes(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """The differences a resume refuses: every key outside RESUME_MAY_CHANGE (see config_differences)."""
    return config_differences(old, new, RESUME_MAY_CHANGE)


def recorded_config(raw: Any) -> Config:
    """A config that a run recorded (config.yaml, a checkpoint, series.json) as that run trained it: a key
    declared after it was written takes the value its declaration gives for such records (`recorded`), not
    today's default, so e.g. a run from before model.norm reads as model.norm shared. MmptError when invalid."""
    return from_dict(_as_recorded(raw))


def _as_recorded(raw: Any) -> Any:
    if not isinstance(raw, dict):
        return raw
    for key, k in SETTINGS.items():
        if k.spec.recorded is None:
            continue
        *sections, leaf = key.split(".")
        node = raw
        for part in sections:
            node = node.get(part, {}) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf not in node:
            raw = deep_merge(raw, nested(key, k.spec.recorded))
    return raw


def deep_merge(base: dict, override: dict) -> dict:
    """Return `base` with `override` merged in; nested dicts merge, everything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict:
    """Turn `a.b=value` into {"a": {"b": value}}, parsing value as YAML (so 1e-3, true, [a, b] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise MmptError(f"--set expects key.sub=value, got '{text}'")
    if re.fullmatch(r"\s*[+-]?0\d+\s*", raw):  # YAML 1.1 would read 010 as octal 8; a researcher means ten
        value: Any = raw.strip()
    else:
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
    return nested(key.strip(), value)


def nested(key: str, value: Any) -> dict:
    """{"a": {"b": value}} for key "a.b"."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing or malformed file is an MmptError."""
    path = Path(path)
    if not path.is_file():
        raise MmptError(f"config file {path} not found; pass an existing YAML file with --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise MmptError(
            f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise MmptError(f"cannot read config file {path} ({exc.strerror or exc}); check its permissions") from None
    except yaml.YAMLError as exc:
        raise MmptError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]}); fix its syntax") from None
    if not isinstance(data, dict):
        raise MmptError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def load_config(
    path: str | Path | None = None, overrides: list[dict] | None = None, *, recorded: bool = False
) -> Config:
    """Build a Config from defaults, an optional YAML file (with `base:` chaining) and override dicts.

    `recorded`: the file is a run's own config.yaml (--resume), read as `recorded_config` reads it.
    Raises MmptError listing every unknown key, wrong type and out-of-range value.
    """
    raw: dict = {}
    if path is not None:
        raw = _read_with_base(Path(path), seen=())
        raw = _as_recorded(raw) if recorded else raw
    for override in overrides or []:
        raw = deep_merge(raw, override)
    return from_dict(raw)


def _read_with_base(path: Path, seen: tuple[Path, ...]) -> dict:
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip() or "\x00" in base:
        raise MmptError(f"config {path}: base must be the path of another YAML file (a string), got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise MmptError(f"config {path} has a cycle of 'base:' references; remove one")
    return deep_merge(_read_with_base(base_path, (*seen, base_path)), data)


def from_dict(raw: dict) -> Config:
    """Validate a nested dict against the declarations; raise one MmptError naming every problem."""
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    if not problems:
        problems += _cross_checks(cfg)
    if problems:
        raise MmptError("invalid config: " + "; ".join(problems))
    # datasets are stored as medmnist flags in medmnist order, whatever spelling the user chose
    flags = tuple(t.flag for t in resolve_tasks(cfg.data.datasets))
    weights = {_flag(name): value for name, value in cfg.loss.weights.items()}
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, datasets=flags), loss=dataclasses.replace(cfg.loss, weights=weights)
    )


def _flag(name: str) -> str:
    """A dataset's medmnist flag from its flag or short name (breast -> breastmnist)."""
    name = name.strip().lower()
    return name if name.endswith("mnist") else f"{name}mnist"


def _build(cls: type, raw: Any, prefix: str, problems: list[str]):
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            problems.append(f"unknown key '{prefix}{key}' (valid keys: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key = prefix + f.name
        if "section" in f.metadata:
            kwargs[f.name] = _build(hints[f.name], raw[f.name], key + ".", problems)
            continue
        value, problem = check_value(key, raw[f.name])
        if problem:
            problems.append(f"{key} {problem}")
        else:
            kwargs[f.name] = value
    return cls(**kwargs)


def check_value(key: str, raw: Any) -> tuple[Any, str | None]:
    """(the value converted to the key's type, None), or (None, "must be ..., got ...")."""
    return check(SETTINGS[key], raw)


def parse_flag(flag: str, key: str, text: str) -> Any:
    """A command-line flag's text as the value of the config key it stands for, checked as that key is.

    Raises MmptError naming the flag, e.g. `--batch-size must be >= 1, got 0`.
    """
    value, problem = check_value(key, text)
    if problem:
        raise MmptError(f"{flag} {problem}")
    return value


def _cross_checks(cfg: Config) -> list[str]:
    """Checks of one config that involve more than one key (no environment: the same result on every machine)."""
    problems = []
    if cfg.data.synthetic and Path(cfg.data.root).expanduser() == Path(DataConfig.root).expanduser():
        problems.append(
            f"data.synthetic writes generated files under medmnist's names; give it a folder of its own "
            f"(data.root: data/synthetic), not {DataConfig.root}"
        )
    flags = [t.flag for t in resolve_tasks(cfg.data.datasets)]
    k = cfg.sampler.tasks_per_step
    if k != "all" and k > len(flags):
        return [
            *problems,
            f"sampler.tasks_per_step must be a whole number from 1 to the number of datasets ({len(flags)}) or all, "
            f"got {k!r}",
        ]
    weights = {_flag(name): value for name, value in cfg.loss.weights.items()}
    return problems + method_problems(
        cfg.loss.weighting,
        dict(cfg.loss.weighting_args),
        tasks_per_step=k,
        weights=weights,
        datasets=flags,
    )


def check_run(cfg: Config, world_size: int = 1) -> None:
    """Check what a run of `cfg` needs from this environment, once, before anything is built or written.

    The backbone name (timm), the optimizer (timm, CUDA or packages it needs), the global batch against the
    number of processes, and the weighting method under that many processes with its solvers installed.
    Raises one MmptError naming every problem and what to do.
    """
    from mmpt.model import resolve_backbone
    from mmpt.norm import check_norm_weighting
    from mmpt.optim import check_optimizer_name

    problems = []
    # the sampler keeps every training batch at half the batch size or more, so each rank gets 2 or more images
    if world_size > 1 and cfg.train.batch_size < 4 * world_size:
        problems.append(
            f"train.batch_size {cfg.train.batch_size} is the global batch, split over {world_size} processes; "
            f"it must be at least {4 * world_size}: raise --batch-size or start fewer processes"
        )
    for run_check in (
        lambda: resolve_backbone(cfg.model.backbone),
        lambda: check_optimizer_name(cfg.optim.name),
        lambda: check_norm_weighting(cfg.model.norm, cfg.loss.weighting),
        lambda: check_weighting(  # e.g. an aggregator under DDP, or a missing solver
            cfg.loss.weighting,
            cfg.loss.weighting_args,
            tasks_per_step=cfg.sampler.tasks_per_step,
            world_size=world_size,
            datasets=list(cfg.data.datasets),
            weights=cfg.loss.weights,
        ),
    ):
        try:
            run_check()
        except MmptError as exc:
            problems.append(str(exc))
    if problems:
        raise MmptError("; ".join(problems))


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (loadable with load_config)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
