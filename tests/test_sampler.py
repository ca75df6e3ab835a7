import math

import numpy as np
import pytest

from mmpt.data.sampler import epoch_plan, expected_updates_per_epoch, plan_batches_per_task
from mmpt.errors import MmptError

SIZES = {"pathmnist": 103, "chestmnist": 64, "breastmnist": 7}


@pytest.mark.parametrize("last_batch, rounding", [("keep", math.ceil), ("drop", math.floor)])
def test_each_task_gets_its_batch_count_per_epoch(last_batch, rounding):
    plan = epoch_plan(SIZES, 16, seed=0, epoch=0, last_batch=last_batch)
    expected = {t: rounding(n / 16) for t, n in SIZES.items() if rounding(n / 16) > 0}
    assert plan_batches_per_task(plan) == dict(sorted(expected.items()))
    assert expected_updates_per_epoch(SIZES, 16, last_batch=last_batch) == {
        t: float(rounding(n / 16)) for t, n in sorted(SIZES.items())
    }


def test_every_train_index_appears_exactly_once_per_epoch():
    plan = epoch_plan(SIZES, 16, seed=3, epoch=5)
    for task, n in SIZES.items():
        seen = np.concatenate([idx for t, idx in plan if t == task])
        assert seen.dtype == np.int64
        assert np.array_equal(np.sort(seen), np.arange(n))


def test_tasks_are_interleaved_not_grouped():
    plan = epoch_plan({"a": 640, "b": 640}, 16, seed=0, epoch=0)
    switches = sum(plan[i][0] != plan[i + 1][0] for i in range(len(plan) - 1))
    assert switches > 10


def test_plan_is_a_pure_function_of_seed_and_epoch():
    def flat(plan):
        return [(t, idx.tolist()) for t, idx in plan]

    reference = flat(epoch_plan(SIZES, 16, seed=1, epoch=2))
    assert flat(epoch_plan(SIZES, 16, seed=1, epoch=2)) == reference
    assert flat(epoch_plan(dict(reversed(SIZES.items())), 16, seed=1, epoch=2)) == reference
    assert flat(epoch_plan(SIZES, 16, seed=1, epoch=3)) != reference
    assert flat(epoch_plan(SIZES, 16, seed=2, epoch=2)) != reference


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_with_replacement_task_frequencies_follow_size_to_the_alpha(alpha):
    sizes = {"big": 9000, "mid": 3000, "small": 1000}
    steps = 20000
    plan = epoch_plan(sizes, 8, seed=0, epoch=0, replacement=True, alpha=alpha, steps_per_epoch=steps)
    counts = plan_batches_per_task(plan)
    total = sum(n**alpha for n in sizes.values())
    for task, n in sizes.items():
        assert counts[task] / steps == pytest.approx(n**alpha / total, abs=0.015)
    expected = expected_updates_per_epoch(sizes, 8, replacement=True, alpha=alpha, steps_per_epoch=steps)
    assert expected["big"] == pytest.approx(steps * 9000**alpha / total)


def test_with_replacement_batches_hold_distinct_valid_indices():
    plan = epoch_plan(SIZES, 16, seed=0, epoch=0, replacement=True)
    assert len(plan) == sum(math.ceil(n / 16) for n in SIZES.values())
    for task, idx in plan:
        assert len(idx) == min(16, SIZES[task])
        assert len(np.unique(idx)) == len(idx)
        assert idx.min() >= 0 and idx.max() < SIZES[task]


@pytest.mark.parametrize("replacement", [False, True])
@pytest.mark.parametrize("steps", [3, 40])
def test_steps_per_epoch_is_respected(replacement, steps):
    # one pass holds 7 + 4 + 1 = 12 batches: 3 truncates it, 40 needs more than three passes
    plan = epoch_plan(SIZES, 16, seed=0, epoch=0, replacement=replacement, steps_per_epoch=steps)
    assert len(plan) == steps
    expected = expected_updates_per_epoch(SIZES, 16, replacement=replacement, steps_per_epoch=steps)
    assert sum(expected.values()) == pytest.approx(steps)


def test_steps_beyond_one_pass_start_a_fresh_pass():
    plan = epoch_plan(SIZES, 16, seed=0, epoch=0, steps_per_epoch=24)
    for task, n in SIZES.items():
        seen = np.concatenate([idx for t, idx in plan if t == task])
        assert np.array_equal(np.bincount(seen, minlength=n), np.full(n, 2))


@pytest.mark.parametrize(
    "kwargs",
    [dict(batch_size=0), dict(last_batch="partial"), dict(batch_size=200, last_batch="drop")],
)
def test_bad_sampler_arguments_are_rejected(kwargs):
    args = dict(batch_size=16, seed=0, epoch=0) | kwargs
    with pytest.raises(MmptError):
        epoch_plan(SIZES, **args)
