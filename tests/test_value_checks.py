"""No inf/NaN the inputs did not contain, meta tensors refused by name, SlabBlender's window_coords held to the list,
and the boundaries of the checks (a weight of -1e-30, a value exactly at the threshold)."""
import pytest
import torch

from patchblend import Blender, CalibratedOutput, SlabBlender, calibrated_blend, extract_patches
from patchblend.inference import LatticeBlender, sliding_window_inference, sliding_windows

P = torch.rand(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
C = torch.tensor([[0, 0, 0], [2, 0, 0]])
OUT = (6, 4, 4)
GRID = sliding_windows(OUT, (4, 4, 4), 0.5)  # the same two windows as C

# weights finite in their own dtype whose float32 conversion (float64) or float32 weight sum overflows
OVERFLOWING = [torch.tensor([1e300, 1.0], dtype=torch.float64), torch.tensor([3e38, 3e38])]


def _blend(w, normalize):
    return calibrated_blend(P, w, C, OUT, normalize=normalize)


def _blender(w, normalize):
    b = Blender(OUT, 1, normalize=normalize)
    b.add(P, C, w)
    return b.finalize()


def _lattice(w, normalize):
    b = LatticeBlender(OUT, 1, GRID, (4, 4, 4), normalize=normalize)
    b.add(P, w)
    return b.finalize()


def _slab(w, normalize):
    b = SlabBlender(OUT, 1, normalize=normalize)
    b.add(P, C, w)
    return b.finish()


@pytest.mark.parametrize("entry", [_blend, _blender, _lattice, _slab])
@pytest.mark.parametrize("normalize", ["count", "weight", "none"])
@pytest.mark.parametrize("weights", OVERFLOWING, ids=["float64-1e300", "float32-3e38"])
def test_overflowing_weights_are_an_error(entry, normalize, weights):
    if entry is _lattice and normalize == "weight":
        pytest.skip("LatticeBlender takes no weights with normalize='weight'")
    with pytest.raises(ValueError, match="weights"):
        out = entry(weights, normalize)
        assert torch.isfinite(out).all()  # (never reached: the error comes first; shows what would be wrong)


def test_large_weights_that_fit_are_accepted():
    w = torch.tensor([1e37, 1e37])  # their sum, 2e37, fits float32
    out = _blend(w, "weight")
    torch.testing.assert_close(out, _blend(torch.ones(2), "weight"))
    # float64 patches accumulate in float64: 1e300 is fine there
    out64 = calibrated_blend(P.double(), torch.tensor([1e300, 1e300], dtype=torch.float64), C, OUT, normalize="weight")
    torch.testing.assert_close(out64, calibrated_blend(P.double(), None, C, OUT, normalize="weight"))


def test_importance_that_overflows_is_an_error():
    imp = torch.full((4, 4, 4), 3e38)
    with pytest.raises(ValueError, match="importance"):
        calibrated_blend(P, None, C, OUT, normalize="weight", importance=imp)
    with pytest.raises(ValueError, match="importance"):
        calibrated_blend(P, None, C, OUT, importance=imp.double() * 1e10)  # inf in float32


def test_driver_refuses_overflowing_scores_and_maps():
    x = torch.rand(1, 1, 8, 8, 8)
    for scores, dtype in ((3e38, torch.float32), (1e300, torch.float64)):
        def pred(w, s=scores, dt=dtype):
            return CalibratedOutput(w, torch.full((w.shape[0],), s, dtype=dt), None)

        for normalize in ("count", "weight"):
            with pytest.raises(ValueError, match="scores"):
                sliding_window_inference(x, 4, 2, pred, weighting="patch", normalize=normalize)
    with pytest.raises(ValueError, match="weights"):
        sliding_window_inference(x, 4, 2, lambda w: w, roi_weight_map=torch.full((4, 4, 4), 3e38))


# ---- meta tensors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, name", [
    (lambda: calibrated_blend(P.to("meta"), None, C, OUT), "patches"),
    (lambda: calibrated_blend(P, torch.ones(2, device="meta"), C, OUT), "weights"),
    (lambda: calibrated_blend(P, None, C.to("meta"), OUT), "coords"),
    (lambda: calibrated_blend(P, None, C, OUT, importance=torch.ones(4, 4, 4, device="meta")), "importance"),
    (lambda: Blender(OUT, 1).add(P.to("meta"), C), "patches"),
    (lambda: Blender(OUT, 1).add(P, C.to("meta")), "coords"),
    (lambda: Blender(OUT, 1, importance=torch.ones(4, 4, 4, device="meta")), "importance"),
    (lambda: SlabBlender(OUT, 1).add(P, C, torch.ones(2, device="meta")), "weights"),
    (lambda: LatticeBlender(OUT, 1, GRID, (4, 4, 4)).add(P.to("meta")), "patches"),
    (lambda: sliding_window_inference(torch.rand(1, 1, 8, 8, 8, device="meta"), 4, 2, lambda w: w), "inputs"),
    (lambda: sliding_window_inference(torch.rand(1, 1, 8, 8, 8), 4, 2, lambda w: w,
                                      roi_weight_map=torch.ones(4, 4, 4, device="meta")), "roi_weight_map"),
])
def test_meta_tensors_are_refused_by_name(call, name):
    with pytest.raises(ValueError, match=f"{name} is a meta tensor"):
        call()


# ---- SlabBlender(window_coords=...) ---------------------------------------------------------------------

def _slab_coords():
    coords = sliding_windows((12, 8, 8), (4, 4, 4), 0.5).coords()
    patches = torch.rand(len(coords), 2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    return coords, patches


def test_slab_window_coords_as_listed_equals_blender():
    coords, patches = _slab_coords()
    slab = SlabBlender((12, 8, 8), 2, window_coords=coords)
    for k in range(0, len(coords), 3):
        slab.add(patches[k:k + 3], coords[k:k + 3])
        if k + 3 < len(coords):
            slab.finalize_until(int(coords[k + 3, 0]))
    torch.testing.assert_close(slab.finish(), calibrated_blend(patches, None, coords, (12, 8, 8)))


def test_slab_window_coords_left_out_or_foreign_is_an_error():
    coords, patches = _slab_coords()
    # one window of the list left out: finalising past it would divide by a count that includes it
    slab = SlabBlender((12, 8, 8), 2, window_coords=coords)
    slab.add(patches[1:], coords[1:])
    with pytest.raises(ValueError, match="window_coords"):
        slab.finish()
    # a patch not in the list (or added twice)
    slab = SlabBlender((12, 8, 8), 2, window_coords=coords)
    with pytest.raises(ValueError, match="not in window_coords"):
        slab.add(patches[:1], coords[:1] + 1)
    slab.add(patches[:1], coords[:1])
    with pytest.raises(ValueError, match="not in window_coords"):
        slab.add(patches[:1], coords[:1])


# ---- boundaries -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tiny", [-1e-30, -1e-4, -float(torch.finfo(torch.float32).tiny)])
def test_any_negative_weight_is_refused(tiny):
    w = torch.tensor([tiny, 1.0])
    with pytest.raises(ValueError, match="weights must be >= 0"):
        calibrated_blend(P, w, C, OUT)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        _blender(w, "count")
    with pytest.raises(ValueError, match="scores must be finite and >= 0|must be >= 0"):
        sliding_window_inference(torch.rand(1, 1, 8, 8, 8), 4, 2,
                                 lambda x: CalibratedOutput(x, torch.full((x.shape[0],), tiny), None),
                                 weighting="patch")
    # zero is allowed
    calibrated_blend(P, torch.tensor([0.0, 1.0]), C, OUT)


@pytest.mark.parametrize("slab_axis", [None, 0, 1])
def test_threshold_keeps_values_exactly_at_the_threshold(slab_axis):
    """reduce="threshold" is value >= threshold: a blended value exactly at it is True (0.375 is exact in binary)."""
    x = torch.full((1, 1, 8, 8, 8), 0.375)
    x[..., 4:] = 0.25
    out = sliding_window_inference(x, 4, 2, lambda w: w, 0.5, reduce="threshold", threshold=0.375,
                                   slab_axis=slab_axis)
    assert out.dtype == torch.bool
    assert out[..., :4].all() and not out[..., 4:].any()


def test_negative_weight_under_torch_compile_on_the_cpu():
    """Under torch.compile the weights' values are checked inside the compiled graph on the CPU (a RuntimeError
    when it runs); see the README for what is checked where."""
    def f(patches, weights):
        return calibrated_blend(patches, weights, C, OUT)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(P, torch.ones(2)), f(P, torch.ones(2)))
    with pytest.raises(RuntimeError, match="weights must be finite and >= 0"):
        compiled(P, torch.tensor([-1.0, 1.0]))


def test_extract_patches_meta_volume():
    with pytest.raises((ValueError, RuntimeError, NotImplementedError)):
        extract_patches(torch.rand(1, 4, 4, 4, device="meta"), C, (2, 2, 2)).sum().item()


# ---- loose arguments: sizes, thresholds, float16 results, products in the accumulation dtype -------------------

@pytest.mark.parametrize("call, name", [
    (lambda: calibrated_blend(P, None, C, "644"), "out_shape"),  # a string is not three sizes
    (lambda: calibrated_blend(P, None, C, (6.5, 4, 4)), "out_shape"),  # 6.5 is refused, not truncated to 6
    (lambda: calibrated_blend(P, None, C, (6, 4, float("nan"))), "out_shape"),
    (lambda: calibrated_blend(P, None, C, (True, 4, 4)), "out_shape"),
    (lambda: Blender("644", 1), "out_shape"),
    (lambda: Blender((6.5, 4, 4), 1), "out_shape"),
    (lambda: Blender(OUT, 1, window_shape=(4, 4, 3.5)), "window_shape"),
    (lambda: sliding_window_inference(torch.rand(1, 1, 8, 8, 8), (6.5, 6, 6), 2, lambda w: w), "roi_size"),
    (lambda: sliding_windows((8, 8.5), 4, 0.5), "image_shape"),
])
def test_non_integer_sizes_are_refused_by_name(call, name):
    with pytest.raises(TypeError, match=name):
        call()


def test_integral_sizes_of_other_types_are_taken():
    expected = calibrated_blend(P, None, C, OUT)
    for out_shape in ((6.0, 4, 4), torch.tensor(OUT), torch.Size(OUT), [6, 4, 4]):
        assert torch.equal(calibrated_blend(P, None, C, out_shape), expected)
    x = torch.rand(1, 1, 8, 8, 8)
    assert torch.equal(sliding_window_inference(x, (6.0, 6, 6), 2, torch.sin), sliding_window_inference(x, 6, 2, torch.sin))


@pytest.mark.parametrize("slab_axis", [None, 0])
def test_threshold_nan_is_refused(slab_axis):
    # value >= nan is False everywhere: an all-False mask, not an answer
    with pytest.raises(ValueError, match="threshold"):
        sliding_window_inference(torch.rand(1, 1, 8, 8, 8), 4, 2, lambda w: w, reduce="threshold",
                                 threshold=float("nan"), slab_axis=slab_axis)
    with pytest.raises(ValueError, match="threshold"):
        SlabBlender(OUT, 1, reduce="threshold", threshold=float("nan"))


def test_weight_sum_exactly_at_the_float32_bound_is_accepted():
    """check_sum_fits refuses sums *beyond* float32's largest value: two overlapping weights of max / 2 sum to
    exactly max (finite, accepted, exact result); the next float32 above max / 2 is refused."""
    half = torch.finfo(torch.float32).max / 2  # exact in float32
    w = torch.tensor([half, half])
    assert 2 * float(w[0]) == torch.finfo(torch.float32).max
    for entry in (_blend, _blender, _slab):
        out = entry(w, "weight")
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, _blend(torch.ones(2), "weight"))
    above = torch.nextafter(w, torch.tensor(float("inf")))
    for entry in (_blend, _blender, _slab):
        with pytest.raises(ValueError, match="weights"):
            entry(above, "weight")


def test_float16_results_that_would_overflow_are_refused():
    """float16 holds at most 65504: sums of float16 patches (normalize="none") or means with weights above 1
    ("count") beyond it are refused by name instead of coming out inf; what fits is accepted."""
    p16 = torch.full((2, 1, 4, 4, 4), 60000.0, dtype=torch.float16)
    with pytest.raises(ValueError, match="patches: the float16 result would overflow"):
        calibrated_blend(p16, None, C, OUT, normalize="none")  # 120,000 where the two overlap
    with pytest.raises(ValueError, match="patches: the float16 result would overflow"):
        calibrated_blend(p16, torch.tensor([2.0, 1.0]), C, OUT, normalize="count")
    # what fits: no overlap, a mean, or sums below the bound (32,000 x 2 = 64,000 rounds to 64,000)
    far = torch.tensor([[0, 0, 0], [4, 0, 0]])
    assert calibrated_blend(p16, None, far, (8, 4, 4), normalize="none").float().amax() == 60000
    for normalize in ("count", "weight"):
        assert calibrated_blend(p16, None, C, OUT, normalize=normalize).float().amax() == 60000
    assert calibrated_blend(torch.full_like(p16, 32000.0), None, C, OUT, normalize="none").float().amax() == 64000
    # a 12-deep lattice (2 x 3 x 2 windows over a voxel): 5,400 x 12 fits, 5,500 x 12 does not
    coords = sliding_windows((20, 18, 16), (8, 8, 8), 0.5).coords()
    for value, fits in ((5400.0, True), (5500.0, False)):
        p = torch.full((len(coords), 1, 8, 8, 8), value, dtype=torch.float16)
        if fits:
            assert calibrated_blend(p, None, coords, normalize="none").float().amax() == 12 * value
        else:
            with pytest.raises(ValueError, match="patches"):
                calibrated_blend(p, None, coords, normalize="none")
    # inf patches give inf: their own, not refused
    pinf = p16.clone()
    pinf[0, 0, 0, 0, 0] = float("inf")
    assert calibrated_blend(pinf, None, far, (8, 4, 4), normalize="none").isinf().sum() == 1


@pytest.mark.parametrize("slab_axis", [None, 0])
def test_driver_float16_output_that_would_overflow_is_refused(slab_axis):
    x = torch.full((1, 1, 8, 8, 8), 30000.0, dtype=torch.float16)
    with pytest.raises(ValueError, match="float16 output would overflow"):
        sliding_window_inference(x, 4, 2, lambda w: w, 0.5, normalize="none", slab_axis=slab_axis)
    out = sliding_window_inference(x, 4, 2, lambda w: w, 0.5, slab_axis=slab_axis)  # the mean fits
    assert out.dtype == torch.float16 and torch.equal(out, x)


@pytest.mark.parametrize("normalize", ["count", "weight"])
def test_patch_times_grid_formed_in_float64_for_float64_inputs(normalize):
    """float32 scores for a float64 input: their product is formed in float64 (the accumulation dtype), as
    calibrated_blend of the float64 product gives; formed in float32 it was 1.2e-8 off ("count")."""
    x = torch.rand(1, 1, 12, 10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    patch, grid = torch.rand(100, generator=gen) * 0.9 + 0.1, torch.rand(100, 2, 2, 2, generator=gen) * 0.9 + 0.1
    seen = [0]

    def pred(w):
        i, n = seen[0], len(w)
        seen[0] += n
        return CalibratedOutput(w.sin(), patch[i:i + n], grid[i:i + n])

    got = sliding_window_inference(x, 6, 4, pred, 0.5, weighting="patch*grid", normalize=normalize)
    coords = sliding_windows((12, 10, 8), (6, 6, 6), 0.5).coords()
    n = len(coords)
    ref = calibrated_blend(extract_patches(x[0], coords, (6, 6, 6)).sin(),
                           patch[:n].double().view(-1, 1, 1, 1) * grid[:n].double(), coords, (12, 10, 8),
                           normalize=normalize)
    torch.testing.assert_close(got[0], ref, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name", ["sw_device", "device"])
def test_driver_meta_or_unavailable_devices_are_refused_by_name(name):
    # sw_device="meta" failed in a copy ("Cannot copy out of meta tensor"); device="meta" returned a meta tensor
    x = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=f"{name}='meta'"):
        sliding_window_inference(x, 4, 2, lambda w: w, **{name: "meta"})
    if not torch.cuda.is_available():  # a CPU torch: an error naming the argument, not torch's AssertionError
        with pytest.raises(ValueError, match=f"{name}='cuda' is not available"):
            sliding_window_inference(x, 4, 2, lambda w: w, **{name: "cuda"})


def test_driver_bound_counts_every_window_of_a_batch():
    """The weight-sum bound adds the importance peak once per window: one batch of 8 windows (2 x 2 x 2, all
    covering the centre) with a roi_weight_map peak of 1e38 can sum to 8e38 > float32's 3.4e38: refused (counted
    once per batch it would pass as 1e38)."""
    x = torch.rand(1, 1, 6, 6, 6)
    assert len(sliding_windows((6, 6, 6), (4, 4, 4), 0.5).coords()) == 8
    peak = torch.full((4, 4, 4), 1.0)
    peak[2, 2, 2] = 1e38
    with pytest.raises(ValueError, match="weights"):
        sliding_window_inference(x, 4, 8, lambda w: w, 0.5, roi_weight_map=peak)
    peak[2, 2, 2] = 4e37  # 8 x 4e37 = 3.2e38 fits
    assert torch.isfinite(sliding_window_inference(x, 4, 8, lambda w: w, 0.5, roi_weight_map=peak)).all()
