"""The probes of a series' runs as jobs (`evaluate.py probe RUN --launcher`): one job per run with the results of
the sequential probe, a rerun that probes only what is missing or stale, a SLURM array, bad input in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mmpt.cli import evaluate_main
from tests.helpers import job_record, job_status, quiet, sbatch_options


@pytest.fixture(scope="module")
def runs(sequential_series, tmp_path_factory):
    """A copy of the study's 3-seed series (a probe caches features in each run), and the sequential linear probes
    of another copy (in ../sequential), made in this process with one thread, as each job probes: the jobs extract
    their own features."""
    base = tmp_path_factory.mktemp("probes")
    folder = base / "seq"
    for copy in (folder, base / "seq-sequential"):
        shutil.copytree(sequential_series[0] / "seq", copy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["probe", str(base / "seq-sequential"), "--method", "linear", "--output", str(base / "sequential")]
        code, _, err = quiet(evaluate_main, argv)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    return folder


def probe_argv(runs, out, *extra: str) -> list[str]:
    return ["probe", str(runs), "--method", "linear", "--output", str(out), *extra]


def sequential_of(runs, k: int):
    """The sequential probe's results of seed k (the reference of the jobs')."""
    return runs.parent / "sequential" / f"seed{k}"


@pytest.mark.slow
def test_probes_as_local_jobs_give_the_sequential_results_and_a_rerun_probes_only_what_is_stale(runs, tmp_path):
    out = tmp_path / "jobs"
    argv = probe_argv(runs, out, "--launcher", "local", "--jobs", "3", "--cpus-per-job", "1")
    assert not any(runs.glob("seed*/features"))  # the jobs extract the features themselves
    code, stdout, err = quiet(evaluate_main, argv)
    assert code == 0, err + stdout
    assert all((runs / f"seed{k}" / "features").is_dir() for k in range(3))
    assert "3 members: 0 finished, 0 running or queued, 3 to start; 3 at a time" in stdout
    for k in range(3):
        sequential = runs.parent / "sequential" / f"seed{k}"
        for name in ("metrics.json", "predictions/data.json"):
            assert (out / f"seed{k}" / name).read_text() == (sequential / name).read_text(), (k, name)
        job, theirs = (json.loads((folder / "probe.json").read_text()) for folder in (out / f"seed{k}", sequential))
        # each names the run it probed: the jobs these runs, the sequential probe its own copy of them
        assert job.pop("leaf") == str((runs / f"seed{k}").absolute())  # the run it probed, which status checks
        theirs.pop("leaf")
        assert job == theirs  # the request and weights too
    record = job_record(out)
    assert record["kind"] == "probe" and record["order"] == ["seed0", "seed1", "seed2"]
    rows = job_status(out)
    jobs = [record["members"][f"seed{k}"]["job_id"] for k in range(3)]
    assert [rows[f"seed{k}"][:2] for k in range(3)] == [["finished", job] for job in jobs]
    assert rows["_text"].startswith(f"linear probes in {out}: 3 members (launcher: local)")
    assert "progress: 3 of 3 finished (100%)" in rows["_text"]

    # the same command probes nothing; a run trained again (another best_digest) and a probe of another request
    # (here another --datasets) are probed again, and only they
    code, stdout, _ = quiet(evaluate_main, argv)
    assert code == 0 and "3 finished, 0 running or queued, 0 to start" in stdout
    for k, key, value in ((1, "weights", "0" * 64), (2, "request", {"datasets": "breast"})):
        path = out / f"seed{k}" / "probe.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {key: value}))
    code, stdout, err = quiet(evaluate_main, argv)
    assert code == 0 and "1 finished, 0 running or queued, 2 to start" in stdout, err + stdout
    again = job_record(out)["members"]
    assert again["seed0"]["job_id"] == jobs[0] and {again["seed1"]["job_id"], again["seed2"]["job_id"]}.isdisjoint(jobs)
    for k in (1, 2):
        job, theirs = (json.loads((f / "probe.json").read_text()) for f in (out / f"seed{k}", sequential_of(runs, k)))
        assert job.pop("leaf") != theirs.pop("leaf") and job == theirs  # each names the run it probed


def test_probes_as_a_slurm_array(runs, tmp_path, slurm, monkeypatch):
    monkeypatch.setenv("SLURM_STANDIN_HOLD", "1")  # sbatch records the jobs and runs nothing: they stay PENDING
    out = tmp_path / "knn"
    argv = ["probe", str(runs), "--method", "knn", "--k", "5", "--output", str(out), "--launcher", "slurm"]
    code, stdout, err = quiet(evaluate_main, [*argv, "--partition", "gpu", "--gpus-per-job", "1", "--time", "30"])
    assert code == 0, err + stdout
    record = job_record(out)
    array = record["members"]["seed0"]["job_id"].split("_")[0]
    assert [record["members"][f"seed{k}"]["job_id"] for k in range(3)] == [f"{array}_{k}" for k in range(3)]
    assert record["kind"] == "probe" and record["request"]["k"] == 5 and "summary_job" not in record
    options = sbatch_options(slurm, array)
    assert options["array"] == "0-2%3" and options["partition"] == "gpu" and options["gpus-per-node"] == "1"
    assert options["time"] == "30" and options["job-name"] == "probe-knn"
    rows = job_status(out)
    assert [rows[f"seed{k}"][0] for k in range(3)] == ["queued"] * 3 and "SLURM PENDING" in rows["seed0"][2]
    assert rows["_text"].startswith(f"knn probes in {out}: 3 members (launcher: slurm)")
    assert all((out / f"seed{k}" / "job.log").is_symlink() for k in range(3))


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--jobs", "2"], ["--jobs is a job's setting", "--launcher"]),
        (["--launcher", "local", "--jobs", "0"], ["launch.jobs must be >= 1, got 0"]),
        (["--launcher", "local", "--gpus-per-job", "2"], ["one device", "--gpus-per-job above 1"]),
        (["--launcher", "slurm"], ["--launcher slurm needs SLURM's sbatch and srun on PATH"]),
    ],
)
def test_bad_probe_launches_are_one_line_before_anything_is_written(runs, tmp_path, monkeypatch, extra, words):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch here
    out = tmp_path / "out"
    code, _, err = quiet(evaluate_main, probe_argv(runs, out, *extra))
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(w in lines[0] for w in words), lines[0]
    assert not out.exists()


def test_a_probe_launch_that_sbatch_refuses_is_one_line_and_leaves_no_folder(runs, tmp_path, slurm):
    sbatch = tmp_path / "bin" / "sbatch"  # the slurm fixture's stand-in, replaced by one that refuses every job
    sbatch.write_text('#!/bin/sh\necho "sbatch: error: invalid partition specified: nope" >&2\nexit 1\n')
    out = tmp_path / "out"
    code, _, err = quiet(evaluate_main, probe_argv(runs, out, "--launcher", "slurm", "--partition", "nope"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: sbatch refused the job array of 3 members") and "invalid partition" in err, err
    assert not out.exists()


def test_a_bare_backbone_is_not_launched(tmp_path):
    argv = ["probe", "--backbone", "test_resnet", "--method", "knn", "--launcher", "local"]
    code, _, err = quiet(evaluate_main, argv)
    assert code == 2 and err.strip() == "error: a bare --backbone is one probe, run in this process; drop --launcher"
