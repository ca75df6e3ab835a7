"""uint8 batches gathered from memory-mapped splits: no per-sample decoding, no PIL.

Datasets hold only paths and labels; each process maps the image files itself on first use,
so worker processes share the page cache instead of receiving copies of the images.
"""

from __future__ import annotations

import functools
import math
import random
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmpt.errors import MmptError

if TYPE_CHECKING:
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


class PlanDataset(Dataset):
    """Item i is step `start + i` of an epoch plan: (task, uint8 images B×H×W[×3], int64 labels B×L).

    A batch's indices are sorted before the gather, so its samples come in ascending index order.
    Raises MmptError when `start` lies outside the plan.
    """

    def __init__(self, splits: dict[str, SplitData], plan: list[tuple[str, np.ndarray]], start: int = 0) -> None:
        missing = sorted({task for task, _ in plan} - splits.keys())
        assert not missing, f"plan names tasks without a split: {missing}"
        if not 0 <= start <= len(plan):
            raise MmptError(
                f"resume position {start} is outside this epoch's plan of {len(plan)} steps; the checkpoint "
                "was written with other datasets, batch size or sampler settings: resume with its config"
            )
        self.splits = splits
        # steps before `start` were trained before a resume; drop them so workers don't receive them
        self.plan = plan[start:]
        self._mapped = _MappedImages()

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        task, idx = self.plan[i]
        split = self.splits[task]
        # sorted indices keep memmap reads sequential
        idx = np.sort(idx)
        # fancy indexing copies from the map; ascontiguousarray only drops the memmap subclass
        images = np.ascontiguousarray(self._mapped(split)[idx])
        return task, torch.from_numpy(images), torch.from_numpy(split.labels[idx])


class SplitDataset(Dataset):
    """Item i is the i-th contiguous slice of `batch_size` samples of a split: (uint8 images, int64 labels)."""

    def __init__(self, split: SplitData, batch_size: int) -> None:
        assert batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"
        self.split = split
        self.batch_size = batch_size
        self._mapped = _MappedImages()

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
        # slices are views (of the file, of the labels): copy them once into tensors of their own
        images = np.array(self._mapped(self.split)[rows])
        return torch.from_numpy(images), torch.from_numpy(np.array(self.split.labels[rows]))


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
    plan: list[tuple[str, np.ndarray]],
    start: int = 0,
    num_workers: int = 2,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
    seed: int = 0,
    epoch: int = 0,
) -> DataLoader:
    """Return a DataLoader yielding the plan's steps from `start` on, in order, as (task, images, labels).

    `images` is uint8 B×H×W (grey) or B×H×W×3, `labels` int64 B×L; transforms run on the device.
    Pass pin_memory=True only when training on CUDA. Raises MmptError when `start` lies outside the plan.
    """
    return DataLoader(
        PlanDataset(splits, plan, start),
        batch_size=None,  # items are already batches
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=functools.partial(seed_worker, seed=seed, epoch=epoch),
        generator=_private_generator(seed, epoch),
    )


def eval_loader(split: SplitData, batch_size: int, num_workers: int = 2, pin_memory: bool = False) -> DataLoader:
    """Return a DataLoader yielding a whole split once, in order, as (uint8 images, int64 labels) slices."""
    return DataLoader(
        SplitDataset(split, batch_size),
        batch_size=None,  # items are already batches
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=functools.partial(seed_worker, seed=0, epoch=0),
        generator=_private_generator(0, 0),
    )
