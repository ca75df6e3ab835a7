"""The schema: typed, frozen configuration, one declaration per setting, YAML deep-merged over the defaults.

Each key is a dataclass field declared with `setting(...)`: its default, a one-line doc, what it accepts (the
field's type, plus choices taken from the registry that implements them, bounds or a check), whether a resume
may change it, whether it changes results, and its named flag. Validation, the coercion of `--set` and flag
values, the flags of train.py, `--print-config`, the generated docs (mmpt.config.docs), the resume policy
(`RESUME_MAY_CHANGE`, `fixed_key_changes`) and series membership (`RESULT_NEUTRAL`) all read these declarations.
The rules between keys are checked where a config is loaded (`from_dict`), so `--print-config` refuses what a
run refuses; what depends on the machine (timm's models, installed solvers, the world size) is checked by the
run's checks (mmpt.training.build.check_run). Every problem is collected and raised as one MmptError naming each key.

It imports no component: the registries it takes choices from are light (mmpt.config.choices, mmpt.config.methods).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmpt.config.choices import (
    DEVICE_NAMES,
    INPUT_MODES,
    INTERPOLATIONS,
    JACOBIAN_PATHS,
    LAST_BATCH,
    MONITORS,
    NORMS,
    ORDINAL_LOSSES,
    PAD_VALUES,
    PRECISIONS,
    SCHEDULES,
    device_problem,
)
from mmpt.config.launch import LaunchConfig
from mmpt.config.methods import METHODS
from mmpt.config.rules import (
    cross_problems,
    dataset_flag,
    datasets_problem,
    run_name_problem,
    tasks_per_step_problem,
)
from mmpt.config.settings import (
    Key,
    build,
    check,
    declared,
    deep_merge,
    nested,
    read_with_base,
    section,
    setting,
    to_dict,
    value_of,
)
from mmpt.errors import MmptError
from mmpt.tasks import FLAGS, RESOLUTIONS, TASKS, resolve_tasks


@dataclass(frozen=True)
class DataConfig:
    root: str = setting(
        "~/.medmnist",
        "folder with medmnist's npz files (medmnist's own default)",
        resume=True,
        result=False,
        flag="--data-root",
        evaluate_flag="--data-root",
    )
    cache_dir: str | None = setting(
        None,
        "unpacked .npy cache; null = {root}/.mmpt-cache",
        resume=True,
        result=False,
        evaluate_flag="--cache-dir",
    )
    datasets: tuple[str, ...] = setting(
        FLAGS,
        "the datasets trained together (one: individual training)",
        check=datasets_problem,
        allowed="all, or a list of: " + ", ".join(t.short for t in TASKS.values()),
        flag="--datasets",
    )
    resolution: int = setting(
        28, "MedMNIST+ image size", choices=RESOLUTIONS, flag="--resolution", evaluate_flag="--resolution"
    )
    synthetic: bool = setting(
        False, "generate MedMNIST-format files with a learnable signal when absent", resume=True, result=False
    )
    synthetic_samples: int = setting(256, "train images per dataset for synthetic data (val/test: a quarter)", ge=8)
    download: bool = setting(
        False, "fetch missing files through medmnist (needs network)", resume=True, result=False, flag="--download"
    )
    verify: bool = setting(
        True, "check MD5 of files with medmnist's official names", resume=True, result=False, flag="--no-verify"
    )
    num_workers: int = setting(2, "loader worker processes (per rank)", ge=0, resume=True, result=False)
    pin_memory: bool = setting(True, "pinned host memory for batches bound for CUDA", resume=True, result=False)
    prefetch_factor: int = setting(4, "batches each loader worker prepares ahead", ge=1, resume=True, result=False)
    eval_batch_size: int = setting(
        256,
        "batch size of validation and test (per rank)",
        ge=1,
        resume=True,
        result=False,
        evaluate_flag="--batch-size",
    )
    allow_changed: bool = setting(
        False,
        "resume even if a data file differs from the one the checkpoint was trained on",
        resume=True,
        result=False,
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
        choices=INPUT_MODES,
    )
    pad_value: str = setting("normalized_zero", "what input.mode pad pads with", choices=PAD_VALUES)
    interpolation: str = setting("bilinear", "how input.mode resize resamples", choices=INTERPOLATIONS)
    augment: AugmentConfig = section(AugmentConfig, "batch augmentations on the training device, off by default")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = setting(
        "resnet18",
        "the shared backbone",
        allowed="an alias (see mmpt.model.backbones.BACKBONES: vit_b16, resnet18, ...) or any timm model name",
        flag="--backbone",
    )
    pretrained: bool = setting(False, "start from timm's pretrained weights (opt-in; needs them locally or network)")
    img_size: int | None = setting(
        None, "input side for pad/resize (ViTs are built for it); null = the backbone's pretrained size", ge=8
    )
    drop_rate: float = setting(0.0, "dropout before the heads", ge=0, lt=1)
    init_from: str | None = setting(
        None, "run folder or .pt: start from its backbone (and heads of shared datasets)", flag="--init-from"
    )
    norm: str = setting(
        "auto",
        "BatchNorm statistics: one set for all datasets (shared), each dataset its own running mean and "
        "variance (per_dataset_stats), also its own affine weights (per_dataset), or auto (per_dataset_stats for a "
        "BatchNorm backbone trained on 2+ datasets, else shared); the per-dataset settings need a BatchNorm backbone",
        choices=NORMS,
        recorded="shared",
    )
    norm_calibration_batches: int = setting(
        16,
        "per-dataset BatchNorm statistics: before each validation (so also in best.pt and the test), replace each "
        "dataset's running statistics by their average over this many of its train batches of train.batch_size "
        "images, without augmentation, the weights fixed (PreciseBN); 0 = off; no effect with shared statistics "
        "nor in train.probe_epochs (the frozen backbone keeps its statistics as loaded)",
        ge=0,
        recorded=0,
    )
    sync_norm: bool = setting(
        True,
        "under torchrun, each BatchNorm training pass (and calibration) normalises every dataset's slice with the "
        "statistics of the global batch, its images on all ranks (one all-reduce per layer, as nn.SyncBatchNorm), so "
        "the number of processes changes results by rounding only; false: each rank normalises its own shard; no "
        "effect on one process or without BatchNorm",
        recorded=False,
    )


@dataclass(frozen=True)
class SamplerConfig:
    replacement: bool = setting(
        False, "false: every batch of every train split once per epoch (Algorithm 1); true: draw a task per step"
    )
    alpha: float = setting(1.0, "with replacement: p(task) ~ |D|^alpha (1 proportional, 0 uniform)", ge=0, le=50)
    steps_per_epoch: int | None = setting(None, "null = the number of batches in all train splits", ge=1)
    last_batch: str = setting("keep", "the policy for a split's last partial batch", choices=LAST_BATCH)
    tasks_per_step: int | str = setting(
        1,
        "datasets per step, each with a batch of train.batch_size: 1 (Algorithm 1), k distinct, or all",
        check=tasks_per_step_problem,
        allowed="1 to the number of datasets, or all",
    )


@dataclass(frozen=True)
class LossConfig:
    ordinal: str = setting(
        "corn",
        "the loss of the ordinal-regression task (RetinaMNIST); corn: ahead of coral on the real RetinaMNIST by 0.12 "
        "accuracy, alone and by mm-PT (docs/results/real3.md)",
        choices=ORDINAL_LOSSES,
    )
    weighting: str = setting(
        "none", "how a step's losses become one backward pass (docs/multi-task-optimization.md)", choices=tuple(METHODS)
    )
    weighting_args: dict[str, float] = setting(
        {},
        "the weighting method's options, e.g. {temperature: 2} (docs/multi-task-optimization.md)",
        allowed="a mapping of the method's options",
    )
    weights: dict[str, float] = setting(
        {}, "loss.weighting manual: one weight per trained dataset", allowed="a mapping of dataset to weight >= 0"
    )
    jacobian: str = setting(
        "auto",
        "how a gradient-based loss.weighting gets the Jacobian of the step's losses: one_pass (each dataset's own "
        "forward pass, the whole Jacobian from one backward pass), autojac (TorchJD's mtl_backward: one backward pass "
        "per dataset), auto (one_pass where the datasets' forward passes are independent: no compile, no fp16, no "
        "BatchNorm statistics shared across datasets; docs/multi-task-optimization.md)",
        choices=JACOBIAN_PATHS,
    )


@dataclass(frozen=True)
class OptimConfig:
    name: str = setting(
        "adamw",
        "the optimizer of the backbone and of every head",
        allowed="any timm optimizer name (adamw, sgd, lamb, ...)",
    )
    lr: float = setting(1e-4, "backbone learning rate", gt=0, resume=True, flag="--lr")
    head_lr: float | None = setting(None, "learning rate of the heads; null = optim.lr", gt=0, resume=True)
    weight_decay: float = setting(0.05, "weight decay (not on 1-D parameters)", ge=0)
    per_head: bool = setting(True, "false: one shared optimizer and schedule (thesis code, for ablation)")
    schedule: str = setting("cosine", "learning-rate schedule, with linear warmup", choices=SCHEDULES, resume=True)
    warmup_epochs: float = setting(0.0, "in each parameter group's own updates per epoch", ge=0, resume=True)
    min_lr_ratio: float = setting(0.0, "the cosine schedule's final learning rate over its peak", ge=0, resume=True)
    clip_grad_norm: float | None = setting(
        None, "clip the gradient norm to this; null = no clipping", gt=0, resume=True
    )
    layer_decay: float | None = setting(
        None,
        "layer-wise LR decay of the backbone (timm's layer_decay, its group_matcher's layers): layer l of L trains at "
        "optim.lr x layer_decay^(L-1-l), the last block at optim.lr, the stem lowest; null = off (for --init-from "
        "runs: fine-tuning that keeps early features)",
        gt=0,
        le=1,
    )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(10, "passes of the epoch plan", ge=1, resume=True, flag="--epochs")
    batch_size: int = setting(
        64, "images per dataset in a step, over all processes (the global batch)", ge=1, flag="--batch-size"
    )
    seed: int = setting(
        0, "seed of every random choice (np.random.seed takes 0..2**32-1)", ge=0, le=2**32 - 1, flag="--seed"
    )
    device: str = setting(
        "auto",
        "auto: CUDA when present, else CPU",
        check=device_problem,
        allowed=DEVICE_NAMES.replace(", ", " | ").replace(" or ", " | "),
        resume=True,
        result=False,
        flag="--device",
        evaluate_flag="--device",
    )
    precision: str = setting(
        "auto",
        "autocast precision: auto (bf16 on a CUDA device that supports it, else fp32; decided when the run starts and "
        "kept on resume), fp32, bf16, or fp16 with a gradient scaler",
        choices=PRECISIONS,
        recorded="fp32",
    )
    tf32: bool = setting(
        True,
        "TF32 tensor cores for float32 matrix products and convolutions on CUDA (a 10-bit mantissa; reproducible run "
        "to run on the same GPU model, so it holds with determinism on, but another result than full float32); "
        "false: full float32",
        recorded=False,
    )
    channels_last: bool = setting(False, "channels-last memory format (faster convolutions on GPUs)")
    compile: bool = setting(False, "torch.compile the backbone")
    patience: int | None = setting(
        None, "early stopping after this many epochs without improvement; null = off", ge=1, resume=True
    )
    monitor: str = setting(
        "val_loss",
        "what best.pt and early stopping follow: val_loss (the unweighted mean over datasets, lower is better), "
        "val_auc (the mean AUC), val_delta_m (Δm over AUC and ACC against the individually trained runs of "
        "train.monitor_reference: each dataset relative to what it reaches alone) or val_auc_gain (the mean share of "
        "each dataset's AUC headroom closed since epoch 1; no reference); "
        "docs/training-and-settings.md#which-checkpoint-is-best",
        choices=MONITORS,
    )
    monitor_reference: str | None = setting(
        None,
        "with train.monitor val_delta_m: the individual/ folder of finished single-dataset runs of this run's datasets "
        "(or the series holding it, or a folder of its seed<k>/), whose best validation AUC and ACC are the reference",
    )
    probe_epochs: int = setting(
        0,
        "LP-FT (linear probing, then fine-tuning): the first this many of train.epochs train the heads only, the "
        "backbone frozen in eval mode (needs model.init_from or model.pretrained); 0 = off",
        ge=0,
        recorded=0,
    )
    log_every_steps: int = setting(
        20, "steps between loss reads, log lines and the non-finite check", ge=1, resume=True, result=False
    )
    conflict_every_steps: int | None = setting(
        None,
        "steps between measurements of the gradient cosine of every pair of datasets on the backbone (it changes "
        "no result); null = auto: every 100 steps where several datasets share a step under a gradient-based "
        "loss.weighting (from the Gramian it computes anyway), else off; 0 = off",
        ge=0,
        resume=True,
        result=False,
    )
    progress: bool = setting(True, "tqdm progress bar", resume=True, result=False)


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = setting(
        0, "also write last.pt every N steps (0 = only at epoch end)", ge=0, resume=True, result=False
    )
    # a ViT-B/16 checkpoint with its AdamW state takes seconds to write, under 1% of 10 minutes
    every_minutes: float = setting(
        10.0,
        "also write last.pt when this many minutes have passed since the last write (0 = off)",
        ge=0,
        resume=True,
        result=False,
    )


@dataclass(frozen=True)
class EvaluationConfig:
    ece_bins: int = setting(
        15,
        "equal-width confidence bins of the expected calibration error (ece) in every metrics table and compare",
        ge=1,
        le=1000,
        resume=True,
        result=False,
        evaluate_flag="--ece-bins",
    )


@dataclass(frozen=True)
class Config:
    name: str = setting("mmpt", "the run's name", check=run_name_problem, resume=True, result=False)
    output: str | None = setting(
        None, "run folder; null = runs/{name}", resume=True, result=False, flag="--output", evaluate_flag="--output"
    )
    determinism: bool = setting(
        True,
        "deterministic kernels, so the same config and seed give the same weights (false: faster, not bitwise "
        "reproducible; TF32 is train.tf32's)",
        resume=True,
        result=False,
    )
    data: DataConfig = section(DataConfig, "where the data is and how it is read")
    input: InputConfig = section(InputConfig, "how a stored image becomes the model's input")
    model: ModelConfig = section(ModelConfig, "the backbone (the heads follow the datasets)")
    sampler: SamplerConfig = section(SamplerConfig, "the epoch plan: which datasets each step trains on")
    loss: LossConfig = section(LossConfig, "per-task losses and how they are weighted")
    optim: OptimConfig = section(OptimConfig, "optimizers and learning-rate schedules")
    train: TrainConfig = section(TrainConfig, "the training loop")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "when last.pt is written besides epoch ends")
    evaluation: EvaluationConfig = section(EvaluationConfig, "how the metrics are computed")
    launch: LaunchConfig = section(LaunchConfig, "where a series' members train: this process, local jobs or SLURM")

    @property
    def run_dir(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / self.name


# Every setting, by dotted key, in declaration order.
SETTINGS: dict[str, Key] = declared(Config)
# Config keys a resume may change: where and how fast the run goes, how long, what it logs and keeps, and the
# learning rate and clipping (the fixes the NaN message suggests). Every other key is fixed for a run (a fixed key).
RESUME_MAY_CHANGE = frozenset(key for key, k in SETTINGS.items() if k.spec.resume)
# Keys that say where and how a run goes but not what it computes: a finished run may differ from the recipe
# a series asks for in these alone, and a sweep over them would train identical runs.
RESULT_NEUTRAL = frozenset(key for key, k in SETTINGS.items() if not k.spec.result)
# The named flags of train.py, and those of evaluate.py and probe, with the key each sets.
NAMED_FLAGS: dict[str, str] = {k.spec.flag: key for key, k in SETTINGS.items() if k.spec.flag}
EVALUATE_FLAGS: dict[str, str] = {k.spec.evaluate_flag: key for key, k in SETTINGS.items() if k.spec.evaluate_flag}
assert len(NAMED_FLAGS) == sum(bool(k.spec.flag) for k in SETTINGS.values()), "two keys declare one flag"
assert len(EVALUATE_FLAGS) == sum(bool(k.spec.evaluate_flag) for k in SETTINGS.values()), "two keys declare one flag"


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


def fixed_key_changes(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """The differences a resume refuses: every key outside RESUME_MAY_CHANGE (see config_differences)."""
    return config_differences(old, new, RESUME_MAY_CHANGE)


def recorded_config(raw: Any) -> Config:
    """A config that a run recorded (config.yaml, a checkpoint, series.json) as that run trained it: a key
    declared after it was written takes the value its declaration gives for such records (`recorded`), not
    today's default, so a record without model.norm reads as model.norm shared. MmptError when invalid."""
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


def load_config(
    path: str | Path | None = None, overrides: list[dict] | None = None, *, recorded: bool = False
) -> Config:
    """Build a Config from defaults, an optional YAML file (with `base:` chaining) and override dicts.

    `recorded`: the file is a run's own config.yaml (--resume), read as `recorded_config` reads it.
    Raises MmptError listing every unknown key, wrong type and out-of-range value.
    """
    raw: dict = {}
    if path is not None:
        raw = read_with_base(Path(path), seen=())
        raw = _as_recorded(raw) if recorded else raw
    for override in overrides or []:
        raw = deep_merge(raw, override)
    return from_dict(raw)


def from_dict(raw: dict) -> Config:
    """Validate a nested dict against the declarations; raise one MmptError naming every problem."""
    problems: list[str] = []
    cfg = build(Config, raw, "", problems)
    if not problems:
        problems += cross_problems(cfg, DataConfig.root)
    if problems:
        raise MmptError("invalid config: " + "; ".join(problems))
    # datasets are stored as medmnist flags in medmnist order, whatever spelling the user chose
    flags = tuple(t.flag for t in resolve_tasks(cfg.data.datasets))
    weights = {dataset_flag(name): value for name, value in cfg.loss.weights.items()}
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, datasets=flags), loss=dataclasses.replace(cfg.loss, weights=weights)
    )


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


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (loadable with load_config)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
