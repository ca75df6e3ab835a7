"""The mm-PT training loop: one loop, top to bottom.

Each step takes one dataset (or several) from the epoch plan, runs the shared backbone and the heads of
the step's datasets, weights their losses, and steps the backbone's optimizer and those heads' only.
Under torchrun every rank follows the same plan on its shard of the global batch; rank 0 writes files.
What a run trains with is built by `mmpt.training.setup.set_up`; the training state (progress, checkpoints and
their cadence, early stopping, resume checks) is `mmpt.training.state.TrainingState`; what the run prints and logs
is `mmpt.training.log`.
"""

from __future__ import annotations

import time

from tqdm import tqdm

from mmpt.config import Config, config_yaml
from mmpt.data.store import cache_location
from mmpt.evaluation.plots import plot_history, plot_loss_curves
from mmpt.evaluation.predict import TaskResult, evaluate_all, metrics_table, write_results
from mmpt.evaluation.tables import format_table
from mmpt.io import read_json, write_json, write_text
from mmpt.model.weights import checkpoint_path
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.rundir import RunDir, lock_run_dir, prepare_run_dir
from mmpt.runtime import distributed
from mmpt.runtime.distributed import agree_on_errors, broadcast_buffers
from mmpt.runtime.process import Interrupted, StopSignal, configure_determinism, environment
from mmpt.training.build import calibrate_step
from mmpt.training.log import Log, describe, resumed_line, write_conflicts
from mmpt.training.setup import Setup, set_up
from mmpt.training.state import Stopped, TrainingState, load_resume_checkpoint

__all__ = ["Stopped", "run"]


def run(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> dict[str, dict[str, float]]:
    """Train per `cfg`, evaluate the best checkpoint on every test split; return the test metrics table.

    Raises MmptError for anything the user can fix (on every rank); Stopped after SIGINT/SIGTERM.
    """
    started = time.time()
    configure_determinism(cfg.train.seed, cfg.determinism, cfg.train.tf32)  # before CUDA starts: cuBLAS reads it then
    world, device = distributed.init(cfg.train.device)
    run_dir = cfg.run_dir
    run = RunDir(run_dir)
    # everything that can fail on bad input is checked, on every rank, before the run folder is touched
    with agree_on_errors(world):
        saved = load_resume_checkpoint(cfg) if resume else None
        setup = set_up(cfg, world, device, saved=saved)
        if world.is_main:
            lock_run_dir(run_dir)  # one writer per run folder, until this process ends
            prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    model, train_step = setup.model, setup.step
    state = TrainingState(cfg, world, model, train_step, setup.data)
    if saved is not None:
        with agree_on_errors(world):
            state.load_state_dict(saved)  # refuses a checkpoint without every part (a copy of best.pt)
    progress = state.progress
    if saved is None:  # what this run starts from, recorded for good (summary.json "start")
        progress.start = start_record(cfg, model)
    if world.is_main:
        # a resume that changes the config (e.g. --epochs) or the machine keeps the earlier record beside the new one
        resumed = saved is not None
        write_text(
            run.config,
            config_yaml(cfg),
            keep_previous_as=run.before_resume(run.config, progress.step) if resumed else None,
        )
        write_json(
            run.env,
            {**environment(device, cfg.determinism), "world_size": world.world_size},
            keep_previous_as=run.before_resume(run.env, progress.step) if resumed else None,
        )
        print(
            describe(
                cfg,
                model,
                setup.sampler,
                device,
                world,
                data_cache=cache_location(cfg.data.root, cfg.data.cache_dir),
                train_step=train_step,
            )
        )
        if saved is not None:
            print(resumed_line(saved[ckpt.PROGRESS], world, cfg, model, cuda_states=state.parts[ckpt.RNG].cuda))

    log = Log(run.tb, world, steps_done=progress.step, epoch_sums=progress.epoch_loss_sums)
    val_loader = setup.eval_loader("val")  # built once: its workers persist
    with StopSignal() as stop:
        for epoch in range(progress.epoch, cfg.train.epochs):
            if progress.done:
                break
            loader = setup.train_loader(epoch, start=progress.position)
            model.train()
            train_step.freeze_backbone(epoch < cfg.train.probe_epochs)  # LP-FT: the heads alone first
            bar = tqdm(
                loader,
                total=len(loader),
                desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                disable=not (cfg.train.progress and world.is_main),
                dynamic_ncols=True,
            )
            for parts in bar:
                train_step(parts, progress.step)
                state.advance()
                log.images(sum(p.global_size for p in parts))
                due = state.due(stop.received is not None)
                if due.log or due.save:
                    log.losses(train_step, progress.step, state.last)  # raises on a non-finite loss: nothing is saved
                if due.log:
                    log.train(
                        progress.step,
                        train_step.optimizers.learning_rates(),
                        train_step.method_run.dataset_weights(),
                        bar,
                    )
                if due.save:
                    state.save()
                if due.stop:
                    raise state.stopped(stop.received, "training")
            bar.close()
            log.losses(train_step, progress.step, state.last)

            # precise per-dataset BatchNorm statistics, then validation on every dataset, then early stopping
            try:
                calibrate_step(cfg, train_step, setup.train_splits, epoch=epoch)
                broadcast_buffers(world, model)
                val = metrics_table(evaluate(setup, val_loader, stop))
            except Interrupted:
                state.save()  # the epoch's steps are kept; its validation runs again on resume
                raise state.stopped(stop.received, "validation") from None
            improved = state.end_epoch(epoch, val, log.epoch_losses(), train_step.method_run.mean_dataset_weights())
            log.validation(epoch + 1, val, improved, progress.history[-1]["monitor"])
            if world.is_main:
                write_json(run.val_history, {"history": progress.history})
                if train_step.conflicts is not None:
                    write_json(run.gradient_conflicts, train_step.conflicts.record_json())
            if progress.done:
                if world.is_main:
                    bad_epochs = state.early_stopping.bad_epochs
                    print(f"early stop: {cfg.train.monitor} did not improve for {bad_epochs} epochs")
                break
        progress.done = True
        log.close()
        if world.is_main and train_step.conflicts is not None:
            write_conflicts(run, train_step.conflicts)
        try:
            table = test_report(setup, state, stop, started)
        except Interrupted:
            raise state.stopped(stop.received, "test") from None
    return table


def start_record(cfg: Config, model) -> dict:
    """The weights a run starts from: their digest (mmpt.runs.checkpoint.state_digest), and with model.init_from its
    source and, where the source is a run folder, the digest of the best.pt it copied."""
    record = {"weights_sha256": ckpt.state_digest(model.state_dict()), "init_from": cfg.model.init_from}
    if cfg.model.init_from:
        source = RunDir.of_checkpoint(checkpoint_path(cfg.model.init_from))
        if source is not None and source.summary.is_file():
            record["init_from_best_digest"] = read_json(source.summary, "train the source run again").get("best_digest")
    return record


def evaluate(setup: Setup, loader, stop: StopSignal | None = None) -> dict[str, TaskResult]:
    """Every dataset of `loader` (val or test) through the run's model as its step transforms and computes it."""
    step = setup.step
    return evaluate_all(
        setup.model,
        loader,
        setup.specs,
        setup.losses,
        step.transform,
        setup.device,
        precision=step.precision,
        world=setup.world,
        stop=stop,
        ece_bins=setup.cfg.evaluation.ece_bins,
    )


def test_report(setup: Setup, state: TrainingState, stop: StopSignal, started: float) -> dict[str, dict[str, float]]:
    """Evaluate best.pt on every test split; rank 0 writes metrics, predictions, the plot and summary.json."""
    cfg, world, model, train_step = setup.cfg, setup.world, setup.model, setup.step
    run = RunDir(cfg.run_dir)
    progress, early_stopping = state.progress, state.early_stopping
    final_digest = ckpt.state_digest(model.state_dict())
    # every rank's digest: a check, recorded in summary.json, that the replicas ended identical
    rank_digests = distributed.gather_objects(world, final_digest)
    # rank 0 reads best.pt and hands it to the others: on several nodes only its node has the file
    best = distributed.broadcast_object(world, ckpt.load(state.best)[ckpt.MODEL] if world.is_main else None)
    model.load_state_dict(best)
    best_digest = ckpt.state_digest(best)
    results = evaluate(setup, setup.eval_loader("test"), stop)
    table = metrics_table(results)
    if world.is_main:
        write_results(
            run.results,
            setup.specs,
            results,
            resolution=cfg.data.resolution,
            split="test",
            run=cfg.name,
            data_root=str(cfg.data.root),
            weights_sha256=best_digest,
            checkpoint=str(state.best.resolve()),
            pictures=(),  # evaluate.py draws them; a run's test report stays quick
        )
        plot_history(progress.history, run.val_auc_plot)
        plot_loss_curves(progress.history, run.results.loss_curves)
        write_json(
            run.summary,
            {
                "final_digest": final_digest,
                "best_digest": best_digest,
                "best_epoch": early_stopping.best_epoch,
                "epochs": progress.epoch,
                "steps": progress.step,
                "monitor": cfg.train.monitor,
                "best_metric": early_stopping.best_metric,
                "weighting": cfg.loss.weighting,
                "weighting_args": dict(cfg.loss.weighting_args),
                "tasks_per_step": cfg.sampler.tasks_per_step,
                "jacobian": train_step.jacobian,  # the path a gradient-based method took (null: none)
                "start": progress.start,  # the weights training started from
                "world_size": world.world_size,
                "rank_digests": rank_digests,
                "precision": train_step.precision,
                "test_mean": table["mean"],
                "wall_time_s": round(time.time() - started, 1),
            },
        )
        print(f"test metrics of the best checkpoint (epoch {early_stopping.best_epoch}):\n{format_table(table)}")
    return table
