"""Device placement: every op takes coords on the CPU (the driver's way: no GPU synchronisation) as well as on
the data's device; the sliding-window driver gives the same result on every device and, on a GPU, does not
synchronise once per batch. The CUDA cases run where a GPU is present (benchmarks/gpu_check.sh); on the CPU
the same tests check the CPU path against the same expectations."""
import warnings

import pytest
import torch

import patchblend
from patchblend import CalibratedOutput, sliding_window_inference
from patchblend._validate import finite_nonnegative

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ops = torch.ops.patchblend
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _lattice_coords(starts):
    return torch.cartesian_prod(*[torch.tensor(s) for s in starts]).reshape(-1, len(starts))


@pytest.mark.parametrize("device", DEVICES)
def test_ops_take_cpu_coords(device):
    """Each op with CPU coords equals the same op with coords on the data's device, bitwise."""
    g = _gen()
    coords = _lattice_coords([[0, 3, 5], [-1, 4], [0, 2, 6]])
    n = len(coords)
    p = torch.rand(n, 2, 4, 5, 3, generator=g).to(device)
    w = torch.rand(n, 2, 1, 3, generator=g).to(device)
    imp = torch.rand(4, 5, 3, generator=g).to(device)
    out_shape = [9, 8, 9]
    on_dev = coords.to(device)
    for normalize in ("count", "weight", "none"):
        a = ops.blend(p, w, coords, imp, out_shape, normalize)
        assert a.device.type == device
        assert torch.equal(a, ops.blend(p, w, on_dev, imp, out_shape, normalize))
        den = ops.coverage(w, coords, imp, [4, 5, 3], out_shape, normalize, torch.float32)
        assert den.device.type == device
        assert torch.equal(den, ops.coverage(w, on_dev, imp, [4, 5, 3], out_shape, normalize, torch.float32))
        sums = [torch.zeros(2, *out_shape, device=device) for _ in range(2)]
        dens = [torch.zeros(*out_shape, device=device) for _ in range(2)]
        ops.blend_add_(sums[0], dens[0], p, w, coords, imp, normalize)
        ops.blend_add_(sums[1], dens[1], p, w, on_dev, imp, normalize)
        assert torch.equal(sums[0], sums[1]) and torch.equal(dens[0], dens[1])
        if normalize != "weight":
            runs = [torch.empty(2, *out_shape, device=device).fill_(7.0) for _ in range(2)]
            for k in range(0, n, 4):
                ops.blend_stream_(runs[0], p[k:k + 4], w[k:k + 4], coords, k, imp, normalize)
                ops.blend_stream_(runs[1], p[k:k + 4], w[k:k + 4], on_dev, k, imp, normalize)
            assert torch.equal(runs[0], runs[1])
            covered = ops.coverage(None, on_dev, None, [4, 5, 3], out_shape, "count", torch.float32) > 0
            torch.testing.assert_close(runs[0][:, covered], a[:, covered], rtol=1e-6, atol=1e-6)
    vol = torch.rand(2, 9, 8, 9, generator=g).to(device)
    windows = ops.extract(vol, coords, [4, 5, 3])
    assert windows.device.type == device and torch.equal(windows, ops.extract(vol, on_dev, [4, 5, 3]))
    assert torch.equal(windows, patchblend.extract_patches(vol, coords, (4, 5, 3)))


@pytest.mark.parametrize("device", DEVICES)
def test_blend_gradients_with_cpu_coords(device):
    """calibrated_blend keeps coords on the CPU; its backward (extract and coverage) runs on the data's device."""
    g = _gen(1)
    coords = torch.tensor([[0, 0, 0], [2, -1, 3], [4, 4, 1]])
    p = torch.rand(3, 2, 4, 4, 4, generator=g).to(device).requires_grad_()
    w = (torch.rand(3, 2, 2, 2, generator=g) + 0.1).to(device).requires_grad_()
    cot = torch.rand(2, 8, 7, 7, generator=g).to(device)
    grads = {}
    for where in ("cpu", device):
        for normalize in ("count", "weight"):
            out = patchblend.calibrated_blend(p, w, coords.to(where), (8, 7, 7), normalize=normalize)
            grads[where, normalize] = torch.autograd.grad((out * cot).sum(), (p, w))
            assert all(t.device.type == device for t in grads[where, normalize])
    for normalize in ("count", "weight"):
        for a, b in zip(grads["cpu", normalize], grads[device, normalize]):
            assert torch.equal(a, b)
    vol = torch.rand(2, 6, 6, 6, generator=g).to(device).requires_grad_()
    (gv,) = torch.autograd.grad(patchblend.extract_patches(vol, coords, (4, 4, 4)).sum(), vol)
    assert gv.device.type == device


SW_CASES = [
    dict(roi=(8, 8, 8), bs=4, overlap=0.5, mode="constant"),
    dict(roi=(8, 6, 8), bs=3, overlap=0.25, mode="gaussian"),
    dict(roi=(8, 8, 8), bs=4, overlap=0.5, mode="gaussian", weighting="patch*grid"),
    dict(roi=(8, 8, 8), bs=4, overlap=0.5, mode="constant", weighting="grid", normalize="weight"),  # Blender path
    dict(roi=(8, 8, 8), bs=2, overlap=0.5, mode="gaussian", slab_axis=0, reduce="argmax"),
    dict(roi=(8, 8, 8), bs=2, overlap=0.5, mode="constant", slab_axis=1),
    dict(roi=(8, 8, 8), bs=5, overlap=0.5, mode="gaussian", placement="nnunet"),
]


def _scored(win):
    seg = torch.cat([win.sin(), win.cos()], 1)
    patch = win.mean((1, 2, 3, 4)) + 0.5
    grid = torch.nn.functional.adaptive_avg_pool3d(win[:, 0], 2) + 0.1
    return CalibratedOutput(seg, patch, grid)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SW_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_driver_same_result_on_every_device(device, case):
    """The driver on ``device`` equals the driver on the CPU, and windows cut on the CPU and predicted on
    ``device`` (MONAI's sw_device pattern) give the same too."""
    case = dict(case)
    roi, bs, overlap, mode = case.pop("roi"), case.pop("bs"), case.pop("overlap"), case.pop("mode")
    x = torch.rand(2, 1, 21, 18, 19, generator=_gen(2))
    expected = sliding_window_inference(x, roi, bs, _scored, overlap, mode, **case)
    got = sliding_window_inference(x.to(device), roi, bs, _scored, overlap, mode, **case)
    assert got.device.type == device and got.dtype == expected.dtype
    split = sliding_window_inference(x, roi, bs, _scored, overlap, mode, sw_device=device, device="cpu", **case)
    assert split.device.type == "cpu"
    if got.dtype.is_floating_point:
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(split, expected, rtol=1e-5, atol=1e-6)
    else:  # labels: allow the rare tie broken differently by float rounding
        assert (got.cpu() == expected).float().mean() > 0.999 and (split == expected).float().mean() > 0.999


@pytest.mark.parametrize("device", DEVICES)
def test_driver_2d_same_result_on_every_device(device):
    x = torch.rand(2, 2, 30, 27, generator=_gen(4))
    for kw in (dict(mode="gaussian"), dict(weighting="patch*grid"), dict(slab_axis=0)):
        def predictor(win):
            seg = torch.cat([win.sin(), win.cos()], 1)
            return CalibratedOutput(seg, win.mean((1, 2, 3)) + 0.5, torch.nn.functional.adaptive_avg_pool2d(win[:, 0], 2) + 0.1)
        expected = sliding_window_inference(x, (10, 8), 3, predictor, 0.5, **kw)
        got = sliding_window_inference(x.to(device), (10, 8), 3, predictor, 0.5, **kw)
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_driver_bad_scores_on_every_device(device):
    """Negative or NaN scores raise on every device (on a GPU once, at the end of the call)."""
    x = torch.rand(1, 1, 12, 12, 12, device=device)
    for bad in (-1.0, float("nan")):
        def predictor(win, bad=bad):
            seg, patch, grid = _scored(win)
            return CalibratedOutput(seg, torch.full_like(patch, bad), grid)
        with pytest.raises(ValueError, match="patch_scores"):
            sliding_window_inference(x, 8, 2, predictor, 0.5, weighting="patch")


@pytest.mark.parametrize("device", DEVICES)
def test_device_without_index_matches_tensors(device):
    """``device="cuda"`` names the current GPU, whose tensors say ``cuda:0``: the blenders and the driver must
    accept them (a plain torch.device comparison says cuda != cuda:0)."""
    from patchblend._validate import resolve_device
    from patchblend.inference import LatticeBlender, sliding_windows

    assert resolve_device(device) == torch.empty(0, device=device).device
    assert resolve_device(None, device) == torch.empty(0, device=device).device
    grid = sliding_windows((6, 6, 6), 4, 0.5)
    b = LatticeBlender((6, 6, 6), 1, grid, (4, 4, 4), device=device)
    p = torch.rand(len(grid), 1, 4, 4, 4, device=device)
    b.add(p)
    torch.testing.assert_close(b.finalize(), patchblend.calibrated_blend(p, None, grid.coords(), (6, 6, 6)))
    x = torch.rand(1, 1, 6, 6, 6)
    out = sliding_window_inference(x, 4, 2, lambda w: w, 0.5, sw_device=device, device=device)
    torch.testing.assert_close(out.cpu(), sliding_window_inference(x, 4, 2, lambda w: w, 0.5))


def test_finite_nonnegative_flag():
    assert bool(finite_nonnegative(torch.tensor([0.0, 2.0])))
    for bad in (-1e-3, float("nan"), float("inf")):
        assert not bool(finite_nonnegative(torch.tensor([1.0, bad])))
    assert not bool(finite_nonnegative(torch.tensor([1.0, -1.0], dtype=torch.float16)))


def _syncs(fn) -> int:
    """Number of synchronising CUDA calls ``fn`` makes (torch's sync debug mode, as warnings), after one call
    to warm what a first call caches (the Gaussian map and its check)."""
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@needs_cuda
@pytest.mark.parametrize("case", SW_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_driver_does_not_synchronise_per_batch(case):
    """The number of GPU synchronisations does not grow with the number of predictor calls (they would stall
    the host on every batch): sw_batch_size 1 against all windows in one call."""
    case = dict(case)
    roi, _, overlap, mode = case.pop("roi"), case.pop("bs"), case.pop("overlap"), case.pop("mode")
    x = torch.rand(1, 1, 21, 18, 19, device="cuda")
    counts = [_syncs(lambda bs=bs: sliding_window_inference(x, roi, bs, _scored, overlap, mode, **case))
              for bs in (1000, 1)]
    assert counts[1] == counts[0], counts
