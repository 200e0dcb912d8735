"""MONAI's whole sliding-window contract, with monai.inferers.sliding_window_inference as the oracle: the positional
signature, every output form (tensor, tuple, list, dict, mixed resolutions), process_fn, buffering, 1D to 4D inputs,
MetaTensor, with_coord, the Inferer classes, and CalibratedOutput with several outputs."""
import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchblend import CalibratedOutput, calibrated_blend
from patchblend.inference import sliding_window_inference

monai_inferers = pytest.importorskip("monai.inferers")
monai_sw = monai_inferers.sliding_window_inference


def rand(*shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def assert_same(got, ref, rtol=1e-5, atol=1e-6):
    """Same structure (tensor / tuple / dict with the same keys), shapes, dtypes and values."""
    assert type(got) is type(ref) or (isinstance(got, torch.Tensor) and isinstance(ref, torch.Tensor))
    if isinstance(ref, dict):
        assert list(got) == list(ref)
        for k in ref:
            assert_same(got[k], ref[k], rtol, atol)
    elif isinstance(ref, tuple):
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            assert_same(g, r, rtol, atol)
    else:
        assert got.shape == ref.shape and got.dtype == ref.dtype
        torch.testing.assert_close(got.as_subclass(torch.Tensor), ref.as_subclass(torch.Tensor), rtol=rtol, atol=atol)


X3 = rand(2, 1, 10, 12, 9)


# ---- signature ------------------------------------------------------------------------------------------

def test_signature_is_monais_then_keyword_only_extras():
    ours = inspect.signature(sliding_window_inference).parameters
    theirs = inspect.signature(monai_sw).parameters
    ours_positional = [(p.name, p.kind, p.default) for p in ours.values()
                       if p.kind in (p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    theirs_positional = [(p.name, p.kind, getattr(p.default, "value", p.default)) for p in theirs.values()
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    assert ours_positional == theirs_positional
    extras = [p for p in ours.values() if p.name not in theirs]
    assert extras and all(p.kind == p.KEYWORD_ONLY for p in extras)


@pytest.mark.parametrize("shape, roi", [((1, 16, 16, 16), (16, 16, 16)), ((16, 16, 16), (16, 16, 16)),
                                        ((8, 8), (4, 4)), ((1, 1, 2, 8, 8), [4, 4])])
def test_inputs_without_batch_or_channel_axis_refused_in_monais_words(shape, roi):
    """A roi_size sequence fixes the spatial axes: inputs of another rank are refused, worded as MONAI words it
    ("inputs must have 5 dimensions for 3D roi_size", matched case-insensitively), not as a roi_size problem."""
    words = f"(?i)inputs must have {len(roi) + 2} dimensions"
    x = torch.rand(shape)
    with pytest.raises(ValueError, match=words):
        monai_sw(x, roi, 2, lambda w: w)
    with pytest.raises(ValueError, match=words):
        sliding_window_inference(x, roi, 2, lambda w: w)


@pytest.mark.parametrize("name, predictor", [("a batch of one for every batch", lambda w: w[:1] * 2),
                                             ("no channels", lambda w: w[:, :0])])
def test_outputs_monai_takes_silently_are_refused(name, predictor):
    """Deliberate differences (README, MONAI table): MONAI returns a result for these outputs (a broadcast one, an
    empty one); we refuse them by name."""
    x = rand(2, 3, 12, 10)
    assert isinstance(monai_sw(x, 4, 2, predictor), torch.Tensor)
    with pytest.raises(ValueError, match="predictor output must be"):
        sliding_window_inference(x, 4, 2, predictor)


def test_positional_parameters_13_to_17_and_args_reach_the_predictor():
    """Reproduction 4: MONAI's classes call the function with roi_weight_map .. with_coord positionally, then *args."""
    w = rand(6, 6, 6, seed=1) + 0.1
    seen = {"monai": [], "ours": []}

    def pred(key):
        def f(x, coords, a, b, c=0.0):
            seen[key].append(len(coords))
            return x * a + b + c
        return f

    args = (0.25, "constant", 0.125, "constant", 0.0, None, None, False, w, None, None, -1, True, 3.0, 1.0)
    ref = monai_sw(X3, (6, 6, 6), 2, pred("monai"), *args, c=0.5)
    got = sliding_window_inference(X3, (6, 6, 6), 2, pred("ours"), *args, c=0.5)
    assert_same(got, ref)
    assert seen["monai"] == seen["ours"]


# ---- output forms ---------------------------------------------------------------------------------------

OUTPUT_FORMS = {
    "tuple": lambda x: (x * 2, x + 1),  # reproduction 1
    "dict": lambda d: {"b": d + 2, "a": d.sin()},  # reproduction 2 (keys sorted, as MONAI does)
    "list of one": lambda x: [x.cos()],  # unpacked to a tensor, as MONAI does
    "list": lambda x: [x, x * 3],
    "mixed resolutions": lambda x: (x, x[:, :, ::2, ::2, :] + 1, x.repeat_interleave(2, 3).repeat(1, 2, 1, 1, 1)),
    "dict of resolutions": lambda x: {"low": x[:, :, ::2, ::3, :], "high": x.repeat_interleave(2, 2)},
}


@pytest.mark.parametrize("form", sorted(OUTPUT_FORMS))
@pytest.mark.parametrize("kw", [dict(), dict(mode="gaussian", overlap=0.5), dict(overlap=0.5, sw_batch_size=5)])
def test_output_forms_as_monai(form, kw):
    kw = dict(kw)
    bs = kw.pop("sw_batch_size", 3)
    f = OUTPUT_FORMS[form]
    assert_same(sliding_window_inference(X3, (6, 6, 6), bs, f, **kw), monai_sw(X3, (6, 6, 6), bs, f, **kw))


def test_tuple_output_unpacks_as_monais():
    """Reproduction 1: a 2-tuple predictor gives a 2-tuple of full outputs (not a tensor read as CIB scores)."""
    seg, aux = sliding_window_inference(X3, (6, 6, 6), 4, lambda x: (x * 2, x + 1))
    assert seg.shape == aux.shape == X3.shape
    torch.testing.assert_close(seg, X3 * 2)
    torch.testing.assert_close(aux, X3 + 1)


def test_resolution_2d_and_padding():
    """Reproduction 3 (an output at half resolution), and zoomed outputs of a padded image (ROI > image)."""
    x2 = rand(2, 1, 10, 12)
    f = lambda d: d[:, :, ::2, ::2] + 1  # noqa: E731
    assert_same(sliding_window_inference(x2, (6, 6), 3, f), monai_sw(x2, (6, 6), 3, f))
    small = rand(1, 1, 5, 12, seed=2)
    g = lambda d: (d[:, :, ::2, ::2] + 1, d.repeat_interleave(2, 3))  # noqa: E731
    for mode in ("constant", "gaussian"):
        assert_same(sliding_window_inference(small, (8, 6), 3, g, 0.5, mode),
                    monai_sw(small, (8, 6), 3, g, 0.5, mode))


@pytest.mark.parametrize("slab_axis", [0, 1, 2])
def test_several_outputs_in_slab_mode_and_reduced(slab_axis):
    f = OUTPUT_FORMS["mixed resolutions"]
    with torch.no_grad():
        ref = monai_sw(X3, (6, 6, 6), 3, f, 0.5, "gaussian")
        got = sliding_window_inference(X3, (6, 6, 6), 3, f, 0.5, "gaussian", slab_axis=slab_axis)
        assert_same(got, ref)
        labels = sliding_window_inference(X3, (6, 6, 6), 3, f, 0.5, "gaussian", slab_axis=slab_axis, reduce="argmax")
    for lab, r in zip(labels, ref):
        assert torch.equal(lab, r.argmax(1, keepdim=True))


def test_several_outputs_have_monais_gradients():
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    grads = []
    for infer in (monai_sw, sliding_window_inference):
        net.zero_grad()
        out = infer(X3, (6, 6, 6), 3, lambda x: (net(x), net(x)[:, :, ::2, ::2, ::2]), 0.5, "gaussian")
        (out[0].sum() + out[1].pow(2).sum()).backward()
        grads.append(net.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)


def test_calibrated_output_with_several_outputs_weights_each_alike():
    def scores(x):
        return x.mean((1, 2, 3, 4)) + 0.1

    def multi(x):
        return CalibratedOutput({"full": x * 2, "half": x[:, :, ::2, ::2, ::2]}, scores(x), None)

    got = sliding_window_inference(X3, (6, 6, 6), 3, multi, 0.5, weighting="patch")
    assert sorted(got) == ["full", "half"]
    for key, f in (("full", lambda x: x * 2), ("half", lambda x: x[:, :, ::2, ::2, ::2])):
        alone = sliding_window_inference(X3, (6, 6, 6), 3, lambda x: CalibratedOutput(f(x), scores(x), None), 0.5,
                                         weighting="patch")
        torch.testing.assert_close(got[key], alone)
    # a grid score may be at most the smallest output's window
    bad = lambda x: CalibratedOutput((x, x[:, :, ::2, ::2, ::2]), None, torch.ones(x.shape[0], 4, 4, 4))  # noqa
    with pytest.raises(ValueError, match="grid_scores"):
        sliding_window_inference(X3, (6, 6, 6), 3, bad, 0.5, weighting="grid")


def test_weighting_without_calibrated_output_is_refused():
    for out in (lambda x: x, lambda x: (x, x.mean((1, 2, 3, 4))), lambda x: {"seg": x}):
        with pytest.raises(ValueError, match="CalibratedOutput"):
            sliding_window_inference(X3, 6, 2, out, weighting="patch")


# ---- process_fn -----------------------------------------------------------------------------------------

def test_process_fn_as_monai():
    def sigmoid_outputs(segs, windows, importance):
        assert importance.shape == (6, 6, 6)
        return tuple(torch.sigmoid(s) for s in segs), importance

    def doubled_map(segs, windows, importance):
        return segs, importance * 2  # a new map each call (the same values): the general path

    for fn, pred in ((sigmoid_outputs, OUTPUT_FORMS["mixed resolutions"]), (doubled_map, lambda x: x.cos())):
        for mode in ("constant", "gaussian"):
            assert_same(sliding_window_inference(X3, (6, 6, 6), 3, pred, 0.5, mode, process_fn=fn),
                        monai_sw(X3, (6, 6, 6), 3, pred, 0.5, mode, process_fn=fn))


def test_process_fn_varying_map_is_the_weighted_mean():
    """A map that changes per batch: every window is divided by the maps actually used (MONAI divides by the first
    batch's map for all windows); the reference is calibrated_blend with per-voxel weights."""
    maps = []

    def varying(segs, windows, importance):
        w = importance * (1 + windows.mean())  # depends on the batch
        maps.append(w.expand(windows.shape[0], *w.shape))
        return segs, w

    x = X3[:1]
    got = sliding_window_inference(x, (6, 6, 6), 2, lambda w: w.sin(), 0.5, "gaussian", process_fn=varying)
    from patchblend.inference import sliding_windows

    coords = sliding_windows((10, 12, 9), (6, 6, 6), 0.5).coords()
    windows = torch.stack([x[0, :, a:a + 6, b:b + 6, c:c + 6] for a, b, c in coords.tolist()])
    ref = calibrated_blend(windows.sin(), torch.cat(maps), coords, (10, 12, 9), normalize="weight")
    torch.testing.assert_close(got[0], ref, rtol=1e-5, atol=1e-6)


def _central_weights(segs, windows, importance):
    """A process_fn that keeps only the central half of each window (its map is 0 on a border of width roi/4, as
    the HoVerNet inferer's map is where the predictor's output was padded)."""
    keep = torch.zeros_like(importance)
    keep[tuple(slice(s // 4, s - s // 4) for s in importance.shape)] = 1
    return segs, importance * keep


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_voxels_of_zero_weight_sum_are_zero_where_monai_divides_zero_by_zero(mode):
    """A deliberate difference (README, MONAI table): where every map a process_fn returned is 0, the weight sum is
    0 and the result is 0 (the project's rule: nothing inf/NaN the inputs did not contain); MONAI computes 0/0 =
    NaN there. Everywhere else the two agree."""
    x = rand(1, 2, 12, 10)
    ref = monai_sw(x, (8, 8), 3, lambda w: w * 3, 0.5, mode, process_fn=_central_weights)
    got = sliding_window_inference(x, (8, 8), 3, lambda w: w * 3, 0.5, mode, process_fn=_central_weights)
    nan = torch.isnan(ref)
    assert nan.any() and not torch.isnan(got).any()  # the border the centres never reach
    assert torch.equal(got[nan], torch.zeros_like(got[nan]))
    torch.testing.assert_close(got[~nan], ref[~nan], rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")  # MONAI's HoVerNet inferer indexes with a list
def test_hovernet_inferer_on_our_driver_is_monais_with_zero_for_nan(monkeypatch):
    """MONAI's SlidingWindowHoVerNetInferer calls the function with its own process_fn (outputs padded back to the
    window, map 0 on the padding): with ours swapped in, MONAI's result, 0 where MONAI's is NaN."""
    pathology = pytest.importorskip("monai.apps.pathology.inferers.inferer")
    x = rand(1, 3, 16, 8)

    def cropped(w):
        return {"hover": w[..., 1:-1, 1:-1] + 1}

    inferer = pathology.SlidingWindowHoVerNetInferer((4, 4), 7, 0.5, "gaussian")
    ref = inferer(x, cropped)["hover"]
    monkeypatch.setattr(pathology, "sliding_window_inference", sliding_window_inference)
    got = inferer(x, cropped)["hover"]
    assert torch.isnan(ref).any() and not torch.isnan(got).any()
    torch.testing.assert_close(got, torch.nan_to_num(ref, nan=0.0), rtol=1e-5, atol=1e-6)


# ---- buffering ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("buffer_steps, buffer_dim, bs", [(1, -1, 1), (2, 0, 3), (3, 1, 2), (0, 0, 2)])
def test_buffering_as_monai(buffer_steps, buffer_dim, bs):
    """Results, and the windows of every predictor call (with_coord), as MONAI's buffered mode."""
    seen = {"monai": [], "ours": []}

    def pred(key):
        def f(x, slices):
            seen[key].append([(int(s.start), int(s.stop)) for w in slices for s in w[2:]])
            return x.sin() * 2
        return f

    kw = dict(buffer_steps=buffer_steps, buffer_dim=buffer_dim, with_coord=True)
    ref = monai_sw(X3, (6, 6, 6), bs, pred("monai"), 0.5, "gaussian", **kw)
    got = sliding_window_inference(X3, (6, 6, 6), bs, pred("ours"), 0.5, "gaussian", **kw)
    assert_same(got, ref)
    assert seen["ours"] == seen["monai"]


def test_buffering_returns_every_output():
    ref = monai_sw(X3, (6, 6, 6), 2, OUTPUT_FORMS["tuple"], 0.5)
    got = sliding_window_inference(X3, (6, 6, 6), 2, OUTPUT_FORMS["tuple"], 0.5, buffer_steps=2, buffer_dim=0)
    assert_same(got, ref)


# ---- dimensions, MetaTensor, with_coord -----------------------------------------------------------------

@pytest.mark.parametrize("shape, roi", [((2, 2, 17), 5), ((1, 1, 30), (40,)), ((1, 1, 6, 7, 5, 6), 4),
                                        ((1, 2, 3, 7, 5, 6), (4, 3, 5, 2))])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_1d_and_4d_inputs_as_monai(shape, roi, mode):
    x = rand(*shape)
    for f in (lambda w: w.sin(), lambda w: (w * 2, {"k": w})[0]):
        assert_same(sliding_window_inference(x, roi, 3, f, 0.4, mode), monai_sw(x, roi, 3, f, 0.4, mode))


def test_1d_calibrated_weighting_matches_a_2d_run():
    x = rand(1, 1, 23)

    def scored(w):
        return CalibratedOutput(w.sin(), w.mean((1, 2)) + 0.1, w.reshape(w.shape[0], -1)[:, :2] + 0.2)

    def scored2d(w):
        out = scored(w[:, :, 0])
        return CalibratedOutput(out.seg[:, :, None], out.patch, out.grid[:, None])

    for weighting in ("patch", "grid", "patch*grid"):
        got = sliding_window_inference(x, 6, 2, scored, 0.5, "gaussian", weighting=weighting)
        ref = sliding_window_inference(x[:, :, None], (1, 6), 2, scored2d, 0.5, "gaussian", weighting=weighting)
        torch.testing.assert_close(got, ref[:, :, 0], rtol=1e-5, atol=1e-6)


def test_metatensor_in_and_out():
    meta = pytest.importorskip("monai.data")
    mt = meta.MetaTensor(X3, affine=torch.eye(4) * 2, meta={"filename_or_obj": "case.nii"})
    for f in (lambda x: x, OUTPUT_FORMS["tuple"], OUTPUT_FORMS["dict"]):
        got = sliding_window_inference(mt, 6, 2, f)
        ref = monai_sw(mt, 6, 2, f)
        assert_same(got, ref)
        for g in (got.values() if isinstance(got, dict) else got if isinstance(got, tuple) else [got]):
            assert isinstance(g, meta.MetaTensor)
            assert g.meta["filename_or_obj"] == "case.nii" and torch.equal(g.affine, mt.affine)


def test_with_coord_slices_are_monais():
    seen = {"monai": [], "ours": []}

    def pred(key):
        def f(x, slices):
            seen[key].append([[(s.start, s.stop, type(s.start), type(s.stop)) for s in w] for w in slices])
            return x
        return f

    small = rand(2, 1, 5, 12, 9)  # padded on the first axis: slices in the padded image, as MONAI's
    monai_sw(small, (6, 6, 6), 3, pred("monai"), 0.5, with_coord=True)
    sliding_window_inference(small, (6, 6, 6), 3, pred("ours"), 0.5, with_coord=True)
    assert seen["ours"] == seen["monai"]


# ---- the Inferer classes --------------------------------------------------------------------------------

def test_inferers_are_monais_subclasses():
    from patchblend.integrations.monai import CalibratedSlidingWindowInferer, CalibratedSlidingWindowInfererAdapt

    net = lambda x, s=1.0: (x.sin() * s, x[:, :, ::2] * s)  # noqa: E731
    for ours, theirs in ((CalibratedSlidingWindowInferer, monai_inferers.SlidingWindowInferer),
                         (CalibratedSlidingWindowInfererAdapt, monai_inferers.SlidingWindowInfererAdapt)):
        for kw in (dict(), dict(mode="gaussian", cache_roi_weight_map=True, overlap=0.5)):
            inferer = ours((6, 8, 5), 3, **kw)
            assert isinstance(inferer, theirs) and isinstance(inferer, monai_inferers.SlidingWindowInferer)
            assert_same(inferer(X3, net, 2.0), theirs((6, 8, 5), 3, **kw)(X3, net, 2.0))
    single = lambda x: x.cos()  # noqa: E731
    inferer = CalibratedSlidingWindowInferer((6, 6, 6), 2, 0.5, buffer_steps=2, buffer_dim=1)
    assert_same(inferer(X3, single), monai_inferers.SlidingWindowInferer((6, 6, 6), 2, 0.5, buffer_steps=2,
                                                                         buffer_dim=1)(X3, single))


# ---- random geometry against MONAI ----------------------------------------------------------------------

FORMS = {
    "tensor": lambda x: x.sin(),
    "tuple": lambda x: (x * 2, x.mean(1, keepdim=True)),
    "dict": lambda x: {"z": x.cos(), "a": x + 1},
}


@settings(max_examples=25, deadline=None)
@given(
    nd=st.integers(1, 3),
    size=st.lists(st.integers(2, 12), min_size=3, max_size=3),
    roi=st.lists(st.integers(1, 14), min_size=3, max_size=3),
    overlap=st.floats(0.0, 0.9),
    bs=st.integers(1, 7),
    batch=st.integers(1, 2),
    mode=st.sampled_from(["constant", "gaussian"]),
    form=st.sampled_from(sorted(FORMS)),
    zoom=st.sampled_from([None, "half", "double"]),
    buffer_steps=st.sampled_from([None, 1, 2]),
)
def test_random_geometry_and_forms_against_monai(nd, size, roi, overlap, bs, batch, mode, form, zoom, buffer_steps):
    x = rand(batch, 2, *size[:nd], seed=sum(size))
    roi = tuple(roi[:nd])
    if zoom == "half":  # every output at half resolution: roi and overlap * roi must be even for MONAI
        roi = tuple(2 * r for r in roi)
        overlap = 0.5

    def f(w):
        out = FORMS[form](w)
        if zoom is None:
            return out
        change = ((lambda t: t[(slice(None), slice(None), *[slice(None, None, 2)] * nd)]) if zoom == "half" else
                  (lambda t: t.repeat_interleave(2, -1)))
        return {k: change(v) for k, v in out.items()} if isinstance(out, dict) else \
            tuple(change(v) for v in out) if isinstance(out, tuple) else change(out)

    kw = dict(buffer_steps=buffer_steps) if buffer_steps and form == "tensor" and zoom is None else {}
    ref = monai_sw(x, roi, bs, f, overlap, mode, **kw)
    got = sliding_window_inference(x, roi, bs, f, overlap, mode, **kw)
    assert_same(got, ref, rtol=1e-4, atol=1e-5)
