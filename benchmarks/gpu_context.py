"""What the GPU check's parts share: the targets, the sizes (a GPU's and the CPU dry run's), a row of the report,
and the context each check receives (see benchmarks.gpu)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

import mmpt
from benchmarks.loops import engine
from benchmarks.train_mtl import runnable
from mmpt.config import Config, load_config
from mmpt.data.synthetic import write_synthetic
from mmpt.runtime.process import configure_determinism
from mmpt.tasks import FLAGS, resolve_tasks

CHECKS = ("sync", "throughput", "determinism", "compile", "fp16", "memory", "loader")
# the targets a GPU run is judged by
RESNET_TARGET_IMG_S = 10_000  # ResNet-18 at 28 px, batch 256, engine
VIT_VS_BARE_TARGET = 0.95  # ViT-B/16 at 224 px in bf16: the engine against the bare loop
VIT_MFU_TARGET = 0.35
FP16_FACTOR = 2.0  # fp16 and bf16 updates within this factor of each other
MEMORY_GROWTH = 0.02  # allocated memory at step 100 at most 2 % (and 16 MiB) above step 10
MEMORY_SLACK_BYTES = 16 << 20
# where a sync may come from in a gradient-based step: the aggregator's host solver (TorchJD and its solvers)
MMPT_DIR = str(Path(mmpt.__file__).parent)
FP16_DATASETS = ("breastmnist", "retinamnist", "chestmnist", "dermamnist")


@dataclass(frozen=True)
class Sizes:
    """The models and sizes a check runs at: the GPU's, or tiny ones that only exercise the code on a CPU."""

    resnet: str = "resnet18"
    vit: str = "vit_b16"
    vit_resolution: int = 224
    vit_input: int | None = None  # None: the backbone's (224)
    resnet_batches: tuple[int, ...] = (64, 256)
    vit_batch: int = 64
    # train images per dataset of the synthetic files at 28 px (val/test: a quarter): 2.5 batches of the compile
    # check, so each dataset ends with a partial batch
    train_samples: int = 80
    bench_steps: int = 10  # timed steps per turn of the throughput check
    bench_repeats: int = 5
    bench_warmup: int = 5
    sync_steps: int = 3
    determinism_steps: int = 30
    determinism_vit_steps: int = 10
    compile_batch: int = 32
    memory_steps: tuple[int, int] = (10, 100)
    loader_batches: int = 40
    loader_images: int = 2048
    loader_workers: tuple[int, ...] = (2, 4, 8)
    loader_resolutions: tuple[int, ...] = (28, 224)
    judged: bool = True  # False: figures from a CPU, not judged against the GPU targets


GPU = Sizes()
TINY = Sizes(
    resnet="test_resnet",
    vit="test_vit",
    vit_resolution=28,
    vit_input=32,
    resnet_batches=(8, 16),
    vit_batch=8,
    train_samples=12,
    bench_steps=1,
    bench_repeats=1,
    bench_warmup=1,
    sync_steps=1,
    determinism_steps=3,
    determinism_vit_steps=2,
    compile_batch=8,
    memory_steps=(2, 6),
    loader_batches=3,
    loader_images=48,
    loader_workers=(2,),
    loader_resolutions=(28, 64),
    judged=False,
)


def row(label: str, value: str, criterion: str, passed: bool | None) -> dict:
    """One line of the table: a figure beside its pass criterion (passed None: not judged, e.g. on a CPU)."""
    return {"label": label, "value": value, "criterion": criterion, "passed": passed}


class Context:
    """What every check shares: the device, the sizes, the synthetic files and the engine's configs."""

    def __init__(self, device: torch.device, sizes: Sizes, work: Path, compile_backend: str, log) -> None:
        self.device, self.sizes, self.work, self.compile_backend, self.log = device, sizes, work, compile_backend, log
        self.root = work / "medmnist"
        self.tasks = resolve_tasks(list(FLAGS))
        write_synthetic(self.root, 28, self.tasks, train_samples=sizes.train_samples, seed=0)
        self.judged = sizes.judged and device.type == "cuda"

    def config(self, *, backbone: str | None = None, datasets=None, batch_size: int = 64, **sections) -> Config:
        """A run's config on the synthetic 28 px files (`sections`: section -> dict of overrides)."""
        raw = {
            "name": "gpu-check",
            "data": {"root": str(self.root), "datasets": list(datasets or FLAGS), "num_workers": 0},
            "model": {"backbone": backbone or self.sizes.resnet, "img_size": 28 if self.sizes.judged else 32},
            "input": {"mode": "pad"},
            "train": {"batch_size": batch_size, "epochs": 1000, "device": str(self.device), "progress": False},
        }
        for section, values in sections.items():
            raw[section] = {**raw.get(section, {}), **values}
        return runnable(load_config(overrides=[raw]))

    def step_and_batches(self, cfg: Config, steps: int, pin: bool = True, compile_backend: str | None = None):
        """The engine's step for `cfg` (seeded) and the first `steps` steps of its plan's batches, already loaded
        (`compile_backend`: torch.compile's under train.compile, default the check's); and the run's data."""
        cfg = runnable(
            dataclasses.replace(
                cfg,
                data=dataclasses.replace(cfg.data, num_workers=0, pin_memory=pin),
                sampler=dataclasses.replace(cfg.sampler, steps_per_epoch=steps),
            )
        )
        configure_determinism(cfg.train.seed, cfg.determinism, cfg.train.tf32)
        setup = engine(cfg, self.device, compile_backend=compile_backend or self.compile_backend)
        return setup.step, list(setup.train_loader(0)), setup.data
