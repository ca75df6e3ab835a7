"""A study's results always match the study asked for.

Refused input: one `error:` line, exit code 2, and the series or run folder byte-for-byte as it was.
Silent cases: a partial series gives statistics over its finished members only, the same in summarize,
compare and probe; a run of another recipe never enters a summary.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

from mmpt.cli import evaluate_main, train_main
from mmpt.data.synthetic import write_synthetic
from mmpt.io import write_text
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.rundir import Results, RunDir
from mmpt.runtime.distributed import resume_command
from mmpt.tasks import resolve_tasks
from tests.helpers import folder_snapshot, quiet

SEEDS = (0, 1, 2)
DATASETS = "breast,pneumonia"


@pytest.fixture(scope="module")
def finished_series(tmp_path_factory):
    """A finished series of three 1-epoch seeds (test_resnet, 32 synthetic images per dataset), and its recipe."""
    base = tmp_path_factory.mktemp("guard")
    data = base / "data"
    write_synthetic(data, 28, resolve_tasks(DATASETS), train_samples=32, seed=0)
    write_synthetic(data, 64, resolve_tasks("breast"), train_samples=32, seed=0)
    recipe = base / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "guard",
                "data": {"root": str(data), "datasets": DATASETS.split(","), "num_workers": 0, "eval_batch_size": 128},
                "model": {"backbone": "test_resnet"},
                "input": {"mode": "native"},
                "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "progress": False},
            }
        )
    )
    series = base / "series"
    code, _, err = quiet(train_main, ["--config", str(recipe), "--output", str(series), "--seeds", "0,1,2"])
    assert code == 0, err
    return base, recipe, series


@pytest.fixture
def copy(finished_series, tmp_path) -> Path:
    """A copy of the finished series to refuse commands on."""
    shutil.copytree(finished_series[2], tmp_path / "series")
    return tmp_path / "series"


def series_cmd(finished_series, folder: Path, *extra: str) -> list[str]:
    return ["--config", str(finished_series[1]), "--output", str(folder), "--seeds", "0,1,2", *extra]


def make_unfinished(folder: Path) -> None:
    """A run stopped after writing its predictions but before summary.json (as a kill at that moment leaves it)."""
    RunDir(folder).summary.unlink()


# ---------------------------------------------------------------- refused: one line, exit 2, folder untouched


def changed_recipe(finished_series, s):  # a finished member trained with another weight decay
    return (
        train_main,
        series_cmd(finished_series, s, "--set", "optim.weight_decay=0.5"),
        ["optim.weight_decay", "0.5", "--overwrite", "--output"],
    )


def changed_lr(finished_series, s):  # a key a resume may change still changes a finished run's result
    return train_main, series_cmd(finished_series, s, "--lr", "0.5"), ["optim.lr", "0.5", "--overwrite"]


def changed_member_without_record(finished_series, s):  # series.json lost: each finished member still checks its recipe
    (s / "series.json").unlink()
    return (
        train_main,
        series_cmd(finished_series, s, "--set", "optim.weight_decay=0.3"),
        ["finished run", "seed0", "optim.weight_decay", "0.3"],
    )


def unfinished_member_changed(finished_series, s):  # an unfinished member follows --resume's rule
    (s / "series.json").unlink()
    make_unfinished(s / "seed0")
    return (
        train_main,
        series_cmd(finished_series, s, "--set", "optim.weight_decay=0.5"),
        ["interrupted run", "seed0", "optim.weight_decay", "cannot change mid-run"],
    )


def single_run_in_series(finished_series, s):
    return (
        train_main,
        ["--config", str(finished_series[1]), "--output", str(s), "--overwrite"],
        ["series folder", "--output"],
    )


def single_run_over_member(finished_series, s):
    return (
        train_main,
        ["--config", str(finished_series[1]), "--output", str(s / "seed1"), "--overwrite"],
        ["run seed1 of the series", "--output"],
    )


def series_in_run_folder(finished_series, s):
    return (
        train_main,
        ["--config", str(finished_series[1]), "--output", str(s / "seed1"), "--seeds", "5"],
        ["single run's folder", "--output"],
    )


def series_missing_data(finished_series, s):  # refused by the first run's checks: no series folder is left behind
    (s.parent / "empty").mkdir()
    return (
        train_main,
        [
            "--config",
            str(finished_series[1]),
            "--output",
            str(s.parent / "new"),
            "--seeds",
            "0",
            "--data-root",
            str(s.parent / "empty"),
        ],
        ["not found"],
    )


def rerun_missing_data(finished_series, s):  # a new member refused by its checks: series.json is as it was
    return (
        train_main,
        series_cmd(finished_series, s, "--seeds", "0,1,2,3", "--data-root", str(s.parent / "nowhere")),
        ["not found"],
    )


def sweep_seed_with_seeds(finished_series, s):
    return train_main, series_cmd(finished_series, s, "--sweep", "train.seed=3,4"), ["train.seed", "--seeds"]


def seed_with_seeds(finished_series, s):
    return train_main, series_cmd(finished_series, s, "--seed", "3"), ["--seed", "--seeds"]


def sweep_output(finished_series, s):
    return train_main, series_cmd(finished_series, s, "--sweep", "output=a,b"), ["output", "does not change"]


def sweep_name(finished_series, s):
    return train_main, series_cmd(finished_series, s, "--sweep", "name=a,b"), ["name", "does not change"]


def sweep_neutral_key(finished_series, s):
    return (
        train_main,
        series_cmd(finished_series, s, "--sweep", "data.num_workers=0,1"),
        ["data.num_workers", "does not change"],
    )


def sweep_empty_item(finished_series, s):
    return train_main, series_cmd(finished_series, s, "--sweep", "loss.weighting=none,,size"), ["empty value"]


def sweep_value_twice(finished_series, s):
    return train_main, series_cmd(finished_series, s, "--sweep", "loss.weighting=none,none"), ["twice"]


def seeds_empty(finished_series, s):
    return train_main, ["--config", str(finished_series[1]), "--output", str(s), "--seeds", ""], ["--seeds expects"]


def seeds_empty_item(finished_series, s):
    return train_main, ["--config", str(finished_series[1]), "--output", str(s), "--seeds", "0,,1"], ["--seeds expects"]


def sweep_datasets_individual(finished_series, s):
    return (
        train_main,
        [
            "--config",
            str(finished_series[1]),
            "--output",
            str(s),
            "--individual",
            "--sweep",
            "data.datasets=breast,pneumonia",
        ],
        ["--individual", "--datasets"],
    )


def init_from_other_size(finished_series, s):
    out = s.parent / "fine"
    return (
        train_main,
        [
            "--config",
            str(finished_series[1]),
            "--output",
            str(out),
            "--datasets",
            "breast",
            "--resolution",
            "64",
            "--init-from",
            str(s / "seed0"),
        ],
        ["28 px", "64 px", "same backbone, resolution"],
    )


def fine_tune(finished_series, s, seeds: str, *extra: str) -> list[str]:
    """An individual series fine-tuned from the seeds of the finished series `s`, into a new folder beside it."""
    return [
        *["--config", str(finished_series[1]), "--output", str(s.parent / "fine"), "--individual", "--seeds", seeds],
        *["--init-from", str(s), *extra],
    ]


def init_from_series_without_the_seed(finished_series, s):  # refused before seed 0's members train, not after
    return train_main, fine_tune(finished_series, s, "0,5"), ["seed0, seed1, seed2", "without seed5/", "--seeds"]


def init_from_a_seed_without_best(finished_series, s):  # seed 1's source lost its best.pt: refused before seed 0 trains
    RunDir(s / "seed1").best.unlink()
    return train_main, fine_tune(finished_series, s, "0,1"), ["seed1/checkpoints/best.pt not found"]


def individual_norm_sweep(finished_series, s):  # one dataset per run: every model.norm trains the same model
    return (
        train_main,
        fine_tune(finished_series, s, "0", "--sweep", "model.norm=shared,per_dataset_stats"),
        ["--sweep model.norm with --individual", "nothing to keep apart"],
    )


def summarize_a_single_run(finished_series, s):  # it is no series: no sweep.* files in the run folder
    return evaluate_main, ["summarize", str(s / "seed0")], ["seed0 is a single run, not a series", "compare"]


def compare_a_run_with_itself(finished_series, s):  # the same run under two spellings of its path
    return (*compare(s / "seed0", Path(f"{s}/./seed0/")), ["are the same run", "pass each run once"])


def compare(s, *extra):
    """`compare SERIES SERIES/seed0 EXTRA`, or `compare A B` when EXTRA starts with a folder."""
    if extra and isinstance(extra[0], Path):
        return evaluate_main, ["compare", str(s), *map(str, extra)]
    return evaluate_main, ["compare", str(s), str(s / "seed0"), *extra]


def compare_jobs_zero(finished_series, s):
    return (*compare(s, "--jobs", "0"), ["--jobs", "-1"])


def compare_negative_seed(finished_series, s):
    return (*compare(s, "--seed", "-1"), ["--seed must be >= 0, got -1"])


def compare_huge_bootstrap(finished_series, s):
    return (*compare(s, "--bootstrap", "10000000"), ["--bootstrap", "100,000"])


def compare_zero_bootstrap(finished_series, s):
    return (*compare(s, "--bootstrap", "0"), ["--bootstrap", "1..100,000"])


def compare_empty_metric(finished_series, s):
    return (*compare(s, "--metrics", "auc,,acc"), ["--metrics", "empty item"])


def compare_output_is_file(finished_series, s):
    (s.parent / "a_file").write_text("x")
    return (*compare(s, "--output", str(s.parent / "a_file")), ["is a file, not a folder"])


def _edit_scores(s: Path, value: str) -> Path:
    path = next(Results(s / "seed1").predictions.glob("breastmnist_test_*.csv"))
    lines = path.read_text().splitlines()
    index, *cells = lines[3].split(",")
    lines[3] = ",".join([index, value, *cells[1:]])
    path.write_text("\n".join(lines) + "\n")
    return path


def nonfinite_score(finished_series, s):
    path = _edit_scores(s, "nan")
    return (*compare(s / "seed0", s / "seed1"), [path.name, "line 4", "nan", "[0, 1]"])


def out_of_range_score(finished_series, s):
    path = _edit_scores(s, "1.5")
    return (*compare(s / "seed0", s / "seed1"), [path.name, "line 4", "1.5"])


def summarize_require_complete(finished_series, s):
    make_unfinished(s / "seed2")
    return evaluate_main, ["summarize", str(s), "--require-complete"], ["seed2", "unfinished", "--require-complete"]


def compare_require_complete(finished_series, s):
    make_unfinished(s / "seed2")
    return (*compare(s, "--require-complete"), ["seed2", "unfinished"])


def probe_require_complete(finished_series, s):
    make_unfinished(s / "seed2")
    return evaluate_main, ["probe", str(s), "--method", "knn", "--require-complete"], ["seed2", "unfinished"]


def probe_k_zero(finished_series, s):
    return evaluate_main, ["probe", str(s / "seed0"), "--method", "knn", "--k", "0"], ["--k", ">= 1", "got 0"]


def probe_batch_zero(finished_series, s):
    return evaluate_main, ["probe", str(s / "seed0"), "--method", "knn", "--batch-size", "0"], ["--batch-size"]


def probe_unknown_backbone(finished_series, s):
    return (
        evaluate_main,
        ["probe", "--backbone", "zzqqxx", "--method", "knn", "--output", str(s / "p")],
        ["unknown backbone", "timm.list_models"],
    )


CASES = [
    changed_recipe,
    changed_lr,
    changed_member_without_record,
    unfinished_member_changed,
    single_run_in_series,
    single_run_over_member,
    series_in_run_folder,
    series_missing_data,
    rerun_missing_data,
    sweep_seed_with_seeds,
    seed_with_seeds,
    sweep_output,
    sweep_name,
    sweep_neutral_key,
    sweep_empty_item,
    sweep_value_twice,
    seeds_empty,
    seeds_empty_item,
    sweep_datasets_individual,
    init_from_other_size,
    compare_jobs_zero,
    compare_negative_seed,
    compare_huge_bootstrap,
    compare_zero_bootstrap,
    compare_empty_metric,
    compare_output_is_file,
    nonfinite_score,
    out_of_range_score,
    summarize_require_complete,
    compare_require_complete,
    probe_require_complete,
    probe_k_zero,
    probe_batch_zero,
    probe_unknown_backbone,
    init_from_series_without_the_seed,
    init_from_a_seed_without_best,
    individual_norm_sweep,
    summarize_a_single_run,
    compare_a_run_with_itself,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_refused_in_one_line_with_the_folder_untouched(finished_series, copy, case):
    main, argv, words = case(finished_series, copy)
    before = folder_snapshot(copy.parent)
    code, _, err = quiet(main, argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(w in lines[0] for w in words), (words, lines[0])
    assert len(lines[0]) < 600, lines[0]  # a line to read, not a registry dump
    assert folder_snapshot(copy.parent) == before


@pytest.mark.parametrize("norm, said", [("per_dataset_stats", True), ("per_dataset", True), ("auto", False)])
def test_individual_with_a_per_dataset_norm_says_one_dataset_has_nothing_to_keep_apart(
    finished_series, tmp_path, norm, said
):
    (tmp_path / "empty").mkdir()  # the series stops at its first run's data check, after its start lines
    argv = ["--config", str(finished_series[1]), "--output", str(tmp_path / "ind"), "--individual", "--seeds", "0"]
    code, out, _ = quiet(train_main, [*argv, "--set", f"model.norm={norm}", "--data-root", str(tmp_path / "empty")])
    assert code == 2
    note = f"note: model.norm {norm} keeps BatchNorm statistics apart per dataset, but each run of --individual"
    assert (note in out) == said and ("nothing to keep apart" in out) == said


# ---------------------------------------------------------------- the silent cases: the result itself


def _test_auc(run: Path) -> dict[str, float]:
    table = json.loads(Results(run).metrics.read_text())
    return {f: table[f]["auc"] for f in table if f != "mean"}


def test_partial_series_counts_finished_members_only_in_summarize_compare_and_probe(copy, tmp_path):
    make_unfinished(copy / "seed2")
    finished = [_test_auc(copy / f"seed{k}") for k in (0, 1)]
    every = [*finished, _test_auc(copy / "seed2")]
    expected = {f: np.mean([t[f] for t in finished]) for f in finished[0]}
    assert any(abs(np.mean([t[f] for t in every]) - expected[f]) > 1e-6 for f in expected)  # seed2 would show

    code, out, err = quiet(evaluate_main, ["summarize", str(copy)])
    assert code == 0, err
    sweep = json.loads((copy / "sweep.json").read_text())
    (entry,) = sweep["variants"].values()
    assert entry["seeds"] == [0, 1] and sweep["left_out"] == {"seed2": "unfinished"}
    for flag, value in expected.items():
        assert entry["datasets"][flag]["auc"]["mean"] == pytest.approx(value, abs=1e-9)
    assert "seed2 (unfinished)" in out and "seed2 (unfinished)" in (copy / "sweep.md").read_text()

    code, out, err = quiet(
        evaluate_main,
        ["compare", str(copy), str(copy / "seed0"), "--bootstrap", "20", "--output", str(tmp_path / "cmp")],
    )
    assert code == 0, err
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    series = result["runs"][0]
    assert series["seeds"] == 2 and list(result["left_out_runs"].values()) == ["unfinished"]
    for flag, value in expected.items():
        assert series["datasets"][flag]["auc"]["value"] == pytest.approx(value, abs=1e-6)
    assert "seed2" in out

    code, out, err = quiet(
        evaluate_main, ["probe", str(copy), "--method", "knn", "--k", "3", "--output", str(tmp_path / "knn")]
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "knn").iterdir()) == ["seed0", "seed1"]
    assert "seed2 (unfinished)" in out


def test_member_of_another_recipe_never_enters_the_summary(copy):
    # a run of another recipe in a member's folder (copied there, or trained by an older mmpt)
    config = RunDir(copy / "seed1").config
    raw = yaml.safe_load(config.read_text())
    raw["optim"]["weight_decay"] = 0.5
    config.write_text(yaml.safe_dump(raw))
    code, _out, err = quiet(evaluate_main, ["summarize", str(copy)])
    assert code == 0, err
    sweep = json.loads((copy / "sweep.json").read_text())
    (entry,) = sweep["variants"].values()
    assert entry["seeds"] == [0, 2]
    assert "optim.weight_decay=0.5" in sweep["left_out"]["seed1"]


def test_rerun_of_a_finished_series_skips_its_runs_and_keeps_its_summary(finished_series, copy):
    code, out, err = quiet(train_main, series_cmd(finished_series, copy))
    assert code == 0, err
    assert out.count("finished, skipped") == 3
    record = json.loads((copy / "series.json").read_text())
    assert sorted(record["members"]) == ["seed0", "seed1", "seed2"]


def test_knn_probe_says_when_k_exceeds_the_training_images(finished_series, tmp_path):
    code, out, err = quiet(
        evaluate_main,
        [
            "probe",
            str(finished_series[2] / "seed0"),
            "--method",
            "knn",
            "--k",
            "1000",
            "--output",
            str(tmp_path / "knn"),
        ],
    )
    assert code == 0, err
    assert "fewer than --k 1000" in out
    chosen = json.loads((tmp_path / "knn" / "probe.json").read_text())["chosen"]
    assert chosen["breastmnist"]["k"] == 32


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_files_and_checkpoints_get_the_mode_open_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_text(tmp_path / "a.json", "{}\n")
        ckpt.save(tmp_path / "last.pt", {ckpt.MODEL: {}, ckpt.CONFIG: {}})
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(previous)
    want = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert want == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == want
    assert stat.S_IMODE((tmp_path / "last.pt").stat().st_mode) == want
    # replacing a file keeps the mode its owner gave it, as open() does
    os.chmod(tmp_path / "a.json", 0o640)
    write_text(tmp_path / "a.json", "[]\n")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640


def test_resume_hint_names_the_launcher(monkeypatch):
    assert resume_command(Path("runs/a b")) == "continue with: python train.py --resume 'runs/a b'"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    hint = resume_command(Path("runs/a"))
    assert "torchrun --nproc-per-node 4 train.py --resume runs/a" in hint and "python train.py" not in hint
    assert "failure report" in hint
