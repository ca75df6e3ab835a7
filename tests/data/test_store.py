"""The store serves verified, memory-mapped MedMNIST arrays from a crash-safe .npy cache."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from mmpt.data import store
from mmpt.data.store import cache_location, open_task
from mmpt.data.synthetic import SYNTHETIC_KEY, synthetic_arrays
from mmpt.errors import MmptError
from mmpt.tasks import SPLITS, TASKS

BREAST, CHEST = TASKS["breastmnist"], TASKS["chestmnist"]


def _write_npz(path: Path, arrays: dict[str, np.ndarray], compressed: bool = True) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def _official_arrays(task=BREAST, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic arrays without the marker, as a user's own file under medmnist's name would be."""
    arrays = synthetic_arrays(task, 28, train_samples=32, seed=seed)
    del arrays[SYNTHETIC_KEY]
    return arrays


def _entries(cache_dir: Path, task=BREAST) -> list[Path]:
    return sorted(p for p in (cache_dir / f"{task.flag}_28").iterdir() if p.is_dir())


@pytest.mark.parametrize("flag", ["breastmnist", "pathmnist", "chestmnist"])
def test_open_task_serves_memmapped_images_and_int64_labels_equal_to_the_npz(synthetic_root, tmp_path, flag):
    task = TASKS[flag]
    data = open_task(synthetic_root, task, 28, cache_dir=tmp_path)
    npz = np.load(synthetic_root / task.filename(28))
    for split in SPLITS:
        images = data.splits[split].open_images()
        assert isinstance(images, np.memmap)
        assert np.array_equal(images, npz[f"{split}_images"])
        assert data.splits[split].labels.dtype == np.int64
        assert data.splits[split].labels.shape == (len(images), task.label_width)
        assert np.array_equal(data.splits[split].labels, npz[f"{split}_labels"])
        assert len(data.splits[split]) == len(images) == data.splits[split].shape[0]


def test_default_cache_is_inside_the_data_root(tmp_path):
    assert cache_location(tmp_path) == tmp_path / ".mmpt-cache"
    assert cache_location(tmp_path, tmp_path / "elsewhere") == tmp_path / "elsewhere"
    _write_npz(tmp_path / "breastmnist.npz", synthetic_arrays(BREAST, 28, train_samples=16))
    data = open_task(tmp_path, BREAST, 28)
    assert data.splits["train"].images_path.is_relative_to(tmp_path / ".mmpt-cache")


def test_root_with_a_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _write_npz(tmp_path / "breastmnist.npz", synthetic_arrays(BREAST, 28, train_samples=16))
    data = open_task("~", BREAST, 28)
    assert data.splits["train"].images_path.is_relative_to(tmp_path / ".mmpt-cache")


def test_split_data_pickles_without_image_data(synthetic_root, tmp_path):
    split = open_task(synthetic_root, TASKS["pathmnist"], 28, cache_dir=tmp_path).splits["train"]
    payload = pickle.dumps(split)
    images = split.open_images()
    assert len(payload) < images.nbytes / 10
    assert np.array_equal(pickle.loads(payload).open_images(), images)


def test_second_open_reuses_the_unpacked_cache(synthetic_root, tmp_path, monkeypatch):
    first = open_task(synthetic_root, BREAST, 28, cache_dir=tmp_path)
    path = first.splits["train"].images_path
    mtime = path.stat().st_mtime_ns

    def fail(*args):
        raise AssertionError("unpacked again")

    monkeypatch.setattr(store, "_unpack_member", fail)
    second = open_task(synthetic_root, BREAST, 28, cache_dir=tmp_path)
    assert second.splits["train"].images_path == path
    assert path.stat().st_mtime_ns == mtime


def test_changed_source_file_is_served_fresh_and_the_old_entry_removed(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    root.mkdir()
    source = _write_npz(root / "breastmnist.npz", synthetic_arrays(BREAST, 28, train_samples=32, seed=0))
    open_task(root, BREAST, 28, cache_dir=cache)
    (old_entry,) = _entries(cache)
    new_arrays = synthetic_arrays(BREAST, 28, train_samples=32, seed=1)
    _write_npz(source, new_arrays)
    # coarse filesystem clocks could give the rewrite the same mtime; a real replacement comes later
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    data = open_task(root, BREAST, 28, cache_dir=cache)
    assert np.array_equal(data.splits["train"].open_images(), new_arrays["train_images"])
    assert np.array_equal(data.splits["test"].labels, new_arrays["test_labels"])
    assert _entries(cache) != [old_entry] and not old_entry.exists()


def test_interrupted_unpack_leaves_no_valid_entry_and_next_open_recovers(synthetic_root, tmp_path, monkeypatch):
    copy_chunks = store._copy_chunks

    def interrupted(src, dst, nbytes):
        dst.write(src.read(nbytes // 2))
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_copy_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        open_task(synthetic_root, BREAST, 28, cache_dir=tmp_path)
    (entry,) = _entries(tmp_path)
    assert not (entry / "manifest.json").exists()
    assert not list(entry.glob("*.npy")) and not list(entry.glob(".*.tmp"))

    monkeypatch.setattr(store, "_copy_chunks", copy_chunks)
    data = open_task(synthetic_root, BREAST, 28, cache_dir=tmp_path)
    npz = np.load(synthetic_root / BREAST.filename(28))
    assert np.array_equal(data.splits["train"].open_images(), npz["train_images"])


def test_cache_entry_with_a_damaged_npy_is_rebuilt(synthetic_root, tmp_path):
    path = open_task(synthetic_root, BREAST, 28, cache_dir=tmp_path).splits["val"].images_path
    path.write_bytes(path.read_bytes()[:200])
    data = open_task(synthetic_root, BREAST, 28, cache_dir=tmp_path)
    npz = np.load(synthetic_root / BREAST.filename(28))
    assert np.array_equal(data.splits["val"].open_images(), npz["val_images"])


def test_md5_mismatch_on_an_official_name_is_rejected_with_the_fix(tmp_path):
    _write_npz(tmp_path / "breastmnist.npz", _official_arrays())
    with pytest.raises(MmptError, match=r"MD5 [0-9a-f]{32}.*750601b1f35ba3300ea97c75c52ff8f6.*--no-verify"):
        open_task(tmp_path, BREAST, 28, cache_dir=tmp_path / "cache")


def test_no_verify_accepts_a_custom_file_with_an_official_name(tmp_path):
    arrays = _official_arrays()
    _write_npz(tmp_path / "breastmnist.npz", arrays)
    data = open_task(tmp_path, BREAST, 28, cache_dir=tmp_path / "cache", verify_md5=False)
    assert np.array_equal(data.splits["train"].open_images(), arrays["train_images"])


def test_md5_is_hashed_once_per_source_file(tmp_path, monkeypatch):
    _write_npz(tmp_path / "breastmnist.npz", _official_arrays())
    calls = []
    md5 = hashlib.md5

    def counting_md5(*args):
        calls.append(1)
        return md5(*args)

    monkeypatch.setattr(store.hashlib, "md5", counting_md5)
    for _ in range(2):
        with pytest.raises(MmptError, match="MD5"):
            open_task(tmp_path, BREAST, 28, cache_dir=tmp_path / "cache")
    assert len(calls) == 1


def test_missing_file_message_names_the_file_the_folder_and_the_fixes(tmp_path):
    with pytest.raises(MmptError) as info:
        open_task(tmp_path, TASKS["pathmnist"], 64)
    message = str(info.value)
    assert "pathmnist_64.npz" in message and str(tmp_path.resolve()) in message
    assert "--data-root" in message and "--download" in message and "synthetic" in message
    assert "\n" not in message


def test_failed_download_is_an_mmpt_error_and_leaves_no_file(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def offline(url, root, filename, md5):
        Path(root, filename).write_bytes(b"partial")
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    with pytest.raises(MmptError, match=r"downloading breastmnist.npz .* failed"):
        open_task(tmp_path, BREAST, 28, cache_dir=tmp_path / "cache", download=True)
    assert not (tmp_path / "breastmnist.npz").exists()


def test_download_places_the_file_under_its_medmnist_name(tmp_path, monkeypatch, synthetic_root):
    import torchvision.datasets.utils

    requested = []

    def fake_download(url, root, filename, md5):
        requested.append((url, md5))
        shutil.copy(synthetic_root / "breastmnist.npz", Path(root, filename))

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", fake_download)
    data = open_task(tmp_path, BREAST, 28, cache_dir=tmp_path / "cache", download=True)
    assert (tmp_path / "breastmnist.npz").is_file() and len(data.splits["val"]) > 0
    assert requested == [(BREAST.url(28), BREAST.md5(28))]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped_byte"])
def test_corrupt_npz_is_rejected_with_advice_to_redownload(tmp_path, damage):
    path = _write_npz(tmp_path / "breastmnist.npz", synthetic_arrays(BREAST, 28, train_samples=64), compressed=False)
    content = bytearray(path.read_bytes())
    if damage == "truncated":
        content = content[: len(content) // 2]
    elif damage == "garbage":
        content = bytearray(os.urandom(len(content)))
    else:
        # the middle of an uncompressed npz is train image data: only the zip CRC can catch this
        content[len(content) // 3] ^= 0xFF
    path.write_bytes(bytes(content))
    with pytest.raises(MmptError, match=r"corrupt.*re-download"):
        open_task(tmp_path, BREAST, 28, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("manifest.json"))


def test_missing_key_is_named(tmp_path):
    arrays = synthetic_arrays(BREAST, 28, train_samples=16)
    del arrays["val_labels"]
    _write_npz(tmp_path / "breastmnist.npz", arrays)
    with pytest.raises(MmptError, match="no 'val_labels' array"):
        open_task(tmp_path, BREAST, 28, cache_dir=tmp_path / "cache")


def _open_with(tmp_path: Path, task, key: str, value: np.ndarray) -> None:
    arrays = synthetic_arrays(task, 28, train_samples=32)
    arrays[key] = value
    _write_npz(tmp_path / task.filename(28), arrays)
    open_task(tmp_path, task, 28, cache_dir=tmp_path / "cache")


def test_image_shape_of_another_resolution_is_rejected(tmp_path):
    with pytest.raises(MmptError, match=r"shape \(32, 64, 64\), expected N×28×28.*--resolution"):
        _open_with(tmp_path, BREAST, "train_images", np.zeros((32, 64, 64), np.uint8))


def test_grey_images_for_an_rgb_task_are_rejected(tmp_path):
    with pytest.raises(MmptError, match=r"expected N×28×28×3"):
        _open_with(tmp_path, TASKS["pathmnist"], "train_images", np.zeros((32, 28, 28), np.uint8))


def test_non_uint8_images_are_rejected(tmp_path):
    with pytest.raises(MmptError, match="dtype float32, expected uint8"):
        _open_with(tmp_path, BREAST, "test_images", np.zeros((8, 28, 28), np.float32))


def test_label_out_of_range_is_rejected(tmp_path):
    labels = np.zeros((8, 1), np.uint8)  # breast at 32 train samples has 8 test samples
    labels[3] = 2
    with pytest.raises(MmptError, match=r"test_labels range over 0\.\.2.*classes 0\.\.1"):
        _open_with(tmp_path, BREAST, "test_labels", labels)


def test_multi_label_labels_other_than_0_or_1_are_rejected(tmp_path):
    labels = synthetic_arrays(CHEST, 28, train_samples=32)["val_labels"].copy()
    labels[0, 5] = 2
    with pytest.raises(MmptError, match="must be 0 or 1"):
        _open_with(tmp_path, CHEST, "val_labels", labels)


def test_labels_of_the_wrong_width_are_rejected(tmp_path):
    with pytest.raises(MmptError, match=r"expected integers of shape N×14"):
        _open_with(tmp_path, CHEST, "val_labels", np.zeros((28, 1), np.uint8))


def test_image_and_label_counts_must_agree(tmp_path):
    with pytest.raises(MmptError, match="has 32 images and 31 labels"):
        _open_with(tmp_path, BREAST, "train_labels", np.zeros((31, 1), np.uint8))


def test_unwritable_cache_folder_is_an_mmpt_error(synthetic_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(MmptError, match=r"cannot create the cache folder.*data.cache_dir"):
        open_task(synthetic_root, BREAST, 28, cache_dir=blocker / "cache")


def test_real_breastmnist_passes_md5_and_has_the_official_split_sizes(real_root, tmp_path):
    data = open_task(real_root, BREAST, 28, cache_dir=tmp_path)
    assert {split: len(data.splits[split]) for split in SPLITS} == {"train": 546, "val": 78, "test": 156}
    assert {split: BREAST.split_size(split) for split in SPLITS} == {"train": 546, "val": 78, "test": 156}
    npz = np.load(real_root / "breastmnist.npz")
    assert np.array_equal(data.splits["val"].open_images(), npz["val_images"])
    assert not (real_root / ".mmpt-cache").exists()


@pytest.fixture
def read_only(tmp_path):
    """Make a folder read-only for real: a read-only bind mount (root ignores chmod), else chmod for other users."""
    mounted = []

    def make(folder: Path) -> Path:
        view = tmp_path / f"{folder.name}-read-only"
        view.mkdir()
        if os.geteuid() != 0:
            shutil.rmtree(view)
            shutil.copytree(folder, view)
            for path in [view, *view.rglob("*")]:
                path.chmod(path.stat().st_mode & ~0o222)
            return view
        if subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a read-only folder here (no bind mount as root)")
        mounted.append(view)
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount a bind mount read-only here")
        return view

    yield make
    for view in mounted:
        subprocess.run(["umount", str(view)], check=False)


def test_complete_cache_in_a_read_only_data_folder_is_read_without_its_lock(tmp_path, read_only):
    root = tmp_path / "data"
    root.mkdir()
    _write_npz(root / "breastmnist.npz", _official_arrays())
    first = open_task(root, BREAST, 28, verify_md5=False)  # unpacks into {root}/.mmpt-cache, takes the lock
    (root / ".mmpt-cache" / "breastmnist_28" / ".lock").unlink()  # a shared copy need not hold a lock file
    ro_root = read_only(root)
    with pytest.raises(OSError):
        (ro_root / "probe").write_text("x")
    data = open_task(ro_root, BREAST, 28, verify_md5=False)
    assert np.array_equal(data.splits["train"].open_images(), first.splits["train"].open_images())
    assert not (ro_root / ".mmpt-cache" / "breastmnist_28" / ".lock").exists()


def test_incomplete_cache_in_a_read_only_data_folder_is_one_error_with_the_fix(tmp_path, read_only):
    root = tmp_path / "data"
    root.mkdir()
    _write_npz(root / "breastmnist.npz", _official_arrays())
    open_task(root, BREAST, 28, verify_md5=False)
    entry = _entries(root / ".mmpt-cache")[0]
    (entry / "manifest.json").unlink()
    ro_root = read_only(root)
    with pytest.raises(MmptError, match=r"cannot unpack breastmnist.npz into .*data.cache_dir"):
        open_task(ro_root, BREAST, 28, verify_md5=False)
