"""MedMNIST+ npz files -> verified, memory-mapped uint8 image arrays and small in-RAM label arrays.

np.load ignores mmap_mode for .npz, and MedMNIST+ at 224 px is about 46 GiB, so each split's images
are streamed once out of the npz into a .npy cache and memory-mapped from there. Cache layout:

    {cache_dir}/{flag}_{res}/.lock
    {cache_dir}/{flag}_{res}/{size}-{mtime_ns}/md5.txt            MD5 of the source, hashed once
    {cache_dir}/{flag}_{res}/{size}-{mtime_ns}/{split}_images.npy
    {cache_dir}/{flag}_{res}/{size}-{mtime_ns}/manifest.json      written last: the entry is valid only with it

The entry's name is the source file's identity, so a replaced source file gets a fresh entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from mmpt.config import DataConfig
from mmpt.data.synthetic import SYNTHETIC_KEY, ensure_synthetic
from mmpt.errors import MmptError
from mmpt.io import atomic_write, write_bytes
from mmpt.tasks import MULTI_LABEL, RESOLUTIONS, SPLITS, TaskSpec

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent first opens then unpack side by side
    fcntl = None

log = logging.getLogger(__name__)

CACHE_DIRNAME = ".mmpt-cache"
TRAIN_IMAGES = "train_images"  # a data identity's record of the train split's size (checkpoints carry it)
MANIFEST_VERSION = 1
CHUNK_BYTES = 4 << 20  # copy unit when unpacking: a few MiB keeps RAM flat for 20 GiB arrays
REQUIRED_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))

# What reading a damaged npz raises: zip structure, deflate stream, short data, bad .npy header.
CORRUPT_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError)


@dataclass(frozen=True, eq=False)
class SplitData:
    """One split of one task: the path of its unpacked images and its labels.

    Pickles cheaply (a path and the labels), so DataLoader workers each memory-map the images themselves.
    """

    images_path: Path  # the unpacked .npy file; open it with open_images() in each process
    labels: np.ndarray  # int64, N × task.label_width, read-only
    shape: tuple[int, ...]  # images shape: N × H × W (grey) or N × H × W × 3

    def open_images(self) -> np.ndarray:
        """Return the images as a read-only uint8 memory map."""
        return np.load(self.images_path, mmap_mode="r")

    def __len__(self) -> int:
        return self.shape[0]


@dataclass(frozen=True)
class TaskData:
    """The verified train/val/test splits of one task at one resolution."""

    task: TaskSpec
    resolution: int
    splits: dict[str, SplitData]  # "train", "val", "test"
    # the source file's identity: file name, size, mtime_ns, and its MD5 when it was verified (else None)
    identity: dict = field(default_factory=dict)


def data_changes(saved: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """Describe each task whose data file differs between two `{flag: TaskData.identity}` records.

    Files compare by MD5 when both records have one (so a copy with a new mtime is the same data),
    else by size and modification time. Tasks present in only one record are not compared.
    """
    changes = []
    for flag in sorted(saved.keys() & current.keys()):
        old, new = saved[flag], current[flag]
        if old.get("md5") and new.get("md5"):
            if old["md5"] != new["md5"]:
                changes.append(f"{new.get('file', flag)} has MD5 {new['md5']}, not {old['md5']}")
        elif (old.get("size"), old.get("mtime_ns")) != (new.get("size"), new.get("mtime_ns")):
            changes.append(
                f"{new.get('file', flag)} has size {new.get('size')} and mtime_ns {new.get('mtime_ns')}, "
                f"not {old.get('size')} and {old.get('mtime_ns')}"
            )
    return changes


def cache_location(root: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Return the folder that holds unpacked images: `cache_dir`, or `{root}/.mmpt-cache` when it is None."""
    return Path(cache_dir).expanduser() if cache_dir is not None else Path(root).expanduser() / CACHE_DIRNAME


def open_task(
    root: str | Path,
    task: TaskSpec,
    resolution: int,
    cache_dir: str | Path | None = None,
    verify_md5: bool = True,
    download: bool = False,
    evaluation: bool = False,
) -> TaskData:
    """Verify `{root}/{task.filename(resolution)}`, unpack its images once into the cache, return its splits.

    Checks MD5 (files without the synthetic marker, when `verify_md5`), keys, dtypes, shapes and label
    range on every call; unpacks only when the cache has no valid entry for this exact source file.
    Raises MmptError, with the fix in its one-line message, for a missing, corrupt, mismatched or
    malformed file, a failed download, or a cache folder that cannot be written. `evaluation`: the caller
    (evaluate, probe) neither downloads nor generates data, so a missing file's message offers --data-root only.
    The identity records the train split's size (TRAIN_IMAGES): what a run trained on, for its readers.
    """
    if resolution not in RESOLUTIONS:
        sizes = ", ".join(map(str, RESOLUTIONS))
        raise MmptError(f"resolution must be one of {sizes} (MedMNIST+ sizes), got {resolution}")
    root = Path(root).expanduser()  # the config's default root is medmnist's "~/.medmnist"
    path = root / task.filename(resolution)
    if not path.is_file():
        if evaluation:
            raise MmptError(
                f"{path.name} not found in {root.resolve()}; pass --data-root DIR for the folder that holds the "
                "files the run was trained on (evaluation reads data files, never downloads or generates them)"
            )
        if not download:
            raise MmptError(
                f"{path.name} not found in {root.resolve()}; put medmnist's file there, pass --data-root DIR "
                f"for the folder that holds it, add --download to fetch it (needs network), "
                f"or set data.synthetic: true to train on synthetic data"
            )
        _download(task, resolution, root)
    stat = path.stat()
    source = {"file": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    task_cache = cache_location(root, cache_dir) / f"{task.flag}_{resolution}"
    entry = task_cache / f"{stat.st_size}-{stat.st_mtime_ns}"
    try:
        entry.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MmptError(
            f"cannot create the cache folder {entry} ({exc.strerror or exc}); "
            f"set data.cache_dir to a writable folder (--set data.cache_dir=DIR)"
        ) from None

    # one process unpacks while the others (e.g. DDP ranks) wait, then find the entry valid
    with _locked(task_cache / ".lock"):
        try:
            with zipfile.ZipFile(path) as zf:
                keys = {name.removesuffix(".npy") for name in zf.namelist()}
                md5 = None
                if SYNTHETIC_KEY not in keys and verify_md5:
                    md5 = _cached_md5(path, entry)
                    _check_md5(path, md5, task.md5(resolution))
                shapes, labels = {}, {}
                for split in SPLITS:
                    shapes[split], labels[split] = _read_split(zf, path, task, resolution, keys, split)
        except (*CORRUPT_ERRORS, OSError) as exc:
            raise _corrupt(path, exc) from None
        if not _entry_is_valid(entry, source, shapes):
            _unpack(path, entry, source, md5, shapes)
            _remove_stale_entries(task_cache, keep=entry)
    splits = {split: SplitData(entry / f"{split}_images.npy", labels[split], shapes[split]) for split in SPLITS}
    identity = {**source, "md5": md5, TRAIN_IMAGES: shapes["train"][0]}
    return TaskData(task=task, resolution=resolution, splits=splits, identity=identity)


def _read_split(
    zf: zipfile.ZipFile, path: Path, task: TaskSpec, resolution: int, keys: set[str], split: str
) -> tuple[tuple[int, ...], np.ndarray]:
    """Return (images shape, int64 labels) of one split after checking them against the task."""
    for key in (f"{split}_images", f"{split}_labels"):
        if key not in keys:
            raise MmptError(
                f"{path} has no '{key}' array (it holds {', '.join(sorted(keys))}); a MedMNIST file needs "
                f"{', '.join(REQUIRED_KEYS)}: re-download it or regenerate it"
            )
    with zf.open(f"{split}_images.npy") as f:
        shape, _, dtype = _read_npy_header(f)
    with zf.open(f"{split}_labels.npy") as f:
        labels = np.lib.format.read_array(f, allow_pickle=False)
    where = f"{path} {split}"
    if dtype != np.uint8:
        raise MmptError(
            f"{where}_images have dtype {dtype}, expected uint8 as in MedMNIST; store the images as uint8 (0-255)"
        )
    pixel_shape = (resolution, resolution) if task.channels == 1 else (resolution, resolution, 3)
    if tuple(shape[1:]) != pixel_shape:
        expected = "×".join(map(str, ("N", *pixel_shape)))
        raise MmptError(
            f"{where}_images have shape {shape}, expected {expected} for {task.flag} at {resolution} px; "
            f"check that the file matches --resolution and the dataset"
        )
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 2 or labels.shape[1] != task.label_width:
        raise MmptError(
            f"{where}_labels have shape {labels.shape} and dtype {labels.dtype}, expected integers of shape "
            f"N×{task.label_width} for {task.flag}; fix the labels or re-download the file"
        )
    if labels.shape[0] != shape[0] or shape[0] == 0:
        raise MmptError(
            f"{where} has {shape[0]} images and {labels.shape[0]} labels, expected the same non-zero number; "
            f"fix the file or re-download it"
        )
    if task.task_type == MULTI_LABEL:
        if not np.isin(labels, (0, 1)).all():
            found = np.unique(labels)[:10].tolist()
            raise MmptError(f"{where}_labels of multi-label {task.flag} must be 0 or 1, found {found}; fix the labels")
    elif labels.min() < 0 or labels.max() >= task.num_classes:
        raise MmptError(
            f"{where}_labels range over {labels.min()}..{labels.max()}, but {task.flag} has classes "
            f"0..{task.num_classes - 1}; fix the labels or re-download the file"
        )
    labels = labels.astype(np.int64)
    labels.setflags(write=False)
    return tuple(shape), labels


def _read_npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Read a .npy header from a stream; return (shape, fortran_order, dtype). Raises ValueError."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def _entry_is_valid(entry: Path, source: dict, shapes: dict[str, tuple[int, ...]]) -> bool:
    """True when the manifest matches this source file and every .npy opens with the expected shape."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("source") != source:
        return False
    for split, shape in shapes.items():
        try:
            images = np.load(entry / f"{split}_images.npy", mmap_mode="r")
        except (OSError, ValueError):
            return False
        if images.shape != shape or images.dtype != np.uint8:
            return False
    return True


def _unpack(path: Path, entry: Path, source: dict, md5: str | None, shapes: dict[str, tuple[int, ...]]) -> None:
    """Stream every split's images into `entry`, then write the manifest. Raises MmptError on failure."""
    try:
        # the entry stays invalid from here until the new manifest lands
        (entry / "manifest.json").unlink(missing_ok=True)
        # temp files left by a killed process (we hold the lock, so nobody else is writing them)
        for leftover in entry.glob(".*.tmp"):
            leftover.unlink()
        with zipfile.ZipFile(path) as zf:
            for split in SPLITS:
                log.info("unpacking %s %s images %s into %s", path.name, split, shapes[split], entry)
                _unpack_member(zf, f"{split}_images.npy", entry / f"{split}_images.npy")
    except CORRUPT_ERRORS as exc:
        raise _corrupt(path, exc) from None
    except OSError as exc:
        raise MmptError(
            f"cannot unpack {path.name} into {entry} ({exc.strerror or exc}); free disk space there "
            f"or set data.cache_dir to a folder with room (--set data.cache_dir=DIR)"
        ) from None
    manifest = {
        "version": MANIFEST_VERSION,
        "source": source,
        "md5": md5,
        "images": {split: {"shape": list(shape), "dtype": "uint8"} for split, shape in shapes.items()},
    }
    try:
        write_bytes(entry / "manifest.json", json.dumps(manifest, indent=1).encode())
    except OSError as exc:
        raise MmptError(
            f"cannot write {entry / 'manifest.json'} ({exc.strerror or exc}); free disk space there "
            f"or set data.cache_dir to a writable folder (--set data.cache_dir=DIR)"
        ) from None


def _unpack_member(zf: zipfile.ZipFile, member: str, out: Path) -> None:
    """Copy one .npy member of the npz to `out` in chunks, atomically."""

    def write(dst: IO[bytes]) -> None:
        with zf.open(member) as src:
            shape, fortran_order, dtype = _read_npy_header(src)
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran_order, "shape": shape}
            np.lib.format.write_array_header_1_0(dst, header)
            _copy_chunks(src, dst, math.prod(shape) * dtype.itemsize)

    atomic_write(out, write)


def _copy_chunks(src: IO[bytes], dst: IO[bytes], nbytes: int) -> None:
    """Copy exactly `nbytes` from src to dst in CHUNK_BYTES pieces. Raises EOFError/ValueError on a size mismatch."""
    remaining = nbytes
    while remaining:
        chunk = src.read(min(CHUNK_BYTES, remaining))
        if not chunk:
            raise EOFError(f"array data ends {remaining} bytes early")
        dst.write(chunk)
        remaining -= len(chunk)
    # trailing bytes mean the header understates the data; reading to the end also lets zipfile check the CRC
    if src.read(1):
        raise ValueError("array data is longer than its header says")


def _remove_stale_entries(task_cache: Path, keep: Path) -> None:
    """Delete cache entries of earlier versions of the source file (they can be tens of GiB)."""
    for entry in task_cache.iterdir():
        if entry.is_dir() and entry != keep:
            shutil.rmtree(entry, ignore_errors=True)


def _cached_md5(path: Path, entry: Path) -> str:
    """Return the MD5 of `path`, hashing it only when `entry` (named after the file's size and mtime) lacks it."""
    record = entry / "md5.txt"
    if record.is_file():
        return record.read_text().strip()
    log.info("computing the MD5 of %s", path)
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    md5 = digest.hexdigest()
    try:
        write_bytes(record, md5.encode())
    except OSError:  # a read-only cache: hash again next time rather than fail
        pass
    return md5


def _check_md5(path: Path, actual: str, expected: str) -> None:
    if actual != expected:
        raise MmptError(
            f"{path} has MD5 {actual}, but medmnist lists {expected} for {path.name}; the file is damaged or "
            f"not the official one: delete it and re-download it (--download), or pass --no-verify if it is "
            f"your own file in MedMNIST format"
        )


def _corrupt(path: Path, exc: BaseException) -> MmptError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return MmptError(f"{path} is corrupt or truncated ({reason}); delete it and re-download it (--download)")


def _download(task: TaskSpec, resolution: int, root: Path) -> None:
    """Fetch medmnist's file into `root` (MD5-checked by torchvision). Raises MmptError on any failure."""
    # imported here: torchvision is needed only to download
    from torchvision.datasets.utils import download_url

    url, name = task.url(resolution), task.filename(resolution)
    try:
        root.mkdir(parents=True, exist_ok=True)
        # a download into a temp folder, moved in only when complete, never leaves a partial file under the real name
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
            download_url(url, root=tmp, filename=name, md5=task.md5(resolution))
            os.replace(Path(tmp) / name, root / name)
    except Exception as exc:  # network, HTTP, disk and checksum failures all need the same advice
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MmptError(
            f"downloading {name} from {url} failed ({reason}); check the network connection, or download "
            f"the file by hand into {root.resolve()}"
        ) from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if needed) for the duration of the block."""
    if fcntl is None:
        yield
        return
    try:
        f = open(path, "a")
    except OSError:
        # a read-only cache (e.g. a shared, complete one) needs no lock to be read; an unpack there fails with advice
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def evaluation_data(data: DataConfig, root: str | None = None, cache_dir: str | None = None) -> DataConfig:
    """A run's data config for evaluation: `root` instead of its data.root when given; the unpacked cache in
    `cache_dir`, else the run's own cache when reading the run's own root, else the new root's default. Never
    generated or downloaded, so a foreign checkpoint's data.synthetic or data.download cannot make it write data."""
    return dataclasses.replace(
        data,
        root=root or data.root,
        cache_dir=cache_dir or (data.cache_dir if root is None else None),
        synthetic=False,
        download=False,
    )


def open_data(data: DataConfig, tasks: list[TaskSpec], *, evaluation: bool = False) -> dict[str, TaskData]:
    """Verify and memory-map every task's splits per the data config (writing synthetic files first when asked).
    `evaluation`: for evaluate and probe, with `evaluation_data`'s config (see open_task).

    Raises MmptError like open_task.
    """
    root = Path(data.root).expanduser()
    if data.synthetic:
        ensure_synthetic(root, data.resolution, tasks, train_samples=data.synthetic_samples, seed=0)
    return {
        task.flag: open_task(
            root,
            task,
            data.resolution,
            cache_dir=data.cache_dir,
            verify_md5=data.verify,
            download=data.download,
            evaluation=evaluation,
        )
        for task in tasks
    }
