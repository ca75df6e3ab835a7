"""Security: a checkpoint is data, never code; no path in a config or checkpoint sends writes out of the run folder."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mmpt.cli import evaluate_main, train_main
from mmpt.config import load_config
from mmpt.data.synthetic import write_synthetic
from mmpt.errors import MmptError
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.rundir import Results, RunDir
from mmpt.tasks import resolve_tasks
from tests.helpers import TINY_RUN

TINY = [*TINY_RUN, "--datasets", "breast"]


class CreatesFile:
    """Unpickling this calls exec(), which creates `marker`: the shape of a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def crafted_checkpoint(path: Path, marker: Path, writer: str = "torch") -> Path:
    """A .pt file shaped like an mmpt checkpoint whose unpickling would create `marker`."""
    state = {ckpt.FORMAT: ckpt.FORMAT_VERSION, ckpt.MODEL: {"w": torch.zeros(2)}, ckpt.CONFIG: CreatesFile(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if writer == "torch":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, a finished 1-epoch run on synthetic breast), trained once for the module."""
    base = tmp_path_factory.mktemp("security")
    root, run = base / "data", base / "run"
    write_synthetic(root, 28, resolve_tasks("breast"), train_samples=32)
    assert train_main(["--data-root", str(root), "--output", str(run), *TINY]) == 0
    return root, run


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run[1], copy)
    return copy


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- a checkpoint is data, never code


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_crafted_checkpoint_really_runs_code_when_unpickled_unsafely(tmp_path, writer):
    # the control: the payload the tests below refuse does run under a plain unpickler
    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path / "evil.pt", marker, writer)
    pickle.loads(path.read_bytes()) if writer == "pickle" else torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_crafted_checkpoint_is_refused_by_load_without_running_code(tmp_path, writer):
    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path / "evil.pt", marker, writer)
    with pytest.raises(MmptError, match="refused and nothing in it was run") as info:
        ckpt.load(path)
    assert "use a checkpoint written by mmpt" in str(info.value)
    # torch's own message suggests weights_only=False or an allowlist; mmpt must never pass that advice on
    assert "weights_only" not in str(info.value) and "safe_globals" not in str(info.value)
    assert not marker.exists()


def test_evaluate_refuses_a_crafted_checkpoint_without_running_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path / "evil.pt", marker)
    code = evaluate_main(["--checkpoint", str(path), "--output", str(tmp_path / "eval"), "--device", "cpu"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    # the reason names the refused callable, and never passes on torch's advice to allowlist it or drop weights_only
    assert "evil.pt is not plain tensor data" in line and "GLOBAL" in line and "exec" in line
    assert "weights_only" not in line and "safe_globals" not in line
    assert not marker.exists()
    assert not (tmp_path / "eval").exists()


def test_evaluate_of_a_run_refuses_a_crafted_best_checkpoint(run_copy, tmp_path, capsys):
    marker = tmp_path / "ran"
    crafted_checkpoint(RunDir(run_copy).best, marker)
    code = evaluate_main([str(run_copy), "--device", "cpu"])
    assert code == 2
    assert "best.pt is not plain tensor data" in one_error_line(capsys.readouterr().err)
    assert not marker.exists()
    assert not (run_copy / "eval").exists()


def test_resume_refuses_a_crafted_last_checkpoint_and_keeps_the_run_folder(run_copy, tmp_path, capsys):
    marker = tmp_path / "ran"
    crafted_checkpoint(RunDir(run_copy).last, marker)
    before = sorted((p.relative_to(run_copy), p.read_bytes()) for p in run_copy.rglob("*") if p.is_file())
    code = train_main(["--resume", str(run_copy), "--epochs", "2"])
    assert code == 2
    assert "last.pt is not plain tensor data" in one_error_line(capsys.readouterr().err)
    assert not marker.exists()
    assert sorted((p.relative_to(run_copy), p.read_bytes()) for p in run_copy.rglob("*") if p.is_file()) == before


def test_checkpoint_load_uses_weights_only(monkeypatch, run_copy):
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    ckpt.load(RunDir(run_copy).best)
    assert calls == [True]


# ---------------------------------------------------------------- paths from a config or a checkpoint


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".", "/tmp/abs", "run@x"])
def test_run_name_that_is_not_one_plain_folder_name_is_rejected(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = train_main(["--data-root", str(tmp_path / "data"), "--set", f"name={name}", *TINY])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert "name must be letters, digits, '.', '_' or '-'" in line and repr(name) in line
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere, runs/ included


def test_plain_run_name_is_a_folder_under_runs():
    assert load_config(overrides=[{"name": "mmpt_vit-b16.v2"}]).run_dir == Path("runs") / "mmpt_vit-b16.v2"


def rewrite_checkpoint_config(path: Path, **values) -> None:
    state = ckpt.load(path)
    state[ckpt.CONFIG].update(values)
    ckpt.save(path, state)


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def test_evaluate_writes_only_to_its_output_whatever_output_the_checkpoint_names(run_copy, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    best = RunDir(run_copy).best
    rewrite_checkpoint_config(best, output=str(elsewhere), name="renamed")
    before = files_under(tmp_path)
    out = tmp_path / "chosen"
    assert evaluate_main(["--checkpoint", str(best), "--output", str(out), "--device", "cpu"]) == 0
    assert not elsewhere.exists()
    new = files_under(tmp_path) - before
    assert new and all(out in p.parents for p in new), new
    # without --output, the results go beside the checkpoint's own run folder
    assert evaluate_main([str(run_copy), "--device", "cpu"]) == 0
    assert not elsewhere.exists()
    assert all(out in p.parents or run_copy / "eval" in p.parents for p in files_under(tmp_path) - before)
    assert list(RunDir(run_copy).eval("test").predictions.glob("breastmnist_test_*@renamed.csv"))


def test_evaluate_never_writes_data_where_a_foreign_checkpoint_says(finished_run, run_copy, tmp_path):
    # a checkpoint from elsewhere asks for synthetic data, downloads and a cache in folders of its choosing
    root = finished_run[0]
    planted_root, planted_cache = tmp_path / "planted_root", tmp_path / "planted_cache"
    best = RunDir(run_copy).best
    state = ckpt.load(best)
    state[ckpt.CONFIG]["data"].update(
        root=str(planted_root), cache_dir=str(planted_cache), synthetic=True, download=True
    )
    ckpt.save(best, state)
    out, cache = tmp_path / "out", tmp_path / "my_cache"
    argv = ["--checkpoint", str(best), "--output", str(out), "--device", "cpu"]
    # without --data-root it reads the planted root, which has no files: an error, and nothing generated
    assert evaluate_main(argv) == 2
    assert not planted_root.exists() and not planted_cache.exists()
    # with --data-root (and --cache-dir) the checkpoint's data paths play no part
    assert evaluate_main([*argv, "--data-root", str(root), "--cache-dir", str(cache)]) == 0
    assert not planted_root.exists() and not planted_cache.exists()
    assert Results(out).metrics.is_file() and any(cache.iterdir())


def test_evaluate_refuses_a_checkpoint_whose_run_name_is_a_path(run_copy, tmp_path, capsys):
    best = RunDir(run_copy).best
    rewrite_checkpoint_config(best, name="../../escape")
    before = files_under(tmp_path)
    code = evaluate_main(["--checkpoint", str(best), "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2
    assert "name must be letters, digits" in one_error_line(capsys.readouterr().err)
    assert files_under(tmp_path) == before


def test_resume_writes_into_the_folder_given_not_the_output_stored_in_the_run(run_copy, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    config_path = RunDir(run_copy).config
    config_path.write_text(yaml.safe_dump({**yaml.safe_load(config_path.read_text()), "output": str(elsewhere)}))
    rewrite_checkpoint_config(RunDir(run_copy).last, output=str(elsewhere))
    before = files_under(tmp_path)
    assert train_main(["--resume", str(run_copy), "--epochs", "2"]) == 0
    assert not elsewhere.exists()
    assert all(run_copy in p.parents for p in files_under(tmp_path) - before)
    assert ckpt.load(RunDir(run_copy).last)[ckpt.PROGRESS]["epoch"] == 2
    # the resumed run records the folder it really wrote to
    assert yaml.safe_load(config_path.read_text())["output"] == str(run_copy)
