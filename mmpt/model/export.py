"""Export a run's backbone as a timm model, as timm writes one for the Hugging Face hub.

    python evaluate.py export runs/NAME --output exported/NAME

The folder holds
- model.safetensors, config.json: timm's own `save_for_hf` of the backbone (num_classes 0, so the model
  returns pooled features), with the input size and the mean/std the engine normalises with in
  pretrained_cfg. `timm.create_model("local-dir:DIR", pretrained=True)` builds it, no mmpt needed;
- heads.safetensors: one classification head per dataset (keys `<flag>.<parameter>`); its metadata holds,
  per dataset, the task type, the loss, the label names from medmnist.INFO and the head's outputs;
- norm.safetensors, only for a run with per-dataset BatchNorm (model.norm): each dataset's statistics (and, for
  per_dataset, affine weights) under timm's keys, `<flag>.<key>`, and in its metadata the run's own train split
  sizes; model.safetensors then holds, for what is per dataset, the mixture weighted by those sizes (what
  --init-from gives a dataset it never saw), and every other tensor exactly as trained; plain timm thus normalises
  with the mixture, and `model.load_state_dict(dataset's entries, strict=False)` makes it normalise as that dataset;
- mmpt-config.yaml: the run's resolved recipe (for `--init-from DIR` and `evaluate.py probe DIR`);
- README.md: a model card generated from the checkpoint exported (datasets and their train sizes, resolution,
  recipe, its epoch and step and whether the run finished, the test metrics of exactly these weights).

Every file is written as the engine writes files (mmpt.io: atomically, with the mode the umask gives).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save
from timm.models import save_for_hf

from mmpt.config import Config, recorded_config, to_dict
from mmpt.errors import MmptError
from mmpt.io import atomic_write, check_output_folder, markdown_table, write_advice, write_bytes, write_text
from mmpt.model import backbones
from mmpt.model.build import backbone_of
from mmpt.model.losses import build_loss
from mmpt.model.norm import saved_norm
from mmpt.model.transfer import norm_layer_prefixes, plain_state_dict, transfer_norm_state
from mmpt.model.weights import HEADS, NORM, RUN_CONFIG, TIMM_CONFIG, TRAIN_IMAGES_METADATA, WEIGHTS, train_sizes
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.names import DATA_RECORD
from mmpt.runs.rundir import Results, RunDir
from mmpt.tasks import TASKS

CARD = "README.md"
HEADS_METADATA_KEY = "mmpt_heads"


def export_run(run: Path, output: Path, *, checkpoint: str = "best", overwrite: bool = False) -> list[Path]:
    """Write the export of `run`'s `checkpoint` (best or last) into `output`; return the files written.

    Every tensor that is one tensor in the trained model is copied bit for bit; only what a per-dataset
    normalization keeps per dataset is mixed for the plain timm model (weighted by the run's own train split
    sizes, recorded in norm.safetensors and the card). Files get the mode the rest of the run folder gets (the
    umask). Raises MmptError when the checkpoint is missing or unreadable, `output` is (or lies inside) a file, or
    it is a non-empty folder and `overwrite` is false (nothing is written then).
    """
    run, output = Path(run), Path(output)
    assert checkpoint in ("best", "last"), f"--checkpoint {checkpoint!r} reached export_run unchecked"
    check_output_folder(output)
    if output.is_dir() and any(output.iterdir()) and not overwrite:
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
    sizes, sizes_recorded = train_sizes(state, cfg.data.datasets)
    per_dataset = per_dataset_norm_entries(state, backbone) if norm != "shared" else {}
    if norm != "shared":  # the plain backbone gets the mixture of what is per dataset; the rest as it is
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
    card = model_card(
        run,
        cfg,
        checkpoint,
        state,
        CardFacts(size=size, mean=mean, std=std, heads=described, norm=norm, sizes=sizes, recorded=sizes_recorded),
    )
    try:
        output.mkdir(parents=True, exist_ok=True)
        # timm's own writer, in a scratch folder; the files are then written as every file of a run is (mmpt.io)
        with tempfile.TemporaryDirectory(prefix=".export-", dir=output) as scratch:
            save_for_hf(
                backbone,
                scratch,
                safe_serialization=True,
                data_config={"input_size": (3, size, size), "mean": mean, "std": std},
            )
            for name in (WEIGHTS, TIMM_CONFIG):
                with open(Path(scratch) / name, "rb") as source:
                    atomic_write(output / name, lambda f, source=source: shutil.copyfileobj(source, f))
        write_bytes(output / HEADS, save(heads, metadata={HEADS_METADATA_KEY: json.dumps(described)}))
        written = [WEIGHTS, TIMM_CONFIG, HEADS]
        if per_dataset:
            metadata = {"model.norm": norm, TRAIN_IMAGES_METADATA: json.dumps(sizes)}
            write_bytes(output / NORM, save(per_dataset, metadata=metadata))
            written.append(NORM)
        elif (output / NORM).is_file():
            (output / NORM).unlink()  # an --overwrite of an earlier per-dataset export
    except OSError as exc:
        raise MmptError(f"cannot write the export into {output} ({exc.strerror or exc}); {write_advice(exc)}") from None
    write_text(output / RUN_CONFIG, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_text(output / CARD, card)
    return [output / name for name in (*written, RUN_CONFIG, CARD)]


def per_dataset_norm_entries(state: dict, plain: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`<flag>.<timm key>` -> tensor: each dataset's BatchNorm statistics (and, for per_dataset, affine weights)
    of the per-dataset backbone in the checkpoint `state`, under the plain timm model's (`plain`) keys."""
    engine, _ = backbone_of(state)
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


@dataclass(frozen=True)
class CardFacts:
    """What the model card says besides the run's recipe: the export's input, heads, normalization and sizes."""

    size: int  # the input side
    mean: tuple
    std: tuple
    heads: dict  # flag -> its description (heads.safetensors' metadata)
    norm: str  # the norm the saved backbone holds (shared, per_dataset_stats, per_dataset)
    sizes: dict[str, int]  # each dataset's train images (the mixture's weights)
    recorded: bool  # whether `sizes` are the run's own (its checkpoint records them) or medmnist's official ones


def model_card(run: Path, cfg: Config, checkpoint: str, state: dict, facts: CardFacts) -> str:
    """The README.md of an export: what the backbone was trained on and how, which checkpoint it is (its epoch,
    step, and whether the run finished), the test metrics of exactly these weights, and how to load it."""
    name = backbones.resolve_backbone(cfg.model.backbone)
    lines = [
        "---",
        "library_name: timm",
        "tags: [image-feature-extraction, timm, medmnist, mmpt]",
        "---",
        "",
        f"# {cfg.name}: {name} pre-trained on MedMNIST+ by mmpt",
        "",
        f"A {name} backbone trained with one head per dataset "
        f"({'multi-domain multi-task pre-training' if len(facts.heads) > 1 else 'one dataset'}), "
        f"exported from `{run}`: {checkpoint_line(run, cfg, checkpoint, state)}",
        "",
        "## Use",
        "",
        "```python",
        "import timm, torch",
        "",
        'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()',
        "config = timm.data.resolve_data_config({}, model=model)  # input size, mean, std below",
        f"features = model(torch.randn(1, 3, {facts.size}, {facts.size}))  "
        f"# 1 × {state_features(state)} pooled features",
        "```",
        "",
        "Fine-tune or probe it with mmpt: `python train.py --set model.init_from=THIS_FOLDER ...`, "
        "`python evaluate.py probe THIS_FOLDER --method linear`.",
        "",
        "## Input",
        "",
        f"- images: MedMNIST+ at {cfg.data.resolution} px, grey images repeated to 3 channels, scaled to [0, 1]",
        f"- {input_line(cfg, facts.size)}",
        f"- normalised with mean {tuple(round(m, 4) for m in facts.mean)} and std "
        f"{tuple(round(s, 4) for s in facts.std)} (config.json, pretrained_cfg)",
        "",
        *norm_card_lines(facts.norm, list(facts.heads)),
        "## Training recipe (its config)",
        "",
        f"- datasets: {', '.join(facts.heads)}",
        "- train images: "
        + ", ".join(f"{flag} {n:,}" for flag, n in facts.sizes.items())
        + (
            " (the splits the run trained on)"
            if facts.recorded
            else " (medmnist's official sizes: this run's checkpoint predates the record of its own)"
        ),
        f"- backbone {cfg.model.backbone} (pretrained start: {cfg.model.pretrained}), "
        f"loss weighting {cfg.loss.weighting}, ordinal loss {cfg.loss.ordinal}",
        f"- optimizer {cfg.optim.name}, lr {cfg.optim.lr}, schedule {cfg.optim.schedule}, "
        f"batch {cfg.train.batch_size}, "
        f"epochs {cfg.train.epochs}, seed {cfg.train.seed}, precision {cfg.train.precision}",
        f"- the whole recipe: `{RUN_CONFIG}`; it retrains with `python train.py --config {RUN_CONFIG}` "
        "(data.root and output as on the training machine: set them with --data-root and --output)",
        "",
        *test_metrics_lines(run, checkpoint, state),
        "",
        "## Heads",
        "",
        f"`{HEADS}` holds one head per dataset (keys `<dataset>.<parameter>`); its metadata "
        f"(`{HEADS_METADATA_KEY}`) gives each head's task type, loss, outputs and label names (medmnist.INFO).",
        "",
        f"Exported by mmpt on {time.strftime('%Y-%m-%d', time.gmtime())}.",
    ]
    return "\n".join(lines) + "\n"


def checkpoint_line(run: Path, cfg: Config, checkpoint: str, state: dict) -> str:
    """Which weights these are: the checkpoint, its epoch and step, and whether the run finished."""
    progress = state.get(ckpt.PROGRESS) if isinstance(state.get(ckpt.PROGRESS), dict) else {}
    epoch, step, position = progress.get("epoch"), progress.get("step"), progress.get("position") or 0
    where = f"`checkpoints/{RunDir(run).checkpoint(checkpoint).name}`"
    if isinstance(epoch, int) and isinstance(step, int):
        where += f", written at step {step:,} after epoch {epoch} of {cfg.train.epochs}"
        if position:
            where += f" and {position:,} steps of epoch {epoch + 1}"
        if checkpoint == "best":
            where += f" (the epoch of the best validation {cfg.train.monitor.removeprefix('val_')})"
    else:
        where += " (its epoch and step are not recorded)"
    if RunDir(run).summary.is_file():
        return where + "; the run finished."
    return where + (
        "; the run is unfinished (it has no summary.json): these are the weights at that point, not its final ones."
    )


def norm_card_lines(norm: str, datasets: list[str]) -> list[str]:
    """What the BatchNorm statistics of model.safetensors are (a per-dataset run: which ones, where the rest are)."""
    if norm == "shared":
        return []
    what = "statistics" if norm == "per_dataset_stats" else "statistics and affine weights"
    return [
        "## Normalization",
        "",
        f"The run kept each dataset's own BatchNorm {what} (model.norm {norm}); every other weight is one tensor "
        f"shared by all datasets and is exported as it is. `{WEIGHTS}` holds, for what is per dataset, the "
        "train-size-weighted mixture over the run's datasets (statistics: mean of means, variance with the spread "
        f"of the means{'; affine weights: their weighted mean' if norm == 'per_dataset' else ''}), weighted by the "
        "train images listed below. So plain timm normalises every input with the mixture: its features are "
        "none of the datasets' own (they are what mmpt's --init-from gives a dataset the run never saw). "
        f"`{NORM}` holds each dataset's own, keyed `<dataset>.<key>`; to normalise as one dataset did in training:",
        "",
        "```python",
        "from safetensors.torch import load_file",
        "",
        f'own = {{k.partition(".")[2]: v for k, v in load_file("{NORM}").items() if k.startswith("{datasets[0]}.")}}',
        "model.load_state_dict(own, strict=False)  # own's keys are all the model's: each one loads",
        "```",
        "",
        f"(any of {', '.join(datasets)} in place of {datasets[0]}).",
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


def evaluation_of(run: RunDir, digest: str) -> Results | None:
    """The run's test evaluation of exactly the weights with this digest (mmpt.runs.checkpoint.state_digest): its test
    report (best.pt's, at the top of the run folder) or evaluate.py's eval/test, as their predictions' data.json
    records the weights evaluated (a test report written before that record: as summary.json names best.pt's
    digest). None when no test evaluation of these weights exists."""
    for results in (run.results, run.eval("test")):
        evaluated = _read_json(results.predictions / DATA_RECORD).get("weights_sha256")
        if evaluated is None and results == run.results:
            evaluated = _read_json(run.summary).get("best_digest")
        if evaluated == digest and results.metrics.is_file():
            return results
    return None


def _read_json(path: Path) -> dict:
    """A JSON object mmpt wrote, or {} where it is absent or unreadable (the card then claims nothing from it)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def test_metrics_lines(run: Path, checkpoint: str, state: dict) -> list[str]:
    """The test metrics of the exported weights (with compare.json's intervals where the run folder has them for
    its test report), or a line saying that none were computed and how to compute them."""
    folder = RunDir(run)
    results = evaluation_of(folder, ckpt.state_digest(state[ckpt.MODEL]))
    if results is None:
        return [
            "## Test metrics",
            "",
            f"No test metrics of these weights were computed. Evaluate them with `python evaluate.py {run} "
            f"--checkpoint {folder.checkpoint(checkpoint)}` (results in {folder.eval('test').path}), then export "
            "again: the card reports only the metrics of the weights it exports.",
        ]
    table = json.loads(results.metrics.read_text())
    intervals = {}
    compare_path = results.compare_files[0]
    if results == folder.results and compare_path.is_file():  # compare read this test report's predictions
        try:
            compared = json.loads(compare_path.read_text())
            mine = [r for r in compared["runs"] if Path(r["path"]).resolve() == Path(run).resolve()]
            intervals = mine[0]["datasets"] if mine else {}
        except (ValueError, KeyError, TypeError):
            intervals = {}
    shown = ("auc", "acc", "balanced_acc", "kappa", "ece", "brier", "nll")
    names = [m for m in shown if any(m in row for row in table.values())]
    where = results.metrics.relative_to(run).as_posix() if results.metrics.is_relative_to(run) else results.metrics
    out = [
        "## Test metrics",
        "",
        f"These weights on each test split (`{where}`)"
        + (" with 95% intervals from `evaluate.py compare` (compare.json)" if intervals else "")
        + ".",
        "",
    ]
    rows = []
    for flag, row in table.items():
        cells = [flag]
        for m in names:
            value = row.get(m)
            cell = "-" if value is None else f"{value:.4f}"
            ci = intervals.get(flag, {}).get(m)
            if ci and value is not None and ci.get("ci_low") is not None and ci.get("ci_high") is not None:
                cell += f" [{ci['ci_low']:.4f}, {ci['ci_high']:.4f}]"
            cells.append(cell)
        rows.append(cells)
    out += markdown_table(["dataset", *names], rows).splitlines()
    if any(m in names for m in ("ece", "brier", "nll")):
        out += [
            "",
            "ece (expected calibration error over equal-width confidence bins), brier and nll say whether a predicted "
            "probability comes true as often as it says; lower is better.",
        ]
    digest = ckpt.state_digest(state[ckpt.MODEL])
    # evaluate.py --calibrate writes into eval/test, whichever evaluation the table above came from
    return out + next(filter(None, (calibrated_lines(r, digest) for r in (results, folder.eval("test")))), [])


def calibrated_lines(results: Results, digest: str) -> list[str]:
    """The calibration of these weights after temperature scaling, where `evaluate.py --calibrate temperature`
    evaluated exactly them (its calibrated/ folder and temperature.json): the temperatures and the test ece, brier
    and nll before and after."""
    calibrated = results.calibrated
    record = _read_json(results.temperatures)
    if _read_json(calibrated.predictions / DATA_RECORD).get("weights_sha256") != digest or not record:
        return []
    before, after = _read_json(results.metrics), _read_json(calibrated.metrics)
    rows = []
    for flag, entry in record.get("datasets", {}).items():
        t = entry.get("temperature")
        shown = f"{t:.3f}" if isinstance(t, float) else f"{min(t):.3f}..{max(t):.3f} (per label)"
        rows.append(
            [
                flag,
                shown,
                *(
                    f"{before.get(flag, {}).get(m, float('nan')):.4f} -> {after.get(flag, {}).get(m, float('nan')):.4f}"
                    for m in ("ece", "brier", "nll")
                ),
            ]
        )
    if not rows:
        return []
    return [
        "",
        "### After temperature scaling",
        "",
        "One temperature per dataset (per label for multi-label), fitted on the validation split by `evaluate.py "
        "--calibrate temperature`; the predicted classes, and so the accuracy, are unchanged. Test values before -> "
        "after:",
        "",
        *markdown_table(["dataset", "temperature", "ece", "brier", "nll"], rows).splitlines(),
        *(f"- {flag}: not calibrated ({why})" for flag, why in record.get("not_calibrated", {}).items()),
    ]
