"""Bad input: one `error:` line that says what is wrong and what to do, exit code 2, and nothing lost.

Every case runs the real command line in-process against a copy of a finished run folder and checks
that the folder's earlier outputs are byte-for-byte untouched: validation happens before the folder
is cleared, even with --overwrite.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.__main__ import main as bench_main
from mmpt.cli import evaluate_main, train_main
from mmpt.data.synthetic import SYNTHETIC_KEY, synthetic_arrays, write_synthetic
from mmpt.errors import MmptError
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.rundir import Results, RunDir
from mmpt.tasks import resolve_tasks
from tests.helpers import TINY_RUN, folder_snapshot

SAMPLES = 32  # train images per synthetic dataset


@dataclass
class Env:
    """What a case works with: good data, a copy of a finished run (breast, retina) and a scratch folder."""

    root: Path  # synthetic breast, retina, pneumonia and chest files
    run: Path  # a copy of the finished run: the earlier outputs that must survive
    other_run: Path  # a finished run on pneumonia only (another config)
    tmp: Path
    mp: pytest.MonkeyPatch  # for machine failures (disk full) that cannot be made for real in a test

    def resume(self, *extra: str) -> tuple:
        return train_main, ["--resume", str(self.run), *extra]

    def evaluate(self, *extra: str) -> tuple:
        return evaluate_main, [str(self.run), "--device", "cpu", *extra]

    def bytes_file(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    def file(self, name: str = "a_file") -> Path:
        """A plain file in the scratch folder (for paths that exist as a file, or whose parent is a file)."""
        path = self.tmp / name
        path.write_text("not a folder")
        return path

    def train(self, *extra: str, root: Path | None = None) -> tuple:
        """A fresh training command into the copied run folder with --overwrite, so bad input is the only obstacle."""
        return train_main, [
            "--data-root",
            str(root or self.root),
            "--output",
            str(self.run),
            "--overwrite",
            *TINY_RUN,
            "--datasets",
            "breast,retina",
            *extra,
        ]

    def bad_file(self, dataset: str, change, marker: bool = True) -> Path:
        """A data root holding `dataset`'s synthetic file after `change(arrays)`; returns the root."""
        task = resolve_tasks(dataset)[0]
        arrays = synthetic_arrays(task, 28, train_samples=SAMPLES)
        if not marker:
            del arrays[SYNTHETIC_KEY]
        change(arrays)
        root = self.tmp / "bad_data"
        root.mkdir(exist_ok=True)
        np.savez(root / task.filename(28), **arrays)
        return root


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data root, a 1-epoch run on breast+retina, a 1-epoch run on pneumonia), trained once for the module."""
    base = tmp_path_factory.mktemp("bad_input")
    root = base / "data"
    write_synthetic(root, 28, resolve_tasks("breast,retina,pneumonia,chest"), train_samples=SAMPLES)
    run, other = base / "run", base / "other"
    common = ["--data-root", str(root), *TINY_RUN]
    assert train_main([*common, "--output", str(run), "--datasets", "breast,retina"]) == 0
    assert train_main([*common, "--output", str(other), "--datasets", "pneumonia"]) == 0
    return root, run, other


@pytest.fixture
def env(finished_runs, tmp_path, monkeypatch) -> Env:
    root, run, other = finished_runs
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return Env(root=root, run=copy, other_run=other, tmp=tmp_path, mp=monkeypatch)


# ---------------------------------------------------------------- the cases
# Each builder prepares the bad input and returns (main, argv); `words` must all appear in the error line:
# what is wrong and what to do.


def missing_data_file(e: Env):
    (e.tmp / "empty").mkdir()
    return e.train("--datasets", "breast", root=e.tmp / "empty")


def truncated_npz(e: Env):
    root = e.bad_file("breast", lambda a: None)
    path = root / "breastmnist.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return e.train("--datasets", "breast", root=root)


def garbage_npz(e: Env):
    root = e.tmp / "garbage"
    root.mkdir()
    (root / "breastmnist.npz").write_bytes(np.random.default_rng(0).bytes(20_000))
    return e.train("--datasets", "breast", root=root)


def corrupt_npz_data(e: Env):
    # a flipped byte inside the stored images: the zip structure is intact, the CRC is not
    root = e.bad_file("breast", lambda a: None)
    path = root / "breastmnist.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    return e.train("--datasets", "breast", root=root)


def md5_mismatch(e: Env):
    # medmnist's name without the synthetic marker: it must be the official file, and it is not
    return e.train("--datasets", "breast", root=e.bad_file("breast", lambda a: None, marker=False))


def missing_key(e: Env):
    return e.train("--datasets", "breast", root=e.bad_file("breast", lambda a: a.pop("val_labels")))


def wrong_image_shape(e: Env):
    def crop(a):
        a["train_images"] = np.ascontiguousarray(a["train_images"][:, :27, :27])

    return e.train("--datasets", "breast", "--no-verify", root=e.bad_file("breast", crop, marker=False))


def wrong_image_dtype(e: Env):
    def to_float(a):
        a["test_images"] = a["test_images"].astype(np.float32)

    return e.train("--datasets", "breast", root=e.bad_file("breast", to_float))


def label_out_of_range(e: Env):
    def bad_label(a):
        a["train_labels"][3] = 2  # breast is binary: classes 0..1

    return e.train("--datasets", "breast", root=e.bad_file("breast", bad_label))


def multi_label_not_binary(e: Env):
    def bad_label(a):
        a["val_labels"][0, 5] = 2

    return e.train("--datasets", "chest", root=e.bad_file("chest", bad_label))


def labels_count_mismatch(e: Env):
    def drop_one(a):
        a["train_labels"] = a["train_labels"][:-1]

    return e.train("--datasets", "breast", root=e.bad_file("breast", drop_one))


def resume_without_checkpoint(e: Env):
    RunDir(e.run).last.unlink()
    return train_main, ["--resume", str(e.run)]


def resume_checkpoint_of_another_run(e: Env):
    shutil.copy2(RunDir(e.other_run).last, RunDir(e.run).last)
    return train_main, ["--resume", str(e.run)]


def resume_from_a_copy_of_best(e: Env):
    shutil.copy2(RunDir(e.run).best, RunDir(e.run).last)
    return train_main, ["--resume", str(e.run), "--epochs", "2"]


def eval_garbage_checkpoint(e: Env):
    RunDir(e.run).best.write_bytes(np.random.default_rng(0).bytes(4096))
    return evaluate_main, [str(e.run), "--device", "cpu"]


def eval_truncated_checkpoint(e: Env):
    best = RunDir(e.run).best
    best.write_bytes(best.read_bytes()[:5000])
    return evaluate_main, [str(e.run), "--device", "cpu"]


def eval_not_an_mmpt_checkpoint(e: Env):
    torch.save({"weights": torch.zeros(3)}, e.tmp / "other.pt")
    return evaluate_main, ["--checkpoint", str(e.tmp / "other.pt"), "--output", str(e.run / "eval")]


def yaml_file(e: Env, text: str) -> Path:
    path = e.tmp / "recipe.yaml"
    path.write_text(text)
    return path


def tamper_checkpoint(path: Path, change) -> None:
    """Change a checkpoint's weights in place, keeping its stored digest: the file still parses, as after bit rot."""
    state = torch.load(path, weights_only=True)
    change(next(t for t in state[ckpt.MODEL].values() if t.is_floating_point() and t.numel() > 1))
    torch.save(state, path)


def tampered_last(e: Env):
    tamper_checkpoint(RunDir(e.run).last, lambda t: t.add_(0.01))
    return e.resume("--epochs", "2")


def tampered_best(e: Env):
    tamper_checkpoint(RunDir(e.run).best, lambda t: t.view(-1).__setitem__(0, 0.5))
    return e.evaluate()


def non_finite_best(e: Env):
    tamper_checkpoint(RunDir(e.run).best, lambda t: t.fill_(float("nan")))
    return e.evaluate()


def old_format_last(e: Env):
    path = RunDir(e.run).last
    state = torch.load(path, weights_only=True)
    del state[ckpt.DIGEST]
    torch.save(dict(state, **{ckpt.FORMAT: 1}), path)
    return e.resume()


def changed_data(e: Env):
    # the same files in another folder, one of them rewritten since the run trained on it
    root = e.tmp / "moved_data"
    shutil.copytree(e.root, root, ignore=shutil.ignore_patterns(".mmpt-cache"))
    os.utime(root / "breastmnist.npz", ns=(1_000_000_000, 1_000_000_000))
    return e.resume("--data-root", str(root), "--epochs", "2")


def disk_full_on(e: Env, name: str) -> None:
    """Writing `name` (every write goes through mmpt.io.atomic_write) fails as on a full disk."""
    import mmpt.io

    real = mmpt.io.atomic_write

    def atomic_write(path, write):
        if Path(path).name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, write)

    e.mp.setattr(mmpt.io, "atomic_write", atomic_write)


def disk_full_unpacking(e: Env):
    from mmpt.data import store

    def no_space(src, dst, nbytes):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    e.mp.setattr(store, "_copy_chunks", no_space)
    return e.train("--set", f"data.cache_dir={e.tmp / 'fresh_cache'}")


def disk_full_on_resume(e: Env):
    disk_full_on(e, "config.yaml")
    return e.resume("--epochs", "2")  # a new config.yaml to write, and its earlier text to keep


def disk_full_at_checkpoint(e: Env):
    def no_space(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    e.mp.setattr(ckpt, "atomic_write", no_space)
    # a training run that reaches its first checkpoint (a fresh folder: the run folder must not change)
    return train_main, [*e.train()[1], "--output", str(e.tmp / "fresh")]


def item_in_run(e: Env, name: str, kind: str):
    path = e.run / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.mkdir() if kind == "folder" else path.write_text("mine")
    return e.train()


def malformed(e: Env, name: str, data: bytes):
    (e.run / name).write_bytes(data)
    if name.startswith("predictions/"):
        return evaluate_main, ["compare", str(e.run), str(e.other_run)]
    return e.resume()


# Resume must not change a fixed key (what a run computes): (key, flags that change it).
RESUME_REFUSALS = [
    ("optim.per_head", ["--set", "optim.per_head=false"]),
    ("optim.name", ["--set", "optim.name=sgd"]),
    ("optim.weight_decay", ["--set", "optim.weight_decay=0.5"]),
    ("loss.weighting", ["--set", "loss.weighting=size"]),
    ("loss.ordinal", ["--set", "loss.ordinal=ce"]),
    ("train.batch_size", ["--batch-size", "8"]),
    ("train.seed", ["--seed", "7"]),
    ("train.precision", ["--set", "train.precision=bf16"]),
    ("sampler.last_batch", ["--set", "sampler.last_batch=drop"]),
    ("sampler.replacement", ["--set", "sampler.replacement=true"]),
    ("sampler.steps_per_epoch", ["--set", "sampler.steps_per_epoch=3"]),
    ("input.mode", ["--set", "input.mode=pad"]),
    ("model.drop_rate", ["--set", "model.drop_rate=0.5"]),
    ("data.resolution", ["--resolution", "64"]),
]


CASES = [
    # resume: a setting that cannot change mid-run
    *[
        pytest.param(
            lambda e, flags=flags: e.resume(*flags),
            [f"was trained with {key}=", "cannot change mid-run", "start a new run with --output"],
            id=f"resume-changes-{key}",
        )
        for key, flags in RESUME_REFUSALS
    ],
    pytest.param(
        changed_data,
        ["the data changed since the checkpoint was written", "breastmnist.npz", "--set data.allow_changed=true"],
        id="resume-on-changed-data",
    ),
    # checkpoints are verified before they are trusted
    pytest.param(
        tampered_last,
        ["last.pt fails its integrity check", "restore it from a backup", "evaluate.py --checkpoint", "best.pt"],
        id="resume-tampered-last",
    ),
    pytest.param(
        tampered_best,
        ["best.pt fails its integrity check", "evaluate.py --checkpoint", "last.pt"],
        id="eval-tampered-best",
    ),
    pytest.param(
        non_finite_best, ["best.pt fails its integrity check", "non-finite weights"], id="eval-non-finite-best"
    ),
    pytest.param(old_format_last, ["last.pt has format 1", "this mmpt reads format 3"], id="resume-old-format"),
    # filesystem: paths that exist as the wrong kind, parents that are files, a full disk
    pytest.param(
        lambda e: (train_main, [*e.train()[1], "--output", str(e.file() / "run")]),
        ["cannot create or open the run folder", "Not a directory", "--output DIR"],
        id="output-parent-is-a-file",
    ),
    pytest.param(
        lambda e: (train_main, [*e.train()[1], "--output", str(e.file())]),
        ["cannot create or open the run folder", "--output DIR"],
        id="output-is-a-file",
    ),
    pytest.param(
        lambda e: item_in_run(e, "checkpoints", "file"),
        ["has a file named checkpoints where mmpt writes a folder", "move it away"],
        id="checkpoints-is-a-file",
    ),
    pytest.param(
        lambda e: item_in_run(e, "tb", "file"), ["has a file named tb where mmpt writes a folder"], id="tb-is-a-file"
    ),
    pytest.param(
        lambda e: item_in_run(e, "config.yaml", "folder"),
        ["has a folder named config.yaml where mmpt writes a file"],
        id="config-yaml-is-a-folder",
    ),
    pytest.param(
        lambda e: e.train("--set", f"data.cache_dir={e.file() / 'cache'}"),
        ["cannot create the cache folder", "Not a directory", "data.cache_dir"],
        id="cache-parent-is-a-file",
    ),
    pytest.param(
        lambda e: e.evaluate("--cache-dir", str(e.file() / "cache")),
        ["cannot create the cache folder", "data.cache_dir"],
        id="eval-cache-parent-is-a-file",
    ),
    pytest.param(
        lambda e: e.evaluate("--output", str(e.file())), ["is a file", "--output DIR"], id="eval-output-is-a-file"
    ),
    pytest.param(
        lambda e: e.evaluate("--output", str(e.file() / "eval")),
        ["which is a file", "--output DIR"],
        id="eval-output-parent-is-a-file",
    ),
    pytest.param(
        disk_full_unpacking,
        ["cannot unpack retinamnist.npz", "No space left on device", "data.cache_dir"],
        id="disk-full-unpacking-into-the-cache",
    ),
    pytest.param(
        lambda e: e.train("--data-root", str(e.file())),
        ["retinamnist.npz not found", "--data-root DIR"],
        id="data-root-is-a-file",
    ),
    pytest.param(
        lambda e: e.evaluate("--data-root", str(e.file())),
        ["not found", "--data-root DIR"],
        id="eval-data-root-is-a-file",
    ),
    pytest.param(
        disk_full_on_resume,
        ["cannot write", "config.yaml", "No space left on device", "free disk space"],
        id="disk-full-writing-config",
    ),
    pytest.param(
        disk_full_at_checkpoint,
        ["cannot write checkpoint", "No space left on device", "the previous one is intact"],
        id="disk-full-writing-checkpoint",
    ),
    # files read back that are malformed
    pytest.param(
        lambda e: malformed(e, "predictions/data.json", b"{not json"),
        ["data.json is not readable JSON", "evaluate the run again"],
        id="compare-malformed-data-json",
    ),
    pytest.param(
        lambda e: malformed(e, "predictions/data.json", b'{"breastmnist": [1, 2]}'),
        ["is not a record of evaluated data"],
        id="compare-data-json-of-another-shape",
    ),
    pytest.param(
        lambda e: malformed(e, "predictions/data.json", b"\xff\xfe{}"),
        ["data.json is not readable JSON"],
        id="compare-data-json-not-utf8",
    ),
    pytest.param(
        lambda e: malformed(e, "config.yaml", b"train: {epochs: 2\n"),
        ["config.yaml is not valid YAML"],
        id="resume-malformed-config-yaml",
    ),
    pytest.param(
        lambda e: malformed(e, "config.yaml", b"train:\n  epochs: \xff\n"),
        ["config.yaml is not UTF-8 text"],
        id="resume-config-yaml-not-utf8",
    ),
    pytest.param(
        lambda e: malformed(e, "config.yaml", b"- a list\n"), ["must hold a mapping"], id="resume-config-yaml-a-list"
    ),
    pytest.param(
        lambda e: malformed(e, "config.yaml", b"train: {epochs: many}\n"),
        ["train.epochs must be an integer"],
        id="resume-config-yaml-bad-value",
    ),
    # YAML shapes
    pytest.param(
        lambda e: e.train("--config", str(yaml_file(e, "base: 5\n"))),
        ["base must be the path of another YAML file", "got 5"],
        id="yaml-base-a-number",
    ),
    pytest.param(
        lambda e: e.train("--config", str(yaml_file(e, "base: [a.yaml]\n"))),
        ["base must be the path of another YAML file", "['a.yaml']"],
        id="yaml-base-a-list",
    ),
    pytest.param(
        lambda e: e.train("--config", str(yaml_file(e, "base: {file: a.yaml}\n"))),
        ["base must be the path of another YAML file"],
        id="yaml-base-a-mapping",
    ),
    pytest.param(
        lambda e: e.train("--config", str(yaml_file(e, "base: missing.yaml\n"))),
        ["missing.yaml not found"],
        id="yaml-base-missing",
    ),
    pytest.param(lambda e: e.train("--config", str(e.tmp)), ["not found", "--config"], id="config-is-a-folder"),
    pytest.param(
        lambda e: e.train("--config", str(e.bytes_file("latin1.yaml", b"name: caf\xe9\n"))),
        ["latin1.yaml is not UTF-8 text", "save it as UTF-8"],
        id="yaml-not-utf8",
    ),
    pytest.param(
        lambda e: e.train("--config", str(yaml_file(e, "loss: [1, 2]\n"))),
        ["loss must be a mapping"],
        id="yaml-section-a-list",
    ),
    pytest.param(
        lambda e: e.train("--config", str(yaml_file(e, "optim:\n  weight_decay: [1]\n"))),
        ["optim.weight_decay must be a number"],
        id="yaml-value-a-list",
    ),
    # config keys against the range their consumer accepts
    pytest.param(lambda e: e.train("--set", "model.drop_rate=1"), ["model.drop_rate must be < 1"], id="drop-rate-1"),
    pytest.param(
        lambda e: e.train("--set", "input.augment.crop_scale_min=1.5"),
        ["input.augment.crop_scale_min must be <= 1"],
        id="crop-scale-above-1",
    ),
    pytest.param(
        lambda e: e.train("--set", "sampler.alpha=1000"), ["sampler.alpha must be <= 50"], id="alpha-overflows"
    ),
    pytest.param(lambda e: e.train("--seed", str(2**32)), ["train.seed must be <= 4294967295"], id="seed-above-2-32"),
    pytest.param(
        lambda e: e.train("--epochs", str(2**64)), ["train.epochs must be an integer within"], id="int-beyond-64-bits"
    ),
    pytest.param(
        lambda e: e.train("--set", "name=a\x00b"), ["name must not contain a NUL character"], id="nul-in-a-string"
    ),
    pytest.param(
        lambda e: e.train("--device", "cuda:x"),
        ["train.device must be auto, cpu, cuda or cuda:N"],
        id="device-not-a-device",
    ),
    pytest.param(
        lambda e: e.train("--batch-size", "1"),
        ["train.batch_size is 1", "BatchNorm", "--batch-size 2"],
        id="batch-size-1-with-batchnorm",
    ),
    pytest.param(
        lambda e: e.train("--set", "optim.name=bnbadamw"),
        ["optimizer bnbadamw cannot be created here", "choose another optim.name"],
        id="optimizer-not-available-here",
    ),
    # evaluate.py flags
    pytest.param(
        lambda e: e.train("--set", "optim.lr"), ["--set expects key.sub=value", "'optim.lr'"], id="set-without-a-value"
    ),
    pytest.param(
        lambda e: e.evaluate("--batch-size", "0"), ["--batch-size must be >= 1", "got 0"], id="eval-batch-size-0"
    ),
    pytest.param(
        lambda e: (evaluate_main, [str(e.run), "--device", "gpu"]),
        ["device must be auto, cpu, cuda or cuda:N", "'gpu'"],
        id="eval-device-not-a-device",
    ),
    pytest.param(
        lambda e: (evaluate_main, [str(e.run), "--device", "cuda:7"]),
        ["device is cuda:7", "cuda"],
        id="eval-device-not-present",
    ),
    pytest.param(
        lambda e: (evaluate_main, ["compare", str(e.run), str(e.other_run), "--metrics", "f1"]),
        ["unknown metric 'f1'", "choose from auc"],
        id="compare-unknown-metric",
    ),
    pytest.param(
        lambda e: (evaluate_main, [str(e.run), str(e.other_run)]),
        ["evaluate one run at a time", "evaluate.py compare"],
        id="eval-two-runs-without-compare",
    ),
    # data
    pytest.param(
        missing_data_file,
        ["breastmnist.npz not found", "--data-root", "--download", "data.synthetic"],
        id="missing-data-file",
    ),
    pytest.param(truncated_npz, ["breastmnist.npz is corrupt or truncated", "re-download"], id="truncated-npz"),
    pytest.param(garbage_npz, ["breastmnist.npz is corrupt or truncated", "re-download"], id="garbage-npz"),
    pytest.param(
        corrupt_npz_data, ["breastmnist.npz is corrupt or truncated", "CRC", "re-download"], id="corrupt-npz-crc"
    ),
    pytest.param(md5_mismatch, ["has MD5", "not the official one", "re-download", "--no-verify"], id="md5-mismatch"),
    pytest.param(missing_key, ["no 'val_labels' array", "re-download it or regenerate it"], id="missing-key"),
    pytest.param(
        wrong_image_shape, ["train_images have shape (32, 27, 27)", "N×28×28", "--resolution"], id="wrong-image-shape"
    ),
    pytest.param(
        wrong_image_dtype, ["test_images have dtype float32", "store the images as uint8"], id="wrong-image-dtype"
    ),
    pytest.param(label_out_of_range, ["range over 0..2", "classes 0..1", "fix the labels"], id="label-out-of-range"),
    pytest.param(
        multi_label_not_binary,
        ["multi-label chestmnist must be 0 or 1", "found [0, 1, 2]", "fix the labels"],
        id="multi-label-not-0-1",
    ),
    pytest.param(labels_count_mismatch, ["32 images and 31 labels", "re-download"], id="labels-count-mismatch"),
    # config
    pytest.param(
        lambda e: e.train("--datasets", "bloood"),
        ["unknown dataset 'bloood'", "did you mean blood"],
        id="unknown-dataset",
    ),
    pytest.param(
        lambda e: e.train("--backbone", "resnet_9000"),
        ["unknown backbone 'resnet_9000'", "did you mean", "resnet200"],
        id="unknown-backbone",
    ),
    pytest.param(
        lambda e: e.train("--backbone", "test_convnext", "--set", "input.mode=native"),
        ["backbone test_convnext cannot take 28x28 inputs", "use input.mode pad or resize"],
        id="input-too-small-for-backbone",
    ),
    pytest.param(
        lambda e: e.train("--set", "train.lrr=1"),
        ["unknown key 'train.lrr'", "valid keys: batch_size"],
        id="unknown-config-key",
    ),
    pytest.param(
        lambda e: e.train("--config", str(yaml_file(e, "optim:\n  lrr: 0.1\n"))),
        ["unknown key 'optim.lrr'", "valid keys:", "head_lr"],
        id="unknown-key-in-yaml",
    ),
    pytest.param(
        lambda e: e.train("--set", "optim.weight_decay=lots"),
        ["optim.weight_decay must be a number", "'lots'"],
        id="bad-value-type",
    ),
    pytest.param(
        lambda e: e.train("--batch-size", "abc"), ["train.batch_size must be an integer", "'abc'"], id="bad-flag-type"
    ),
    pytest.param(lambda e: e.train("--lr", "-0.1"), ["optim.lr must be > 0", "-0.1"], id="negative-lr"),
    pytest.param(lambda e: e.train("--lr", "inf"), ["optim.lr must be a finite number", "inf"], id="infinite-lr"),
    pytest.param(lambda e: e.train("--batch-size", "0"), ["train.batch_size must be >= 1", "got 0"], id="batch-size-0"),
    pytest.param(
        lambda e: e.train("--resolution", "100"),
        ["data.resolution must be one of 28, 64, 128, 224", "got 100"],
        id="resolution-100",
    ),
    pytest.param(
        lambda e: e.train("--set", "input.mode=stretch"),
        ["input.mode must be one of pad, resize, native"],
        id="bad-choice",
    ),
    pytest.param(
        lambda e: e.train("--set", "name=../escape"),
        ["name must be letters, digits", "--output DIR"],
        id="run-name-with-path",
    ),
    pytest.param(
        lambda e: e.train("--config", str(yaml_file(e, "train: {epochs: 2\n"))),
        ["recipe.yaml is not valid YAML", "fix its syntax"],
        id="malformed-yaml",
    ),
    pytest.param(
        lambda e: e.train("--config", str(e.tmp / "nope.yaml")),
        ["nope.yaml not found", "--config"],
        id="config-file-missing",
    ),
    # run folder
    pytest.param(
        lambda e: (train_main, [a for a in e.train()[1] if a != "--overwrite"]),
        ["already has outputs", "--resume", "--overwrite", "--output DIR"],
        id="output-exists",
    ),
    pytest.param(
        resume_without_checkpoint,
        ["has no checkpoints/last.pt", "start it without --resume"],
        id="resume-without-checkpoint",
    ),
    pytest.param(
        lambda e: (train_main, ["--resume", str(e.tmp / "never_ran")]),
        ["never_ran: it has no config.yaml", "pass a run folder written by train.py"],
        id="resume-missing-folder",
    ),
    pytest.param(
        lambda e: (train_main, ["--resume", str(e.run), "--datasets", "pneumonia"]),
        ["data.datasets=['retinamnist', 'breastmnist'], not ['pneumoniamnist']", "start a new run with --output"],
        id="resume-other-datasets",
    ),
    pytest.param(
        lambda e: (train_main, ["--resume", str(e.run), "--backbone", "resnet18"]),
        ["model.backbone=test_resnet, not resnet18", "resume with the run's own config"],
        id="resume-other-backbone",
    ),
    pytest.param(
        resume_checkpoint_of_another_run,
        ["data.datasets=['pneumoniamnist'], not ['retinamnist', 'breastmnist']", "start a new run with --output"],
        id="resume-checkpoint-of-another-run",
    ),
    pytest.param(
        resume_from_a_copy_of_best,
        [
            "last.pt has no optimizers, weighting, step, rng state",
            "a copy of best.pt?",
            "restore the last.pt that train.py wrote",
        ],
        id="resume-from-a-copy-of-best",
    ),
    pytest.param(
        lambda e: (train_main, ["--resume", str(e.run), "--config", "configs/quickstart.yaml"]),
        ["--resume takes the run's own config.yaml", "drop --config"],
        id="resume-with-config",
    ),
    # files of another kind given as a checkpoint: one line, whatever torch.load makes of them
    pytest.param(
        lambda e: (evaluate_main, ["--checkpoint", str(e.bytes_file("notes.txt", b"hello\n")), "--device", "cpu"]),
        ["notes.txt is unreadable or truncated, or another kind of file", "use another checkpoint"],
        id="eval-text-file-as-checkpoint",
    ),
    pytest.param(
        lambda e: (evaluate_main, ["--checkpoint", str(e.bytes_file("empty.pt", b"")), "--device", "cpu"]),
        ["empty.pt is unreadable or truncated", "use another checkpoint"],
        id="eval-empty-file-as-checkpoint",
    ),
    pytest.param(
        lambda e: (evaluate_main, ["--checkpoint", str(e.bytes_file("m.json", b'{"a": 1}')), "--device", "cpu"]),
        ["m.json is not plain tensor data", "use a checkpoint written by mmpt"],
        id="eval-json-file-as-checkpoint",
    ),
    pytest.param(
        lambda e: (evaluate_main, ["--checkpoint", str(RunDir(e.run).checkpoints), "--device", "cpu"]),
        ["checkpoints is a folder", "checkpoints/best.pt"],
        id="eval-folder-as-checkpoint",
    ),
    pytest.param(
        lambda e: e.train("--init-from", str(e.bytes_file("notes.txt", b"hello\n"))),
        ["notes.txt is unreadable or truncated, or another kind of file"],
        id="init-from-a-text-file",
    ),
    # outputs onto a file
    pytest.param(
        lambda e: (evaluate_main, ["export", str(e.run), "--output", str(e.file()), "--overwrite"]),
        ["--output", "a_file is a file, not a folder", "--output DIR"],
        id="export-onto-a-file",
    ),
    pytest.param(
        lambda e: (evaluate_main, ["export", str(e.run), "--output", str(e.file() / "export")]),
        ["which is a file", "--output DIR"],
        id="export-inside-a-file",
    ),
    pytest.param(
        lambda e: (bench_main, ["compare", "--workdir", str(e.file()), "--max-images", "20", "--resamples", "2"]),
        ["--workdir", "a_file is a file, not a folder", "--workdir DIR"],
        id="bench-compare-workdir-a-file",
    ),
    # YAML that would drop a value, and numbers of hundreds of digits
    pytest.param(
        lambda e: e.train("--config", str(yaml_file(e, "train:\n  epochs: 1\nmodel: {}\ntrain:\n  epochs: 2\n"))),
        ["'train' is given twice (lines 1 and 4)", "keep only the last", "give it once"],
        id="yaml-section-twice",
    ),
    pytest.param(
        lambda e: e.train("--set", "optim.lr=" + "1" * 400),
        ["optim.lr must be a finite number within float32 range", "(400 characters)"],
        id="float-of-400-digits",
    ),
    pytest.param(
        lambda e: e.train("--epochs", "9" * 5000),
        ["train.epochs must be an integer within", "(5,002 characters)"],
        id="integer-of-5000-digits",
    ),
    # evaluate.py
    pytest.param(
        eval_garbage_checkpoint,
        ["best.pt is not plain tensor data", "refused", "use a checkpoint written by mmpt"],
        id="eval-garbage-checkpoint",
    ),
    pytest.param(
        eval_truncated_checkpoint,
        ["best.pt is unreadable or truncated", "use another checkpoint"],
        id="eval-truncated-checkpoint",
    ),
    pytest.param(
        eval_not_an_mmpt_checkpoint,
        ["other.pt is not an mmpt checkpoint", "pass a checkpoint written by mmpt"],
        id="eval-not-an-mmpt-checkpoint",
    ),
    pytest.param(
        lambda e: (evaluate_main, ["--checkpoint", str(e.tmp / "nope.pt"), "--output", str(e.run / "eval")]),
        ["nope.pt not found", "pass a run folder with checkpoints/ or a .pt file"],
        id="eval-checkpoint-missing",
    ),
    pytest.param(
        lambda e: (evaluate_main, [str(e.run), "--datasets", "pneumonia", "--device", "cpu"]),
        ["has no head for pneumoniamnist", "choose among retina, breast"],
        id="eval-dataset-not-in-checkpoint",
    ),
    pytest.param(
        lambda e: (evaluate_main, [str(e.run), "--datasets", "foo", "--device", "cpu"]),
        ["unknown dataset 'foo'"],
        id="eval-unknown-dataset",
    ),
    pytest.param(
        lambda e: (evaluate_main, [str(e.run), "--split", "train"]),
        ["--split: invalid choice: 'train'", "--help"],
        id="eval-bad-split",
    ),
]


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("case, words", CASES)
def test_bad_input_prints_one_line_exits_2_and_keeps_the_run_folder(case, words, env, capsys):
    main, argv = case(env)
    before = folder_snapshot(env.run)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    line = one_error_line(err)
    for word in words:
        assert word in line, f"{word!r} missing from: {line}"
    assert folder_snapshot(env.run) == before, "the run folder's earlier outputs changed"
    assert not (env.tmp / "never_ran").exists()  # a refused --resume creates no folder


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(missing_data_file, id="missing-data-file"),
        pytest.param(lambda e: e.train("--set", "train.lrr=1"), id="unknown-config-key"),
        pytest.param(
            lambda e: (evaluate_main, [str(e.run), "--datasets", "pneumonia", "--device", "cpu"]),
            id="eval-dataset-not-in-checkpoint",
        ),
    ],
)
def test_debug_raises_the_error_with_its_traceback(case, env):
    main, argv = case(env)
    before = folder_snapshot(env.run)
    with pytest.raises(MmptError):
        main([*argv, "--debug"])
    assert folder_snapshot(env.run) == before


@pytest.mark.slow
def test_train_script_exits_2_with_one_line_and_debug_shows_the_traceback():
    script = Path(__file__).resolve().parents[1] / "train.py"
    plain = subprocess.run([sys.executable, str(script), "--datasets", "foo"], capture_output=True, text=True)
    assert plain.returncode == 2
    assert "unknown dataset 'foo'" in one_error_line(plain.stderr)
    debug = subprocess.run(
        [sys.executable, str(script), "--datasets", "foo", "--debug"], capture_output=True, text=True
    )
    assert debug.returncode != 2
    assert "Traceback (most recent call last)" in debug.stderr and "MmptError: invalid config" in debug.stderr


# ---------------------------------------------------------------- a NaN or infinite loss

# the loss is read from the device once per logging interval (and before a checkpoint): the message names
# the dataset and the interval of steps, which were not saved
NAN_MESSAGE = re.compile(
    r"loss of (breastmnist|retinamnist)(, \w+)* became NaN or infinite between steps (\d+) and (\d+)"
)


def test_nan_loss_on_resume_stops_naming_dataset_and_step_and_keeps_the_last_good_checkpoint(env, capsys):
    # an absurd learning rate blows the weights up after one update, so the next loss is not finite
    resumed_at = ckpt.load(RunDir(env.run).last)[ckpt.PROGRESS]["step"]
    before = folder_snapshot(env.run)
    capsys.readouterr()
    code = train_main(["--resume", str(env.run), "--epochs", "3", "--lr", "1e38"])
    err = capsys.readouterr().err
    assert code == 2, err
    line = one_error_line(err)
    match = NAN_MESSAGE.search(line)
    assert match, line
    assert int(match.group(3)) == resumed_at + 1
    assert f"last good checkpoint is {RunDir(env.run).last}" in line and "lower optim.lr" in line
    after = folder_snapshot(env.run)
    # the resume's config (new lr and epochs) replaces config.yaml, whose earlier text is kept beside it;
    # a TensorBoard file is added; every other earlier output stays as it was
    kept = f"config.before-resume-at-step{resumed_at}.yaml"
    assert after[kept][0] == before["config.yaml"][0]
    assert {k: v for k, v in after.items() if k in before and k != "config.yaml"} == {
        k: v for k, v in before.items() if k != "config.yaml"
    }
    assert all(k.startswith("tb/") for k in set(after) - set(before) - {kept}), set(after) - set(before)
    assert ckpt.load(RunDir(env.run).last)[ckpt.PROGRESS]["step"] == resumed_at


def test_nan_loss_keeps_the_checkpoint_of_the_last_finite_step(env, capsys):
    out = env.tmp / "fresh"
    code = train_main(
        [
            "--data-root",
            str(env.root),
            "--output",
            str(out),
            *TINY_RUN,
            "--datasets",
            "breast,retina",
            "--lr",
            "1e30",
            "--set",
            "checkpoint.every_steps=1",
        ]
    )
    match = NAN_MESSAGE.search(one_error_line(capsys.readouterr().err))
    assert code == 2 and match
    # with a checkpoint every step, the loss is checked every step: the interval is one step
    failed_step = int(match.group(4))
    assert int(match.group(3)) == failed_step
    last = ckpt.load(RunDir(out).last)
    assert last[ckpt.PROGRESS]["step"] == failed_step - 1
    assert not Results(out).metrics.exists()


# ---------------------------------------------------------------- a refused resume leaves the run resumable


def test_a_refused_resume_leaves_the_run_resumable(env, capsys):
    before = folder_snapshot(env.run)
    assert train_main(["--resume", str(env.run), "--set", "optim.per_head=false"]) == 2
    assert "optim.per_head" in one_error_line(capsys.readouterr().err)
    assert folder_snapshot(env.run) == before
    assert train_main(["--resume", str(env.run), "--epochs", "2"]) == 0
    assert ckpt.load(RunDir(env.run).last)[ckpt.PROGRESS]["epoch"] == 2


def test_resume_on_changed_data_goes_on_with_allow_changed(env, capsys):
    root = env.tmp / "moved_data"
    shutil.copytree(env.root, root, ignore=shutil.ignore_patterns(".mmpt-cache"))
    os.utime(root / "breastmnist.npz", ns=(1_000_000_000, 1_000_000_000))
    assert (
        train_main(
            ["--resume", str(env.run), "--data-root", str(root), "--epochs", "2", "--set", "data.allow_changed=true"]
        )
        == 0
    )
    # the new checkpoint records the data it now trains on
    assert ckpt.load(RunDir(env.run).last)[ckpt.DATA]["breastmnist"]["mtime_ns"] == 1_000_000_000


def test_a_copy_of_the_data_with_its_times_kept_resumes(env):
    root = env.tmp / "copied_data"
    shutil.copytree(env.root, root, ignore=shutil.ignore_patterns(".mmpt-cache"))  # copy2 keeps size and mtime
    assert train_main(["--resume", str(env.run), "--data-root", str(root), "--epochs", "2"]) == 0


@pytest.mark.parametrize("command", ["evaluate", "probe"])
def test_missing_data_for_evaluate_or_probe_offers_only_what_they_have(env, capsys, command):
    """evaluate and probe never download or generate data: their message names --data-root, not --download or
    data.synthetic (which they do not have); training's message still offers both."""
    (env.tmp / "empty").mkdir()
    argv = {
        "evaluate": [str(env.run), "--data-root", str(env.tmp / "empty"), "--device", "cpu"],
        "probe": ["probe", str(env.run), "--method", "knn", "--data-root", str(env.tmp / "empty")],
    }[command]
    assert evaluate_main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not found" in line and "--data-root DIR" in line and "never downloads or generates" in line
    assert "--download" not in line and "synthetic" not in line
    assert train_main(env.train("--data-root", str(env.tmp / "empty"))[1]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--download" in line and "data.synthetic" in line


def test_a_new_evaluation_replaces_the_earlier_ones_files_in_its_folder(env):
    """Evaluating again (other datasets, another checkpoint) into the same eval folder leaves no earlier file beside
    the new ones: compare would read them as this evaluation's. Files mmpt did not write stay."""
    eval_test = RunDir(env.run).eval("test").path
    assert evaluate_main([str(env.run), "--device", "cpu"]) == 0
    assert len(list(Results(eval_test).predictions.glob("*_test_*.csv"))) == 2
    (eval_test / "notes.txt").write_text("mine")
    assert evaluate_main([str(env.run), "--device", "cpu", "--datasets", "retina"]) == 0
    assert [p.name.split("_")[0] for p in Results(eval_test).predictions.glob("*.csv")] == ["retinamnist"]
    assert set(json.loads(Results(eval_test).metrics.read_text())) == {"retinamnist", "mean"}
    assert set(json.loads((Results(eval_test).predictions / "data.json").read_text())["datasets"]) == {"retinamnist"}
    assert not (eval_test / "confusion_breastmnist.png").exists() and (eval_test / "confusion_retinamnist.png").exists()
    assert (eval_test / "notes.txt").read_text() == "mine"
    # a probe's folder likewise
    probe = env.tmp / "probe"
    assert evaluate_main(["probe", str(env.run), "--method", "knn", "--k", "3", "--output", str(probe)]) == 0
    assert (
        evaluate_main(["probe", str(env.run), "--method", "knn", "--output", str(probe), "--datasets", "breast"]) == 0
    )
    assert [p.name.split("_")[0] for p in Results(probe).predictions.glob("*.csv")] == ["breastmnist"]


# ---------------------------------------------------------------- one run folder, one writer


def test_a_second_process_into_a_locked_run_folder_is_refused_and_kill_9_leaves_no_stale_lock(env, capsys):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from mmpt.runs.rundir import lock_run_dir; "
            "lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)",
            str(env.run),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = folder_snapshot(env.run)
        assert train_main(["--resume", str(env.run), "--epochs", "2"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "is in use by another mmpt process" in line and "--output DIR" in line
        assert train_main([*env.train()[1]]) == 2  # --overwrite is refused too, before it removes anything
        assert "is in use by another mmpt process" in one_error_line(capsys.readouterr().err)
        assert folder_snapshot(env.run) == before
    finally:
        holder.kill()
        holder.wait()
    assert train_main(["--resume", str(env.run), "--epochs", "2"]) == 0


@pytest.mark.slow
def test_train_script_into_a_folder_this_process_holds_is_refused(env):
    from mmpt.runs.rundir import lock_run_dir

    lock_run_dir(env.run)  # held by the test process until it ends
    before = folder_snapshot(env.run)
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve().parents[1] / "train.py"),
            "--resume",
            str(env.run),
            "--epochs",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "is in use by another mmpt process" in one_error_line(proc.stderr)
    assert folder_snapshot(env.run) == before


# ---------------------------------------------------------------- evaluate.py stops cleanly on a signal


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_evaluate_stopped_by_a_signal_prints_one_line_and_exits_130(env, capsys, monkeypatch, sig):
    import mmpt.evaluation.evaluate

    real = mmpt.evaluation.evaluate.evaluate_all

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), sig)  # arrives in the middle of evaluation
        return real(*args, **kwargs)

    monkeypatch.setattr(mmpt.evaluation.evaluate, "evaluate_all", signalled)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = env.tmp / "eval"
    assert evaluate_main([str(env.run), "--device", "cpu", "--output", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == [f"{sig.name} received: evaluation stopped; run the same command again to evaluate"]
    assert not Results(out).metrics.exists()
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the handlers are restored
