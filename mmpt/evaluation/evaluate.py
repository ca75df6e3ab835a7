"""Evaluating a checkpoint: a checkpoint's metrics and predictions on one split of each of its datasets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mmpt.config import recorded_config
from mmpt.data.store import evaluation_data, open_data
from mmpt.errors import MmptError
from mmpt.evaluation.plots import plot_loss_curves
from mmpt.evaluation.predict import evaluate_all, metrics_table, plot_confusions, split_loader, write_predictions
from mmpt.evaluation.tables import format_table, read_history, write_metrics
from mmpt.io import check_output_folder, write_json
from mmpt.model.build import build_model, build_transform
from mmpt.model.calibration import RECALIBRATION_SEED, recalibrate
from mmpt.model.norm import has_batchnorm
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.rundir import Results, RunDir, clear_results
from mmpt.runtime.distributed import select_device
from mmpt.runtime.process import configure_determinism
from mmpt.tasks import resolve_tasks


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
    loader = split_loader(
        data,
        split,
        torch_device,
        batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory,
    )
    results = evaluate_all(
        model,
        loader,
        {f: d.task for f, d in data.items()},
        losses,
        transform,
        torch_device,
        precision=cfg.train.precision,
    )
    table = metrics_table(results)
    written = Results(output)
    run = RunDir.of_checkpoint(checkpoint)  # a run's own checkpoint: its loss curves go beside the results
    try:
        # an earlier evaluation's files (other datasets, another checkpoint) must not stand beside these
        clear_results(output)
        write_metrics(written, table)
        if recalibrated is not None:
            write_json(written.recalibration, recalibrated)
        write_predictions(
            written.predictions,
            results,
            cfg.data.resolution,
            split,
            run=cfg.name,
            data_root=str(cfg.data.root),
            weights_sha256=ckpt.state_digest(model.state_dict()),  # the weights evaluated (recalibrated: changed)
        )
        plot_confusions({t.flag: t for t in tasks}, results, written)
        if run is not None and run.val_history.is_file():
            plot_loss_curves(read_history(run.val_history), written.loss_curves)
    except OSError as exc:
        raise MmptError(
            f"cannot write the results into {output} ({exc.strerror or exc}); pass --output DIR with a writable folder"
        ) from None
    print(f"{split} metrics of {checkpoint}:\n{format_table(table)}\nwritten to {output}")
    return table
