"""What a launcher's job runs: one member of a series (`MemberJob`), or the summary of the series after its
SLURM array (`summarize_series`). submitit pickles them by this module's name; mmpt.experiments.launcher submits
them.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import submitit
import torch
from submitit.helpers import Checkpointable, DelayedSubmission, TorchDistributedEnvironment

from mmpt.errors import MmptError
from mmpt.experiments.series import Variant, train_member
from mmpt.experiments.summary import summarize
from mmpt.trainstate import Stopped


class MemberJob(Checkpointable):
    """One member of a series as a submitit job: `train_member`, as a sequential series runs it.

    With several processes per job (GPUs per member, or nodes), each takes its rank from the job's environment
    (TorchDistributedEnvironment) and the engine joins them as under torchrun. A stop by SIGUSR2 (time limit,
    preemption) is handed back to submitit once training has written last.pt, so that it requeues the job.
    """

    def __init__(self, variant: Variant, label: str, threads: int | None = None) -> None:
        self.variant = variant
        self.label = label
        self.threads = threads  # CPU threads of the whole job; None: SLURM's cpus-per-task where it says, else torch's

    def __call__(self) -> str:
        env = submitit.JobEnvironment()
        # SLURM_CPUS_PER_TASK is per process already; a job's `threads` are shared by its processes
        per_process = self.threads // env.num_tasks if self.threads else int(os.environ.get("SLURM_CPUS_PER_TASK", 0))
        if per_process:
            torch.set_num_threads(max(1, per_process))
        if env.num_tasks > 1:
            # the job's CUDA_VISIBLE_DEVICES already holds its GPUs; each rank takes cuda:<local rank> of them
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        main = env.global_rank == 0
        if main:
            print(f"{self.label}: job {env.job_id} on {env.hostname}, {env.num_tasks} process(es)", flush=True)
        try:
            train_member(self.variant, overwrite=False, label=self.label)
        except Stopped as exc:
            preempted = exc.signal == f"SIG{submitit.JobEnvironment.USR_SIG}"
            if main:
                print(str(exc), file=sys.stderr)
                print(
                    f"{self.label}: stopped by {exc.signal or 'another rank'} with last.pt written; "
                    + ("submitit requeues the job" if preempted else "run the series command again to continue it"),
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
        return DelayedSubmission(MemberJob(self.variant, self.label, self.threads))


def summarize_series(root: str) -> None:
    """The SLURM summary job: summarize the series (as a sequential series does at its end)."""
    try:
        summarize(Path(root))
    except MmptError as exc:
        print(f"error: {exc}", file=sys.stderr)
