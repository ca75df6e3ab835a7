"""The paths a GPU run takes, checked on the CPU: resume across GPU counts, train.precision auto and train.tf32,
compile with per-dataset BatchNorm and with a gradient-based method, fp16 with gradient-based methods, and
`python -m benchmarks gpu`, whose CPU dry run (tiny models, a few images) exercises every check's code path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks.gpu import format_table, run_gpu_check
from benchmarks.gpu_context import CHECKS, TINY, Context
from mmpt.config import load_config, recorded_config, to_dict
from mmpt.errors import MmptError
from mmpt.model.build import build_model
from mmpt.runs import checkpoint as ckpt
from mmpt.runtime.distributed import SINGLE
from mmpt.runtime.precision import resolve_precision
from mmpt.tasks import resolve_tasks
from mmpt.training.log import numerics_description, resumed_line
from mmpt.training.step import dropout_seed
from tests.helpers import REPO

# ---------------------------------------------------------------------------------------------
# resume across GPU counts


def fake_gpus(monkeypatch, count: int) -> list[tuple[int, torch.Tensor]]:
    """Pretend this machine has `count` GPUs; return the list that records each set_rng_state(state, device)."""
    restored: list[tuple[int, torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state)))
    return restored


@pytest.mark.parametrize("gpus", [0, 1, 2, 3])
def test_a_checkpoint_with_two_gpu_random_states_resumes_on_any_number_of_gpus(monkeypatch, gpus):
    state = ckpt.rng_state()
    cuda = [torch.full((16,), 7, dtype=torch.uint8), torch.full((16,), 9, dtype=torch.uint8)]
    state["cuda"] = cuda
    restored = fake_gpus(monkeypatch, gpus)
    before = torch.rand(3)
    assert ckpt.set_rng_state(state) == (min(gpus, 2), 2)
    assert [d for d, _ in restored] == list(range(min(gpus, 2)))
    assert all(torch.equal(s, cuda[d]) for d, s in restored)
    assert torch.equal(torch.rand(3), before)  # the CPU state is restored whatever the GPUs


def test_the_resume_line_says_how_many_gpu_random_states_it_restored(monkeypatch, synthetic_root):
    fake_gpus(monkeypatch, 1)
    cfg = load_config(overrides=[{"data": {"root": str(synthetic_root), "datasets": ["breast"]}}])
    model = build_model(cfg, resolve_tasks(cfg.data.datasets))[0]
    saved = {"epoch": 1, "step": 8, "world_size": 2}
    line = resumed_line(saved, SINGLE, cfg, model, cuda_states=(1, 2))
    assert "resumed at epoch 1, step 8" in line and "trained on 2 process(es) so far, now on 1" in line
    assert "the random state of 2 GPU(s) and this machine has 1: 1 restored" in line
    assert "GPU" not in resumed_line({**saved, "world_size": 1}, SINGLE, cfg, model, cuda_states=(2, 2))


# ---------------------------------------------------------------------------------------------
# GPU defaults


def test_precision_auto_is_bf16_on_a_cuda_device_with_bf16_and_fp32_elsewhere(monkeypatch):
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"


def test_runs_recorded_before_the_gpu_defaults_read_as_they_ran():
    raw = to_dict(load_config())
    assert raw["train"]["precision"] == "auto" and raw["train"]["tf32"] is True and raw["model"]["sync_norm"]
    for section, key in (("train", "precision"), ("train", "tf32"), ("model", "sync_norm")):
        del raw[section][key]
    old = recorded_config(raw)
    assert old.train.precision == "fp32" and old.train.tf32 is False and old.model.sync_norm is False


def test_tf32_is_its_own_setting_and_the_start_line_says_it_on_cuda():
    cfg = load_config()
    assert "determinism: on" in numerics_description(cfg, torch.device("cpu"))
    assert "TF32" not in numerics_description(cfg, torch.device("cpu"))
    assert "TF32 for float32" in numerics_description(cfg, torch.device("cuda"))
    off = load_config(overrides=[{"train": {"tf32": False}}])
    assert "full float32" in numerics_description(off, torch.device("cuda"))


def test_tf32_follows_train_tf32_with_determinism_on():
    probe = (
        "import torch; from mmpt.runtime.process import configure_determinism\n"
        "configure_determinism(0, True, True); a = torch.backends.cuda.matmul.allow_tf32\n"
        "configure_determinism(0, True, False); b = torch.backends.cuda.matmul.allow_tf32\n"
        "print(a, b, torch.are_deterministic_algorithms_enabled())"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "True"]


# ---------------------------------------------------------------------------------------------
# pairs refused in one line, and the small items


def test_compile_with_per_dataset_affine_norm_is_refused_in_one_line():
    with pytest.raises(MmptError, match=r"train\.compile cannot compile model\.norm per_dataset") as raised:
        load_config(overrides=[{"model": {"norm": "per_dataset"}, "train": {"compile": True}}])
    assert "\n" not in str(raised.value)


def test_each_rank_draws_its_own_dropout_masks_from_seed_step_and_rank():
    seeds = {dropout_seed(0, step, rank) for step in range(3) for rank in range(4)}
    assert len(seeds) == 12
    assert dropout_seed(5, 2, 1) == dropout_seed(5, 2, 1)


# ---------------------------------------------------------------------------------------------
# python -m benchmarks gpu: the CPU dry run


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """Every check of the GPU check on the CPU, with the JSON file it writes and its table (about a minute: its
    users are marked slow)."""
    out = tmp_path_factory.mktemp("gpu-check")
    result = run_gpu_check(device="cpu", workdir=out / "work", json_path=out / "gpu.json", log=lambda line: None)
    return result, json.loads((out / "gpu.json").read_text())


def test_bench_gpu_help_names_every_check():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "gpu", "--help"], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert "--device" in out.stdout and all(name in out.stdout for name in CHECKS)


@pytest.mark.slow
def test_the_cpu_dry_run_runs_every_check_and_writes_its_json(dry_run):
    result, written = dry_run
    assert written["complete"] and list(written["checks"]) == list(CHECKS)
    assert written["device"] == "cpu" and written["passed"] is result["passed"]
    table = format_table(result)
    assert all(f"| {name}" in table for name in CHECKS)
    # on a CPU nothing is judged against the GPU targets, but the checks that hold anywhere are
    judged = {r["label"]: r["passed"] for c in written["checks"].values() for r in c["rows"]}
    assert not any(p is False for p in judged.values()), judged


@pytest.mark.slow
def test_the_dry_run_step_reads_nothing_back_for_static_and_loss_based_methods(dry_run):
    cases = dry_run[1]["checks"]["sync"]["cases"]
    assert {(c["weighting"], c["tasks_per_step"]) for c in cases} >= {("none", 1), ("none", 4), ("uw", 1), ("uw", 4)}
    assert all(c["from_mmpt"] == 0 for c in cases)
    assert all(c["syncs"] == 0 for c in cases if c["family"] != "gradient-based")


@pytest.mark.slow
def test_compile_over_12_datasets_with_per_dataset_statistics_compiles_at_most_a_few_graphs(dry_run):
    """One dataset per step over all 12, each split ending in a partial batch (4 batch sizes): at most 3 graphs,
    where reading the dataset index as a Python int compiled one per dataset (and per size)."""
    compiled = dry_run[1]["checks"]["compile"]
    stats = compiled["per_dataset_stats"]
    assert stats["datasets"] == 12 and len(stats["batches"]) >= 2
    assert 1 <= stats["graphs"] <= 3


@pytest.mark.slow
def test_compile_with_upgrad_at_two_datasets_per_step_runs(dry_run):
    """TorchJD differentiates the Jacobian's rows one by one through the compiled backward (no vmap)."""
    upgrad = dry_run[1]["checks"]["compile"]["upgrad"]
    assert upgrad["finite"] and upgrad["steps"] == 12 and upgrad["graphs"] <= 3


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "upgrad", "nash_mtl", "fairgrad"])
def test_fp16_updates_the_backbone_as_much_as_bf16(dry_run, method):
    """The Jacobian is unscaled before Nash-MTL and FairGrad see it (neither is positively homogeneous): the first
    update in fp16 is within a factor of 2 of bf16's (measured 0.85 to 1.0)."""
    figures = dry_run[1]["checks"]["fp16"][method]
    assert figures["fp16"] > 0 and figures["bf16"] > 0
    assert 0.5 <= figures["ratio"] <= 2.0


@pytest.mark.parametrize(
    "name, bf16",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA H20", 148e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_the_peak_table_tells_the_h100_and_h200_variants_and_the_h20_apart(name, bf16):
    from benchmarks.train_report import peak_flops

    assert peak_flops(name, "bf16") == bf16


def test_an_fp16_jacobian_that_overflows_skips_the_backbone_step_and_lowers_the_scale(synthetic_root, tmp_path):
    """UPGrad in fp16 with a scale that makes the scaled Jacobian infinite: no inf reaches the aggregator, the
    backbone does not move, the scaler halves its scale; once the scale fits, the backbone trains."""
    ctx = Context(torch.device("cpu"), TINY, tmp_path, "eager", lambda line: None)
    cfg = ctx.config(
        datasets=("breastmnist", "retinamnist"),
        batch_size=8,
        sampler={"tasks_per_step": "all"},
        loss={"weighting": "upgrad"},
        optim={"name": "sgd", "lr": 0.05, "weight_decay": 0.0},
        train={"precision": "fp16"},
    )
    step, batches, _ = ctx.step_and_batches(cfg, 1)
    seen: list[torch.Tensor] = []
    aggregator = step.method_run.method.aggregator
    aggregator.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    step.scaler.load_state_dict({**step.scaler.state_dict(), "scale": 2.0**127})  # the scaled Jacobian overflows
    params = list(step.model.backbone.parameters())
    before = [p.detach().clone() for p in params]
    step(batches[0], 0)
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not seen
    assert step.scaler.get_scale() == 2.0**126
    step.scaler.update(2.0**10)
    step(batches[0], 1)
    assert seen and all(torch.isfinite(j).all() for j in seen)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
