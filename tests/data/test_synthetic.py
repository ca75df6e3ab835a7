"""Synthetic MedMNIST+ files look like medmnist's, cover every class, are reproducible and learnable."""

from __future__ import annotations

import numpy as np
import pytest

from mmpt.data.synthetic import SYNTHETIC_KEY, ensure_synthetic, main, synthetic_arrays, write_synthetic
from mmpt.errors import MmptError
from mmpt.tasks import MULTI_LABEL, SPLITS, TASKS

MEDMNIST_KEYS = {f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")}


@pytest.mark.parametrize("flag", list(TASKS))
def test_synthetic_file_has_medmnist_keys_dtypes_and_shapes(synthetic_root, flag):
    task = TASKS[flag]
    data = np.load(synthetic_root / task.filename(28))
    assert set(data.files) == MEDMNIST_KEYS | {SYNTHETIC_KEY}
    pixel_shape = (28, 28) if task.channels == 1 else (28, 28, 3)
    for split in SPLITS:
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        assert images.dtype == np.uint8 and labels.dtype == np.uint8
        assert images.shape[1:] == pixel_shape
        assert labels.shape == (len(images), task.label_width)


@pytest.mark.parametrize("flag", ["breastmnist", "retinamnist"])
def test_synthetic_file_matches_real_medmnist_format(synthetic_root, real_root, flag):
    task = TASKS[flag]
    real = np.load(real_root / task.filename(28))
    synthetic = np.load(synthetic_root / task.filename(28))
    assert set(synthetic.files) - {SYNTHETIC_KEY} == set(real.files)
    for key in real.files:
        assert synthetic[key].dtype == real[key].dtype, key
        assert synthetic[key].ndim == real[key].ndim, key
        assert synthetic[key].shape[1:] == real[key].shape[1:], key


def test_synthetic_chest_labels_are_14_binary_columns(synthetic_root):
    data = np.load(synthetic_root / TASKS["chestmnist"].filename(28))
    for split in SPLITS:
        labels = data[f"{split}_labels"]
        assert labels.shape[1] == 14
        assert set(np.unique(labels).tolist()) == {0, 1}


@pytest.mark.parametrize("flag", list(TASKS))
def test_every_class_occurs_in_every_split(synthetic_root, flag):
    task = TASKS[flag]
    data = np.load(synthetic_root / task.filename(28))
    for split in SPLITS:
        labels = data[f"{split}_labels"]
        if task.task_type == MULTI_LABEL:
            # each label needs positives and negatives for its AUC
            assert (labels.max(axis=0) == 1).all() and (labels.min(axis=0) == 0).all(), split
        else:
            assert set(labels[:, 0].tolist()) == set(range(task.num_classes)), split


def test_val_and_test_hold_a_quarter_of_train_but_at_least_two_per_class():
    def sizes(flag: str) -> dict[str, int]:
        arrays = synthetic_arrays(TASKS[flag], 28, train_samples=64)
        return {split: len(arrays[f"{split}_labels"]) for split in SPLITS}

    assert sizes("breastmnist") == {"train": 64, "val": 16, "test": 16}
    assert sizes("organamnist") == {"train": 64, "val": 22, "test": 22}  # 11 classes


def test_same_seed_gives_identical_arrays_and_another_seed_differs():
    task = TASKS["dermamnist"]
    first, again, other = (synthetic_arrays(task, 28, 64, seed=s) for s in (0, 0, 1))
    for key in MEDMNIST_KEYS:
        assert np.array_equal(first[key], again[key]), key
    assert not np.array_equal(first["train_images"], other["train_images"])


@pytest.mark.parametrize("resolution", [64, 128, 224])
def test_larger_resolutions_have_medmnist_plus_names_and_sizes(tmp_path, resolution):
    (path,) = write_synthetic(tmp_path, resolution, [TASKS["bloodmnist"]], train_samples=16)
    assert path.name == f"bloodmnist_{resolution}.npz"
    assert np.load(path)["train_images"].shape == (16, resolution, resolution, 3)


def test_unsupported_resolution_is_rejected(tmp_path):
    with pytest.raises(MmptError, match="28, 64, 128, 224"):
        write_synthetic(tmp_path, 32, [TASKS["breastmnist"]])


def test_cli_writes_the_requested_files(tmp_path, capsys):
    code = main(["--out", str(tmp_path), "--resolution", "28", "--datasets", "path,chest", "--samples", "32"])
    assert code == 0
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["chestmnist.npz", "pathmnist.npz"]
    assert str(tmp_path / "pathmnist.npz") in capsys.readouterr().out


def test_cli_reports_an_unknown_dataset_as_one_error_line(tmp_path, capsys):
    code = main(["--out", str(tmp_path), "--datasets", "pth"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown dataset 'pth'") and err.count("\n") == 1
    assert not list(tmp_path.glob("*.npz"))


def _pooled_pixels(images: np.ndarray) -> np.ndarray:
    """N × 28 × 28 (× C) uint8 -> N × 49*C floats: 4×4 mean pooling keeps the low-frequency signal."""
    n = len(images)
    return images.reshape(n, 7, 4, 7, 4, -1).mean(axis=(2, 4)).reshape(n, -1) / 255


@pytest.mark.parametrize("flag", ["pathmnist", "organamnist", "retinamnist"])
def test_signal_is_learnable_by_a_linear_model(synthetic_root, flag):
    from sklearn.linear_model import LogisticRegression

    data = np.load(synthetic_root / TASKS[flag].filename(28))
    model = LogisticRegression(max_iter=1000)
    model.fit(_pooled_pixels(data["train_images"]), data["train_labels"][:, 0])
    accuracy = model.score(_pooled_pixels(data["test_images"]), data["test_labels"][:, 0])
    majority = np.bincount(data["test_labels"][:, 0]).max() / len(data["test_labels"])
    assert accuracy > majority + 0.25


def test_ordinal_signal_grows_with_the_grade():
    arrays = synthetic_arrays(TASKS["retinamnist"], 28, train_samples=512)
    images = arrays["train_images"].reshape(512, -1).astype(np.float64)
    grades = arrays["train_labels"][:, 0]
    # the grade scales one template, so pixel spread within an image rises with it
    spread = [images[grades == g].std(axis=1).mean() for g in range(5)]
    assert spread == sorted(spread)


def test_ensure_synthetic_writes_only_missing_files(tmp_path):
    breast, blood = TASKS["breastmnist"], TASKS["bloodmnist"]
    (existing,) = write_synthetic(tmp_path, 28, [breast], train_samples=16)
    before = existing.stat().st_mtime_ns
    ensure_synthetic(tmp_path, 28, [breast, blood], train_samples=16)
    assert existing.stat().st_mtime_ns == before
    assert (tmp_path / "bloodmnist.npz").is_file()
