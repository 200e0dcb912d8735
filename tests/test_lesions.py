"""Lesion gating (patchblend.lesions): hand-worked cases, a brute-force oracle, bad input."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("scipy")

from patchblend import GateThreshold, choose_gate_threshold, gate_lesions  # noqa: E402


def two_blobs_2d():
    p = torch.zeros(8, 8)
    p[1:3, 1:3] = 0.9  # 4 voxels, confidence 0.7
    p[5:8, 5:8] = 0.8  # 9 voxels, confidence 0.2 (one voxel 0.6)
    c = torch.zeros(8, 8)
    c[1:3, 1:3] = 0.7
    c[5:8, 5:8] = 0.2
    c[7, 7] = 0.6
    return p, c


def test_hand_worked_2d_mean_max_prob_mean():
    p, c = two_blobs_2d()
    g = gate_lesions(p, c, 0.5, spatial_dims=2)
    assert g.mask.dtype == torch.bool and g.mask.shape == p.shape
    assert g.mask.sum() == 4 and g.mask[1:3, 1:3].all()
    a, b = g.components
    assert (a.size, a.kept, b.size, b.kept) == (4, True, 9, False)
    assert a.mean == pytest.approx(0.7) and b.mean == pytest.approx((8 * 0.2 + 0.6) / 9)
    assert b.max == pytest.approx(0.6)
    assert g.components_map[1, 1] == 1 and g.components_map[6, 6] == 2 and g.components_map[0, 0] == 0
    # max: the second blob reaches 0.6
    assert gate_lesions(p, c, 0.5, statistic="max", spatial_dims=2).mask.sum() == 13
    # probability-weighted mean: Σ p c / Σ p
    q = p.clone()
    q[7, 7] = 1.0
    w = gate_lesions(q, c, 0.0, statistic="prob_mean", spatial_dims=2).components[1]
    assert w.prob_mean == pytest.approx((8 * 0.8 * 0.2 + 1.0 * 0.6) / (8 * 0.8 + 1.0))


def test_min_size_threshold_and_connectivity():
    p, c = two_blobs_2d()
    assert gate_lesions(p, c, -math.inf, min_size=5, spatial_dims=2).mask.sum() == 9  # the 4-voxel blob goes
    assert gate_lesions(p, c, -math.inf, threshold=0.85, spatial_dims=2).mask.sum() == 4  # 0.8 is not > 0.85
    diag = torch.zeros(4, 4, dtype=torch.bool)
    diag[0, 0] = diag[1, 1] = True
    assert len(gate_lesions(diag, torch.ones(4, 4), 0.0, connectivity=2, spatial_dims=2).components) == 1
    assert len(gate_lesions(diag, torch.ones(4, 4), 0.0, connectivity=1, spatial_dims=2).components) == 2


def test_3d_batch_and_broadcast_confidence():
    m = torch.zeros(2, 5, 5, 5, dtype=torch.bool)
    m[0, 0:2, 0:2, 0:2] = True
    m[1, 3:5, 3:5, 3:5] = True
    c = torch.zeros(5, 5, 5)
    c[3:, 3:, 3:] = 1.0  # shared by both items
    g = gate_lesions(m, c, 0.5)
    assert not g.mask[0].any() and g.mask[1].sum() == 8
    assert [(r.batch, r.id, r.kept) for r in g.components] == [((0,), 1, False), ((1,), 1, True)]


def test_label_map_gates_each_class():
    lab = torch.zeros(6, 6, dtype=torch.int64)
    lab[0:2, 0:2] = 1
    lab[2:4, 0:2] = 2  # touches class 1 but is its own component
    lab[4:6, 4:6] = 1
    c = torch.zeros(6, 6)
    c[0:2, 0:2] = 0.9
    c[2:4, 0:2] = 0.1
    c[4:6, 4:6] = 0.9
    g = gate_lesions(lab, c, 0.5, spatial_dims=2)
    assert g.mask.dtype == torch.int64
    expect = lab.clone()
    expect[2:4, 0:2] = 0
    assert torch.equal(g.mask, expect)
    assert sorted((r.label, r.kept) for r in g.components) == [(1, True), (1, True), (2, False)]
    assert len(set(g.components_map[lab > 0].tolist())) == 3


def brute_gate(mask, conf, tau, min_size):
    """Flood fill with 26-connectivity and a loop per component."""
    seen = np.zeros(mask.shape, bool)
    keep = np.zeros(mask.shape, bool)
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        comp, stack = [], [start]
        seen[start] = True
        while stack:
            v = stack.pop()
            comp.append(v)
            for d in np.ndindex(3, 3, 3):
                u = tuple(int(a) + b - 1 for a, b in zip(v, d))
                if all(0 <= x < n for x, n in zip(u, mask.shape)) and mask[u] and not seen[u]:
                    seen[u] = True
                    stack.append(u)
        if len(comp) >= min_size and np.mean([conf[v] for v in comp]) >= tau:
            for v in comp:
                keep[v] = True
    return keep


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 1.0), st.integers(0, 4), st.sampled_from(["cpu_float", "bool"]))
def test_matches_brute_force_3d(seed, tau, min_size, kind):
    r = np.random.default_rng(seed)
    prob = r.random((5, 6, 4)) * (r.random((5, 6, 4)) < 0.4)
    conf = np.round(r.random((5, 6, 4)), 2)
    pred = torch.from_numpy(prob) if kind == "cpu_float" else torch.from_numpy(prob > 0.5)
    g = gate_lesions(pred, torch.from_numpy(conf), tau, min_size=min_size)
    expect = brute_gate(prob > 0.5, conf, tau, min_size)
    assert np.array_equal(g.mask.numpy(), expect)
    assert sum(r.size for r in g.components) == int((prob > 0.5).sum())
    # the kept mask never adds foreground
    assert not (g.mask.numpy() & ~(prob > 0.5)).any()


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(prediction=np.zeros((4, 4))), TypeError, "prediction must be a torch.Tensor"),
    (dict(confidence=torch.zeros(3, 3)), ValueError, "confidence"),
    (dict(confidence=torch.full((4, 4), math.nan)), ValueError, "confidence must be finite"),
    (dict(statistic="median"), ValueError, "statistic must be one of"),
    (dict(prediction=torch.zeros(4, 4, dtype=torch.bool), statistic="prob_mean"), ValueError, "prob_mean"),
    (dict(tau=math.nan), ValueError, "tau"),
    (dict(tau="0.5"), TypeError, "tau"),
    (dict(min_size=-1), ValueError, "min_size"),
    (dict(connectivity=3), ValueError, "connectivity"),
    (dict(spatial_dims=4), ValueError, "spatial_dims"),
    (dict(prediction=torch.zeros(4)), ValueError, "prediction must have at least"),
])
def test_bad_input_names_the_argument(kwargs, error, pattern):
    args = dict(prediction=torch.zeros(4, 4), confidence=torch.zeros(4, 4), tau=0.5, spatial_dims=2)
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        gate_lesions(args.pop("prediction"), args.pop("confidence"), args.pop("tau"), **args)


def test_import_patchblend_does_not_import_scipy():
    code = "import sys, patchblend; assert 'scipy' not in sys.modules, 'scipy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_choose_threshold_by_hand():
    cand = [0.0, 0.1, 0.2, 0.3]
    # every case keeps its lesion up to 0.2, loses it at 0.3
    det = np.array([[1, 1, 1, 0]] * 5)
    t = choose_gate_threshold(cand, det, np.ones(5), n_boot=50)
    assert isinstance(t, GateThreshold)
    assert (t.tau, t.low, t.high, t.kept_fraction, t.coverage) == (0.2, 0.2, 0.2, 1.0, 1.0)
    # one case of 20 loses its lesion at 0.2: 95% of the lesions kept on all cases, but in under 90% of
    # the resamples, so the rule steps back to 0.1
    det = np.array([[1, 1, 1, 0]] * 19 + [[1, 1, 0, 0]])
    t = choose_gate_threshold(cand, det, np.ones(20), keep=0.95, coverage=0.9, n_boot=2000)
    assert t.tau == 0.1 and t.low == 0.1 and t.high == 0.2
    assert choose_gate_threshold(cand, det, np.ones(20), keep=0.95, coverage=0.5, n_boot=2000).tau == 0.2
    # no candidate meets the floor: the smallest
    assert choose_gate_threshold(cand, np.zeros((3, 4)), np.ones(3)).tau == 0.0


def test_choose_threshold_bad_input():
    with pytest.raises(ValueError, match="detected must have shape"):
        choose_gate_threshold([0, 1], np.zeros((3, 3)), np.ones(3))
    with pytest.raises(ValueError, match="keep"):
        choose_gate_threshold([0, 1], np.zeros((3, 2)), np.ones(3), keep=1.5)
    with pytest.raises(ValueError, match="candidates"):
        choose_gate_threshold([], np.zeros((3, 0)), np.ones(3))
    with pytest.raises(ValueError, match="n_boot"):
        choose_gate_threshold([0, 1], np.zeros((3, 2)), np.ones(3), n_boot=0)
