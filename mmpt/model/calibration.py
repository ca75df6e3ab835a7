"""Precise per-dataset BatchNorm statistics: re-estimated as a true average over training batches with the weights
fixed (PreciseBN), during training before each validation (model.norm_calibration_batches: `calibrate_norms`) and
after it (evaluate.py --recalibrate-norm: `recalibrate`)."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import torch

from mmpt.data.loader import shard
from mmpt.data.sampler import near_equal_batches
from mmpt.model.norm import task_norms
from mmpt.runtime.distributed import SINGLE, World, all_reduce_mean_

RECALIBRATION_IMAGES = 2048  # evaluate.py --recalibrate-norm: default images per dataset (or its whole train split)
RECALIBRATION_SEED = 0  # which images: a fixed draw, so two recalibrations agree
# keeps the draws of the statistics' calibration during training apart from the sampler's streams
CALIBRATION_STREAM = zlib.crc32(b"norm calibration")


def recalibration_indices(train_size: int, images: int) -> np.ndarray:
    """The sorted train indices a recalibration reads: all of them, or a seeded draw of `images` without replacement."""
    if images >= train_size:
        return np.arange(train_size)
    return np.sort(np.random.default_rng(RECALIBRATION_SEED).choice(train_size, size=images, replace=False))


def calibration_batches(
    task: str, train_size: int, batches: int, batch_size: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """The train indices the calibration after epoch `epoch` (0-based) reads from `task`, batch by batch.

    min(train_size, batches * batch_size) images drawn without replacement (a permutation's prefix), cut into
    near-equal batches of at most `batch_size` (exactly `batches` of `batch_size` when the split is large
    enough), each sorted for sequential reads. A pure function of its arguments, from a NumPy stream of its own:
    no random state that training uses is read or advanced.
    """
    assert batches >= 1 and batch_size >= 1, f"calibration needs batches >= 1 and batch_size >= 1, got {batches}"
    entropy = [seed, epoch, CALIBRATION_STREAM, zlib.crc32(task.encode())]
    chosen = np.random.default_rng(np.random.SeedSequence(entropy)).permutation(train_size)
    # permuted before cutting: a file stored in class order still gives mixed batches
    return [np.sort(b) for b in near_equal_batches(chosen[: min(train_size, batches * batch_size)], batch_size)]


@torch.no_grad()
def estimate_statistics(
    model,
    splits: dict,
    batches: dict[str, list[np.ndarray]],
    transform,
    device: torch.device,
    forward_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    world: World | None = None,
) -> dict[str, int]:
    """Set each dataset's row of every per-dataset BatchNorm layer of `model` to the average of its batch statistics
    over `batches` (flag -> a list of index arrays into splits[flag], that flag's train SplitData); return the
    images read per dataset.

    The true (cumulative) average, as BatchNorm's momentum=None, PreciseBN and torch.optim.swa_utils.update_bn
    compute it: each batch is normalised with its own statistics as in training, the row becomes the mean of the
    batches' means and of their (unbiased) variances. Without gradients, with dropout off (only the norm layers in
    train mode) and without augmentation (`transform` as at evaluation), so no random number is drawn. Affine
    weights, every other weight and the counts of training batches (num_batches_tracked) stay as they are; the
    model is left in eval mode. Reads no value back from the device. `forward_context` wraps each backbone pass
    (training: the precision's autocast, as at evaluation).
    """
    layers = [m for _, m in task_norms(model.backbone)]
    assert layers, "estimate_statistics needs per-dataset BatchNorm layers (model.norm per_dataset_stats)"
    model.eval()
    used: dict[str, int] = {}
    momenta = [layer.momentum for layer in layers]
    counts = [layer.num_batches_tracked.clone() for layer in layers]
    try:
        for layer in layers:
            layer.train()
        for flag, indices in batches.items():
            row = model.norm_tasks.index(flag)
            for layer in layers:
                layer.running_mean[row].zero_()
                layer.running_var[row].fill_(1.0)
            mapped = splits[flag].open_images()
            for i, chunk in enumerate(indices):
                # weight 1/(i+1) on batch i: the cumulative average, as momentum=None gives, without reading the count
                for layer in layers:
                    layer.momentum = 1.0 / (i + 1)
                x = transform(torch.from_numpy(np.array(mapped[chunk])).to(device))
                with forward_context():
                    model.features(x, flag, world=world)
            used[flag] = sum(len(chunk) for chunk in indices)
    finally:
        for layer, momentum, count in zip(layers, momenta, counts):
            layer.momentum = momentum
            layer.num_batches_tracked.copy_(count)
        model.eval()
    return used


def recalibrate(
    model, splits: dict, transform, device: torch.device, *, images: int = RECALIBRATION_IMAGES, batch_size: int = 256
) -> dict[str, int]:
    """Re-estimate, for each dataset of `splits` (flag -> its train SplitData), every BatchNorm layer's statistics of
    `model` from that dataset's own training images (evaluate.py --recalibrate-norm); return the images used per
    dataset.

    A shared-norm model first gets per-dataset statistics (model.split_norm_statistics). The images are
    `recalibration_indices` (a fixed draw) in index order, cut into near-equal batches of at most `batch_size`;
    the statistics are their average (`estimate_statistics`), so it is deterministic.
    """
    model.split_norm_statistics(tuple(splits))
    batches = {
        flag: near_equal_batches(recalibration_indices(len(split), images), batch_size)
        for flag, split in splits.items()
    }
    return estimate_statistics(model, splits, batches, transform, device)


def calibrate_norms(
    model,
    splits: dict,
    transform,
    device: torch.device,
    *,
    batches: int,
    batch_size: int,
    seed: int,
    epoch: int,
    world: World = SINGLE,
    forward_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    synchronised: bool = False,
) -> bool:
    """Precise per-dataset statistics during training (model.norm_calibration_batches): replace each dataset's
    running statistics by their average over `batches` of its training batches (`calibration_batches` of (seed,
    epoch), `batch_size` images each: the global batch), with the weights fixed; return whether it did.

    A no-op (False) for `batches` 0 and for a model with shared statistics. Under torchrun each rank reads its
    shard of every batch, as in a training step; `synchronised` (model.sync_norm), each batch's statistics are the
    whole batch's, as on one process; else each rank's are its shard's, and the ranks' averages are averaged. Either
    way a last all-reduce leaves every rank with the same statistics. `forward_context`: as in `estimate_statistics`.
    """
    if batches == 0 or not model.per_dataset_norm:
        return False
    mine = {
        flag: [
            b[shard(len(b), world.rank, world.world_size)]
            for b in calibration_batches(flag, len(split), batches, batch_size, seed, epoch)
        ]
        for flag, split in splits.items()
    }
    sync = world if synchronised and world.distributed else None
    estimate_statistics(model, splits, mine, transform, device, forward_context, world=sync)
    all_reduce_mean_(world, [t for _, m in task_norms(model.backbone) for t in (m.running_mean, m.running_var)])
    return True
