"""BatchNorm statistics across runs: how a run started from another (--init-from) takes the source's statistics
(the init-from rule: `transfer_norm_state`, `describe_init_rule`), and one dataset's row of a per-dataset backbone
as a plain timm state dict (`plain_state_dict`, for export)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmpt.errors import MmptError
from mmpt.model.norm import TaskBatchNorm


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
