"""What one Dask task does on a worker: run the windows that meet one output block and blend its voxels.

The block runs the in-memory driver's own pipeline steps (:mod:`patchblend.inference.sliding_window`): the call's
:class:`~patchblend.inference.options.SlidingWindowOptions` resolved against the block's input
(:func:`~patchblend.inference.sliding_window.resolve_call`), the padding helper
(:func:`~patchblend.inference.sliding_window.pad_for_windows`), the predictor's output read and its scores checked
(``parse_output``, ``ScoreChecks``) and the blend and finish of
:class:`~patchblend.inference.sliding_window.OutputBlend` (the importance map, the accumulator the in-memory driver
would choose, the float64 scores cast, argmax / threshold / dtype, the confidence map), on the block's windows in
their global order and in the block's coordinates; so the two drivers cannot drift apart. Where the weights enter
the denominator the block adds one window at a time (``window_by_window``): bitwise ``calibrated_blend`` of the
windows in order, the in-memory driver's result at ``sw_batch_size=1``. Windows are cut with
:func:`patchblend.extract_patches` from the block's input region (in the input's dtype; from the padded region for
non-zero padding).
"""
from __future__ import annotations

import copy
import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import extract_patches
from ..inference import WindowGrid
from ..inference._predictions import Prediction, parse_output
from ..inference.options import SlidingWindowOptions
from ..inference.sliding_window import OutputBlend, WindowPlan, pad_for_windows, resolve_call

__all__ = ["PredictorFactory", "BlockSpec", "CallSpec", "run_block", "assemble_region", "read_region"]


class PredictorFactory:
    """A zero-argument ``factory`` that builds the predictor on each worker (once per worker and call), instead of
    shipping a built model: ``sliding_window_inference(image, roi, 4, PredictorFactory(make_model))``.

    The factory itself is pickled to the workers, so it should be small (a module-level function, or a
    ``functools.partial`` of one with a checkpoint path). A ``torch.nn.Module`` it returns is moved to the
    call's ``device`` on the worker."""

    def __init__(self, factory: Callable[[], Callable]):
        if not callable(factory):
            raise TypeError(f"factory must be a zero-argument callable, got {type(factory).__name__}")
        self.factory = factory

    def __repr__(self) -> str:
        return f"PredictorFactory({self.factory!r})"


@dataclass(frozen=True)
class CallSpec:
    """The per-call settings every block task shares (small; pickled with each task)."""

    token: str  # unique per call: the key of the predictor cache on a worker
    options: SlidingWindowOptions  # roi_size and overlap resolved, devices given, no roi_weight_map (its own key)
    in_channels: int
    pad_lo: Tuple[int, ...]  # padding before the image per axis (ROI larger than the image)
    image_shape: Tuple[int, ...]
    out_channels: Optional[int]  # checked against the predictor when known
    kwargs: Tuple[Tuple[str, Any], ...]  # the predictor's keyword arguments


@dataclass(frozen=True)
class BlockSpec:
    """One block: where it is, its windows (per-axis starts in image coordinates) and its input region."""

    index: Tuple[int, ...]
    lo: Tuple[int, ...]
    shape: Tuple[int, ...]
    starts: Tuple[Tuple[int, ...], ...]
    region_lo: Tuple[int, ...]
    region_shape: Tuple[int, ...]
    piece_offsets: Tuple[Tuple[int, ...], ...] = ()  # dask input: where each input piece goes in the region


# ---- the predictor on a worker ---------------------------------------------------------------------------------
_CACHE: "OrderedDict[tuple, Callable]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4  # predictors of the last few calls stay built on a worker


def _module_device(module: torch.nn.Module) -> Optional[torch.device]:
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return None


def worker_predictor(predictor, token: str, device: str) -> Callable:
    """The predictor of call ``token`` on this worker process, built (a :class:`PredictorFactory`) or moved to
    ``device`` (a ``torch.nn.Module``, copied first so that the object Dask holds stays as it came) once per
    worker and call."""
    key = (token, device)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        built = predictor.factory() if isinstance(predictor, PredictorFactory) else predictor
        if not callable(built):
            raise TypeError(f"the predictor factory must return a callable, got {type(built).__name__}")
        if isinstance(built, torch.nn.Module):
            dev = _module_device(built)
            if dev is not None and dev != torch.device(device):
                built = (built if isinstance(predictor, PredictorFactory) else copy.deepcopy(built)).to(device)
        _CACHE[key] = built
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return built


def clear_worker_cache() -> None:
    """Forget every predictor built on this process (e.g. ``client.run(clear_worker_cache)``)."""
    with _CACHE_LOCK:
        _CACHE.clear()


# ---- input regions -----------------------------------------------------------------------------------------------
def read_region(source, spec: BlockSpec) -> np.ndarray:
    """The block's input region ``[C, *region_shape]`` read straight from an array-like (a zarr array)."""
    sl = (slice(None),) + tuple(slice(lo, lo + n) for lo, n in zip(spec.region_lo, spec.region_shape))
    return np.asarray(source[sl])


def assemble_region(pieces: Sequence[np.ndarray], offsets: Sequence[Tuple[int, ...]], shape, dtype) -> np.ndarray:
    """Copy ``pieces`` (parts of input chunks) to their ``offsets`` (channel first) in a new ``[C, *R]`` array."""
    if len(pieces) == 1 and tuple(pieces[0].shape) == tuple(shape):
        return np.asarray(pieces[0])
    out = np.empty(shape, dtype=dtype)
    for piece, off in zip(pieces, offsets):
        out[tuple(slice(o, o + n) for o, n in zip(off, piece.shape))] = piece
    return out


# ---- the block ---------------------------------------------------------------------------------------------------
def single_seg(pred: Prediction, roi) -> torch.Tensor:
    """The one output ``seg [n, C, *roi]`` of a parsed predictor call (read by the in-memory driver's
    :func:`~patchblend.inference._predictions.parse_output`); a dict, or a tuple/list of several outputs, is refused
    (MONAI's multi-output form: each output would need its own Dask array)."""
    if pred.keys is not None or len(pred.segs) != 1:
        form = f"a dict with keys {pred.keys}" if pred.keys is not None else f"{len(pred.segs)} outputs"
        raise ValueError(f"the predictor output is MONAI's multi-output form ({form}): multi-output predictors are "
                         "not supported by patchblend.distributed; return one tensor [n, C, *roi], or "
                         "patchblend.CalibratedOutput(seg, patch, grid) for calibrated weighting (or use "
                         "patchblend.sliding_window_inference, which supports them)")
    seg = pred.segs[0]
    if tuple(seg.shape[2:]) != tuple(roi):
        raise ValueError(f"predictor output seg must be [{seg.shape[0]}, C, {', '.join(map(str, roi))}] for a batch "
                         f"of {seg.shape[0]} windows, got {tuple(seg.shape)} (outputs at another resolution are not "
                         "supported by patchblend.distributed)")
    return seg


def run_block(call: CallSpec, block: BlockSpec, region: np.ndarray, predictor,
              roi_weight_map: Optional[torch.Tensor] = None):
    """The output block ``[C_out, *block.shape]`` (labels ``[1, ...]`` with argmax) as a numpy array; with
    ``call.options.confidence`` a pair ``(that, confidence block [1, *block.shape])``.

    ``region`` is the input ``[C_in, *block.region_shape]`` at ``block.region_lo``; the block's windows are blended
    by the in-memory driver's :class:`~patchblend.inference.sliding_window.OutputBlend`."""
    with torch.no_grad():
        return _run_block(call, block, region, predictor, roi_weight_map)


def _block_input(call: CallSpec, block: BlockSpec, region: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """The region as a tensor ``[C_in, *R]``, padded as the in-memory driver pads the image (the region spans the
    whole of every padded axis, so padding it gives that part of the padded image), and where it starts in image
    coordinates (windows reaching outside it read zeros: ``extract_patches``)."""
    x = torch.from_numpy(np.ascontiguousarray(region))
    padded = pad_for_windows(x[None], call.options.roi_size, call.image_shape, call.options)
    if padded is None:
        return x, block.region_lo
    return padded[0], tuple(lo - p for lo, p in zip(block.region_lo, call.pad_lo))


def _block_plan(block: BlockSpec, roi) -> WindowPlan:
    """The block's windows (those of the global lattice that meet it, in global raster order) in the block's
    coordinates, as the in-memory driver's window plan of an image the size of the block."""
    nd = len(roi)
    starts = tuple(tuple(s - lo for s in axis) for axis, lo in zip(block.starts, block.lo))
    coords = torch.tensor(list(itertools.product(*starts)), dtype=torch.int64).reshape(-1, nd)
    coords3 = (torch.nn.functional.pad(coords, (3 - nd, 0)) if nd < 3 else coords).contiguous()
    return WindowPlan(pad_lo=(0,) * nd, padded=tuple(block.shape), image_grid=WindowGrid(block.shape, roi, starts),
                      coords_pad=coords, coords=coords, coords_pad3=coords3, coords3=coords3)


def _check_channels(seg: torch.Tensor, expected: Optional[int]) -> None:
    if expected is not None and seg.shape[1] != expected:
        raise ValueError(f"the predictor returned {seg.shape[1]} channels but out_channels={expected}")


def _run_block(call: CallSpec, block: BlockSpec, region: np.ndarray, predictor, roi_weight_map):
    options = call.options
    roi, nd = options.roi_size, len(options.roi_size)
    predictor = worker_predictor(predictor, call.token, options.sw_device)
    x, origin = _block_input(call, block, region)
    plan = _block_plan(block, roi)
    outputs = OutputBlend(resolve_call(x[None], options), plan, roi_weight_map, window_by_window=True)
    windows = plan.coords + torch.tensor(block.lo)  # in image coordinates
    local = windows - torch.tensor(origin)  # in the (padded) region
    kwargs = dict(call.kwargs)
    for b0 in range(0, windows.shape[0], options.sw_batch_size):
        b1 = min(b0 + options.sw_batch_size, windows.shape[0])
        win = extract_patches(x, local[b0:b1], roi).to(outputs.call.sw_device)
        if options.with_coord:
            slices = [[slice(0, 1), slice(None)] + [slice(s + p, s + p + r) for s, p, r in zip(c, call.pad_lo, roi)]
                      for c in windows[b0:b1].tolist()]
            out = predictor(win, slices, **kwargs)
        else:
            out = predictor(win, **kwargs)
        pred = parse_output(out, b1 - b0, nd, options.weighting, outputs.checks, outputs.call.acc)
        seg = single_seg(pred, roi)  # (multi-output predictors are refused by name)
        if b0 == 0:
            _check_channels(seg, call.out_channels)
        outputs.add([(0, b0, b1)], pred)
        del win, out, pred, seg
    result = outputs.finish()
    if options.confidence:
        return result.prediction[0].cpu().numpy(), result.confidence[0].cpu().numpy()
    return result[0].cpu().numpy()
