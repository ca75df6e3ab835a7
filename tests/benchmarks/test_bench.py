import json
import math
import statistics
import subprocess
import sys
import textwrap

import medmnist
import pytest

from benchmarks.__main__ import main
from benchmarks.common import MemorySampler, descendants, pss_anon_shmem, rss_anon_shmem
from benchmarks.data import format_table, measure_memory
from benchmarks.datafiles import write_memory_set
from benchmarks.train_report import format_table as format_train_table
from mmpt.tasks import resolve_tasks
from tests.tolerances import below

MB = 1 << 20

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the memory meter reads Linux /proc")

# Allocates (and touches) 200 MB of anonymous memory when told to, then forks `children` processes that
# share it; every process waits for stdin to close, so the test decides when they exit.
ALLOCATOR = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    print("started", flush=True)
    sys.stdin.readline()
    data = np.ones(200 << 20, np.uint8)
    children = int(sys.argv[1])
    for _ in range(children):
        if os.fork() == 0:
            sys.stdin.read()
            os._exit(0)
    print("allocated", flush=True)
    sys.stdin.read()
    for _ in range(children):
        os.wait()
    """
)


def _allocator(children: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", ALLOCATOR, str(children)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "started"
    return process


def _allocate(process: subprocess.Popen) -> None:
    process.stdin.write("go\n")
    process.stdin.flush()
    assert process.stdout.readline().strip() == "allocated"


def _finish(process: subprocess.Popen) -> None:
    process.stdin.close()
    process.wait(timeout=30)


def test_meter_sees_a_200_mb_allocation_in_rss_anon_and_pss():
    process = _allocator(children=0)
    try:
        rss_before, pss_before = rss_anon_shmem(process.pid), pss_anon_shmem(process.pid)
        _allocate(process)
        assert rss_anon_shmem(process.pid) - rss_before >= 150 * MB
        assert pss_anon_shmem(process.pid) - pss_before >= 150 * MB
    finally:
        _finish(process)


def test_sampler_counts_pages_shared_by_forked_workers_once():
    process = _allocator(children=2)
    try:
        _allocate(process)
        assert len(descendants(process.pid)) == 2
        with MemorySampler(process.pid) as sampler:
            pass
        assert sampler.peak_processes == 3
        # three processes map the 200 MB: RSS counts it three times, the proportional share once
        assert sampler.peak_rss_bytes >= 3 * 190 * MB
        assert 190 * MB <= sampler.peak_bytes < 2 * 190 * MB
    finally:
        _finish(process)


@pytest.mark.slow
def test_tiny_benchmark_writes_every_figure_and_its_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "data",
        "--images",
        "64",
        "--workers",
        "1",
        "--batch-size",
        "8",
        "--timed-batches",
        "2",
        "--repeats",
        "1",
        "--wait-batch-size",
        "8",
        "--wait-steps",
        "2",
        "--workdir",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())

    for key in ("loader_vs_pil_pad", "loader_vs_pil_native", "rss_fraction", "data_wait_fraction"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert "targets" not in result and "met" not in result  # figures with their baseline, nothing judged
    for name in ("pad", "native"):
        runs = result["throughput"][name]["runs"]
        assert runs["loader"]["images"] == runs["pil"]["images"] == 2 * 8
        quotient = runs["loader"]["img_s_per_worker"] / runs["pil"]["img_s_per_worker"]
        assert result[f"loader_vs_pil_{name}"] == pytest.approx(quotient)
    mmap = result["memory"]["mmap"]
    assert mmap["data_bytes"] == 64 * 224 * 224 * 3
    assert mmap["processes"] == 2  # the main process and its one worker
    assert result["rss_fraction"] == pytest.approx((mmap["peak_bytes"] - mmap["baseline_bytes"]) / mmap["data_bytes"])
    # the in-RAM copy of the data shows up in the comparison scenario
    assert result["memory"]["ram"]["above_baseline_bytes"] >= mmap["data_bytes"]
    wait = result["data_wait"]
    assert result["data_wait_fraction"] == pytest.approx(wait["wait_s"] / wait["step_s"])
    printed = capsys.readouterr().out
    assert printed.startswith("| measurement") and format_table(result).splitlines()[0] in printed
    header = [cell.strip() for cell in printed.splitlines()[0].strip("|").split("|")]
    assert header == ["measurement", "mmpt", "baseline", "ratio"]


def test_too_few_images_for_the_data_wait_steps_is_an_error_that_names_the_minimum(capsys):
    assert main(["data", "--images", "10", "--wait-batch-size", "8", "--wait-steps", "2"]) == 2
    assert "--images must be >= (2 + --wait-steps) * --wait-batch-size = 32" in capsys.readouterr().err


@pytest.mark.slow
def test_memory_of_a_mapped_epoch_does_not_grow_with_the_data_while_an_in_ram_copy_does(tmp_path):
    # RGB 224 px sets of 1,000 and 3,000 images (144 and 431 MiB) in batches of 16 (2.4 MB): above its
    # baseline the loader holds the batches in flight, not the data. Memory only: independent of speed.
    small, large = tmp_path / "small.npy", tmp_path / "large.npy"
    write_memory_set(small, 1000)
    write_memory_set(large, 3000)
    mapped_small = measure_memory(small, in_ram=False, workers=1, batch_size=16)
    mapped_large = measure_memory(large, in_ram=False, workers=1, batch_size=16)
    in_ram = measure_memory(small, in_ram=True, workers=1, batch_size=16)
    assert (mapped_small["batches"], mapped_large["batches"], in_ram["batches"]) == (63, 188, 63)
    grown = mapped_large["above_baseline_bytes"] - mapped_small["above_baseline_bytes"]
    assert grown < 0.05 * (mapped_large["data_bytes"] - mapped_small["data_bytes"]), (mapped_small, mapped_large)
    assert mapped_large["fraction"] < 0.15, mapped_large
    assert in_ram["fraction"] > 0.9, in_ram


@pytest.mark.slow
def test_tiny_train_benchmark_times_bare_loop_and_engine_and_writes_every_key(tmp_path, capsys):
    # test_resnet as in the quickstart (28 px padded to 32), batches of 8 over all 12 synthetic datasets
    out = tmp_path / "train.json"
    argv = [
        "train",
        "--backbone",
        "test_resnet",
        "--resolution",
        "28",
        "--input-size",
        "32",
        "--batch-size",
        "8",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--repeats",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--workdir",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())

    for key in ("bare_img_s", "engine_img_s", "engine_vs_bare", "flops_per_image"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["engine_vs_bare"] == pytest.approx(result["engine_img_s"] / result["bare_img_s"])
    # the loops alternate, each turn trains full batches (the sampler drops partial ones), and the turn with
    # the median engine/bare ratio (the lower of 2) gives the figures
    bare, engine = result["repeats"]["bare"], result["repeats"]["engine"]
    assert [run["images"] for run in bare] == [run["images"] for run in engine] == [2 * 8, 2 * 8]
    ratios = [e["img_s"] / b["img_s"] for b, e in zip(bare, engine)]
    middle = result["median_turn"]
    assert ratios[middle] == min(ratios) and result["engine_vs_bare"] == pytest.approx(ratios[middle])
    assert (result["bare_img_s"], result["engine_img_s"]) == (bare[middle]["img_s"], engine[middle]["img_s"])
    assert result["img_s_median_over_turns"]["bare"] == pytest.approx(statistics.median(r["img_s"] for r in bare))
    assert 0 <= result["engine_loader_wait_fraction"] < 1
    # a process that imported torch and trained holds well over 100 MB; no CUDA, so no MFU
    assert 100 * MB < result["peak_memory_bytes"] < 64 * 1024 * MB
    assert result["mfu"] is None and result["peak_flop_s"] is None
    settings = result["settings"]
    assert (settings["timm_name"], settings["resolution"], settings["input_size"]) == ("test_resnet", 28, 32)
    assert settings["input"] == "28 px zero-padded to 32 px" and settings["datasets"] == 12
    assert (settings["batch_size"], settings["steps"], settings["precision"]) == (8, 2, "fp32")
    assert "targets" not in result
    # precise per-dataset statistics (12 datasets, test_resnet: model.norm auto keeps them apart): a calibration
    # batch over a step, scaled to the default's batches against an epoch of the 12 MedMNIST+ splits at batch 8
    calibration = result["norm_calibration"]
    assert calibration["batches_per_dataset"] == 16 and 0 < calibration["batch_vs_step"] < 10
    assert calibration["calibration_batches"] == pytest.approx(12 * 16)  # every split holds 16 batches of 8
    sizes = [medmnist.INFO[t.flag]["n_samples"]["train"] for t in resolve_tasks("all")]
    # full batches of 8, and a remainder of 4 or more as its own (a smaller one joins the last full batch)
    assert calibration["epoch_steps"] == sum(n // 8 + (n % 8 >= 4) for n in sizes)
    assert result["norm_calibration_vs_epoch"] == pytest.approx(
        calibration["batch_vs_step"] * 12 * 16 / calibration["epoch_steps"]
    )
    # step time at 4 datasets per step: the reference (the static sum) is 1, the Jacobian methods on both paths positive
    assert result["mtl"]["tasks_per_step"] == 4 and result["mtl_step_ratio.none"] == 1.0
    timed = [f"mtl_step_ratio.{m}.{path}" for m in ("upgrad", "pcgrad") for path in ("one_pass", "autojac")]
    assert all(math.isfinite(result[key]) and result[key] > 0 for key in timed)
    # the gradient-conflict diagnostic, each source timed on against off: its cost at the default interval
    for source in ("batches", "step", "gramian"):
        cost = result["conflicts"][source]
        assert result[f"conflict_cost.{source}"] == cost["cost_at_default"] >= 0
        extra = max(0.0, cost["seconds_per_measuring_step"] - cost["seconds_per_step"])
        assert cost["extra_seconds_per_measurement"] == extra
        assert cost["cost_at_default"] == pytest.approx(extra / (100 * cost["seconds_per_step"]))
    printed = capsys.readouterr().out
    assert printed.startswith("| measurement") and format_train_table(result).splitlines()[2] in printed
    header = [cell.strip() for cell in printed.splitlines()[0].strip("|").split("|")]
    assert header == ["measurement", "engine", "bare loop", "engine / bare"]
    assert "gradient-conflict diagnostic from gramian" in printed
    rows = {
        cells[0]: cells[1:]
        for cells in (
            [c.strip() for c in line.strip("|").split("|")] for line in printed.splitlines() if line.startswith("|")
        )
    }
    assert rows["norm calibration (16 batches per dataset) / MedMNIST+ epoch"][0].startswith(
        f"{calibration['vs_epoch']:.2%} "
    )


def test_train_benchmark_refuses_an_input_smaller_than_the_images(capsys):
    assert main(["train", "--resolution", "28", "--input-size", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --input-size 16 is smaller than --resolution 28") and len(err.splitlines()) == 1


def test_compare_benchmark_times_both_paths_and_finds_them_equal(tmp_path, capsys):
    out = tmp_path / "compare.json"
    code = main(
        [
            "compare",
            "--datasets",
            "breast,retina,chest",
            "--seeds",
            "2",
            "--max-images",
            "40",
            "--resamples",
            "20",
            "--old-resamples",
            "4",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["test_images"] == {"breastmnist": 40, "retinamnist": 40, "chestmnist": 40}
    assert result["new_s"] > 0 and result["old_s"] == pytest.approx(result["old_measured_s"] * 5)
    assert result["ratio"] == pytest.approx(result["old_s"] / result["new_s"])
    # both paths ran on the same 4 resamples: the intervals agree
    assert below(result["max_interval_difference"], 1e-9)
    printed = capsys.readouterr().out
    assert "extrapolated linearly from 4 resamples" in printed and "load average" in printed
    assert 0 < result["delta_m_s"] < result["compare_s"] and "Δm's interval" in printed
