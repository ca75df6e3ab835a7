"""Run the regression runs, or the suite, under every CPU kernel configuration this machine can run.

torch's CPU kernels (oneDNN, MKL, its own vectorised code), numpy's OpenBLAS and the thread count each choose how
sums are ordered and rounded; another processor makes other choices. The spread of a value over the configurations
one machine offers is the measure of how far another machine may land, and every tolerance of the suite is a
stated multiple of such a spread (docs/reproducibility-and-errors.md#tolerances).

    python -m tests.kernel_configs values OUT_DIR [--record] [CONFIG ...]
        # tests/training/regression.py per configuration, then the spread of every value (OUT_DIR/spread.json);
        # --record pins the reference configuration's values with their tolerances (regression_pinned.json)
    python -m tests.kernel_configs pytest OUT_DIR [PYTEST ARGS]   # the suite per configuration, recording the
                                                                  # tolerance each comparison used (margins.json)
    python -m tests.kernel_configs list                           # the configurations, as environment variables

oneDNN and NNPACK have no environment variable of torch's: MMPT_TEST_ONEDNN=0 and MMPT_TEST_NNPACK=0 turn them off
through a sitecustomize module this script puts on PYTHONPATH, so that every Python process of the run (pytest's
workers, the training jobs a test starts) has them off.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

SITECUSTOMIZE = """\
import os
if os.environ.get("MMPT_TEST_ONEDNN") == "0" or os.environ.get("MMPT_TEST_NNPACK") == "0":
    import torch
    if os.environ.get("MMPT_TEST_ONEDNN") == "0":
        torch.backends.mkldnn.enabled = False
    if os.environ.get("MMPT_TEST_NNPACK") == "0":
        torch.backends.nnpack.set_flags(False)
"""


def configurations() -> dict[str, dict[str, str]]:
    """name -> environment of each kernel configuration (the first is the reference the values are pinned in)."""
    import torch

    one = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    configs = {
        "reference": one,
        "threads_2": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
        "isa_default": {**one, "ATEN_CPU_CAPABILITY": "default"},
        "isa_avx2": {**one, "ATEN_CPU_CAPABILITY": "avx2"},
        "onednn_off": {**one, "MMPT_TEST_ONEDNN": "0"},
        "nnpack_off": {**one, "MMPT_TEST_NNPACK": "0"},
        "mkl_sse4_2": {**one, "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
        "mkl_avx2": {**one, "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
        "mkl_cbwr_compatible": {**one, "MKL_CBWR": "COMPATIBLE"},
        "openblas_prescott": {**one, "OPENBLAS_CORETYPE": "Prescott"},
        "openblas_haswell": {**one, "OPENBLAS_CORETYPE": "Haswell"},
        # the portable numerics mode the digests were once pinned in
        "portable": {
            **one,
            "ATEN_CPU_CAPABILITY": "default",
            "MKL_CBWR": "COMPATIBLE",
            "OPENBLAS_CORETYPE": "Prescott",
            "MMPT_TEST_ONEDNN": "0",
            "MMPT_TEST_NNPACK": "0",
        },
    }
    # the reference runs the processor's best kernels: avx2 is another choice only where that is AVX-512
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        del configs["isa_avx2"]
    return configs


def environment(config: dict[str, str], site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _ALL_VARIABLES}
    path = [str(site), str(REPO), env.get("PYTHONPATH", "")]
    return {**env, **config, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


_ALL_VARIABLES = {
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_CBWR",
    "OPENBLAS_CORETYPE",
    "MMPT_TEST_ONEDNN",
    "MMPT_TEST_NNPACK",
}


def pin(
    runs: dict[str, dict], multiple: float, floor: float, metrics: tuple[str, ...], pooled: tuple[str, ...]
) -> dict:
    """The reference configuration's values (the first of `runs`: configuration -> run -> values), each with its
    tolerance: `multiple` times the largest deviation of any configuration (per run and step for the loss and weight
    series, as a running maximum over the steps; per run and metric for the test metrics, over every run for the
    `pooled` ones), at least `floor`."""
    names = list(runs)
    reference = runs[names[0]]
    pinned, spreads = {}, {}
    for run, ref in reference.items():
        entry: dict = {}
        spreads[run] = {}
        for kind in ("loss", "weight"):
            steps = sorted({step for series in ref[kind].values() for step, _ in series})
            deviation = dict.fromkeys(steps, 0.0)
            for config in names[1:]:
                for flag, series in ref[kind].items():
                    other = dict(map(tuple, runs[config][run][kind][flag]))
                    for step, value in series:
                        deviation[step] = max(deviation[step], _deviation(other[step], value))
            envelope, running = {}, 0.0
            for step in steps:
                running = max(running, deviation[step])
                envelope[step] = max(multiple * running, floor)
            entry[kind] = {
                flag: [[step, None if math.isnan(v) else v, envelope[step]] for step, v in series]
                for flag, series in ref[kind].items()
            }
            spreads[run][kind] = max(deviation.values(), default=0.0)
        entry["test_mean"] = {}
        for metric in metrics:
            spread = max(_deviation(runs[c][run]["test_mean"][metric], ref["test_mean"][metric]) for c in names[1:])
            spreads[run][f"test {metric}"] = spread
            entry["test_mean"][metric] = [ref["test_mean"][metric], spread]
        pinned[run] = entry
    for metric in metrics:
        # a metric of ranks or counts (AUC) moves in steps on these small test sets: one run's configurations may all
        # agree by chance, so its tolerance comes from the largest step any run showed
        largest = max(spreads[run][f"test {metric}"] for run in pinned) if metric in pooled else None
        for entry in pinned.values():
            value, spread = entry["test_mean"][metric]
            entry["test_mean"][metric] = [value, max(multiple * (spread if largest is None else largest), floor)]
    return {"runs": pinned, "spread": spreads}


def _deviation(value: float, reference: float) -> float:
    """|value - reference|; two NaNs (an aggregator without weights) agree, NaN against a number is infinite."""
    if math.isnan(value) or math.isnan(reference):
        return 0.0 if math.isnan(value) and math.isnan(reference) else math.inf
    return abs(value - reference)


def run_values(out_dir: Path, args: list[str]) -> None:
    record = "--record" in args
    configs = configurations()
    names = [a for a in args if a != "--record"] or list(configs)
    assert not record or names[0] == "reference", "--record pins the reference configuration's values"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as site:
        Path(site, "sitecustomize.py").write_text(SITECUSTOMIZE)
        for name in names:
            target = out_dir / f"{name}.json"
            if not target.exists():
                print(f"{name}: training the regression runs", flush=True)
                subprocess.run(
                    [sys.executable, "-m", "tests.training.regression", str(target)],
                    cwd=REPO,
                    env=environment(configs[name], Path(site)),
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
    runs = {name: json.loads((out_dir / f"{name}.json").read_text()) for name in names}
    from tests.training import test_regression

    multiple, floor = test_regression.TOLERANCE_MULTIPLE, test_regression.FLOOR
    pinned = pin(runs, multiple, floor, test_regression.PINNED_METRICS, test_regression.POOLED_METRICS)
    digests = {
        run: sorted(n for n in names[1:] if runs[n][run]["final_digest"] != runs[names[0]][run]["final_digest"])
        for run in runs[names[0]]
    }
    (out_dir / "spread.json").write_text(json.dumps({"spread": pinned["spread"], "digest_differs_in": digests}))
    for run, kinds in pinned["spread"].items():
        line = "  ".join(f"{kind} {value:.2e}" for kind, value in kinds.items())
        print(f"{run:>16}: {line}   digest differs in {len(digests[run])} of {len(names) - 1}")
    if record:
        import platform

        import torch

        capability = torch.backends.cpu.get_cpu_capability()
        measurement = {
            "machine": f"{platform.machine()} {_processor()}, torch CPU capability {capability}",
            "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
            "configurations": {n: configs[n] for n in names},
            "tolerance": f"{multiple} x the largest deviation from the reference, at least {floor}",
            "largest_deviation": pinned["spread"],
        }
        test_regression.PINNED.write_text(json.dumps({"measurement": measurement, "runs": pinned["runs"]}, indent=1))
        print(f"pinned in {test_regression.PINNED}")


def _processor() -> str:
    """The processor's model name (Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


def run_pytest(out_dir: Path, args: list[str]) -> None:
    configs = configurations()
    with tempfile.TemporaryDirectory() as site:
        Path(site, "sitecustomize.py").write_text(SITECUSTOMIZE)
        for name, config in configs.items():
            folder = out_dir / name
            if folder.is_dir():
                continue
            print(f"{name}: the suite", flush=True)
            env = environment(config, Path(site)) | {"MMPT_RECORD_TOLERANCES": str(folder)}
            # two threads per process: one pytest worker, so that the cores are not oversubscribed
            workers = ["-n", "1"] if config["OMP_NUM_THREADS"] != "1" else []
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, *args]
            done = subprocess.run(command, cwd=REPO, env=env)
            if done.returncode not in (0, 1):  # 1: some test failed, which the margins show; else pytest broke
                raise SystemExit(f"{name}: pytest exited with {done.returncode}")
    margins(out_dir)


def margins(out_dir: Path) -> None:
    """Merge the recorded sites of every configuration into margins.json and print the tightest.

    A comparison with a tolerance: its margin is allowed / the largest difference seen anywhere (passing), or the
    smallest difference / allowed (a comparison meant to fail). An explicit bound (`below`, `above`): the distance
    from the value's extreme to the bound, in units of the value's spread over the configurations, and as a ratio.
    """
    close: dict[str, list[float]] = {}
    bounds: dict[str, dict] = {}
    for path in sorted(out_dir.glob("*/*.json")):
        recorded = json.loads(path.read_text())
        for site, (low, high) in recorded["close"].items():
            old = close.get(site, [math.inf, -math.inf])
            close[site] = [min(old[0], low), max(old[1], high)]
        for site, entry in recorded["bounds"].items():
            seen = bounds.setdefault(site, {"kind": entry["kind"], "bound": entry["bound"], "values": []})
            seen["values"].append(entry["value"])
    rows = []
    for site, (low, high) in close.items():
        if high <= 1:
            rows.append({"site": site, "kind": "close", "margin": 1 / high if high > 0 else math.inf, "used": high})
        elif low > 1:
            rows.append({"site": site, "kind": "close, meant to fail", "margin": low, "used": low})
        else:
            rows.append({"site": site, "kind": "close, MIXED", "margin": 0.0, "used": high})
    for site, entry in bounds.items():
        values, bound = entry["values"], entry["bound"]
        extreme = max(values) if entry["kind"] == "below" else min(values)
        distance = (bound - extreme) if entry["kind"] == "below" else (extreme - bound)
        spread = max(values) - min(values)
        rows.append(
            {
                "site": site,
                "kind": entry["kind"],
                "bound": bound,
                "extreme": extreme,
                "spread": spread,
                "spreads_to_bound": distance / spread if spread > 0 else math.inf,
                "margin": bound / extreme if entry["kind"] == "below" and extreme > 0 else extreme / bound,
            }
        )
    rows.sort(key=lambda r: r["margin"])
    (out_dir / "margins.json").write_text(json.dumps(rows, indent=1))
    for row in rows[:60]:
        extra = f"  spreads to bound {row['spreads_to_bound']:.3g}" if "spreads_to_bound" in row else ""
        print(f"{row['margin']:10.3g}x  {row['kind']:22} {row['site']}{extra}")


def main(argv: list[str]) -> None:
    if argv[:1] == ["list"]:
        for name, config in configurations().items():
            print(name, " ".join(f"{k}={v}" for k, v in config.items()))
    elif argv[:1] == ["values"]:
        run_values(Path(argv[1]), argv[2:])
    elif argv[:1] == ["pytest"]:
        run_pytest(Path(argv[1]), argv[2:])
    elif argv[:1] == ["margins"]:
        margins(Path(argv[1]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
