"""The training state as a mapping of stateful parts, as torchtitan's CheckpointManager takes `states={...}`.

`TrainingState.parts` maps each checkpoint key to a part with `state_dict()`/`load_state_dict()`: the model, the
optimizers, the weighting method, the training step (fp16 scaler), progress, early stopping, the RNG states, and
two records (the config and the data's identity). Saving, loading and the check that a checkpoint holds every part
iterate that one mapping; best.pt is the subset BEST_PARTS of it. The state also decides when to write last.pt
(`due`: every N steps, every M minutes, at epoch ends and on a stop). Resume checks (`load_resume_checkpoint`,
`check_resume_data`) refuse a checkpoint the run cannot continue from.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from torch import nn

from mmpt.config import Config, fixed_key_changes, recorded_config, to_dict
from mmpt.data.store import TaskData, data_changes
from mmpt.errors import MmptError
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.rundir import RunDir
from mmpt.runtime import distributed
from mmpt.runtime.distributed import World, any_rank
from mmpt.training.build import monitor_reference
from mmpt.training.monitor import HIGHER_IS_BETTER, monitored
from mmpt.training.step import TrainStep

# what best.pt holds: the weights and what their readers (evaluate, export, --init-from, probes) need to know
BEST_PARTS = (ckpt.MODEL, ckpt.CONFIG, ckpt.PROGRESS, ckpt.EARLY_STOPPING, ckpt.DATA)  # DATA: the train sizes


class Stateful(Protocol):
    """A part of the training state."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# Progress fields added after a checkpoint format was released (an earlier checkpoint lacks them) and their defaults
ADDED_LATER = {"epoch_loss_sums": dict, "start": dict}


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    position: int = 0  # steps of the current epoch's plan already taken
    step: int = 0  # optimizer steps in total
    done: bool = False  # training ended (all epochs, or early stopping); only the test report may remain
    world_size: int = 1  # processes that trained the last steps (the global batch is the same for any)
    history: list = field(default_factory=list)  # per-epoch train losses, validation tables and weights
    # each dataset's [train loss sum, steps] since the epoch began (mmpt.training.log.Log's, the same object), so a
    # resumed epoch's mean train loss is the uninterrupted one's
    epoch_loss_sums: dict = field(default_factory=dict)
    start: dict = field(default_factory=dict)  # the weights training started from: their digest, model.init_from's

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; world_size stays this run's (the saved one names who trained so far)."""
        for name in (f.name for f in dataclasses.fields(self) if f.name != "world_size"):
            setattr(self, name, state[name] if name in state or name not in ADDED_LATER else ADDED_LATER[name]())


@dataclass
class EarlyStopping:
    """The best epoch of the monitored validation metric so far and the epochs since (train.monitor, train.patience).

    The patience is the run's current setting (a resume may change it), not part of the state. With LP-FT
    (train.probe_epochs) the patience counts fine-tuning epochs only, so the probe cannot end a run.
    """

    higher_is_better: bool
    patience: int | None
    probe_epochs: int = 0  # epochs 1..probe_epochs improve the best but never count against the patience
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the monitored metric last improved
    reference: dict | None = None  # train.monitor val_delta_m's reference values (dataset -> auc, acc), as read

    def update(self, epoch: int, metric: float) -> bool:
        """Record epoch `epoch`'s (1-based) monitored value; return whether it improved on the best."""
        best = self.best_metric
        improved = best is None or (metric > best if self.higher_is_better else metric < best)
        if improved:
            self.best_metric, self.best_epoch, self.bad_epochs = metric, epoch, 0
        elif epoch > self.probe_epochs:
            self.bad_epochs += 1
        return improved

    @property
    def stop(self) -> bool:
        """Whether the patience has run out."""
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "reference": self.reference,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; a run monitored against a reference continues only against the same values."""
        saved = state.get("reference")  # absent from checkpoints before val_delta_m: they had no reference
        if saved != self.reference:
            raise MmptError(
                "train.monitor_reference's runs give other validation values than when this run started "
                f"({saved} then, {self.reference} now), so best.pt would be chosen by two criteria; restore the "
                "reference runs, or start over with --overwrite"
            )
        self.best_metric, self.best_epoch, self.bad_epochs = (
            state["best_metric"],
            state["best_epoch"],
            state["bad_epochs"],
        )


class RNGState:
    """Python, NumPy and torch (CPU and CUDA) random states. After a load, `cuda` is (GPU states restored, GPU states
    in the checkpoint): a machine with fewer GPUs restores as many as it has."""

    def __init__(self) -> None:
        self.cuda: tuple[int, int] = (0, 0)

    def state_dict(self) -> dict:
        return ckpt.rng_state()

    def load_state_dict(self, state: dict) -> None:
        self.cuda = ckpt.set_rng_state(state)


class Record:
    """A part a checkpoint carries for its readers and for the resume checks (the config, the data's identity).

    Loading restores nothing: `load_resume_checkpoint` and `check_resume_data` compared it with the run before.
    """

    def __init__(self, value: dict) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return self.value

    def load_state_dict(self, state: dict) -> None:
        pass


class Stopped(Exception):
    """Training stopped on SIGINT/SIGTERM/SIGUSR2 after writing what it needs to continue; `signal` names the
    signal this process received (None: a stop agreed with another rank)."""

    def __init__(self, message: str, signal: str | None = None) -> None:
        super().__init__(message)
        self.signal = signal


@dataclass(frozen=True)
class Due:
    """What the loop does after a step: log a line, write last.pt, stop (losses are read before any of them)."""

    log: bool = False
    save: bool = False
    stop: bool = False


class TrainingState:
    """Every stateful part of one run, the checkpoints made of them and their cadence (rank 0 writes the files)."""

    def __init__(
        self, cfg: Config, world: World, model: nn.Module, train_step: TrainStep, data: dict[str, TaskData]
    ) -> None:
        self.cfg, self.world = cfg, world
        self.progress = Progress(world_size=world.world_size)
        self.early_stopping = EarlyStopping(
            higher_is_better=HIGHER_IS_BETTER[cfg.train.monitor],
            patience=cfg.train.patience,
            probe_epochs=cfg.train.probe_epochs,
            reference=monitor_reference(cfg),
        )
        # checkpoint key -> part, in load order (the random states last); a new stateful part is one entry here
        self.parts: dict[str, Stateful] = {
            ckpt.MODEL: model,
            ckpt.OPTIMIZERS: train_step.optimizers,
            ckpt.WEIGHTING: train_step.method_run,
            ckpt.STEP: train_step,
            ckpt.PROGRESS: self.progress,
            ckpt.EARLY_STOPPING: self.early_stopping,
            ckpt.CONFIG: Record(to_dict(cfg)),
            ckpt.DATA: Record(data_identity(data)),
            ckpt.RNG: RNGState(),
        }
        run = RunDir(cfg.run_dir)
        self.last, self.best = run.last, run.best
        self.every_s = cfg.checkpoint.every_minutes * 60
        self.saved_at = time.monotonic()
        self.resume_hint = distributed.resume_command(cfg.run_dir)

    def state_dict(self, parts: Iterable[str] | None = None) -> dict:
        """The checkpoint of `parts` (default: every part, what a resumed run reads back)."""
        return {name: self.parts[name].state_dict() for name in (self.parts if parts is None else parts)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (last.pt). Raises MmptError, before loading anything, when it lacks a part."""
        missing = [name for name in self.parts if name not in state]
        if missing:
            raise MmptError(
                f"checkpoint {self.last} has no {', '.join(missing)} state, so training cannot continue from it (a "
                f"copy of best.pt?); restore the {self.last.name} that train.py wrote, or start a new run with --output"
            )
        for name, part in self.parts.items():
            part.load_state_dict(state[name])

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
        progress = self.progress
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
        value = monitored(self.cfg.train.monitor, val, progress.history, self.early_stopping.reference)
        progress.history[-1]["monitor"] = {self.cfg.train.monitor: value}
        improved = self.early_stopping.update(epoch + 1, value)
        progress.done = self.early_stopping.stop
        if improved and self.world.is_main:
            ckpt.save(self.best, self.state_dict(BEST_PARTS))
        self.save()
        return improved

    def stopped(self, signal: str | None, during: str) -> Stopped:
        """The Stopped error of a stop `during` "training", "validation" or "test" (signal: None for another rank's)."""
        reason = signal or "a stop on another rank"
        if during == "training":
            return Stopped(
                f"{reason}: stopped at step {self.progress.step} with {self.last} written; {self.resume_hint}", signal
            )
        if during == "validation":
            return Stopped(
                f"{reason} during validation: {self.last} written at step {self.progress.step}; {self.resume_hint}",
                signal,
            )
        assert during == "test", f"unknown stage {during!r}"
        return Stopped(
            f"{reason} during the test evaluation: training is complete and saved; to write the test "
            f"report, {self.resume_hint}",
            signal,
        )


def load_resume_checkpoint(cfg: Config) -> dict:
    """Read last.pt of the run and check that its config matches `cfg` where it must."""
    path = RunDir(cfg.run_dir).last
    if not path.is_file():
        raise MmptError(
            f"cannot resume {cfg.run_dir}: it has no {path.relative_to(cfg.run_dir).as_posix()}; start it without "
            "--resume"
        )
    state = ckpt.load(path)  # its parts are checked when the training state loads them (TrainingState.load_state_dict)
    try:
        saved = recorded_config(state[ckpt.CONFIG])
    except MmptError as exc:
        raise MmptError(
            f"checkpoint {path} holds a config this mmpt cannot read ({exc}); start a new run with --output"
        ) from None
    changed = fixed_key_changes(saved, cfg)  # every key but config.RESUME_MAY_CHANGE, whole values
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
