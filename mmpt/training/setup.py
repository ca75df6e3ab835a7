"""The setup of a training run: one function that training, the benchmarks and the GPU check all call.

`set_up` turns a Config into everything a run trains with, in dependency order, checking on the way everything that
bad input can break (the machine's backbones, optimizers and solvers, the data files, the model's input size and
batch size, the weights of --init-from): nothing on disk is touched, so a run folder is only prepared once all of it
holds. The benchmarks time what this builds; a change to how a run is set up is made here once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from mmpt.config import Config
from mmpt.data.loader import plan_loader
from mmpt.data.sampler import Sampler
from mmpt.data.store import SplitData, TaskData, open_data
from mmpt.evaluation.predict import split_loader
from mmpt.model.build import build_model, load_initial_weights
from mmpt.model.losses import TaskLoss
from mmpt.model.net import MultiTaskNet, check_batch_size
from mmpt.model.weights import check_finished_source
from mmpt.runtime.distributed import SINGLE, World
from mmpt.tasks import TaskSpec, resolve_tasks
from mmpt.training.build import build_sampler, build_step, check_run, run_precision
from mmpt.training.optim import check_layer_decay
from mmpt.training.state import check_resume_data
from mmpt.training.step import TrainStep


@dataclass
class Setup:
    """What a run trains with: its datasets and their data, the epoch plans, the model and its losses, the step."""

    cfg: Config
    world: World
    device: torch.device
    tasks: list[TaskSpec]
    data: dict[str, TaskData]
    sampler: Sampler
    model: MultiTaskNet
    losses: dict[str, TaskLoss]
    step: TrainStep

    @property
    def train_splits(self) -> dict[str, SplitData]:
        """flag -> train split: what the plans index, the calibration and the conflict diagnostic draw from."""
        return {flag: task_data.splits["train"] for flag, task_data in self.data.items()}

    @property
    def specs(self) -> dict[str, TaskSpec]:
        return {flag: task_data.task for flag, task_data in self.data.items()}

    def train_loader(self, epoch: int, start: int = 0) -> DataLoader:
        """The batches of epoch `epoch`'s plan from step `start` on, this rank's shard of each (the run's workers)."""
        d = self.cfg.data
        return plan_loader(
            self.train_splits,
            self.sampler.plan(epoch),
            start=start,
            num_workers=d.num_workers,
            pin_memory=d.pin_memory and self.device.type == "cuda",
            prefetch_factor=d.prefetch_factor,
            seed=self.cfg.train.seed,
            epoch=epoch,
            rank=self.world.rank,
            world_size=self.world.world_size,
        )

    def eval_loader(self, split: str):
        """Every dataset's `split` (val or test) in evaluation batches, this rank's shard."""
        d = self.cfg.data
        return split_loader(
            self.data,
            split,
            self.device,
            batch_size=d.eval_batch_size,
            num_workers=d.num_workers,
            pin_memory=d.pin_memory,
            world=self.world,
        )


def set_up(
    cfg: Config,
    world: World = SINGLE,
    device: torch.device | None = None,
    *,
    saved: dict | None = None,
    data: dict[str, TaskData] | None = None,
    compile_backend: str = "inductor",
) -> Setup:
    """Build everything a run of `cfg` trains with, on `device` (default: the CPU), in training order.

    `saved`: the checkpoint a resume continues (its data must match, its precision is kept, --init-from is not
    applied again). `data`: splits already opened (a benchmark's own memory-mapped file); default: cfg.data's
    files. Call it after the process is seeded (mmpt.runtime.process.configure_determinism): the model's initial
    weights follow the seed. Raises MmptError, on every rank, for anything bad input causes.
    """
    device = device or torch.device("cpu")
    tasks = resolve_tasks(cfg.data.datasets)
    check_run(cfg, world.world_size)  # backbone, optimizer, world size, weighting and its solvers
    data = data if data is not None else open_data(cfg.data, tasks)
    if saved is not None:
        check_resume_data(saved, data, cfg.data.allow_changed)
    model, losses = build_model(cfg, tasks)  # after seeding: the initial weights follow the seed
    check_batch_size(model, cfg.train.batch_size)
    check_layer_decay(cfg.optim.layer_decay, model.backbone, cfg.model.backbone)
    if cfg.model.init_from and saved is None:
        check_finished_source(cfg.model.init_from)
        load_initial_weights(model, cfg.model.init_from, cfg)
    train_splits = {flag: task_data.splits["train"] for flag, task_data in data.items()}
    sampler = build_sampler(cfg, {t.flag: len(train_splits[t.flag]) for t in tasks})
    model.to(device)
    step = build_step(
        cfg,
        model,
        losses,
        sampler,
        device,
        world,
        train_splits=train_splits,
        precision=run_precision(cfg, device, saved),  # train.precision auto: decided at the start, kept on resume
        compile_backend=compile_backend,
    )
    return Setup(cfg, world, device, tasks, data, sampler, model, losses, step)
