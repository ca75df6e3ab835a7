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


# ---- several datasets per step (sampler.tasks_per_step) ----

GROUPED_SIZES = {"pathmnist": 1000, "chestmnist": 640, "dermamnist": 300, "breastmnist": 70, "retinamnist": 33}


def _indices(plan, task):
    return np.concatenate([idx for step in plan for t, idx in step if t == task])


@pytest.mark.parametrize("k", [2, 3])
def test_k_datasets_per_step_see_every_image_once_in_distinct_datasets(k):
    plan = epoch_plan(GROUPED_SIZES, 16, seed=0, epoch=1, tasks_per_step=k)
    for task, n in GROUPED_SIZES.items():
        assert np.array_equal(np.sort(_indices(plan, task)), np.arange(n))
    tasks = [[t for t, _ in step] for step in plan]
    assert all(len(step) == len(set(step)) and 1 <= len(step) <= k and step == sorted(step) for step in tasks)
    batches = {t: math.ceil(n / 16) for t, n in GROUPED_SIZES.items()}  # 63, 40, 19, 5, 3: 130 batches
    assert len(plan) == max(math.ceil(130 / k), 63)
    # leftover policy: fewer than k datasets only in the steps the sizes force (k=2: 65 steps hold all 130)
    assert sum(len(step) < k for step in tasks) == k * len(plan) - 130
    assert expected_updates_per_epoch(GROUPED_SIZES, 16, tasks_per_step=k) == {
        t: float(b) for t, b in sorted(batches.items())
    }


def test_k_datasets_per_step_spread_each_dataset_over_the_epoch():
    """Size-proportional at every point of the epoch, not only in total: the first half holds half of each dataset
    on average over seeds (each step draws dataset t with probability r_t / R, so no dataset waits for the end)."""
    fractions = {t: [] for t in GROUPED_SIZES}
    for seed in range(20):
        plan = epoch_plan(GROUPED_SIZES, 8, seed=seed, epoch=0, tasks_per_step=2)
        first_half = plan_batches_per_task(plan[: len(plan) // 2])
        for task, n in GROUPED_SIZES.items():
            fractions[task].append(first_half.get(task, 0) / math.ceil(n / 8))
    for task, values in fractions.items():
        assert 0.4 <= np.mean(values) <= 0.6, task
    assert 0.4 <= min(fractions["pathmnist"]) and max(fractions["pathmnist"]) <= 0.6


def test_all_datasets_in_every_step_cycle_the_smaller_ones():
    plan = epoch_plan(GROUPED_SIZES, 16, seed=0, epoch=0, tasks_per_step="all")
    assert len(plan) == 63  # the largest dataset's batches
    assert all([t for t, _ in step] == sorted(GROUPED_SIZES) for step in plan)
    assert np.array_equal(np.sort(_indices(plan, "pathmnist")), np.arange(1000))
    retina = _indices(plan, "retinamnist")
    assert set(retina.tolist()) == set(range(33)) and len(retina) > 33 * 10
    assert expected_updates_per_epoch(GROUPED_SIZES, 16, tasks_per_step="all") == {t: 63.0 for t in sorted(GROUPED_SIZES)}


@pytest.mark.parametrize("k", [2, "all"])
def test_grouped_plan_is_a_pure_function_of_seed_and_epoch(k):
    def flat(plan):
        return [[(t, idx.tolist()) for t, idx in step] for step in plan]

    reference = flat(epoch_plan(GROUPED_SIZES, 16, seed=1, epoch=2, tasks_per_step=k))
    assert flat(epoch_plan(dict(reversed(GROUPED_SIZES.items())), 16, seed=1, epoch=2, tasks_per_step=k)) == reference
    assert flat(epoch_plan(GROUPED_SIZES, 16, seed=1, epoch=3, tasks_per_step=k)) != reference


def test_grouped_plan_with_replacement_draws_k_distinct_datasets():
    plan = epoch_plan(GROUPED_SIZES, 16, seed=0, epoch=0, tasks_per_step=3, replacement=True, steps_per_epoch=200)
    assert len(plan) == 200
    assert all(len({t for t, _ in step}) == 3 for step in plan)
    counts = plan_batches_per_task(plan)
    assert counts["pathmnist"] > counts["retinamnist"]  # p ∝ |D|


def test_grouped_plan_truncated_by_steps_per_epoch():
    plan = epoch_plan(GROUPED_SIZES, 16, seed=0, epoch=0, tasks_per_step=2, steps_per_epoch=10)
    assert len(plan) == 10 and all(isinstance(step, list) for step in plan)


@pytest.mark.parametrize("k", [0, 6, "some", 2.5])
def test_bad_tasks_per_step_is_an_mmpt_error(k):
    with pytest.raises(MmptError, match="tasks_per_step"):
        epoch_plan(GROUPED_SIZES, 16, seed=0, epoch=0, tasks_per_step=k)
