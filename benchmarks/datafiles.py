"""What the data benchmark (benchmarks.data) reads and how: synthetic throughput files and a large random 224 px
RGB set (memory-mapped or read into RAM), and the two pipelines it times over them, mmpt's loader and the
per-sample PIL pipeline of the original mm-PT code."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import medmnist
import numpy as np
import torch

from benchmarks.common import write_synthetic_files
from mmpt.data.loader import plan_loader
from mmpt.data.sampler import Sampler
from mmpt.data.store import SplitData, open_task
from mmpt.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mmpt.tasks import TASKS

INPUT_SIZE = 224
THROUGHPUT_TASK = "breastmnist"  # grey, as most MedMNIST+ datasets; as_rgb turns it into 3 channels for PIL
WRITE_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True, eq=False)
class InMemorySplit(SplitData):
    """A split whose images were read into RAM with np.load (no mmap), as the original mm-PT code holds them.

    DataLoader workers are forked, so they inherit the array (shared until written) instead of a copy.
    """

    images: np.ndarray | None = None

    def open_images(self) -> np.ndarray:
        return self.images


def write_throughput_files(root: Path, images: int, resolutions: tuple[int, ...] = (28, INPUT_SIZE)) -> None:
    """Write synthetic THROUGHPUT_TASK files with `images` train images at each resolution into `root`."""
    for resolution in resolutions:
        write_synthetic_files(root, resolution, [TASKS[THROUGHPUT_TASK]], train_samples=images)


def write_memory_set(path: Path, images: int, resolution: int = INPUT_SIZE) -> int:
    """Write an images × R × R × 3 uint8 .npy of random pixels (the store's unpacked format); return its bytes."""
    shape = (images, resolution, resolution, 3)
    image_bytes = math.prod(shape[1:])
    per_chunk = max(1, min(images, WRITE_CHUNK_BYTES // image_bytes))
    # one random block, xor-ed with the chunk number, is fast to make and leaves no all-zero page
    block = np.random.default_rng(0).integers(0, 256, size=(per_chunk, *shape[1:]), dtype=np.uint8)
    chunk = np.empty_like(block)
    with open(path, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        for number, start in enumerate(range(0, images, per_chunk)):
            count = min(per_chunk, images - start)
            np.bitwise_xor(block[:count], np.uint8(number % 256), out=chunk[:count])
            f.write(chunk[:count].data)
    return images * image_bytes


def memory_split(path: Path, in_ram: bool) -> SplitData:
    shape = np.load(path, mmap_mode="r").shape
    labels = np.zeros((shape[0], 1), np.int64)
    if in_ram:
        return InMemorySplit(path, labels, shape, images=np.load(path))
    return SplitData(path, labels, shape)


def pil_loader(root: Path, task: str, resolution: int, *, batch_size: int, workers: int, input_size: int = INPUT_SIZE):
    """The original mm-PT pipeline: medmnist's dataset class (the split read into RAM), per-sample PIL
    (fromarray, convert RGB), torchvision ToTensor, Normalize and Pad to `input_size`, shuffled DataLoader."""
    # imported here: torchvision's transforms serve the baseline only
    from torchvision import transforms

    steps = [transforms.ToTensor(), transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]
    if resolution < input_size:
        steps.append(transforms.Pad((input_size - resolution) // 2))
    dataset_class = getattr(medmnist, medmnist.INFO[task]["python_class"])
    dataset = dataset_class(
        split="train", root=str(root), size=resolution, as_rgb=True, transform=transforms.Compose(steps)
    )
    # medmnist's __len__ asserts the official split size; this instance reports the synthetic file's own
    dataset.info = {**dataset.info, "n_samples": {**dataset.info["n_samples"], "train": len(dataset.imgs)}}
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)


def mmpt_loader(root: Path, task: str, resolution: int, *, batch_size: int, workers: int, seed: int = 0):
    """mmpt's loader over the store's memory-mapped train split of `task`: each step a list of one `Part`."""
    split = open_task(root, TASKS[task], resolution).splits["train"]
    plan = Sampler({task: len(split)}, batch_size, seed).plan(0)
    return plan_loader({task: split}, plan, num_workers=workers, seed=seed)
