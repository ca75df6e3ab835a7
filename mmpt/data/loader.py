"""uint8 batches gathered from memory-mapped splits: no per-sample decoding, no PIL.

Datasets hold only paths and labels; each process maps the image files itself on first use,
so worker processes share the page cache instead of receiving copies of the images.
"""

from __future__ import annotations

import functools
import random
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmpt.errors import MmptError

if TYPE_CHECKING:
    from mmpt.data.sampler import Step
    from mmpt.data.store import SplitData


class _MappedImages:
    """Opens each split's image memmap on first use, once per process; never pickles them."""

    def __init__(self) -> None:
        self._images: dict[str, np.ndarray] = {}

    def __call__(self, split: SplitData) -> np.ndarray:
        key = str(split.images_path)
        if key not in self._images:
            self._images[key] = split.open_images()
        return self._images[key]

    def __getstate__(self) -> dict:
        # a pickled memmap would carry its data; workers map the file themselves
        return {"_images": {}}


class Part(NamedTuple):
    """One dataset's share of a training step on this rank."""

    task: str
    images: torch.Tensor  # uint8 n×H×W or n×H×W×3: this rank's shard
    labels: torch.Tensor  # int64 n×L
    global_size: int  # the dataset's batch size over all ranks


def shard(n: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous share of n items; shares differ by at most one item and cover all n once."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


class PlanDataset(Dataset):
    """Item i is step `start + i` of an epoch plan: a list of `Part`s, one per dataset of the step.

    A plan item (`sampler.Step`) is a list of (task, indices), one per dataset of the step. Each dataset's indices are
    sorted, and this rank gathers only its contiguous shard of them (`shard`), so the ranks together
    read every index of the step exactly once. Raises MmptError when `start` lies outside the plan.
    """

    def __init__(
        self, splits: dict[str, SplitData], plan: list[Step], start: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= start <= len(plan):
            raise MmptError(
                f"resume position {start} is outside this epoch's plan of {len(plan)} steps; the checkpoint "
                "was written with other datasets, batch size or sampler settings: resume with its config"
            )
        # steps before `start` were trained before a resume; drop them so workers don't receive them
        self.plan = plan[start:]
        missing = sorted({task for parts in self.plan for task, _ in parts} - splits.keys())
        assert not missing, f"plan names tasks without a split: {missing}"
        self.splits = splits
        self.rank, self.world_size = rank, world_size
        self._mapped = _MappedImages()

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> list[Part]:
        parts = []
        for task, idx in self.plan[i]:
            split = self.splits[task]
            # sorted indices keep memmap reads sequential
            mine = np.sort(idx)[shard(len(idx), self.rank, self.world_size)]
            # fancy indexing copies from the map; ascontiguousarray only drops the memmap subclass
            images = np.ascontiguousarray(self._mapped(split)[mine])
            parts.append(Part(task, torch.from_numpy(images), torch.from_numpy(split.labels[mine]), len(idx)))
        return parts


class SplitsDataset(Dataset):
    """Item i is the i-th batch of this rank's shards of several splits, task after task: (task, images, labels).

    Each split's shard is a contiguous range and the shards are in rank order, so concatenating the ranks'
    outputs of a task in rank order gives its split in its own order, every sample exactly once.
    """

    def __init__(self, splits: dict[str, SplitData], batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        assert batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"
        self.splits = splits
        self.batches: list[tuple[str, slice]] = []
        for task, split in splits.items():
            rows = shard(len(split), rank, world_size)
            self.batches += [
                (task, slice(start, min(start + batch_size, rows.stop)))
                for start in range(rows.start, rows.stop, batch_size)
            ]
        self._mapped = _MappedImages()

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        task, rows = self.batches[i]
        split = self.splits[task]
        # slices are views (of the file, of the labels): copy them once into tensors of their own
        images = np.array(self._mapped(split)[rows])
        return task, torch.from_numpy(images), torch.from_numpy(np.array(split.labels[rows]))


def seed_worker(worker_id: int, seed: int, epoch: int) -> None:
    """Seed Python, NumPy and torch in a loader worker from (seed, epoch, worker_id)."""
    state = np.random.SeedSequence([seed, epoch, worker_id]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[0]))
    torch.manual_seed(int(state[1]))


def _private_generator(seed: int, epoch: int) -> torch.Generator:
    # DataLoader draws its worker base seed from this generator; without one it consumes the
    # global torch RNG, which would make training randomness depend on how many loaders were made
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


def plan_loader(
    splits: dict[str, SplitData],
    plan: list[Step],
    start: int = 0,
    num_workers: int = 2,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Return a DataLoader yielding the plan's steps from `start` on, in order, each a list of `Part`s.

    A part's `images` are uint8 B×H×W (grey) or B×H×W×3, its `labels` int64 B×L, this rank's shard of the
    step; transforms run on the device. Pass pin_memory=True only when training on CUDA.
    Raises MmptError when `start` lies outside the plan.
    """
    return DataLoader(
        PlanDataset(splits, plan, start, rank, world_size),
        batch_size=None,  # items are already batches
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=functools.partial(seed_worker, seed=seed, epoch=epoch),
        generator=_private_generator(seed, epoch),
    )


def eval_loader(
    splits: dict[str, SplitData],
    batch_size: int,
    num_workers: int = 2,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Return a DataLoader yielding this rank's shard of each split once, in order, as (task, images, labels).

    Build it once and iterate it at every validation: its workers persist between iterations.
    """
    return DataLoader(
        SplitsDataset(splits, batch_size, rank, world_size),
        batch_size=None,  # items are already batches
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=functools.partial(seed_worker, seed=0, epoch=0),
        generator=_private_generator(0, 0),
    )
