"""The mm-PT training recipe: one loop, top to bottom.

Each step samples one task (dataset) from the epoch plan, runs the shared backbone and that task's
head, weights its loss, and steps the backbone's optimizer and that head's optimizer only.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from mmpt import checkpoint as ckpt
from mmpt.config import Config, config_yaml, from_dict, to_dict
from mmpt.data.loader import plan_loader
from mmpt.data.sampler import epoch_plan, expected_updates_per_epoch
from mmpt.data.store import TaskData, cache_location, open_task
from mmpt.data.synthetic import ensure_synthetic
from mmpt.errors import MmptError
from mmpt.evaluation import autocast, evaluate_all, metrics_table, write_predictions
from mmpt.model import build_model, build_transform, resolve_backbone, unwrap
from mmpt.optim import build_optimizers, check_optimizer_name
from mmpt.report import format_table, plot_history, write_metrics
from mmpt.runtime import (
    StopSignal, configure_determinism, environment, prepare_run_dir, select_device, write_json,
    write_text,
)
from mmpt.tasks import TaskSpec, resolve_tasks
from mmpt.weighting import build_weighting

# Config keys a resumed run must share with its checkpoint: they fix the model's shape and data.
RESUME_MUST_MATCH = ("data.datasets", "data.resolution", "model.backbone", "model.img_size", "loss.ordinal")


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    position: int = 0  # steps of the current epoch's plan already taken
    step: int = 0  # optimizer steps in total
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the monitored metric last improved
    history: list = field(default_factory=list)  # per-epoch validation tables


class Stopped(Exception):
    """Training stopped on SIGINT/SIGTERM after writing last.pt."""


def open_data(cfg: Config, tasks: list[TaskSpec]) -> dict[str, TaskData]:
    """Verify and memory-map every task's splits (writing synthetic files first when asked to)."""
    root = Path(cfg.data.root).expanduser()
    if cfg.data.synthetic:
        ensure_synthetic(root, cfg.data.resolution, tasks, train_samples=cfg.data.synthetic_samples, seed=0)
    return {
        task.flag: open_task(
            root, task, cfg.data.resolution, cache_dir=cfg.data.cache_dir,
            verify_md5=cfg.data.verify, download=cfg.data.download,
        )
        for task in tasks
    }


def load_resume_checkpoint(cfg: Config) -> dict:
    """Read last.pt of the run and check that its config matches `cfg` where it must."""
    path = cfg.run_dir / "checkpoints" / ckpt.LAST
    if not path.is_file():
        raise MmptError(f"cannot resume {cfg.run_dir}: it has no checkpoints/{ckpt.LAST}; start it without --resume")
    state = ckpt.load(path)
    missing = [k for k in (ckpt.OPTIMIZERS, ckpt.WEIGHTING, ckpt.PROGRESS, ckpt.RNG) if k not in state]
    if missing:
        raise MmptError(
            f"checkpoint {path} has no {', '.join(missing)} state, so training cannot continue from it (a copy of "
            f"best.pt?); restore the {ckpt.LAST} that train.py wrote, or start a new run with --output"
        )
    saved, wanted = to_dict(from_dict(state[ckpt.CONFIG])), to_dict(cfg)
    for key in RESUME_MUST_MATCH:
        section, name = key.split(".")
        if saved[section][name] != wanted[section][name]:
            raise MmptError(
                f"checkpoint {path} was trained with {key}={saved[section][name]}, not {wanted[section][name]}; "
                "resume with the run's own config or start a new run with --output"
            )
    return state


def step_generator(seed: int, step: int) -> torch.Generator:
    """The RNG of one step's augmentation: a pure function of (seed, step), so resume replays it."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))


def run(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> dict[str, dict[str, float]]:
    """Train per `cfg`, evaluate the best checkpoint on every test split; return the test metrics table.

    Raises MmptError for anything the user can fix; Stopped after SIGINT/SIGTERM (last.pt written).
    """
    started = time.time()
    run_dir = cfg.run_dir
    # everything that can fail on bad input is checked before the run folder is touched
    state = load_resume_checkpoint(cfg) if resume else None
    tasks = resolve_tasks(cfg.data.datasets)
    resolve_backbone(cfg.model.backbone)
    check_optimizer_name(cfg.optim.name)
    data = open_data(cfg, tasks)
    configure_determinism(cfg.train.seed, cfg.determinism)
    device = select_device(cfg.train.device)
    model, losses = build_model(cfg, tasks)  # after seeding: the initial weights follow the seed
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    # a resume that changes the config (e.g. --epochs) or the machine keeps the earlier record beside the new one
    keep = f"before-resume-at-step{state[ckpt.PROGRESS]['step']}" if state is not None else None
    write_text(run_dir / "config.yaml", config_yaml(cfg), keep_previous_as=keep)
    write_json(run_dir / "env.json", environment(device, cfg.determinism), keep_previous_as=keep)
    print(f"run folder: {run_dir}   device: {device}   data cache: {cache_location(Path(cfg.data.root).expanduser(), cfg.data.cache_dir)}")

    sizes = {t.flag: len(data[t.flag].splits["train"]) for t in tasks}
    model.to(device)
    transform = build_transform(cfg, model)

    # optimizers: backbone + one per head, each schedule sized by its own updates per epoch
    sampler_kwargs = dict(
        replacement=cfg.sampler.replacement, alpha=cfg.sampler.alpha,
        steps_per_epoch=cfg.sampler.steps_per_epoch, last_batch=cfg.sampler.last_batch,
    )
    updates_per_epoch = expected_updates_per_epoch(sizes, cfg.train.batch_size, **sampler_kwargs)
    optimizers = build_optimizers(
        model.backbone, dict(model.heads), updates_per_epoch, epochs=cfg.train.epochs,
        **dataclasses.asdict(cfg.optim),
    )
    weighting = build_weighting(
        cfg.loss.weighting, sizes, cfg.loss.weighting_args, tasks_per_step=cfg.sampler.tasks_per_step, device=device,
        lr=cfg.optim.lr, seed=cfg.train.seed, shared_params=model.backbone.parameters(), weights=cfg.loss.weights,
        steps_per_epoch=len(epoch_plan(sizes, cfg.train.batch_size, cfg.train.seed, 0, **sampler_kwargs)),
    )
    progress = Progress()
    if state is not None:
        model.load_state_dict(state[ckpt.MODEL])
        optimizers.load_state_dict(state[ckpt.OPTIMIZERS])
        weighting.load_state_dict(state[ckpt.WEIGHTING])
        progress = Progress(**state[ckpt.PROGRESS])
        ckpt.set_rng_state(state[ckpt.RNG])
        print(f"resumed at epoch {progress.epoch}, step {progress.step}")

    def training_state() -> dict:
        return {
            ckpt.MODEL: unwrap(model).state_dict(), ckpt.OPTIMIZERS: optimizers.state_dict(),
            ckpt.WEIGHTING: weighting.state_dict(), ckpt.PROGRESS: dataclasses.asdict(progress),
            ckpt.RNG: ckpt.rng_state(), ckpt.CONFIG: to_dict(cfg),
        }

    checkpoints = run_dir / "checkpoints"
    writer = SummaryWriter(str(run_dir / "tb"))
    eval_kwargs = dict(
        batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers, precision=cfg.train.precision,
        pin_memory=cfg.data.pin_memory,
    )
    higher_is_better = cfg.train.monitor == "val_auc"
    with StopSignal() as stop:
        for epoch in range(progress.epoch, cfg.train.epochs):
            plan = epoch_plan(sizes, cfg.train.batch_size, cfg.train.seed, epoch, **sampler_kwargs)
            loader = plan_loader(
                {f: d.splits["train"] for f, d in data.items()}, plan, start=progress.position,
                num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory and device.type == "cuda",
                prefetch_factor=cfg.data.prefetch_factor, seed=cfg.train.seed, epoch=epoch,
            )
            model.train()
            bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                       disable=not cfg.train.progress, dynamic_ncols=True)
            tick, images_seen = time.time(), 0
            for task, images, labels in bar:
                x = transform(images.to(device, non_blocking=True), generator=step_generator(cfg.train.seed, progress.step), train=True)
                y = labels.to(device, non_blocking=True)
                with autocast(device, cfg.train.precision):
                    logits = model(x, task)
                loss = losses[task](logits.float(), y)
                if not torch.isfinite(loss):
                    raise MmptError(
                        f"loss of {task} is {loss.item()} at step {progress.step + 1}; stopped, the last good "
                        f"checkpoint is kept in {checkpoints}; lower optim.lr or set optim.clip_grad_norm"
                    )
                # one dataset per step: the loss-based methods allowed here need no features
                weighting.backward({task: loss}, logits, lambda value: value)
                optimizers.step(task)
                optimizers.zero_grad()
                progress.position += 1
                progress.step += 1
                images_seen += len(y)

                if progress.step % cfg.train.log_every_steps == 0:
                    rate = images_seen / max(time.time() - tick, 1e-9)
                    bar.set_postfix(task=task.removesuffix("mnist"), loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
                    writer.add_scalar(f"train/loss/{task}", loss.item(), progress.step)
                    writer.add_scalar("train/images_per_s", rate, progress.step)
                    for name, weight in weighting.weights().items():
                        writer.add_scalar(f"train/weight/{name}", weight.item(), progress.step)
                    for name, lr in optimizers.learning_rates().items():
                        writer.add_scalar(f"lr/{name}", lr, progress.step)
                    tick, images_seen = time.time(), 0
                if cfg.checkpoint.every_steps and progress.step % cfg.checkpoint.every_steps == 0:
                    ckpt.save(checkpoints / ckpt.LAST, training_state())
                if stop.received:
                    ckpt.save(checkpoints / ckpt.LAST, training_state())
                    raise Stopped(
                        f"{stop.received} received: stopped at step {progress.step} with {checkpoints / ckpt.LAST} "
                        f"written; continue with: python train.py --resume {run_dir}"
                    )
            bar.close()

            # validation on every task, early stopping on the monitored metric
            val = metrics_table(evaluate_all(model, data, "val", losses, transform, device, **eval_kwargs))
            for name, row in val.items():
                for metric, value in row.items():
                    writer.add_scalar(f"val/{name}/{metric}", value, epoch + 1)
            monitored = val["mean"]["auc" if higher_is_better else "loss"]
            improved = progress.best_metric is None or (
                monitored > progress.best_metric if higher_is_better else monitored < progress.best_metric
            )
            progress.epoch, progress.position = epoch + 1, 0
            progress.history.append(
                {"epoch": epoch + 1, "step": progress.step, "val": val, "weights": weighting.mean_weights()}
            )
            if improved:
                progress.best_metric, progress.best_epoch, progress.bad_epochs = monitored, epoch + 1, 0
                ckpt.save(checkpoints / ckpt.BEST, {ckpt.MODEL: unwrap(model).state_dict(), ckpt.CONFIG: to_dict(cfg),
                                                    ckpt.PROGRESS: dataclasses.asdict(progress)})
            else:
                progress.bad_epochs += 1
            ckpt.save(checkpoints / ckpt.LAST, training_state())
            write_json(run_dir / "val_history.json", {"history": progress.history})
            print(f"epoch {epoch + 1}: val mean auc {val['mean']['auc']:.4f}  loss {val['mean']['loss']:.4f}"
                  + ("  (best)" if improved else ""))
            if cfg.train.patience is not None and progress.bad_epochs >= cfg.train.patience:
                print(f"early stop: {cfg.train.monitor} did not improve for {progress.bad_epochs} epochs")
                break
    writer.close()
    final_digest = ckpt.state_digest(unwrap(model).state_dict())

    # test evaluation of the best checkpoint
    best = ckpt.load(checkpoints / ckpt.BEST)
    model.load_state_dict(best[ckpt.MODEL])
    results = evaluate_all(model, data, "test", losses, transform, device, **eval_kwargs)
    table = metrics_table(results)
    write_metrics(run_dir, table)
    write_predictions(run_dir / "predictions", results, cfg.data.resolution, "test", run=cfg.name)
    plot_history(progress.history, run_dir / "val_auc.png")
    write_json(run_dir / "summary.json", {
        "final_digest": final_digest, "best_digest": ckpt.state_digest(best[ckpt.MODEL]),
        "best_epoch": progress.best_epoch, "epochs": progress.epoch, "steps": progress.step,
        "monitor": cfg.train.monitor, "best_metric": progress.best_metric,
        "weighting": cfg.loss.weighting, "weighting_args": dict(cfg.loss.weighting_args),
        "tasks_per_step": cfg.sampler.tasks_per_step,
        "test_mean": table["mean"], "wall_time_s": round(time.time() - started, 1),
    })
    print(f"test metrics of the best checkpoint (epoch {progress.best_epoch}):\n{format_table(table)}")
    return table
