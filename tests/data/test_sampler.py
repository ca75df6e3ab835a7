import hashlib
import math

import medmnist
import numpy as np
import pytest

from mmpt.config import load_config
from mmpt.data.loader import shard
from mmpt.data.sampler import (
    BATCHNORM_MIN_IMAGES,
    Sampler,
    batch_sizes,
    batches_per_task,
    min_batch,
    near_equal_batches,
    task_counts,
)
from mmpt.errors import MmptError

SIZES = {"pathmnist": 103, "chestmnist": 64, "breastmnist": 7}


# 103 = 6 x 16 + 7: the remainder 7 < 8 is folded into the sixth batch; 64 = 4 x 16; 7 < 16 is one batch
@pytest.mark.parametrize(
    "last_batch, expected",
    [
        ("keep", {"breastmnist": 1, "chestmnist": 4, "pathmnist": 6}),
        ("drop", {"breastmnist": 0, "chestmnist": 4, "pathmnist": 6}),
    ],
)
def test_each_task_gets_its_batch_count_per_epoch(last_batch, expected):
    plan = Sampler(SIZES, 16, 0, last_batch=last_batch).plan(0)
    assert task_counts(plan) == {t: b for t, b in expected.items() if b}
    assert batches_per_task(SIZES, 16, last_batch) == expected
    assert Sampler(SIZES, 16, last_batch=last_batch).updates_per_task == {t: float(b) for t, b in expected.items()}


def test_a_remainder_of_half_a_batch_or_more_is_its_own_batch():
    plan = Sampler({"a": 40}, 16, 0).plan(0)  # 40 = 2 x 16 + 8, and 8 >= ceil(16 / 2)
    assert sorted(len(idx) for [(_, idx)] in plan) == [8, 16, 16]


# medmnist's own split sizes (2D datasets; MedMNIST+ keeps them at every resolution), not synthetic ones:
# OrganAMNIST's 34,561 at batch 64 once left a one-image batch that BatchNorm cannot train on
MEDMNIST_TRAIN_SIZES = {
    flag: info["n_samples"]["train"] for flag, info in medmnist.INFO.items() if not flag.endswith("3d")
}


@pytest.mark.parametrize("batch_size", [16, 32, 64, 128, 256, 512, 1024])
def test_every_batch_of_every_medmnist_train_split_is_trainable_and_covers_it_once(batch_size):
    assert len(MEDMNIST_TRAIN_SIZES) == 12
    plan = Sampler(MEDMNIST_TRAIN_SIZES, batch_size, 0).plan(0)
    assert task_counts(plan) == batches_per_task(MEDMNIST_TRAIN_SIZES, batch_size)
    assert Sampler(MEDMNIST_TRAIN_SIZES, batch_size).updates_per_task == {
        t: float(b) for t, b in batches_per_task(MEDMNIST_TRAIN_SIZES, batch_size).items()
    }
    for task, n in MEDMNIST_TRAIN_SIZES.items():
        batches = [idx for [(t, idx)] in plan if t == task]
        assert min(len(idx) for idx in batches) >= min(min_batch(batch_size), n), task
        assert max(len(idx) for idx in batches) < batch_size + min_batch(batch_size), task
        assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(n)), task


@pytest.mark.slow
def test_no_batch_size_leaves_a_single_image_batchnorm_batch_on_any_medmnist_train_split():
    """The one rule for batches BatchNorm trains on (BATCHNORM_MIN_IMAGES = 2 per dataset's part of a step), at every
    batch size from 2 to 1024 (every documented one: 2, 16, 32, 64, 128, 256, ...) on every medmnist train split:
    training's batches with either last-batch policy, each rank's shard of them under torchrun (the global batch is
    at least 4 per process), and the near-equal batches a statistics (re)calibration cuts its images into."""
    assert BATCHNORM_MIN_IMAGES == 2
    # five of the twelve train splits have an odd size: --batch-size 2 once left their last image alone
    assert sum(n % 2 for n in MEDMNIST_TRAIN_SIZES.values()) == 5
    smallest = {}
    for n in MEDMNIST_TRAIN_SIZES.values():
        for batch_size in range(2, 1025):
            for last_batch in ("keep", "drop"):
                sizes = batch_sizes(n, batch_size, last_batch)
                assert sum(sizes) == (n if last_batch == "keep" else n - n % batch_size), (n, batch_size)
                if not sizes:  # drop, with a split smaller than one batch
                    continue
                smallest[n, batch_size, last_batch] = min(sizes)
                for world_size in (2, 4, 8):
                    if batch_size >= 4 * world_size:  # recipe.check_run's rule for the global batch
                        # every batch of a size shards alike: each distinct size once (a full batch, a last one)
                        shares = [
                            len(range(size)[shard(size, r, world_size)])
                            for size in set(sizes)
                            for r in range(world_size)
                        ]
                        assert min(shares) >= BATCHNORM_MIN_IMAGES, (n, batch_size, world_size)
            # a recalibration reads min(split, --recalibrate-images) images; a calibration batches * batch_size
            for images in {min(n, 2048), min(n, 16 * batch_size), min(n, batch_size + 1)}:
                chunks = near_equal_batches(np.arange(images), batch_size)
                assert min(len(c) for c in chunks) >= BATCHNORM_MIN_IMAGES, (images, batch_size)
                assert max(len(c) for c in chunks) - min(len(c) for c in chunks) <= 1
                assert sum(len(c) for c in chunks) == images
    assert min(smallest.values()) == BATCHNORM_MIN_IMAGES  # the rule binds: some last batch holds exactly two
    # --batch-size 2 on an odd split: the last image joins the previous batch, which holds three
    odd = next(n for n in MEDMNIST_TRAIN_SIZES.values() if n % 2)
    assert batch_sizes(odd, 2) == [2] * (odd // 2 - 1) + [3]
    # an evaluation batch size of 1 or 2 still cuts recalibration batches of two or three images
    assert {len(c) for c in near_equal_batches(np.arange(7), 1)} == {2, 3}


def test_batch_size_2_on_an_odd_split_plans_no_single_image_batch():
    plan = Sampler({"a": 9, "b": 7}, 2, 0, tasks_per_step=2).plan(0)
    assert min(len(idx) for step in plan for _, idx in step) == 2
    assert sorted(np.concatenate([idx for step in plan for t, idx in step if t == "a"]).tolist()) == list(range(9))


def test_drop_still_drops_the_last_partial_batch():
    plan = Sampler({"a": 103}, 16, 0, last_batch="drop").plan(0)
    assert [len(idx) for [(_, idx)] in plan] == [16] * 6


def test_every_train_index_appears_exactly_once_per_epoch():
    plan = Sampler(SIZES, 16, 3).plan(5)
    for task, n in SIZES.items():
        seen = np.concatenate([idx for [(t, idx)] in plan if t == task])
        assert seen.dtype == np.int64
        assert np.array_equal(np.sort(seen), np.arange(n))


def test_tasks_are_interleaved_not_grouped():
    plan = Sampler({"a": 640, "b": 640}, 16, 0).plan(0)
    switches = sum(plan[i][0][0] != plan[i + 1][0][0] for i in range(len(plan) - 1))
    assert switches > 10


def test_plan_is_a_pure_function_of_seed_and_epoch():
    def flat(plan):
        return [(t, idx.tolist()) for [(t, idx)] in plan]

    reference = flat(Sampler(SIZES, 16, 1).plan(2))
    assert flat(Sampler(SIZES, 16, 1).plan(2)) == reference
    assert flat(Sampler(dict(reversed(SIZES.items())), 16, 1).plan(2)) == reference
    assert flat(Sampler(SIZES, 16, 1).plan(3)) != reference
    assert flat(Sampler(SIZES, 16, 2).plan(2)) != reference


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_with_replacement_task_frequencies_follow_size_to_the_alpha(alpha):
    sizes = {"big": 9000, "mid": 3000, "small": 1000}
    steps = 20000
    plan = Sampler(sizes, 8, 0, replacement=True, alpha=alpha, steps_per_epoch=steps).plan(0)
    counts = task_counts(plan)
    total = sum(n**alpha for n in sizes.values())
    for task, n in sizes.items():
        assert counts[task] / steps == pytest.approx(n**alpha / total, abs=0.015)
    expected = Sampler(sizes, 8, replacement=True, alpha=alpha, steps_per_epoch=steps).updates_per_task
    assert expected["big"] == pytest.approx(steps * 9000**alpha / total)


def test_with_replacement_batches_hold_distinct_valid_indices():
    plan = Sampler(SIZES, 16, 0, replacement=True).plan(0)
    assert len(plan) == sum(batches_per_task(SIZES, 16).values())
    for [(task, idx)] in plan:
        assert len(idx) == min(16, SIZES[task])
        assert len(np.unique(idx)) == len(idx)
        assert idx.min() >= 0 and idx.max() < SIZES[task]


@pytest.mark.parametrize("replacement", [False, True])
@pytest.mark.parametrize("steps", [3, 40])
def test_steps_per_epoch_is_respected(replacement, steps):
    # one pass holds 6 + 4 + 1 = 11 batches: 3 truncates it, 40 needs more than three passes
    plan = Sampler(SIZES, 16, 0, replacement=replacement, steps_per_epoch=steps).plan(0)
    assert len(plan) == steps
    expected = Sampler(SIZES, 16, replacement=replacement, steps_per_epoch=steps).updates_per_task
    assert sum(expected.values()) == pytest.approx(steps)


def test_steps_beyond_one_pass_start_a_fresh_pass():
    plan = Sampler(SIZES, 16, 0, steps_per_epoch=2 * sum(batches_per_task(SIZES, 16).values())).plan(0)
    for task, n in SIZES.items():
        seen = np.concatenate([idx for [(t, idx)] in plan if t == task])
        assert np.array_equal(np.bincount(seen, minlength=n), np.full(n, 2))


def test_a_plan_without_any_step_is_an_mmpt_error():
    with pytest.raises(MmptError, match="no step"):
        Sampler(SIZES, batch_size=200, seed=0, last_batch="drop")


@pytest.mark.parametrize("kwargs", [dict(batch_size=0), dict(last_batch="partial"), dict(alpha=-1.0)])
def test_settings_the_config_checks_are_asserted_by_the_sampler(kwargs):
    with pytest.raises(AssertionError):
        Sampler(SIZES, **(dict(batch_size=16, seed=0) | kwargs))


# ---- several datasets per step (sampler.tasks_per_step) ----

GROUPED_SIZES = {"pathmnist": 1000, "chestmnist": 640, "dermamnist": 300, "breastmnist": 70, "retinamnist": 33}


def _indices(plan, task):
    return np.concatenate([idx for step in plan for t, idx in step if t == task])


@pytest.mark.parametrize("k", [2, 3])
def test_k_datasets_per_step_see_every_image_once_in_distinct_datasets(k):
    plan = Sampler(GROUPED_SIZES, 16, 0, tasks_per_step=k).plan(1)
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
    assert Sampler(GROUPED_SIZES, 16, tasks_per_step=k).updates_per_task == {
        t: float(b) for t, b in sorted(batches.items())
    }


def test_k_datasets_per_step_spread_each_dataset_over_the_epoch():
    """Size-proportional at every point of the epoch, not only in total: the first half holds half of each dataset
    on average over seeds (each step draws dataset t with probability r_t / R, so no dataset waits for the end)."""
    fractions = {t: [] for t in GROUPED_SIZES}
    for seed in range(20):
        plan = Sampler(GROUPED_SIZES, 8, seed, tasks_per_step=2).plan(0)
        first_half = task_counts(plan[: len(plan) // 2])
        for task, n in GROUPED_SIZES.items():
            fractions[task].append(first_half.get(task, 0) / math.ceil(n / 8))
    for task, values in fractions.items():
        assert 0.4 <= np.mean(values) <= 0.6, task
    assert 0.4 <= min(fractions["pathmnist"]) and max(fractions["pathmnist"]) <= 0.6


def test_all_datasets_in_every_step_cycle_the_smaller_ones():
    plan = Sampler(GROUPED_SIZES, 16, 0, tasks_per_step="all").plan(0)
    assert len(plan) == 63  # the largest dataset's batches
    assert all([t for t, _ in step] == sorted(GROUPED_SIZES) for step in plan)
    assert np.array_equal(np.sort(_indices(plan, "pathmnist")), np.arange(1000))
    retina = _indices(plan, "retinamnist")
    assert set(retina.tolist()) == set(range(33)) and len(retina) > 33 * 10
    sampler = Sampler(GROUPED_SIZES, 16, tasks_per_step="all")
    assert sampler.updates_per_task == dict.fromkeys(sorted(GROUPED_SIZES), 63.0)


@pytest.mark.parametrize("k", [2, "all"])
def test_grouped_plan_is_a_pure_function_of_seed_and_epoch(k):
    def flat(plan):
        return [[(t, idx.tolist()) for t, idx in step] for step in plan]

    reference = flat(Sampler(GROUPED_SIZES, 16, 1, tasks_per_step=k).plan(2))
    assert flat(Sampler(dict(reversed(GROUPED_SIZES.items())), 16, 1, tasks_per_step=k).plan(2)) == reference
    assert flat(Sampler(GROUPED_SIZES, 16, 1, tasks_per_step=k).plan(3)) != reference


def test_grouped_plan_with_replacement_draws_k_distinct_datasets():
    plan = Sampler(GROUPED_SIZES, 16, 0, tasks_per_step=3, replacement=True, steps_per_epoch=200).plan(0)
    assert len(plan) == 200
    assert all(len({t for t, _ in step}) == 3 for step in plan)
    counts = task_counts(plan)
    assert counts["pathmnist"] > counts["retinamnist"]  # p ∝ |D|


def test_grouped_plan_truncated_by_steps_per_epoch():
    plan = Sampler(GROUPED_SIZES, 16, 0, tasks_per_step=2, steps_per_epoch=10).plan(0)
    assert len(plan) == 10 and all(isinstance(step, list) for step in plan)


@pytest.mark.parametrize("k", [0, 6, "some", 2.5])
def test_bad_tasks_per_step_is_a_config_error(k):
    datasets = list(GROUPED_SIZES)
    with pytest.raises(MmptError, match=r"sampler\.tasks_per_step must be"):
        load_config(overrides=[{"data": {"datasets": datasets}, "sampler": {"tasks_per_step": k}}])


# ---- the plans of e7abe77 (epoch_plan, steps_in_epoch, expected_updates_per_epoch), bit for bit ----

PINNED_CASES = {
    "k1": {},
    "k1_drop": {"last_batch": "drop"},
    "k1_steps": {"steps_per_epoch": 200},
    "k1_replacement": {"replacement": True, "alpha": 0.5},
    "k2": {"tasks_per_step": 2},
    "k3_steps": {"tasks_per_step": 3, "steps_per_epoch": 90},
    "all": {"tasks_per_step": "all"},
    "k2_replacement": {"tasks_per_step": 2, "replacement": True, "steps_per_epoch": 50},
    "all_replacement": {"tasks_per_step": "all", "replacement": True},
}
# (plan digest, steps, updates per task) of seed 7, epoch 3, batch 16, recorded with the functions of e7abe77
PINNED = {
    "k1": [
        "63031ff413be8246",
        128,
        {"breastmnist": 4.0, "chestmnist": 40.0, "dermamnist": 19.0, "pathmnist": 63.0, "retinamnist": 2.0},
    ],
    "k1_drop": [
        "e2f136de0bb3be5a",
        126,
        {"breastmnist": 4.0, "chestmnist": 40.0, "dermamnist": 18.0, "pathmnist": 62.0, "retinamnist": 2.0},
    ],
    "k1_steps": [
        "bf0789de9e587345",
        200,
        {"breastmnist": 6.25, "chestmnist": 62.5, "dermamnist": 29.6875, "pathmnist": 98.4375, "retinamnist": 3.125},
    ],
    "k1_replacement": [
        "8c929b719d4d8309",
        128,
        {
            "breastmnist": 12.12102416,
            "chestmnist": 36.650532071,
            "dermamnist": 25.09290395,
            "pathmnist": 45.813165089,
            "retinamnist": 8.32237473,
        },
    ],
    "k2": [
        "9d28b4625e7e44e4",
        64,
        {"breastmnist": 4.0, "chestmnist": 40.0, "dermamnist": 19.0, "pathmnist": 63.0, "retinamnist": 2.0},
    ],
    "k3_steps": [
        "9806a005ab7426d5",
        90,
        {
            "breastmnist": 5.714285714,
            "chestmnist": 57.142857143,
            "dermamnist": 27.142857143,
            "pathmnist": 90.0,
            "retinamnist": 2.857142857,
        },
    ],
    "all": [
        "293364b5ea5b59c0",
        63,
        {"breastmnist": 63.0, "chestmnist": 63.0, "dermamnist": 63.0, "pathmnist": 63.0, "retinamnist": 63.0},
    ],
    "k2_replacement": [
        "4c008f1cfe885325",
        50,
        {"breastmnist": 3.0, "chestmnist": 33.0, "dermamnist": 20.0, "pathmnist": 42.0, "retinamnist": 2.0},
    ],
    "all_replacement": [
        "f46b01d27f00a8ed",
        63,
        {"breastmnist": 63.0, "chestmnist": 63.0, "dermamnist": 63.0, "pathmnist": 63.0, "retinamnist": 63.0},
    ],
}


def _plan_digest(plan) -> str:
    digest = hashlib.sha256()
    for step in plan:
        for task, idx in step:
            digest.update(task.encode())
            digest.update(idx.tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("case", list(PINNED_CASES))
def test_plans_steps_and_updates_are_those_of_the_parallel_functions_they_replace(case):
    sampler = Sampler(GROUPED_SIZES, 16, 7, **PINNED_CASES[case])
    digest, steps, updates = PINNED[case]
    assert _plan_digest(sampler.plan(3)) == digest
    assert sampler.steps == steps
    assert {t: round(v, 9) for t, v in sampler.updates_per_task.items()} == updates
