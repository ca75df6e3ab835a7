"""What each weighting method is, without its implementation: the registry the schema and the docs read.

A `MethodSpec` declares its kind, what it does, its paper, its options (loss.weighting_args, each a `Key` checked
as config keys are), the sampler.tasks_per_step it needs, the solver modules it needs and whether it reads
loss.weights; whether it runs under DDP follows from its kind. The build functions live beside the
implementations (static.py, scalarizers.py, aggregators.py) and mmpt.mtl.build checks at import that they
build exactly these methods. This module imports neither torch nor TorchJD.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass, field

from mmpt.config.settings import Key, check, key

STATIC, LOSS, GRADIENT = "static", "loss-based", "gradient-based"
# what a method needs from sampler.tasks_per_step
ANY, SEVERAL, ALL = "any", "several", "all"

SOLVERS_EXTRA = 'pip install -e ".[mtl-solvers]"'


def _whole(value: float) -> str | None:
    return None if value == int(value) else f"must be a whole number, got {value!r}"


def option(name: str, default: float | None, doc: str, *, whole: bool = False, **bounds: float) -> Key:
    """One option of a method (a key of loss.weighting_args): a number, a whole one for an iteration count.

    Options are numbers in the config (loss.weighting_args maps names to numbers), so a count is a number that
    must be whole. default None: the build function decides (e.g. the backbone's learning rate).
    """
    return key(name, float, default, doc, check=_whole if whole else None, **bounds)


def options(*keys: Key) -> dict[str, Key]:
    return {k.name: k for k in keys}


@dataclass(frozen=True)
class MethodSpec:
    """One weighting method: everything the validation and the docs need to know about it."""

    kind: str  # STATIC, LOSS or GRADIENT
    summary: str  # what it does, in a few words
    reference: str = ""
    args: dict[str, Key] = field(default_factory=dict)  # the keys of loss.weighting_args it takes
    tasks: str = ANY  # ANY, SEVERAL (tasks_per_step >= 2) or ALL (tasks_per_step: all)
    needs: tuple[str, ...] = ()  # Python modules of its solver (CORE_SOLVERS come with mmpt, others with an extra)
    reads_weights: bool = False  # takes one weight per dataset from loss.weights

    @property
    def distributed(self) -> bool:
        """Whether it runs under DDP: gradient-based methods aggregate per-dataset gradients on one process."""
        return self.kind != GRADIENT

    def defaults(self) -> dict[str, float | None]:
        return {name: k.default for name, k in self.args.items()}


LEARNED_LR = option("lr", None, "Adam learning rate of the learned parameters; default: optim.lr", gt=0)
# installed with mmpt (torchjd[quadprog-projector]); the other solvers come with the mtl-solvers extra
CORE_SOLVERS = ("qpsolvers", "quadprog")

METHODS: dict[str, MethodSpec] = {
    # static: a fixed multiplier per dataset (static.py)
    "none": MethodSpec(STATIC, "1 per dataset", "mm-PT (Woerner et al. 2024)"),
    "size": MethodSpec(STATIC, "min|D| / |D_t|", "Bachmeier 2024"),
    "inverse_size": MethodSpec(STATIC, "max|D| / |D_t|"),
    "sqrt_size": MethodSpec(STATIC, "√(min|D| / |D_t|)"),
    "manual": MethodSpec(STATIC, "loss.weights: {flag: w}, every trained dataset and no other", reads_weights=True),
    # loss-based: a TorchJD Scalarizer over the loss vector (scalarizers.py)
    "uw": MethodSpec(LOSS, "learned log-variances", "Kendall et al. 2018", options(LEARNED_LR)),
    "imtl_l": MethodSpec(LOSS, "learned scales", "Liu et al. 2021 (IMTL-L)", options(LEARNED_LR)),
    "rlw": MethodSpec(LOSS, "T·softmax(z), z ~ N(0, I) per step", "Lin et al. 2022"),
    "dwa": MethodSpec(
        LOSS,
        "epoch loss ratios",
        "Liu et al. 2019",
        options(option("temperature", 2.0, "softmax temperature over the loss ratios", gt=0)),
        ALL,
    ),
    "famo": MethodSpec(
        LOSS,
        "learned logits",
        "Liu et al. 2023",
        options(
            option("lr", 0.025, "learning rate of the logits", gt=0),
            option("weight_decay", 0.001, "weight decay of the logits", ge=0),
        ),
        ALL,
    ),
    "geometric_mean": MethodSpec(LOSS, "geometric mean of the losses", "Chennupati et al. 2019", tasks=SEVERAL),
    "stch": MethodSpec(
        LOSS,
        "smooth max",
        "Lin et al. 2024",
        options(option("mu", 1.0, "smoothing of the max (smaller: closer to the max)", gt=0)),
        SEVERAL,
    ),
    # gradient-based: a TorchJD Aggregator over the Jacobian of the losses w.r.t. the backbone (aggregators.py)
    "upgrad": MethodSpec(
        GRADIENT,
        "each gradient projected onto the dual cone, averaged",
        "Quinton & Rey 2024",
        tasks=SEVERAL,
        needs=CORE_SOLVERS,
    ),
    "pcgrad": MethodSpec(GRADIENT, "conflicting components projected away", "Yu et al. 2020", tasks=SEVERAL),
    "mgda": MethodSpec(
        GRADIENT,
        "minimum-norm point of the gradients' convex hull",
        "Sener & Koltun 2018",
        options(
            option("epsilon", 0.001, "stopping tolerance of the solver", gt=0),
            option("max_iters", 100, "iterations of the solver at most", whole=True, ge=1),
        ),
        SEVERAL,
    ),
    "cagrad": MethodSpec(
        GRADIENT,
        "conflict-averse direction near the mean",
        "Liu et al. 2021 (CAGrad)",
        options(option("c", 0.5, "radius of the region around the mean gradient", gt=0)),
        SEVERAL,
        needs=("cvxpy", "clarabel"),
    ),
    "nash_mtl": MethodSpec(
        GRADIENT,
        "Nash bargaining solution",
        "Navon et al. 2022",
        options(
            option("max_norm", 1.0, "clip the aggregated gradient's norm to this (0: no clipping)", ge=0),
            option("update_weights_every", 1, "steps between two solves of the weights", whole=True, ge=1),
            option("optim_niter", 20, "iterations of the solver", whole=True, ge=1),
        ),
        ALL,
        needs=("cvxpy", "ecos"),
    ),
    "imtl_g": MethodSpec(GRADIENT, "equal projections of the aggregate", "Liu et al. 2021 (IMTL-G)", tasks=SEVERAL),
    "aligned_mtl": MethodSpec(GRADIENT, "aligned principal components", "Senushkin et al. 2023", tasks=SEVERAL),
    "graddrop": MethodSpec(GRADIENT, "sign dropout; no weights (logged as NaN)", "Chen et al. 2020", tasks=SEVERAL),
    "dualproj": MethodSpec(
        GRADIENT, "projection of the mean onto the dual cone", "Quinton & Rey 2024", tasks=SEVERAL, needs=CORE_SOLVERS
    ),
    "config": MethodSpec(
        GRADIENT, "conflict-free direction; no weights (logged as NaN)", "Liu et al. 2025 (ConFIG)", tasks=SEVERAL
    ),
    "fairgrad": MethodSpec(
        GRADIENT,
        "α-fair allocation",
        "Ban & Ji 2024",
        options(option("alpha", 1.0, "fairness exponent (1: proportional fairness)", gt=0)),
        SEVERAL,
    ),
    "jd_mean": MethodSpec(GRADIENT, "plain mean through the Jacobian path (a baseline for its cost)"),
    # stateful aggregators keep one entry per row of the Jacobian: the same datasets in every step (ALL)
    "gradvac": MethodSpec(
        GRADIENT,
        "each pair's cosine raised toward its moving target",
        "Wang et al. 2021 (Gradient Vaccine)",
        options(
            option("beta", 0.5, "decay of the moving cosine targets", gt=0, le=1),
            option("eps", 1e-8, "added to the denominators", ge=0),
        ),
        ALL,
    ),
    "excess_mtl": MethodSpec(
        GRADIENT,
        "weights raised for the tasks with the larger excess risk",
        "He et al. 2024 (ExcessMTL)",
        options(
            option("robust_step_size", 1.0, "step size of the exponentiated weight update", gt=0),
            option("n_warmup_steps", 0, "steps of uniform weights that set the excess-risk baseline", whole=True, ge=0),
        ),
        ALL,
    ),
    "cr_mogm": MethodSpec(
        GRADIENT,
        "MGDA's weights smoothed by a moving average",
        "Zhou et al. 2022 (CR-MOGM)",
        options(option("alpha", 0.9, "weight of the previous weights in the moving average", ge=0, lt=1)),
        ALL,
    ),
}


def method_problems(
    name: str,
    args: dict[str, float],
    *,
    tasks_per_step: int | str,
    weights: dict[str, float] | None = None,
    datasets: Iterable[str] = (),
) -> list[str]:
    """What is wrong with weighting `name` (a key of METHODS) under these settings (empty when nothing is).

    The rules between loss.weighting and loss.weighting_args, sampler.tasks_per_step and loss.weights, checked
    where a config is loaded (mmpt.config.from_dict). Each problem is one phrase naming the setting to change.
    `weights` (loss.weights) are checked against `datasets` (flags) for a method that reads them; None: not
    checked (their own problem was reported already).
    """
    assert name in METHODS, f"loss.weighting {name!r} reached the method rules unchecked"
    method = METHODS[name]
    problems = []
    unknown = sorted(set(args) - set(method.args))
    if unknown:
        valid = f"it takes {', '.join(method.args)}" if method.args else "it takes no options"
        problems.append(f"loss.weighting_args has {', '.join(unknown)}, which {name} does not take ({valid})")
    for option_name, value in args.items():
        if option_name in method.args:
            _, problem = check(method.args[option_name], value)
            if problem:
                problems.append(f"loss.weighting_args.{option_name} of {name} {problem}")
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
    if method.reads_weights:
        if weights is not None:
            problems += _weights_problems(name, weights, list(datasets))
    elif weights:
        readers = ", ".join(n for n, m in METHODS.items() if m.reads_weights)
        problems.append(f"loss.weights is only read by loss.weighting={readers}, not {name}; remove it")
    return problems


def _weights_problems(name: str, weights: dict[str, float], datasets: list[str]) -> list[str]:
    """One weight per trained dataset, none negative, not all zero."""
    problems = []
    missing = [t for t in datasets if t not in weights]
    extra = [t for t in weights if t not in datasets]
    if missing or extra:
        problems.append(
            f"loss.weighting={name} needs one weight per trained dataset in loss.weights"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; not trained: {', '.join(extra)}" if extra else "")
        )
    negative = [t for t, w in weights.items() if w < 0]
    if negative:
        problems.append(f"loss.weights must be >= 0, got negative weights for {', '.join(negative)}")
    elif weights and not missing and all(w == 0 for w in weights.values()):
        problems.append(
            "loss.weights are all 0, so the loss would be 0 and nothing would train; give at least one dataset a "
            "positive weight"
        )
    return problems


def missing_solvers(name: str) -> list[str]:
    """The solver modules `name` needs that are not installed (the mtl-solvers extra)."""
    return [module for module in METHODS[name].needs if importlib.util.find_spec(module) is None]


def environment_problems(name: str, world_size: int) -> list[str]:
    """What keeps weighting `name` from running in this environment: more than one process for a method that
    aggregates on one, or a solver that is not installed. Checked once per run, before anything is built."""
    problems = []
    if not METHODS[name].distributed and world_size > 1:
        problems.append(
            f"loss.weighting={name} aggregates per-dataset gradients on one process and does not support "
            f"distributed training ({world_size} processes); train on one GPU or choose a loss-based method"
        )
    missing = missing_solvers(name)
    if missing:
        problems.append(f"loss.weighting={name} needs {', '.join(missing)}: install them with {SOLVERS_EXTRA}")
    return problems
