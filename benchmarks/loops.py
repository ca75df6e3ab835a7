"""The two loops the training benchmark times: the bare PyTorch loop and the engine as training drives it."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import synchronize
from mmpt.model.backbones import create_backbone
from mmpt.runtime.precision import autocast, grad_scaler
from mmpt.training.build import optimizer_arguments
from mmpt.training.optim import SHARED, build_optimizers
from mmpt.training.setup import Setup, set_up

BARE_CLASSES = 9  # the bare loop's one head: PathMNIST's 9 classes


def engine(cfg, device: torch.device, *, data: dict | None = None, compile_backend: str = "inductor") -> Setup:
    """What a training run of `cfg` trains with (`mmpt.training.setup.set_up`, one process), its model in training
    mode: the step and the loaders the benchmarks time are training's own. `data`: splits already opened."""
    setup = set_up(cfg, device=device, data=data, compile_backend=compile_backend)
    setup.model.train()
    return setup


# ---------------------------------------------------------------------------------------------
# (a) the bare loop


class BareLoop:
    """The same backbone with one linear head and one optimizer of the same kind and settings, trained on
    one fixed batch that already lives on the device: the most a training step of this model can do."""

    def __init__(self, cfg, device: torch.device) -> None:
        self.device, self.precision = device, cfg.train.precision
        self.backbone = create_backbone(cfg.model.backbone, img_size=cfg.model.img_size, drop_rate=cfg.model.drop_rate)
        self.head = torch.nn.Linear(self.backbone.num_features, BARE_CLASSES)
        self.backbone.to(device)
        self.head.to(device)
        # the schedule is never stepped here: constant keeps timm from warning about a one-update cosine
        optim = {**optimizer_arguments(cfg.optim), "per_head": False, "schedule": "constant"}
        # one optimizer over backbone and head (per_head off), with the engine's name, LR and weight decay
        self.optimizer = build_optimizers(
            self.backbone,
            {"head": self.head},
            {"head": 1.0},
            epochs=1,
            fused=device.type == "cuda",
            **optim,
        ).optimizers[SHARED]
        self.scaler = grad_scaler(device, self.precision)
        size, batch = cfg.model.img_size, cfg.train.batch_size
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, size, size, generator=generator).to(device)  # B×3×S×S, normalised
        self.y = torch.randint(0, BARE_CLASSES, (batch,), generator=generator).to(device)
        self.channels_last = cfg.train.channels_last
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.run_backbone = torch.compile(self.backbone) if cfg.train.compile else self.backbone
        self.backbone.train()

    def __call__(self) -> int:
        """One training step; returns the images it trained on."""
        with autocast(self.device, self.precision):
            logits = self.head(self.run_backbone(self.x))
        loss = F.cross_entropy(logits.float(), self.y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return len(self.y)

    def flops(self) -> int:
        """FLOPs of one forward and backward pass of the batch (torch's FlopCounterMode, uncompiled model)."""
        with FlopCounterMode(display=False) as counter:
            with autocast(self.device, self.precision):
                logits = self.head(self.backbone(self.x))
            F.cross_entropy(logits.float(), self.y).backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------
# timing


class EngineLoop:
    """The engine as the training loop drives it: one epoch's loader (the real sampler's plan, its workers
    kept for the whole benchmark), `TrainStep` on each step's parts, the loss sums read once per logging
    interval. `wait_s` sums the time blocked in next(loader)."""

    def __init__(self, step, loader, log_every_steps: int) -> None:
        self.step, self.device, self.log_every_steps = step, step.device, log_every_steps
        self.batches = iter(loader)
        self.number, self.wait_s = 0, 0.0
        self.seen: set[str] = set()  # the datasets it has trained on (a compiled warm-up runs until all are)

    def __call__(self) -> int:
        asked = time.perf_counter()
        parts = next(self.batches)
        self.wait_s += time.perf_counter() - asked
        self.seen.update(part.task for part in parts)
        self.step(parts, self.number)
        self.number += 1
        if self.number % self.log_every_steps == 0:
            self.step.read_losses()  # the loop's one sync per logging interval
            if self.step.conflicts is not None:
                self.step.conflicts.fresh()  # read with the losses, as in training
        return sum(len(part.labels) for part in parts)


def time_steps(loop: Callable[[], int], device: torch.device, steps: int) -> dict:
    """Run `steps` steps of `loop` between two clock reads (the device synchronised before each read)."""
    synchronize(device)
    images, start = 0, time.perf_counter()
    for _ in range(steps):
        images += loop()
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "img_s": images / seconds}
