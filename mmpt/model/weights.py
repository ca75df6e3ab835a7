"""Reading saved weights of any kind: a run folder (its best checkpoint), a checkpoint file, or a folder written
by `evaluate.py export`, for `--init-from`, evaluation and probes.

Low in the stack beside mmpt.runs.checkpoint, as timm reads weights in `_hub.py` beside `save_for_hf`: the export
*writer* and its model card live in mmpt.model.export, and the file names of the format both use live here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from mmpt.config import Config, recorded_config, to_dict
from mmpt.config.settings import load_yaml
from mmpt.data.store import TRAIN_IMAGES
from mmpt.errors import MmptError
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.members import is_export
from mmpt.runs.names import EXPORT_HEADS, EXPORT_NORM, EXPORT_RUN_CONFIG, EXPORT_TIMM_CONFIG, EXPORT_WEIGHTS
from mmpt.runs.rundir import RunDir, in_use
from mmpt.tasks import resolve_tasks

# The files of an export folder (mmpt.model.export writes them; mmpt.runs.names spells them)
WEIGHTS, TIMM_CONFIG, HEADS, NORM = EXPORT_WEIGHTS, EXPORT_TIMM_CONFIG, EXPORT_HEADS, EXPORT_NORM
RUN_CONFIG = EXPORT_RUN_CONFIG
# norm.safetensors' metadata: the run's own train split sizes, by which model.safetensors' statistics are mixed
TRAIN_IMAGES_METADATA = "mmpt_train_images"


def checkpoint_path(source: str | Path) -> Path:
    """A run folder means its checkpoints/best.pt; anything else is taken as a checkpoint file."""
    source = Path(source)
    return RunDir(source).best if source.is_dir() else source


def train_sizes(state: dict, datasets: Sequence[str]) -> tuple[dict[str, int], bool]:
    """(each dataset's train images, recorded): the sizes of the train splits the run trained on, as its
    checkpoint's data record holds them (an export keeps them in norm.safetensors), and True; for a record
    without them (written before mmpt kept them), medmnist.INFO's official sizes and False."""
    record = state.get(ckpt.DATA) if isinstance(state.get(ckpt.DATA), dict) else {}
    sizes = {flag: (record.get(flag) or {}).get(TRAIN_IMAGES) for flag in datasets}
    if all(isinstance(n, int) and n > 0 for n in sizes.values()):
        return sizes, True
    return {t.flag: t.split_size("train") for t in resolve_tasks(tuple(datasets))}, False


def require_weights(source: str | Path) -> None:
    """Raise MmptError (as reading it would) unless `source` is an export folder or names a checkpoint file that
    exists (a run folder: its checkpoints/best.pt), of a run that has finished and is not training now (see
    check_finished_source); a cheap check before work that reads it later."""
    if not is_export(source) and not checkpoint_path(source).is_file():
        raise ckpt.missing_error(checkpoint_path(source))
    check_finished_source(source)


def check_finished_source(source: str | Path) -> None:
    """Raise MmptError when `source` (model.init_from) is a run folder, or a checkpoint in one, whose run is training
    now or has not finished: its best.pt is an intermediate one, which a run started from it would never name. An
    export, or a checkpoint file outside a run folder, is taken as given."""
    if is_export(source):
        return
    run = RunDir.of_checkpoint(checkpoint_path(source))
    if run is None:
        return
    if in_use(run.path):
        raise MmptError(
            f"model.init_from {source}: {run.path} is training now, so its best.pt may still change; wait until it "
            "has finished, then start this run"
        )
    if not run.summary.is_file():
        raise MmptError(
            f"model.init_from {source}: {run.path} has not finished (no {run.summary.name}), so its best.pt is an "
            f"intermediate one; finish it first (python train.py --resume {run.path}), or copy the checkpoint out of "
            "its run folder to start from it as it is"
        )


def read_weights(source: str | Path) -> tuple[Path, dict]:
    """(path, checkpoint dict) of a run folder (its best.pt), a checkpoint file, or a folder written by
    `evaluate.py export` (read as the checkpoint it came from: model weights and config).

    Raises MmptError when the checkpoint or a file of the export cannot be read (mmpt.runs.checkpoint.load).
    """
    if is_export(source):
        return Path(source), read_export(source)
    path = checkpoint_path(source)
    return path, ckpt.load(path)


def read_export_config(path: Path) -> Config:
    """The recipe of the run an export came from."""
    return recorded_config(load_yaml((Path(path) / RUN_CONFIG).read_text()))


def read_export_heads(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The exported heads: per dataset, its state dict."""
    heads: dict[str, dict[str, torch.Tensor]] = {}
    file = Path(path) / HEADS
    if file.is_file():
        for key, value in load_file(str(file)).items():
            flag, _, name = key.partition(".")
            heads.setdefault(flag, {})[name] = value
    return heads


def read_export(path: Path) -> dict:
    """An export read as a checkpoint's model and config (what --init-from and probe read from a run).

    Raises MmptError when a file of the export cannot be read.
    """
    path = Path(path)
    try:
        backbone = load_file(str(path / WEIGHTS))
        heads = read_export_heads(path)
        cfg = read_export_config(path)
    except (OSError, SafetensorError, yaml.YAMLError, ValueError) as exc:
        raise MmptError(
            f"{path} is not a readable mmpt export ({str(exc).splitlines()[0][:160]}); export the run again"
        ) from None
    norm_file = path / NORM
    data = {}
    if norm_file.is_file():  # per-dataset statistics back into the engine's layout: T×C rows, task_* weights
        try:
            with safe_open(str(norm_file), "pt") as f:
                sizes = json.loads((f.metadata() or {}).get(TRAIN_IMAGES_METADATA, "{}"))
            data = {flag: {TRAIN_IMAGES: n} for flag, n in sizes.items()}
            backbone = per_dataset_backbone(backbone, load_file(str(norm_file)), cfg.data.datasets)
        except (OSError, SafetensorError, KeyError, ValueError, AttributeError) as exc:
            raise MmptError(
                f"{norm_file} is not readable as this export's per-dataset statistics "
                f"({str(exc).splitlines()[0][:160]}); export the run again"
            ) from None
    model = {f"backbone.{k}": v for k, v in backbone.items()}
    model.update({f"heads.{flag}.{k}": v for flag, head in heads.items() for k, v in head.items()})
    return {ckpt.CONFIG: to_dict(cfg), ckpt.MODEL: model, ckpt.DATA: data}


def per_dataset_backbone(plain: dict[str, torch.Tensor], norm: dict[str, torch.Tensor], datasets) -> dict:
    """A plain backbone state dict with the per-dataset entries of norm.safetensors, as the engine stores a
    per-dataset backbone: each layer's statistics stacked per dataset (in `datasets` order), and for per_dataset
    its affine weights as task_weight.i / task_bias.i."""
    out = dict(plain)
    first = f"{datasets[0]}."
    layers = sorted({k.removeprefix(first).rpartition(".")[0] for k in norm if k.startswith(first)})
    for layer in layers:
        for leaf in ("running_mean", "running_var", "num_batches_tracked"):
            out[f"{layer}.{leaf}"] = torch.stack([norm[f"{flag}.{layer}.{leaf}"] for flag in datasets])
        if f"{first}{layer}.weight" in norm:
            for leaf in ("weight", "bias"):
                out.pop(f"{layer}.{leaf}", None)
                for i, flag in enumerate(datasets):
                    out[f"{layer}.task_{leaf}.{i}"] = norm[f"{flag}.{layer}.{leaf}"]
    return out
