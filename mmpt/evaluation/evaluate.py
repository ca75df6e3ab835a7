"""Evaluating a checkpoint: a checkpoint's metrics and predictions on one split of each of its datasets."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

from mmpt.config import recorded_config
from mmpt.data.store import evaluation_data, open_data
from mmpt.errors import MmptError
from mmpt.evaluation import temperature
from mmpt.evaluation.plots import plot_loss_curves
from mmpt.evaluation.predict import PICTURES, TaskResult, evaluate_all, scored, split_loader, write_results
from mmpt.evaluation.tables import format_table, read_history
from mmpt.io import check_output_folder, write_json
from mmpt.model.build import build_model, build_transform
from mmpt.model.calibration import RECALIBRATION_SEED, recalibrate
from mmpt.model.losses import TaskLoss
from mmpt.model.norm import has_batchnorm
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.rundir import Results, RunDir, clear_results
from mmpt.runtime.distributed import select_device
from mmpt.runtime.process import configure_determinism
from mmpt.tasks import TaskSpec, resolve_tasks


def evaluate_checkpoint(
    checkpoint: Path,
    output: Path,
    *,
    split: str = "test",
    datasets: str | None = None,
    data_root: str | None = None,
    cache_dir: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    recalibrate_images: int | None = None,
    calibrate: str | None = None,
    ece_bins: int | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate `checkpoint` per dataset; write metrics.{json,csv,md} and medmnist-format predictions to `output`.

    Data: `data_root` or the run's data.root; the unpacked cache in `cache_dir`, else the run's
    data.cache_dir when reading the run's own data.root, else {data_root}/.mmpt-cache. Evaluation never
    generates or downloads data, so a checkpoint's data.synthetic or data.download cannot make it write
    data files. Returns the metrics table (dataset -> metric -> value, with "mean"). Raises MmptError for
    an unreadable or damaged checkpoint (its digest is verified), datasets the checkpoint has no head for,
    missing data, or an `output` that is not (and cannot become) a writable folder.

    `recalibrate_images` (--recalibrate-norm): first re-estimate each evaluated dataset's BatchNorm statistics on
    up to that many of its own training images (recalibrate; a shared-norm model gets per-dataset statistics),
    in memory only: the checkpoint file is never written. recalibration.json in `output` records what was done.

    `ece_bins` (--ece-bins): the ECE's bins instead of the run's evaluation.ece_bins.

    `calibrate` ("temperature"): also fit one temperature per dataset (per label of ChestMNIST) on the validation
    split (mmpt.evaluation.temperature) and write the evaluation of the temperature-scaled scores into
    `output`/calibrated/ (metrics, per-class tables, pictures, medmnist-format predictions), the temperatures into
    `output`/temperature.json; the raw results beside them are those of an evaluation without it. Raises MmptError,
    before anything is written, when a dataset's validation split has one class only.
    """
    check_output_folder(output)
    state = ckpt.load(checkpoint)
    cfg = recorded_config(state[ckpt.CONFIG])
    trained = resolve_tasks(cfg.data.datasets)
    tasks = trained if datasets is None else resolve_tasks(datasets)
    missing = [t.flag for t in tasks if t not in trained]
    if missing:
        raise MmptError(
            f"checkpoint {checkpoint} has no head for {', '.join(missing)}; "
            f"choose among {', '.join(t.short for t in trained)}"
        )
    data_cfg = dataclasses.replace(
        evaluation_data(cfg.data, data_root, cache_dir), eval_batch_size=batch_size or cfg.data.eval_batch_size
    )
    cfg = dataclasses.replace(cfg, data=data_cfg)
    if ece_bins is not None:
        cfg = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, ece_bins=ece_bins))
    data = open_data(cfg.data, tasks, evaluation=True)
    configure_determinism(cfg.train.seed, cfg.determinism, cfg.train.tf32)
    torch_device = select_device(device)

    model, losses = build_model(cfg, trained)
    model.load_state_dict(state[ckpt.MODEL])
    model.to(torch_device)
    transform = build_transform(cfg, model, torch_device)
    recalibrated = None
    if recalibrate_images is not None:
        if not has_batchnorm(model.backbone):
            raise MmptError(
                f"--recalibrate-norm re-estimates BatchNorm statistics, but {cfg.model.backbone} has no "
                "BatchNorm layer (ViTs and ConvNeXt use LayerNorm); evaluate without it"
            )
        trained_norm = model.norm  # as applied (model.norm auto resolved), before recalibration splits it
        used = recalibrate(
            model,
            {f: d.splits["train"] for f, d in data.items()},
            transform,
            torch_device,
            images=recalibrate_images,
            batch_size=cfg.data.eval_batch_size,
        )
        recalibrated = {
            "from": trained_norm,
            "images_per_dataset": used,
            "images_requested": recalibrate_images,
            "batch_size": cfg.data.eval_batch_size,
            "seed": RECALIBRATION_SEED,
            "split": "train",
            "rule": "cumulative average (BatchNorm momentum=None) over near-equal batches, each normalised with its "
            "own statistics; no gradient, dropout off; affine weights unchanged",
        }
        print(
            "recalibrated BatchNorm statistics per dataset on its own train images: "
            + ", ".join(f"{flag} {n:,}" for flag, n in used.items())
        )
    specs = {f: d.task for f, d in data.items()}
    evaluate = functools.partial(
        evaluate_all,
        model,
        tasks=specs,
        losses=losses,
        transform=transform,
        device=torch_device,
        precision=cfg.train.precision,
        ece_bins=cfg.evaluation.ece_bins,
        keep_logits=calibrate is not None,
    )
    loader_of = functools.partial(
        split_loader,
        data,
        device=torch_device,
        batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory,
    )
    results = evaluate(loader_of(split))
    calibration = None
    if calibrate is not None:
        fitted_on = results if split == "val" else evaluate(loader_of("val"))
        calibration = temperature_scaling(specs, losses, fitted_on, results, cfg.evaluation.ece_bins)
    written = Results(output)
    run = RunDir.of_checkpoint(checkpoint)  # a run's own checkpoint: its loss curves go beside the results
    where = dict(
        resolution=cfg.data.resolution,
        split=split,
        run=cfg.name,
        data_root=str(cfg.data.root),
        weights_sha256=ckpt.state_digest(model.state_dict()),  # the weights evaluated (recalibrated: changed)
        checkpoint=str(Path(checkpoint).resolve()),
        bins=cfg.evaluation.ece_bins,
    )
    try:
        # an earlier evaluation's files (other datasets, another checkpoint) must not stand beside these
        clear_results(output)
        table = write_results(written, specs, results, pictures=PICTURES, **where)
        if recalibrated is not None:
            write_json(written.recalibration, recalibrated)
        if run is not None and run.val_history.is_file():
            plot_loss_curves(read_history(run.val_history), written.loss_curves)
        if calibration is not None:
            record, calibrated = calibration
            write_json(written.temperatures, record)
            calibrated_specs = {f: specs[f] for f in calibrated}
            # the predicted classes are the raw ones (a temperature keeps them): no second confusion matrix
            calibrated_table = write_results(
                written.calibrated, calibrated_specs, calibrated, pictures=("reliability",), **where
            )
    except OSError as exc:
        raise MmptError(
            f"cannot write the results into {output} ({exc.strerror or exc}); pass --output DIR with a writable folder"
        ) from None
    print(f"{split} metrics of {checkpoint}:\n{format_table(table)}\nwritten to {output}")
    if calibration is not None:
        print(format_temperatures(record))
        print(
            f"{split} metrics of the temperature-scaled scores:\n{format_table(calibrated_table)}\n"
            f"written to {written.calibrated.path}"
        )
    return table


def temperature_scaling(
    specs: dict[str, TaskSpec],
    losses: dict[str, TaskLoss],
    fitted_on: dict[str, TaskResult],
    results: dict[str, TaskResult],
    bins: int,
) -> tuple[dict, dict[str, TaskResult]]:
    """Fit a temperature per dataset on `fitted_on` (the validation results, with logits) and apply it to `results`:
    (temperature.json's record, the calibrated results of the datasets a temperature can serve). Raises MmptError
    when none can, or a validation split has one class only."""
    refused = {f: why for f in results if (why := temperature.refusal(specs[f], losses[f])) is not None}
    if len(refused) == len(results):
        raise MmptError(
            f"--calibrate temperature: no dataset of this evaluation can be calibrated ({'; '.join(refused.values())})"
            "; evaluate without --calibrate"
        )
    fitted = {
        f: temperature.fit(specs[f], fitted_on[f].logits, fitted_on[f].labels) for f in results if f not in refused
    }
    calibrated = {}
    for f, temperatures in fitted.items():
        r = results[f]
        scores = temperature.apply(losses[f], r.logits, temperatures)
        total, count = losses[f].sum_and_count(temperature.scaled(r.logits, temperatures), torch.as_tensor(r.labels))
        calibrated[f] = scored(specs[f], r.labels, scores, float(total) / float(count), r.grade_rule, bins)
    record = {
        "method": "temperature",
        "fitted_on": "val",
        "objective": "the mean negative log-likelihood of the validation labels (per label for multi-label tasks)",
        "search": {"low": temperature.LOWEST, "high": temperature.HIGHEST, "method": "bounded Brent on log T"},
        "datasets": {f: t.record() for f, t in fitted.items()},
        "not_calibrated": refused,
    }
    return record, calibrated


def format_temperatures(record: dict) -> str:
    """The fitted temperatures and what they did to the validation NLL, one dataset per line."""
    lines = ["temperature scaling, fitted on val (NLL before -> after):"]
    for flag, entry in record["datasets"].items():
        t = entry["temperature"]
        shown = f"{t:.3f}" if isinstance(t, float) else f"{min(t):.3f}..{max(t):.3f} over {len(t)} labels"
        bound = (
            ", at the search bound: the val split is separated (nearly) perfectly, so the NLL kept falling"
            if entry["at_search_bound"]
            else ""
        )
        lines.append(
            f"  {flag}: T {shown}  (val NLL {entry['val_nll_before']:.4f} -> {entry['val_nll_after']:.4f}{bound})"
        )
    lines += [f"  {flag}: not calibrated: {why}" for flag, why in record["not_calibrated"].items()]
    return "\n".join(lines)
