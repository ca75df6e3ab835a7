"""Per-dataset normalization (model.norm): each dataset's own BatchNorm statistics, optionally its own affine weights.

Domain-specific BatchNorm (Bilen & Vedaldi 2017; Chang et al. 2019, DSBN; Li et al. 2021, FedBN): with one
dataset per step a batch is normalised with its own statistics during training, but shared running averages
blend every dataset at evaluation. `convert_norms` replaces every BatchNorm layer of a backbone (torch's and
timm's BatchNormAct2d, which adds a dropout and an activation) by a `TaskBatchNorm` that keeps one row of
running statistics per dataset. The model sets the current layout (which dataset each slice of the batch
belongs to) before every backbone pass; a batch of several datasets (sampler.tasks_per_step >= 2) is
normalised slice by slice, each with its own batch statistics, updating only its own running statistics.

Two passes take another form of the same arithmetic, `normalize_rows`, which reads the layout as a tensor (the
dataset row of each image) instead of host integers: a compiled backbone's (train.compile), so that one graph
serves every dataset and every mix of datasets and sizes instead of one graph per layout, and a pass synchronised
across processes (model.sync_norm under torchrun), whose statistics are those of the global batch: each dataset's
sums over every rank's rows, in one differentiable all-reduce per layer, as nn.SyncBatchNorm does. Shared
BatchNorm layers become `SharedBatchNorm`s for the synchronised passes; they keep their weights, buffers and keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmpt.config.choices import NORMS
from mmpt.errors import MmptError
from mmpt.runtime.distributed import World, differentiable_sum

AUTO = "auto"  # per_dataset_stats for a BatchNorm backbone trained on 2+ datasets, else shared
PER_DATASET = ("per_dataset_stats", "per_dataset")  # the settings that convert the BatchNorm layers
APPLIED_NORMS = ("shared", *PER_DATASET)  # what a model applies: auto resolved (`resolve_norm`)
assert NORMS == (AUTO, "shared", *PER_DATASET), f"model.norm choices {NORMS} are not those this module implements"


def resolve_norm(norm: str, backbone: nn.Module, num_tasks: int) -> str:
    """model.norm as the model applies it: `auto` becomes per_dataset_stats where there is something to keep
    apart (BatchNorm layers and two or more datasets), else shared; the other settings stay as they are."""
    if norm != AUTO:
        return norm
    return "per_dataset_stats" if num_tasks >= 2 and has_batchnorm(backbone) else "shared"


def saved_norm(backbone_weights: dict[str, Tensor]) -> str:
    """The norm setting a saved backbone was trained with, read from its weights (per-dataset layers keep T×C
    statistics and, for per_dataset, task_weight entries), so a checkpoint of model.norm auto says what it holds."""
    if any(k.endswith("task_weight.0") for k in backbone_weights):
        return "per_dataset"
    if any(k.endswith("running_mean") and v.dim() == 2 for k, v in backbone_weights.items()):
        return "per_dataset_stats"
    return "shared"


class NormLayout:
    """Which dataset each slice of the backbone's batch belongs to: [(dataset index, images), ...] in batch order.

    One object shared by every TaskBatchNorm (and SharedBatchNorm) of a model; the model sets it before each
    backbone pass. `rows` (the dataset index of each image, a tensor on the device) is set for the passes that
    normalise through `normalize_rows`: a compiled backbone's and a synchronised one; `world` for a pass whose
    statistics are those of every rank's rows (model.sync_norm under torchrun: the training step's passes and the
    calibration, never a pass that one rank makes alone).
    """

    def __init__(self) -> None:
        self.segments: tuple[tuple[int, int], ...] = ()
        self.rows: Tensor | None = None
        self.world: World | None = None


def normalize_rows(
    x: Tensor,
    rows: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    *,
    training: bool,
    momentum: float | None,
    eps: float,
    world: World | None = None,
) -> tuple[Tensor, Tensor | None]:
    """BatchNorm without the affine step, each image with the statistics of its row: `x` N×C×..., `rows` the row
    (dataset index) of each image (N, long, on x's device; None: every image row 0), `running_mean`/`running_var`
    R×C. Returns the normalised float32 N×C×... and, in training, which rows had images (R, bool); None in eval.

    Training: each row's mean and biased variance over its images (with `world`, over every rank's images of that
    row: their sums cross ranks in one differentiable all-reduce, so the gradient is the single process's) normalise
    them, and rows with images update their running statistics as F.batch_norm does (the unbiased variance, weight
    `momentum`). The arithmetic reads no value back and branches on no tensor: one graph for every layout.
    Eval: the running statistics of each image's row.
    """
    assert momentum is not None or not training, "normalize_rows needs a momentum (not the cumulative average)"
    n, channels = x.shape[:2]
    spatial = tuple(range(2, x.dim()))
    per_image = 1
    for size in x.shape[2:]:
        per_image *= size
    view = (n, channels) + (1,) * len(spatial)
    # the sums in float32, whatever autocast runs the convolutions in
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.float()
        num_rows = running_mean.shape[0]
        if rows is None:
            onehot = xf.new_ones(n, 1)  # N×1
        else:
            onehot = (rows[:, None] == torch.arange(num_rows, device=rows.device)[None, :]).float()  # N×R
        if not training:
            mean, var = running_mean.float(), running_var.float()
            present = None
        else:
            count = onehot.sum(0) * per_image  # R: values per channel of each row
            if world is None:
                # two passes over the rows: the mean, then the mean square deviation from it
                mean = (onehot.T @ xf.sum(spatial)) / count.clamp(min=1)[:, None]  # R×C
                centered = xf - (onehot @ mean).view(view)
                var = (onehot.T @ centered.pow(2).sum(spatial)) / count.clamp(min=1)[:, None]
            else:
                # one all-reduce: the counts and the sums of the values and squares, shifted by the running mean
                # (the same on every rank) so that the squares do not cancel
                shift = running_mean.detach().double()
                shifted = xf.double() - (onehot.double() @ shift).view(view)
                onehot = onehot.double()
                count = count.double()
                local = torch.cat(
                    [
                        count,
                        (onehot.T @ shifted.sum(spatial)).flatten(),
                        (onehot.T @ shifted.pow(2).sum(spatial)).flatten(),
                    ]
                )
                count, sums, squares = differentiable_sum(world, local).split([num_rows, *(2 * [num_rows * channels])])
                d = sums.view(num_rows, channels) / count.clamp(min=1)[:, None]  # batch mean - shift
                mean = (shift + d).float()
                var = (squares.view(num_rows, channels) / count.clamp(min=1)[:, None] - d * d).clamp(min=0).float()
                onehot = onehot.float()
                count = count.float()
            present = count > 0
            with torch.no_grad():
                unbiased = var * (count / (count - 1).clamp(min=1))[:, None]
                kept = present[:, None]
                running_mean.copy_(torch.where(kept, (1 - momentum) * running_mean + momentum * mean, running_mean))
                running_var.copy_(torch.where(kept, (1 - momentum) * running_var + momentum * unbiased, running_var))
        out = (xf - (onehot @ mean).view(view)) * torch.rsqrt(onehot @ var + eps).view(view)
    return out, present


class TaskBatchNorm(nn.Module):
    """A BatchNorm layer with one set of running statistics (T×C buffers) per dataset, and per-dataset affine
    weights (`per_task_affine`, one C-vector Parameter per dataset, so a dataset not in a step has no gradient
    and its optimizer state does not move) or the original layer's shared ones.

    Forward normalises each slice of the layout with F.batch_norm on its dataset's row, as nn.BatchNorm2d does
    for one dataset, then applies the original layer's dropout and activation (timm's BatchNormAct2d).
    """

    def __init__(self, source: _BatchNorm, num_tasks: int, layout: NormLayout, per_task_affine: bool) -> None:
        super().__init__()
        assert source.track_running_stats, "TaskBatchNorm converts BatchNorm layers that track running statistics"
        self.num_features, self.eps, self.momentum = source.num_features, source.eps, source.momentum
        self.layout = layout
        self.register_buffer("running_mean", source.running_mean.detach().clone().repeat(num_tasks, 1))  # T×C
        self.register_buffer("running_var", source.running_var.detach().clone().repeat(num_tasks, 1))  # T×C
        self.register_buffer("num_batches_tracked", source.num_batches_tracked.detach().clone().repeat(num_tasks))
        self.per_task_affine = per_task_affine and source.affine
        if self.per_task_affine:
            self.task_weight = nn.ParameterList(
                [nn.Parameter(source.weight.detach().clone()) for _ in range(num_tasks)]
            )
            self.task_bias = nn.ParameterList([nn.Parameter(source.bias.detach().clone()) for _ in range(num_tasks)])
            self.weight, self.bias = None, None
        else:
            self.weight, self.bias = source.weight, source.bias  # shared (or None without affine)
        self.drop = getattr(source, "drop", nn.Identity())
        self.act = getattr(source, "act", nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        if self.layout.rows is not None:  # a compiled or synchronised pass
            return self.act(self.drop(self._norm_rows(x)))
        segments = self.layout.segments
        assert segments, "TaskBatchNorm needs the model's norm layout (MultiTaskNet sets it before the backbone)"
        if len(segments) == 1:
            out = self._norm(x, segments[0][0])
        else:
            chunks = x.split([n for _, n in segments])
            out = torch.cat([self._norm(chunk, t) for chunk, (t, _) in zip(chunks, segments)])
        return self.act(self.drop(out))

    def _norm_rows(self, x: Tensor) -> Tensor:
        layout = self.layout
        out, present = normalize_rows(
            x,
            layout.rows,
            self.running_mean,
            self.running_var,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            world=layout.world,
        )
        if present is not None:
            self.num_batches_tracked.add_(present.long())
        if self.per_task_affine:
            # each dataset's own weights on its slice (host sizes: never in a compiled graph, see config)
            assert not torch.compiler.is_compiling(), "per-dataset affine weights are not compiled (config refuses it)"
            chunks = out.split([n for _, n in layout.segments])
            out = torch.cat(
                [
                    c * _channels(self.task_weight[t], c) + _channels(self.task_bias[t], c)
                    for c, (t, _) in zip(chunks, layout.segments)
                ]
            )
        elif self.weight is not None:
            out = out * _channels(self.weight, out) + _channels(self.bias, out)
        return out.to(x.dtype)

    def _norm(self, x: Tensor, t: int) -> Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training:
            self.num_batches_tracked[t].add_(1)
            if self.momentum is None:  # cumulative average (recalibration only: it reads the count, a host sync)
                factor = 1.0 / float(self.num_batches_tracked[t])
        weight = self.task_weight[t] if self.per_task_affine else self.weight
        bias = self.task_bias[t] if self.per_task_affine else self.bias
        # rows of the T×C buffers are contiguous views: batch_norm's in-place update lands in dataset t's row
        return F.batch_norm(x, self.running_mean[t], self.running_var[t], weight, bias, self.training, factor, self.eps)

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        return [self.task_weight[t], self.task_bias[t]] if self.per_task_affine else []

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, tasks={self.running_mean.shape[0]}, eps={self.eps}, momentum={self.momentum}, "
            f"per_task_affine={self.per_task_affine}"
        )


def _channels(vector: Tensor, like: Tensor) -> Tensor:
    """A per-channel C vector shaped to broadcast over N×C×... `like`."""
    return vector.view((1, -1) + (1,) * (like.dim() - 2))


class SharedBatchNorm(_BatchNorm):
    """A shared BatchNorm layer (one set of statistics for every dataset) whose training passes the step can
    synchronise across processes (model.sync_norm under torchrun: the layout's `world`): such a pass normalises
    with the statistics of the global batch and updates the running statistics with them (`normalize_rows`, one
    row); every other pass is torch's BatchNorm. Made from a layer by `share_norms`, it keeps that layer's weights
    and buffers (the same tensors, so optimizers built before keep them), its state-dict keys and timm's
    BatchNormAct2d dropout and activation.
    """

    def __init__(self, source: _BatchNorm, layout: NormLayout) -> None:
        super().__init__(source.num_features, source.eps, source.momentum, source.affine, source.track_running_stats)
        self.weight, self.bias = source.weight, source.bias
        self.running_mean, self.running_var = source.running_mean, source.running_var
        self.num_batches_tracked = source.num_batches_tracked
        self.layout = layout
        self.drop = getattr(source, "drop", nn.Identity())
        self.act = getattr(source, "act", nn.Identity())

    def _check_input_dim(self, input: Tensor) -> None:
        assert input.dim() >= 2, f"BatchNorm takes N×C×... inputs, got {tuple(input.shape)}"

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.layout.world is not None):
            return self.act(self.drop(super().forward(x)))
        out, _ = normalize_rows(
            x,
            None,
            self.running_mean.view(1, -1),
            self.running_var.view(1, -1),
            training=True,
            momentum=self.momentum,
            eps=self.eps,
            world=self.layout.world,
        )
        self.num_batches_tracked.add_(1)
        if self.weight is not None:
            out = out * _channels(self.weight, out) + _channels(self.bias, out)
        return self.act(self.drop(out.to(x.dtype)))


def share_norms(backbone: nn.Module, layout: NormLayout) -> nn.Module:
    """Replace, in place, every plain BatchNorm layer of `backbone` that tracks running statistics by a
    SharedBatchNorm on `layout` (for synchronised training passes); return it. Per-dataset layers stay as they are."""
    for name, child in list(backbone.named_children()):
        if isinstance(child, _BatchNorm) and child.track_running_stats and not isinstance(child, SharedBatchNorm):
            setattr(backbone, name, SharedBatchNorm(child, layout))
        else:
            share_norms(child, layout)
    return backbone


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, (_BatchNorm, TaskBatchNorm)) for m in module.modules())


def check_norm(norm: str, backbone: nn.Module, backbone_name: str) -> None:
    """Raise MmptError for a per-dataset model.norm on a backbone without BatchNorm layers."""
    if norm not in ("shared", AUTO) and not has_batchnorm(backbone):
        raise MmptError(
            f"model.norm {norm} keeps per-dataset BatchNorm statistics, but backbone {backbone_name} has no BatchNorm "
            "layer (ViTs and ConvNeXt use LayerNorm, which keeps no running statistics); use model.norm shared or a "
            "BatchNorm backbone (resnet18, resnet50, densenet121, efficientnet_b0)"
        )


def convert_norms(backbone: nn.Module, num_tasks: int, norm: str, layout: NormLayout) -> nn.Module:
    """Replace, in place, every BatchNorm layer of `backbone` by a TaskBatchNorm for `num_tasks` datasets; return it.

    `norm` per_dataset_stats keeps the affine weights shared, per_dataset gives each dataset its own copy.
    """
    assert norm in PER_DATASET, f"convert_norms takes a per-dataset norm, got {norm}"
    for name, child in list(backbone.named_children()):
        if isinstance(child, _BatchNorm) and child.track_running_stats:
            setattr(backbone, name, TaskBatchNorm(child, num_tasks, layout, per_task_affine=norm == "per_dataset"))
        else:
            convert_norms(child, num_tasks, norm, layout)
    return backbone


def task_norms(module: nn.Module) -> list[tuple[str, TaskBatchNorm]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, TaskBatchNorm)]


def task_parameter_names(module: nn.Module) -> list[str]:
    """Names (within `module`) of the per-dataset affine parameters: DDP leaves them out (not every dataset is in
    every step) and the step averages their gradients itself, as it does the heads'."""
    return [
        f"{name}.{kind}.{i}"
        for name, m in task_norms(module)
        if m.per_task_affine
        for kind in ("task_weight", "task_bias")
        for i in range(len(m.task_weight))
    ]


def describe_norm(norm: str, tasks: Sequence[str], auto: bool = False, calibration_batches: int = 0) -> str:
    """The start line on normalization (`norm` as applied; `auto`: chosen by model.norm auto; `calibration_batches`:
    model.norm_calibration_batches)."""
    how = f"model.norm {'auto: ' if auto else ''}{norm}"
    if norm == "shared":
        return f"normalization: shared BatchNorm statistics ({how})"
    what = "running statistics" if norm == "per_dataset_stats" else "running statistics and affine weights"
    line = f"normalization: each of the {len(tasks)} datasets has its own BatchNorm {what} ({how})"
    if calibration_batches:
        line += (
            f", re-estimated before each validation as their average over {calibration_batches} train batches of "
            "each dataset (model.norm_calibration_batches)"
        )
    return line
