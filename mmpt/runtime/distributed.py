"""Rank, world size and device, decided once from torchrun's environment; agreement across ranks.

Everything else asks this module instead of calling torch.distributed: a plain `python train.py` is a
world of one, where every function here is a no-op or an identity.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmpt.config.choices import device_problem
from mmpt.errors import MmptError


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and prints."""
        return self.rank == 0


SINGLE = World()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resume_command(run_dir) -> str:
    """What to run to continue `run_dir`: with the launcher this process was started by (a launcher's job: submitit
    requeues it after a time limit, and the launch command continues it otherwise).

    Under torchrun the hint repeats its world (nodes and processes per node; on several nodes add the
    rendezvous options this run was started with), and says that torchrun's own failure report follows.
    """
    import shlex

    target = f"train.py --resume {shlex.quote(str(run_dir))}"
    if os.environ.get("SUBMITIT_EXECUTOR"):  # a launcher's job (its processes exported as torchrun's, several)
        return (
            "a time limit or preemption: submitit requeues this job, which continues from it; another stop: run the "
            "launch command again (or python " + target + " here)"
        )
    if not launched_by_torchrun():
        return f"continue with: python {target}"
    world_size = int(os.environ["WORLD_SIZE"])
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    nodes = world_size // max(per_node, 1)
    launcher = f"torchrun --nproc-per-node {per_node} {target}"
    if nodes > 1:
        launcher = f"{launcher} on each of the {nodes} nodes, with the --nnodes and rendezvous options of this start"
    return (
        f"continue with the same launcher: {launcher}; torchrun's own failure report that follows is "
        "expected: this run stopped cleanly and is saved"
    )


def init(device_name: str) -> tuple[World, torch.device]:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) and pick this rank's device.

    Outside torchrun, or with a world of one, no process group is made. Raises MmptError when
    CUDA is asked for but absent, or when there are more ranks than visible GPUs on a node.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return SINGLE, select_device(device_name)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = select_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise MmptError(
                f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                "set torchrun --nproc_per_node to at most the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return World(rank, world_size, local_rank, backend), device


def select_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU. Raises MmptError for another name, or a CUDA device that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(name)
    if problem:
        raise MmptError(f"device {problem}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MmptError(f"device is {name} but no CUDA device is visible; use cpu (--device cpu)")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise MmptError(
            f"device is {name} but only {torch.cuda.device_count()} CUDA device(s) are visible; use cuda:0 or cuda"
        )
    return device


def _device(world: World) -> torch.device:
    # NCCL moves only CUDA tensors; gloo only CPU tensors
    return torch.device("cuda", torch.cuda.current_device()) if world.backend == "nccl" else torch.device("cpu")


def any_rank(world: World, *flags: bool) -> list[bool]:
    """Each flag OR-ed over all ranks (one small all-reduce), so every rank takes the same branch."""
    if not world.distributed:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=_device(world))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def first_error(world: World, error: str | None) -> str | None:
    """The error message of the lowest rank that has one (None when no rank has), known to every rank."""
    return next((e for e in gather_objects(world, error) if e is not None), None)


@contextlib.contextmanager
def agree_on_errors(world: World) -> Iterator[None]:
    """Run a block on every rank; if it raises MmptError on any rank, raise it on every rank.

    Without this, a user error on one rank (e.g. its node lacks the data) would leave the others
    waiting forever at their next collective.
    """
    error = None
    try:
        yield
    except MmptError as exc:
        error = str(exc)
    error = first_error(world, error)
    if error is not None:
        raise MmptError(error)


def data_parallel(
    module: nn.Module, device: torch.device, leave_out: Sequence[nn.Parameter] = ()
) -> DistributedDataParallel:
    """`module` in DDP, which averages over ranks the gradients of its parameters except `leave_out`.

    The caller averages `leave_out`'s gradients itself: those parameters are not in every step, and DDP without
    its unused-parameter search (a graph walk and a host sync per step) expects a gradient for each of its own.
    DDP takes as its own the parameters that require a gradient when it is built, and no public API names others
    to leave out, so `leave_out` stops requiring one for that moment only. DDP's default keeps rank 0's buffers
    (BatchNorm statistics, per-dataset ones too) on every rank at each forward.
    """
    switched = [p for p in leave_out if p.requires_grad]
    for param in switched:
        param.requires_grad_(False)
    try:
        return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
    finally:
        for param in switched:
            param.requires_grad_(True)


def all_reduce_mean_(world: World, tensors: list[torch.Tensor]) -> None:
    """Average `tensors` over ranks in place, as one flat all-reduce (gradients of the stepped heads)."""
    if not world.distributed or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat.div_(world.world_size)
    for t, value in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(value.view_as(t))


def mean_over_ranks(world: World, value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over ranks as a new tensor (no host synchronisation), bitwise the same on every rank: the
    all-reduce hands every rank the same sum, which each divides alike."""
    if not world.distributed:
        return value
    out = value.clone()
    dist.all_reduce(out)
    return out / world.world_size


def differentiable_sum(world: World, value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over ranks, bitwise the same on every rank, as a differentiable function: its backward
    pass sums the gradients over ranks (torch's functional all-reduce, which torch.compile can trace). For statistics
    that several ranks' rows share, such as synchronised BatchNorm moments."""
    if not world.distributed:
        return value
    return funcol.all_reduce(value, "sum", dist.group.WORLD)


def sum_over_ranks_tensor(world: World, value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over ranks as a new tensor (one all-reduce, no host synchronisation)."""
    if not world.distributed:
        return value
    out = value.clone()
    dist.all_reduce(out)
    return out


def broadcast_buffers(world: World, module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), so all ranks hold one model."""
    if not world.distributed:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def gather_rows(world: World, array: np.ndarray) -> np.ndarray:
    """Concatenate every rank's rows in rank order (evaluation shards are contiguous and in rank order)."""
    return np.concatenate(gather_objects(world, array)) if world.distributed else array


def gather_objects(world: World, obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    parts: list = [None] * world.world_size
    dist.all_gather_object(parts, obj)
    return parts


def sum_over_ranks(world: World, value: float) -> float:
    return float(sum(gather_objects(world, value)))


def broadcast_object(world: World, obj):
    """Rank 0's `obj` on every rank (pickled; for a state dict read from a file only rank 0 can see)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
