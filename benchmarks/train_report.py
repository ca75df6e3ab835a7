"""The training benchmark's report: the GPUs' dense peak FLOP/s (for MFU) and the Markdown table of a result."""

from __future__ import annotations

import re

import torch

from mmpt.io import markdown_table

# Dense peak FLOP/s (no 2:4 sparsity) by GPU, from NVIDIA's data sheets, which print the tensor-core figures with
# sparsity (twice these); "tf32" is float32 on tensor cores (train.tf32). The first pattern found as a whole word in
# torch.cuda.get_device_name() wins, so the NVL and PCIe cards come before the SXM part of their name.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    # H100 data sheet: NVL 1,671 TFLOPS bf16 with sparsity, TF32 835, FP32 60; PCIe 1,513, 756, 51; SXM 1,979, 989, 67
    (r"H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (r"H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    # H200 data sheet: NVL as the H100 NVL; SXM as the H100 SXM (the same GH100 compute, more memory)
    (r"H200 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    # GH200 data sheet: its Hopper GPU as the H100 SXM (990 TFLOPS bf16 dense, 1,979 with sparsity)
    (r"GH200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    # H20 product brief: 148 TFLOPS fp16/bf16 dense, TF32 74, FP32 44
    (r"H20", {"bf16": 148e12, "fp16": 148e12, "tf32": 74e12, "fp32": 44e12}),
    # HGX B200 data sheet, per GPU: 4.5 PFLOPS fp16/bf16 with sparsity, TF32 2.2, FP32 75
    (r"B200", {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12, "fp32": 75e12}),
    # A100 data sheet: 624 TFLOPS bf16 with sparsity, TF32 312, FP32 19.5 (SXM and PCIe alike)
    (r"A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
]


def input_description(resolution: int, input_size: int) -> str:
    if input_size == resolution:
        return f"{resolution} px as stored"
    how = "zero-padded" if input_size > resolution else "resized"
    return f"{resolution} px {how} to {input_size} px"


def peak_flops(device_name: str, precision: str) -> float | None:
    """The GPU's dense peak FLOP/s for `precision` (resolved; fp32 means TF32 when torch allows it), or None for a
    GPU the table does not know."""
    kind = precision if precision != "fp32" else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
    for pattern, peaks in PEAK_FLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){pattern}(?![A-Za-z0-9])", device_name):
            return peaks[kind]
    return None


def format_table(result: dict) -> str:
    """The figures as a Markdown table: measurement | engine | bare loop (the baseline) | engine / bare."""
    s = result["settings"]
    medians = result["img_s_median_over_turns"]
    bare, engine = result["bare_img_s"], result["engine_img_s"]
    rows = [
        ("measurement", "engine", "bare loop", "engine / bare"),
        ("img/s (median turn)", f"{engine:,.1f}", f"{bare:,.1f}", f"{result['engine_vs_bare']:.3f}"),
        (
            "img/s, median over turns",
            f"{medians['engine']:,.1f}",
            f"{medians['bare']:,.1f}",
            f"{medians['engine'] / medians['bare']:.3f}",
        ),
        ("MFU", "-" if result["mfu"] is None else f"{result['mfu']:.1%}", "-", "-"),
        ("time blocked on the loader", f"{result['engine_loader_wait_fraction']:.1%}", "-", "-"),
        *_calibration_rows(result["norm_calibration"]),
        ("peak memory (the larger loop)", f"{result['peak_memory_bytes'] / 2**20:,.0f} MiB", "-", "-"),
        ("model GFLOP per image (fwd+bwd)", f"{result['flops_per_image'] / 1e9:.3f}", "-", "-"),
    ]
    mtl = result["mtl"]
    reference = mtl.get("seconds_per_step", {}).get(mtl.get("reference"))
    for method, ratio in mtl["ratios"].items():
        label = f"step time, {mtl['tasks_per_step']} datasets per step: {method} against {mtl['reference']}"
        ms = f"{mtl['seconds_per_step'][method] * 1e3:,.0f} ms"
        rows.append((label, ms, f"{reference * 1e3:,.0f} ms", f"{ratio:.2f}x"))
    for method, reason in mtl.get("refused", {}).items():
        rows.append((f"step time, {mtl['tasks_per_step']} datasets per step: {method}", "refused", "-", reason))
    for source, c in result["conflicts"].items():
        label = (
            f"gradient-conflict diagnostic from {source} ({c['tasks_per_step']} per step, {c['weighting']}): "
            "a measuring step against one without"
        )
        on, off = c["seconds_per_measuring_step"], c["seconds_per_step"]
        rows.append((label, f"{on * 1e3:,.0f} ms", f"{off * 1e3:,.0f} ms", f"{on / off:.2f}x"))
        rows.append(
            (
                f"  its cost every {c['default_every_steps']} steps "
                f"(+{c['extra_seconds_per_measurement'] * 1e3:,.0f} ms per measurement)",
                f"{c['cost_at_default']:.2%}",
                "-",
                f"2 % from every {c['every_steps_for_2_percent']} steps",
            )
        )
    m = result["machine"]
    return "\n".join(
        [
            markdown_table(rows[0], rows[1:]),
            f"{s['timm_name']}, input {s['input']}, batch {s['batch_size']}, {s['precision']}"
            + (f" (train.precision {s['precision_setting']})" if s["precision_setting"] != s["precision"] else "")
            + (", compiled" if s["compile"] else "")
            + (", channels_last" if s["channels_last"] else "")
            + f", determinism {'on' if s['deterministic'] else 'off'}, TF32 {'on' if s['tf32'] else 'off'}"
            + (" (as training runs)" if s["as_training"] else " (training runs with determinism on, TF32 on)")
            + f"; {s['device']} ({s['device_name'] or 'unknown'}), {m['cpus']} CPUs, {s['workers']} loader workers, "
            f"{s['repeats']} turns of {s['steps']} timed steps each, load average {m['load_avg_at_start'][0]:.1f} "
            f"at start, wall time {result['wall_s']:.0f} s",
        ]
    )


def _calibration_rows(calibration: dict | None) -> list[tuple[str, str, str, str]]:
    """The precise statistics' cost (model.norm_calibration_batches at its default) as a share of a MedMNIST+ epoch,
    with a calibration batch against an engine step; no row for a backbone without BatchNorm."""
    if calibration is None:
        return []
    label = f"norm calibration ({calibration['batches_per_dataset']} batches per dataset) / MedMNIST+ epoch"
    value = f"{calibration['vs_epoch']:.2%} (a batch {calibration['batch_vs_step']:.2f}x a step)"
    return [(label, value, "-", "-")]
