"""The training state as one component, as torchtitan's CheckpointManager and torchtune's recipe state are.

`TrainingState` owns what a resumed run needs (model, optimizers, weighting method, step, progress, RNG, config,
data identity) behind `state_dict`/`load_state_dict`; it writes last.pt and best.pt, decides when (`due`: every
N steps, every M minutes, at epoch ends and on a stop) and keeps early stopping's record (`end_epoch`). Resume
checks (`load_resume_checkpoint`, `check_resume_data`) refuse a checkpoint the run cannot continue from.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from torch import nn

from mmpt import checkpoint as ckpt
from mmpt import distributed
from mmpt.config import Config, recipe_changes, recorded_config, to_dict
from mmpt.data.store import TaskData, data_changes
from mmpt.distributed import World, any_rank
from mmpt.errors import MmptError
from mmpt.rundir import RunDir
from mmpt.step import TrainStep


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


@dataclass(frozen=True)
class Due:
    """What the loop does after a step: log a line, write last.pt, stop (losses are read before any of them)."""

    log: bool = False
    save: bool = False
    stop: bool = False


class TrainingState:
    """Progress, early stopping, the checkpoint's layout and cadence of one run (rank 0 writes the files)."""

    def __init__(self, cfg: Config, world: World, model: nn.Module, step: TrainStep, data: dict[str, TaskData]) -> None:
        self.cfg, self.world, self.model, self.step = cfg, world, model, step
        self.data_identity = data_identity(data)
        self.progress = Progress(world_size=world.world_size)
        run = RunDir(cfg.run_dir)
        self.last, self.best = run.last, run.best
        self.every_s = cfg.checkpoint.every_minutes * 60
        self.saved_at = time.monotonic()
        self.resume_hint = distributed.resume_command(cfg.run_dir)

    def state_dict(self) -> dict:
        """The checkpoint's layout: every key a resumed run reads back."""
        return {
            ckpt.MODEL: self.model.state_dict(),
            ckpt.OPTIMIZERS: self.step.optimizers.state_dict(),
            ckpt.WEIGHTING: self.step.weighting.state_dict(),
            ckpt.STEP: self.step.state_dict(),
            ckpt.PROGRESS: dataclasses.asdict(self.progress),
            ckpt.RNG: ckpt.rng_state(),
            ckpt.CONFIG: to_dict(self.cfg),
            ckpt.DATA: self.data_identity,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state[ckpt.MODEL])
        self.step.optimizers.load_state_dict(state[ckpt.OPTIMIZERS])
        self.step.weighting.load_state_dict(state[ckpt.WEIGHTING])
        self.step.load_state_dict(state.get(ckpt.STEP, {}))
        self.progress = Progress(**{**state[ckpt.PROGRESS], "world_size": self.world.world_size})
        ckpt.set_rng_state(state[ckpt.RNG])

    def advance(self) -> None:
        """Count one step taken."""
        self.progress.position += 1
        self.progress.step += 1

    def due(self, stop_received: bool) -> Due:
        """After a step: log every train.log_every_steps, write last.pt every checkpoint.every_steps, every
        checkpoint.every_minutes or on a stop. Across ranks, stop and time are agreed at logging intervals only
        (one small all-reduce), so that every rank takes the same decision without a per-step sync."""
        step = self.progress.step
        log = step % self.cfg.train.log_every_steps == 0
        every_steps = bool(self.cfg.checkpoint.every_steps) and step % self.cfg.checkpoint.every_steps == 0
        if log:
            stop, time_due = any_rank(self.world, stop_received, self._time_due())
        elif self.world.distributed:
            stop, time_due = False, False
        else:
            stop, time_due = stop_received, self._time_due()
        return Due(log=log, save=every_steps or stop or time_due, stop=stop)

    def _time_due(self) -> bool:
        return self.every_s > 0 and time.monotonic() - self.saved_at >= self.every_s

    def save(self) -> None:
        """Write last.pt (rank 0) and restart the checkpoint clock."""
        if self.world.is_main:
            ckpt.save(self.last, self.state_dict())
        self.saved_at = time.monotonic()

    def end_epoch(self, epoch: int, val: dict, train_loss: dict[str, float], weights: dict[str, float]) -> bool:
        """Record a finished epoch and its validation, write best.pt when the monitored metric improved and last.pt
        always; return whether it improved.

        The monitored loss is the unweighted mean over datasets, so a weighting cannot pick best.pt by
        changing its own weights. Sets `progress.done` when early stopping's patience has run out.
        """
        progress, cfg = self.progress, self.cfg
        higher_is_better = cfg.train.monitor == "val_auc"
        monitored = val["mean"]["auc" if higher_is_better else "loss"]
        best = progress.best_metric
        improved = best is None or (monitored > best if higher_is_better else monitored < best)
        progress.epoch, progress.position = epoch + 1, 0
        progress.history.append(
            {
                "epoch": epoch + 1,
                "step": progress.step,
                "train_loss": train_loss,
                "val": val,
                "weights": {task: float(w) for task, w in weights.items()},
            }
        )
        if improved:
            progress.best_metric, progress.best_epoch, progress.bad_epochs = monitored, epoch + 1, 0
        else:
            progress.bad_epochs += 1
        progress.done = cfg.train.patience is not None and progress.bad_epochs >= cfg.train.patience
        if improved and self.world.is_main:
            ckpt.save(
                self.best,
                {
                    ckpt.MODEL: self.model.state_dict(),
                    ckpt.CONFIG: to_dict(cfg),
                    ckpt.PROGRESS: dataclasses.asdict(progress),
                },
            )
        self.save()
        return improved

    def stopped(self, signal: str | None, during: str) -> Stopped:
        """The Stopped error of a stop `during` "training", "validation" or "test" (signal: None for another rank's)."""
        reason = signal or "a stop on another rank"
        if during == "training":
            return Stopped(
                f"{reason}: stopped at step {self.progress.step} with {self.last} written; {self.resume_hint}"
            )
        if during == "validation":
            return Stopped(
                f"{reason} during validation: {self.last} written at step {self.progress.step}; {self.resume_hint}"
            )
        assert during == "test", f"unknown stage {during!r}"
        return Stopped(
            f"{reason} during the test evaluation: training is complete and saved; to write the test "
            f"report, {self.resume_hint}"
        )


def load_resume_checkpoint(cfg: Config) -> dict:
    """Read last.pt of the run and check that its config matches `cfg` where it must."""
    path = RunDir(cfg.run_dir).last
    if not path.is_file():
        raise MmptError(
            f"cannot resume {cfg.run_dir}: it has no {path.relative_to(cfg.run_dir).as_posix()}; start it without "
            "--resume"
        )
    state = ckpt.load(path)
    missing = [k for k in (ckpt.OPTIMIZERS, ckpt.WEIGHTING, ckpt.PROGRESS, ckpt.RNG) if k not in state]
    if missing:
        raise MmptError(
            f"checkpoint {path} has no {', '.join(missing)} state, so training cannot continue from it (a copy of "
            f"best.pt?); restore the {ckpt.LAST} that train.py wrote, or start a new run with --output"
        )
    try:
        saved = recorded_config(state[ckpt.CONFIG])
    except MmptError as exc:
        raise MmptError(
            f"checkpoint {path} holds a config this mmpt cannot read ({exc}); start a new run with --output"
        ) from None
    changed = recipe_changes(saved, cfg)  # every key but config.RESUME_MAY_CHANGE, whole values
    if changed:
        key, before, after = changed[0]
        raise MmptError(
            f"checkpoint {path} was trained with {key}={before}, not {after}"
            + (f" (also {', '.join(k for k, _, _ in changed[1:])} differ)" if changed[1:] else "")
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
