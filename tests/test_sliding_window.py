"""sliding_window_inference: MONAI parity matrix, calibrated weighting, slab mode, errors."""
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patchblend
from patchblend import CalibratedOutput
from patchblend.inference import importance_map, sliding_window_inference, sliding_windows

monai_inferers = pytest.importorskip("monai.inferers")
monai_sw = monai_inferers.sliding_window_inference


def predictor_3ch(x):
    """A deterministic, non-linear, channel-changing predictor (C_in -> 3)."""
    return torch.cat([x.sin(), x.mean(1, keepdim=True) * 2 - 1, (x[:, :1] * 3).tanh()], dim=1)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- MONAI parity --------------------------------------------------------------------------------------

PARITY = [
    # (inputs shape, roi_size, sw_batch_size, overlap, mode, sigma_scale)
    ((1, 1, 20, 24, 18), (8, 8, 8), 4, 0.25, "constant", 0.125),
    ((1, 2, 20, 24, 18), (8, 10, 6), 3, 0.5, "gaussian", 0.125),
    ((2, 1, 15, 17, 19), (7, 7, 7), 5, (0.0, 0.3, 0.6), "gaussian", (0.1, 0.2, 0.3)),
    ((2, 2, 12, 16, 10), 6, 1, 0.0, "constant", 0.125),
    ((1, 1, 10, 12, 9), (16, 8, 20), 2, 0.5, "gaussian", 0.25),  # ROI larger than the image on two axes
    ((1, 1, 10, 12, 9), (10, 12, 9), 2, 0.5, "gaussian", 0.125),  # ROI equal to the image
    ((1, 1, 10, 12, 9), (-1, 5, 0), 3, 0.4, "constant", 0.125),  # non-positive entries: the full axis
    ((3, 1, 11, 9, 8), (5, 4, 6), 7, 0.75, "gaussian", 0.5),  # sw batches span images
    ((1, 1, 30, 26), (12, 10), 4, 0.25, "constant", 0.125),  # 2D
    ((2, 3, 17, 23), (8, 30), 3, (0.5, 0.1), "gaussian", 0.125),  # 2D, ROI larger on one axis
    ((1, 1, 9, 9), (4, 4), 100, 0.9, "gaussian", 0.05),  # more sw batch than windows; tiny steps
]


@pytest.mark.parametrize("shape, roi, bs, overlap, mode, sigma", PARITY)
def test_monai_parity_matrix(shape, roi, bs, overlap, mode, sigma):
    x = rand(*shape)
    ref = monai_sw(x, roi, bs, predictor_3ch, overlap, mode, sigma)
    got = sliding_window_inference(x, roi, bs, predictor_3ch, overlap, mode, sigma)
    assert got.shape == ref.shape and got.dtype == ref.dtype and got.device == ref.device
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(
    nd=st.sampled_from([2, 3]),
    size=st.lists(st.integers(3, 14), min_size=3, max_size=3),
    roi=st.lists(st.integers(-1, 16), min_size=3, max_size=3),
    overlap=st.floats(0.0, 0.9),
    bs=st.integers(1, 9),
    batch=st.integers(1, 2),
    mode=st.sampled_from(["constant", "gaussian"]),
    sigma=st.floats(0.05, 1.0),
)
def test_monai_parity_random(nd, size, roi, overlap, bs, batch, mode, sigma):
    x = rand(batch, 2, *size[:nd], seed=sum(size))
    args = (roi[:nd], bs, predictor_3ch, overlap, mode, sigma)
    torch.testing.assert_close(sliding_window_inference(x, *args), monai_sw(x, *args), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding_mode, cval", [("constant", 1.5), ("reflect", 0.0), ("replicate", 0.0),
                                                ("circular", 0.0)])
def test_monai_parity_padding(padding_mode, cval):
    x = rand(2, 1, 9, 7, 8)
    args = ((12, 10, 6), 3, predictor_3ch, 0.25, "gaussian", 0.125, padding_mode, cval)
    torch.testing.assert_close(sliding_window_inference(x, *args), monai_sw(x, *args), rtol=1e-5, atol=1e-6)


def avg_pool_3(x):
    """A predictor that mixes neighbours (3^d average, zero-padded): the padded border of a window changes its
    neighbours' values, so padding that is not applied shows (a voxel-wise predictor would hide a wrong cval on
    the cropped-away border)."""
    pool = torch.nn.functional.avg_pool3d if x.dim() == 5 else torch.nn.functional.avg_pool2d
    return pool(x, 3, stride=1, padding=1)


@pytest.mark.parametrize("padding_mode, cval", [("constant", 1.5), ("constant", -2.0), ("constant", 0.0),
                                                ("reflect", 0.0), ("replicate", 0.0)])
@pytest.mark.parametrize("shape, roi", [((2, 1, 9, 7, 8), (12, 10, 6)), ((1, 2, 7, 9), (10, 6))])
def test_monai_parity_padding_with_a_neighbour_mixing_predictor(padding_mode, cval, shape, roi):
    x = rand(*shape)
    args = (roi, 3, avg_pool_3, 0.25, "gaussian", 0.125, padding_mode, cval)
    torch.testing.assert_close(sliding_window_inference(x, *args), monai_sw(x, *args), rtol=1e-5, atol=1e-6)


def test_monai_parity_keywords_devices_dtypes():
    x = rand(1, 1, 14, 12, 10, dtype=torch.float64)
    kw = dict(overlap=0.5, mode="gaussian", sw_device="cpu", device=torch.device("cpu"))
    ref = monai_sw(x, (6, 6, 6), 2, predictor_3ch, **kw)
    got = sliding_window_inference(x, (6, 6, 6), 2, predictor_3ch, **kw)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)  # float64 accumulation for float64 inputs
    # roi_weight_map, with_coord and a condition tensor behave as in MONAI
    xf = x.float()
    w = torch.rand(6, 6, 6) + 0.1
    seen = {"monai": [], "patchblend": []}

    def pred(key):
        def f(win, slices, condition=None):
            seen[key].append([[(s.start, s.stop) for s in sl] for sl in slices])
            return predictor_3ch(win) + condition.mean()
        return f

    cond = rand(1, 1, 14, 12, 10, seed=3)
    ref = monai_sw(xf, (6, 6, 6), 3, pred("monai"), 0.3, roi_weight_map=w, with_coord=True, condition=cond)
    got = sliding_window_inference(xf, (6, 6, 6), 3, pred("patchblend"), 0.3, roi_weight_map=w, with_coord=True,
                                   condition=cond)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert seen["monai"] == seen["patchblend"]


def test_half_precision_predictor_accumulates_in_float32():
    x = rand(1, 1, 16, 16, 16)
    ref = sliding_window_inference(x, 8, 4, predictor_3ch, 0.5)
    got = sliding_window_inference(x, 8, 4, lambda a: predictor_3ch(a).half(), 0.5)
    assert got.dtype == torch.float32  # the inputs' dtype, as in MONAI
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-3)  # only the predictor's rounding remains


def test_metatensor_in_metatensor_out():
    meta = pytest.importorskip("monai.data")
    x = meta.MetaTensor(rand(1, 1, 10, 10, 10), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    ref = monai_sw(x, 6, 2, predictor_3ch)
    got = sliding_window_inference(x, 6, 2, predictor_3ch)
    assert isinstance(got, meta.MetaTensor)
    assert torch.equal(got.affine, ref.affine)
    torch.testing.assert_close(got.as_tensor(), ref.as_tensor(), rtol=1e-5, atol=1e-6)


def test_nnunet_placement_and_importance():
    x = rand(1, 1, 23, 19, 21)
    got = sliding_window_inference(x, (10, 8, 12), 4, predictor_3ch, 0.5, "nnunet", placement="nnunet")
    grid = sliding_windows((23, 19, 21), (10, 8, 12), 0.5, style="nnunet")
    coords = grid.coords()
    patches = predictor_3ch(patchblend.extract_patches(x[0], coords, (10, 8, 12)))
    ref = patchblend.calibrated_blend(patches, None, coords, (23, 19, 21), normalize="weight",
                                      importance=importance_map((10, 8, 12), "nnunet"))
    torch.testing.assert_close(got[0], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [{}, dict(slab_axis=0), dict(slab_axis=1), dict(mode="gaussian")])
def test_nnunet_placement_with_repeated_starts(kw):
    # roi * (1 - overlap) < 1: nnU-Net's placement repeats window starts (0, 1, 2, 2, ...), which is not a strict
    # lattice; the driver then takes the general path, and every window (repeats included) is blended
    x = rand(1, 1, 20, 9, 11)
    got = sliding_window_inference(x, (8, 4, 5), 4, predictor_3ch, 0.9, placement="nnunet", **kw)
    coords = sliding_windows((20, 9, 11), (8, 4, 5), 0.9, style="nnunet").coords()
    assert len({tuple(c) for c in coords.tolist()}) < len(coords)  # the case: repeated windows
    patches = predictor_3ch(patchblend.extract_patches(x[0], coords, (8, 4, 5)))
    imp = importance_map((8, 4, 5), "gaussian") if kw.get("mode") else None
    ref = patchblend.calibrated_blend(patches, None, coords, (20, 9, 11), normalize="weight", importance=imp)
    torch.testing.assert_close(got[0], ref, rtol=1e-4, atol=1e-5)  # up to ~100 terms a voxel, in batches


def test_numpy_arguments_as_in_monai():
    np = pytest.importorskip("numpy")
    x = rand(1, 1, 12, 10, 9)
    ref = sliding_window_inference(x, (6, 5, 4), 3, predictor_3ch, (0.5, 0.25, 0.0))
    got = sliding_window_inference(x, np.array([6, 5, 4]), np.int64(3), predictor_3ch, np.array([0.5, 0.25, 0.0]))
    assert torch.equal(got, ref)
    assert torch.equal(sliding_window_inference(x, (6, 5, 4), torch.tensor(3), predictor_3ch, (0.5, 0.25, 0.0)), ref)
    assert torch.equal(sliding_window_inference(x, np.int64(6), 3, predictor_3ch),
                       sliding_window_inference(x, 6, 3, predictor_3ch))


# ---- gradients ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, roi", [("constant", (8, 8, 8)), ("gaussian", (8, 6, 8)), ("gaussian", (24, 8, 8))])
def test_gradients_match_monai(mode, roi):
    # with autograd on, the output is differentiable in the input and the predictor's parameters, as MONAI's
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    x = rand(1, 1, 20, 18, 16)
    results = []
    for infer in (monai_sw, sliding_window_inference):
        xx = x.clone().requires_grad_()
        net.zero_grad()
        y = infer(xx, roi, 3, net, 0.5, mode)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), xx.grad, net.weight.grad.clone()))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, roi", [((1, 1, 9), 9), ((2, 1, 9), (9,)), ((1, 1, 4, 4, 4, 4), 4),
                                        ((1, 2, 4, 4, 4, 4), (4, 4, 4, 4)), ((1, 1, 13), 9), ((1, 1, 5, 4, 4, 6), 4)])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_gradients_match_monai_1d_and_4d(shape, roi, mode):
    # the plain-PyTorch path (1D, 4D+) is differentiable too, also when one window covers the whole input (its
    # slice-add then spans the whole buffer, which `buffer[...] += x` made an in-place op on a leaf)
    results = []
    for infer in (monai_sw, sliding_window_inference):
        xx = rand(*shape).requires_grad_()
        y = infer(xx, roi, 2, torch.sin, 0.25, mode)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), xx.grad))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, roi, scored", [((1, 1, 20, 23), (8, 8), False), ((2, 1, 12, 10, 9), (6, 5, 4), True)])
def test_gradient_to_roi_weight_map(shape, roi, scored):
    # a roi_weight_map that requires grad gets its gradient (MONAI's does), also with calibrated weights
    net = torch.nn.Conv2d(1, 2, 3, padding=1) if len(roi) == 2 else torch.nn.Conv3d(1, 2, 3, padding=1)
    for p in net.parameters():
        p.requires_grad_(False)  # frozen network, input without grad: the map is the only leaf
    x = rand(*shape)
    base = rand(*roi, seed=3) + 0.5

    def run(infer, **kw):
        wm = base.clone().requires_grad_()
        infer(x, roi, 3, net if not scored else lambda w: CalibratedOutput(net(w), net(w).mean((1, 2, 3, 4)).sigmoid(), None), 0.5,
              roi_weight_map=wm, **kw).square().sum().backward()
        return wm.grad

    got = run(sliding_window_inference, **(dict(weighting="patch", normalize="weight") if scored else {}))
    assert got is not None and got.abs().sum() > 0
    if not scored:
        torch.testing.assert_close(got, run(monai_sw), rtol=1e-4, atol=1e-5)
    else:  # against finite differences of the driver itself (float64)
        x64, b64 = x.double(), base.double()
        net.double()

        def f(wm):
            pred = lambda w: CalibratedOutput(net(w), net(w).mean((1, 2, 3, 4)).sigmoid(), None)
            return sliding_window_inference(x64, roi, 3, pred, 0.5, roi_weight_map=wm, weighting="patch",
                                            normalize="weight").square().sum()

        assert torch.autograd.gradcheck(f, (b64.requires_grad_(),))


def test_gradients_of_calibrated_weighting():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1)

    def pred(w):
        s = net(w)
        return CalibratedOutput(s, torch.sigmoid(s.mean((1, 2, 3, 4))), torch.sigmoid(s.mean(1)[:, ::4, ::4, ::4]))

    x = rand(1, 1, 20, 18, 16)
    grads = []
    for route in ("driver", "reference"):
        xx = x.clone().requires_grad_()
        net.zero_grad()
        if route == "driver":
            y = sliding_window_inference(xx, (8, 8, 8), 3, pred, 0.5, weighting="patch*grid", normalize="weight")[0]
        else:  # every window at once through calibrated_blend
            coords = sliding_windows((20, 18, 16), (8, 8, 8), 0.5).coords()
            seg, patch, cells = pred(patchblend.extract_patches(xx[0], coords, (8, 8, 8)))
            y = patchblend.calibrated_blend(seg, patch.view(-1, 1, 1, 1) * cells, coords, (20, 18, 16),
                                            normalize="weight")
        y.sum().backward()
        grads.append((y.detach(), xx.grad, net.weight.grad.clone(), net.bias.grad.clone()))
    for ref, got in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_no_gradients_in_slab_mode_or_under_no_grad():
    net = torch.nn.Conv3d(1, 2, 1)
    x = rand(1, 1, 12, 10, 8)
    with pytest.warns(UserWarning, match="slab_axis"):
        y = sliding_window_inference(x, 6, 2, net, slab_axis=0)
    assert not y.requires_grad
    labels = sliding_window_inference(x, 6, 2, net, reduce="argmax")  # labels: nothing to differentiate
    assert labels.dtype == torch.int64 and not labels.requires_grad
    with torch.no_grad():
        y2 = sliding_window_inference(x, 6, 2, net)
    assert not y2.requires_grad
    torch.testing.assert_close(y2, y)


# ---- calibrated weighting == calibrated_blend on the same windows --------------------------------------

def scored_predictor(win):
    """seg plus scores computed from the window itself: patch = mean, grid = 2x2x2 cell means."""
    seg = predictor_3ch(win)
    patch = win.mean(dim=tuple(range(1, win.dim())))
    nd = win.dim() - 2
    pool = torch.nn.functional.adaptive_avg_pool3d if nd == 3 else torch.nn.functional.adaptive_avg_pool2d
    grid = pool(win.mean(1, keepdim=True), (2,) * nd)[:, 0]
    return CalibratedOutput(seg, patch, grid)


def calibrated_reference(x, roi, overlap, weighting, normalize, mode):
    grid = sliding_windows(x.shape[2:], roi, overlap)
    coords = grid.coords()
    outs = []
    for b in range(x.shape[0]):
        win = patchblend.extract_patches(x[b], coords, roi)
        seg, patch, cells = scored_predictor(win)
        nd = len(roi)
        w = {"patch": patch, "grid": cells, "patch*grid": patch.reshape(-1, *([1] * nd)) * cells}[weighting]
        imp = None if mode == "constant" else importance_map(roi, mode)
        outs.append(patchblend.calibrated_blend(seg, w, coords, x.shape[2:], normalize=normalize, importance=imp))
    return torch.stack(outs)


@pytest.mark.parametrize("weighting", ["patch", "grid", "patch*grid"])
@pytest.mark.parametrize("normalize", [None, "weight"])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_calibrated_equals_calibrated_blend(weighting, normalize, mode):
    x = rand(2, 1, 16, 14, 18)
    got = sliding_window_inference(x, (8, 8, 8), 3, scored_predictor, 0.5, mode, weighting=weighting,
                                   normalize=normalize)
    ref = calibrated_reference(x, (8, 8, 8), 0.5, weighting, normalize or "count", mode)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_patch_times_grid_in_float32():
    # float16 grid scores times float32 patch scores: the product is formed in float32 (1e-4 * 1e-4 underflows
    # in float16, and 1e3 * 1e2 overflows it)
    x = rand(1, 1, 12, 10, 8)
    for p, g in ((1e-4, 1e-4), (1e3, 1e2)):
        def pred(w, p=p, g=g):
            return CalibratedOutput(w, torch.full((len(w),), p), torch.full((len(w), 2, 2, 2), g, dtype=torch.float16))

        got = sliding_window_inference(x, 6, 4, pred, 0.5, weighting="patch*grid", normalize="weight")
        torch.testing.assert_close(got, x)  # equal weights everywhere: the weighted mean of identical windows


def test_calibrated_2d_and_dict_output():
    x = rand(1, 2, 20, 17)

    def as_dict(win):
        seg, patch, grid = scored_predictor(win)
        return CalibratedOutput(seg, patch[:, None], grid)  # [n, 1] scores are accepted

    got = sliding_window_inference(x, (8, 6), 4, as_dict, 0.25, weighting="patch*grid")
    ref = calibrated_reference(x, (8, 6), 0.25, "patch*grid", "count", "constant")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_scores_ignored_without_weighting():
    x = rand(1, 1, 12, 12, 12)
    plain = sliding_window_inference(x, 6, 2, predictor_3ch, 0.5, "gaussian")
    assert torch.equal(sliding_window_inference(x, 6, 2, scored_predictor, 0.5, "gaussian"), plain)


# ---- slab mode -----------------------------------------------------------------------------------------

def multiclass(win):
    k = torch.arange(1, 9, dtype=win.dtype).view(1, 8, *([1] * (win.dim() - 2)))
    return (win * k).sin()


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_slab_equals_full(axis):
    x = rand(2, 1, 18, 15, 13)
    kw = dict(overlap=0.5, mode="gaussian")
    full = sliding_window_inference(x, (7, 6, 8), 3, multiclass, **kw)
    slab = sliding_window_inference(x, (7, 6, 8), 3, multiclass, slab_axis=axis, **kw)
    if axis == 0:
        assert torch.equal(slab, full)  # same window order and batches: bitwise
    else:
        torch.testing.assert_close(slab, full, rtol=1e-6, atol=1e-6)
    labels = sliding_window_inference(x, (7, 6, 8), 3, multiclass, slab_axis=axis, reduce="argmax", **kw)
    assert labels.shape == (2, 1, 18, 15, 13) and labels.dtype == torch.int64
    if axis == 0:
        assert torch.equal(labels, full.argmax(1, keepdim=True))
    mask = sliding_window_inference(x, (7, 6, 8), 3, multiclass, slab_axis=axis, reduce="threshold",
                                    threshold=0.2, **kw)
    assert mask.dtype == torch.bool and (mask == (full >= 0.2)).float().mean() > 0.999


def test_slab_calibrated_weight_sum_and_2d():
    x = rand(1, 1, 20, 16, 12)
    kw = dict(weighting="patch*grid", normalize="weight", mode="gaussian")
    full = sliding_window_inference(x, (8, 8, 8), 2, scored_predictor, 0.5, **kw)
    assert torch.equal(sliding_window_inference(x, (8, 8, 8), 2, scored_predictor, 0.5, slab_axis=0, **kw), full)
    x2 = rand(2, 1, 25, 19)
    full = sliding_window_inference(x2, (9, 7), 5, predictor_3ch, 0.5)
    assert torch.equal(sliding_window_inference(x2, (9, 7), 5, predictor_3ch, 0.5, slab_axis=0,
                                                reduce="argmax", label_dtype=torch.uint8),
                       full.argmax(1, keepdim=True).to(torch.uint8))
    # full path with reduce gives the same labels
    assert torch.equal(sliding_window_inference(x2, (9, 7), 5, predictor_3ch, 0.5, reduce="argmax"),
                       full.argmax(1, keepdim=True))


def _largest_allocation(fn):
    """The largest buffer ``fn`` allocates: torch's allocations (by the profiler), and the output buffers patchblend
    allocates itself (``empty_large``: from 64 KiB its own memory, which the profiler does not see)."""
    from torch.profiler import ProfilerActivity, profile

    ops, empty_large = torch.ops.patchblend, torch.ops.patchblend.empty_large
    sizes = []

    def recording(size, dtype):
        out = empty_large(size, dtype)
        sizes.append(out.numel() * out.element_size())
        return out

    ops.empty_large = recording
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
    finally:
        ops.empty_large = empty_large
    return max([e.cpu_memory_usage for e in prof.events()] + sizes), out


def _peak_live_bytes(fn):
    """Peak of the bytes held by torch's CPU allocator while ``fn`` runs (allocations and frees in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, out


def test_slab_int64_labels_do_not_raise_the_peak():
    # labels are kept in uint8 while slabs exist and widened once the last slab is freed, so asking for int64
    # labels costs no more at the peak than asking for uint8 (before: 7 bytes per voxel more)
    x = rand(1, 1, 96, 32, 32)

    def sixteen(win):
        return (win * torch.arange(16.0).view(1, 16, 1, 1, 1)).cos()

    run = lambda dt: sliding_window_inference(x, 16, 4, sixteen, 0.5, slab_axis=0, reduce="argmax", label_dtype=dt)
    peak64, labels64 = _peak_live_bytes(lambda: run(torch.int64))
    peak8, labels8 = _peak_live_bytes(lambda: run(torch.uint8))
    assert labels64.dtype == torch.int64 and torch.equal(labels64, labels8.long())
    assert peak64 - peak8 < 96 * 32 * 32  # well under the 7 bytes per voxel that wide labels would add


def test_slab_allocates_less():
    x = rand(1, 1, 48, 32, 32)

    def sixteen(win):
        return (win * torch.arange(16.0).view(1, 16, 1, 1, 1)).cos()

    full_bytes, full = _largest_allocation(lambda: sliding_window_inference(x, 16, 4, sixteen, 0.5))
    slab_bytes, labels = _largest_allocation(
        lambda: sliding_window_inference(x, 16, 4, sixteen, 0.5, slab_axis=0, reduce="argmax"))
    assert full_bytes >= 16 * 48 * 32 * 32 * 4  # the full C x volume float32 buffer
    # 9 windows per row and 4 per predictor batch, so batches span rows; the slab stays one window deep
    assert slab_bytes <= 16 * 16 * 32 * 32 * 4 <= full_bytes / 3
    assert torch.equal(labels, full.argmax(1, keepdim=True))


# ---- progress bar and optional dependencies -------------------------------------------------------------

def test_progress_bar(capsys):
    pytest.importorskip("tqdm")
    x = rand(1, 1, 10, 10, 10)
    out = sliding_window_inference(x, 5, 2, predictor_3ch, progress=True)
    torch.testing.assert_close(out, sliding_window_inference(x, 5, 2, predictor_3ch))
    assert "it" in capsys.readouterr().err


def test_progress_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match="tqdm"):
        sliding_window_inference(rand(1, 1, 6, 6), 3, 1, predictor_3ch, progress=True)


def test_core_imports_neither_tqdm_nor_monai():
    # torch may import tqdm itself; what matters is that patchblend adds neither
    code = ("import sys, torch; before = set(sys.modules); import patchblend.inference, patchblend.integrations; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "assert not new & {'tqdm', 'monai'}, new")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- errors --------------------------------------------------------------------------------------------

X3 = rand(1, 1, 10, 10, 10)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(roi_size=(4, 4)), ValueError, "roi_size"),
        (dict(roi_size=(4, 4, 4, 4)), ValueError, "roi_size"),
        (dict(roi_size="abc"), TypeError, "roi_size"),
        (dict(overlap=1.0), ValueError, "overlap"),
        (dict(overlap=-0.1), ValueError, "overlap"),
        (dict(overlap=(0.1, 0.2)), ValueError, "overlap"),
        (dict(sw_batch_size=0), ValueError, "sw_batch_size"),
        (dict(mode="hann"), ValueError, "mode"),
        (dict(padding_mode="wrap"), ValueError, "padding_mode"),
        (dict(weighting="dice"), ValueError, "weighting"),
        (dict(normalize="mean"), ValueError, "normalize"),
        (dict(placement="torchio"), ValueError, "placement"),
        (dict(slab_axis=3), ValueError, "slab_axis"),
        (dict(reduce="softmax"), ValueError, "reduce"),
        (dict(roi_weight_map=-torch.ones(4, 4, 4)), ValueError, "roi_weight_map"),
        (dict(roi_weight_map=torch.full((4, 4, 4), float("nan"))), ValueError, "roi_weight_map"),
        (dict(reduce="argmax", label_dtype="int64"), TypeError, "label_dtype"),
        (dict(reduce="argmax", label_dtype=torch.bool), TypeError, "label_dtype"),
        # 300 classes do not fit uint8 labels: an error, not labels wrapped modulo 256 (full and slab path)
        (dict(predictor=lambda w: w.repeat(1, 300, 1, 1, 1), reduce="argmax", label_dtype=torch.uint8),
         ValueError, "label_dtype"),
        (dict(predictor=lambda w: w.repeat(1, 300, 1, 1, 1), reduce="argmax", label_dtype=torch.uint8, slab_axis=0),
         ValueError, "label_dtype"),
        (dict(process_fn=lambda *a: a), TypeError, "process_fn"),
        (dict(process_fn=3), TypeError, "process_fn"),
        (dict(process_fn=lambda segs, w, imp: (segs, imp[:2])), ValueError, "weight map"),
        (dict(process_fn=lambda segs, w, imp: (segs, -imp)), ValueError, "weight map"),
        (dict(weighting="patch"), ValueError, "CalibratedOutput"),
        (dict(predictor=lambda w: CalibratedOutput(w, None, None), weighting="patch"), ValueError, "patch scores"),
        (dict(buffer_steps=1, buffer_dim=4), ValueError, "buffer_dim"),
        (dict(buffer_steps=1, buffer_dim=0, slab_axis=1), ValueError, "buffer_dim"),
        (dict(buffer_steps=1.5), TypeError, "buffer_steps"),
        (dict(predictor=lambda w: w[:1]), ValueError, "predictor output"),
        (dict(predictor=lambda w: w[:, :, :0]), ValueError, "seg|output"),
        (dict(predictor=lambda w: CalibratedOutput(w, w.mean((1, 2, 3, 4)), None), weighting="grid"), ValueError, "grid scores"),
        (dict(predictor=lambda w: CalibratedOutput(w, torch.ones(w.shape[0] + 1), None), weighting="patch"), ValueError, "patch_scores"),
        (dict(predictor=lambda w: CalibratedOutput(w, -torch.ones(w.shape[0]), None), weighting="patch"), ValueError, "patch_scores"),
        (dict(predictor=lambda w: CalibratedOutput(w, torch.full((w.shape[0],), float("nan")), None), weighting="patch"), ValueError,
         "patch_scores"),
        (dict(predictor=lambda w: CalibratedOutput(w, None, torch.ones(w.shape[0], 2, 2)), weighting="grid"), ValueError,
         "grid_scores"),
        (dict(predictor=lambda w: CalibratedOutput(w, None, -torch.ones(w.shape[0], 2, 2, 2)), weighting="grid"), ValueError,
         "grid_scores"),
        (dict(predictor=lambda w: CalibratedOutput(w, None, torch.ones(w.shape[0], 2, 2, 9)), weighting="grid"), ValueError,
         "grid_scores"),
        # a plain tuple is MONAI's multi-output form, never scores: its second item is checked as an output
        (dict(predictor=lambda w: (w, w.mean((1, 2, 3, 4)))), ValueError, "output 1"),
        (dict(predictor=lambda w: (w, w.mean((1, 2, 3, 4))), weighting="patch"), ValueError, "CalibratedOutput"),
        (dict(predictor=lambda w: {"logits": w}, weighting="grid"), ValueError, "CalibratedOutput"),
        (dict(predictor=lambda w: ()), ValueError, "empty"),
        (dict(predictor=lambda w: {}), ValueError, "empty"),
        (dict(predictor=lambda w: 3.0), TypeError, "predictor"),
        (dict(predictor=lambda w: w.long()), TypeError, "predictor output"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    args = dict(inputs=X3, roi_size=(4, 4, 4), sw_batch_size=2, predictor=lambda w: w)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        sliding_window_inference(**args)


def test_bad_inputs_shape_and_channel_change():
    with pytest.raises(ValueError, match="inputs"):
        sliding_window_inference(rand(8), 4, 1, lambda w: w)
    with pytest.raises(TypeError, match="inputs"):
        sliding_window_inference([[1.0]], 4, 1, lambda w: w)
    with pytest.raises(ValueError, match="inputs"):
        sliding_window_inference(rand(0, 1, 8, 8), 4, 1, lambda w: w)
    calls = []

    def changing(w):
        calls.append(1)
        return w if len(calls) == 1 else torch.cat([w, w], 1)

    with pytest.raises(ValueError, match="changed between batches"):
        sliding_window_inference(X3, 4, 2, changing)


@pytest.mark.parametrize("chunk_windows", [1, 5, 10 ** 6])
def test_windows_cut_in_chunks(monkeypatch, chunk_windows):
    """Windows are cut for several batches per extraction call: chunks that end inside a batch's image run,
    span images, and hold one batch or all of them give MONAI's result (and the condition is windowed alike)."""
    from patchblend.inference import sliding_window as sw_module

    x = rand(3, 2, 11, 9, 8)
    window_bytes = 2 * 5 * 4 * 6 * 4
    monkeypatch.setitem(sw_module._CHUNK_BYTES, "cpu", chunk_windows * window_bytes)
    cond = rand(3, 2, 11, 9, 8, seed=7)

    def pred(win, condition):
        return predictor_3ch(win) * condition.mean((1, 2, 3, 4), keepdim=True)

    for bs in (1, 2, 7):
        args = ((5, 4, 6), bs, pred, 0.6, "gaussian")
        torch.testing.assert_close(sliding_window_inference(x, *args, condition=cond),
                                   monai_sw(x, *args, condition=cond), rtol=1e-5, atol=1e-6)


# ---- predictors with side effects (found by an adversarial review) --------------------------------------


def test_in_place_predictor_with_autograd():
    """A predictor that normalises its input in place and a conv that saves it for backward: the gradients
    are MONAI's (windows cut for several batches at once would share one version counter and break backward)."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 2, 3, padding=1)

    def pred(w):
        w.sub_(0.5)
        return net(w)

    x = rand(1, 1, 12, 12)
    grads = []
    for fn in (monai_sw, sliding_window_inference):
        net.zero_grad()
        fn(x, (4, 4), 2, pred, 0.5).square().sum().backward()
        grads.append(net.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_predictor_that_writes_back_into_the_input():
    """Each batch sees the input as it is at its predictor call, as in MONAI, also when windows are cut ahead."""
    def run(fn):
        x = torch.arange(64.0).reshape(1, 1, 8, 8) / 64

        def pred(win, slices):
            for k, sl in enumerate(slices):
                x[tuple(sl)] = win[k:k + 1] * 2
            return win * 2

        with torch.no_grad():
            return fn(x, (4, 4), 2, pred, 0.5, with_coord=True)

    torch.testing.assert_close(run(sliding_window_inference), run(monai_sw))


def test_overflowing_score_product_is_an_error():
    """patch and grid scores each finite, their product not: an error, not an output of NaN."""
    x = rand(1, 1, 8, 8)
    pred = lambda w: CalibratedOutput(w, torch.full((len(w),), 1e20), torch.full((len(w), 2, 2), 1e20))  # noqa: E731
    for kw in (dict(normalize="weight"), dict(normalize="count"), dict(slab_axis=0)):
        with torch.no_grad(), pytest.raises(ValueError, match="patch_scores \\* grid_scores"):
            sliding_window_inference(x, (4, 4), 2, pred, 0.5, weighting="patch*grid", **kw)


def test_float64_scores_beyond_float32_are_an_error():
    x = rand(1, 1, 8, 8)
    pred = lambda w: CalibratedOutput(w, torch.full((len(w),), 1e300, dtype=torch.float64), None)  # noqa: E731
    with torch.no_grad(), pytest.raises(ValueError, match="patch_scores"):
        sliding_window_inference(x, (4, 4), 2, pred, 0.5, weighting="patch")


def test_device_spelled_with_an_index():
    x = rand(1, 1, 8, 8)
    expected = sliding_window_inference(x, (4, 4), 2, predictor_3ch, 0.5)
    got = sliding_window_inference(x, (4, 4), 2, predictor_3ch, 0.5, sw_device="cpu:0", device="cpu:0")
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, monai_sw(x, (4, 4), 2, predictor_3ch, 0.5, device="cpu:0"))


def test_inference_mode():
    """Under torch.inference_mode (inputs made inside or outside it) every path runs and gives the no_grad
    result; and what was cached then (window placement, the Gaussian map) still serves a later call with
    autograd (inference tensors could not be saved for backward). The geometry is this test's own, so that the
    first call to meet it is the one under inference mode."""
    x = rand(2, 1, 13, 11, 12)
    cond = rand(2, 1, 13, 11, 12, seed=4)

    def scored(w, condition=None):
        seg = predictor_3ch(w) + (0 if condition is None else condition.mean())
        return CalibratedOutput(seg, w.mean((1, 2, 3, 4)) + 0.5, torch.nn.functional.adaptive_avg_pool3d(w[:, 0], 2) + 0.1)

    configs = [dict(mode="gaussian", sigma_scale=0.17), dict(weighting="patch*grid"), dict(condition=cond),
               dict(slab_axis=0, reduce="argmax"), dict(roi_weight_map=torch.rand(7, 5, 6) + 0.1)]
    for kw in configs:
        with torch.no_grad():
            expected = sliding_window_inference(x, (7, 5, 6), 3, scored, 0.35, **kw)
        for inside in (True, False):
            with torch.inference_mode():
                xi = x.clone() if inside else x
                kwi = {k: (v.clone() if inside and isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
                got = sliding_window_inference(xi, (7, 5, 6), 3, scored, 0.35, **kwi)
            assert torch.equal(got, expected)
    net = torch.nn.Conv3d(1, 2, 1)
    sliding_window_inference(x, (7, 5, 6), 3, net, 0.35, "gaussian", 0.17).sum().backward()
    assert net.weight.grad is not None
