"""The run folder: --overwrite clears mmpt's outputs by name and nothing else, a file where a folder belongs (or the
reverse) is one error, a record rewritten on resume keeps its earlier text, and the run a folder lies in is the
closest folder above it with a config.yaml."""

from __future__ import annotations

import pytest

from mmpt.errors import MmptError
from mmpt.io import write_text
from mmpt.runs.rundir import RunDir, prepare_run_dir

# The --overwrite tests below check the on-disk layout itself: they spell the run folder's names out on purpose
# (not through RunDir or mmpt.runs.names), so that a renamed output fails here.


def test_overwrite_clears_mmpt_outputs_by_name_and_keeps_everything_else(tmp_path, capsys):
    run = tmp_path / "run"
    prediction = "breastmnist_test_[AUC]0.812_[ACC]0.750@tiny.csv"
    mmpt_files = [
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "tb/events.out.tfevents.1700000000.host.1.0",
        f"predictions/{prediction}",
        "eval/test/metrics.json",
        f"eval/val/predictions/{prediction}",
        "summary.json",
        "env.json",
        "val_history.json",
        "config.yaml",
        "config.before-resume-at-step5.yaml",
        "metrics.md",
        "metrics.csv",
        "metrics.json",
        "val_auc.png",
        ".config.yaml.tmp",
        "loss_curves.png",
        "features/breastmnist_28_test.npy",
        "features/manifest.json",
        "compare.md",
        "compare_auc.png",
        "predictions/data.json",
        "eval/test/confusion_breastmnist.png",
    ]
    user_files = [
        "notes.txt",
        "results.json",
        "my_analysis/plot.py",
        "checkpoints/epoch3-copy.pt",
        "tb/README",
        "predictions/mine.csv",
        "eval/test/my_table.csv",
        "eval/ablation/metrics.json",
    ]
    for name in mmpt_files + user_files:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    with pytest.raises(MmptError, match="already has outputs"):
        prepare_run_dir(run, resume=False, overwrite=False)
    kept = prepare_run_dir(run, resume=False, overwrite=True)
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert left == sorted(user_files)
    # a folder mmpt does not write is kept whole and named once
    assert kept == sorted(
        [
            "notes.txt",
            "results.json",
            "my_analysis",
            "checkpoints/epoch3-copy.pt",
            "tb/README",
            "predictions/mine.csv",
            "eval/test/my_table.csv",
            "eval/ablation",
        ]
    )
    assert "--overwrite kept what mmpt did not write" in capsys.readouterr().out


def test_overwrite_removes_the_recalibrated_evaluations_and_features_of_the_replaced_weights(tmp_path):
    run = tmp_path / "run"
    prediction = "breastmnist_test_[AUC]0.812_[ACC]0.750@tiny.csv"
    written = [  # what evaluate.py --recalibrate-norm and probe --recalibrate-norm wrote for the old weights
        "eval/test-recalibrated/metrics.json",
        "eval/test-recalibrated/metrics.md",
        "eval/test-recalibrated/recalibration.json",
        "eval/test-recalibrated/confusion_breastmnist.png",
        f"eval/test-recalibrated/predictions/{prediction}",
        "eval/test-recalibrated/predictions/data.json",
        "eval/val-recalibrated/metrics.csv",
        "features-recalibrated/breastmnist_28_train.npy",
        "features-recalibrated/manifest.json",
        "checkpoints/best.pt",
    ]
    mine = ["eval/test-recalibrated/notes.txt", "eval/train-recalibrated/metrics.json", "features-recalibrated/x.csv"]
    for name in written + mine:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    kept = prepare_run_dir(run, resume=False, overwrite=True)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) == sorted(mine)
    assert kept == ["eval/test-recalibrated/notes.txt", "eval/train-recalibrated", "features-recalibrated/x.csv"]


def test_overwrite_unlinks_symbolic_links_and_never_touches_what_they_point_to(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("last.pt", "best.pt", "notes.txt"):
        (outside / name).write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(outside, target_is_directory=True)
    (run / "summary.json").symlink_to(outside / "notes.txt")
    (run / "config.yaml").write_text("x")
    prepare_run_dir(run, resume=False, overwrite=True)
    assert sorted(p.name for p in outside.iterdir()) == ["best.pt", "last.pt", "notes.txt"]
    assert all((outside / n).read_text() == "precious" for n in ("last.pt", "best.pt", "notes.txt"))
    assert not any(run.iterdir())


@pytest.mark.parametrize(
    "name, kind",
    [("checkpoints", "file"), ("tb", "file"), ("config.yaml", "folder"), ("checkpoints/last.pt", "folder")],
)
def test_a_file_where_mmpt_writes_a_folder_or_the_reverse_is_one_error(tmp_path, name, kind):
    run = tmp_path / "run"
    (run / name).parent.mkdir(parents=True, exist_ok=True)
    (run / name).mkdir() if kind == "folder" else (run / name).write_text("mine")
    with pytest.raises(MmptError, match=f"has a {kind} named {name} where mmpt writes a"):
        prepare_run_dir(run, resume=False, overwrite=True)
    assert (run / name).exists()


def test_a_record_rewritten_on_resume_keeps_its_earlier_text(tmp_path):
    run = RunDir(tmp_path)
    path, kept = run.config, run.before_resume(run.config, 3)
    assert kept == tmp_path / "config.before-resume-at-step3.yaml"
    write_text(path, "lr: 1\n")
    write_text(path, "lr: 1\n", keep_previous_as=kept)
    assert not kept.exists()  # unchanged: nothing to keep
    write_text(path, "lr: 2\n", keep_previous_as=kept)
    assert path.read_text() == "lr: 2\n"
    assert (tmp_path / "config.before-resume-at-step3.yaml").read_text() == "lr: 1\n"


def test_the_enclosing_run_is_the_closest_folder_with_a_config_within_the_levels_asked(tmp_path):
    outer, inner = RunDir(tmp_path / "series"), RunDir(tmp_path / "series" / "seed0")
    for run in (outer, inner):
        run.path.mkdir(exist_ok=True)
        run.config.write_text("name: x\n")
    calibrated = inner.path / "eval" / "test" / "calibrated"
    calibrated.mkdir(parents=True)
    assert RunDir.enclosing(calibrated).path == inner.path  # the closest, not the series above it
    assert RunDir.enclosing(calibrated, levels=4).path == inner.path
    assert RunDir.enclosing(calibrated, levels=3) is None  # eval/test/calibrated and the two above it only
    assert RunDir.enclosing(tmp_path / "elsewhere") is None
