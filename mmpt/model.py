"""MultiTaskNet: one timm backbone shared by every task, one classification head per task."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from mmpt.config import Config, recorded_config
from mmpt.data.transforms import DeviceTransform
from mmpt.errors import MmptError, lookup, unknown_name
from mmpt.losses import TaskLoss, build_loss
from mmpt.norm import (
    NormLayout,
    check_norm,
    convert_norms,
    describe_init_rule,
    has_batchnorm,
    norm_layer_prefixes,
    resolve_norm,
    saved_norm,
    task_norms,
    transfer_norm_state,
)
from mmpt.tasks import TaskSpec, resolve_tasks

# Short names researchers use; any other timm model name works as it is.
BACKBONES: dict[str, str] = {
    "vit_b16": "vit_base_patch16_224",
    "vit_s16": "vit_small_patch16_224",
    "vit_t16": "vit_tiny_patch16_224",
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "densenet121": "densenet121",
    "convnext_tiny": "convnext_tiny",
    "efficientnet_b0": "efficientnet_b0",
}


def resolve_backbone(name: str) -> str:
    """Return the timm model name for an alias or timm name; raise MmptError listing close matches."""
    timm_name = BACKBONES.get(name, name)
    if timm.is_model(timm_name):
        return timm_name
    raise unknown_name("backbone", name, list(BACKBONES) + timm.list_models())


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    img_size: int | None = None,
    drop_rate: float = 0.0,
    dynamic_img_size: bool = False,
) -> nn.Module:
    """Build a timm backbone without classifier (`num_classes=0`), so `forward` returns pooled features.

    `img_size` is passed to models built for a fixed size (ViTs); `dynamic_img_size` lets such models take
    any input size (timm's dynamic_img_size, padding to a multiple of the patch), for `input.mode: native`.
    Convolutional models take neither argument and accept any size. Raises MmptError for an unknown name or
    pretrained weights that cannot be fetched.
    """
    timm_name = resolve_backbone(name)
    kwargs = {"num_classes": 0, "drop_rate": drop_rate}
    optional = {"img_size": img_size} if img_size else {}
    if dynamic_img_size:
        optional.update(dynamic_img_size=True, dynamic_img_pad=True)
    try:
        while True:
            try:
                return timm.create_model(timm_name, pretrained=pretrained, **kwargs, **optional)
            except TypeError as exc:
                # a model without one of the size arguments (a CNN) takes any size: drop what it refused
                refused = [key for key in optional if f"'{key}'" in str(exc)]
                if not refused:
                    raise
                for key in refused:
                    del optional[key]
    except (OSError, RuntimeError) as exc:
        if not pretrained:
            raise
        raise MmptError(
            f"could not load pretrained weights for {timm_name} ({str(exc).splitlines()[0][:160]}); "
            "put them in the Hugging Face cache (HF_HOME) or set model.pretrained: false"
        ) from None


class CoralHead(nn.Module):
    """CORAL's rank-consistent head: one shared weight vector and K−1 ordered biases; N×(K−1) logits."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 1, bias=False)
        # descending biases start the cumulative probabilities P(y > k) ordered, as in coral-pytorch
        self.bias = nn.Parameter(torch.arange(num_classes - 1, 0, -1).float() / (num_classes - 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + self.bias  # N×1 + (K−1) -> N×(K−1)


def _linear_head(in_features: int, num_outputs: int, num_classes: int) -> nn.Module:
    return nn.Linear(in_features, num_outputs)


def _coral_head(in_features: int, num_outputs: int, num_classes: int) -> nn.Module:
    assert num_outputs == num_classes - 1, f"a CORAL head has K-1={num_classes - 1} outputs, not {num_outputs}"
    return CoralHead(in_features, num_classes)


HEADS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "linear": _linear_head,
    "coral": _coral_head,
}


def build_head(kind: str, in_features: int, num_outputs: int, num_classes: int) -> nn.Module:
    """Return the head module `kind` ("linear" or "coral") mapping in_features to num_outputs logits.

    Raises MmptError for an unknown kind, listing the valid names.
    """
    return lookup("head", HEADS, kind)(in_features, num_outputs, num_classes)


class MultiTaskNet(nn.Module):
    """A shared backbone and a `ModuleDict` of heads keyed by task (medmnist flag).

    `forward(x, task)` returns the logits of `task`'s head for the N×3×S×S input `x`. With a per-dataset
    `norm` (model.norm) every BatchNorm layer of the backbone keeps one set of statistics per dataset of
    `norm_tasks` (default: the heads' datasets, in their order), and each backbone pass first sets which.
    """

    def __init__(
        self,
        backbone: nn.Module,
        heads: dict[str, nn.Module],
        input_size: int | None = None,
        norm: str = "shared",
        norm_tasks: tuple[str, ...] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        # the side pad/resize bring images to: as configured, else the backbone's pretrained_cfg
        self.input_size = input_size or int(backbone.pretrained_cfg["input_size"][-1])
        self.norm_tasks = tuple(norm_tasks if norm_tasks is not None else heads)
        self.norm = norm = resolve_norm(norm, backbone, len(self.norm_tasks))  # model.norm auto decided here
        self.norm_layout = NormLayout()
        if norm != "shared":
            convert_norms(backbone, len(self.norm_tasks), norm, self.norm_layout)
        self._norm_index = {task: i for i, task in enumerate(self.norm_tasks)}

    def split_norm_statistics(self, tasks: tuple[str, ...] = ()) -> None:
        """Turn shared BatchNorm statistics into per-dataset ones (model.norm per_dataset_stats) for the model's
        datasets and `tasks`, each starting from the shared values; no-op when they are per dataset already."""
        if not self.per_dataset_norm:
            self.norm_tasks += tuple(t for t in tasks if t not in self.norm_tasks)
            self._norm_index = {task: i for i, task in enumerate(self.norm_tasks)}
            convert_norms(self.backbone, len(self.norm_tasks), "per_dataset_stats", self.norm_layout)
            self.norm = "per_dataset_stats"

    @property
    def per_dataset_norm(self) -> bool:
        return self.norm != "shared"

    def set_norm_layout(self, segments: list[tuple[str, int]]) -> None:
        """Tell the per-dataset norm layers which dataset each slice of the next backbone batch belongs to:
        [(task, images), ...] in batch order (sizes known on the host, so no device sync). No-op for shared norm."""
        if self.per_dataset_norm:
            unknown = [task for task, _ in segments if task not in self._norm_index]
            if unknown:
                raise MmptError(
                    f"this model keeps BatchNorm statistics for {', '.join(self.norm_tasks)} only (model.norm "
                    f"{self.norm}), not {', '.join(unknown)}; evaluate it on its own datasets"
                )
            self.norm_layout.segments = tuple((self._norm_index[task], n) for task, n in segments)

    def norm_parameters(self, tasks: tuple[str, ...]) -> list[nn.Parameter]:
        """The per-dataset affine parameters of `tasks` (model.norm per_dataset; else none)."""
        if self.norm != "per_dataset":
            return []
        return [
            p for task in tasks for _, m in task_norms(self.backbone) for p in m.task_parameters(self._norm_index[task])
        ]

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        self.set_norm_layout([(task, len(x))])
        features = self.backbone(x)  # N×F
        return self.heads[task](features)

    def features(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """The backbone's pooled N×F features of the N×3×S×S input `x` (what every head reads); with per-dataset
        norm, through `task`'s statistics (and affine weights)."""
        if self.per_dataset_norm:
            if task is None:
                raise MmptError(
                    "this backbone normalises each dataset with its own statistics: features need a dataset"
                )
            self.set_norm_layout([(task, len(x))])
        return self.backbone(x)

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        cfg = self.backbone.pretrained_cfg
        return tuple(cfg["mean"]), tuple(cfg["std"])


def build_model(cfg: Config, tasks: list[TaskSpec]) -> tuple[MultiTaskNet, dict[str, TaskLoss]]:
    """The backbone with one head per task, each head sized by its task's loss; and those losses."""
    losses = {t.flag: build_loss(t, ordinal=cfg.loss.ordinal) for t in tasks}
    backbone = create_backbone(
        cfg.model.backbone,
        pretrained=cfg.model.pretrained,
        img_size=cfg.model.img_size,
        drop_rate=cfg.model.drop_rate,
        dynamic_img_size=cfg.input.mode == "native",
    )
    heads = {
        t.flag: build_head(losses[t.flag].head, backbone.num_features, losses[t.flag].num_outputs, t.num_classes)
        for t in tasks
    }
    check_norm(cfg.model.norm, backbone, cfg.model.backbone)
    model = MultiTaskNet(backbone, heads, input_size=cfg.model.img_size)
    check_input_size(model, cfg.data.resolution if cfg.input.mode == "native" else model.input_size, cfg.model.backbone)
    # converted after the size check, which runs the plain backbone: the per-dataset layers start from its values
    model = MultiTaskNet(
        backbone, heads, input_size=cfg.model.img_size, norm=cfg.model.norm, norm_tasks=tuple(t.flag for t in tasks)
    )
    return model, losses


@torch.no_grad()
def check_input_size(model: MultiTaskNet, size: int, backbone: str) -> None:
    """Run one blank image through the backbone; raise MmptError if it cannot take `size` px inputs.

    Eval mode and no gradients: no RNG is drawn and no statistic moves, so training is unaffected.
    """
    was_training = model.training
    model.eval()
    try:
        model.backbone(torch.zeros(1, 3, size, size))
    except RuntimeError as exc:
        raise MmptError(
            f"backbone {backbone} cannot take {size}x{size} inputs ({str(exc).splitlines()[0][:120]}); "
            f"use input.mode pad or resize with a larger model.img_size, or another backbone"
        ) from None
    finally:
        model.train(was_training)


def build_transform(cfg: Config, model: MultiTaskNet) -> DeviceTransform:
    """On-device preprocessing to the model's input size with the backbone's mean/std."""
    mean, std = model.mean_std
    return DeviceTransform(
        input_size=model.input_size,
        mode=cfg.input.mode,
        mean=mean,
        std=std,
        pad_value=cfg.input.pad_value,
        interpolation=cfg.input.interpolation,
        augment=cfg.input.augment,
    )


def checkpoint_path(source: str | Path) -> Path:
    """A run folder means its checkpoints/best.pt; anything else is taken as a checkpoint file."""
    source = Path(source)
    return source / "checkpoints" / "best.pt" if source.is_dir() else source


def model_input_size(cfg: Config) -> int | str:
    """The input side the backbone sees: the data resolution in native mode, else model.img_size (or its default)."""
    return cfg.data.resolution if cfg.input.mode == "native" else (cfg.model.img_size or "default")


def load_weights_source(source: str | Path) -> tuple[Path, dict]:
    """(path, checkpoint dict) of a run folder (its best.pt), a checkpoint file, or a folder written by
    `evaluate.py export` (read as the checkpoint it came from: model weights and config)."""
    from mmpt import checkpoint as ckpt
    from mmpt.experiments.export import export_state, is_export

    if is_export(source):
        return Path(source), export_state(source)
    path = checkpoint_path(source)
    return path, ckpt.load(path)


def load_initial_weights(model: MultiTaskNet, source: str | Path, cfg: Config) -> list[str]:
    """Copy another run's backbone, and its heads for datasets both runs have, into `model` (weights only).

    `source` is a run folder (its best.pt), a checkpoint file or a folder written by `evaluate.py export`.
    Optimizer, schedule and progress are not
    taken: the new run starts fresh from these weights (mm-PT as pre-training, then fine-tuning). Raises
    MmptError when the source's backbone or input size differs from `cfg`'s. Returns the heads copied.
    """
    from mmpt import checkpoint as ckpt

    path, state = load_weights_source(source)
    saved = recorded_config(state[ckpt.CONFIG])
    theirs, ours = resolve_backbone(saved.model.backbone), resolve_backbone(cfg.model.backbone)
    # another resolution or input.mode is refused even where the weights would fit (a padded or native
    # backbone): fine-tuning on other input is another experiment, not mm-PFT as the recipe states it
    if (
        theirs != ours
        or model_input_size(saved) != model_input_size(cfg)
        or (saved.data.resolution, saved.input.mode) != (cfg.data.resolution, cfg.input.mode)
    ):
        raise MmptError(
            f"model.init_from {path} holds a {theirs} backbone trained on {saved.data.resolution} px images "
            f"(input.mode {saved.input.mode}, model input {model_input_size(saved)}), but this run builds {ours} for "
            f"{cfg.data.resolution} px images (input.mode {cfg.input.mode}, model input {model_input_size(cfg)}); "
            "initialise from a run with the same backbone, resolution, input.mode and model.img_size"
        )
    weights = state[ckpt.MODEL]
    backbone = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    norm_state: dict[str, torch.Tensor] = {}
    source_norm = saved_norm(backbone)  # model.norm auto: what the source's weights hold
    if source_norm != "shared" or model.per_dataset_norm:
        # BatchNorm entries differ in shape between norm settings: every norm layer is filled by the transfer rule
        sizes = {t.flag: t.split_size("train") for t in resolve_tasks(tuple(saved.data.datasets) + model.norm_tasks)}
        norm_state = transfer_norm_state(model.backbone, backbone, saved.data.datasets, model.norm_tasks, sizes)
        prefixes = norm_layer_prefixes(model.backbone)
        backbone = {k: v for k, v in backbone.items() if not k.startswith(tuple(prefixes))}
    own = {k: v for k, v in model.backbone.state_dict().items() if k not in norm_state}
    mismatched = [k for k, v in own.items() if k not in backbone or backbone[k].shape != v.shape]
    if mismatched or len(backbone) != len(own):
        raise MmptError(
            f"model.init_from {path}: its backbone weights do not fit this run's {ours} "
            f"(first difference: {(mismatched or sorted(set(backbone) - set(own)))[0]}); initialise from a run with "
            "the same backbone"
        )
    model.backbone.load_state_dict({**backbone, **norm_state})
    copied = []
    for flag, head in model.heads.items():
        prefix = f"heads.{flag}."
        theirs_head = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        own = head.state_dict()
        # a head of another shape (e.g. loss.ordinal ce vs coral) stays freshly initialised
        if theirs_head.keys() == own.keys() and all(theirs_head[k].shape == own[k].shape for k in own):
            head.load_state_dict(theirs_head)
            copied.append(flag)
    print(f"initialised from {path}: backbone and heads of {', '.join(copied) or 'no dataset'}")
    if norm_state:
        print(describe_init_rule(saved.data.datasets, model.norm_tasks, source_norm, model.norm))
    return copied


def load_backbone(source: str | Path) -> tuple[MultiTaskNet, Config]:
    """The trained backbone of a run folder or checkpoint, without its heads, and that run's config."""
    from mmpt import checkpoint as ckpt

    _, state = load_weights_source(source)
    cfg = recorded_config(state[ckpt.CONFIG])
    backbone = create_backbone(
        cfg.model.backbone,
        img_size=cfg.model.img_size,
        dynamic_img_size=cfg.input.mode == "native",
    )
    weights = {k.removeprefix("backbone."): v for k, v in state[ckpt.MODEL].items() if k.startswith("backbone.")}
    model = MultiTaskNet(
        backbone, {}, input_size=cfg.model.img_size, norm=cfg.model.norm, norm_tasks=tuple(cfg.data.datasets)
    )
    backbone.load_state_dict(weights)
    return model, cfg


def check_batch_size(model: nn.Module, batch_size: int) -> None:
    """Raise MmptError if `model` has BatchNorm layers and `batch_size` is 1: BatchNorm trains on 2+ values per
    channel."""
    if batch_size < 2 and has_batchnorm(model):  # per-dataset BatchNorm layers (model.norm) included
        raise MmptError(
            "train.batch_size is 1, but the backbone has BatchNorm layers, which cannot train on one image; "
            "use --batch-size 2 or more"
        )
