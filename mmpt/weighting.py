"""How a step's per-dataset losses become one backward pass: static weights, TorchJD scalarizers, TorchJD aggregators.

Three families behind one Protocol (`Weighting`):
- static: a fixed multiplier per dataset (none, size, inverse_size, sqrt_size, manual);
- loss-based: a `torchjd.scalarization` Scalarizer turns the loss vector into one scalar (uw, rlw, dwa, famo,
  imtl_l, geometric_mean, stch); its learnable parameters are trained by an optimizer this module owns;
- gradient-based: `torchjd.autojac.mtl_backward` computes the Jacobian of the step's losses w.r.t. the shared
  backbone, and a `torchjd.aggregation` Aggregator turns it into one gradient (upgrad, pcgrad, mgda, ...).

To add a method, add one `Method` to METHODS (a TorchJD aggregator: one line in AGGREGATORS).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn
from torchjd import aggregation, scalarization
from torchjd.autojac import jac_to_grad, mtl_backward

from mmpt.errors import MmptError, lookup

STATIC, LOSS, GRADIENT = "static", "loss-based", "gradient-based"
# what a method needs from sampler.tasks_per_step
ANY, SEVERAL, ALL = "any", "several", "all"
SOLVERS_EXTRA = 'pip install -e ".[mtl-solvers]"'


class Weighting(Protocol):
    """What the training step needs from a multi-task weighting method."""

    def backward(self, losses: dict[str, Tensor], features: Tensor, scale: Callable[[Tensor], Tensor]) -> None:
        """Run this step's backward pass.

        losses: per-dataset mean loss of the step (0-dim, unweighted), keyed by flag in the step's order;
        under DDP each value is the global mean with the local rank's gradient. features: the backbone's
        output for the whole step (N_total×F, the datasets' slices in the order of `losses`). scale: the
        fp16 GradScaler's scale (identity otherwise), applied to a scalar before .backward().
        Scalarizers and static weights never synchronise with the device; aggregators do (their solvers
        run on the host).
        """
        ...

    def weights(self) -> dict[str, Tensor]:
        """Effective weight of each dataset of the last step (0-dim device tensors; NaN where a method has none)."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Method:
    """One weighting method: how to build it and what it needs."""

    kind: str  # STATIC, LOSS or GRADIENT
    build: Callable[..., Weighting]  # (flags, args, context) -> Weighting
    args: dict[str, float] = field(default_factory=dict)  # loss.weighting_args keys and defaults (None: see doc)
    tasks: str = ANY  # ANY, SEVERAL (tasks_per_step >= 2) or ALL (tasks_per_step: all)
    needs: tuple[str, ...] = ()  # Python modules of a solver (all in the mtl-solvers extra)
    reference: str = ""


@dataclass(frozen=True)
class Context:
    """What build functions may use beyond the method's args."""

    train_sizes: dict[str, int]
    device: torch.device
    lr: float  # the backbone's learning rate: the default of learned method parameters
    seed: int
    steps_per_epoch: int
    shared_params: tuple[Tensor, ...]
    weights: dict[str, float]  # loss.weights (manual only)


# ---------------------------------------------------------------------------------------------------------------
# static weights


class StaticWeighting:
    """A fixed multiplier per dataset: the step's loss is sum_t w_t * L_t."""

    def __init__(self, weights: dict[str, float]) -> None:
        self._weights = dict(weights)
        self._as_tensors = {t: torch.tensor(w) for t, w in weights.items()}  # made once, not per step
        self._last: dict[str, Tensor] = {}

    def backward(self, losses: dict[str, Tensor], features: Tensor, scale: Callable[[Tensor], Tensor]) -> None:
        total = sum(self._weights[t] * loss for t, loss in losses.items())
        scale(total).backward()
        self._last = {t: self._as_tensors[t] for t in losses}

    def weights(self) -> dict[str, Tensor]:
        return self._last

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _size_weights(rule: Callable[[int, int, int], float]) -> Callable[..., Weighting]:
    def build(flags: list[str], args: dict, ctx: Context) -> Weighting:
        sizes = ctx.train_sizes
        assert sizes and min(sizes.values()) > 0, f"train sizes must be positive, got {sizes}"
        smallest, largest = min(sizes.values()), max(sizes.values())
        return StaticWeighting({t: rule(sizes[t], smallest, largest) for t in flags})

    return build


def _manual(flags: list[str], args: dict, ctx: Context) -> Weighting:
    return StaticWeighting({t: float(ctx.weights[t]) for t in flags})


# ---------------------------------------------------------------------------------------------------------------
# loss-based: TorchJD scalarizers


class ScalarizerWeighting:
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

    def backward(self, losses: dict[str, Tensor], features: Tensor, scale: Callable[[Tensor], Tensor]) -> None:
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

    def weights(self) -> dict[str, Tensor]:
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


class ScalarizerHooks:
    """Extra state and calls of a stateful scalarizer (DWA's epoch roll, FAMO's logit update)."""

    def before(self, weighting: ScalarizerWeighting, losses: dict[str, Tensor]) -> None:
        pass

    def after(self, weighting: ScalarizerWeighting) -> None:
        pass

    def state_dict(self, weighting: ScalarizerWeighting) -> dict:
        return {}

    def load_state_dict(self, weighting: ScalarizerWeighting, state: dict) -> None:
        pass


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


def _learned_per_dataset(make: Callable[[], nn.Module]) -> Callable[..., Weighting]:
    def build(flags: list[str], args: dict, ctx: Context) -> Weighting:
        per_dataset = nn.ModuleDict({t: make() for t in flags}).to(ctx.device)
        learned = [p for t in flags for p in per_dataset[t].parameters()]
        lr = ctx.lr if args["lr"] is None else args["lr"]
        optimizer = torch.optim.Adam(learned, lr=lr)
        return ScalarizerWeighting(flags, _separable(per_dataset), per_dataset, learned, optimizer)

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
    def state_dict(self, weighting: ScalarizerWeighting) -> dict:
        random: _RandomWeights = weighting.module
        state = random.generator.get_state() if random.generator is not None else random.pending_state
        return {} if state is None else {"generator": state}

    def load_state_dict(self, weighting: ScalarizerWeighting, state: dict) -> None:
        random: _RandomWeights = weighting.module
        random.generator, random.pending_state = None, state.get("generator")


def _rlw(flags: list[str], args: dict, ctx: Context) -> Weighting:
    random = _RandomWeights(flags, ctx.seed)
    return ScalarizerWeighting(flags, random, random, [], None, _RandomHooks())


class _DWAHooks(ScalarizerHooks):
    """DWA rolls its epoch averages once per epoch: after every `steps_per_epoch` steps."""

    def __init__(self, steps_per_epoch: int, device: torch.device) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.device = device

    def after(self, weighting: ScalarizerWeighting) -> None:
        if weighting.steps % self.steps_per_epoch == 0:
            weighting.module.step()

    def state_dict(self, weighting: ScalarizerWeighting) -> dict:
        dwa: scalarization.DWA = weighting.module
        state = {"n_batches": dwa._n_batches, "previous_averages": list(dwa._previous_averages)}
        if dwa._loss_sum is not None:
            state["loss_sum"] = dwa._loss_sum
        return state

    def load_state_dict(self, weighting: ScalarizerWeighting, state: dict) -> None:
        dwa: scalarization.DWA = weighting.module
        device = self.device
        dwa._n_batches = state["n_batches"]
        dwa._previous_averages = [a.to(device) for a in state["previous_averages"]]
        dwa._loss_sum = state["loss_sum"].to(device) if "loss_sum" in state else None


def _dwa(flags: list[str], args: dict, ctx: Context) -> Weighting:
    dwa = scalarization.DWA(temperature=args["temperature"])
    hooks = _DWAHooks(ctx.steps_per_epoch, ctx.device)
    return ScalarizerWeighting(flags, _joint(dwa, flags, True), dwa, [], None, hooks)


class _FAMOHooks(ScalarizerHooks):
    """FAMO updates its logits from the change of the losses across a step.

    The paper re-evaluates the same batch after the optimizer step; mmpt instead uses the next step's losses
    (a fresh batch of every dataset), which saves a forward pass per step.
    """

    def before(self, weighting: ScalarizerWeighting, losses: dict[str, Tensor]) -> None:
        famo: scalarization.FAMO = weighting.module
        if famo._prev_losses is not None:
            famo.update(_stack(losses, weighting.flags).detach())

    def state_dict(self, weighting: ScalarizerWeighting) -> dict:
        famo: scalarization.FAMO = weighting.module
        state = {}
        if famo._prev_losses is not None:
            state["prev_losses"] = famo._prev_losses
        if famo._optimizer is not None:
            state["famo_optimizer"] = famo._optimizer.state_dict()
        return state

    def load_state_dict(self, weighting: ScalarizerWeighting, state: dict) -> None:
        famo: scalarization.FAMO = weighting.module
        famo._prev_losses = state["prev_losses"].to(famo._w.device) if "prev_losses" in state else None
        famo._optimizer = None
        if "famo_optimizer" in state:
            # the optimizer FAMO.update creates on first use, recreated to receive its saved state
            famo._optimizer = torch.optim.Adam([famo._w], lr=famo.lr, weight_decay=famo.weight_decay)
            famo._optimizer.load_state_dict(state["famo_optimizer"])


def _famo(flags: list[str], args: dict, ctx: Context) -> Weighting:
    famo = scalarization.FAMO(len(flags), lr=args["lr"], weight_decay=args["weight_decay"]).to(ctx.device)
    return ScalarizerWeighting(flags, _joint(famo, flags, True), famo, [], None, _FAMOHooks())


def _stateless(make: Callable[[dict], nn.Module]) -> Callable[..., Weighting]:
    def build(flags: list[str], args: dict, ctx: Context) -> Weighting:
        scalarizer = make(args)
        return ScalarizerWeighting(flags, _joint(scalarizer, flags, False), scalarizer, [], None)

    return build


# ---------------------------------------------------------------------------------------------------------------
# gradient-based: TorchJD aggregators over the Jacobian w.r.t. the shared backbone


class AggregatorWeighting:
    """torchjd.autojac.mtl_backward + jac_to_grad: each head gets its own loss's gradient; the backbone gets the
    aggregation of the step's per-dataset gradients (the rows of the Jacobian).

    Effective weights: the aggregator's weights on the Jacobian's rows (NaN for aggregators without weights,
    e.g. GradDrop).
    """

    def __init__(self, aggregator: nn.Module, shared_params: tuple[Tensor, ...]) -> None:
        assert shared_params, "a gradient-based method needs the backbone's parameters (shared_params)"
        self.aggregator = aggregator
        self.shared_params = shared_params
        self._last: dict[str, Tensor] = {}

    def backward(self, losses: dict[str, Tensor], features: Tensor, scale: Callable[[Tensor], Tensor]) -> None:
        # every task's loss is scaled alike: the aggregators are positively homogeneous, so unscaling still works
        mtl_backward([scale(loss) for loss in losses.values()], features=features, shared_params=self.shared_params)
        weights = jac_to_grad(self.shared_params, self.aggregator)
        if weights is None:
            weights = torch.full((len(losses),), math.nan, device=features.device)
        self._last = dict(zip(losses, weights.detach().unbind()))

    def weights(self) -> dict[str, Tensor]:
        return self._last

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NashMTLWeighting(AggregatorWeighting):
    """Nash-MTL keeps its last weights and Gramian normalisation (NumPy) between steps: saved as tensors."""

    def state_dict(self) -> dict:
        weighting = self.aggregator.weighting
        return {
            "step": float(weighting.step),
            "prvs_alpha": torch.from_numpy(weighting.prvs_alpha.copy()),
            "normalization_factor": torch.from_numpy(weighting.normalization_factor.copy()),
        }

    def load_state_dict(self, state: dict) -> None:
        weighting = self.aggregator.weighting
        weighting.step = state["step"]
        weighting.prvs_alpha = state["prvs_alpha"].numpy().copy()
        weighting.normalization_factor = state["normalization_factor"].numpy().copy()
        if weighting.step > 0:
            # NashMTL builds its solver problem on its first call only; rebuild it around the restored weights
            weighting._init_optim_problem()


def _aggregator(make: Callable[[int, dict], nn.Module], wrapper: type = AggregatorWeighting) -> Callable[..., Weighting]:
    def build(flags: list[str], args: dict, ctx: Context) -> Weighting:
        return wrapper(make(len(flags), args), ctx.shared_params)

    return build


def _int(args: dict, name: str) -> int:
    return int(args[name])


# name -> (factory(n_tasks, args), args with defaults, tasks needed, solver modules, reference)
AGGREGATORS: dict[str, tuple[Callable[[int, dict], nn.Module], dict, str, tuple[str, ...], str]] = {
    "upgrad": (
        lambda n, a: aggregation.UPGrad(), {}, SEVERAL, ("qpsolvers", "quadprog"),
        "Quinton & Rey 2024, Jacobian Descent for MTL",
    ),
    "pcgrad": (lambda n, a: aggregation.PCGrad(), {}, SEVERAL, (), "Yu et al. 2020, Gradient Surgery for MTL"),
    "mgda": (
        lambda n, a: aggregation.MGDA(epsilon=a["epsilon"], max_iters=_int(a, "max_iters")),
        {"epsilon": 0.001, "max_iters": 100}, SEVERAL, (), "Sener & Koltun 2018, MTL as Multi-Objective Optimization",
    ),
    "cagrad": (
        lambda n, a: aggregation.CAGrad(c=a["c"]), {"c": 0.5}, SEVERAL, ("cvxpy", "clarabel"),
        "Liu et al. 2021, Conflict-Averse Gradient Descent",
    ),
    "nash_mtl": (
        lambda n, a: aggregation.NashMTL(
            n_tasks=n, max_norm=a["max_norm"], update_weights_every=_int(a, "update_weights_every"),
            optim_niter=_int(a, "optim_niter"),
        ),
        {"max_norm": 1.0, "update_weights_every": 1, "optim_niter": 20}, ALL, ("cvxpy", "ecos"),
        "Navon et al. 2022, MTL as a Bargaining Game",
    ),
    "imtl_g": (lambda n, a: aggregation.IMTLG(), {}, SEVERAL, (), "Liu et al. 2021, Towards Impartial MTL"),
    "aligned_mtl": (lambda n, a: aggregation.AlignedMTL(), {}, SEVERAL, (), "Senushkin et al. 2023, Aligned-MTL"),
    "graddrop": (lambda n, a: aggregation.GradDrop(), {}, SEVERAL, (), "Chen et al. 2020, Gradient Sign Dropout"),
    "dualproj": (
        lambda n, a: aggregation.DualProj(), {}, SEVERAL, ("qpsolvers", "quadprog"), "Quinton & Rey 2024 (DualProj)",
    ),
    "config": (lambda n, a: aggregation.ConFIG(), {}, SEVERAL, (), "Liu et al. 2025, ConFIG"),
    "fairgrad": (
        lambda n, a: aggregation.FairGrad(alpha=a["alpha"]), {"alpha": 1.0}, SEVERAL, (),
        "Ban & Ji 2024, Fair Resource Allocation in MTO",
    ),
    "jd_mean": (lambda n, a: aggregation.Mean(), {}, ANY, (), "the Jacobian path with plain averaging (a baseline)"),
}


METHODS: dict[str, Method] = {
    "none": Method(STATIC, _size_weights(lambda n, lo, hi: 1.0), reference="every loss counts 1 (mm-PT default)"),
    "size": Method(STATIC, _size_weights(lambda n, lo, hi: lo / n), reference="min|D| / |D_t| (Bachmeier 2024)"),
    "inverse_size": Method(STATIC, _size_weights(lambda n, lo, hi: hi / n), reference="max|D| / |D_t|"),
    "sqrt_size": Method(STATIC, _size_weights(lambda n, lo, hi: math.sqrt(lo / n)), reference="sqrt(min|D| / |D_t|)"),
    "manual": Method(STATIC, _manual, reference="loss.weights: one weight per dataset"),
    "uw": Method(
        LOSS, _learned_per_dataset(lambda: scalarization.UW(())), {"lr": None},
        reference="Kendall et al. 2018, uncertainty weighting",
    ),
    "imtl_l": Method(
        LOSS, _learned_per_dataset(lambda: scalarization.IMTLL(())), {"lr": None},
        reference="Liu et al. 2021, Towards Impartial MTL (loss balance)",
    ),
    "rlw": Method(LOSS, _rlw, reference="Lin et al. 2022, Random Loss Weighting"),
    "dwa": Method(LOSS, _dwa, {"temperature": 2.0}, ALL, reference="Liu et al. 2019, Dynamic Weight Average"),
    "famo": Method(
        LOSS, _famo, {"lr": 0.025, "weight_decay": 0.001}, ALL, reference="Liu et al. 2023, FAMO",
    ),
    "geometric_mean": Method(
        LOSS, _stateless(lambda a: scalarization.GeometricMean()), tasks=SEVERAL,
        reference="Chennupati et al. 2019, geometric loss strategy",
    ),
    "stch": Method(
        LOSS, _stateless(lambda a: scalarization.STCH(mu=a["mu"])), {"mu": 1.0}, SEVERAL,
        reference="Lin et al. 2024, Smooth Tchebycheff scalarization",
    ),
    **{
        name: Method(
            GRADIENT, _aggregator(make, NashMTLWeighting if name == "nash_mtl" else AggregatorWeighting), args,
            tasks, needs, reference,
        )
        for name, (make, args, tasks, needs, reference) in AGGREGATORS.items()
    },
}


def method_problems(
    name: str,
    args: dict[str, float],
    *,
    tasks_per_step: int | str,
    num_datasets: int,
    world_size: int = 1,
    weights: dict[str, float] | None = None,
    datasets: Iterable[str] = (),
) -> list[str]:
    """Return what is wrong with running weighting `name` with these settings (empty when it can run).

    Each problem names the setting to change. `weights` and `datasets` (flags) are checked for `manual`.
    """
    if name not in METHODS:
        return [f"loss.weighting must be one of {', '.join(METHODS)}, got {name!r}"]
    method = METHODS[name]
    problems = []
    unknown = sorted(set(args) - set(method.args))
    if unknown:
        valid = f"it takes {', '.join(method.args)}" if method.args else "it takes no options"
        problems.append(f"loss.weighting_args has {', '.join(unknown)}, which {name} does not take ({valid})")
    for key, value in args.items():
        if key not in method.args:
            continue
        default = method.args[key]
        may_be_zero = key in ("weight_decay", "max_norm")  # max_norm 0: Nash-MTL without clipping
        if isinstance(default, int) and (value != int(value) or value < 1):
            problems.append(f"loss.weighting_args.{key} of {name} must be a whole number >= 1, got {value!r}")
        elif value < 0 or (value == 0 and not may_be_zero):
            problems.append(f"loss.weighting_args.{key} of {name} must be {'>= 0' if may_be_zero else '> 0'}, got {value!r}")
    several = tasks_per_step == "all" or (isinstance(tasks_per_step, int) and tasks_per_step >= 2)
    if method.tasks == ALL and tasks_per_step != "all":
        problems.append(
            f"loss.weighting={name} needs every dataset in every step; set sampler.tasks_per_step=all "
            f"(got {tasks_per_step})"
        )
    elif method.tasks == SEVERAL and not several:
        problems.append(
            f"loss.weighting={name} combines several datasets per step; set sampler.tasks_per_step to 2 or more "
            f"or all (got {tasks_per_step})"
        )
    if method.kind == GRADIENT and world_size > 1:
        problems.append(
            f"loss.weighting={name} aggregates per-dataset gradients on one process and does not support "
            f"distributed training ({world_size} processes); train on one GPU or choose a loss-based method"
        )
    if name == "manual":
        weights = weights or {}
        datasets = list(datasets)
        missing = [t for t in datasets if t not in weights]
        extra = [t for t in weights if t not in datasets]
        if missing or extra:
            problems.append(
                "loss.weighting=manual needs one weight per trained dataset in loss.weights"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; not trained: {', '.join(extra)}" if extra else "")
            )
        negative = [t for t, w in weights.items() if w < 0]
        if negative:
            problems.append(f"loss.weights must be >= 0, got negative weights for {', '.join(negative)}")
    elif weights:
        problems.append(f"loss.weights is only read by loss.weighting=manual, not {name}; remove it")
    return problems


def missing_solvers(name: str) -> list[str]:
    """Return the solver modules `name` needs that are not installed (the mtl-solvers extra)."""
    return [module for module in METHODS[name].needs if importlib.util.find_spec(module) is None]


def check_weighting(
    name: str,
    args: dict[str, float],
    *,
    tasks_per_step: int | str,
    world_size: int,
    datasets: list[str],
    weights: dict[str, float] | None = None,
) -> None:
    """Raise MmptError (one line naming the setting to change) when `name` cannot run with these settings, or
    when a solver it needs is not installed."""
    lookup("loss weighting", METHODS, name)
    problems = method_problems(
        name, dict(args), tasks_per_step=tasks_per_step, num_datasets=len(datasets), world_size=world_size,
        weights=weights, datasets=datasets,
    )
    if problems:
        raise MmptError("; ".join(problems))
    missing = missing_solvers(name)
    if missing:
        raise MmptError(f"loss.weighting={name} needs {', '.join(missing)}: install them with {SOLVERS_EXTRA}")


def build_weighting(
    name: str,
    train_sizes: dict[str, int],
    args: dict[str, float] | None = None,
    *,
    tasks_per_step: int | str = 1,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    lr: float = 1e-3,
    seed: int = 0,
    steps_per_epoch: int = 1,
    shared_params: Iterable[Tensor] = (),
    weights: dict[str, float] | None = None,
) -> Weighting:
    """Return the weighting method `name` for datasets with these train-split sizes (keys: flags, in step order).

    args: loss.weighting_args (missing keys take the method's defaults; a learned method's `lr` defaults to
    `lr`, the backbone's). steps_per_epoch: DWA's epoch length. shared_params: the backbone's parameters
    (gradient-based methods). weights: loss.weights (manual).
    Raises MmptError for an unknown name (listing the valid ones), bad args, a method that cannot run with
    `tasks_per_step` or `world_size`, or a missing solver of the mtl-solvers extra.
    """
    method = lookup("loss weighting", METHODS, name)
    args = dict(args or {})
    flags = list(train_sizes)
    check_weighting(name, args, tasks_per_step=tasks_per_step, world_size=world_size, weights=weights, datasets=flags)
    context = Context(
        train_sizes=dict(train_sizes), device=torch.device(device), lr=lr, seed=seed,
        steps_per_epoch=max(1, steps_per_epoch), shared_params=tuple(p for p in shared_params if p.requires_grad),
        weights=dict(weights or {}),
    )
    return MethodState(name, method.build(flags, {**method.args, **args}, context))


class MethodState:
    """Wraps a method: its checkpoint names it (resuming with another loss.weighting is an error), and it sums
    each dataset's effective weight on the device for the per-epoch record (`mean_weights`)."""

    def __init__(self, name: str, method: Weighting) -> None:
        self.name = name
        self.method = method
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def backward(self, losses: dict[str, Tensor], features: Tensor, scale: Callable[[Tensor], Tensor]) -> None:
        self.method.backward(losses, features, scale)
        for t, w in self.method.weights().items():
            self._sums[t] = self._sums[t] + w if t in self._sums else w.clone()
            self._counts[t] = self._counts.get(t, 0) + 1

    def weights(self) -> dict[str, Tensor]:
        return self.method.weights()

    def mean_weights(self) -> dict[str, float]:
        """Each dataset's mean effective weight over its steps since the last call (one read per dataset, once
        per epoch)."""
        means = {t: float(self._sums[t]) / self._counts[t] for t in self._sums}
        self._sums, self._counts = {}, {}
        return means

    def state_dict(self) -> dict:
        return {
            "method": self.name, "state": self.method.state_dict(),
            "weight_sums": dict(self._sums), "weight_counts": dict(self._counts),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("method", "none or size (an earlier mmpt)")
        if saved != self.name and not (not state.get("method") and METHODS[self.name].kind == STATIC):
            raise MmptError(
                f"the checkpoint was trained with loss.weighting={saved}, not {self.name}; resume with the run's "
                "own config or start a new run with --output"
            )
        self.method.load_state_dict(state.get("state", {}))
        self._sums = dict(state.get("weight_sums", {}))
        self._counts = dict(state.get("weight_counts", {}))
