"""SlidingWindowOptions: the drivers' one options object. Frozen, picklable, checked once when built (a bad value
names the argument), and one object gives the in-memory and the Dask driver bitwise equal results."""
import dataclasses
import inspect
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patchblend
from patchblend.inference import options as options_module
from patchblend.inference.options import DEFAULT_OVERLAP, KEYWORD_OPTIONS, SlidingWindowOptions
from patchblend.inference.sliding_window import resolve_overlap, resolve_roi, run_sliding_window


def two_class(x):
    m = x.mean(1, keepdim=True)
    return torch.cat([torch.sin(3.1 * m) + m, torch.cos(m) * 0.7 + 0.01 * m * m], 1)


def scored(x):
    patch = x.flatten(1).abs().mean(1) + 0.1
    grid = torch.nn.functional.adaptive_avg_pool3d(x[:, :1].abs(), 2)[:, 0] + 0.05
    return patchblend.CalibratedOutput(two_class(x), patch, grid)


def test_fields_are_monais_positional_parameters_then_keyword_only_ones():
    monai = pytest.importorskip("monai.inferers")
    theirs = [p.name for p in inspect.signature(monai.sliding_window_inference).parameters.values()
              if p.kind == p.POSITIONAL_OR_KEYWORD and p.name not in ("inputs", "predictor")]
    fields = dataclasses.fields(SlidingWindowOptions)
    assert [f.name for f in fields if not f.kw_only] == theirs
    assert [f.name for f in fields if f.kw_only] == list(KEYWORD_OPTIONS)
    # the driver's keyword-only parameters are the fields, with the fields' defaults
    sig = inspect.signature(patchblend.sliding_window_inference).parameters
    assert {n: sig[n].default for n in KEYWORD_OPTIONS} == {f.name: f.default for f in fields if f.kw_only}


def test_frozen_and_picklable():
    opts = SlidingWindowOptions(np.array([6, 6, 6]), 2, [0.5, 0.25, 0.5], mode="gaussian",
                                sigma_scale=torch.tensor([0.1, 0.2, 0.3]), weighting="patch", confidence=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.overlap = 0.1
    back = pickle.loads(pickle.dumps(opts))
    assert back == opts and hash(back) == hash(opts)
    assert back.roi_size == (6, 6, 6) and back.overlap == (0.5, 0.25, 0.5)
    assert back.sigma_scale == pytest.approx((0.1, 0.2, 0.3)) and back.normalize == "count"
    # the default overlap stays the default (tile_step_size refuses only an overlap the caller gave)
    default = pickle.loads(pickle.dumps(SlidingWindowOptions(6, 1, placement="nnunet")))
    assert default.overlap is DEFAULT_OVERLAP
    assert dataclasses.replace(default, tile_step_size=0.3).tile_step_size == 0.3


@pytest.mark.parametrize("kw, error, name", [
    (dict(sw_batch_size=0), ValueError, "sw_batch_size"),
    (dict(mode="cubic"), ValueError, "mode"),
    (dict(sigma_scale="wide"), TypeError, "sigma_scale"),
    (dict(padding_mode="wrap"), ValueError, "padding_mode"),
    (dict(weighting="voxel"), ValueError, "weighting"),
    (dict(normalize="mean"), ValueError, "normalize"),
    (dict(placement="grid"), ValueError, "placement"),
    (dict(reduce="max"), ValueError, "reduce"),
    (dict(threshold=float("nan")), ValueError, "threshold"),
    (dict(reduce="argmax", label_dtype=torch.bool), TypeError, "label_dtype"),
    (dict(confidence=True), ValueError, "confidence"),
    (dict(weigh_prediction=False, weighting="patch"), ValueError, "weigh_prediction"),
    (dict(buffer_steps=1.5), TypeError, "buffer_steps"),
    (dict(slab_axis="x"), ValueError, "slab_axis"),
    (dict(process_fn=3), TypeError, "process_fn"),
    (dict(tile_step_size=0.5), ValueError, "tile_step_size"),
    (dict(tile_step_size=1.5, placement="nnunet"), ValueError, "tile_step_size"),
    (dict(tile_step_size=0.5, placement="nnunet", overlap=0.5), ValueError, "overlap or tile_step_size"),
])
def test_a_bad_value_is_named_when_built_and_by_the_drivers_alike(kw, error, name):
    kw = dict(dict(roi_size=4, sw_batch_size=1), **kw)
    with pytest.raises(error, match=name) as built:
        SlidingWindowOptions(**kw)
    with pytest.raises(error) as in_memory:
        patchblend.sliding_window_inference(torch.rand(1, 1, 8, 8, 8), predictor=two_class, **kw)
    assert str(in_memory.value) == str(built.value)
    if "process_fn" in kw or "tile_step_size" in kw:  # (refused by name on Dask whatever their value)
        return
    da = pytest.importorskip("dask.array")
    from patchblend.distributed import sliding_window_inference as on_dask
    with pytest.raises(error) as dask_error:
        on_dask(da.from_array(np.zeros((1, 8, 8, 8), np.float32)), predictor=two_class, out_channels=2, **kw)
    assert str(dask_error.value) == str(built.value)


def test_options_are_checked_once_per_call_and_not_by_the_block_tasks(monkeypatch):
    calls = []
    check = options_module.check_blend_options
    monkeypatch.setattr(options_module, "check_blend_options", lambda *a: calls.append(a) or check(*a))
    x = torch.rand(1, 1, 9, 10, 8)
    patchblend.sliding_window_inference(x, 4, 2, two_class, 0.5, weighting=None, reduce="argmax")
    assert len(calls) == 1
    da = pytest.importorskip("dask.array")
    from patchblend.distributed import sliding_window_inference as on_dask
    lazy = on_dask(da.from_array(x[0].numpy(), chunks=(1, 5, 5, 4)), 4, 2, two_class, 0.5, reduce="argmax")
    built = len(calls)
    lazy.compute(scheduler="sync")
    assert len(calls) == built  # the block tasks carry the checked options


CASES = [
    dict(roi_size=(5, 6, 4), sw_batch_size=3, overlap=0.5, mode="gaussian"),
    dict(roi_size=6, sw_batch_size=2, overlap=(0.5, 0.25, 0.4), mode="nnunet", weighting="patch*grid",
         confidence=True),
    dict(roi_size=(12, 5, 6), sw_batch_size=1, overlap=0.3, padding_mode="reflect", reduce="argmax",
         label_dtype=torch.int32),
    dict(roi_size=(5, 5, 5), sw_batch_size=4, overlap=0.5, placement="nnunet", weighting="grid", normalize="weight",
         reduce="threshold", threshold=0.2),
    dict(roi_size=4, sw_batch_size=2, overlap=0.5, weighting="patch", confidence=True, weigh_prediction=False,
         cval=0.5, padding_mode="constant"),
]


@settings(max_examples=20, deadline=None)
@given(case=st.sampled_from(range(len(CASES))), seed=st.integers(0, 1000),
       shape=st.tuples(st.integers(6, 11), st.integers(4, 10), st.integers(5, 9)))
def test_one_options_object_gives_both_drivers_bitwise_equal_results(case, seed, shape):
    """Where the weights enter the denominator (or starts repeat) the in-memory driver sums each batch before
    adding it and the blocks add one window at a time (docs/distributed.md): there both equal the in-memory
    driver's result at sw_batch_size=1, the options' other fields as given."""
    da = pytest.importorskip("dask.array")
    from patchblend.distributed import block_plan, sliding_window_inference as on_dask
    opts = SlidingWindowOptions(**CASES[case])
    image = np.random.default_rng(seed).standard_normal((1, *shape)).astype(np.float32)
    predictor = scored if opts.weighting else two_class
    with torch.no_grad():
        x = torch.from_numpy(image)[None]
        plan = block_plan(shape, resolve_roi(opts.roi_size, shape, 3), resolve_overlap(opts.overlap, 3),
                          [[s] for s in shape], opts.placement)
        general = opts.weights_in_denominator or not plan.grid.is_strict
        ref = run_sliding_window(x, predictor, dataclasses.replace(opts, sw_batch_size=1) if general else opts)
        by_keywords = patchblend.sliding_window_inference(x, predictor=predictor,
                                                           **dataclasses.replace(opts, sw_batch_size=1).keywords()
                                                           if general else opts.keywords())
    lazy = on_dask(da.from_array(image, chunks=(1, 4, 3, 5)), predictor=predictor, **opts.keywords())
    if opts.confidence:
        got = [a for a in da.compute(*lazy, scheduler="sync")]
        want = [ref.prediction[0], ref.confidence[0]]
        assert torch.equal(by_keywords.prediction, ref.prediction)
    else:
        got, want = [lazy.compute(scheduler="sync")], [ref[0]]
        assert torch.equal(by_keywords, ref)
    for g, w in zip(got, want):
        assert g.dtype == w.numpy().dtype and np.array_equal(g, w.numpy())


def test_monai_inferer_checks_its_options_when_made_and_reads_monais_attributes_at_each_call():
    pytest.importorskip("monai")
    from patchblend.integrations.monai import CalibratedSlidingWindowInferer
    with pytest.raises(ValueError, match="weighting"):
        CalibratedSlidingWindowInferer(4, weighting="voxel")
    with pytest.raises(TypeError, match="bogus"):
        CalibratedSlidingWindowInferer(4, bogus=1)
    inferer = CalibratedSlidingWindowInferer(4, 2, reduce="argmax")
    inferer.overlap = 0.5  # MONAI's attributes are read at every call, as MONAI reads them
    x = torch.rand(1, 1, 9, 10, 8)
    with torch.no_grad():
        ref = patchblend.sliding_window_inference(x, 4, 2, two_class, 0.5, reduce="argmax")
        assert torch.equal(inferer(x, two_class), ref)
        # an option given to a call holds for that call only
        assert torch.equal(inferer(x, two_class, reduce=None), patchblend.sliding_window_inference(x, 4, 2, two_class,
                                                                                                   0.5))
    assert inferer.options.reduce == "argmax"


def test_dask_driver_takes_monais_leading_options_by_position_or_by_name():
    da = pytest.importorskip("dask.array")
    from patchblend.distributed import sliding_window_inference as on_dask
    image = da.from_array(np.random.default_rng(3).standard_normal((1, 9, 10, 8)).astype(np.float32),
                          chunks=(1, 5, 5, 4))
    by_position = on_dask(image, 4, 2, two_class, 0.5, "gaussian", 0.2).compute(scheduler="sync")
    by_name = on_dask(image, 4, 2, two_class, overlap=0.5, mode="gaussian", sigma_scale=0.2).compute(scheduler="sync")
    assert np.array_equal(by_position, by_name)
    with pytest.raises(TypeError, match="multiple values for argument 'overlap'"):
        on_dask(image, 4, 2, two_class, 0.5, overlap=0.5)
    with pytest.raises(TypeError, match="at most 8 options"):
        on_dask(image, 4, 2, two_class, 0.5, "constant", 0.125, "constant", 0.0, None, None, False, None)
