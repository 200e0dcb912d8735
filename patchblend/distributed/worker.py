"""What one Dask task does on a worker: run the windows that meet one output block and blend its voxels.

The arithmetic is the in-memory driver's (``patchblend.sliding_window_inference``): windows cut with
:func:`patchblend.extract_patches` in the input's dtype (or from the padded image for non-zero padding), the same
importance map, weights combined the same way, and the same accumulator: :class:`~patchblend.inference.LatticeBlender`
on a strict lattice without weights in the denominator (bitwise :func:`patchblend.calibrated_blend` whatever the
batching), otherwise :class:`~patchblend.inference.Blender` fed one window at a time (bitwise
``calibrated_blend`` of the windows in order). The predictor's output is read, its scores checked and the importance
map made by the in-memory driver's own functions (``parse_output`` and ``ScoreChecks`` of
``patchblend.inference._predictions``, ``resolve_importance`` of ``patchblend.inference.sliding_window``), so the
two drivers cannot drift apart there.
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
import torch.nn.functional as F

from .. import extract_patches
from ..inference import Blender, LatticeBlender, WindowGrid
from ..inference._predictions import Prediction, ScoreChecks, parse_output
from ..inference.blender import check_label_dtype
from ..inference.confidence import ConfidenceTerms
from ..inference.sliding_window import resolve_importance

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
    in_channels: int
    roi: Tuple[int, ...]
    pad_lo: Tuple[int, ...]
    image_shape: Tuple[int, ...]
    sw_batch_size: int
    mode: str
    sigma_scale: Any  # a float or a tuple of floats
    padding_mode: str
    cval: float
    weighting: Optional[str]
    normalize: str
    lattice: bool  # LatticeBlender (True) or Blender one window at a time (False), as the driver chooses
    reduce: Optional[str]
    threshold: float
    label_dtype: torch.dtype
    out_dtype: Optional[torch.dtype]  # None: the predictor's dtype (non-float input, as the driver)
    out_channels: Optional[int]  # checked against the predictor when known
    device: str
    sw_device: str
    with_coord: bool
    kwargs: Tuple[Tuple[str, Any], ...]
    strict: bool = True  # the windows form a strict lattice (no repeated starts)
    confidence: bool = False  # also blend the confidence map (then run_block returns both)
    weigh_prediction: bool = True  # the weights weight the prediction (False: only the confidence map)


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
    ``call.confidence`` a pair ``(that, confidence block [1, *block.shape])``.

    ``region`` is the input ``[C_in, *block.region_shape]`` at ``block.region_lo``. The confidence map is blended
    as the in-memory driver blends it: a :class:`~patchblend.inference.LatticeBlender` on a strict lattice (its
    weights never enter the denominator), else a :class:`~patchblend.inference.Blender` fed one window at a time."""
    with torch.no_grad():
        return _run_block(call, block, region, predictor, roi_weight_map)


def _run_block(call, block, region, predictor, roi_weight_map):
    nd = len(call.roi)
    roi = call.roi
    predictor = worker_predictor(predictor, call.token, call.sw_device)
    x = torch.from_numpy(np.ascontiguousarray(region))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    padded_axes = any(call.pad_lo) or any(r > s for r, s in zip(roi, call.image_shape))
    if padded_axes and not (call.padding_mode == "constant" and float(call.cval) == 0.0):
        # the region spans the whole of every padded axis, so padding it gives that part of the padded image
        pads = []
        for r, s in zip(reversed(roi), reversed(call.image_shape)):
            d = max(r - s, 0)
            pads += [d // 2, d - d // 2]
        kw = {"value": float(call.cval)} if call.padding_mode == "constant" else {}
        x = F.pad(x[None], pads, mode=call.padding_mode, **kw)[0]
        origin = tuple(lo - p for lo, p in zip(block.region_lo, call.pad_lo))
    else:
        origin = block.region_lo  # windows reaching outside read zeros (extract_patches)
    # the in-memory driver's importance map and score checks (a float64 map with a float32 accumulator is cast: the
    # graph sends roi_weight_map in the accumulation dtype already)
    imp, peak = resolve_importance(roi_weight_map, roi, call.mode, call.sigma_scale, acc, call.device)
    if imp is not None:
        imp = imp.to(device=call.device, dtype=acc)
    checks = ScoreChecks(acc, peak)

    # the block's windows in global raster order, in image coordinates
    windows = torch.tensor(list(itertools.product(*block.starts)), dtype=torch.int64).reshape(-1, nd)
    local = windows - torch.tensor(origin)  # in the (padded) region
    in_block = windows - torch.tensor(block.lo)  # in the output block
    kwargs = dict(call.kwargs)
    blender = None
    terms = conf = None
    if call.confidence:
        terms = ConfidenceTerms(call.normalize, acc, imp)
        if call.strict:
            shifted = tuple(tuple(s - lo for s in axis) for axis, lo in zip(block.starts, block.lo))
            conf = LatticeBlender(block.shape, 1, WindowGrid(block.shape, roi, shifted), roi, normalize=terms.normalize,
                                  importance=terms.importance, device=call.device, dtype=acc)
        else:
            conf = Blender(block.shape, 1, normalize=terms.normalize, importance=terms.importance, window_shape=roi,
                           device=call.device, dtype=acc)
    channels = call.out_channels
    seg_dtype = None
    for b0 in range(0, windows.shape[0], call.sw_batch_size):
        b1 = min(b0 + call.sw_batch_size, windows.shape[0])
        win = extract_patches(x, local[b0:b1], roi).to(call.sw_device)
        if call.with_coord:
            slices = [[slice(0, 1), slice(None)] + [slice(s + p, s + p + r) for s, p, r in zip(c, call.pad_lo, roi)]
                      for c in windows[b0:b1].tolist()]
            out = predictor(win, slices, **kwargs)
        else:
            out = predictor(win, **kwargs)
        pred = parse_output(out, b1 - b0, nd, call.weighting, checks, acc)
        seg, w = single_seg(pred, roi), pred.weights
        if blender is None:
            if channels is not None and seg.shape[1] != channels:
                raise ValueError(f"the predictor returned {seg.shape[1]} channels but out_channels={channels}")
            channels, seg_dtype = seg.shape[1], seg.dtype
            if call.lattice:
                shifted = tuple(tuple(s - lo for s in axis) for axis, lo in zip(block.starts, block.lo))
                blender = LatticeBlender(block.shape, channels, WindowGrid(block.shape, roi, shifted), roi,
                                         normalize=call.normalize, importance=imp, device=call.device, dtype=acc)
            else:
                blender = Blender(block.shape, channels, normalize=call.normalize, importance=imp, window_shape=roi,
                                  device=call.device, dtype=acc)
        elif seg.shape[1] != channels:
            raise ValueError(f"predictor output seg changed its channel count from {channels} to {seg.shape[1]} "
                             "between batches")
        seg = seg.detach().to(call.device)
        if w is not None:
            w = w.detach().to(call.device)
            if w.dtype == torch.float64 and acc != torch.float64:  # as the driver: each score finite, but as acc?
                w = w.to(acc)
                checks(f"{'patch' if w.dim() == 1 else 'grid'}_scores (as {acc})", w)
        if imp is not None or call.weighting is not None:  # a bound on any voxel's weight sum (as the driver)
            checks.add_to_sum(w, b1 - b0)
        if conf is not None:
            c_patches, c_weights = terms(w, b1 - b0, roi, call.device, check_values=False)
            if call.strict:
                conf.add(c_patches, c_weights)
            else:
                for k in range(b1 - b0):
                    conf.add(c_patches[k:k + 1], in_block[b0 + k:b0 + k + 1], None if c_weights is None
                             else c_weights[k:k + 1])
            if not call.weigh_prediction:
                w = None
        if call.lattice:
            blender.add(seg, w)
        else:
            for k in range(b1 - b0):  # one window at a time: bitwise calibrated_blend of the windows in order
                blender.add(seg[k:k + 1], in_block[b0 + k:b0 + k + 1], None if w is None else w[k:k + 1])
        del win, out, pred, seg, w
    checks.raise_if_bad()
    result = blender.finalize()
    if call.reduce == "argmax":
        check_label_dtype(channels, call.label_dtype)  # the in-memory driver's rule (floating dtypes included)
        result = result.argmax(0, keepdim=True).to(call.label_dtype)
    elif call.reduce == "threshold":
        result = result >= call.threshold
    else:
        odt = call.out_dtype or seg_dtype
        if result.dtype != odt:
            result = result.to(odt)
    if conf is not None:
        return result.cpu().numpy(), conf.finalize(call.out_dtype or seg_dtype).cpu().numpy()
    return result.cpu().numpy()
