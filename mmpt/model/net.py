"""MultiTaskNet: one timm backbone shared by every task, one classification head per task.

Built from plain arguments (a backbone from mmpt.model.backbones, heads from `build_head`); the adapter from a
config is mmpt.model.build.build_model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from mmpt.errors import MmptError, lookup
from mmpt.model import backbones
from mmpt.model.norm import (
    APPLIED_NORMS,
    NormLayout,
    convert_norms,
    has_batchnorm,
    saved_norm,
    share_norms,
    task_norms,
)
from mmpt.model.transfer import describe_init_rule, norm_layer_prefixes, transfer_norm_state
from mmpt.runtime.distributed import World
from mmpt.tasks import resolve_tasks


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

    `forward(x, task)` returns the logits of `task`'s head for the N×3×S×S input `x`. With a per-dataset `norm`
    (model.norm as applied: shared, per_dataset_stats or per_dataset; mmpt.model.build resolves auto) every BatchNorm
    layer of the backbone keeps one set of statistics per dataset of `norm_tasks` (default: the heads' datasets, in
    their order), and each backbone pass first sets which.
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
        self.input_size = backbones.input_size(backbone, input_size)
        self.norm_tasks = tuple(norm_tasks if norm_tasks is not None else heads)
        assert norm in APPLIED_NORMS, f"model.norm as applied (mmpt.model.build resolves auto), got {norm!r}"
        self.norm = norm
        self.norm_layout = NormLayout()
        if norm != "shared":
            convert_norms(backbone, len(self.norm_tasks), norm, self.norm_layout)
        self._norm_index = {task: i for i, task in enumerate(self.norm_tasks)}
        self._register_norm_rows()

    def _register_norm_rows(self) -> None:
        # the index of each dataset's statistics row, on the model's device: a layout as a tensor is cut from it
        self.register_buffer("norm_rows", torch.arange(len(self.norm_tasks)), persistent=False)

    def split_norm_statistics(self, tasks: tuple[str, ...] = ()) -> None:
        """Turn shared BatchNorm statistics into per-dataset ones (model.norm per_dataset_stats) for the model's
        datasets and `tasks`, each starting from the shared values; no-op when they are per dataset already."""
        if not self.per_dataset_norm:
            self.norm_tasks += tuple(t for t in tasks if t not in self.norm_tasks)
            self._norm_index = {task: i for i, task in enumerate(self.norm_tasks)}
            convert_norms(self.backbone, len(self.norm_tasks), "per_dataset_stats", self.norm_layout)
            self.norm = "per_dataset_stats"
            self._register_norm_rows()

    def share_norms(self) -> None:
        """Make every shared BatchNorm layer a SharedBatchNorm, which a synchronised pass (`set_norm_layout`'s
        `world`) normalises with the global batch's statistics; weights, buffers and keys stay as they are."""
        share_norms(self.backbone, self.norm_layout)

    @property
    def per_dataset_norm(self) -> bool:
        return self.norm != "shared"

    def set_norm_layout(
        self, segments: list[tuple[str, int]], *, as_tensor: bool = False, world: World | None = None
    ) -> None:
        """Tell the norm layers which dataset each slice of the next backbone batch belongs to: [(task, images), ...]
        in batch order (sizes known on the host, so no device sync).

        `as_tensor`: also as the dataset row of each image on the device (a compiled backbone: one graph for every
        layout). `world`: the pass's statistics are those of every rank's rows (model.sync_norm under torchrun; every
        rank must make the same passes). Every pass sets both anew, so a pass made without them is neither.
        """
        layout = self.norm_layout
        layout.world = world
        layout.rows = None
        if not self.per_dataset_norm:
            return
        unknown = [task for task, _ in segments if task not in self._norm_index]
        if unknown:
            raise MmptError(
                f"this model keeps BatchNorm statistics for {', '.join(self.norm_tasks)} only (model.norm "
                f"{self.norm}), not {', '.join(unknown)}; evaluate it on its own datasets"
            )
        layout.segments = tuple((self._norm_index[task], n) for task, n in segments)
        if as_tensor or world is not None:
            # views of the row indices, expanded and joined into a tensor of its own (one small kernel, no copy from
            # the host): a view's storage offset would be one more thing a compiled graph specialises on
            layout.rows = torch.cat([self.norm_rows[i].expand(n) for i, n in layout.segments])

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

    def features(self, x: torch.Tensor, task: str | None = None, world: World | None = None) -> torch.Tensor:
        """The backbone's pooled N×F features of the N×3×S×S input `x` (what every head reads); with per-dataset
        norm, through `task`'s statistics (and affine weights). `world`: a synchronised pass (`set_norm_layout`)."""
        if self.per_dataset_norm and task is None:
            raise MmptError("this backbone normalises each dataset with its own statistics: features need a dataset")
        self.set_norm_layout([(task, len(x))], world=world)
        return self.backbone(x)

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return backbones.mean_std(self.backbone)


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


def copy_initial_weights(
    model: MultiTaskNet,
    weights: dict[str, Tensor],
    source_datasets: Sequence[str],
    path: Path,
    backbone_name: str,
    train_sizes: dict[str, int] | None = None,
) -> list[str]:
    """Copy a saved model's backbone, and its heads for datasets `model` has too, into `model` (weights only).

    `weights`: the saved model state (backbone.* and heads.* entries) of a run trained on `source_datasets`,
    read from `path`; `backbone_name`: the timm name both are built from. BatchNorm statistics follow the transfer rule
    of mmpt.model.norm when either side keeps them per dataset, mixtures weighted by `train_sizes` (the source run's own
    train split sizes; None: medmnist's official ones). Raises MmptError when the backbone weights do not fit.
    Returns the heads copied.
    """
    backbone = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    norm_state: dict[str, torch.Tensor] = {}
    source_norm = saved_norm(backbone)  # model.norm auto: what the source's weights hold
    if source_norm != "shared" or model.per_dataset_norm:
        # BatchNorm entries differ in shape between norm settings: every norm layer is filled by the transfer rule
        sizes = train_sizes or {t.flag: t.split_size("train") for t in resolve_tasks(tuple(source_datasets))}
        norm_state = transfer_norm_state(model.backbone, backbone, source_datasets, model.norm_tasks, sizes)
        prefixes = norm_layer_prefixes(model.backbone)
        backbone = {k: v for k, v in backbone.items() if not k.startswith(tuple(prefixes))}
    own = {k: v for k, v in model.backbone.state_dict().items() if k not in norm_state}
    mismatched = [k for k, v in own.items() if k not in backbone or backbone[k].shape != v.shape]
    if mismatched or len(backbone) != len(own):
        raise MmptError(
            f"model.init_from {path}: its backbone weights do not fit this run's {backbone_name} "
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
        print(describe_init_rule(source_datasets, model.norm_tasks, source_norm, model.norm))
    return copied


def check_batch_size(model: nn.Module, batch_size: int) -> None:
    """Raise MmptError if `model` has BatchNorm layers and `batch_size` is 1: BatchNorm trains on 2+ values per
    channel."""
    if batch_size < 2 and has_batchnorm(model):  # per-dataset BatchNorm layers (model.norm) included
        raise MmptError(
            "train.batch_size is 1, but the backbone has BatchNorm layers, which cannot train on one image; "
            "use --batch-size 2 or more"
        )
