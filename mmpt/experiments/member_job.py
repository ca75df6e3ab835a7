"""What a launcher launches (`Member`: a member of a training series, `TrainMember`, or the probe of one run,
mmpt.experiments.probe_launch.ProbeMember) and what their jobs run: one member of a series (`MemberJob`), the
probe of one run (`ProbeJob`), or the summary of the series after its SLURM array (`summarize_series`). submitit
pickles them by this module's name; mmpt.experiments.launcher submits them.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import submitit
import torch
from submitit.helpers import Checkpointable, DelayedSubmission, TorchDistributedEnvironment

from mmpt.config import recorded_config, to_dict
from mmpt.errors import MmptError
from mmpt.experiments.series import Variant, train_member
from mmpt.experiments.summary import summarize
from mmpt.runs.rundir import RunDir, clear_results
from mmpt.training.state import Stopped


def set_job_threads(threads: int | None, tasks: int) -> None:
    """torch's CPU threads in one of a job's `tasks` processes: its share of the job's `threads`, else SLURM's
    cpus-per-task (per process already), else torch's default."""
    per_process = threads // tasks if threads else int(os.environ.get("SLURM_CPUS_PER_TASK", 0))
    if per_process:
        torch.set_num_threads(max(1, per_process))


class Member(Protocol):
    """One job of a launch: a member of a series (TrainMember), or the probe of one run
    (mmpt.experiments.probe_launch.ProbeMember)."""

    path: str  # relative to the launch folder ("" for the folder itself); the job record's key

    @property
    def folder(self) -> Path:
        """Where its outputs go; job.log there links its job's log."""

    def finished(self) -> bool:
        """Whether its outputs are complete, so that a rerun of the command submits it no more."""

    def job(self, label: str, threads: int | None, fresh: bool = False, command: str = "") -> Callable[[], str]:
        """What its job runs (pickled by submitit): `threads` CPU threads for the whole job, None: the scheduler's;
        `fresh` (--overwrite): the job first removes the member's earlier outputs, once it runs (so a launch the
        scheduler refuses removes nothing); `command`: the command that launched it (a stopped job names it)."""


@dataclass(frozen=True)
class TrainMember:
    """A member of a training series: finished with summary.json; its job runs `train_member`, as a sequential
    series does."""

    variant: Variant

    @property
    def path(self) -> str:
        return self.variant.path

    @property
    def folder(self) -> Path:
        return Path(self.variant.cfg.run_dir)

    def finished(self) -> bool:
        return RunDir(self.folder).summary.is_file()

    def job(self, label: str, threads: int | None, fresh: bool = False, command: str = "") -> MemberJob:
        return MemberJob(self.variant, label, threads, fresh, command)


class MemberJob(Checkpointable):
    """One member of a series as a submitit job: `train_member`, as a sequential series runs it.

    With several processes per job (GPUs per member, or nodes), each takes its rank from the job's environment
    (TorchDistributedEnvironment) and the engine joins them as under torchrun. A stop by SIGUSR2 (time limit,
    preemption) is handed back to submitit once training has written last.pt, so that it requeues the job.
    """

    def __init__(
        self, variant: Variant, label: str, threads: int | None = None, fresh: bool = False, command: str = ""
    ) -> None:
        self.variant = variant
        self.label = label
        self.threads = threads  # CPU threads of the whole job; None: SLURM's cpus-per-task where it says, else torch's
        self.fresh = fresh  # --overwrite: start the member over (its earlier outputs removed) when the job runs
        self.command = command  # the launch command, which continues a stopped member

    def __getstate__(self) -> dict:
        """What submitit pickles: plain values only (the config as its record), so that a job requeued after an
        upgrade of mmpt reads its config as any record of an earlier release is read (mmpt.config.recorded_config)."""
        path, config = self.variant.path, to_dict(self.variant.cfg)
        state = {"path": path, "config": config, "label": self.label, "threads": self.threads}
        return state | {"fresh": self.fresh, "command": self.command}

    def __setstate__(self, state: dict) -> None:
        if "variant" in state:  # pickled by the release before the packages: its config as that release's classes
            old = state["variant"]
            state = {"path": old.path, "config": _plain(old.cfg), "label": state["label"], "threads": state["threads"]}
        self.variant = Variant(state["path"], recorded_config(state["config"]))
        self.label, self.threads = state["label"], state["threads"]
        self.fresh = state.get("fresh", False)  # a job queued before --overwrite moved into the job: never fresh
        self.command = state.get("command", "")

    def __call__(self) -> str:
        env = submitit.JobEnvironment()
        set_job_threads(self.threads, env.num_tasks)
        if env.num_tasks > 1:
            # the job's CUDA_VISIBLE_DEVICES already holds its GPUs; each rank takes cuda:<local rank> of them
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        main = env.global_rank == 0
        if main:
            print(f"{self.label}: job {env.job_id} on {env.hostname}, {env.num_tasks} process(es)", flush=True)
        try:
            train_member(self.variant, overwrite=self.fresh, label=self.label)
        except Stopped as exc:
            preempted = exc.signal == f"SIG{submitit.JobEnvironment.USR_SIG}"
            if main:
                print(str(exc), file=sys.stderr)
                print(
                    f"{self.label}: stopped by {exc.signal or 'another rank'} with last.pt written; "
                    + ("submitit requeues the job" if preempted else f"to continue it, run again: {self._again()}"),
                    file=sys.stderr,
                    flush=True,
                )
            if preempted:
                # submitit's handler (back in place now that training has left its StopSignal) asks checkpoint()
                # for the next job and requeues it; it exits on rank 0 and returns on the others
                signal.raise_signal(getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}"))
                return "requeued"
            sys.exit(130)
        except MmptError as exc:
            if main:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)
        return "finished"

    def checkpoint(self) -> DelayedSubmission:
        """The job that continues this one after a time limit or preemption: the same member, which resumes from
        the last.pt that training wrote when the signal came (the member's whole state is in its run folder)."""
        # the same member, continuing: never fresh again
        return DelayedSubmission(MemberJob(self.variant, self.label, self.threads, command=self.command))

    def _again(self) -> str:
        """The command that continues this member: the launch command (as the launcher gives it: without
        --overwrite), else the resume of its folder in this process."""
        return self.command or f"python train.py --resume {self.variant.cfg.run_dir}"


class ProbeJob(Checkpointable):
    """The probe of one run of a series as a submitit job (`evaluate.py probe --launcher`): `probe_leaf`, as a
    sequential probe runs it for each run. A probe keeps no state worth saving: after a time limit or preemption
    the requeued job probes again (the features it extracted are cached)."""

    def __init__(
        self, leaf: str, out: str, kwargs: dict, label: str, threads: int | None = None, fresh: bool = False
    ) -> None:
        self.leaf = leaf
        self.out = out
        self.kwargs = kwargs  # probe_leaf's: method, request, k, datasets, data_root, ...
        self.label = label
        self.threads = threads
        self.fresh = fresh  # --overwrite: remove the earlier probe's results when the job runs

    def __call__(self) -> str:
        from mmpt.evaluation.probe import probe_leaf  # scikit-learn: only in the job that probes

        env = submitit.JobEnvironment()
        set_job_threads(self.threads, env.num_tasks)
        print(f"{self.label}: job {env.job_id} on {env.hostname}", flush=True)
        try:
            if self.fresh:
                clear_results(Path(self.out))
            probe_leaf(Path(self.leaf), Path(self.out), **self.kwargs)
        except MmptError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)
        return "finished"

    def checkpoint(self) -> DelayedSubmission:
        return DelayedSubmission(ProbeJob(self.leaf, self.out, self.kwargs, self.label, self.threads))


def _plain(value):
    """A config object of an earlier release as the plain values it holds (the fields it had, nested)."""
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(item) for name, item in vars(value).items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {name: _plain(item) for name, item in value.items()}
    return value


def summarize_series(root: str) -> None:
    """The summary job that a release before launch.retries queued (submitit unpickles it by this name): summarize the
    series. The launcher now submits mmpt.experiments.launcher.summarize_series, which also retries crashed members."""
    try:
        summarize(Path(root))
    except MmptError as exc:
        print(f"error: {exc}", file=sys.stderr)
