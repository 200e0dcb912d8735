"""The blended confidence map C (confidence=True): exact against the pure-PyTorch reference, the prediction unchanged.

The reference: C is the blend (patchblend._reference.blend_reference, one slice-add per window) of the patches
A_i = α_i (each window's weight spread over its voxels) without weights, with the importance only under
normalize="weight": Σ α / N under "count", Σ α·imp / Σ imp under "weight", 0 where nothing covers. Bitwise where the
prediction is bitwise ``calibrated_blend`` (stream mode, slab mode along axis 0); to float32 rounding where the
windows are visited in another order (slab mode along another axis) or summed batch by batch (Blender).

``PATCHBLEND_BACKEND=reference`` runs the kernel-free backend: the last test reruns the exact tests under it.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import patchblend
from patchblend import CalibratedOutput, PredictionWithConfidence, _reference as ref
from patchblend.inference import (Blender, LatticeBlender, SlabBlender, importance_map, sliding_window_inference,
                                  sliding_windows)
from patchblend.inference.sliding_window import _window_plan

EXAMPLES = int(os.environ.get("PB_CONFIDENCE_EXAMPLES", "25"))


def scored(grid_shape):
    """A predictor with two output channels and scores from the window itself: patch = mean |x| + 0.05 [n], grid =
    cell means of |x| [n, *grid_shape] (grid_shape clipped to the window)."""

    def predictor(win):
        nd = win.dim() - 2
        seg = torch.cat([win.sin(), (win[:, :1] * 2).tanh()], 1)
        patch = win.abs().flatten(1).mean(1) + 0.05
        g = tuple(min(a, p) for a, p in zip(grid_shape, win.shape[2:]))
        pool = F.adaptive_avg_pool3d if nd == 3 else F.adaptive_avg_pool2d
        grid = pool(win.abs().mean(1, keepdim=True), g)[:, 0] + 0.01
        return CalibratedOutput(seg, patch, grid)

    return predictor


def window_weights(out: CalibratedOutput, weighting: str) -> torch.Tensor:
    nd = out.grid.dim() - 1
    return {"patch": out.patch, "grid": out.grid,
            "patch*grid": out.patch.reshape(-1, *([1] * nd)) * out.grid}[weighting]


def reference_confidence(weights, coords, roi, out_shape, normalize, importance, dtype=torch.float32):
    """C from patchblend._reference: blend_reference of A (the weights spread over the windows, in the accumulation
    ``dtype``), in the canonical 3D form; ``importance`` only under "weight"."""
    nd = len(roi)
    n = coords.shape[0]
    w = weights.to(dtype)
    cells = w.reshape(n, *([1] * nd)) if w.dim() == 1 else w
    a = ref.expand_grid_weights(cells.expand(n, *([1] * nd)) if w.dim() == 1 else cells, roi)[:, None]
    imp = importance.to(dtype) if normalize == "weight" and importance is not None else None
    if nd == 2:
        a, coords = a.unsqueeze(2), F.pad(coords, (1, 0))
        imp = None if imp is None else imp.unsqueeze(0)
    c = ref.blend_reference(a, None, coords, imp, (1,) * (3 - nd) + tuple(out_shape), normalize)
    return c.squeeze(1) if nd == 2 else c  # [1, *out_shape]


def driver_reference(x, roi, overlap, predictor, weighting, normalize, mode, placement="monai"):
    """[B, 1, *S]: every window of the driver's lattice (image coordinates, zeros outside), scored, then C (in the
    driver's accumulation dtype)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    nd = x.dim() - 2
    plan = _window_plan(tuple(x.shape[2:]), tuple(roi), (float(overlap),) * nd, placement, 0)
    imp = None if mode == "constant" else importance_map(tuple(roi), mode)
    outs = []
    for b in range(x.shape[0]):
        win = patchblend.extract_patches(x[b], plan.coords, roi)
        w = window_weights(predictor(win), weighting)
        outs.append(reference_confidence(w, plan.coords, roi, x.shape[2:], normalize, imp, acc))
    return torch.stack(outs)


def assert_exact_or_close(got, expected, exact: bool, what=""):
    assert got.shape == expected.shape and got.dtype == expected.dtype, (what, got.shape, expected.shape)
    if exact:
        assert torch.equal(got, expected), f"{what}: max diff {(got - expected).abs().max().item()}"
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=what)


# ---- hand-worked --------------------------------------------------------------------------------------------------

def test_hand_worked_two_windows():
    # 2D 1x10 image, windows of 1x6 at x = 0 and 4 (overlap 2): patch scores 0.2 and 0.8
    x = torch.ones(1, 1, 1, 10)
    scores = iter([torch.tensor([0.2]), torch.tensor([0.8])])

    def pred(win):
        return CalibratedOutput(win * 3, next(scores), None)

    got = sliding_window_inference(x, (1, 6), 1, pred, 1 / 3, weighting="patch", confidence=True)
    assert isinstance(got, PredictionWithConfidence) and isinstance(got, tuple)
    expected = torch.tensor([0.2] * 4 + [0.5] * 2 + [0.8] * 4).view(1, 1, 1, 10)
    torch.testing.assert_close(got.confidence, expected, rtol=0, atol=1e-7)
    # Eq. 1 prediction beside it: 3·α / N
    torch.testing.assert_close(got.prediction, 3 * expected, rtol=0, atol=1e-6)
    scores = iter([torch.tensor([0.2]), torch.tensor([0.8])])
    avg = sliding_window_inference(x, (1, 6), 1, pred, 1 / 3, weighting="patch", confidence=True,
                                   weigh_prediction=False)
    torch.testing.assert_close(avg.prediction, torch.full((1, 1, 1, 10), 3.0))  # the plain average
    torch.testing.assert_close(avg.confidence, expected, rtol=0, atol=1e-7)


def test_uncovered_voxels_are_zero_and_weight_mode_is_importance_weighted():
    coords = torch.tensor([[0], [2], [8]])  # voxels 6, 7 uncovered
    for normalize in ("count", "weight"):
        imp = torch.tensor([1.0, 2.0, 3.0, 4.0])
        b = Blender((1, 12), 1, normalize=normalize, importance=imp.view(1, 4), confidence=True)
        b.add(torch.zeros(3, 1, 1, 4), F.pad(coords, (1, 0)), torch.tensor([0.5, 1.0, 0.25]))
        c = b.finalize_with_confidence().confidence[0, 0]
        assert c[6] == 0 and c[7] == 0
        if normalize == "count":  # Σα / N: voxel 2 is covered by windows 0 and 1
            assert c[2].item() == pytest.approx(0.75) and c[0].item() == pytest.approx(0.5)
        else:  # voxel 2: (0.5·3 + 1.0·1) / (3 + 1)
            assert c[2].item() == pytest.approx(2.5 / 4) and c[9].item() == pytest.approx(0.25)


# ---- the driver, hypothesis over geometries, weights, modes, normalize, stream and slab mode -------------------------

@st.composite
def driver_cases(draw):
    nd = draw(st.sampled_from([2, 3, 3]))
    shape = tuple(draw(st.integers(3, 14)) for _ in range(nd))
    roi = tuple(draw(st.integers(2, 9)) for _ in range(nd))
    return dict(
        nd=nd, shape=shape, roi=roi, batch=draw(st.integers(1, 2)),
        overlap=draw(st.sampled_from([0.0, 0.25, 0.5, 0.7])), bs=draw(st.integers(1, 5)),
        mode=draw(st.sampled_from(["constant", "gaussian"])),
        weighting=draw(st.sampled_from(["patch", "grid", "patch*grid"])),
        normalize=draw(st.sampled_from([None, "count", "weight"])),
        weigh_prediction=draw(st.booleans()),
        slab_axis=draw(st.sampled_from([None, None, 0, nd - 1])),
        reduce=draw(st.sampled_from([None, None, "argmax", "threshold"])),
        grid=tuple(draw(st.integers(1, 3)) for _ in range(nd)),
        placement=draw(st.sampled_from(["monai", "monai", "nnunet"])),  # nnunet: repeated starts at times
        seed=draw(st.integers(0, 1000)))


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=driver_cases())
def test_driver_confidence_exact_and_prediction_unchanged(case):
    x = torch.rand((case["batch"], 1, *case["shape"]), generator=torch.Generator().manual_seed(case["seed"])) - 0.3
    pred = scored(case["grid"])
    kw = dict(mode=case["mode"], normalize=case["normalize"], slab_axis=case["slab_axis"], reduce=case["reduce"],
              threshold=0.2, placement=case["placement"])
    with torch.no_grad():
        got = sliding_window_inference(x, case["roi"], case["bs"], pred, case["overlap"], weighting=case["weighting"],
                                       confidence=True, weigh_prediction=case["weigh_prediction"], **kw)
        # the prediction is exactly what the call without confidence returns (weighting=None when not weighed)
        plain = sliding_window_inference(x, case["roi"], case["bs"], pred, case["overlap"],
                                         weighting=case["weighting"] if case["weigh_prediction"] else None, **kw)
    assert isinstance(got, PredictionWithConfidence)
    assert got.prediction.dtype == plain.dtype and torch.equal(got.prediction, plain)
    normalize = case["normalize"] or ("count" if case["weigh_prediction"] else "weight")
    expected = driver_reference(x, case["roi"], case["overlap"], pred, case["weighting"], normalize, case["mode"],
                                case["placement"])
    strict = _window_plan(case["shape"], case["roi"], (float(case["overlap"]),) * case["nd"], case["placement"],
                          0).image_grid.is_strict
    assert got.confidence.shape == (case["batch"], 1, *case["shape"]) and got.confidence.dtype == torch.float32
    # other slab axes visit the windows in another order; slabs of a non-strict lattice sum batch by batch
    exact = case["slab_axis"] is None or (case["slab_axis"] == 0 and strict)
    assert_exact_or_close(got.confidence, expected, exact, str(case))


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_unweighted_prediction_equals_weighting_none_bitwise(mode):
    x = torch.rand(2, 1, 13, 11, 12, generator=torch.Generator().manual_seed(3))
    pred = scored((2, 2, 2))
    for normalize in (None, "count", "weight"):
        for slab_axis in (None, 0):
            got = sliding_window_inference(x, (6, 5, 7), 3, pred, 0.5, mode, weighting="patch*grid",
                                           normalize=normalize, slab_axis=slab_axis, confidence=True,
                                           weigh_prediction=False)
            plain = sliding_window_inference(x, (6, 5, 7), 3, pred, 0.5, mode, normalize=normalize,
                                             slab_axis=slab_axis)
            assert torch.equal(got.prediction, plain), (normalize, slab_axis)
    # with the defaults, the average prediction is MONAI's (normalize="weight"), the confidence Σ α·imp / Σ imp
    got = sliding_window_inference(x, (6, 5, 7), 3, pred, 0.5, mode, weighting="grid", confidence=True,
                                   weigh_prediction=False)
    assert torch.equal(got.prediction, sliding_window_inference(x, (6, 5, 7), 3, pred, 0.5, mode))
    assert torch.equal(got.confidence, driver_reference(x, (6, 5, 7), 0.5, pred, "grid", "weight", mode))


def test_constant_mode_weight_and_count_give_the_same_confidence():
    x = torch.rand(1, 1, 14, 12, 10, generator=torch.Generator().manual_seed(1))
    pred = scored((2, 2, 2))
    a = sliding_window_inference(x, 6, 2, pred, 0.5, weighting="grid", normalize="count", confidence=True)
    b = sliding_window_inference(x, 6, 2, pred, 0.5, weighting="grid", normalize="weight", confidence=True)
    assert torch.equal(a.confidence, b.confidence)


def test_multi_output_confidence_at_the_first_outputs_resolution():
    x = torch.rand(1, 1, 16, 12, 12, generator=torch.Generator().manual_seed(2))
    base = scored((2, 2, 2))

    def two(win):
        out = base(win)
        return CalibratedOutput({"b_half": out.seg[:, :, ::2, ::2, ::2], "a_full": out.seg}, out.patch, out.grid)

    def two_tuple(win):
        out = base(win)
        return CalibratedOutput((out.seg[:, :, ::2, ::2, ::2], out.seg), out.patch, out.grid)

    got = sliding_window_inference(x, 8, 3, two, 0.5, weighting="patch*grid", confidence=True)
    single = sliding_window_inference(x, 8, 3, base, 0.5, weighting="patch*grid", confidence=True)
    assert set(got.prediction) == {"a_full", "b_half"}
    assert torch.equal(got.prediction["a_full"], single.prediction)
    assert torch.equal(got.confidence, single.confidence)  # "a_full" is the first key in sorted order
    got_t = sliding_window_inference(x, 8, 3, two_tuple, 0.5, weighting="grid", confidence=True)
    assert got_t.confidence.shape == (1, 1, 8, 6, 6)  # the tuple's first output, at half resolution
    assert torch.equal(got_t.prediction[1], sliding_window_inference(x, 8, 3, base, 0.5, weighting="grid"))


def test_reduce_gives_float_confidence_and_integer_input_the_predictors_dtype():
    x = torch.rand(1, 1, 12, 10, 9, generator=torch.Generator().manual_seed(4))
    pred = scored((2, 2, 2))
    full = sliding_window_inference(x, 6, 2, pred, 0.5, weighting="grid", confidence=True)
    for reduce in ("argmax", "threshold"):
        for slab_axis in (None, 0):
            got = sliding_window_inference(x, 6, 2, pred, 0.5, weighting="grid", confidence=True, reduce=reduce,
                                           slab_axis=slab_axis)
            assert got.prediction.dtype in (torch.int64, torch.bool)
            assert torch.equal(got.confidence, full.confidence)
    xi = (x * 100).to(torch.int32)

    def half_pred(win):
        out = pred(win.float())
        return CalibratedOutput(out.seg.double(), out.patch, out.grid)

    got = sliding_window_inference(xi, 6, 2, half_pred, 0.5, weighting="grid", confidence=True, reduce="argmax")
    assert got.confidence.dtype == torch.float64  # the predictor's float dtype, as the unreduced prediction's


def test_float64_and_1d_and_gradients():
    x64 = torch.rand(1, 1, 11, 9, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pred = scored((2, 2, 2))
    got = sliding_window_inference(x64, 5, 2, pred, 0.5, weighting="patch*grid", confidence=True)
    assert got.confidence.dtype == torch.float64
    assert torch.equal(got.confidence, driver_reference(x64, (5, 5, 5), 0.5, pred, "patch*grid", "count", "constant"))
    # 1D (the plain PyTorch accumulator): windows of 4 at 0, 2, 4, 6 on 10 voxels, patch scores 1, 2, 3, 4
    x1 = torch.zeros(1, 1, 10)
    counter = iter(range(1, 5))
    got1 = sliding_window_inference(x1, 4, 1, lambda w: CalibratedOutput(w, torch.tensor([float(next(counter))]),
                                                                          None), 0.5, weighting="patch",
                                    confidence=True)
    expected = torch.tensor([1, 1, 1.5, 1.5, 2.5, 2.5, 3.5, 3.5, 4, 4]).view(1, 1, 10)
    torch.testing.assert_close(got1.confidence, expected)
    # 1D grid scores [n, 2] under "weight" with importance [1, 3, 3, 1] (cells of 2 voxels: scores k, 2k)
    counter = iter(range(1, 5))
    got1 = sliding_window_inference(
        x1, 4, 1, lambda w: CalibratedOutput(w, None, torch.tensor([[1.0, 2.0]]) * next(counter)), 0.5,
        weighting="grid", normalize="weight", roi_weight_map=torch.tensor([1.0, 3.0, 3.0, 1.0]), confidence=True)
    alpha = [[1, 1, 2, 2], [2, 2, 4, 4], [3, 3, 6, 6], [4, 4, 8, 8]]  # per window, per voxel
    imp = [1, 3, 3, 1]
    num, den = [0.0] * 10, [0.0] * 10
    for i, s in enumerate((0, 2, 4, 6)):
        for k in range(4):
            num[s + k] += alpha[i][k] * imp[k]
            den[s + k] += imp[k]
    torch.testing.assert_close(got1.confidence, (torch.tensor(num) / torch.tensor(den)).view(1, 1, 10))
    # with autograd on: the confidence map is differentiable in the scores and equals the no-grad one
    scale = torch.tensor(2.0, requires_grad=True)

    def pred_grad(win):
        out = pred(win)
        return CalibratedOutput(out.seg, out.patch * scale, out.grid)

    x = x64.float()
    g = sliding_window_inference(x, 5, 2, pred_grad, 0.5, weighting="patch", confidence=True,
                                 weigh_prediction=False)
    assert g.confidence.requires_grad
    with torch.no_grad():
        ng = sliding_window_inference(x, 5, 2, pred_grad, 0.5, weighting="patch", confidence=True,
                                      weigh_prediction=False)
    torch.testing.assert_close(g.confidence.detach(), ng.confidence)
    (grad,) = torch.autograd.grad(g.confidence.sum(), scale)
    torch.testing.assert_close(grad, ng.confidence.sum() / 2.0, rtol=1e-5, atol=1e-5)


# ---- the blenders --------------------------------------------------------------------------------------------------

@st.composite
def lattice_cases(draw):
    nd = draw(st.sampled_from([2, 3]))
    out_shape = tuple(draw(st.integers(2, 12)) for _ in range(nd))
    window = tuple(draw(st.integers(1, 6)) for _ in range(nd))
    axes = []
    for o, p in zip(out_shape, window):
        step = draw(st.integers(1, p + 2))
        first = draw(st.integers(-p + 1, 1))
        count = draw(st.integers(1, max(1, (o - first) // step + 1)))
        axes.append([first + k * step for k in range(count)])
    return dict(nd=nd, out_shape=out_shape, window=window, axes=axes,
                weights=draw(st.sampled_from(["patch", "grid"])), normalize=draw(st.sampled_from(["count", "weight"])),
                importance=draw(st.booleans()), weigh_prediction=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.float16])),
                batch=draw(st.integers(1, 4)), seed=draw(st.integers(0, 1000)))


def lattice_inputs(case):
    import itertools
    g = torch.Generator().manual_seed(case["seed"])
    coords = torch.tensor(list(itertools.product(*case["axes"])), dtype=torch.int64).reshape(-1, case["nd"])
    n = coords.shape[0]
    patches = (torch.rand((n, 2, *case["window"]), generator=g) - 0.2).to(case["dtype"])
    if case["weights"] == "patch":
        weights = torch.rand(n, generator=g)
    else:
        weights = torch.rand((n, *[min(2, p) for p in case["window"]]), generator=g)
    imp = importance_map(case["window"], "gaussian") if case["importance"] else None
    return coords, patches, weights, imp


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=lattice_cases())
def test_blenders_confidence_exact(case):
    coords, patches, weights, imp = lattice_inputs(case)
    n, nd = coords.shape[0], case["nd"]
    acc = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    expected = reference_confidence(weights, coords, case["window"], case["out_shape"], case["normalize"], imp, acc)
    wp, normalize = case["weigh_prediction"], case["normalize"]
    pred_weights = weights if wp else None
    if not (normalize == "weight" and pred_weights is not None):  # LatticeBlender: no weights in the denominator
        lb = LatticeBlender(case["out_shape"], 2, coords, case["window"], normalize=normalize, importance=imp,
                            dtype=acc, confidence=True, weigh_prediction=wp)
        plain = LatticeBlender(case["out_shape"], 2, coords, case["window"], normalize=normalize, importance=imp,
                               dtype=acc)
        for i in range(0, n, case["batch"]):
            lb.add(patches[i:i + case["batch"]], weights[i:i + case["batch"]])
            plain.add(patches[i:i + case["batch"]], None if pred_weights is None else pred_weights[i:i + case["batch"]])
        got = lb.finalize_with_confidence()
        assert torch.equal(got.prediction, plain.finalize())
        assert_exact_or_close(got.confidence, expected, True, "LatticeBlender")
    # Blender, one window at a time: bitwise calibrated_blend of the windows in order; in batches: to rounding
    for batch in (1, case["batch"]):
        b = Blender(case["out_shape"], 2, normalize=normalize, importance=imp, window_shape=case["window"], dtype=acc,
                    confidence=True, weigh_prediction=wp)
        plain = Blender(case["out_shape"], 2, normalize=normalize, importance=imp, window_shape=case["window"],
                        dtype=acc)
        for i in range(0, n, batch):
            b.add(patches[i:i + batch], coords[i:i + batch], weights[i:i + batch])
            plain.add(patches[i:i + batch], coords[i:i + batch], None if pred_weights is None else
                      pred_weights[i:i + batch])
        got = b.finalize_with_confidence()
        assert torch.equal(got.prediction, plain.finalize())
        assert_exact_or_close(got.confidence, expected, batch == 1, f"Blender batch {batch}")
    # SlabBlender along axis 0 in raster order, accumulated denominator and window lattice (stream mode)
    for lattice in (None, case["axes"]):
        if lattice is not None and normalize == "weight" and pred_weights is not None:
            continue
        sb = SlabBlender(case["out_shape"], 2, normalize=normalize, importance=imp, window_shape=case["window"],
                         dtype=acc, window_lattice=lattice, confidence=True, weigh_prediction=wp)
        plain = SlabBlender(case["out_shape"], 2, normalize=normalize, importance=imp, window_shape=case["window"],
                            dtype=acc, window_lattice=lattice)
        starts = coords[:, 0].tolist()
        i = 0
        while i < n:
            j = i + 1
            while j < n and starts[j] == starts[i]:
                j += 1
            sb.add(patches[i:j], coords[i:j], weights[i:j])
            plain.add(patches[i:j], coords[i:j], None if pred_weights is None else pred_weights[i:j])
            if j < n:
                sb.finalize_until(starts[j])
                plain.finalize_until(starts[j])
            i = j
        got = sb.finish_with_confidence()
        assert torch.equal(got.prediction, plain.finish())
        assert_exact_or_close(got.confidence, expected, lattice is not None, f"SlabBlender lattice={lattice}")


def test_slab_confidence_stays_one_window_deep():
    # windows one row at a time along axis 0 with argmax: the confidence slab is one channel, one window deep
    out_shape, win = (40, 12, 10), (8, 12, 10)
    starts = torch.arange(0, 33, 4)
    coords = torch.stack([starts, torch.zeros_like(starts), torch.zeros_like(starts)], 1)
    patches = torch.rand(len(starts), 4, *win, generator=torch.Generator().manual_seed(0))
    scores = torch.rand(len(starts), 2, 2, 2, generator=torch.Generator().manual_seed(1))
    for normalize, weigh in (("count", True), ("weight", False)):  # ("weight" with weights: not on a lattice)
        imp = importance_map(win, "gaussian")
        full = Blender(out_shape, 4, normalize=normalize, importance=imp, confidence=True, weigh_prediction=weigh)
        slab = SlabBlender(out_shape, 4, normalize=normalize, importance=imp, reduce="argmax", confidence=True,
                           weigh_prediction=weigh, window_lattice=[starts.tolist(), [0], [0]])
        for i in range(len(starts)):
            full.add(patches[i:i + 1], coords[i:i + 1], scores[i:i + 1])
            slab.add(patches[i:i + 1], coords[i:i + 1], scores[i:i + 1])
            slab.finalize_until(int(coords[i + 1, 0]) if i + 1 < len(starts) else 40)
        labels, conf = slab.finish_with_confidence()
        expected = full.finalize_with_confidence()
        assert torch.equal(labels, expected.prediction.argmax(0, keepdim=True))
        assert torch.equal(conf, expected.confidence) and conf.dtype == torch.float32
        assert slab._confidence.peak_buffer_bytes == 1 * 8 * 12 * 10 * 4  # one channel, one window deep


def test_blender_option_off_is_unchanged_and_errors():
    b = Blender((8, 8), 1, normalize="count")
    assert b._confidence is None and b.weigh_prediction
    with pytest.raises(RuntimeError, match="confidence=True"):
        b.finalize_with_confidence()
    with pytest.raises(ValueError, match="weigh_prediction=False needs confidence=True"):
        Blender((8, 8), 1, weigh_prediction=False)
    with pytest.raises(ValueError, match="confidence=True needs normalize"):
        LatticeBlender((8, 8), 1, torch.tensor([[0, 0]]), (8, 8), normalize="none", confidence=True)
    with pytest.raises(TypeError, match="confidence must be True or False"):
        SlabBlender((8, 8), 1, confidence="yes")
    with pytest.raises(RuntimeError, match="confidence=True"):
        SlabBlender((8, 8), 1).finish_with_confidence()
    # bad weights are named also when they go only into the confidence map
    for normalize in ("count", "weight"):
        bl = Blender((8, 8), 1, normalize=normalize, confidence=True, weigh_prediction=False)
        with pytest.raises(ValueError, match="weights"):
            bl.add(torch.ones(1, 1, 4, 4), torch.tensor([[0, 0]]), torch.tensor([-1.0]))
        with pytest.raises(ValueError, match="weights"):
            bl.add(torch.ones(1, 1, 4, 4), torch.tensor([[0, 0]]), torch.ones(1, 5, 4))
    # LatticeBlender under "weight": weights only go in with weigh_prediction=False
    lat = LatticeBlender((8, 8), 1, torch.tensor([[0, 0]]), (8, 8), normalize="weight", confidence=True)
    with pytest.raises(ValueError, match="normalize='weight'"):
        lat.add(torch.ones(1, 1, 8, 8), torch.tensor([0.5]))
    lat = LatticeBlender((8, 8), 1, torch.tensor([[0, 0]]), (8, 8), normalize="weight", confidence=True,
                         weigh_prediction=False)
    lat.add(torch.ones(1, 1, 8, 8), torch.tensor([0.5]))
    res = lat.finalize_with_confidence()
    assert torch.equal(res.prediction, torch.ones(1, 8, 8)) and torch.equal(res.confidence, torch.full((1, 8, 8), 0.5))


# ---- the driver's and the MONAI inferer's errors, and the MONAI inferer -----------------------------------------

def test_driver_errors_name_the_argument():
    x = torch.rand(1, 1, 8, 8, 8)
    pred = scored((2, 2, 2))
    with pytest.raises(ValueError, match="confidence=True needs weighting"):
        sliding_window_inference(x, 4, 2, pred, confidence=True)
    with pytest.raises(ValueError, match="weigh_prediction=False needs confidence=True"):
        sliding_window_inference(x, 4, 2, pred, weighting="grid", weigh_prediction=False)
    with pytest.raises(ValueError, match="confidence=True needs normalize"):
        sliding_window_inference(x, 4, 2, pred, weighting="grid", normalize="none", confidence=True)
    with pytest.raises(TypeError, match="confidence must be True or False"):
        sliding_window_inference(x, 4, 2, pred, weighting="grid", confidence=1)
    with pytest.raises(TypeError, match="weigh_prediction must be True or False"):
        sliding_window_inference(x, 4, 2, pred, weighting="grid", confidence=True, weigh_prediction=None)
    with pytest.raises(ValueError, match="process_fn"):
        sliding_window_inference(x, 4, 2, pred, process_fn=lambda s, w, i: (s, i), weighting="grid", confidence=True)
    # bad scores that only the confidence map reads are still refused
    bad = lambda w: CalibratedOutput(w, None, -torch.ones(len(w), 2, 2, 2))  # noqa: E731
    with pytest.raises(ValueError, match="grid_scores"):
        sliding_window_inference(x, 4, 2, bad, weighting="grid", confidence=True, weigh_prediction=False)


def test_monai_inferers_take_confidence():
    monai_integration = pytest.importorskip("patchblend.integrations.monai")
    x = torch.rand(1, 1, 14, 12, 10, generator=torch.Generator().manual_seed(6))
    pred = scored((2, 2, 2))
    expected = sliding_window_inference(x, (6, 6, 6), 2, pred, 0.5, "gaussian", weighting="grid", confidence=True,
                                        weigh_prediction=False)
    for cls in (monai_integration.CalibratedSlidingWindowInferer,
                monai_integration.CalibratedSlidingWindowInfererAdapt):
        inferer = cls((6, 6, 6), 2, 0.5, "gaussian", weighting="grid", confidence=True, weigh_prediction=False)
        got = inferer(x, pred)
        assert isinstance(got, PredictionWithConfidence)
        assert torch.equal(got.prediction, expected.prediction) and torch.equal(got.confidence, expected.confidence)
    with pytest.raises(ValueError, match="confidence=True needs weighting"):
        monai_integration.CalibratedSlidingWindowInferer(6, confidence=True)(x, pred)


# ---- the reference backend -----------------------------------------------------------------------------------------

def test_exact_under_the_reference_backend():
    """The exact tests again in a process whose ops are patchblend._reference (PATCHBLEND_BACKEND=reference)."""
    if os.environ.get("PATCHBLEND_BACKEND") == "reference":
        pytest.skip("already running on the reference backend")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PATCHBLEND_BACKEND="reference", PB_CONFIDENCE_EXAMPLES="8",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    info = subprocess.run([sys.executable, "-c", "import patchblend; print(patchblend.backend_info()['backend'])"],
                          env=env, capture_output=True, text=True, cwd=root)
    assert info.returncode == 0 and info.stdout.split()[-1] == "reference", info.stdout + info.stderr
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "hand_worked or driver_confidence_exact or blenders_confidence_exact or unweighted"],
                         env=env, capture_output=True, text=True, cwd=root)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout, res.stdout[-2000:]


def test_docs_page_examples_run():
    """The ```python blocks of docs/confidence.md run as written, in one namespace."""
    import pathlib
    import re
    page = pathlib.Path(__file__).resolve().parents[1] / "docs" / "confidence.md"
    namespace = {}
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
        exec(compile(block, "docs/confidence.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["avg"].confidence.shape == (1, 1, 48, 56, 48)
    assert namespace["conf"].shape == (1, 48, 56, 48) and namespace["probs"].shape == (2, 48, 56, 48)
    torch.testing.assert_close(namespace["probs"][None], namespace["avg"].prediction, rtol=1e-5, atol=1e-6)
