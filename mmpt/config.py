"""Typed, frozen configuration: defaults in dataclasses, YAML deep-merged over them, CLI overrides on top.

Every problem (unknown key, wrong type, value out of range) is collected and raised as one MmptError
that names each key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmpt.errors import MmptError
from mmpt.tasks import FLAGS, RESOLUTIONS, resolve_tasks
from mmpt.weighting import METHODS, method_problems


@dataclass(frozen=True)
class DataConfig:
    root: str = "~/.medmnist"  # folder with medmnist's npz files (medmnist's own default)
    cache_dir: str | None = None  # unpacked .npy cache; None = {root}/.mmpt-cache
    datasets: tuple[str, ...] = FLAGS
    resolution: int = 28
    synthetic: bool = False  # generate MedMNIST-format files with a learnable signal when absent
    synthetic_samples: int = 256  # train images per dataset for synthetic data (val/test: a quarter)
    download: bool = False  # fetch missing files through medmnist (needs network)
    verify: bool = True  # check MD5 of files with medmnist's official names
    num_workers: int = 2
    pin_memory: bool = True
    prefetch_factor: int = 4
    eval_batch_size: int = 256
    allow_changed: bool = False  # resume even if a data file differs from the one the checkpoint was trained on


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = False
    vflip: bool = False
    rotate_degrees: float = 0.0
    random_resized_crop: bool = False
    crop_scale_min: float = 0.8


@dataclass(frozen=True)
class InputConfig:
    mode: str = "pad"  # pad (Doerrich/Bachmeier protocol) | resize | native
    pad_value: str = "normalized_zero"  # normalized_zero | black
    interpolation: str = "bilinear"  # bilinear | bicubic
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet18"  # an alias (vit_b16, resnet18, ...) or any timm model name
    pretrained: bool = False  # opt-in; needs the weights locally or network
    img_size: int | None = None  # input side for pad/resize (ViTs are built for it); None = pretrained_cfg
    drop_rate: float = 0.0
    init_from: str | None = None  # run folder or .pt: start from its backbone (and heads of shared datasets)
    # BatchNorm statistics: shared (one set for all datasets) | per_dataset_stats (each dataset its own running
    # mean and variance, shared affine weights) | per_dataset (also its own affine weights); needs a BatchNorm backbone
    norm: str = "shared"


@dataclass(frozen=True)
class SamplerConfig:
    replacement: bool = False  # False: every batch of every train split once per epoch (Algorithm 1)
    alpha: float = 1.0  # with replacement: p(task) ~ |D|^alpha (1 proportional, 0 uniform)
    steps_per_epoch: int | None = None  # None = the number of batches in all train splits
    last_batch: str = "keep"  # keep | drop: the policy for a split's last partial batch
    # datasets per step: 1 (Algorithm 1), k >= 2 distinct datasets, or all (every dataset in every step);
    # each dataset brings a batch of train.batch_size
    tasks_per_step: int | str = 1


@dataclass(frozen=True)
class LossConfig:
    ordinal: str = "coral"  # ce | coral | corn: the loss of the ordinal-regression task (RetinaMNIST)
    weighting: str = "none"  # a name of mmpt.weighting.METHODS (README: Multi-task optimization)
    weighting_args: dict[str, float] = field(default_factory=dict)  # the method's options, e.g. {temperature: 2}
    weights: dict[str, float] = field(default_factory=dict)  # weighting: manual: one weight per dataset


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # any timm optimizer name
    lr: float = 1e-4  # backbone learning rate
    head_lr: float | None = None  # None = lr
    weight_decay: float = 0.05
    per_head: bool = True  # False: one shared optimizer and schedule (thesis code, for ablation)
    schedule: str = "cosine"  # cosine | constant
    warmup_epochs: float = 0.0  # in each parameter group's own updates per epoch
    min_lr_ratio: float = 0.0
    clip_grad_norm: float | None = None


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with a gradient scaler)
    channels_last: bool = False  # channels-last memory format (faster convolutions on GPUs)
    compile: bool = False  # torch.compile the backbone
    patience: int | None = None  # early stopping after this many epochs without improvement
    monitor: str = "val_loss"  # val_loss (unweighted mean over datasets, lower is better) | val_auc (mean, higher)
    log_every_steps: int = 20
    progress: bool = True  # tqdm bar


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0  # also write last.pt every N steps (0 = only at epoch end)
    # also write last.pt when this many minutes have passed since the last write (0 = off), checked after each
    # step (under torchrun at each logging interval): a crash never costs more; a ViT-B/16 checkpoint with its
    # AdamW state takes seconds to write, under 1% of 10 minutes
    every_minutes: float = 10.0


@dataclass(frozen=True)
class Config:
    name: str = "mmpt"
    output: str | None = None  # run folder; None = runs/{name}
    determinism: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    input: InputConfig = field(default_factory=InputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / self.name


FLOAT32_MAX = 3.4028234663852886e38
INT64_MAX = 2**63 - 1

# A run name: one safe path component (no separators, not '.' or '..').
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")

# Allowed values of string fields; the validation below names them in its messages.
CHOICES: dict[str, tuple[str, ...]] = {
    "input.mode": ("pad", "resize", "native"),
    "input.pad_value": ("normalized_zero", "black"),
    "input.interpolation": ("bilinear", "bicubic"),
    "model.norm": ("shared", "per_dataset_stats", "per_dataset"),
    "sampler.last_batch": ("keep", "drop"),
    "loss.ordinal": ("ce", "coral", "corn"),
    "loss.weighting": tuple(METHODS),
    "optim.schedule": ("cosine", "constant"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.monitor": ("val_loss", "val_auc"),
}

# (minimum, inclusive?) for numeric fields that have a lower bound.
MINIMUM: dict[str, tuple[float, bool]] = {
    "data.synthetic_samples": (8, True),
    "data.num_workers": (0, True),
    "data.prefetch_factor": (1, True),
    "data.eval_batch_size": (1, True),
    "input.augment.rotate_degrees": (0, True),
    "input.augment.crop_scale_min": (0, False),
    "model.img_size": (8, True),
    "model.drop_rate": (0, True),
    "sampler.alpha": (0, True),
    "sampler.steps_per_epoch": (1, True),
    "optim.lr": (0, False),
    "optim.head_lr": (0, False),
    "optim.weight_decay": (0, True),
    "optim.warmup_epochs": (0, True),
    "optim.min_lr_ratio": (0, True),
    "optim.clip_grad_norm": (0, False),
    "train.epochs": (1, True),
    "train.batch_size": (1, True),
    "train.seed": (0, True),
    "train.patience": (1, True),
    "train.log_every_steps": (1, True),
    "checkpoint.every_steps": (0, True),
    "checkpoint.every_minutes": (0, True),
}


# (maximum, inclusive?) where the consumer has an upper bound: a dropout probability below 1 (torch's dropout
# takes [0, 1], and 1 zeroes every feature), a crop's scale is a fraction of the image area, np.random.seed
# takes 0..2**32-1, and |D|**alpha must stay finite in float64 for the largest split (165,466**50 ~ 1e260).
MAXIMUM: dict[str, tuple[float, bool]] = {
    "model.drop_rate": (1, False),
    "input.augment.crop_scale_min": (1, True),
    "sampler.alpha": (50, True),
    "train.seed": (2**32 - 1, True),
}


def to_dict(cfg: Any) -> Any:
    """The config as plain Python values (tuples become lists), for YAML and checkpoints."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


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
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node: dict = {}
    cursor = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return node


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


def load_config(path: str | Path | None = None, overrides: list[dict] | None = None) -> Config:
    """Build a Config from defaults, an optional YAML file (with `base:` chaining) and override dicts.

    Raises MmptError listing every unknown key, wrong type and out-of-range value.
    """
    raw: dict = {}
    if path is not None:
        raw = _read_with_base(Path(path), seen=())
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
    return deep_merge(_read_with_base(base_path, seen + (base_path,)), data)


def from_dict(raw: dict) -> Config:
    """Validate a nested dict against Config; raise one MmptError naming every problem."""
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
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
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, raw[f.name], key + ".", problems)
        else:
            value, error = _coerce(raw[f.name], hint)
            if error:
                problems.append(f"{key} {error}, got {raw[f.name]!r}")
            else:
                kwargs[f.name] = value
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        value = getattr(obj, f.name)
        if key in CHOICES and value not in CHOICES[key]:
            problems.append(f"{key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
        if key in MINIMUM and value is not None:
            low, inclusive = MINIMUM[key]
            if value < low or (value == low and not inclusive):
                problems.append(f"{key} must be {'>=' if inclusive else '>'} {low:g}, got {value!r}")
        if key in MAXIMUM and value is not None:
            high, inclusive = MAXIMUM[key]
            if value > high or (value == high and not inclusive):
                problems.append(f"{key} must be {'<=' if inclusive else '<'} {high:g}, got {value!r}")
    return obj


def _coerce(value: Any, hint: Any) -> tuple[Any, str | None]:
    """Return (value converted to `hint`, None) or (None, 'must be ...')."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, None
        errors = []
        for inner in [a for a in args if a is not type(None)]:
            converted, error = _coerce(value, inner)
            if not error:
                return converted, None
            errors.append(error.removeprefix("must be "))
        return None, "must be " + " or ".join(errors + (["null"] if type(None) in args else []))
    if origin is dict:
        if not isinstance(value, dict):
            return None, "must be a mapping of names to values"
        items = {key: _coerce(v, args[1]) for key, v in value.items()}
        errors = [f"{key} {e}" for key, (_, e) in items.items() if e]
        if any(not isinstance(key, str) for key in value):
            errors.append("keys must be names")
        return (None, "entries: " + "; ".join(errors)) if errors else ({k: v for k, (v, _) in items.items()}, None)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            return None, "must be a list"
        items = [_coerce(v, args[0]) for v in value]
        errors = [e for _, e in items if e]
        return (None, errors[0] + " (each item)") if errors else (tuple(v for v, _ in items), None)
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (None, "must be true or false")
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not -INT64_MAX <= value <= INT64_MAX:  # numpy and torch hold counts and seeds in 64 bits
            return None, f"must be an integer within ±{INT64_MAX}"
        return (value, None) if ok else (None, "must be an integer")
    if hint is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 without a dot as a string
            try:
                value = float(value)
            except ValueError:
                return None, "must be a number"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None, "must be a number"
        # every float ends up in float32 tensors or optimizer arithmetic: inf, nan or overflow would only crash later
        if not abs(float(value)) <= FLOAT32_MAX:
            return None, f"must be a finite number within float32 range (|x| <= {FLOAT32_MAX:.3g})"
        return float(value), None
    if hint is str:
        if isinstance(value, str) and "\x00" in value:  # paths and names: the OS refuses a NUL byte
            return None, "must not contain a NUL character"
        return (value, None) if isinstance(value, str) else (None, "must be a string")
    raise AssertionError(f"config field type {hint} has no coercion rule")


def _cross_checks(cfg: Config) -> list[str]:
    """Checks that involve more than one field or the task registry."""
    problems = []
    # the name is a folder under runs/ and the @run part of prediction files, so it must not hold a path
    if not RUN_NAME.fullmatch(cfg.name) or cfg.name in (".", ".."):
        problems.append(
            f"name must be letters, digits, '.', '_' or '-' (it names runs/<name> and the prediction files), "
            f"got {cfg.name!r}; to write elsewhere, set output (--output DIR)"
        )
    if cfg.data.resolution not in RESOLUTIONS:
        problems.append(
            f"data.resolution must be one of {', '.join(map(str, RESOLUTIONS))} (MedMNIST+ sizes), "
            f"got {cfg.data.resolution}"
        )
    try:
        resolve_tasks(cfg.data.datasets)
    except MmptError as exc:
        problems.append(f"data.datasets: {exc}")
    if cfg.data.synthetic and Path(cfg.data.root).expanduser() == Path(DataConfig.root).expanduser():
        problems.append(
            f"data.synthetic writes generated files under medmnist's names; give it a folder of its own "
            f"(data.root: data/synthetic), not {DataConfig.root}"
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.train.device):
        problems.append(f"train.device must be auto, cpu, cuda or cuda:N, got {cfg.train.device!r}")
    problems += _multi_task_checks(cfg)
    return problems


def _multi_task_checks(cfg: Config) -> list[str]:
    """sampler.tasks_per_step against the datasets, and the weighting method against both."""
    try:
        flags = [t.flag for t in resolve_tasks(cfg.data.datasets)]
    except MmptError:
        return []  # reported above
    k = cfg.sampler.tasks_per_step
    if k != "all" and not (isinstance(k, int) and 1 <= k <= len(flags)):
        return [(
            f"sampler.tasks_per_step must be a whole number from 1 to the number of datasets ({len(flags)}) or all, "
            f"got {k!r}"
        )]
    if cfg.loss.weighting not in METHODS:
        return []  # reported with the choices
    weights = {_flag(name): value for name, value in cfg.loss.weights.items()}
    return method_problems(
        cfg.loss.weighting, dict(cfg.loss.weighting_args), tasks_per_step=k, num_datasets=len(flags),
        weights=weights, datasets=flags,
    )


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (loadable with load_config)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
