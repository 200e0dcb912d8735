"""``sliding_window_inference`` on a Dask array or a Zarr array: one Dask task per output block.

Graph: for each output block, one task ``run_block`` that reads its input region (straight from the Zarr array,
or from ``getitem`` pieces of the Dask array's chunks), runs the block's windows and returns the blended block. The
predictor (a model, or a :class:`~patchblend.distributed.PredictorFactory`) is one key of the graph: Dask ships it
once to each worker that needs it, not with every task, and the worker keeps it built/moved to its device.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import numbers
import operator
import uuid
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

import dask.array as da
from dask.array.core import normalize_chunks
from dask.highlevelgraph import HighLevelGraph

from .. import CalibratedOutput
from ..inference._predictions import parse_output
from ..inference.confidence import PredictionWithConfidence
from ..inference.options import (SlidingWindowOptions, bind_positional_options, split_option_keywords,
                                 with_option_keywords)
from ..inference.sliding_window import resolve_importance, resolve_overlap, resolve_roi
from .plan import BlockPlan, block_plan
from .worker import BlockSpec, CallSpec, PredictorFactory, assemble_region, read_region, run_block, single_seg

__all__ = ["sliding_window_inference"]

logger = logging.getLogger("patchblend.distributed")


def _is_zarr_array(x) -> bool:
    return type(x).__module__.split(".")[0] == "zarr" and hasattr(x, "chunks") and hasattr(x, "shape")


def _torch_dtype(np_dtype) -> torch.dtype:
    try:
        return torch.from_numpy(np.empty(0, dtype=np_dtype)).dtype
    except TypeError as exc:
        raise TypeError(f"image dtype {np_dtype} has no torch equivalent") from exc


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    if dtype == torch.bfloat16:
        raise TypeError("a bfloat16 output has no numpy dtype: make the predictor return float32 or float16")
    return torch.empty(0, dtype=dtype).numpy().dtype


def _output_chunks(chunks, image, spatial):
    nd = len(spatial)
    if chunks is None:
        if isinstance(image, da.Array):
            return image.chunks[1:]
        return tuple(tuple(min(c, s - i) for i in range(0, s, c)) for c, s in zip(image.chunks[1:], spatial))
    if isinstance(chunks, Sequence) and not isinstance(chunks, str) and len(chunks) != nd:
        raise ValueError(f"chunks must give the {nd} spatial axes (an int, {nd} ints or {nd} tuples of block "
                         f"sizes), got {chunks!r}")
    try:
        out = normalize_chunks(chunks, shape=spatial, dtype=np.float32)
    except ValueError as exc:
        raise ValueError(f"chunks {chunks!r} do not fit the spatial shape {spatial}: {exc}") from None
    if any(min(c, default=0) < 1 for c in out):
        raise ValueError(f"chunks must be positive block sizes, got {chunks!r}")
    return out


def _probe(predictor, image_dtype, in_channels: int, roi, with_coord: bool, kwargs):
    """Call the predictor once on a zero window (on this machine) to learn its channels and dtype."""
    model = predictor.factory() if isinstance(predictor, PredictorFactory) else predictor
    x = torch.zeros((1, in_channels, *roi), dtype=image_dtype)
    with torch.no_grad():
        if with_coord:
            out = model(x, [[slice(0, 1), slice(None)] + [slice(0, r) for r in roi]], **kwargs)
        else:
            out = model(x, **kwargs)
    # read as a worker reads it (the scores are checked there, per batch)
    seg = single_seg(parse_output(out.seg if isinstance(out, CalibratedOutput) else out, 1, len(roi), None), roi)
    return int(seg.shape[1]), seg.dtype


def _check_image(image) -> None:
    if not (isinstance(image, da.Array) or _is_zarr_array(image)):
        raise TypeError(f"image must be a dask.array.Array or a zarr array [C, *spatial], got {type(image).__name__} "
                        "(wrap in-memory data with dask.array.from_array, or use patchblend.sliding_window_inference)")
    if len(image.shape) not in (3, 4):
        raise ValueError(f"image must be [C, H, W] or [C, D, H, W] (no batch dimension), got shape {image.shape}")
    if any(s < 1 for s in image.shape):
        raise ValueError(f"image must not be empty, got shape {image.shape}")
    if isinstance(image, da.Array) and any(math.isnan(c) for axis in image.chunks for c in axis):
        raise ValueError("image has unknown chunk sizes (NaN); call image.compute_chunk_sizes() first")


def _refuse_unsupported(options: SlidingWindowOptions, out_channels, kwargs) -> None:
    """Raise naming the options the block tasks do not take (``buffer_steps`` / ``buffer_dim`` are ignored: the
    blocks already bound the memory)."""
    if options.slab_axis is not None:
        raise ValueError("slab_axis is not supported by patchblend.distributed: the output blocks (chunks=) already "
                         "bound the memory")
    if options.progress:
        raise ValueError("progress=True is not supported here: use Dask's progress bar (dask.diagnostics."
                         "ProgressBar, or distributed.progress) or the dashboard")
    if options.process_fn is not None:
        raise NotImplementedError("process_fn is not supported; use weighting= with predictor scores instead")
    if options.tile_step_size is not None:
        raise ValueError("tile_step_size is not supported by patchblend.distributed: give overlap (with "
                         "placement='nnunet', read as tile_step_size = 1 - overlap)")
    if "condition" in kwargs:
        raise ValueError("a condition tensor is not supported by patchblend.distributed")
    if out_channels is not None and (isinstance(out_channels, bool) or not isinstance(out_channels, numbers.Integral)
                                     or out_channels < 1):
        raise ValueError(f"out_channels must be a positive int or None, got {out_channels!r}")


def _output_dtypes(options: SlidingWindowOptions, predictor, in_dtype, in_channels: int, roi, out_channels, kwargs):
    """``(out_channels, channels of the result, its numpy dtype, the confidence map's numpy dtype or None)``; the
    predictor is probed here when the channels or (for non-float input) the float dtype are needed and unknown."""
    seg_dtype = None
    if (out_channels is None and options.reduce != "argmax") or (
            (options.reduce is None or options.confidence) and not in_dtype.is_floating_point):
        out_channels, seg_dtype = _probe(predictor, in_dtype, in_channels, roi, options.with_coord, kwargs)
    float_dtype = in_dtype if in_dtype.is_floating_point else seg_dtype
    if options.reduce == "argmax":
        channels_out, np_dtype = 1, _numpy_dtype(options.label_dtype)
    elif options.reduce == "threshold":
        channels_out, np_dtype = out_channels, np.dtype(bool)
    else:
        channels_out, np_dtype = out_channels, _numpy_dtype(float_dtype)
    return out_channels, channels_out, np_dtype, _numpy_dtype(float_dtype) if options.confidence else None


def _importance_for_workers(options: SlidingWindowOptions, roi, in_dtype) -> Optional[torch.Tensor]:
    """``roi_weight_map`` checked as the in-memory driver checks it, on the CPU in the accumulation dtype (one key
    of the graph, shipped once to each worker), or None."""
    if options.roi_weight_map is None:
        return None
    acc = torch.float64 if in_dtype == torch.float64 else torch.float32
    rwm = torch.as_tensor(options.roi_weight_map).detach().to(device="cpu", dtype=acc)
    return resolve_importance(rwm, roi, options.mode, options.sigma_scale, acc, "cpu")[0]


#: the options this driver also takes by position, after the predictor (MONAI's order)
_POSITIONAL_OPTIONS = ("overlap", "mode", "sigma_scale", "padding_mode", "cval", "sw_device", "device", "progress")


def _block_options(options: SlidingWindowOptions, roi, overlaps, rwm) -> SlidingWindowOptions:
    """The options every block task carries: the window and overlap resolved, the devices given (default
    ``"cpu"``: a worker's), without ``roi_weight_map`` (``rwm``, one key of the graph, shipped once per worker;
    ``mode``, which it replaces, is then not read) and without MONAI's buffering (the blocks bound the memory)."""
    device = str(torch.device(options.device if options.device is not None else "cpu"))
    sw_device = str(torch.device(options.sw_device)) if options.sw_device is not None else device
    return dataclasses.replace(options, roi_size=roi, overlap=overlaps, device=device, sw_device=sw_device,
                               roi_weight_map=None, buffer_steps=None,
                               mode=options.mode if rwm is None else "constant")


@with_option_keywords(positional=_POSITIONAL_OPTIONS)
def sliding_window_inference(image, roi_size, sw_batch_size: int,
                             predictor: Union[Callable[..., Any], PredictorFactory], *args: Any, chunks=None,
                             out_channels: Optional[int] = None, return_plan: bool = False, **kwargs: Any):
    """Sliding-window inference of one large image, block by block on Dask; lazy.

    Same options and result as :func:`patchblend.sliding_window_inference` on ``image[None]`` (without the batch
    dimension: a :class:`~patchblend.inference.options.SlidingWindowOptions` built once and carried by every block
    task), computed per output block (see the module docstring and the Beyond one machine page). ``with_coord``
    slices refer to the padded whole image, batch index 0; ``kwargs`` other than the options go to the predictor
    and are pickled with every task, so keep them small. ``slab_axis``, ``progress``, ``process_fn``,
    ``tile_step_size`` and a ``condition`` raise; ``buffer_steps`` / ``buffer_dim`` are ignored.

    Args:
        image: ``[C_in, *S]`` (2 or 3 spatial axes), a ``dask.array.Array`` or a ``zarr`` array (read directly by
            each task: the cheapest input).
        predictor: a model / callable ``f(windows [n, C_in, *roi]) -> seg [n, C, *roi]`` or a
            :class:`~patchblend.CalibratedOutput`; shipped once to each worker. Or a
            :class:`~patchblend.distributed.PredictorFactory` to build it on each worker.
        device: where each worker cuts windows, runs the predictor and blends (default ``"cpu"``; ``"cuda"`` is the
            worker's GPU, e.g. one per worker with ``dask_cuda.LocalCUDACluster``). A ``torch.nn.Module`` is moved
            there once per worker. ``sw_device``: where the predictor runs, if not ``device``.
        chunks: output blocks, an int, one int per spatial axis or per-axis tuples (Dask's forms); default: the
            input's spatial chunks. Blocks of several ROIs along each axis keep the recompute factor low (see
            :func:`~patchblend.distributed.advise_block_size`).
        out_channels: the predictor's channel count ``C``; if None (and ``reduce != "argmax"``) the predictor is
            called once here on a zero window to find it.
        return_plan: also return the :class:`~patchblend.distributed.BlockPlan` (windows, blocks, recompute factor).

    Returns:
        A lazy ``dask.array.Array`` ``[C, *S]`` chunked ``((C,), *chunks)`` in the input's dtype (the predictor's for
        non-float input); with ``reduce="argmax"`` labels ``[1, *S]`` of ``label_dtype``, with ``"threshold"`` a bool
        mask ``[C, *S]``. With ``confidence=True``: a :class:`~patchblend.PredictionWithConfidence` of two lazy arrays,
        the prediction above and the confidence map ``[1, *S]`` (the prediction's float dtype, same chunks), made by
        the same block tasks (compute them together, e.g. ``dask.compute(*result)``, to run each block once). With
        ``return_plan``: ``(result, plan)``. The plan is also logged (logger ``patchblend.distributed``, level INFO).
    """
    _check_image(image)
    if not (callable(predictor) or isinstance(predictor, PredictorFactory)):
        raise TypeError("predictor must be callable (a model) or a patchblend.distributed.PredictorFactory")
    own, kwargs = split_option_keywords(kwargs)
    options = SlidingWindowOptions(roi_size, sw_batch_size, **bind_positional_options(args, own, _POSITIONAL_OPTIONS))
    _refuse_unsupported(options, out_channels, kwargs)
    in_channels, spatial = int(image.shape[0]), tuple(int(s) for s in image.shape[1:])
    roi = resolve_roi(options.roi_size, spatial, len(spatial))  # the in-memory driver's rules
    overlaps = resolve_overlap(options.overlap, len(spatial))
    out_chunks = _output_chunks(chunks, image, spatial)
    plan = block_plan(spatial, roi, overlaps, out_chunks, options.placement)
    in_dtype = _torch_dtype(np.dtype(image.dtype))
    rwm = _importance_for_workers(options, roi, in_dtype)
    out_channels, channels_out, np_dtype, conf_dtype = _output_dtypes(options, predictor, in_dtype, in_channels, roi,
                                                                      out_channels, kwargs)
    call = CallSpec(token=uuid.uuid4().hex, options=_block_options(options, roi, overlaps, rwm),
                    in_channels=in_channels, pad_lo=plan.pad_lo, image_shape=spatial, out_channels=out_channels,
                    kwargs=tuple(kwargs.items()))
    result = _lazy_result(call, plan, image, predictor, rwm, channels_out, out_chunks, np_dtype, conf_dtype)
    logger.info("patchblend.distributed.sliding_window_inference: %s", plan.summary())
    return (result, plan) if return_plan else result


def _lazy_result(call: CallSpec, plan: BlockPlan, image, predictor, rwm, channels_out: int, out_chunks, np_dtype,
                 conf_dtype):
    """The graph: one task per block, the predictor and the importance map one key each; the lazy result array
    (with ``confidence``, the pair of arrays)."""
    token, nd = call.token, len(out_chunks)
    name = f"patchblend-swi-{token}"
    pred_key = f"patchblend-predictor-{token}"
    dsk = {pred_key: predictor}
    rwm_key = None
    if rwm is not None:
        rwm_key = f"patchblend-importance-{token}"
        dsk[rwm_key] = rwm
    if isinstance(image, da.Array):
        _add_dask_blocks(dsk, name, token, call, plan, image, pred_key, rwm_key)
        deps = [image]
    else:
        src_key = f"patchblend-source-{token}"
        dsk[src_key] = image
        for index in plan.block_indices():
            dsk[(name, 0, *index)] = (_zarr_block, call, _block_spec(plan, index), src_key, pred_key, rwm_key)
        deps = []
    if not call.options.confidence:
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=deps)
        return da.Array(graph, name, chunks=((channels_out,), *out_chunks), dtype=np_dtype,
                        meta=np.empty((0,) * (nd + 1), dtype=np_dtype))
    return _split_prediction_and_confidence(name, dsk, deps, plan, channels_out, out_chunks, np_dtype, conf_dtype)


def _split_prediction_and_confidence(name, dsk, deps, plan, channels_out, out_chunks, np_dtype, conf_dtype):
    """With ``confidence``, each block task (key ``(name, 0, *index)`` in ``dsk``) returns ``(prediction block,
    confidence block)``: two arrays, each a layer of ``getitem`` tasks on those, over one graph."""
    nd = len(out_chunks)
    blocks = f"{name}-blocks"
    tasks = {(blocks, *key[1:]) if isinstance(key, tuple) and key[0] == name else key: task
             for key, task in dsk.items()}
    base = HighLevelGraph.from_collections(blocks, tasks, dependencies=deps)
    conf_name = f"{name}-confidence"
    parts = {name: {}, conf_name: {}}
    for index in plan.block_indices():
        parts[name][(name, 0, *index)] = (operator.getitem, (blocks, 0, *index), 0)
        parts[conf_name][(conf_name, 0, *index)] = (operator.getitem, (blocks, 0, *index), 1)
    layers, dependencies = dict(base.layers), dict(base.dependencies)
    for layer, part in parts.items():
        layers[layer], dependencies[layer] = part, {blocks}
    graph = HighLevelGraph(layers, dependencies)
    prediction = da.Array(graph, name, chunks=((channels_out,), *out_chunks), dtype=np_dtype,
                          meta=np.empty((0,) * (nd + 1), dtype=np_dtype))
    confidence = da.Array(graph, conf_name, chunks=((1,), *out_chunks), dtype=conf_dtype,
                          meta=np.empty((0,) * (nd + 1), dtype=conf_dtype))
    return PredictionWithConfidence(prediction, confidence)


def _block_spec(plan: BlockPlan, index, piece_offsets=()) -> BlockSpec:
    bounds = plan.block_bounds(index)
    region = plan.input_region(index)
    return BlockSpec(index=tuple(index), lo=tuple(lo for lo, _ in bounds), shape=tuple(hi - lo for lo, hi in bounds),
                     starts=plan.block_starts(index), region_lo=tuple(lo for lo, _ in region),
                     region_shape=tuple(hi - lo for lo, hi in region), piece_offsets=tuple(piece_offsets))


def _zarr_block(call, block, source, predictor, rwm):
    return run_block(call, block, read_region(source, block), predictor, rwm)


def _dask_block(call, block, pieces, dtype, predictor, rwm):
    region = assemble_region(pieces, block.piece_offsets, (call.in_channels, *block.region_shape), dtype)
    return run_block(call, block, region, predictor, rwm)


def _add_dask_blocks(dsk, name, token, call, plan, image, pred_key, rwm_key):
    """One task per block, fed by ``getitem`` pieces of the input chunks its region overlaps (a piece that is a
    whole chunk is the chunk's own key)."""
    piece_name = f"patchblend-region-{token}"
    bounds = [np.cumsum((0,) + tuple(c)) for c in image.chunks]  # chunk edges per axis (channel first)
    for index in plan.block_indices():
        region = plan.input_region(index)
        per_axis = []  # per spatial axis: [(chunk index, slice in chunk, offset in region)]
        for a, (lo, hi) in enumerate(region):
            edges = bounds[a + 1]
            first = int(np.searchsorted(edges, lo, side="right")) - 1
            parts = []
            for c in range(first, len(edges) - 1):
                c0, c1 = int(edges[c]), int(edges[c + 1])
                if c0 >= hi:
                    break
                a0, a1 = max(lo, c0), min(hi, c1)
                parts.append((c, slice(a0 - c0, a1 - c0), a0 - lo, a1 - a0 == c1 - c0))
            per_axis.append(parts)
        keys, offsets = [], []
        for ci in range(len(image.chunks[0])):
            for combo in itertools.product(*per_axis):
                chunk_key = (image.name, ci, *(p[0] for p in combo))
                offsets.append((int(bounds[0][ci]), *(p[2] for p in combo)))
                if all(p[3] for p in combo):
                    keys.append(chunk_key)
                else:
                    key = (piece_name, *index, len(keys))
                    dsk[key] = (operator.getitem, chunk_key, (slice(None), *(p[1] for p in combo)))
                    keys.append(key)
        spec = _block_spec(plan, index, offsets)
        dsk[(name, 0, *index)] = (_dask_block, call, spec, keys, np.dtype(image.dtype), pred_key, rwm_key)
