"""Δm is the relative change the user asked for: better is positive whatever the sign of the reference, and a
metric counts once."""

from __future__ import annotations

import pytest

from mmpt.analysis.compare import compare_runs
from mmpt.analysis.delta_m import delta_m
from mmpt.errors import MmptError
from mmpt.evaluation.metrics import relative_change


def test_a_run_better_on_one_dataset_and_equal_elsewhere_has_a_positive_delta_m_whatever_the_reference_sign():
    for reference_kappa in (-0.1, 0.1):
        reference = {"a": {"kappa": reference_kappa}, "b": {"kappa": 0.5}}
        better = {"a": {"kappa": reference_kappa + 0.3}, "b": {"kappa": 0.5}}
        # LibMTL's (M − M_ref) / M_ref would make the first −150 %: a better run reported worse
        assert delta_m(reference, better, ["kappa"]) == pytest.approx(100 * 0.3 / abs(reference_kappa) / 2)
    # lower is better for mae and the calibration metrics: a drop is an improvement
    assert relative_change("mae", 1.0, 0.5) == pytest.approx(0.5)
    assert relative_change("ece", 0.2, 0.1) == pytest.approx(0.5)
    assert relative_change("auc", 0.0, 0.5) != relative_change("auc", 0.0, 0.5)  # NaN where the reference is 0


def test_a_metric_named_twice_is_refused_before_anything_is_read(tmp_path):
    with pytest.raises(MmptError, match="--metrics names auc more than once"):
        compare_runs([tmp_path / "a", tmp_path / "b"], metrics=["auc", "acc", "auc"])
