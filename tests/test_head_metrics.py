"""Head-quality metrics against hand-worked cases and brute force."""
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchblend.head_metrics import (expected_calibration_error, failure_auroc, head_quality, pearson,
                                     plot_reliability, reliability_table)


def brute_auroc(pred, true, threshold=0.5):
    bad, good = pred[true < threshold], pred[true >= threshold]
    return np.mean([1.0 if b < g else 0.5 if b == g else 0.0 for b in bad for g in good])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=2, max_size=30))
def test_auroc_equals_pairwise_count_with_ties(pairs):
    pred = np.array([a / 4 for a, _ in pairs])
    true = np.array([b / 4 for _, b in pairs])
    got = failure_auroc(pred, true)
    if (true < 0.5).all() or (true >= 0.5).all():
        assert math.isnan(got)
    else:
        assert got == pytest.approx(brute_auroc(pred, true))


def test_auroc_bounds_and_threshold_boundary():
    true = np.array([0.1, 0.2, 0.8, 0.9])
    assert failure_auroc(true, true) == 1.0  # failures scored lowest
    assert failure_auroc(1 - true, true) == 0.0
    assert failure_auroc(np.full(4, 0.7), true) == 0.5  # constant: chance
    # true Dice of exactly 0.5 is not a failure (true < 0.5)
    assert failure_auroc(np.array([0.1, 0.2]), np.array([0.5, 0.4])) == 0.0
    assert failure_auroc(torch.tensor([0.2, 0.1]), torch.tensor([0.5, 0.4])) == 1.0


def test_reliability_table_and_ece_by_hand():
    pred = np.array([0.05, 0.15, 0.95, 1.0])
    true = np.array([0.0, 0.5, 1.0, 0.5])
    rows = reliability_table(pred, true, bins=10)
    assert [r["count"] for r in rows] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]  # 1.0 lands in the last bin
    assert rows[9]["pred_mean"] == pytest.approx(0.975) and rows[9]["true_mean"] == pytest.approx(0.75)
    assert math.isnan(rows[5]["pred_mean"])
    ece = expected_calibration_error(pred, true, bins=10)
    assert ece == pytest.approx(0.25 * 0.05 + 0.25 * 0.35 + 0.5 * 0.225)
    assert expected_calibration_error(np.array([0.3, 0.3]), np.array([0.3, 0.3])) == 0.0
    assert math.isnan(expected_calibration_error(np.array([]), np.array([])))


def test_pearson_and_quality():
    x = np.linspace(0, 1, 11)
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert math.isnan(pearson(np.full(11, 0.5), x))
    with warnings.catch_warnings():  # the guarded value, not numpy's NaN through a "invalid value" warning
        warnings.simplefilter("error")
        for const in (np.full(11, 0.5), np.full(11, 0.1), np.zeros(11)):
            assert math.isnan(pearson(const, x)) and math.isnan(pearson(x, const))
    q = head_quality(x, x)
    assert q["corr"] == pytest.approx(1) and q["auroc"] == 1.0 and q["ece"] == pytest.approx(0) and q["n"] == 11
    assert q["failure_fraction"] == pytest.approx(5 / 11)


def test_errors():
    with pytest.raises(ValueError, match="same number"):
        pearson([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        failure_auroc([0.1, float("nan")], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability_table([1.5], [0.5])
    with pytest.raises(ValueError, match="bins"):
        reliability_table([0.5], [0.5], bins=0)


def test_plot_reliability(tmp_path):
    pytest.importorskip("matplotlib")
    r = np.random.default_rng(0)
    t = r.random(100)
    path = tmp_path / "rel.png"
    fig = plot_reliability({"good": (t, t), "constant": (np.full(100, 0.8), t)}, str(path))
    assert path.stat().st_size > 1000
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(s.startswith("good (ECE 0.000") for s in labels)
