"""Export a run's backbone as a timm model, as timm writes one for the Hugging Face hub.

    python evaluate.py export runs/NAME --output exported/NAME

The folder holds
- model.safetensors, config.json: timm's own `save_for_hf` of the backbone (num_classes 0, so the model
  returns pooled features), with the input size and the mean/std the engine normalises with in
  pretrained_cfg. `timm.create_model("local-dir:DIR", pretrained=True)` builds it, no mmpt needed;
- heads.safetensors: one classification head per dataset (keys `<flag>.<parameter>`); its metadata holds,
  per dataset, the task type, the loss, the label names from medmnist.INFO and the head's outputs;
- norm.safetensors, only for a run with per-dataset BatchNorm (model.norm): each dataset's statistics (and, for
  per_dataset, affine weights) under timm's keys, `<flag>.<key>`; model.safetensors then holds the
  train-size-weighted mixture of the datasets' statistics (what --init-from gives a dataset it never saw), and
  `model.load_state_dict(dataset's entries, strict=False)` makes the timm model normalise as that dataset;
- mmpt-config.yaml: the run's resolved recipe (for `--init-from DIR` and `evaluate.py probe DIR`);
- README.md: a model card generated from the run (datasets, resolution, recipe, test metrics).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from timm.models import save_for_hf

from mmpt import backbones
from mmpt import checkpoint as ckpt
from mmpt.config import Config, recorded_config, to_dict
from mmpt.errors import MmptError
from mmpt.losses import build_loss
from mmpt.norm import norm_layer_prefixes, plain_state_dict, saved_norm, transfer_norm_state
from mmpt.recipe import load_backbone
from mmpt.rundir import RunDir
from mmpt.tasks import TASKS, resolve_tasks
from mmpt.weights import HEADS, NORM, RUN_CONFIG, TIMM_CONFIG, WEIGHTS

CARD = "README.md"
HEADS_METADATA_KEY = "mmpt_heads"


def export_run(run: Path, output: Path, *, checkpoint: str = "best", overwrite: bool = False) -> list[Path]:
    """Write the export of `run`'s `checkpoint` (best or last) into `output`; return the files written.

    Raises MmptError when the checkpoint is missing or unreadable, or `output` is a non-empty folder and
    `overwrite` is false (nothing is written then).
    """
    run, output = Path(run), Path(output)
    assert checkpoint in ("best", "last"), f"--checkpoint {checkpoint!r} reached export_run unchecked"
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise MmptError(f"{output} exists and is not empty; pass another --output, or --overwrite to replace its files")
    checkpoint_file = RunDir(run).checkpoint(checkpoint)
    state = ckpt.load(checkpoint_file)
    cfg = recorded_config(state[ckpt.CONFIG])
    weights = state[ckpt.MODEL]
    extra = sorted(k for k in weights if not k.startswith(("backbone.", "heads.")))
    if extra:  # an addition this export does not know how to carry: refuse, never drop
        raise MmptError(
            f"{run} holds model weights outside the backbone and heads ({extra[0]}, ...); this mmpt cannot export them"
        )
    backbone = backbones.create_backbone(
        cfg.model.backbone, img_size=cfg.model.img_size, dynamic_img_size=cfg.input.mode == "native"
    )
    trained = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    norm = saved_norm(trained)
    per_dataset = per_dataset_norm_entries(checkpoint_file, backbone) if norm != "shared" else {}
    if norm != "shared":  # the plain backbone gets the mixture of the datasets' statistics
        sizes = {t.flag: t.split_size("train") for t in resolve_tasks(cfg.data.datasets)}
        mixture = transfer_norm_state(backbone, trained, cfg.data.datasets, cfg.data.datasets, sizes)
        prefixes = tuple(norm_layer_prefixes(backbone))
        trained = {**{k: v for k, v in trained.items() if not k.startswith(prefixes)}, **mixture}
    backbone.load_state_dict(trained)
    size = cfg.data.resolution if cfg.input.mode == "native" else backbones.input_size(backbone, cfg.model.img_size)
    mean, std = backbones.mean_std(backbone)

    # the weights are this run's: drop what describes timm's pretrained ones (their tag, license, hub id)
    backbone.pretrained_cfg = {
        k: v
        for k, v in backbone.pretrained_cfg.items()
        if k not in ("tag", "license", "hf_hub_id", "url", "paper_ids", "origin_url")
    }
    backbone.pretrained_cfg["crop_pct"] = 1.0  # MedMNIST images are padded or resized whole, never cropped
    output.mkdir(parents=True, exist_ok=True)
    save_for_hf(
        backbone,
        str(output),
        safe_serialization=True,
        data_config={"input_size": (3, size, size), "mean": mean, "std": std},
    )
    heads, described = {}, {}
    flags = sorted({k.split(".")[1] for k in weights if k.startswith("heads.")})
    for flag in flags:
        prefix = f"heads.{flag}."
        heads.update(
            {f"{flag}.{k.removeprefix(prefix)}": v.contiguous() for k, v in weights.items() if k.startswith(prefix)}
        )
        task = TASKS[flag]
        loss = build_loss(task, ordinal=cfg.loss.ordinal)
        described[flag] = {
            "task": task.task_type,
            "loss": type(loss).__name__,
            "head": loss.head,
            "outputs": loss.num_outputs,
            "labels": list(task.class_names),
        }
    save_file(heads, str(output / HEADS), metadata={HEADS_METADATA_KEY: json.dumps(described)})
    written = [WEIGHTS, TIMM_CONFIG, HEADS]
    if per_dataset:
        save_file(per_dataset, str(output / NORM), metadata={"model.norm": norm})
        written.append(NORM)
    elif (output / NORM).is_file():
        (output / NORM).unlink()  # an --overwrite of an earlier per-dataset export
    (output / RUN_CONFIG).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (output / CARD).write_text(model_card(run, cfg, checkpoint, size, mean, std, described, state, norm))
    return [output / name for name in (*written, RUN_CONFIG, CARD)]


def per_dataset_norm_entries(checkpoint: Path, plain: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`<flag>.<timm key>` -> tensor: each dataset's BatchNorm statistics (and, for per_dataset, affine weights)
    of the per-dataset backbone in `checkpoint`, under the plain timm model's (`plain`) keys."""
    engine, _ = load_backbone(checkpoint)
    leaves = ("running_mean", "running_var", "num_batches_tracked")
    leaves += ("weight", "bias") if engine.norm == "per_dataset" else ()
    prefixes = norm_layer_prefixes(plain)
    out = {}
    for row, flag in enumerate(engine.norm_tasks):
        view = plain_state_dict(engine.backbone, row)  # what plain timm holds to normalise as this dataset
        out.update(
            {f"{flag}.{prefix}{leaf}": view[prefix + leaf].contiguous() for prefix in prefixes for leaf in leaves}
        )
    return out


def model_card(
    run: Path, cfg: Config, checkpoint: str, size: int, mean, std, heads: dict, state: dict, norm: str = "shared"
) -> str:
    """The README.md of an export: what the backbone was trained on and how, its test metrics, how to load it."""
    progress = state.get(ckpt.PROGRESS, {}) if isinstance(state.get(ckpt.PROGRESS), dict) else {}
    lines = [
        "---",
        "library_name: timm",
        "tags: [image-feature-extraction, timm, medmnist, mmpt]",
        "---",
        "",
        f"# {cfg.name}: {backbones.resolve_backbone(cfg.model.backbone)} pre-trained on MedMNIST+ by mmpt",
        "",
        f"A {backbones.resolve_backbone(cfg.model.backbone)} backbone trained with one head per dataset "
        f"({'multi-domain multi-task pre-training' if len(heads) > 1 else 'one dataset'}), "
        f"exported from `{run}` ({checkpoint} checkpoint"
        + (f", epoch {progress['epoch']}" if progress.get("epoch") else "")  # best.pt's epoch is the best one
        + ").",
        "",
        "## Use",
        "",
        "```python",
        "import timm, torch",
        "",
        'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()',
        "config = timm.data.resolve_data_config({}, model=model)  # input size, mean, std below",
        f"features = model(torch.randn(1, 3, {size}, {size}))  # 1 × {state_features(state)} pooled features",
        "```",
        "",
        "Fine-tune or probe it with mmpt: `python train.py --set model.init_from=THIS_FOLDER ...`, "
        "`python evaluate.py probe THIS_FOLDER --method linear`.",
        "",
        "## Input",
        "",
        f"- images: MedMNIST+ at {cfg.data.resolution} px, grey images repeated to 3 channels, scaled to [0, 1]",
        f"- {input_line(cfg, size)}",
        f"- normalised with mean {tuple(round(m, 4) for m in mean)} and std {tuple(round(s, 4) for s in std)} "
        "(config.json, pretrained_cfg)",
        "",
        *norm_card_lines(norm),
        "## Training recipe",
        "",
        f"- datasets: {', '.join(heads)}",
        f"- backbone {cfg.model.backbone} (pretrained start: {cfg.model.pretrained}), "
        f"loss weighting {cfg.loss.weighting}, ordinal loss {cfg.loss.ordinal}",
        f"- optimizer {cfg.optim.name}, lr {cfg.optim.lr}, schedule {cfg.optim.schedule}, "
        f"batch {cfg.train.batch_size}, "
        f"epochs {cfg.train.epochs}, seed {cfg.train.seed}, precision {cfg.train.precision}",
        f"- the whole recipe: `{RUN_CONFIG}`; it retrains with `python train.py --config {RUN_CONFIG}` "
        "(data.root and output as on the training machine: set them with --data-root and --output)",
        "",
    ]
    lines += [
        *test_metrics_lines(run),
        "",
        "## Heads",
        "",
        f"`{HEADS}` holds one head per dataset (keys `<dataset>.<parameter>`); its metadata "
        f"(`{HEADS_METADATA_KEY}`) gives each head's task type, loss, outputs and label names (medmnist.INFO).",
        "",
        f"Exported by mmpt on {time.strftime('%Y-%m-%d', time.gmtime())}.",
    ]
    return "\n".join(lines) + "\n"


def norm_card_lines(norm: str) -> list[str]:
    """What the BatchNorm statistics of model.safetensors are (a per-dataset run: which ones, where the rest are)."""
    if norm == "shared":
        return []
    return [
        "## Normalization",
        "",
        f"The run kept each dataset's own BatchNorm statistics (model.norm {norm}). `{WEIGHTS}` holds their "
        "train-size-weighted mixture (mean of means, variance with the spread of the means), the statistics mmpt's "
        f"--init-from gives a dataset the run never saw. `{NORM}` holds each dataset's own, keyed "
        "`<dataset>.<key>`; to normalise as one dataset does:",
        "",
        "```python",
        "from safetensors.torch import load_file",
        "",
        f'own = {{k.partition(".")[2]: v for k, v in load_file("{NORM}").items() if k.startswith("breastmnist.")}}',
        "model.load_state_dict(own, strict=False)",
        "```",
        "",
    ]


def state_features(state: dict) -> str:
    head_weights = [v for k, v in state[ckpt.MODEL].items() if k.startswith("heads.") and v.ndim == 2]
    return str(head_weights[0].shape[1]) if head_weights else "F"


def input_line(cfg: Config, size: int) -> str:
    if cfg.input.mode == "native" or cfg.data.resolution == size:
        return f"input {size} px as stored"
    how = "zero-padded" if cfg.input.mode == "pad" and cfg.data.resolution < size else "resized"
    return f"{how} to {size} px (input.mode {cfg.input.mode})"


def test_metrics_lines(run: Path) -> list[str]:
    """The run's test metrics (metrics.json), with the intervals of compare.json in the run folder where it has them."""
    results = RunDir(run).results
    metrics_path = results.metrics
    if not metrics_path.is_file():
        return ["## Test metrics", "", "The run has no metrics.json (training did not reach its test report)."]
    table = json.loads(metrics_path.read_text())
    intervals = {}
    compare_path = results.compare_files[0]
    if compare_path.is_file():
        try:
            compared = json.loads(compare_path.read_text())
            mine = [r for r in compared["runs"] if Path(r["path"]).resolve() == run.resolve()]
            intervals = mine[0]["datasets"] if mine else {}
        except (ValueError, KeyError, TypeError):
            intervals = {}
    names = [m for m in ("auc", "acc", "balanced_acc", "kappa") if any(m in row for row in table.values())]
    out = [
        "## Test metrics",
        "",
        "Best checkpoint on each test split"
        + (" with 95% intervals from `evaluate.py compare` (compare.json)" if intervals else "")
        + ".",
        "",
        "| dataset | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for flag, row in table.items():
        cells = []
        for m in names:
            value = row.get(m)
            cell = "-" if value is None else f"{value:.4f}"
            ci = intervals.get(flag, {}).get(m)
            if ci and value is not None:
                cell += f" [{ci['ci_low']:.4f}, {ci['ci_high']:.4f}]"
            cells.append(cell)
        out.append(f"| {flag} | " + " | ".join(cells) + " |")
    return out
