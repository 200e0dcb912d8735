"""patchblend.distributed: block-wise sliding-window inference on Dask equals the in-memory driver bit for bit.

Pure planning and hypothesis-drawn geometries run on Dask's synchronous scheduler (the same block tasks, no
processes); the rest on one LocalCluster of 2 worker processes shared by the module: many geometries computed in
one round trip, the predictor shipped once per worker, a worker killed mid-run, a resumed Zarr write, and errors.
"""
import itertools
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import patchblend

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")
cloudpickle = pytest.importorskip("cloudpickle")

import distributed_helpers as helpers  # noqa: E402  (tests/ is on sys.path)
from patchblend.distributed import (PredictorFactory, advise_block_size, block_plan, regular_chunks,  # noqa: E402
                                    sliding_window_inference, to_zarr)
from patchblend.inference import sliding_windows  # noqa: E402

cloudpickle.register_pickle_by_value(helpers)  # the workers need not import the test helpers


def driver(image: np.ndarray, roi, bs, predictor, **kw) -> np.ndarray:
    """The in-memory reference: patchblend.sliding_window_inference(image[None])[0]."""
    with torch.no_grad():
        return patchblend.sliding_window_inference(torch.from_numpy(image)[None], roi, bs, predictor, **kw)[0].numpy()


def volume(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def assert_bitwise(got: np.ndarray, ref: np.ndarray, what=""):
    assert got.shape == ref.shape and got.dtype == ref.dtype, (what, got.shape, ref.shape, got.dtype, ref.dtype)
    if not np.array_equal(got, ref):
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        raise AssertionError(f"{what}: {int((got != ref).sum())} voxels differ, max {diff.max()}")


# ---- the plan (no Dask scheduler) --------------------------------------------------------------------------------
@settings(max_examples=60)
@given(data=st.data())
def test_block_plan_runs_exactly_the_windows_that_meet_each_block(data):
    nd = data.draw(st.sampled_from([2, 3]))
    shape = tuple(data.draw(st.integers(1, 30)) for _ in range(nd))
    roi = tuple(data.draw(st.integers(1, 12)) for _ in range(nd))
    overlap = data.draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]))
    placement = data.draw(st.sampled_from(["monai", "nnunet"]))
    block = tuple(data.draw(st.integers(1, 31)) for _ in range(nd))
    assume(math.prod(-(-s // b) for s, b in zip(shape, block)) <= 2000)
    plan = block_plan(shape, roi, overlap, regular_chunks(shape, block), placement)
    # the driver's lattice: sliding windows over the image padded to the ROI, shifted back by the padding
    padded = tuple(max(r, s) for r, s in zip(roi, shape))
    pad_lo = tuple(max(r - s, 0) // 2 for r, s in zip(roi, shape))
    expected = [tuple(c - p for c, p in zip(w, pad_lo)) for w in itertools.product(*sliding_windows(
        padded, roi, overlap, placement).starts)]
    assert list(itertools.product(*plan.starts)) == expected
    runs = 0
    for index in plan.block_indices():
        bounds = plan.block_bounds(index)
        got = plan.block_starts(index)
        for a, (lo, hi) in enumerate(bounds):  # per axis: exactly the starts whose window meets the block
            assert got[a] == tuple(s for s in plan.starts[a] if s < hi and s + roi[a] > lo)
        if plan.num_blocks * len(expected) <= 5000:  # and in full, in the global order, for small cases
            meets = [w for w in expected if all(s < hi and s + r > lo for s, r, (lo, hi) in zip(w, roi, bounds))]
            assert list(itertools.product(*got)) == meets
        region = plan.input_region(index)
        for a, (lo, hi) in enumerate(region):  # the region holds every window's part inside the image
            assert lo == max(got[a][0], 0) and hi == min(got[a][-1] + roi[a], shape[a])
        runs += math.prod(len(g) for g in got)
    assert plan.window_runs == runs
    assert plan.recompute_factor == pytest.approx(runs / len(expected))


def test_recompute_factor_falls_with_the_block_size_and_advice_fits_the_budget():
    shape, roi = (400, 400, 400), (64, 64, 64)
    factors = [block_plan(shape, roi, 0.5, regular_chunks(shape, b)).recompute_factor for b in (32, 64, 128, 256)]
    assert factors == sorted(factors, reverse=True) and factors[0] > 8 > factors[-1]
    block = advise_block_size(shape, roi, 0.5, max_task_bytes=64 << 20)
    plan = block_plan(shape, roi, 0.5, regular_chunks(shape, block))
    assert all(b % 32 == 0 or b == s for b, s in zip(block, shape))  # a multiple of the step
    assert np.prod(plan.max_region_shape()) * 4 + np.prod(block) * 2 * 4 <= 64 << 20
    bigger = advise_block_size(shape, roi, 0.5, max_task_bytes=1 << 30)
    assert block_plan(shape, roi, 0.5, regular_chunks(shape, bigger)).recompute_factor < plan.recompute_factor


# ---- bitwise equality, many geometries, synchronous scheduler -------------------------------------------------
@settings(max_examples=20)
@given(data=st.data())
def test_blocks_equal_the_driver_bitwise(data):
    nd = data.draw(st.sampled_from([3, 3, 2]))
    shape = tuple(data.draw(st.integers(3, 22)) for _ in range(nd))
    roi = tuple(data.draw(st.integers(2, 10)) for _ in range(nd))
    overlap = data.draw(st.sampled_from([0.0, 0.25, 0.5, 0.6, 0.75]))
    mode = data.draw(st.sampled_from(["constant", "gaussian", "nnunet"]))
    weighting = data.draw(st.sampled_from([None, None, "patch", "grid", "patch*grid"]))
    normalize = data.draw(st.sampled_from([None, "count", "weight", "none"]))
    placement = data.draw(st.sampled_from(["monai", "nnunet"]))
    reduce = data.draw(st.sampled_from([None, None, "argmax", "threshold"]))
    padding = data.draw(st.sampled_from([("constant", 0.0), ("constant", 0.5), ("reflect", 0.0),
                                         ("replicate", 0.0)]))
    bs = data.draw(st.sampled_from([1, 1, 3]))
    dtype = data.draw(st.sampled_from([np.float32, np.float32, np.float64]))
    chunks = tuple(data.draw(st.integers(1, 12)) for _ in range(nd))
    in_chunks = tuple(data.draw(st.integers(2, 12)) for _ in range(nd))
    assume(math.prod(-(-s // c) for s, c in zip(shape, chunks)) <= 64)  # tasks, each a few ms
    image = volume((1, *shape), data.draw(st.integers(0, 3)), dtype)
    if padding[0] == "reflect":  # reflect needs the pad smaller than the image
        roi = tuple(min(r, 2 * s - 1) for r, s in zip(roi, shape))
    predictor = helpers.Calibrated() if weighting else helpers.two_class
    kw = dict(overlap=overlap, mode=mode, weighting=weighting, normalize=normalize, placement=placement,
              reduce=reduce, threshold=0.3, padding_mode=padding[0], cval=padding[1])
    ref = driver(image, roi, bs, predictor, **kw)
    x = da.from_array(image, chunks=(1, *in_chunks))
    got = sliding_window_inference(x, roi, bs, predictor, chunks=chunks, **kw).compute(scheduler="sync")
    general = (normalize or ("weight" if weighting is None else "count")) == "weight" and weighting is not None
    general = general or not block_plan(shape, roi, overlap, regular_chunks(shape, chunks), placement).grid.is_strict
    if bs > 1 and general:
        # The driver's Blender sums a batch before adding it, the blocks add one window at a time (bitwise
        # calibrated_blend of the windows in order, which the driver is at sw_batch_size=1): float tolerance
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
        assert_bitwise(got, driver(image, roi, 1, predictor, **kw), "sw_batch_size=1")
    else:
        assert_bitwise(got, ref)


@settings(max_examples=15)
@given(data=st.data())
def test_confidence_blocks_equal_the_driver_bitwise(data):
    # confidence=True: a PredictionWithConfidence of two lazy arrays, each equal to the driver's as the prediction is
    nd = data.draw(st.sampled_from([3, 3, 2]))
    shape = tuple(data.draw(st.integers(3, 20)) for _ in range(nd))
    roi = tuple(data.draw(st.integers(2, 9)) for _ in range(nd))
    overlap = data.draw(st.sampled_from([0.0, 0.25, 0.5, 0.75]))
    mode = data.draw(st.sampled_from(["constant", "gaussian"]))
    weighting = data.draw(st.sampled_from(["patch", "grid", "patch*grid"]))
    normalize = data.draw(st.sampled_from([None, "count", "weight"]))
    weigh_prediction = data.draw(st.booleans())
    placement = data.draw(st.sampled_from(["monai", "nnunet"]))
    reduce = data.draw(st.sampled_from([None, None, "argmax"]))
    bs = data.draw(st.sampled_from([1, 1, 3]))
    chunks = tuple(data.draw(st.integers(2, 12)) for _ in range(nd))
    assume(math.prod(-(-s // c) for s, c in zip(shape, chunks)) <= 48)
    image = volume((1, *shape), data.draw(st.integers(0, 3)))
    kw = dict(overlap=overlap, mode=mode, weighting=weighting, normalize=normalize, placement=placement,
              reduce=reduce, confidence=True, weigh_prediction=weigh_prediction)
    with torch.no_grad():
        ref = patchblend.sliding_window_inference(torch.from_numpy(image)[None], roi, bs, helpers.Calibrated(), **kw)
    got = sliding_window_inference(da.from_array(image, chunks=(1, *[5] * nd)), roi, bs, helpers.Calibrated(),
                                   chunks=chunks, **kw)
    assert isinstance(got, patchblend.PredictionWithConfidence)
    assert got.confidence.shape == (1, *shape) and got.confidence.chunks[1:] == got.prediction.chunks[1:]
    prediction, confidence = dask.compute(*got, scheduler="sync")  # together: each block task runs once
    assert_bitwise(confidence, ref.confidence[0].numpy(), "confidence")
    general = (normalize or ("count" if weigh_prediction else "weight")) == "weight" and weigh_prediction
    general = general or not block_plan(shape, roi, overlap, regular_chunks(shape, chunks), placement).grid.is_strict
    if bs > 1 and general:  # the prediction's known case (see test_blocks_equal_the_driver_bitwise)
        np.testing.assert_allclose(prediction, ref.prediction[0].numpy(), rtol=1e-5, atol=1e-5)
    else:
        assert_bitwise(prediction, ref.prediction[0].numpy(), "prediction")


def test_confidence_errors_and_integer_input():
    image = volume((1, 12, 11, 10), 1)
    x = da.from_array(image, chunks=(1, 6, 6, 6))
    with pytest.raises(ValueError, match="confidence=True needs weighting"):
        sliding_window_inference(x, 5, 2, helpers.Calibrated(), confidence=True)
    with pytest.raises(ValueError, match="weigh_prediction=False needs confidence=True"):
        sliding_window_inference(x, 5, 2, helpers.Calibrated(), weighting="grid", weigh_prediction=False)
    with pytest.raises(ValueError, match="confidence=True needs normalize"):
        sliding_window_inference(x, 5, 2, helpers.Calibrated(), weighting="grid", normalize="none", confidence=True)
    u8 = (image * 40 + 100).astype(np.uint8)

    def scored_float(w):
        out = helpers.Calibrated()(w.float())
        return patchblend.CalibratedOutput(out.seg, out.patch, out.grid)

    got = sliding_window_inference(da.from_array(u8, chunks=(1, 6, 6, 6)), 5, 2, scored_float, overlap=0.5,
                                   weighting="grid", confidence=True, reduce="argmax", chunks=(4, 11, 5))
    assert got.prediction.dtype == np.int64 and got.confidence.dtype == np.float32
    with torch.no_grad():
        ref = patchblend.sliding_window_inference(torch.from_numpy(u8)[None], 5, 2, scored_float, overlap=0.5,
                                                  weighting="grid", confidence=True, reduce="argmax")
    for g, r, what in zip(dask.compute(*got, scheduler="sync"), ref, ("labels", "confidence")):
        assert_bitwise(g, r[0].numpy(), what)


def test_integer_input_predictor_keywords_coords_and_a_weight_map_equal_the_driver():
    image = (volume((1, 19, 23, 17), 4) * 40 + 100).astype(np.uint8)
    x = da.from_array(image, chunks=(1, 8, 8, 8))
    kw = dict(overlap=0.5, scale=0.02)
    got = sliding_window_inference(x, 7, 2, helpers.float_two_class, chunks=(6, 9, 17), **kw)
    assert got.dtype == np.float32  # the predictor's dtype, as the driver for a non-float input
    assert_bitwise(got.compute(scheduler="sync"), driver(image, 7, 2, helpers.float_two_class, **kw), "uint8")
    image = volume((1, 19, 23, 17), 6)
    x = da.from_array(image, chunks=(1, 8, 8, 8))
    weight_map = torch.rand(7, 6, 5, generator=torch.Generator().manual_seed(0)) + 0.1
    kw = dict(overlap=0.4, with_coord=True, roi_weight_map=weight_map, cval=0.25)
    got = sliding_window_inference(x, (7, 6, 5), 3, helpers.CoordAware(), chunks=(5, 11, 9), **kw)
    assert_bitwise(got.compute(scheduler="sync"), driver(image, (7, 6, 5), 3, helpers.CoordAware(), **kw), "coords")


def test_threshold_keeps_values_exactly_at_the_threshold():
    """reduce="threshold" is value >= threshold in the blocks too: a blended value exactly at it (0.375, exact in
    binary) is True, one below it False, as in the in-memory driver."""
    image = np.full((1, 12, 10, 9), 0.375, np.float32)
    image[..., 5:] = 0.25
    x = da.from_array(image, chunks=(1, 6, 5, 5))
    kw = dict(overlap=0.5, reduce="threshold", threshold=0.375)
    got = sliding_window_inference(x, 4, 3, torch.nn.Identity(), chunks=(6, 5, 5), **kw).compute(scheduler="sync")
    assert got.dtype == np.bool_ and got[..., :5].all() and not got[..., 5:].any()
    assert_bitwise(got, driver(image, 4, 3, torch.nn.Identity(), **kw), "threshold tie")


def test_a_float_roi_size_is_read_as_by_the_driver():
    """roi_size=(6.0, 6, 6) is 6 per axis in both drivers (it was a TypeError on Dask); 6.5 is refused by both."""
    image = volume((1, 13, 11, 12), 8)
    x = da.from_array(image, chunks=(1, 7, 6, 6))
    got = sliding_window_inference(x, (6.0, 6, 6), 2, helpers.two_class, overlap=0.5, mode="gaussian")
    ref = driver(image, (6.0, 6, 6), 2, helpers.two_class, overlap=0.5, mode="gaussian")
    assert_bitwise(got.compute(scheduler="sync"), ref, "float roi_size")
    assert_bitwise(ref, driver(image, 6, 2, helpers.two_class, overlap=0.5, mode="gaussian"), "6.0 is 6")
    with pytest.raises(TypeError, match="roi_size") as in_memory:
        driver(image, (6.5, 6, 6), 2, helpers.two_class)
    with pytest.raises(TypeError, match="roi_size") as on_dask:
        sliding_window_inference(x, (6.5, 6, 6), 2, helpers.two_class, out_channels=2)
    assert str(on_dask.value) == str(in_memory.value)


def test_label_dtype_is_checked_by_the_drivers_one_rule():
    """A floating label_dtype holds small argmax labels exactly: both drivers accept it and give the same labels (it
    was refused on Dask only); a dtype too narrow for the classes or not a dtype is refused by both alike."""
    image = volume((1, 12, 12, 12), 10)
    x = da.from_array(image, chunks=(1, 6, 6, 6))
    for dt in (torch.float32, torch.float16, torch.uint8):
        ref = driver(image, 6, 2, helpers.two_class, overlap=0.5, reduce="argmax", label_dtype=dt)
        got = sliding_window_inference(x, 6, 2, helpers.two_class, overlap=0.5, reduce="argmax", label_dtype=dt)
        got = got.compute(scheduler="sync")
        assert got.dtype == ref.dtype and ref.dtype == torch.empty(0, dtype=dt).numpy().dtype
        assert_bitwise(got, ref, f"label_dtype {dt}")
    for bad, error in ((torch.bool, TypeError), ("int64", TypeError)):
        with pytest.raises(error, match="label_dtype") as in_memory:
            driver(image, 6, 2, helpers.two_class, reduce="argmax", label_dtype=bad)
        with pytest.raises(error, match="label_dtype") as on_dask:
            sliding_window_inference(x, 6, 2, helpers.two_class, reduce="argmax", label_dtype=bad)
        assert str(on_dask.value) == str(in_memory.value)
    many = lambda w: helpers.two_class(w).repeat(1, 150, *([1] * (w.ndim - 2)))  # noqa: E731  (300 classes)
    with pytest.raises(ValueError, match="label_dtype torch.uint8 cannot hold"):
        driver(image, 6, 2, many, reduce="argmax", label_dtype=torch.uint8)
    with pytest.raises(ValueError, match="label_dtype torch.uint8 cannot hold"):
        sliding_window_inference(x, 6, 2, many, reduce="argmax", label_dtype=torch.uint8).compute(scheduler="sync")


def test_multi_output_predictors_are_refused_by_name_and_one_item_lists_equal_the_driver():
    """MONAI's multi-output forms (a dict, a tuple of several outputs) would each need their own Dask array: refused
    naming the predictor output, whether the probe (no out_channels) or a block task meets it first. A one-item list
    is one tensor in the in-memory driver (as in MONAI), and the same on Dask."""
    image = volume((1, 12, 12, 12), 9)
    x = da.from_array(image, chunks=(1, 6, 6, 6))
    as_dict = lambda w: {"b": helpers.two_class(w), "a": helpers.two_class(w)}  # noqa: E731
    for predictor, form in ((helpers.returns_tuple, "2 outputs"), (as_dict, r"a dict with keys \['a', 'b'\]")):
        for kw in (dict(out_channels=2), {}):
            with pytest.raises(ValueError, match=f"predictor output is MONAI's multi-output form \\({form}\\)"):
                sliding_window_inference(x, 6, 2, predictor, **kw).compute(scheduler="sync")
    as_list = lambda w: [helpers.two_class(w)]  # noqa: E731
    ref = driver(image, 6, 2, as_list, overlap=0.5)
    assert_bitwise(ref, driver(image, 6, 2, helpers.two_class, overlap=0.5), "one-item list in memory")
    got = sliding_window_inference(x, 6, 2, as_list, overlap=0.5).compute(scheduler="sync")
    assert_bitwise(got, ref, "one-item list on Dask")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_blocks_on_the_gpu_equal_the_driver_on_the_gpu():
    image = volume((1, 21, 18, 16), 2)
    kw = dict(overlap=0.5, mode="gaussian", weighting="patch*grid")
    x = da.from_array(image, chunks=(1, 8, 8, 8))
    got = sliding_window_inference(x, 8, 2, helpers.Calibrated(), chunks=(9, 10, 16), device="cuda", **kw)
    with torch.no_grad():
        ref = patchblend.sliding_window_inference(torch.from_numpy(image)[None].cuda(), 8, 2, helpers.Calibrated(),
                                                  **kw)[0].cpu().numpy()
    np.testing.assert_allclose(got.compute(scheduler="sync"), ref, rtol=1e-6, atol=1e-6)


# ---- on a LocalCluster of 2 worker processes ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                       silence_logs=40)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


CASES = [
    # (name, image shape, image chunks, roi, sw_batch_size, output chunks, keywords)
    ("chunks smaller than the ROI, gaussian", (1, 23, 30, 17), (1, 10, 11, 6), 8, 1, (5, 7, 6),
     dict(overlap=0.5, mode="gaussian")),
    ("chunks larger than the ROI, 2 channels chunked apart", (2, 19, 26, 21), (1, 12, 12, 12), (8, 9, 7), 2,
     (12, 25, 21), dict(overlap=0.25)),
    ("overlap 0, argmax into uint8", (1, 20, 17, 25), (1, 20, 17, 25), 6, 4, (7, 7, 7),
     dict(overlap=0.0, reduce="argmax", label_dtype=torch.uint8)),
    ("overlap 0.75, calibrated patch*grid", (1, 21, 18, 16), (1, 8, 8, 8), (8, 8, 6), 1, (9, 10, 16),
     dict(overlap=0.75, mode="gaussian", weighting="patch*grid")),
    ("weights in the denominator (driver's Blender)", (1, 17, 22, 19), (1, 9, 9, 9), 7, 1, (6, 11, 19),
     dict(overlap=0.6, mode="nnunet", weighting="grid", normalize="weight")),
    ("nnU-Net placement, threshold", (1, 25, 13, 20), (1, 25, 13, 20), (9, 6, 8), 3, (8, 8, 8),
     dict(overlap=0.5, placement="nnunet", reduce="threshold", threshold=0.4)),
    ("ROI larger than the image, reflect padding", (1, 15, 30, 12), (1, 15, 10, 12), (20, 8, 12), 1, (15, 9, 12),
     dict(overlap=0.5, padding_mode="reflect", mode="gaussian")),
    ("2D, float64", (1, 37, 29), (1, 20, 20), (8, 10), 1, (9, 12), dict(overlap=0.5, mode="gaussian")),
]


def test_cluster_equals_driver_bitwise(client):
    images, results, refs = [], [], []
    for name, shape, in_chunks, roi, bs, chunks, kw in CASES:
        image = volume(shape, len(images), np.float64 if name.endswith("float64") else np.float32)
        predictor = helpers.Calibrated() if kw.get("weighting") else helpers.two_class
        x = da.from_array(image, chunks=in_chunks)
        results.append(sliding_window_inference(x, roi, bs, predictor, chunks=chunks, **kw))
        refs.append(driver(image, roi, bs, predictor, **kw))
        images.append(image)
    got = dask.compute(*results)  # one round trip for every case
    for (name, *_), g, r in zip(CASES, got, refs):
        assert_bitwise(g, r, name)


def test_zarr_input_and_model_shipped_once_per_worker(client, tmp_path):
    image = volume((1, 30, 28, 26), 5)
    z = zarr.create_array(tmp_path / "in.zarr", shape=image.shape, chunks=(1, 10, 10, 10), dtype="f4")
    z[...] = image
    model = helpers.Conv()
    notes = ("PB_TEST_MODEL_IDS", "PB_TEST_BUILT_IDS", "PB_TEST_FACTORY_CALLS")
    client.run(helpers.clear_notes, *notes)
    probs = sliding_window_inference(z, 8, 2, model, overlap=0.5, mode="gaussian")  # 27 blocks from the zarr chunks
    built = sliding_window_inference(z, 8, 2, PredictorFactory(helpers.make_conv), overlap=0.5, mode="gaussian",
                                     out_channels=3)
    assert probs.chunks == ((3,), (10, 10, 10), (10, 10, 8), (10, 10, 6))
    got_probs, got_built = dask.compute(probs, built)
    ref = driver(image, 8, 2, model, overlap=0.5, mode="gaussian")
    assert_bitwise(got_probs, ref, "model")
    assert_bitwise(got_built, ref, "factory")
    # each worker that ran blocks held one model object (shipped, or built by the factory once), however many
    # blocks it ran
    for note in notes:
        seen = client.run(helpers.process_notes, note)
        assert all(len(v) <= 1 for v in seen.values()) and any(seen.values()), (note, seen)


def test_cluster_confidence_equals_driver_bitwise(client):
    image = volume((1, 21, 18, 16), 5)
    kw = dict(overlap=0.5, mode="gaussian", weighting="grid", confidence=True, weigh_prediction=False)
    got = sliding_window_inference(da.from_array(image, chunks=(1, 8, 8, 8)), 8, 2, helpers.Calibrated(),
                                   chunks=(9, 10, 16), **kw)
    with torch.no_grad():
        ref = patchblend.sliding_window_inference(torch.from_numpy(image)[None], 8, 2, helpers.Calibrated(), **kw)
    prediction, confidence = client.compute(list(got), sync=True)
    assert_bitwise(prediction, ref.prediction[0].numpy(), "prediction")
    assert_bitwise(confidence, ref.confidence[0].numpy(), "confidence")


def test_worker_killed_mid_run_still_gives_the_whole_result(client, tmp_path):
    image = volume((1, 24, 24, 24), 7)
    marker = str(tmp_path / "started")
    slow = helpers.Slow(marker, delay=0.02)
    lazy = sliding_window_inference(da.from_array(image, chunks=(1, 8, 8, 8)), 8, 1, slow, overlap=0.5,
                                    out_channels=2)  # 27 blocks, 27 windows each (~0.6 s a block)
    future = client.compute(lazy)
    deadline = time.monotonic() + 60
    while not os.path.exists(marker):
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.05)
    pids = client.run(os.getpid)
    victim = next(iter(pids.values()))
    os.kill(victim, signal.SIGKILL)
    got = future.result(timeout=120)
    assert_bitwise(got, driver(image, 8, 1, helpers.two_class, overlap=0.5), "after a worker was killed")
    assert victim not in client.run(os.getpid).values()  # it really died (the nanny started a new one)
    client.wait_for_workers(2, timeout=60)


def test_to_zarr_resumes_skipping_the_chunks_already_written(client, tmp_path):
    image = volume((1, 20, 18, 16), 9)
    probs = sliding_window_inference(da.from_array(image, chunks=(1, 7, 7, 7)), 6, 2, helpers.two_class,
                                     overlap=0.5, mode="gaussian", out_channels=2)
    ref = driver(image, 6, 2, helpers.two_class, overlap=0.5, mode="gaussian")
    store = tmp_path / "probs.zarr"
    lazy, z = to_zarr(probs, store, compute=False)
    lazy[:4].compute()  # "interrupted" after 4 of the 27 chunks
    blocks = list(np.ndindex(*probs.numblocks))
    done = blocks[:4]

    def region(idx):
        return tuple(slice(int(sum(c[:i])), int(sum(c[:i + 1]))) for c, i in zip(probs.chunks, idx))

    for idx in done:  # mark the written chunks: a resumed run must not touch them
        z[region(idx)] = -7.0
    report = to_zarr(probs, store)
    assert (report.written, report.skipped) == (23, 4)
    out = zarr.open_array(store, mode="r")[...]
    for idx in blocks:
        expected = -7.0 if idx in done else ref[region(idx)]
        np.testing.assert_array_equal(out[region(idx)], np.broadcast_to(expected, out[region(idx)].shape),
                                      err_msg=str(idx))
    again = to_zarr(probs, store)
    assert (again.written, again.skipped) == (0, 27)
    fresh = to_zarr(probs, tmp_path / "fresh.zarr")
    assert_bitwise(zarr.open_array(tmp_path / "fresh.zarr", mode="r")[...], ref, "resumable writer")
    assert fresh.written == 27
    probs.to_zarr(str(tmp_path / "plain.zarr"))  # Dask's own writer works on the same array
    assert_bitwise(da.from_zarr(str(tmp_path / "plain.zarr")).compute(), ref, "dask to_zarr")


def test_predictor_errors_on_a_worker_reach_the_caller(client):
    x = da.from_array(volume((1, 12, 12, 12)), chunks=(1, 6, 6, 6))
    with pytest.raises(RuntimeError, match="predictor exploded on purpose"):
        sliding_window_inference(x, 6, 1, helpers.exploding, out_channels=2).compute()
    with pytest.raises(ValueError, match="multi-output"):
        sliding_window_inference(x, 6, 1, helpers.returns_tuple, out_channels=2).compute()
    with pytest.raises(ValueError, match="out_channels=3"):
        sliding_window_inference(x, 6, 1, helpers.two_class, out_channels=3).compute()


# ---- bad input ----------------------------------------------------------------------------------------------
def test_bad_input_is_named():
    image = volume((1, 12, 12, 12))
    x = da.from_array(image, chunks=(1, 6, 6, 6))
    for bad in (image, torch.from_numpy(image)):
        with pytest.raises(TypeError, match="image must be a dask.array.Array or a zarr array"):
            sliding_window_inference(bad, 6, 1, helpers.two_class)
    with pytest.raises(ValueError, match="image must be"):
        sliding_window_inference(x[0, 0], 6, 1, helpers.two_class)
    with pytest.raises(ValueError, match="chunks"):
        sliding_window_inference(x, 6, 1, helpers.two_class, chunks=((6, 5), (12,), (12,)))
    with pytest.raises(ValueError, match="chunks"):
        sliding_window_inference(x, 6, 1, helpers.two_class, chunks=(1, 6, 6, 6))
    with pytest.raises(ValueError, match="slab_axis"):
        sliding_window_inference(x, 6, 1, helpers.two_class, slab_axis=0)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(x, 6, 1, helpers.two_class, overlap=1.0)
    with pytest.raises(ValueError, match="sw_batch_size"):
        sliding_window_inference(x, 6, 0, helpers.two_class)
    with pytest.raises(TypeError, match="predictor"):
        sliding_window_inference(x, 6, 1, "model")
    with pytest.raises(RuntimeError, match="exploded"):  # probing the channel count runs the predictor here
        sliding_window_inference(x, 6, 1, helpers.exploding)
    with pytest.raises(TypeError, match="factory"):
        PredictorFactory(3)


def test_to_zarr_refuses_what_it_cannot_resume(tmp_path):
    probs = sliding_window_inference(da.from_array(volume((1, 12, 12, 12)), chunks=(1, 6, 6, 6)), 6, 1,
                                     helpers.two_class, out_channels=2)
    with pytest.raises(ValueError, match="regular"):
        to_zarr(probs.rechunk({1: (5, 7)}), tmp_path / "a.zarr")
    to_zarr(probs[:, :6], tmp_path / "b.zarr", compute=False)
    with pytest.raises(ValueError, match="overwrite=True"):
        to_zarr(probs, tmp_path / "b.zarr")
    with pytest.raises(TypeError, match="dask"):
        to_zarr(np.zeros(3), tmp_path / "c.zarr")


def test_import_patchblend_stays_light():
    code = ("import sys, patchblend; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'dask', 'zarr', 'distributed'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=pathlib.Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_docs_page_runs():
    part = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "distributed.md").read_text()
    namespace = {}
    for block in re.findall(r"```python\n(.*?)```", part, flags=re.S):
        exec(compile(block, "docs/distributed.md", "exec"), namespace)  # noqa: S102
    assert namespace["labels"].shape == (1, 40, 48, 36)
