"""The training step: batch to device, transform, forward, loss, weighting, backward, optimizer steps.

The one copy that the training loop and the benchmarks call. It never waits on the device: no
`.item()`, no `if tensor`, no blocking copy. Loss values for logs and the non-finite check are summed
on the device and read by the caller once per logging interval (`read_losses`).

Under torchrun the backbone is wrapped in DDP alone (every backbone parameter takes part in every
step, so no unused-parameter search is needed) and the gradients of the heads in the step are
averaged explicitly in one all-reduce; the heads not in the step take no part at all. BatchNorm passes
use the statistics of the global batch (model.sync_norm), and each rank draws its own dropout masks from
(seed, step, rank).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from mmpt.config.methods import GRADIENT, METHODS
from mmpt.data.loader import Part
from mmpt.data.transforms import DeviceTransform
from mmpt.model.losses import TaskLoss
from mmpt.model.net import MultiTaskNet
from mmpt.model.norm import has_batchnorm, task_parameter_names
from mmpt.mtl.base import MethodRun
from mmpt.runtime.distributed import SINGLE, World, all_reduce_mean_, data_parallel, mean_over_ranks
from mmpt.runtime.precision import LossScale, autocast, grad_scaler, resolve_precision
from mmpt.training.conflicts import BATCHES, GRAMIAN, STEP, GradientConflicts, gramian
from mmpt.training.optim import BACKBONE, Optimizers

DROPOUT_STREAM = 0x64726F70  # keeps the dropout seeds apart from the augmentation's


def augmentation_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's augmentation on one rank: a pure function of (seed, step, rank), so resume replays it."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's dropout masks on one rank under torchrun: a pure function of (seed, step, rank), so
    every rank draws its own masks (as one process draws a mask per image) and a resume on any world size replays
    them."""
    return int(np.random.SeedSequence([seed, step, rank, DROPOUT_STREAM]).generate_state(1)[0])


def seed_dropout(device: torch.device, seed: int) -> None:
    """Seed the generator that dropout on `device` draws from (the device's default one): host-side, no sync."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


class TrainStep:
    """Performs one optimizer step of `model` on a list of `Part`s (one per dataset of the step).

    `read_losses()` returns and resets the per-dataset mean losses since the last read and whether any
    was non-finite; the caller reads it at each logging interval and before every checkpoint.
    """

    def __init__(
        self,
        model: MultiTaskNet,
        losses: dict[str, TaskLoss],
        optimizers: Optimizers,
        method_run: MethodRun,
        transform: DeviceTransform,
        *,
        device: torch.device,
        world: World = SINGLE,
        precision: str = "fp32",
        seed: int = 0,
        channels_last: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        sync_norm: bool = True,
        conflicts: GradientConflicts | None = None,
        jacobian: str | None = None,
    ) -> None:
        self.model, self.losses, self.optimizers, self.method_run = model, losses, optimizers, method_run
        self.transform = transform.to(device)
        self.device, self.world, self.seed = device, world, seed
        self.precision = resolve_precision(precision, device)  # train.precision auto decided here
        self.channels_last = channels_last
        # model.sync_norm under torchrun: the step's BatchNorm passes use every rank's rows (None: this rank's)
        self.norm_world = world if world.distributed and sync_norm and has_batchnorm(model.backbone) else None
        if self.norm_world is not None:
            model.share_norms()  # before DDP takes the backbone's buffers
        if channels_last:
            model.to(memory_format=torch.channels_last)
        # what runs the backbone: the module itself, or a DDP and/or compiled wrapper around it
        # (model.backbone stays the plain module, so state_dict keys never carry wrapper prefixes)
        self.backbone: nn.Module = model.backbone
        if world.distributed:
            # per-dataset affine weights (model.norm per_dataset) sit out the steps of other datasets: DDP leaves
            # them out and the step averages their gradients with the heads'; every rank keeps rank 0's buffers
            per_dataset = set(task_parameter_names(model.backbone))
            leave_out = [p for name, p in model.backbone.named_parameters() if name in per_dataset]
            self.backbone = data_parallel(model.backbone, device, leave_out)
        self.compiled = compile
        if compile:
            if METHODS[method_run.name].kind == GRADIENT or (conflicts is not None and conflicts.source == STEP):
                # these backward passes retain the graph (one per row of the Jacobian, or per dataset), which a
                # compiled backward allows only without donated buffers (AOTAutograd's memory reuse; process-wide)
                torch._functorch.config.donated_buffer = False
            # compile_backend: torch.compile's; tests and the CPU dry run of the GPU check take aot_eager (the same
            # graphs and autograd, no code generation)
            self.backbone = torch.compile(self.backbone, backend=compile_backend)
        self.scaler = grad_scaler(device, precision)
        self.loss_scale = LossScale(self.scaler)
        self.generator = torch.Generator(device=device)
        self.index = {task: i for i, task in enumerate(model.heads)}
        self.loss_sum = torch.zeros(len(self.index), device=device)
        self.loss_count = torch.zeros(len(self.index), device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self._head_params: dict[tuple[str, ...], list[nn.Parameter]] = {}
        self.backbone_frozen = False
        self.gradient_based = METHODS[method_run.name].kind == GRADIENT  # its backward aggregates the Jacobian
        # the gradient-conflict diagnostic (None: off) and the backbone parameters every dataset shares
        self.conflicts = conflicts
        own = set(task_parameter_names(model.backbone))
        self.shared_params = [p for n, p in model.backbone.named_parameters() if p.requires_grad and n not in own]
        # a gradient-based method's Jacobian (mmpt.training.build.jacobian_path): one_pass forwards each dataset with
        # its own views of every trained backbone parameter (in the order of the method's shared parameters)
        self.jacobian = jacobian
        self.one_pass = jacobian == "one_pass"
        self._viewed = {n: p for n, p in model.backbone.named_parameters() if p.requires_grad}

    def freeze_backbone(self, frozen: bool) -> None:
        """LP-FT's probe phase (`frozen`): the steps train the heads only. The backbone runs without gradients and
        in eval mode (its BatchNorm statistics, per dataset ones included, stay as they are and its dropout is off),
        and its optimizer neither steps nor advances its schedule. Call after `model.train()`, at an epoch's start."""
        self.backbone_frozen = frozen
        self.optimizers.frozen = frozenset({BACKBONE}) if frozen else frozenset()
        if frozen:
            self.model.backbone.eval()

    def __call__(self, parts: list[Part], step: int) -> None:
        """Train on one step's parts; `step` (the global step count before it) seeds its augmentation."""
        measure = self.conflicts is not None and not self.backbone_frozen and self.conflicts.due(step)
        source = self.conflicts.source if measure else None
        if source == BATCHES:  # at the weights this step starts from, before its own forward pass
            self.conflicts.measure_batches(
                step,
                self.model,
                self.losses,
                lambda images: self.transform(images, train=False),
                self.shared_params,
                forward=self._diagnostic_forward,
                device=self.device,
                scale=self.loss_scale,
            )
        self.generator.manual_seed(augmentation_seed(self.seed, step, self.world.rank))
        if self.world.distributed:  # one process keeps its one stream (its checkpoint restores it)
            seed_dropout(self.device, dropout_seed(self.seed, step, self.world.rank))
        inputs, labels = [], []
        for part in parts:
            images = part.images.to(self.device, non_blocking=True)
            inputs.append(self.transform(images, generator=self.generator, train=True))
            labels.append(part.labels.to(self.device, non_blocking=True))
        views = None
        if self.one_pass and not self.backbone_frozen:
            features, views = self._forward_per_dataset(parts, inputs)
        else:
            x = inputs[0] if len(inputs) == 1 else torch.cat(inputs)  # N_total×3×S×S
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            # per-dataset norm: which slice of x is which dataset's (sizes are host-side, no sync)
            self.model.set_norm_layout(
                [(p.task, len(y)) for p, y in zip(parts, labels)], as_tensor=self.compiled, world=self.norm_world
            )
            with autocast(self.device, self.precision):
                if self.backbone_frozen:
                    with torch.no_grad():  # the plain module: no DDP gradient hooks, no compiled graph for no-grad mode
                        features = self.model.backbone(x)  # N_total×F
                else:
                    features = self.backbone(x)  # N_total×F
        with autocast(self.device, self.precision):
            per_dataset = features if views is not None else features.split([len(y) for y in labels])
            logits = [self.model.heads[p.task](f) for p, f in zip(parts, per_dataset)]
        losses = {
            part.task: self._global_mean(self.losses[part.task](z.float(), y, self.world), len(y), part.global_size)
            for part, z, y in zip(parts, logits, labels)
        }
        tasks = tuple(losses)
        if source == STEP and len(tasks) > 1:  # one extra backward pass per dataset, over the step's graph
            gradients = [
                torch.autograd.grad(self.loss_scale(loss), self.shared_params, retain_graph=True, allow_unused=True)
                for loss in losses.values()
            ]
            self.conflicts.record(step, tasks, gramian(gradients))
        if self.backbone_frozen and self.gradient_based:
            # no Jacobian of a frozen backbone to aggregate: each head takes its own loss's gradient, as mtl_backward
            # gives the task-specific parameters
            self.loss_scale(sum(losses.values())).backward()
        else:
            found = self.method_run.backward(losses, features, self.loss_scale, gramian=source == GRAMIAN, views=views)
            if found is not None and len(tasks) > 1:  # none where fp16 overflowed and the step is skipped
                self.conflicts.record(step, tasks, found)
        all_reduce_mean_(self.world, [p.grad for p in self._heads_of(tasks) if p.grad is not None])
        self.optimizers.step(tasks, self.scaler)
        self.optimizers.zero_grad(tasks)
        with torch.no_grad():
            for task, loss in losses.items():
                i = self.index[task]
                self.loss_sum[i] += loss.detach()
                self.loss_count[i] += 1
                self.nonfinite |= ~torch.isfinite(loss.detach())

    def _global_mean(self, loss: Tensor, local_size: int, global_size: int) -> Tensor:
        """This rank's mean loss, rescaled so that averaging over ranks gives the global batch's mean.

        Shards may differ by one image. The value becomes the global mean, bitwise the same on every rank (the
        all-reduced mean plus an exact zero), so stateful weightings stay identical across ranks, while the gradient
        stays this rank's own (DDP averages it). A loss that averages over a data-dependent subset (CORN) has
        already divided by the global subset size, scaled to this convention (losses.TaskLoss).
        """
        if not self.world.distributed:
            return loss
        local = loss * (local_size * self.world.world_size / global_size)
        return mean_over_ranks(self.world, local.detach()) + (local - local.detach())

    def _forward_per_dataset(self, parts: list[Part], inputs: list[Tensor]) -> tuple[list[Tensor], list[list[Tensor]]]:
        """The one-pass path's forward: each dataset's images through the backbone on their own, with views of every
        trained backbone parameter of its own (`Tensor.view_as`: no copy), so that one backward pass of the summed
        losses gives each view its dataset's gradient. Returns each dataset's features (N_t×F) and its views (in the
        order of the backbone's parameters). Each pass normalises its dataset alone, as the per-dataset BatchNorm
        layers of a joint pass do; dropout draws each dataset's masks in its own pass."""
        features, views = [], []
        for part, x in zip(parts, inputs):
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            own = {name: p.view_as(p) for name, p in self._viewed.items()}
            self.model.set_norm_layout([(part.task, len(x))])
            with autocast(self.device, self.precision):
                features.append(torch.func.functional_call(self.model.backbone, own, (x,)))  # N_t×F
            views.append(list(own.values()))
        return features, views

    def _diagnostic_forward(self, x: Tensor, task: str) -> Tensor:
        """`task`'s logits for the conflict diagnostic's batch: the plain backbone (no DDP hooks, no compiled graph),
        as training runs it otherwise."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.model.set_norm_layout([(task, len(x))])
        with autocast(self.device, self.precision):
            return self.model.heads[task](self.model.backbone(x))

    def _heads_of(self, tasks: tuple[str, ...]) -> list[nn.Parameter]:
        if tasks not in self._head_params:
            self._head_params[tasks] = [p for t in tasks for p in self.model.heads[t].parameters()]
            self._head_params[tasks] += self.model.norm_parameters(tasks)
        return self._head_params[tasks]

    def read_losses(self) -> tuple[dict[str, tuple[float, int]], bool]:
        """Per-dataset (sum of step losses, steps) since the last read (datasets without a step left out), and
        whether any loss was non-finite; resets both. The one host-device synchronisation of training."""
        n = len(self.index)
        values = torch.cat([self.loss_sum, self.loss_count, self.nonfinite.view(1).float()]).tolist()
        sums, counts, nonfinite = values[:n], values[n : 2 * n], values[2 * n] > 0
        self.loss_sum.zero_()
        self.loss_count.zero_()
        self.nonfinite.zero_()
        return {task: (sums[i], int(counts[i])) for task, i in self.index.items() if counts[i]}, nonfinite

    def state_dict(self) -> dict:
        """The precision it trains in (train.precision auto as decided), the fp16 gradient scaler's state and the
        conflict diagnostic's record (each when present), for exact resume."""
        state = {"precision": self.precision}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.conflicts is not None:
            state["conflicts"] = self.conflicts.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        # mmpt.training.build built this step in the checkpoint's precision (run_precision)
        assert state.get("precision", self.precision) == self.precision, "resumed in another precision"
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        # a run resumed with the diagnostic newly on (it changes no result) starts its record there
        if self.conflicts is not None and "conflicts" in state:
            self.conflicts.load_state_dict(state["conflicts"])
