"""How much of each numeric tolerance in the suite a run uses: the measurement behind every bound.

With MMPT_RECORD_TOLERANCES=DIR in the environment, tests/conftest.py installs wrappers around the comparisons
the suite makes with a tolerance (torch.allclose, torch.testing.assert_close, numpy's allclose and
assert_allclose, pytest.approx). For every call site in tests/ they keep the smallest and largest *used fraction*:
max |actual - expected| / allowed, where allowed is the comparison's own atol + rtol·|expected|. A fraction under 1
passes; a comparison meant to fail (`assert not torch.allclose(...)`) has one above 1. The explicit bounds of the
suite are written `assert below(gap, 1e-5)` and `assert above(auc, 0.65)`: each records the value it saw (the largest
under `below`, the smallest under `above`) and its bound, so that the value's spread over the kernel
configurations can be set beside the distance to the bound. Each pytest worker writes its sites to DIR/<worker>.json
at the end of the session; `python -m tests.kernel_configs pytest` runs the suite under every kernel configuration
this machine has and reports the sites by their margin.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

VARIABLE = "MMPT_RECORD_TOLERANCES"
TESTS = str(Path(__file__).resolve().parent)
_sites: dict[str, list[float]] = {}  # "file:line function" -> [smallest, largest used fraction]
_bounds: dict[str, dict] = {}  # "file:line function" -> {"kind": "below" | "above", "bound", "value": the extreme}


def _site() -> str | None:
    """The innermost frame in a test module (not this one): where the comparison is written."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(TESTS) and not name.endswith("tolerances.py"):
            return f"{os.path.relpath(name, Path(TESTS).parent)}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return None


def _note(fraction: float) -> None:
    if not _installed:
        return
    site = _site()
    if site is None or math.isnan(fraction):
        return
    low, high = _sites.get(site, [math.inf, -math.inf])
    _sites[site] = [min(low, fraction), max(high, fraction)]


def _fraction(actual, expected, rtol: float, atol: float) -> float:
    a = np.asarray(actual.detach().cpu().double() if isinstance(actual, torch.Tensor) else actual, dtype=float)
    e = np.asarray(expected.detach().cpu().double() if isinstance(expected, torch.Tensor) else expected, dtype=float)
    a, e = np.broadcast_arrays(a, e)
    finite = np.isfinite(a) & np.isfinite(e)
    if not finite.any():
        return 0.0
    allowed = atol + rtol * np.abs(e[finite])
    difference = np.abs(a[finite] - e[finite])
    with np.errstate(divide="ignore", invalid="ignore"):
        used = np.where(allowed > 0, difference / allowed, np.where(difference > 0, np.inf, 0.0))
    return float(used.max())


def _note_bound(kind: str, value: float, bound: float) -> None:
    site = _site() if _installed else None
    if site is None:
        return
    entry = _bounds.setdefault(site, {"kind": kind, "bound": bound, "value": value})
    entry["value"] = max(entry["value"], value) if kind == "below" else min(entry["value"], value)


def below(value: float, bound: float) -> bool:
    """`value < bound`, its value recorded (the largest its site saw) when the suite records its tolerances."""
    _note_bound("below", float(value), bound)
    return value < bound


def above(value: float, bound: float) -> bool:
    """`value > bound`, its value recorded (the smallest its site saw) when the suite records its tolerances."""
    _note_bound("above", float(value), bound)
    return value > bound


_installed = False


def install() -> None:
    """Wrap the suite's comparisons so that each records its used fraction (only when VARIABLE is set)."""
    global _installed
    import pytest

    ApproxScalar = type(pytest.approx(1.0))

    def torch_allclose(real):
        def allclose(a, b, rtol=1e-5, atol=1e-8, equal_nan=False):
            _note(_fraction(a, b, rtol, atol))
            return real(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan)

        return allclose

    def numpy_allclose(real):
        def allclose(a, b, rtol=1e-5, atol=1e-8, equal_nan=False):
            _note(_fraction(a, b, rtol, atol))
            return real(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan)

        return allclose

    def assert_allclose(real):
        def check(actual, desired, rtol=1e-7, atol=0, **kwargs):
            _note(_fraction(actual, desired, rtol, atol))
            return real(actual, desired, rtol=rtol, atol=atol, **kwargs)

        return check

    def assert_close(real):
        def check(actual, expected, *args, rtol=None, atol=None, **kwargs):
            if rtol is not None and atol is not None:
                _note(_fraction(actual, expected, rtol, atol))
            return real(actual, expected, *args, rtol=rtol, atol=atol, **kwargs)

        return check

    real_eq = ApproxScalar.__eq__

    def approx_eq(self, actual):
        result = real_eq(self, actual)
        try:
            tolerance = self.tolerance
            difference = abs(self.expected - actual)
            _note(float(difference / tolerance) if tolerance else (0.0 if difference == 0 else math.inf))
        except (TypeError, ValueError, OverflowError):
            pass
        return result

    torch.allclose = torch_allclose(torch.allclose)
    np.allclose = numpy_allclose(np.allclose)
    np.testing.assert_allclose = assert_allclose(np.testing.assert_allclose)
    torch.testing.assert_close = assert_close(torch.testing.assert_close)
    ApproxScalar.__eq__ = approx_eq
    assert pytest.approx(1.0) == 1.0  # the wrapper works on this pytest (before recording starts)
    _installed = True


def write(folder: Path, worker: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{worker}.json").write_text(json.dumps({"close": _sites, "bounds": _bounds}, indent=1))
