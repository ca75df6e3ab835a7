"""The process a run lives in: the determinism switches and what env.json records of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mmpt.runtime.process import configure_determinism

# The switches are global, so they are set in a fresh interpreter (off first: on sets an env variable for good).
PROBE = textwrap.dedent(
    """
    import json, os, torch
    from mmpt.runtime.process import configure_determinism, environment
    result = {}
    for mode in (False, True):
        configure_determinism(0, mode)
        env = environment(torch.device("cpu"), mode)
        result["on" if mode else "off"] = {
            "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "tf32": torch.backends.cuda.matmul.allow_tf32,
            "env": {k: env[k] for k in ("determinism", "cublas_workspace_config", "tf32", "cudnn_benchmark", "torch",
                                        "timm", "medmnist", "device", "git_commit")},
            "first_draw": torch.rand(1).item(),
        }
    print(json.dumps(result))
    """
)


# every test that uses this fixture is marked slow: its runs and theirs take more than about 5 s
@pytest.fixture(scope="module")
def probe() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


@pytest.mark.slow
def test_determinism_on_sets_cublas_workspace_and_deterministic_kernels_and_env_json_says_so(probe):
    on = probe["on"]
    assert on["cublas"] == ":4096:8" and on["env"]["cublas_workspace_config"] == ":4096:8"
    assert on["algorithms"] and on["cudnn_deterministic"] and not on["cudnn_benchmark"] and not on["tf32"]
    assert on["env"]["determinism"] is True and on["env"]["tf32"] is False and on["env"]["cudnn_benchmark"] is False
    assert on["env"]["torch"] == torch.__version__ and on["env"]["device"] == "cpu"
    assert on["env"]["timm"] and on["env"]["medmnist"]
    assert (
        on["first_draw"] == torch.rand(1, generator=torch.Generator().manual_seed(0)).item()
    )  # torch seeded from seed 0


@pytest.mark.slow
def test_determinism_off_allows_cudnn_benchmark_leaves_tf32_to_its_setting_and_env_json_says_so(probe):
    off = probe["off"]
    assert off["cublas"] is None
    assert not off["algorithms"] and off["cudnn_benchmark"] and not off["tf32"]  # train.tf32 is its own setting
    assert off["env"]["determinism"] is False and off["env"]["tf32"] is False and off["env"]["cudnn_benchmark"] is True


def test_determinism_warns_when_cuda_started_before_the_cublas_setting(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.warns(UserWarning, match="CUDA was initialised before mmpt set CUBLAS_WORKSPACE_CONFIG"):
        configure_determinism(0, True)
