"""Loss-based methods: a `torchjd.scalarization` Scalarizer turns the step's loss vector into one scalar.

Learned method parameters (UW, IMTL-L) are trained by an optimizer of the method's own. The state that resume
needs of DWA and FAMO lives in TorchJD's private attributes: mmpt.mtl.torchjd_state reads and restores it (and
checks the TorchJD release), and tests/mtl/test_methods.py resumes every stateful method exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchjd import scalarization

from mmpt.mtl import torchjd_state
from mmpt.mtl.base import Context, Method


class ScalarizerHooks:
    """Extra state and calls of a stateful scalarizer (DWA's epoch roll, FAMO's logit update)."""

    def before(self, method: ScalarizerMethod, losses: dict[str, Tensor]) -> None:
        pass

    def after(self, method: ScalarizerMethod) -> None:
        pass

    def state_dict(self, method: ScalarizerMethod) -> dict:
        return {}

    def load_state_dict(self, method: ScalarizerMethod, state: dict) -> None:
        pass


class ScalarizerMethod:
    """A TorchJD Scalarizer over the step's loss vector; effective weight of dataset t = d(scalar)/dL_t.

    The scalar is differentiated once w.r.t. the loss vector (and the scalarizer's learned parameters), on the
    scalarizer's own small graph; the model then receives sum_t w_t * L_t, whose gradient is the same by the
    chain rule. So the fp16 scale reaches the model only, never the method's parameters.
    """

    def __init__(
        self,
        flags: list[str],
        scalarize: Callable[[dict[str, Tensor]], tuple[Tensor, Tensor]],
        module: nn.Module,
        learned: list[nn.Parameter],
        optimizer: torch.optim.Optimizer | None,
        hooks: ScalarizerHooks | None = None,
    ) -> None:
        self.flags = flags
        self.scalarize = scalarize  # losses -> (loss vector in the order of `losses`, scalar)
        self.module = module
        self.learned = learned
        self.optimizer = optimizer
        self.hooks = hooks or ScalarizerHooks()
        self.steps = 0  # backward calls so far (DWA's epoch clock)
        self._last: dict[str, Tensor] = {}

    def backward(
        self,
        losses: dict[str, Tensor],
        features: Tensor | list[Tensor],
        scale: Callable[[Tensor], Tensor],
        *,
        gramian: bool = False,
        views: list[list[Tensor]] | None = None,
    ) -> None:
        self.hooks.before(self, losses)
        values, total = self.scalarize(losses)
        grads = torch.autograd.grad(total, [values, *self.learned], allow_unused=True)
        weights = grads[0].detach()
        scale((weights * values).sum()).backward()
        if self.optimizer is not None:
            for param, grad in zip(self.learned, grads[1:]):
                param.grad = grad  # None for a dataset absent from this step: Adam leaves it alone
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._last = dict(zip(losses, weights.unbind()))
        self.steps += 1
        self.hooks.after(self)

    def dataset_weights(self) -> dict[str, Tensor]:
        return self._last

    def state_dict(self) -> dict:
        state = {"steps": self.steps, "module": self.module.state_dict(), **self.hooks.state_dict(self)}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.module.load_state_dict(state["module"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.hooks.load_state_dict(self, state)


def _stack(losses: dict[str, Tensor], order: list[str]) -> Tensor:
    missing = sorted(set(order) - set(losses))
    assert not missing, f"this method needs every dataset in every step (tasks_per_step: all); missing {missing}"
    return torch.stack([losses[t] for t in order])


def _joint(scalarizer: nn.Module, flags: list[str], every_dataset: bool) -> Callable:
    """Scalarize the vector of the step's losses (fed in `flags` order when the method needs every dataset)."""

    def scalarize(losses: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        values = torch.stack(list(losses.values()))  # in the step's order: the weights are reported in it
        if not every_dataset:
            return values, scalarizer(values)
        _stack(losses, flags)  # checks that every dataset is there
        position = {t: i for i, t in enumerate(losses)}
        return values, scalarizer(torch.stack([values[position[t]] for t in flags]))

    return scalarize


def _separable(per_dataset: nn.ModuleDict) -> Callable:
    """Sum of one scalarizer per dataset of the step: methods whose terms are separate per task (UW, IMTL-L)."""

    def scalarize(losses: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        values = torch.stack(list(losses.values()))
        total = sum(per_dataset[t](v) for t, v in zip(losses, values.unbind()))
        return values, total

    return scalarize


def learned_per_dataset(make: Callable[[], nn.Module]) -> Callable[[list[str], dict, Context], Method]:
    """One learned scalarizer per dataset, trained by Adam at loss.weighting_args.lr (default: the backbone's)."""

    def build(flags: list[str], args: dict, ctx: Context) -> Method:
        per_dataset = nn.ModuleDict({t: make() for t in flags}).to(ctx.device)
        learned = [p for t in flags for p in per_dataset[t].parameters()]
        lr = ctx.lr if args["lr"] is None else args["lr"]
        optimizer = torch.optim.Adam(learned, lr=lr)
        return ScalarizerMethod(flags, _separable(per_dataset), per_dataset, learned, optimizer)

    return build


def stateless(make: Callable[[dict], nn.Module]) -> Callable[[list[str], dict, Context], Method]:
    def build(flags: list[str], args: dict, ctx: Context) -> Method:
        scalarizer = make(args)
        return ScalarizerMethod(flags, _joint(scalarizer, flags, False), scalarizer, [], None)

    return build


class _RandomWeights(nn.Module):
    """RLW (Lin et al. 2022): weights T·softmax(z), z ~ N(0, I) over all T datasets, drawn afresh every step.

    TorchJD's Random draws from the global RNG over the values it is given, so with one dataset per step its
    weight would always be 1; here the draw is over every dataset (mean weight 1, like `none`) from a generator
    of the method's own (seeded, checkpointed, identical on every DDP rank).
    """

    def __init__(self, flags: list[str], seed: int) -> None:
        super().__init__()
        self.flags = flags
        self.seed = seed
        self.generator: torch.Generator | None = None
        self.pending_state: Tensor | None = None

    def forward(self, losses: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        values = torch.stack(list(losses.values()))
        if self.generator is None:
            self.generator = torch.Generator(device=values.device).manual_seed(self.seed)
            if self.pending_state is not None:
                self.generator.set_state(self.pending_state)
        z = torch.randn(len(self.flags), generator=self.generator, device=values.device)
        weights = len(self.flags) * z.softmax(dim=0)
        step_weights = torch.stack([weights[self.flags.index(t)] for t in losses])
        return values, (step_weights * values).sum()


class _RandomHooks(ScalarizerHooks):
    def state_dict(self, method: ScalarizerMethod) -> dict:
        random: _RandomWeights = method.module
        state = random.generator.get_state() if random.generator is not None else random.pending_state
        return {} if state is None else {"generator": state}

    def load_state_dict(self, method: ScalarizerMethod, state: dict) -> None:
        random: _RandomWeights = method.module
        random.generator, random.pending_state = None, state.get("generator")


def rlw(flags: list[str], args: dict, ctx: Context) -> Method:
    random = _RandomWeights(flags, ctx.seed)
    return ScalarizerMethod(flags, random, random, [], None, _RandomHooks())


class _DWAHooks(ScalarizerHooks):
    """DWA rolls its epoch averages once per epoch: after every `steps_per_epoch` steps."""

    def __init__(self, steps_per_epoch: int, device: torch.device) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.device = device

    def after(self, method: ScalarizerMethod) -> None:
        if method.steps % self.steps_per_epoch == 0:
            method.module.step()

    def state_dict(self, method: ScalarizerMethod) -> dict:
        return torchjd_state.dwa_state(method.module)

    def load_state_dict(self, method: ScalarizerMethod, state: dict) -> None:
        torchjd_state.load_dwa_state(method.module, state, self.device)


def dwa(flags: list[str], args: dict, ctx: Context) -> Method:
    method = scalarization.DWA(temperature=args["temperature"])
    hooks = _DWAHooks(ctx.steps_per_epoch, ctx.device)
    return ScalarizerMethod(flags, _joint(method, flags, True), method, [], None, hooks)


class _FAMOHooks(ScalarizerHooks):
    """FAMO updates its logits from the change of the losses across a step.

    The paper re-evaluates the same batch after the optimizer step; mmpt instead uses the next step's losses
    (a fresh batch of every dataset), which saves a forward pass per step.
    """

    def before(self, method: ScalarizerMethod, losses: dict[str, Tensor]) -> None:
        famo: scalarization.FAMO = method.module
        if torchjd_state.famo_has_losses(famo):
            famo.update(_stack(losses, method.flags).detach())

    def state_dict(self, method: ScalarizerMethod) -> dict:
        return torchjd_state.famo_state(method.module)

    def load_state_dict(self, method: ScalarizerMethod, state: dict) -> None:
        torchjd_state.load_famo_state(method.module, state)


def famo(flags: list[str], args: dict, ctx: Context) -> Method:
    method = scalarization.FAMO(len(flags), lr=args["lr"], weight_decay=args["weight_decay"]).to(ctx.device)
    return ScalarizerMethod(flags, _joint(method, flags, True), method, [], None, _FAMOHooks())


# the build function of each loss-based method (declared in mmpt.config.methods)
SCALARIZER_BUILDERS: dict[str, Callable[[list[str], dict, Context], Method]] = {
    "uw": learned_per_dataset(lambda: scalarization.UW(())),
    "imtl_l": learned_per_dataset(lambda: scalarization.IMTLL(())),
    "rlw": rlw,
    "dwa": dwa,
    "famo": famo,
    "geometric_mean": stateless(lambda a: scalarization.GeometricMean()),
    "stch": stateless(lambda a: scalarization.STCH(mu=a["mu"])),
}
