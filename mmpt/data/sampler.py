"""The mm-PT batch sampler (Algorithm 1): a seeded epoch plan of steps, each a list of (task, index batch) pairs.

`Sampler` is built once from the train sizes, the batch size, the sampler settings and the seed; `plan(epoch)`
returns one epoch's steps, `steps` their number and `updates_per_task` each head's updates per epoch. A step
holds one (task, indices) pair (tasks_per_step 1, Algorithm 1) or one per dataset of the step, in task order.

The plan is a pure function of its arguments, so a run can resume mid-epoch by rebuilding the plan
and skipping the steps already taken, and every DDP rank builds the same plan.

Random streams: each task draws from its own stream, keyed by (seed, epoch) and a hash of the task
name, and the interleaving from another. So a task's batches do not depend on the order of `sizes`
or on which other tasks are trained, and the plan does not depend on the order of `sizes` either.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

from mmpt.config.choices import LAST_BATCH
from mmpt.errors import MmptError

# spawn-key tags that keep the streams apart (SeedSequence pads short entropy with zeros, so
# distinct entropy lengths alone would not separate them)
_INTERLEAVE = 0
_TASK = 1
_GROUP = 2  # which datasets share a step (tasks_per_step >= 2)


def _rng(seed: int, epoch: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch], spawn_key=key))


def _task_key(task: str) -> int:
    # crc32 is stable across processes, unlike hash(str)
    return zlib.crc32(task.encode())


def _assert_valid(sizes: dict[str, int], batch_size: int, last_batch: str) -> None:
    # the settings were checked where the config was loaded, the split sizes where the data was opened
    assert sizes and min(sizes.values()) >= 1, f"the sampler needs non-empty train splits, got {sizes}"
    assert batch_size >= 1, f"batch size must be >= 1, got {batch_size}"
    assert last_batch in LAST_BATCH, f"last_batch must be one of {', '.join(LAST_BATCH)}, got {last_batch!r}"


# BatchNorm's batch statistics need two images per channel: no batch a BatchNorm layer trains on (a dataset's part
# of a training step, a batch of a statistics calibration or recalibration) holds fewer
BATCHNORM_MIN_IMAGES = 2


def min_batch(batch_size: int) -> int:
    """The smallest last batch kept on its own: a smaller remainder joins the split's previous batch.

    Half a batch, so it does not depend on the world size, and never fewer than BATCHNORM_MIN_IMAGES (with
    batch_size 2, a remainder of one image joins the previous batch: a one-image batch cannot train BatchNorm).
    """
    return max(BATCHNORM_MIN_IMAGES, math.ceil(batch_size / 2))


def _batch_count(n: int, batch_size: int, last_batch: str) -> int:
    full, rest = divmod(n, batch_size)
    if last_batch == "drop":
        return full
    # a remainder below min_batch is folded into the previous batch; a split smaller than a batch is one batch
    return full + (1 if rest and (rest >= min_batch(batch_size) or full == 0) else 0)


def batch_sizes(n: int, batch_size: int, last_batch: str = "keep") -> list[int]:
    """The sizes of the batches one pass over a train split of `n` images is cut into, in order: `batch_size` each,
    the last one running to the end of the split with "keep" (see batches_per_task)."""
    count = _batch_count(n, batch_size, last_batch)
    sizes = [batch_size] * count
    if count and last_batch == "keep":
        sizes[-1] = n - batch_size * (count - 1)
    return sizes


def batch_count(images: int, batch_size: int) -> int:
    """How many near-equal batches `images` images are cut into: ceil(images / batch_size), fewer where that would
    leave a batch below BATCHNORM_MIN_IMAGES, so that every batch of images >= 2 holds 2 or more."""
    return max(1, min(-(-images // batch_size), images // BATCHNORM_MIN_IMAGES))


def near_equal_batches(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """`indices` cut in order into `batch_count` batches whose sizes differ by at most one (none above batch_size
    unless a batch below BATCHNORM_MIN_IMAGES had to be avoided)."""
    return np.array_split(indices, batch_count(len(indices), batch_size))


def batches_per_task(sizes: dict[str, int], batch_size: int, last_batch: str = "keep") -> dict[str, int]:
    """Return the batches one full pass over each task's train split yields.

    With "keep", floor(n / batch_size) full batches plus the remainder as its own batch when it holds at
    least `min_batch(batch_size)` images (else it is folded into the last full batch; a split smaller than
    one batch is one batch). With "drop", floor(n / batch_size).
    """
    _assert_valid(sizes, batch_size, last_batch)
    return {task: _batch_count(n, batch_size, last_batch) for task, n in sorted(sizes.items())}


def _steps_per_epoch(
    sizes: dict[str, int], batch_size: int, replacement: bool, steps_per_epoch: int | None, last_batch: str
) -> int:
    if replacement and steps_per_epoch is not None:
        return steps_per_epoch
    pass_steps = sum(batches_per_task(sizes, batch_size, last_batch).values())
    if pass_steps == 0:
        raise MmptError(
            f"every train split is smaller than the batch size {batch_size} and sampler.last_batch is 'drop', "
            "so an epoch has no step; lower train.batch_size or set sampler.last_batch=keep"
        )
    return steps_per_epoch or pass_steps


def _task_batches(n: int, batch_size: int, last_batch: str, rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(n).astype(np.int64)
    ends = np.cumsum(batch_sizes(n, batch_size, last_batch), dtype=np.int64)
    return [perm[end - size : end] for size, end in zip(batch_sizes(n, batch_size, last_batch), ends)]


def _one_pass(
    sizes: dict[str, int], batch_size: int, seed: int, epoch: int, cycle: int, last_batch: str
) -> list[tuple[str, np.ndarray]]:
    tasks = sorted(sizes)
    batches = {
        t: _task_batches(sizes[t], batch_size, last_batch, _rng(seed, epoch, cycle, _TASK, _task_key(t))) for t in tasks
    }
    # one task id per batch, shuffled: a uniform random interleaving of all tasks' batch sequences
    order = np.repeat(np.arange(len(tasks)), [len(batches[t]) for t in tasks])
    _rng(seed, epoch, cycle, _INTERLEAVE).shuffle(order)
    position = [0] * len(tasks)
    plan = []
    for k in order:
        plan.append((tasks[k], batches[tasks[k]][position[k]]))
        position[k] += 1
    return plan


def _group_steps(counts: dict[str, int], k: int, rng: np.random.Generator) -> list[list[str]]:
    """Split the tasks' batch counts into steps of at most k distinct tasks, spreading each task evenly.

    The pass has S = max(ceil(B / k), max_t b_t) steps (B: all batches). Step s holds task t with probability
    r_t / R (r_t: t's batches not yet placed, R = S - s steps left), drawn by systematic sampling, which picks
    distinct tasks with exactly these inclusion probabilities and floor or ceil of sum_t r_t / R of them. So
    every batch is placed once, a task never waits for the end of the pass, and a step holds fewer than k
    datasets only where the sizes leave no other way (B not a multiple of k, or one task having more
    than B / k batches).
    """
    tasks = sorted(counts)
    remaining = np.array([counts[t] for t in tasks], dtype=np.int64)
    steps = max(math.ceil(int(remaining.sum()) / k), int(remaining.max(initial=0)))
    groups = []
    for s in range(steps):
        left = steps - s
        order = rng.permutation(len(tasks))
        ends = np.cumsum(remaining[order])  # integer interval ends: task order[i] owns [ends[i-1], ends[i])
        starts = ends - remaining[order]
        offset = int(rng.integers(left))
        # points offset + j*left; the number inside [start, end) is exact in integers (at most 1, as r_t <= left)
        hits = -((offset - ends) // left) - -((offset - starts) // left)
        chosen = order[hits > 0]
        remaining[chosen] -= 1
        groups.append(sorted(tasks[i] for i in chosen))
    assert not remaining.any(), f"grouping left batches unplaced: {dict(zip(tasks, remaining))}"
    return groups


def _one_pass_grouped(
    sizes: dict[str, int],
    batch_size: int,
    seed: int,
    epoch: int,
    cycle: int,
    last_batch: str,
    tasks_per_step: int | str,
) -> list[list[tuple[str, np.ndarray]]]:
    tasks = sorted(sizes)
    batches = {
        t: _task_batches(sizes[t], batch_size, last_batch, _rng(seed, epoch, cycle, _TASK, _task_key(t))) for t in tasks
    }
    tasks = [t for t in tasks if batches[t]]  # a split smaller than the batch with last_batch=drop has no step
    if tasks_per_step == "all":
        # every dataset in every step for max_t b_t steps: a smaller dataset starts a fresh permutation when its
        # batches run out (LibMTL's multi-input convention), so each image is seen at least once per epoch
        steps = max(len(batches[t]) for t in tasks)
        for t in tasks:
            repeat = 1
            while len(batches[t]) < steps:
                rng = _rng(seed, epoch, cycle, _TASK, _task_key(t), repeat)
                batches[t] += _task_batches(sizes[t], batch_size, last_batch, rng)
                repeat += 1
        groups = [tasks] * steps
    else:
        groups = _group_steps({t: len(batches[t]) for t in tasks}, tasks_per_step, _rng(seed, epoch, cycle, _GROUP))
    position = dict.fromkeys(tasks, 0)
    plan = []
    for group in groups:
        plan.append([(t, batches[t][position[t]]) for t in group])
        for t in group:
            position[t] += 1
    return plan


def task_probabilities(sizes: dict[str, int], alpha: float = 1.0) -> dict[str, float]:
    """Return p(task) ∝ |D|^alpha (alpha=1 proportional to size, 0 uniform), in sorted task order."""
    weights = {t: float(sizes[t]) ** alpha for t in sorted(sizes)}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


def _grouped_pass_steps(sizes: dict[str, int], batch_size: int, last_batch: str, tasks_per_step: int | str) -> int:
    """Steps of one pass without replacement with k >= 2 or "all" datasets per step (see Sampler)."""
    _steps_per_epoch(sizes, batch_size, False, None, last_batch)  # raises when no step exists at all
    per_task = batches_per_task(sizes, batch_size, last_batch)
    if tasks_per_step == "all":
        empty = [t for t, b in per_task.items() if b == 0]
        if empty:
            raise MmptError(
                f"sampler.tasks_per_step=all puts every dataset in every step, but {', '.join(empty)} has fewer "
                f"train images than the batch size {batch_size} and sampler.last_batch is drop; set "
                "sampler.last_batch=keep or lower train.batch_size"
            )
        return max(per_task.values())
    return max(math.ceil(sum(per_task.values()) / tasks_per_step), max(per_task.values()))


def _grouped_plan(
    sizes: dict[str, int],
    batch_size: int,
    seed: int,
    epoch: int,
    replacement: bool,
    alpha: float,
    steps_per_epoch: int | None,
    last_batch: str,
    tasks_per_step: int | str,
    pass_steps: int,
) -> list[list[tuple[str, np.ndarray]]]:
    if replacement:
        return _grouped_plan_with_replacement(
            sizes, batch_size, seed, epoch, alpha, steps_per_epoch or pass_steps, tasks_per_step
        )
    steps = steps_per_epoch or pass_steps
    plan: list[list[tuple[str, np.ndarray]]] = []
    cycle = 0
    while len(plan) < steps:
        plan += _one_pass_grouped(sizes, batch_size, seed, epoch, cycle, last_batch, tasks_per_step)
        cycle += 1
    return plan[:steps]


def _grouped_plan_with_replacement(
    sizes: dict[str, int],
    batch_size: int,
    seed: int,
    epoch: int,
    alpha: float,
    steps: int,
    tasks_per_step: int | str,
) -> list[list[tuple[str, np.ndarray]]]:
    probabilities = task_probabilities(sizes, alpha)
    tasks = list(probabilities)
    k = len(tasks) if tasks_per_step == "all" else tasks_per_step
    rng = _rng(seed, epoch, 0, _GROUP)
    task_rngs = {t: _rng(seed, epoch, 0, _TASK, _task_key(t)) for t in tasks}
    plan = []
    for _ in range(steps):
        chosen = sorted(tasks[i] for i in rng.choice(len(tasks), size=k, replace=False, p=list(probabilities.values())))
        plan.append(
            [
                (t, task_rngs[t].choice(sizes[t], size=min(sizes[t], batch_size), replace=False).astype(np.int64))
                for t in chosen
            ]
        )
    return plan


def _plan_with_replacement(
    sizes: dict[str, int], batch_size: int, seed: int, epoch: int, alpha: float, steps: int
) -> list[tuple[str, np.ndarray]]:
    probabilities = task_probabilities(sizes, alpha)
    tasks = list(probabilities)
    choice = _rng(seed, epoch, 0, _INTERLEAVE).choice(len(tasks), size=steps, p=list(probabilities.values()))
    task_rngs = {t: _rng(seed, epoch, 0, _TASK, _task_key(t)) for t in tasks}
    plan = []
    for k in choice:
        t = tasks[k]
        n = sizes[t]
        idx = task_rngs[t].choice(n, size=min(n, batch_size), replace=False).astype(np.int64)
        plan.append((t, idx))
    return plan


def task_counts(plan: list[Step]) -> dict[str, int]:
    """Return the number of steps each task has in `plan` (tasks without a step are absent), sorted by task."""
    counts = Counter(task for step in plan for task, _ in step)
    return {t: counts[t] for t in sorted(counts)}


Step = list[tuple[str, np.ndarray]]  # one plan item: each dataset of the step with its batch of train indices


@dataclass(frozen=True)
class Sampler:
    """The epoch plans of one run: built once, validated once; `plan(epoch)` is a pure function of (seed, epoch).

    Without replacement (default) each task's train split is permuted and cut into batches (a last partial
    batch kept or dropped per `last_batch`; a kept remainder smaller than `min_batch(batch_size)` is folded into
    the split's previous batch, so every batch can train BatchNorm), and all batches of all tasks are interleaved
    at random: every index of every task appears exactly once, and each task gets exactly `batches_per_task`
    steps. With `steps_per_epoch`, the plan is the first `steps_per_epoch` steps of that sequence; when more are
    asked than one pass holds, further passes follow, each freshly permuted and interleaved. A truncated epoch
    is still a random, size-proportional prefix, and the next epoch starts a new permutation.

    With replacement each step picks a task with p ∝ |D|^alpha and draws `batch_size` distinct indices of it
    (all of them if the split is smaller), independently of the other steps; the step count is
    `steps_per_epoch`, or the number of batches of the plan without replacement.

    With `tasks_per_step` k >= 2 or "all", each step holds one (task, indices) pair per dataset of the step
    (each a batch of `batch_size`), in task-name order. Without replacement, k >= 2 places every batch of a pass
    exactly once in max(ceil(B / k), max_t b_t) steps of at most k distinct datasets, each dataset spread evenly
    over the pass (see _group_steps). "all" puts every dataset in every step for max_t b_t steps; a smaller
    dataset cycles through fresh permutations, so its images are seen more than once. With replacement, each
    step draws min(k, T) distinct datasets with p ∝ |D|^alpha ("all": every dataset).

    Index arrays are not sorted (the loader sorts them). The arguments are settings that mmpt.config checked
    where the config was loaded (asserted here); building raises MmptError only for what the split sizes decide:
    a plan without any step (every split smaller than `batch_size` with last_batch="drop"), or tasks_per_step
    "all" with a split that has no batch.
    """

    sizes: dict[str, int]
    batch_size: int
    seed: int = 0
    replacement: bool = False
    alpha: float = 1.0
    steps_per_epoch: int | None = None
    last_batch: str = "keep"
    tasks_per_step: int | str = 1

    def __post_init__(self) -> None:
        _assert_valid(self.sizes, self.batch_size, self.last_batch)
        assert self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}"
        assert self.steps_per_epoch is None or self.steps_per_epoch >= 1, f"steps_per_epoch {self.steps_per_epoch}"
        k = self.tasks_per_step
        assert k == "all" or (type(k) is int and 1 <= k <= len(self.sizes)), f"tasks_per_step {k!r}, {len(self.sizes)}"
        object.__setattr__(self, "sizes", dict(self.sizes))
        object.__setattr__(self, "_pass_steps", self._count_pass_steps())
        _ = self.steps  # raises when an epoch would have no step

    @property
    def every_task(self) -> bool:
        """Whether every dataset is in every step (tasks_per_step: all)."""
        return self.tasks_per_step == "all"

    @property
    def grouped(self) -> bool:
        """Whether a step may hold several datasets."""
        return self.every_task or self.tasks_per_step != 1

    def _count_pass_steps(self) -> int:
        if not self.grouped:
            return sum(batches_per_task(self.sizes, self.batch_size, self.last_batch).values())
        return _grouped_pass_steps(self.sizes, self.batch_size, self.last_batch, self.tasks_per_step)

    @property
    def steps(self) -> int:
        """Steps (backbone updates) per epoch."""
        if not self.grouped:
            return _steps_per_epoch(
                self.sizes, self.batch_size, self.replacement, self.steps_per_epoch, self.last_batch
            )
        return self.steps_per_epoch or self._pass_steps

    def plan(self, epoch: int) -> list[Step]:
        """One epoch's steps; the same (seed, epoch) give an identical plan."""
        sizes, batch, seed = self.sizes, self.batch_size, self.seed
        if self.grouped:
            return _grouped_plan(
                sizes,
                batch,
                seed,
                epoch,
                self.replacement,
                self.alpha,
                self.steps_per_epoch,
                self.last_batch,
                self.tasks_per_step,
                self._pass_steps,
            )
        if self.replacement:
            return [[pair] for pair in _plan_with_replacement(sizes, batch, seed, epoch, self.alpha, self.steps)]
        plan: list[Step] = []
        cycle = 0
        while len(plan) < self.steps:
            plan += [[pair] for pair in _one_pass(sizes, batch, seed, epoch, cycle, self.last_batch)]
            cycle += 1
        return plan[: self.steps]

    @functools.cached_property  # a pure function of the fields; with replacement and k >= 2 it plans epoch 0
    def updates_per_task(self) -> dict[str, float]:
        """Each task's head updates per epoch, sorted by task: the optimizer sizes each head's LR schedule by it.

        Exact without replacement and without `steps_per_epoch` (or with a multiple of a full pass); otherwise
        the expectation (a truncated pass is a random prefix; with replacement each step picks the task with
        p ∝ |D|^alpha). With several datasets per step: exact without replacement (per pass, b_t; "all":
        max_t b_t), and the counts of epoch 0's plan with replacement.
        """
        per_pass = batches_per_task(self.sizes, self.batch_size, self.last_batch)
        if self.grouped and self.replacement:
            counts = task_counts(self.plan(0))
            return {t: float(counts.get(t, 0)) for t in sorted(self.sizes)}
        if self.replacement:
            return {t: self.steps * p for t, p in task_probabilities(self.sizes, self.alpha).items()}
        if self.every_task:
            per_pass = dict.fromkeys(per_pass, self._pass_steps)
        full_passes, rest = divmod(self.steps, self._pass_steps)
        # the remainder is a uniformly random prefix of a pass: each task gets its share in expectation
        return {t: float(full_passes * b + rest * b / self._pass_steps) for t, b in per_pass.items()}

    def exposure(self, epochs: int) -> dict[str, tuple[float, float]]:
        """Per task, sorted: (share of the steps it takes part in, passes over its train images in `epochs` epochs).

        From `updates_per_task` and `steps`: a batch without replacement holds n / b_t images on average with
        last_batch keep (every image once per pass) and batch_size with drop; with replacement min(n, batch_size)
        distinct images. Exact where `updates_per_task` is, else expected values (with replacement and k >= 2: the
        counts of epoch 0's plan); with "all", a smaller split's last pass in an epoch is a prefix, so its passes
        are exact to one batch. With k >= 2 the shares add up to about k.
        """
        updates, steps = self.updates_per_task, self.steps
        per_pass = batches_per_task(self.sizes, self.batch_size, self.last_batch)
        exposure = {}
        for task, n in sorted(self.sizes.items()):
            if self.replacement:
                images_per_batch = min(n, self.batch_size)
            elif per_pass[task] == 0:
                images_per_batch = 0.0
            else:
                images_per_batch = n / per_pass[task] if self.last_batch == "keep" else self.batch_size
            exposure[task] = (updates[task] / steps, epochs * updates[task] * images_per_batch / n)
        return exposure
