"""The mm-PT training recipe: one loop, top to bottom.

Each step takes one dataset (or several) from the epoch plan, runs the shared backbone and the heads of
the step's datasets, weights their losses, and steps the backbone's optimizer and those heads' only.
Under torchrun every rank follows the same plan on its shard of the global batch; rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from mmpt import checkpoint as ckpt
from mmpt import distributed
from mmpt.config import Config, config_yaml, from_dict, to_dict
from mmpt.data.loader import plan_loader
from mmpt.data.sampler import (
    dataset_exposure, epoch_plan, expected_updates_per_epoch, sampler_options, steps_in_epoch,
)
from mmpt.data.store import TaskData, cache_location, data_changes, open_data
from mmpt.distributed import World, agree_on_errors, any_rank, broadcast_buffers
from mmpt.errors import MmptError
from mmpt.evaluation import TaskResult, evaluate_all, metrics_table, split_loader, write_predictions
from mmpt.io import write_json, write_text
from mmpt.model import (
    MultiTaskNet, build_model, check_batch_size, load_initial_weights, resolve_backbone,
)
from mmpt.norm import check_norm_weighting, describe_norm, has_batchnorm
from mmpt.optim import check_optimizer_name
from mmpt.plots import plot_history, plot_loss_curves
from mmpt.report import format_table, write_metrics
from mmpt.runtime import (
    Interrupted, StopSignal, configure_determinism, environment, lock_run_dir, prepare_run_dir,
)
from mmpt.step import TrainStep, build_step
from mmpt.tasks import resolve_tasks
from mmpt.weighting import check_weighting

# Config keys a resume may change: where and how fast the run goes, how long, what it logs and keeps, and
# the learning rate and clipping (the fixes the NaN message suggests; the LR schedules follow the new values).
# Every other key defines the recipe (model, input, data, sampler, loss, optimizer state, seed) and must match
# the checkpoint. train.batch_size is the global batch: another world size with the same global batch is fine.
RESUME_MAY_CHANGE = frozenset({
    "name", "output", "determinism",
    "data.root", "data.cache_dir", "data.synthetic", "data.download", "data.verify", "data.num_workers",
    "data.pin_memory", "data.prefetch_factor", "data.eval_batch_size", "data.allow_changed",
    "optim.lr", "optim.head_lr", "optim.schedule", "optim.warmup_epochs", "optim.min_lr_ratio", "optim.clip_grad_norm",
    "train.epochs", "train.device", "train.patience", "train.log_every_steps", "train.progress",
})


def _leaf_keys(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as {"section.key": value}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaf_keys(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# Config keys a resumed run must share with its checkpoint (every key but those above and checkpoint.*).
RESUME_MUST_MATCH = tuple(
    key for key in _leaf_keys(to_dict(Config())) if key not in RESUME_MAY_CHANGE and not key.startswith("checkpoint.")
)


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    position: int = 0  # steps of the current epoch's plan already taken
    step: int = 0  # optimizer steps in total
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the monitored metric last improved
    done: bool = False  # training ended (all epochs, or early stopping); only the test report may remain
    world_size: int = 1  # processes that trained the last steps (the global batch is the same for any)
    history: list = field(default_factory=list)  # per-epoch train losses, validation tables and weights


class Stopped(Exception):
    """Training stopped on SIGINT/SIGTERM after writing what it needs to continue."""


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
    try:
        saved = _leaf_keys(to_dict(from_dict(state[ckpt.CONFIG])))
    except MmptError as exc:
        raise MmptError(
            f"checkpoint {path} holds a config this mmpt cannot read ({exc}); start a new run with --output"
        ) from None
    wanted = _leaf_keys(to_dict(cfg))
    changed = [key for key in RESUME_MUST_MATCH if saved.get(key) != wanted.get(key)]
    if changed:
        key = changed[0]
        raise MmptError(
            f"checkpoint {path} was trained with {key}={saved.get(key)}, not {wanted.get(key)}"
            + (f" (also {', '.join(changed[1:])} differ)" if changed[1:] else "")
            + f"; {key} cannot change mid-run: resume with the run's own config or start a new run with --output"
        )
    return state


def check_resume_data(state: dict, data: dict[str, TaskData], allow_changed: bool) -> None:
    """Refuse to resume on data files other than those the checkpoint was trained on, unless `allow_changed`."""
    changes = data_changes(state.get(ckpt.DATA, {}), data_identity(data))
    if changes and not allow_changed:
        raise MmptError(
            f"the data changed since the checkpoint was written: {'; '.join(changes)}; resume on the files it was "
            "trained on, or pass --set data.allow_changed=true to continue on the new data"
        )


def data_identity(data: dict[str, TaskData]) -> dict[str, dict]:
    """Each task's data-file identity, as a checkpoint records it."""
    return {flag: dict(task_data.identity) for flag, task_data in data.items()}


def run(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> dict[str, dict[str, float]]:
    """Train per `cfg`, evaluate the best checkpoint on every test split; return the test metrics table.

    Raises MmptError for anything the user can fix (on every rank); Stopped after SIGINT/SIGTERM.
    """
    started = time.time()
    world, device = distributed.init(cfg.train.device)
    run_dir = cfg.run_dir
    # everything that can fail on bad input is checked, on every rank, before the run folder is touched
    with agree_on_errors(world):
        state = load_resume_checkpoint(cfg) if resume else None
        tasks = resolve_tasks(cfg.data.datasets)
        resolve_backbone(cfg.model.backbone)
        check_optimizer_name(cfg.optim.name)
        check_world(cfg, world)
        check_weighting(  # e.g. an aggregator under DDP, or a missing solver
            cfg.loss.weighting, cfg.loss.weighting_args, tasks_per_step=cfg.sampler.tasks_per_step,
            world_size=world.world_size, datasets=[t.flag for t in tasks], weights=cfg.loss.weights,
        )
        check_norm_weighting(cfg.model.norm, cfg.loss.weighting)
        data = open_data(cfg.data, tasks)
        if state is not None:
            check_resume_data(state, data, cfg.data.allow_changed)
        configure_determinism(cfg.train.seed, cfg.determinism)
        model, losses = build_model(cfg, tasks)  # after seeding: the initial weights follow the seed
        check_batch_size(model, cfg.train.batch_size)
        if cfg.model.init_from and not resume:
            load_initial_weights(model, cfg.model.init_from, cfg)
        if world.is_main:
            lock_run_dir(run_dir)  # one writer per run folder, until this process ends
            prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    sizes = {t.flag: len(data[t.flag].splits["train"]) for t in tasks}
    model.to(device)
    step = build_step(cfg, model, losses, sizes, device, world)
    optimizers, weighting = step.optimizers, step.weighting
    progress = Progress(world_size=world.world_size)
    if state is not None:
        model.load_state_dict(state[ckpt.MODEL])
        optimizers.load_state_dict(state[ckpt.OPTIMIZERS])
        weighting.load_state_dict(state[ckpt.WEIGHTING])
        step.load_state_dict(state.get(ckpt.STEP, {}))
        progress = Progress(**{**state[ckpt.PROGRESS], "world_size": world.world_size})
        ckpt.set_rng_state(state[ckpt.RNG])

    def training_state() -> dict:
        return {
            ckpt.MODEL: model.state_dict(), ckpt.OPTIMIZERS: optimizers.state_dict(),
            ckpt.WEIGHTING: weighting.state_dict(), ckpt.STEP: step.state_dict(),
            ckpt.PROGRESS: dataclasses.asdict(progress), ckpt.RNG: ckpt.rng_state(), ckpt.CONFIG: to_dict(cfg),
            ckpt.DATA: data_identity(data),
        }

    checkpoints = run_dir / "checkpoints"
    saver = Saver(checkpoints / ckpt.LAST, training_state, world, cfg.checkpoint.every_minutes)
    if world.is_main:
        # a resume that changes the config (e.g. --epochs) or the machine keeps the earlier record beside the new one
        keep = f"before-resume-at-step{progress.step}" if state is not None else None
        write_text(run_dir / "config.yaml", config_yaml(cfg), keep_previous_as=keep)
        write_json(run_dir / "env.json", {**environment(device, cfg.determinism), "world_size": world.world_size},
                   keep_previous_as=keep)
        print(describe(cfg, model, sizes, device, world, data_cache=cache_location(cfg.data.root, cfg.data.cache_dir)))
        if state is not None:
            print(resumed_line(state[ckpt.PROGRESS], world))

    log = Log(run_dir, world, steps_done=progress.step)
    specs = {flag: task_data.task for flag, task_data in data.items()}
    loader_kwargs = dict(batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers,
                         pin_memory=cfg.data.pin_memory, world=world)
    val_loader = split_loader(data, "val", device, **loader_kwargs)  # built once: its workers persist
    resume_hint = f"continue with: python train.py --resume {shlex.quote(str(run_dir))}"
    with StopSignal() as stop:
        for epoch in range(progress.epoch, cfg.train.epochs):
            if progress.done:
                break
            plan = epoch_plan(sizes, cfg.train.batch_size, cfg.train.seed, epoch, **sampler_options(cfg.sampler))
            loader = plan_loader(
                {f: d.splits["train"] for f, d in data.items()}, plan, start=progress.position,
                num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory and device.type == "cuda",
                prefetch_factor=cfg.data.prefetch_factor, seed=cfg.train.seed, epoch=epoch,
                rank=world.rank, world_size=world.world_size,
            )
            model.train()
            bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                       disable=not (cfg.train.progress and world.is_main), dynamic_ncols=True)
            for parts in bar:
                step(parts, progress.step)
                progress.position += 1
                progress.step += 1
                log.images(sum(p.global_size for p in parts))
                logging = progress.step % cfg.train.log_every_steps == 0
                every_steps = cfg.checkpoint.every_steps and progress.step % cfg.checkpoint.every_steps == 0
                # across ranks, stop and time are agreed at logging intervals (one small all-reduce)
                stopping, time_due = (
                    any_rank(world, stop.received is not None, saver.due()) if logging
                    else (False, False) if world.distributed else (stop.received is not None, saver.due())
                )
                if logging or every_steps or stopping or time_due:
                    log.losses(step, progress.step, checkpoints)  # raises on a non-finite loss: nothing is saved
                if logging:
                    log.train(progress.step, optimizers.learning_rates(), weighting.weights(), bar)
                if every_steps or stopping or time_due:
                    saver.save()
                if stopping:
                    raise Stopped(f"{stop.received or 'a stop on another rank'}: stopped at step {progress.step} "
                                  f"with {checkpoints / ckpt.LAST} written; {resume_hint}")
            bar.close()
            log.losses(step, progress.step, checkpoints)

            # validation on every dataset, then early stopping on the monitored metric
            try:
                broadcast_buffers(world, model)
                val = metrics_table(evaluate_all(model, val_loader, specs, losses, step.transform, device,
                                                 precision=cfg.train.precision, world=world, stop=stop))
            except Interrupted:
                saver.save()  # the epoch's steps are kept; its validation runs again on resume
                raise Stopped(f"{stop.received or 'a stop on another rank'} during validation: "
                              f"{checkpoints / ckpt.LAST} written at step {progress.step}; {resume_hint}") from None
            improved = update_progress(progress, cfg, epoch, val, log.epoch_losses(), weighting.mean_weights())
            if improved and world.is_main:
                ckpt.save(checkpoints / ckpt.BEST, {ckpt.MODEL: model.state_dict(), ckpt.CONFIG: to_dict(cfg),
                                                    ckpt.PROGRESS: dataclasses.asdict(progress)})
            saver.save()
            log.validation(epoch + 1, val, improved)
            if world.is_main:
                write_json(run_dir / "val_history.json", {"history": progress.history})
            if progress.done:
                if world.is_main:
                    print(f"early stop: {cfg.train.monitor} did not improve for {progress.bad_epochs} epochs")
                break
        progress.done = True
        log.close()
        try:
            test_loader = split_loader(data, "test", device, **loader_kwargs)
            table = test_report(cfg, model, test_loader, specs, losses, step, device, progress, stop, started)
        except Interrupted:
            raise Stopped(f"{stop.received or 'a stop on another rank'} during the test evaluation: training is "
                          f"complete and saved; to write the test report, {resume_hint}") from None
    return table


def check_world(cfg: Config, world: World) -> None:
    """Raise MmptError when the global batch is too small to give every process images to train on."""
    # the sampler keeps every training batch at half the batch size or more, so each rank gets 2 or more images
    if world.distributed and cfg.train.batch_size < 4 * world.world_size:
        raise MmptError(
            f"train.batch_size {cfg.train.batch_size} is the global batch, split over {world.world_size} processes; "
            f"it must be at least {4 * world.world_size}: raise --batch-size or start fewer processes"
        )


class Saver:
    """Writes last.pt (rank 0 only) and tells when checkpoint.every_minutes have passed since the last write."""

    def __init__(self, path: Path, state, world: World, every_minutes: float) -> None:
        self.path, self.state, self.world = path, state, world
        self.every_s = every_minutes * 60
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.every_s > 0 and time.monotonic() - self.last >= self.every_s

    def save(self) -> None:
        if self.world.is_main:
            ckpt.save(self.path, self.state())
        self.last = time.monotonic()


class Log:
    """Train losses (read from the device once per call of `losses`), TensorBoard on rank 0, the progress bar."""

    def __init__(self, run_dir: Path, world: World, steps_done: int) -> None:
        self.world = world
        self.writer = SummaryWriter(str(run_dir / "tb")) if world.is_main else None
        self.interval: dict[str, list[float]] = {}  # task -> [loss sum, steps] since the last log line
        self.epoch: dict[str, list[float]] = {}  # the same since the epoch began
        self.first_unchecked_step = steps_done + 1
        self.tick, self.images_seen = time.time(), 0

    def images(self, count: int) -> None:
        self.images_seen += count

    def losses(self, step: TrainStep, global_step: int, checkpoints: Path) -> None:
        """Read the step's loss sums; raise MmptError if any was non-finite (then nothing more is saved)."""
        sums, nonfinite = step.read_losses()
        if nonfinite:
            bad = [t for t, (s, _) in sums.items() if not math.isfinite(s)]
            last = checkpoints / ckpt.LAST
            kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint had been written yet"
            raise MmptError(
                f"the loss of {', '.join(bad) or 'a dataset'} became NaN or infinite between steps "
                f"{self.first_unchecked_step} and {global_step}; training stopped without saving them, {kept}; "
                "lower optim.lr or set optim.clip_grad_norm"
            )
        self.first_unchecked_step = global_step + 1
        for table in (self.interval, self.epoch):
            for task, (total, count) in sums.items():
                entry = table.setdefault(task, [0.0, 0])
                entry[0] += total
                entry[1] += count

    def train(self, global_step: int, learning_rates: dict[str, float], weights: dict, bar) -> None:
        rate = self.images_seen / max(time.time() - self.tick, 1e-9)
        means = {task: total / count for task, (total, count) in self.interval.items()}
        if means:
            bar.set_postfix(loss=f"{sum(means.values()) / len(means):.3f}", img_s=f"{rate:.0f}")
        if self.writer is not None:
            for task, loss in means.items():
                self.writer.add_scalar(f"train/loss/{task}", loss, global_step)
            self.writer.add_scalar("train/images_per_s", rate, global_step)
            for name, lr in learning_rates.items():
                self.writer.add_scalar(f"lr/{name}", lr, global_step)
            for task, weight in weights.items():
                self.writer.add_scalar(f"weight/{task}", float(weight), global_step)
        self.interval = {}
        self.tick, self.images_seen = time.time(), 0

    def epoch_losses(self) -> dict[str, float]:
        """Each dataset's mean train loss over the epoch; starts the next epoch's sums."""
        means = {task: total / count for task, (total, count) in self.epoch.items()}
        self.epoch = {}
        return means

    def validation(self, epoch: int, val: dict[str, dict[str, float]], improved: bool) -> None:
        if not self.world.is_main:
            return
        for name, row in val.items():
            for metric, value in row.items():
                self.writer.add_scalar(f"val/{name}/{metric}", value, epoch)
        print(f"epoch {epoch}: val mean auc {val['mean']['auc']:.4f}  loss {val['mean']['loss']:.4f}"
              + ("  (best)" if improved else ""))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def update_progress(
    progress: Progress, cfg: Config, epoch: int, val: dict, train_loss: dict[str, float], weights: dict
) -> bool:
    """Record a finished epoch and its validation; return whether the monitored metric improved.

    The monitored loss is the unweighted mean over datasets, so a weighting cannot pick best.pt by
    changing its own weights. Sets `progress.done` when early stopping's patience has run out.
    """
    higher_is_better = cfg.train.monitor == "val_auc"
    monitored = val["mean"]["auc" if higher_is_better else "loss"]
    best = progress.best_metric
    improved = best is None or (monitored > best if higher_is_better else monitored < best)
    progress.epoch, progress.position = epoch + 1, 0
    progress.history.append({
        "epoch": epoch + 1, "step": progress.step, "train_loss": train_loss, "val": val,
        "weights": {task: float(w) for task, w in weights.items()},
    })
    if improved:
        progress.best_metric, progress.best_epoch, progress.bad_epochs = monitored, epoch + 1, 0
    else:
        progress.bad_epochs += 1
    progress.done = cfg.train.patience is not None and progress.bad_epochs >= cfg.train.patience
    return improved


def test_report(
    cfg: Config, model: MultiTaskNet, loader, specs: dict, losses: dict, step: TrainStep,
    device, progress: Progress, stop: StopSignal, started: float,
) -> dict[str, dict[str, float]]:
    """Evaluate best.pt on every test split; rank 0 writes metrics, predictions, the plot and summary.json."""
    world = step.world
    run_dir = cfg.run_dir
    final_digest = ckpt.state_digest(model.state_dict())
    # every rank's digest: a check, recorded in summary.json, that the replicas ended identical
    rank_digests = distributed.gather_objects(world, final_digest)
    # rank 0 reads best.pt and hands it to the others: on several nodes only its node has the file
    best = distributed.broadcast_object(world, ckpt.load(run_dir / "checkpoints" / ckpt.BEST)[ckpt.MODEL]
                                        if world.is_main else None)
    model.load_state_dict(best)
    results: dict[str, TaskResult] = evaluate_all(model, loader, specs, losses, step.transform, device,
                                                  precision=cfg.train.precision, world=world, stop=stop)
    table = metrics_table(results)
    if world.is_main:
        write_metrics(run_dir, table)
        write_predictions(run_dir / "predictions", results, cfg.data.resolution, "test", run=cfg.name,
                          data_root=str(cfg.data.root))
        plot_history(progress.history, run_dir / "val_auc.png")
        plot_loss_curves(progress.history, run_dir / "loss_curves.png")
        write_json(run_dir / "summary.json", {
            "final_digest": final_digest, "best_digest": ckpt.state_digest(best),
            "best_epoch": progress.best_epoch, "epochs": progress.epoch, "steps": progress.step,
            "monitor": cfg.train.monitor, "best_metric": progress.best_metric, "weighting": cfg.loss.weighting,
            "weighting_args": dict(cfg.loss.weighting_args), "tasks_per_step": cfg.sampler.tasks_per_step,
            "world_size": world.world_size, "rank_digests": rank_digests, "precision": cfg.train.precision,
            "test_mean": table["mean"], "wall_time_s": round(time.time() - started, 1),
        })
        print(f"test metrics of the best checkpoint (epoch {progress.best_epoch}):\n{format_table(table)}")
    return table


def describe(cfg: Config, model: MultiTaskNet, sizes: dict[str, int], device, world: World, data_cache: Path) -> str:
    """The run's opening lines: what will be trained, on what input, where and how."""
    batches = expected_updates_per_epoch(sizes, cfg.train.batch_size, **sampler_options(cfg.sampler))
    steps = steps_in_epoch(sizes, cfg.train.batch_size, **sampler_options(cfg.sampler))
    width = max(len(t) for t in sizes)
    lines = [f"run folder: {cfg.run_dir}   data cache: {data_cache}"]
    exposure = dataset_exposure(sizes, cfg.train.batch_size, cfg.train.epochs, seed=cfg.train.seed,
                                **sampler_options(cfg.sampler))
    lines += [f"  {t:<{width}} {sizes[t]:>9,} train images  {batches[t]:>8,.0f} batches/epoch  "
              f"{exposure[t][0]:>6.1%} of steps  {exposure[t][1]:>7.2f} passes over its images in the run"
              for t in sorted(sizes)]
    if cfg.sampler.replacement or cfg.sampler.steps_per_epoch:
        lines.append("  (batches, shares and passes are expected values: "
                     + ("sampling with replacement" + (f", alpha {cfg.sampler.alpha:g}" if cfg.sampler.alpha != 1 else "")
                        + ("; with several datasets per step, epoch 0's plan" if cfg.sampler.tasks_per_step != 1 else "")
                        if cfg.sampler.replacement else "a truncated or repeated pass (sampler.steps_per_epoch)") + ")")
    per_rank = f", about {cfg.train.batch_size / world.world_size:g} per process" if world.distributed else ""
    per_step = "" if cfg.sampler.tasks_per_step == 1 else f" per dataset, {cfg.sampler.tasks_per_step} datasets per step"
    lines.append(f"{len(sizes)} datasets, {sum(sizes.values()):,} train images, {steps:,} "
                 f"steps per epoch, batch {cfg.train.batch_size} (global{per_rank}){per_step}, {cfg.train.epochs} epochs")
    lines.append(f"loss weighting: {cfg.loss.weighting}"
                 + (f" {dict(cfg.loss.weighting_args)}" if cfg.loss.weighting_args else ""))
    lines.append(f"model: {cfg.model.backbone}, input {input_description(cfg, model)}")
    if has_batchnorm(model.backbone):
        lines.append(describe_norm(cfg.model.norm, list(sizes)))
    lines.append(f"device: {device}   world size: {world.world_size}   precision: {cfg.train.precision}"
                 + ("   channels_last" if cfg.train.channels_last else "") + ("   compiled" if cfg.train.compile else ""))
    return "\n".join(lines)


def input_description(cfg: Config, model: MultiTaskNet) -> str:
    """What the model sees, e.g. `28 px zero-padded to 224 px (input.mode pad)`."""
    source, size, mode = cfg.data.resolution, model.input_size, cfg.input.mode
    if mode == "native" or source == size:
        return f"{source} px as stored (input.mode {mode})"
    how = "zero-padded" if mode == "pad" and source < size else "resized"
    return f"{source} px {how} to {size} px (input.mode {mode}; {(size / source) ** 2:.1f}x the pixels)"


def resumed_line(saved: dict, world: World) -> str:
    line = f"resumed at epoch {saved['epoch']}, step {saved['step']}"
    before = saved.get("world_size", 1)
    if before != world.world_size:
        line += (f"; trained on {before} process(es) so far, now on {world.world_size}: the global batch is "
                 "unchanged, so the run continues with the same plan (results differ only by rounding)")
    return line
