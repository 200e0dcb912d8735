"""Streaming accumulators: Blender == one-shot calibrated_blend; SlabBlender == Blender."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patchblend
from patchblend.inference import Blender, LatticeBlender, SlabBlender, monai_gaussian, window_coverage
from patchblend.inference.blender import check_label_dtype, compact_label_dtype


def _case(seed, nd, n, c, weights_kind, with_importance):
    g = torch.Generator().manual_seed(seed)
    out_shape = (9, 11, 7)[-nd:] if nd == 3 else (13, 10)
    patch = (4, 5, 3)[-nd:] if nd == 3 else (6, 4)
    patches = torch.rand((n, c, *patch), generator=g)
    lo = torch.tensor([-2] * nd)
    hi = torch.tensor(out_shape) + 1
    coords = lo + (torch.rand((n, nd), generator=g) * (hi - lo)).long()
    if weights_kind == "patch":
        weights = torch.rand(n, generator=g)
    elif weights_kind == "grid":
        weights = torch.rand((n, *([2] * nd)), generator=g)
    else:
        weights = None
    importance = monai_gaussian(patch, 0.3) if with_importance else None
    return patches, coords, weights, importance, out_shape


def _split(n, k):
    bounds = sorted({0, n, *[(n * (i + 1)) // (k + 1) for i in range(k)]})
    return list(zip(bounds, bounds[1:]))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    nd=st.sampled_from([2, 3]),
    n=st.integers(1, 12),
    c=st.integers(1, 3),
    weights_kind=st.sampled_from([None, "patch", "grid"]),
    with_importance=st.booleans(),
    normalize=st.sampled_from(["count", "weight", "none"]),
    batches=st.integers(1, 5),
)
def test_streaming_equals_one_shot(seed, nd, n, c, weights_kind, with_importance, normalize, batches):
    patches, coords, weights, importance, out_shape = _case(seed, nd, n, c, weights_kind, with_importance)
    ref = patchblend.calibrated_blend(patches, weights, coords, out_shape, normalize=normalize, importance=importance)
    b = Blender(out_shape, c, normalize=normalize, importance=importance)
    for i, j in _split(n, batches - 1):
        b.add(patches[i:j], coords[i:j], None if weights is None else weights[i:j])
    got = b.finalize()
    assert got.shape == (c, *out_shape) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_single_batch_is_bitwise_one_shot():
    patches, coords, weights, importance, out_shape = _case(1, 3, 8, 2, "grid", True)
    for normalize in ("count", "weight"):
        ref = patchblend.calibrated_blend(patches, weights, coords, out_shape, normalize=normalize,
                                          importance=importance)
        b = Blender(out_shape, 2, normalize=normalize, importance=importance)
        b.add(patches, coords, weights)
        assert torch.equal(b.finalize(), ref)


def test_half_patches_accumulate_in_float32():
    patches, coords, weights, _, out_shape = _case(2, 3, 12, 2, "patch", False)
    half = patches.half()
    b = Blender(out_shape, 2, normalize="count")
    for i in range(12):  # one patch per batch: a half partial sum would round every time
        b.add(half[i:i + 1], coords[i:i + 1], weights[i:i + 1])
    ref = patchblend.calibrated_blend(half.float(), weights, coords, out_shape, normalize="count")
    got = b.finalize()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    assert b.finalize(torch.float16).dtype == torch.float16


def test_precomputed_denominator_equals_accumulated():
    patches, coords, _, importance, out_shape = _case(3, 3, 10, 1, None, True)
    for normalize in ("count", "weight"):
        den = window_coverage(coords, patches.shape[2:], out_shape, normalize, importance)
        a = Blender(out_shape, 1, normalize=normalize, importance=importance, denominator=den)
        b = Blender(out_shape, 1, normalize=normalize, importance=importance)
        for i, j in _split(10, 2):
            a.add(patches[i:j], coords[i:j])
            b.add(patches[i:j], coords[i:j])
        assert torch.equal(a.finalize(), b.finalize())


def test_empty_and_outside_batches():
    b = Blender((5, 5), 1, normalize="weight")
    b.add(torch.rand(0, 1, 2, 2), torch.zeros(0, 2, dtype=torch.long))
    b.add(torch.rand(1, 1, 2, 2), [[10, 10]])  # entirely outside: ignored
    assert torch.equal(b.finalize(), torch.zeros(1, 5, 5))


def _slab_batches(seed, nd, axis):
    patches, coords, weights, importance, out_shape = _case(seed, nd, 14, 3, "grid", True)
    order = torch.argsort(coords[:, axis], stable=True)
    return patches[order], coords[order], weights[order], importance, out_shape


@pytest.mark.parametrize("nd, axis", [(3, 0), (3, 1), (3, 2), (2, 0), (2, 1)])
@pytest.mark.parametrize("normalize", ["count", "weight", "none"])
def test_slab_equals_full(nd, axis, normalize):
    patches, coords, weights, importance, out_shape = _slab_batches(nd * 10 + axis, nd, axis)
    full = Blender(out_shape, 3, normalize=normalize, importance=importance)
    slabs = {r: SlabBlender(out_shape, 3, axis=axis, normalize=normalize, importance=importance, reduce=r)
             for r in (None, "argmax", "threshold")}
    bounds = _split(14, 4)
    for k, (i, j) in enumerate(bounds):
        full.add(patches[i:j], coords[i:j], weights[i:j])
        nxt = int(coords[j, axis]) if j < 14 else out_shape[axis]
        for s in slabs.values():
            s.add(patches[i:j], coords[i:j], weights[i:j])
            s.finalize_until(nxt)
    ref = full.finalize()
    assert torch.equal(slabs[None].finish(), ref)
    assert slabs["argmax"].out.dtype == torch.uint8  # compact while the slab exists, int64 once finished
    labels = slabs["argmax"].finish()
    assert labels.dtype == torch.int64 and torch.equal(labels, ref.argmax(0, keepdim=True))
    assert torch.equal(slabs["threshold"].finish(), ref >= 0.5)


def test_slab_lattice_on_other_axes_holds_no_denominator():
    # with window_lattice the denominator is computed when a slab is finalised, so none is accumulated
    starts = [[0, 4, 8], [0, 3, 6], [0, 5]]
    coords = torch.cartesian_prod(*[torch.tensor(a) for a in starts])
    patches = torch.rand(len(coords), 1, 6, 5, 7)
    full = Blender((14, 11, 12), 1, normalize="count", window_shape=(6, 5, 7))
    full.add(patches, coords)
    order = torch.argsort(coords[:, 1], stable=True)
    slab = SlabBlender((14, 11, 12), 1, axis=1, normalize="count", window_shape=(6, 5, 7), window_lattice=starts)
    for j in range(0, len(coords), 6):
        idx = order[j:j + 6]
        slab.add(patches[idx], coords[idx])
        if j + 6 < len(coords):
            slab.finalize_until(int(coords[order[j + 6], 1]))
    torch.testing.assert_close(slab.finish(), full.finalize())
    assert slab.den is None and slab.peak_buffer_bytes == 1 * 14 * 5 * 12 * 4  # numerator only, one window deep


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("normalize", ["count", "weight", "none"])
def test_slab_lattice_along_axis_0_streams_bitwise_the_lattice_blender(nd, normalize):
    # window_lattice with axis 0: the batches go through blend_stream_ (the slab holds the running output only),
    # batches of uneven sizes, some spanning two rows of windows; bitwise LatticeBlender's result
    starts = [[0, 4, 8], [0, 3, 6], [0, 5]][-nd:] if nd == 3 else [[0, 4, 7], [0, 3, 5]]
    window, out_shape = ((6, 5, 7), (14, 11, 12)) if nd == 3 else ((6, 5), (13, 10))
    coords = torch.cartesian_prod(*[torch.tensor(a) for a in starts])
    patches = torch.rand((len(coords), 2, *window), generator=torch.Generator().manual_seed(nd))
    weights = None if normalize == "weight" else torch.rand(len(coords), generator=torch.Generator().manual_seed(7))
    imp = monai_gaussian(window, 0.3)
    lattice = LatticeBlender(out_shape, 2, coords, window, normalize=normalize, importance=imp)
    slab = SlabBlender(out_shape, 2, normalize=normalize, importance=imp, window_shape=window, window_lattice=starts)
    for i, j in _split(len(coords), 4):
        lattice.add(patches[i:j], None if weights is None else weights[i:j])
        slab.add(patches[i:j], coords[i:j], None if weights is None else weights[i:j])
        if j < len(coords):
            slab.finalize_until(int(coords[j, 0]))
    assert torch.equal(slab.finish(), lattice.finalize())
    assert slab.den is None
    out_of_order = SlabBlender(out_shape, 2, normalize=normalize, window_shape=window, window_lattice=starts)
    with pytest.raises(ValueError, match="raster order"):
        out_of_order.add(patches[1:3], coords[1:3])


def test_check_label_dtype():
    check_label_dtype(256, torch.uint8)
    check_label_dtype(2049, torch.float16)  # integers up to 2048 are exact in float16
    for channels, dt in ((257, torch.uint8), (129, torch.int8), (2050, torch.float16), (258, torch.bfloat16)):
        with pytest.raises(ValueError, match="label_dtype"):
            check_label_dtype(channels, dt)
    with pytest.raises(ValueError, match="label_dtype"):  # the standalone SlabBlender checks too
        SlabBlender((8, 8), 300, reduce="argmax", label_dtype=torch.uint8)


def test_compact_label_dtype():
    assert compact_label_dtype(16, torch.int64) == torch.uint8
    assert compact_label_dtype(256, torch.int64) == torch.uint8
    assert compact_label_dtype(257, torch.int64) == torch.int16
    assert compact_label_dtype(40000, torch.int64) == torch.int32
    assert compact_label_dtype(40000, torch.int32) == torch.int32  # nothing smaller holds the labels
    assert compact_label_dtype(3, torch.uint8) == torch.uint8
    assert compact_label_dtype(300, torch.float32) == torch.int16  # exact in either


def test_slab_window_coords_denominator_and_memory():
    # windows on a lattice, one row at a time: the slab holds about one window along axis 0
    out_shape, win = (40, 12, 10), (8, 12, 10)
    starts = torch.arange(0, 33, 4)
    coords = torch.stack([starts, torch.zeros_like(starts), torch.zeros_like(starts)], 1)
    patches = torch.rand(len(starts), 4, *win)
    imp = monai_gaussian(win)
    full = Blender(out_shape, 4, normalize="weight", importance=imp)
    slab = SlabBlender(out_shape, 4, normalize="weight", importance=imp, window_coords=coords, reduce="argmax")
    for i in range(len(starts)):
        full.add(patches[i:i + 1], coords[i:i + 1])
        slab.add(patches[i:i + 1], coords[i:i + 1])
        slab.finalize_until(int(coords[i + 1, 0]) if i + 1 < len(starts) else 40)
    assert torch.equal(slab.finish(), full.finalize().argmax(0, keepdim=True))
    full_bytes = 4 * 40 * 12 * 10 * 4  # C x volume float32
    assert slab.peak_buffer_bytes == 4 * 8 * 12 * 10 * 4  # one window deep; no denominator buffer
    assert slab.peak_buffer_bytes < full_bytes / 4


@pytest.mark.parametrize("coords, error, message", [
    ([[0.5, 0, 0]], TypeError, "coords must hold integers, got dtype torch.float32"),
    ([[0, 0]], ValueError, r"coords must have shape \[N, 3\]"),
    (torch.zeros(1, 3, dtype=torch.long, device="meta"), ValueError, "coords is a meta tensor"),
])
def test_the_blenders_and_calibrated_blend_read_coords_with_one_check(coords, error, message):
    """One check (``_validate.as_coords``) for every entry point: the same error naming coords."""
    patches = torch.rand(1, 2, 2, 2, 2)
    with pytest.raises(error, match=message):
        Blender((8, 8, 8), 2).add(patches, coords)
    with pytest.raises(error, match=message):
        patchblend.calibrated_blend(patches, None, coords, (8, 8, 8))


def test_an_empty_batch_with_empty_coords_adds_nothing():
    b, expected = Blender((4, 4, 4), 1), Blender((4, 4, 4), 1)
    patches = torch.rand(1, 1, 2, 2, 2)
    b.add(torch.zeros(0, 1, 2, 2, 2), [])
    for bl in (b, expected):
        bl.add(patches, [[1, 0, 2]])
    assert torch.equal(b.finish(), expected.finish())


def test_errors():
    b = Blender((8, 8, 8), 2)
    with pytest.raises(ValueError, match="channels"):
        b.add(torch.rand(1, 3, 2, 2, 2), [[0, 0, 0]])
    with pytest.raises(ValueError, match="patches"):
        b.add(torch.rand(1, 2, 2, 2), [[0, 0]])
    b.add(torch.rand(1, 2, 2, 2, 2), [[0, 0, 0]])
    with pytest.raises(ValueError, match="spatial shape"):
        b.add(torch.rand(1, 2, 3, 2, 2), [[0, 0, 0]])
    with pytest.raises(ValueError, match="coords"):
        b.add(torch.rand(2, 2, 2, 2, 2), [[0, 0, 0]])
    with pytest.raises(TypeError, match="coords"):
        b.add(torch.rand(1, 2, 2, 2, 2), [[0.5, 0, 0]])
    with pytest.raises(ValueError, match="weights"):
        b.add(torch.rand(1, 2, 2, 2, 2), [[0, 0, 0]], torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="weights"):
        b.add(torch.rand(1, 2, 2, 2, 2), [[0, 0, 0]], torch.tensor([float("nan")]))
    b.finalize()
    with pytest.raises(RuntimeError, match="finalize"):
        b.add(torch.rand(1, 2, 2, 2, 2), [[0, 0, 0]])
    with pytest.raises(ValueError, match="normalize"):
        Blender((4, 4), 1, normalize="mean")
    with pytest.raises(ValueError, match="out_shape"):
        Blender((4,), 1)
    with pytest.raises(ValueError, match="importance"):
        Blender((4, 4), 1, importance=-torch.ones(2, 2))
    den = torch.ones(4, 4)
    with pytest.raises(ValueError, match="weights"):
        Blender((4, 4), 1, normalize="weight", denominator=den).add(torch.rand(1, 1, 2, 2), [[0, 0]], torch.ones(1))
    s = SlabBlender((8, 8), 1, axis=0)
    s.add(torch.rand(1, 1, 4, 4), [[2, 0]])
    s.finalize_until(4)
    with pytest.raises(ValueError, match="finalised"):
        s.add(torch.rand(1, 1, 4, 4), [[3, 0]])
    with pytest.raises(ValueError, match="axis"):
        SlabBlender((8, 8), 1, axis=2)
    with pytest.raises(ValueError, match="reduce"):
        SlabBlender((8, 8), 1, reduce="softmax")


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("normalize", ["count", "weight"])
def test_lattice_coverage_equals_window_coverage(nd, normalize):
    from patchblend.inference import lattice_coverage, sliding_windows

    image, win = (21, 17, 13)[-nd:], (8, 6, 5)[-nd:]
    grid = sliding_windows(image, win, 0.4)
    starts = [[s - 1 for s in axis] for axis in grid.starts]  # shifted: windows may start outside the output
    coords = grid.coords() - 1
    imp = monai_gaussian(win, 0.1)  # clamped at 1e-3: not separable
    ref = window_coverage(coords, win, image, normalize, imp)
    got = lattice_coverage(starts, win, image, imp if normalize == "weight" else None)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


def test_patches_must_be_float():
    from patchblend.inference import LatticeBlender, sliding_windows

    grid = sliding_windows((4, 6), (2, 3), 0.0)
    for blender, args in ((LatticeBlender((4, 6), 1, grid, (2, 3)), ()),
                          (Blender((4, 6), 1), (grid.coords(),)),
                          (SlabBlender((4, 6), 1), (grid.coords(),))):
        with pytest.raises(TypeError, match="patches must be float"):
            blender.add(torch.ones(len(grid), 1, 2, 3, dtype=torch.int64), *args)


def test_float64_weights_are_not_rounded_through_float32_patches():
    """A float64 accumulator keeps float64 weights exact with float32 patches (they are not converted to the
    patches' accumulation dtype first)."""
    coords = torch.tensor([[0, 0], [0, 2]])
    p = torch.ones(2, 1, 2, 3)
    w = torch.tensor([1 + 2 ** -40, 1.0], dtype=torch.float64)
    for blender in (Blender((2, 5), 1, normalize="none", dtype=torch.float64),
                    SlabBlender((2, 5), 1, normalize="none", dtype=torch.float64)):
        blender.add(p, coords, w)
        out = blender.finalize() if isinstance(blender, Blender) else blender.finish()
        assert out[0, 0, 0].item() == 1 + 2 ** -40


def test_importance_checked_again_after_an_in_place_change():
    """The importance check is remembered per tensor and version: changing the map in place is noticed."""
    imp = torch.rand(2, 3) + 0.1
    Blender((4, 6), 1, importance=imp)
    Blender((4, 6), 1, importance=imp)  # (remembered)
    imp[0, 0] = -1.0
    with pytest.raises(ValueError, match="importance"):
        Blender((4, 6), 1, importance=imp)
    imp[0, 0] = float("nan")
    with pytest.raises(ValueError, match="importance"):
        Blender((4, 6), 1, importance=imp)
    # a copy carries the memo along, and its version may match it: deepcopy restarts the count
    imp = torch.rand(2, 3) + 0.1
    imp.add_(0)  # version 1
    Blender((4, 6), 1, importance=imp)
    imp.mul_(-1)  # version 2
    negative_copy = copy.deepcopy(imp)  # version 1 again, with the memo of version 1
    with pytest.raises(ValueError, match="importance"):
        Blender((4, 6), 1, importance=negative_copy)


def test_check_values_is_a_constructor_argument():
    """check_values=True (the default) refuses a negative weight on add, in every blender; check_values=False skips
    that value check (the caller has made it) and blends the weight as given, as the reference does."""
    from patchblend.inference import LatticeBlender, WindowGrid
    from patchblend._reference import blend_reference
    torch.manual_seed(0)
    shape, roi = (6, 6, 6), (4, 4, 4)
    grid = WindowGrid(shape, roi, ((0, 2),) * 3)
    coords = grid.coords()
    patches = torch.rand(coords.shape[0], 1, *roi)
    weights = torch.ones(coords.shape[0])
    weights[1] = -0.5
    makers = (lambda **kw: Blender(shape, 1, window_shape=roi, **kw),
              lambda **kw: LatticeBlender(shape, 1, grid, roi, **kw),
              lambda **kw: SlabBlender(shape, 1, window_shape=roi, **kw))
    for make in makers:
        assert make().check_values and not make(check_values=False).check_values
        with pytest.raises(ValueError, match="weights"):
            bl = make()
            bl.add(patches, weights) if isinstance(bl, LatticeBlender) else bl.add(patches, coords, weights)
    bl = Blender(shape, 1, window_shape=roi, check_values=False)
    bl.add(patches, coords, weights)
    ref = blend_reference(patches, weights.view(-1, 1, 1, 1), coords, None, shape, "count")
    torch.testing.assert_close(bl.finalize(), ref, rtol=1e-5, atol=1e-6)


def test_one_interface_add_and_finish_with_the_old_names_as_aliases():
    # every blender: add a batch, finish(); finalize / finalize_with_confidence / finalize_until still work
    starts = [[0, 4], [0, 3], [0, 5]]
    coords = torch.cartesian_prod(*[torch.tensor(a) for a in starts])
    patches = torch.rand((len(coords), 2, 6, 5, 7), generator=torch.Generator().manual_seed(5))
    scores = torch.rand(len(coords), generator=torch.Generator().manual_seed(6))
    out_shape = (10, 8, 12)
    results = {}
    for name in ("finish", "finalize"):
        b = Blender(out_shape, 2, confidence=True)
        b.add(patches, coords, scores)
        lat = LatticeBlender(out_shape, 2, coords, (6, 5, 7), confidence=True)
        lat.add(patches, scores)
        slab = SlabBlender(out_shape, 2, window_shape=(6, 5, 7), confidence=True)
        slab.add(patches[:4], coords[:4], scores[:4])
        getattr(slab, name + "_until")(4)
        slab.add(patches[4:], coords[4:], scores[4:])
        results[name] = [getattr(x, name + "_with_confidence")() for x in (b, lat, slab)]
        assert getattr(b, name)() is results[name][0].prediction  # (finishing twice returns the same buffer)
    for new, old in zip(results["finish"], results["finalize"]):
        assert torch.equal(new.prediction, old.prediction) and torch.equal(new.confidence, old.confidence)
    assert torch.equal(results["finish"][0].prediction, results["finish"][1].prediction)
    b = Blender(out_shape, 2)
    b.finish()
    with pytest.raises(RuntimeError, match=r"after finish\(\)"):
        b.add(patches, coords)
