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

import contextlib
import zlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmpt.choices import NORMS
from mmpt.data.loader import shard
from mmpt.data.sampler import near_equal_batches
from mmpt.distributed import SINGLE, World, all_reduce_mean_, differentiable_sum
from mmpt.errors import MmptError

AUTO = "auto"  # per_dataset_stats for a BatchNorm backbone trained on 2+ datasets, else shared
PER_DATASET = ("per_dataset_stats", "per_dataset")  # the settings that convert the BatchNorm layers
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


# --- moving statistics between checkpoints of different norm settings (--init-from) -----------------------------


def _layer_rows(weights: dict[str, Tensor], prefix: str, num_source: int) -> list[dict[str, Tensor]]:
    """One {mean, var, count[, weight, bias]} per source dataset of the norm layer at `prefix` (a shared layer: one
    row); weight and bias only where each dataset has its own (per_dataset), see _shared_affine."""
    mean, var = weights[prefix + "running_mean"], weights[prefix + "running_var"]
    count = weights.get(prefix + "num_batches_tracked")
    rows = []
    for s in range(num_source):
        row = {"mean": mean[s] if mean.dim() == 2 else mean, "var": var[s] if var.dim() == 2 else var}
        if count is not None:
            row["count"] = count[s] if count.dim() == 1 else count
        if prefix + "task_weight.0" in weights:
            row["weight"], row["bias"] = weights[f"{prefix}task_weight.{s}"], weights[f"{prefix}task_bias.{s}"]
        rows.append(row)
    return rows


def _shared_affine(weights: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The affine weights of the norm layer at `prefix` where every dataset shares them: one tensor each in the
    source, so copied as they are, never through a weighted mean (which moves them by rounding)."""
    if prefix + "task_weight.0" in weights or prefix + "weight" not in weights:
        return {}
    return {"weight": weights[prefix + "weight"], "bias": weights[prefix + "bias"]}


def _mixture(rows: list[dict[str, Tensor]], shares: list[float]) -> dict[str, Tensor]:
    """The statistics of the mixture of datasets with these shares (mean of means; mean of variances plus the
    spread of the means), the share-weighted mean of per-dataset affine weights and the largest batch count.
    One dataset's row is its own, as it is (no arithmetic, so no rounding)."""
    if len(rows) == 1:
        return dict(rows[0])
    total = sum(shares)
    w = [s / total for s in shares]
    mean = sum(wi * r["mean"] for wi, r in zip(w, rows))
    var = sum(wi * (r["var"] + (r["mean"] - mean) ** 2) for wi, r in zip(w, rows))
    out = {"mean": mean, "var": var}
    if "count" in rows[0]:
        out["count"] = torch.stack([r["count"] for r in rows]).max()
    if "weight" in rows[0]:
        out["weight"] = sum(wi * r["weight"] for wi, r in zip(w, rows))
        out["bias"] = sum(wi * r["bias"] for wi, r in zip(w, rows))
    return out


def norm_layer_prefixes(backbone: nn.Module) -> list[str]:
    return [f"{name}." for name, m in backbone.named_modules() if isinstance(m, (_BatchNorm, TaskBatchNorm))]


def transfer_norm_state(
    backbone: nn.Module,
    weights: dict[str, Tensor],
    source_tasks: Sequence[str],
    target_tasks: Sequence[str],
    train_sizes: dict[str, int],
) -> dict[str, Tensor]:
    """The norm entries of `backbone`'s state dict, filled from a source backbone's `weights` whose norm layers may
    be shared or per dataset (`source_tasks` in its row order).

    Rule: a target dataset (for a shared target: the set of its datasets) takes the mixture of the statistics of
    the source datasets among them, weighted by their train split sizes (`train_sizes`: the source run's own); a
    dataset the source never saw takes the size-weighted mixture of all the source's datasets, which is what a
    shared layer estimates under proportional sampling. A shared source gives its one set of statistics (and
    weights) to every dataset. Only what the source keeps per dataset is mixed: shared affine weights, and a
    target dataset's own row, are copied bit for bit.
    """
    own = backbone.state_dict()
    out: dict[str, Tensor] = {}
    modules = dict(backbone.named_modules())
    no_count = torch.zeros((), dtype=torch.long)  # a source layer without num_batches_tracked
    for prefix in norm_layer_prefixes(backbone):
        module = modules[prefix[:-1]]
        mean = weights.get(prefix + "running_mean")
        num_source = mean.shape[0] if mean is not None and mean.dim() == 2 else 1
        if mean is None or (num_source > 1 and num_source != len(source_tasks)):
            raise MmptError(f"the source checkpoint has no BatchNorm statistics at {prefix}running_mean that fit")
        rows = _layer_rows(weights, prefix, num_source)
        shared_affine = _shared_affine(weights, prefix)
        source = list(source_tasks) if num_source > 1 else None

        def pick(group: Sequence[str], rows=rows, source=source, shared_affine=shared_affine) -> dict[str, Tensor]:
            if source is None:  # a shared source layer: its one set for every group
                return {"count": no_count, **rows[0], **shared_affine}
            seen = [s for s in group if s in source] or source
            mixed = _mixture([rows[source.index(s)] for s in seen], [train_sizes[s] for s in seen])
            return {"count": no_count, **mixed, **shared_affine}

        if isinstance(module, TaskBatchNorm):
            picked = [pick([t]) for t in target_tasks]
            out[prefix + "running_mean"] = torch.stack([p["mean"] for p in picked]).to(own[prefix + "running_mean"])
            out[prefix + "running_var"] = torch.stack([p["var"] for p in picked]).to(own[prefix + "running_var"])
            out[prefix + "num_batches_tracked"] = torch.stack([p["count"] for p in picked])
            for i, p in enumerate(picked):
                if module.per_task_affine:
                    out[f"{prefix}task_weight.{i}"], out[f"{prefix}task_bias.{i}"] = p["weight"], p["bias"]
            if not module.per_task_affine and module.weight is not None:
                shared = pick(list(target_tasks))
                out[prefix + "weight"], out[prefix + "bias"] = shared["weight"], shared["bias"]
        else:
            p = pick(list(target_tasks))
            out[prefix + "running_mean"], out[prefix + "running_var"] = p["mean"], p["var"]
            out[prefix + "num_batches_tracked"] = p["count"]
            if module.affine:
                out[prefix + "weight"], out[prefix + "bias"] = p["weight"], p["bias"]
    return {k: v.clone() for k, v in out.items()}


def describe_init_rule(source_tasks: Iterable[str], target_tasks: Iterable[str], source_norm: str, norm: str) -> str:
    """One line for the start of a run initialised from another: where each dataset's statistics come from."""
    source_tasks, target_tasks = list(source_tasks), list(target_tasks)
    if source_norm == "shared":
        return (
            f"normalization: the source's shared BatchNorm statistics{' and weights' if norm != 'shared' else ''}"
            f"{' copied to every dataset' if norm != 'shared' else ''}"
        )
    unseen = [t for t in target_tasks if t not in source_tasks]
    seen = [t for t in target_tasks if t in source_tasks]
    # the source's per-dataset affine weights, where this run shares them: one dataset's, or their weighted mean
    averaged = ""
    if source_norm == "per_dataset" and norm != "per_dataset":
        group = seen or source_tasks
        averaged = (
            f"; the shared affine weights are {group[0]}'s own in the source (model.norm per_dataset)"
            if len(group) == 1
            else "; the shared affine weights are the train-size-weighted mean of the source's per-dataset ones "
            f"(model.norm per_dataset) over {', '.join(group)}"
        )
    if norm == "shared":
        named = ", ".join(seen) if seen else f"{len(source_tasks)} datasets (it has none of this run's)"
        return (
            f"normalization: shared statistics from the train-size-weighted mixture of the source's {named}{averaged}"
        )
    line = "normalization: each dataset starts from its own statistics in the source"
    if unseen:
        line += (
            f"; {', '.join(unseen)}, not in the source, from the train-size-weighted mixture of all "
            f"{len(source_tasks)} source datasets"
        )
    return line + averaged


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


# --- re-estimation: each dataset's statistics as the average over batches of its own training images -------------

RECALIBRATION_IMAGES = 2048  # evaluate.py --recalibrate-norm: default images per dataset (or its whole train split)
RECALIBRATION_SEED = 0  # which images: a fixed draw, so two recalibrations agree
# keeps the draws of the statistics' calibration during training apart from the sampler's streams
CALIBRATION_STREAM = zlib.crc32(b"norm calibration")


def recalibration_indices(train_size: int, images: int) -> np.ndarray:
    """The sorted train indices a recalibration reads: all of them, or a seeded draw of `images` without replacement."""
    if images >= train_size:
        return np.arange(train_size)
    return np.sort(np.random.default_rng(RECALIBRATION_SEED).choice(train_size, size=images, replace=False))


def calibration_batches(
    task: str, train_size: int, batches: int, batch_size: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """The train indices the calibration after epoch `epoch` (0-based) reads from `task`, batch by batch.

    min(train_size, batches * batch_size) images drawn without replacement (a permutation's prefix), cut into
    near-equal batches of at most `batch_size` (exactly `batches` of `batch_size` when the split is large
    enough), each sorted for sequential reads. A pure function of its arguments, from a NumPy stream of its own:
    no random state that training uses is read or advanced.
    """
    assert batches >= 1 and batch_size >= 1, f"calibration needs batches >= 1 and batch_size >= 1, got {batches}"
    entropy = [seed, epoch, CALIBRATION_STREAM, zlib.crc32(task.encode())]
    chosen = np.random.default_rng(np.random.SeedSequence(entropy)).permutation(train_size)
    # permuted before cutting: a file stored in class order still gives mixed batches
    return [np.sort(b) for b in near_equal_batches(chosen[: min(train_size, batches * batch_size)], batch_size)]


@torch.no_grad()
def estimate_statistics(
    model,
    splits: dict,
    batches: dict[str, list[np.ndarray]],
    transform,
    device: torch.device,
    forward_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    world: World | None = None,
) -> dict[str, int]:
    """Set each dataset's row of every per-dataset BatchNorm layer of `model` to the average of its batch statistics
    over `batches` (flag -> a list of index arrays into splits[flag], that flag's train SplitData); return the
    images read per dataset.

    The true (cumulative) average, as BatchNorm's momentum=None, PreciseBN and torch.optim.swa_utils.update_bn
    compute it: each batch is normalised with its own statistics as in training, the row becomes the mean of the
    batches' means and of their (unbiased) variances. Without gradients, with dropout off (only the norm layers in
    train mode) and without augmentation (`transform` as at evaluation), so no random number is drawn. Affine
    weights, every other weight and the counts of training batches (num_batches_tracked) stay as they are; the
    model is left in eval mode. Reads no value back from the device. `forward_context` wraps each backbone pass
    (training: the precision's autocast, as at evaluation).
    """
    layers = [m for _, m in task_norms(model.backbone)]
    assert layers, "estimate_statistics needs per-dataset BatchNorm layers (model.norm per_dataset_stats)"
    model.eval()
    used: dict[str, int] = {}
    momenta = [layer.momentum for layer in layers]
    counts = [layer.num_batches_tracked.clone() for layer in layers]
    try:
        for layer in layers:
            layer.train()
        for flag, indices in batches.items():
            row = model.norm_tasks.index(flag)
            for layer in layers:
                layer.running_mean[row].zero_()
                layer.running_var[row].fill_(1.0)
            mapped = splits[flag].open_images()
            for i, chunk in enumerate(indices):
                # weight 1/(i+1) on batch i: the cumulative average, as momentum=None gives, without reading the count
                for layer in layers:
                    layer.momentum = 1.0 / (i + 1)
                x = transform(torch.from_numpy(np.array(mapped[chunk])).to(device))
                with forward_context():
                    model.features(x, flag, world=world)
            used[flag] = sum(len(chunk) for chunk in indices)
    finally:
        for layer, momentum, count in zip(layers, momenta, counts):
            layer.momentum = momentum
            layer.num_batches_tracked.copy_(count)
        model.eval()
    return used


def recalibrate(
    model, splits: dict, transform, device: torch.device, *, images: int = RECALIBRATION_IMAGES, batch_size: int = 256
) -> dict[str, int]:
    """Re-estimate, for each dataset of `splits` (flag -> its train SplitData), every BatchNorm layer's statistics of
    `model` from that dataset's own training images (evaluate.py --recalibrate-norm); return the images used per
    dataset.

    A shared-norm model first gets per-dataset statistics (model.split_norm_statistics). The images are
    `recalibration_indices` (a fixed draw) in index order, cut into near-equal batches of at most `batch_size`;
    the statistics are their average (`estimate_statistics`), so it is deterministic.
    """
    model.split_norm_statistics(tuple(splits))
    batches = {
        flag: near_equal_batches(recalibration_indices(len(split), images), batch_size)
        for flag, split in splits.items()
    }
    return estimate_statistics(model, splits, batches, transform, device)


def calibrate_norms(
    model,
    splits: dict,
    transform,
    device: torch.device,
    *,
    batches: int,
    batch_size: int,
    seed: int,
    epoch: int,
    world: World = SINGLE,
    forward_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    synchronised: bool = False,
) -> bool:
    """Precise per-dataset statistics during training (model.norm_calibration_batches): replace each dataset's
    running statistics by their average over `batches` of its training batches (`calibration_batches` of (seed,
    epoch), `batch_size` images each: the global batch), with the weights fixed; return whether it did.

    A no-op (False) for `batches` 0 and for a model with shared statistics. Under torchrun each rank reads its
    shard of every batch, as in a training step; `synchronised` (model.sync_norm), each batch's statistics are the
    whole batch's, as on one process; else each rank's are its shard's, and the ranks' averages are averaged. Either
    way a last all-reduce leaves every rank with the same statistics. `forward_context`: as in `estimate_statistics`.
    """
    if batches == 0 or not model.per_dataset_norm:
        return False
    mine = {
        flag: [
            b[shard(len(b), world.rank, world.world_size)]
            for b in calibration_batches(flag, len(split), batches, batch_size, seed, epoch)
        ]
        for flag, split in splits.items()
    }
    sync = world if synchronised and world.distributed else None
    estimate_statistics(model, splits, mine, transform, device, forward_context, world=sync)
    all_reduce_mean_(world, [t for _, m in task_norms(model.backbone) for t in (m.running_mean, m.running_var)])
    return True


def plain_state_dict(backbone: nn.Module, row: int) -> dict[str, Tensor]:
    """The state dict of the plain timm backbone that normalises as dataset `row` of `backbone` does: each
    per-dataset layer's row `row` of statistics (and its weights), under timm's own keys. For exporting or
    comparing a per-dataset backbone as an ordinary model of one dataset."""
    out = {}
    for key, value in backbone.state_dict().items():
        layer, _, leaf = key.rpartition(".")
        owner = backbone.get_submodule(layer) if layer else backbone
        if isinstance(owner, nn.ParameterList):  # task_weight.i / task_bias.i of a per_dataset layer
            norm_layer, _, kind = layer.rpartition(".")
            if int(leaf) == row:
                out[f"{norm_layer}.{kind.removeprefix('task_')}"] = value
        elif isinstance(owner, TaskBatchNorm) and leaf in ("running_mean", "running_var", "num_batches_tracked"):
            out[key] = value[row]
        else:
            out[key] = value
    return out
