import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mmpt.data.loader import PlanDataset, eval_loader, plan_loader
from mmpt.data.sampler import Sampler
from mmpt.data.store import SplitData
from mmpt.errors import MmptError


def _split(folder: Path, name: str, shape: tuple[int, ...], label_width: int, seed: int) -> SplitData:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path = folder / f"{name}.npy"
    np.save(path, images)
    # label column 0 is the sample's index, so a misaligned (image, label) pair is visible
    labels = np.stack([np.arange(shape[0])] + [rng.integers(0, 2, shape[0]) for _ in range(label_width - 1)], 1)
    return SplitData(images_path=path, labels=labels.astype(np.int64), shape=shape)


@pytest.fixture
def splits(tmp_path) -> dict[str, SplitData]:
    return {
        "pathmnist": _split(tmp_path, "path", (90, 8, 8, 3), 1, seed=0),
        "chestmnist": _split(tmp_path, "chest", (200, 28, 28), 14, seed=1),
    }


@pytest.fixture
def plan(splits):
    return Sampler({t: len(s) for t, s in splits.items()}, 16).plan(0)


def _pairs(images: np.ndarray, labels: np.ndarray) -> set:
    return {(img.tobytes(), tuple(lab)) for img, lab in zip(images, labels)}


def _as_lists(batches) -> list:
    return [(task, images.numpy().tobytes(), labels.tolist()) for [(task, images, labels, _)] in batches]


def test_batch_holds_the_same_image_label_pairs_as_the_unsorted_gather(splits, plan):
    dataset = PlanDataset(splits, plan)
    for i, [(task, idx)] in enumerate(plan):
        [(_, images, labels, size)] = dataset[i]
        assert size == len(idx)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        split = splits[task]
        expected = _pairs(np.load(split.images_path)[idx], split.labels[idx])
        assert _pairs(images.numpy(), labels.numpy()) == expected


def test_batches_come_in_plan_order_with_the_plans_tasks(splits, plan):
    batches = list(plan_loader(splits, plan, num_workers=0))
    assert [parts[0].task for parts in batches] == [task for [(task, _)] in plan]
    for [(_, _, labels, _)], [(_, idx)] in zip(batches, plan):
        assert labels[:, 0].tolist() == np.sort(idx).tolist()


def test_start_skips_the_steps_already_trained(splits, plan):
    full = _as_lists(plan_loader(splits, plan, num_workers=0))
    resumed = _as_lists(plan_loader(splits, plan, start=5, num_workers=0))
    assert len(resumed) == len(plan) - 5
    assert resumed == full[5:]


def test_worker_processes_deliver_the_same_batches(splits, plan):
    single = _as_lists(plan_loader(splits, plan, num_workers=0))
    assert _as_lists(plan_loader(splits, plan, num_workers=2)) == single


def test_pickled_dataset_carries_paths_not_images(splits, plan):
    dataset = PlanDataset(splits, plan)
    first = dataset[0]  # opens memmaps in this process
    blob = pickle.dumps(dataset)
    image_bytes = sum(np.load(s.images_path, mmap_mode="r").nbytes for s in splits.values())
    assert len(blob) < image_bytes / 4
    # what a spawned worker unpickles maps the file itself and reads the same batch
    copy = pickle.loads(blob)
    [(task, images, labels, _)] = copy[0]
    assert task == first[0].task
    assert torch.equal(images, first[0].images) and torch.equal(labels, first[0].labels)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_loader_covers_a_split_once_in_order(splits, num_workers):
    split = splits["chestmnist"]
    batches = list(eval_loader({"chestmnist": split, "pathmnist": splits["pathmnist"]}, 64, num_workers=num_workers))
    assert [(task, len(labels)) for task, _, labels in batches] == [
        ("chestmnist", 64),
        ("chestmnist", 64),
        ("chestmnist", 64),
        ("chestmnist", 8),
        ("pathmnist", 64),
        ("pathmnist", 26),
    ]
    chest = [(images, labels) for task, images, labels in batches if task == "chestmnist"]
    assert np.array_equal(torch.cat([images for images, _ in chest]).numpy(), np.load(split.images_path))
    assert np.array_equal(torch.cat([labels for _, labels in chest]).numpy(), split.labels)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_cover_every_step_and_split_exactly_once(splits, plan, world_size):
    ranks = [PlanDataset(splits, plan, rank=r, world_size=world_size) for r in range(world_size)]
    for i, [(_task, idx)] in enumerate(plan):
        shards = [ds[i][0] for ds in ranks]
        assert {s.global_size for s in shards} == {len(idx)}
        assert max(len(s.labels) for s in shards) - min(len(s.labels) for s in shards) <= 1
        # labels of the synthetic splits are their indices, so this checks which images each rank got
        assert torch.cat([s.labels[:, 0] for s in shards]).tolist() == np.sort(idx).tolist()
    split = splits["chestmnist"]
    gathered = [
        torch.cat(
            [y for _, _, y in eval_loader({"chestmnist": split}, 50, num_workers=0, rank=r, world_size=world_size)]
        )
        for r in range(world_size)
    ]
    assert np.array_equal(torch.cat(gathered).numpy(), split.labels)


def test_loading_leaves_the_global_torch_rng_alone(splits, plan):
    # training randomness (dropout, init) must not depend on how many loaders were iterated
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(plan_loader(splits, plan, num_workers=0))
    list(eval_loader(splits, batch_size=32, num_workers=0))
    assert torch.equal(torch.rand(3), expected)


def test_resume_position_past_the_plan_is_rejected(splits, plan):
    with pytest.raises(MmptError, match="resume position"):
        plan_loader(splits, plan, start=len(plan) + 1, num_workers=0)
