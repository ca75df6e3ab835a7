import math

import medmnist
import numpy as np
import pytest

from mmpt.data.sampler import (
    batches_per_task, epoch_plan, expected_updates_per_epoch, min_batch, plan_batches_per_task,
)
from mmpt.errors import MmptError

SIZES = {"pathmnist": 103, "chestmnist": 64, "breastmnist": 7}


# 103 = 6 x 16 + 7: the remainder 7 < 8 is folded into the sixth batch; 64 = 4 x 16; 7 < 16 is one batch
@pytest.mark.parametrize("last_batch, expected", [
    ("keep", {"breastmnist": 1, "chestmnist": 4, "pathmnist": 6}),
    ("drop", {"breastmnist": 0, "chestmnist": 4, "pathmnist": 6}),
])
def test_each_task_gets_its_batch_count_per_epoch(last_batch, expected):
    plan = epoch_plan(SIZES, 16, seed=0, epoch=0, last_batch=last_batch)
    assert plan_batches_per_task(plan) == {t: b for t, b in expected.items() if b}
    assert batches_per_task(SIZES, 16, last_batch) == expected
    assert expected_updates_per_epoch(SIZES, 16, last_batch=last_batch) == {t: float(b) for t, b in expected.items()}


def test_a_remainder_of_half_a_batch_or_more_is_its_own_batch():
    plan = epoch_plan({"a": 40}, 16, seed=0, epoch=0)  # 40 = 2 x 16 + 8, and 8 >= ceil(16 / 2)
    assert sorted(len(idx) for _, idx in plan) == [8, 16, 16]


# medmnist's own split sizes (2D datasets; MedMNIST+ keeps them at every resolution), not synthetic ones:
# OrganAMNIST's 34,561 at batch 64 once left a one-image batch that BatchNorm cannot train on
MEDMNIST_TRAIN_SIZES = {flag: info["n_samples"]["train"] for flag, info in medmnist.INFO.items()
                        if not flag.endswith("3d")}


@pytest.mark.parametrize("batch_size", [16, 32, 64, 128, 256, 512, 1024])
def test_every_batch_of_every_medmnist_train_split_is_trainable_and_covers_it_once(batch_size):
    assert len(MEDMNIST_TRAIN_SIZES) == 12
    plan = epoch_plan(MEDMNIST_TRAIN_SIZES, batch_size, seed=0, epoch=0)
    assert plan_batches_per_task(plan) == batches_per_task(MEDMNIST_TRAIN_SIZES, batch_size)
    assert expected_updates_per_epoch(MEDMNIST_TRAIN_SIZES, batch_size) == {
        t: float(b) for t, b in batches_per_task(MEDMNIST_TRAIN_SIZES, batch_size).items()
    }
    for task, n in MEDMNIST_TRAIN_SIZES.items():
        batches = [idx for t, idx in plan if t == task]
        assert min(len(idx) for idx in batches) >= min(min_batch(batch_size), n), task
        assert max(len(idx) for idx in batches) < batch_size + min_batch(batch_size), task
        assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(n)), task


def test_drop_still_drops_the_last_partial_batch():
    plan = epoch_plan({"a": 103}, 16, seed=0, epoch=0, last_batch="drop")
    assert [len(idx) for _, idx in plan] == [16] * 6


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
    assert len(plan) == sum(batches_per_task(SIZES, 16).values())
    for task, idx in plan:
        assert len(idx) == min(16, SIZES[task])
        assert len(np.unique(idx)) == len(idx)
        assert idx.min() >= 0 and idx.max() < SIZES[task]


@pytest.mark.parametrize("replacement", [False, True])
@pytest.mark.parametrize("steps", [3, 40])
def test_steps_per_epoch_is_respected(replacement, steps):
    # one pass holds 6 + 4 + 1 = 11 batches: 3 truncates it, 40 needs more than three passes
    plan = epoch_plan(SIZES, 16, seed=0, epoch=0, replacement=replacement, steps_per_epoch=steps)
    assert len(plan) == steps
    expected = expected_updates_per_epoch(SIZES, 16, replacement=replacement, steps_per_epoch=steps)
    assert sum(expected.values()) == pytest.approx(steps)


def test_steps_beyond_one_pass_start_a_fresh_pass():
    plan = epoch_plan(SIZES, 16, seed=0, epoch=0, steps_per_epoch=2 * sum(batches_per_task(SIZES, 16).values()))
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
    # each split's batches, a too-small remainder folded into its previous batch
    batches = batches_per_task(GROUPED_SIZES, 16)
    total, largest = sum(batches.values()), max(batches.values())
    assert len(plan) == max(math.ceil(total / k), largest)
    # leftover policy: fewer than k datasets only in the steps the sizes force
    assert sum(len(step) < k for step in tasks) == k * len(plan) - total
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
