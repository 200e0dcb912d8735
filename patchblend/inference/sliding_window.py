"""``sliding_window_inference``: a drop-in for MONAI's, on patchblend's compiled blend.

The driver is a short pipeline of named steps:

0. :func:`_resolve_call`: the arguments checked and resolved (MONAI's 17 positional parameters, then ours);
1. :func:`_window_plan`: where the windows go, in the order they are visited (cached per geometry);
2. :class:`_WindowSource`: each batch's windows cut out of the input (one ``extract`` op call per chunk; padding
   for ``constant`` / ``cval=0`` never materialised: windows start outside the image and read zeros there);
3. the predictor, and :func:`~._predictions.parse_output`: MONAI's output forms (tensor, tuple, list, dict) or
   :class:`~patchblend.CalibratedOutput` with scores; then MONAI's ``process_fn`` if given;
4. :class:`_Outputs`: one accumulator per output (:mod:`._accumulators`: lattice stream, numerator/denominator,
   slab, autograd-keeping or N-D PyTorch), chosen once at the first batch;
5. :meth:`_Outputs.finish`: divide / reduce, packed in the predictor's form.
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any, Callable, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .. import _backend  # noqa: F401  (registers torch.ops.patchblend.*)
from .._validate import _check_finite_nonnegative, as_size, check_threshold, resolve_data_device
from ._accumulators import BlendSettings, CoverageConfidence, make_accumulator, output_geometry
from ._predictions import WEIGHTINGS, Prediction, ScoreChecks, apply_process_fn, pack_outputs, parse_output
from .blender import check_label_dtype
from .confidence import ConfidenceTerms, PredictionWithConfidence
from .importance import importance_map
from .options import check_blend_options
from .windows import WindowGrid, check_tile_step_size, lattice_tables, sliding_windows

__all__ = ["sliding_window_inference", "WEIGHTINGS"]

_ops = torch.ops.patchblend

# windows cut per extraction call, at most (bytes; at least one predictor batch)
_CHUNK_BYTES = {"cpu": 1 << 20, "cuda": 32 << 20}


def _enum_value(x):
    return getattr(x, "value", x)


def _check_dims_match_roi(roi_size, shape) -> None:
    """A roi_size sequence fixes the number of spatial axes: inputs must be [B, C] plus that many (MONAI's check,
    worded as MONAI words it, so that a missing batch or channel axis is named)."""
    if hasattr(roi_size, "tolist"):
        roi_size = roi_size.tolist()
    if not isinstance(roi_size, Sequence) or isinstance(roi_size, str):
        return
    n = len(roi_size)
    if len(shape) != n + 2:
        raise ValueError(
            f"inputs must have {n + 2} dimensions for a {n}D roi_size ([B, C, {', '.join(['spatial'] * n)}]), got "
            f"shape {tuple(shape)}; a missing batch or channel axis must be added (e.g. inputs[None]) and "
            "channel-last data made channel-first"
        )


def resolve_roi(roi_size, image_size, nd: int):
    if hasattr(roi_size, "tolist"):  # a tensor, numpy array or numpy scalar (MONAI accepts them)
        roi_size = roi_size.tolist()
    if isinstance(roi_size, (Sequence,)) and not isinstance(roi_size, str):
        if len(roi_size) != nd:
            raise ValueError(
                f"roi_size has {len(roi_size)} entries but inputs has {nd} spatial dims "
                f"(inputs must be [B, C, {', '.join(['spatial'] * len(roi_size))}] for a {len(roi_size)}D roi_size; "
                "channel-last data must be made channel-first first)"
            )
        roi = list(roi_size)
    elif roi_size is None or isinstance(roi_size, int):
        roi = [roi_size] * nd
    else:
        raise TypeError(f"roi_size must be an int or a sequence of {nd} ints, got {roi_size!r}")
    out = []
    for r, s in zip(roi, image_size):
        if r is not None:
            r = as_size("roi_size", r)  # (64.0 is 64; 6.5 is refused, not truncated)
        out.append(int(s) if r is None or r <= 0 else r)  # None / non-positive: the full axis (MONAI)
    return tuple(out)


def _resolve_overlap(overlap, nd: int):
    if hasattr(overlap, "tolist"):  # a tensor, numpy array or numpy scalar
        overlap = overlap.tolist()
    if isinstance(overlap, Sequence) and not isinstance(overlap, str):
        if len(overlap) != nd:
            raise ValueError(f"overlap must be a float or {nd} floats, got {overlap!r}")
        ov = list(overlap)
    else:
        ov = [overlap] * nd
    for o in ov:
        try:
            ok = 0.0 <= float(o) < 1.0
        except (TypeError, ValueError):
            raise TypeError(f"overlap must be a float or {nd} floats, got {overlap!r}") from None
        if not ok:
            raise ValueError(f"overlap must be >= 0 and < 1, got {overlap!r}")
    return tuple(float(o) for o in ov)


class _WindowPlan(NamedTuple):
    pad_lo: Tuple[int, ...]  # padding before the image per axis (ROI larger than the image)
    padded: Tuple[int, ...]  # the padded image's size
    image_grid: WindowGrid  # the lattice in image coordinates (starts may be negative)
    coords_pad: torch.Tensor  # [N, nd] window starts in the padded image, in the order they are visited
    coords: torch.Tensor  # [N, nd] the same in the image
    coords_pad3: torch.Tensor  # [N, 3] the ops' form of coords_pad (contiguous)
    coords3: torch.Tensor  # [N, 3] the ops' form of coords


class _DefaultOverlap(float):
    """MONAI's default overlap (0.25), told apart from an overlap the caller gives: ``tile_step_size`` excludes
    the latter."""


_DEFAULT_OVERLAP = _DefaultOverlap(0.25)


def _resolve_tile_step_size(tile_step_size, overlap, placement: str, nd: int) -> Optional[Tuple[float, ...]]:
    """nnU-Net's ``tile_step_size`` per axis (checked), or None when not given."""
    if tile_step_size is None:
        return None
    if placement != "nnunet":
        raise ValueError(f"tile_step_size is nnU-Net's step and needs placement='nnunet', got {placement!r}")
    if overlap is not _DEFAULT_OVERLAP:
        raise ValueError("give overlap or tile_step_size, not both (with placement='nnunet', tile_step_size "
                         "replaces overlap; 1 - overlap equals it only up to float rounding)")
    if hasattr(tile_step_size, "tolist"):
        tile_step_size = tile_step_size.tolist()
    if isinstance(tile_step_size, Sequence) and not isinstance(tile_step_size, str):
        if len(tile_step_size) != nd:
            raise ValueError(f"tile_step_size must be a float or {nd} floats, got {tile_step_size!r}")
        return tuple(check_tile_step_size(t) for t in tile_step_size)
    return (check_tile_step_size(tile_step_size),) * nd


@functools.lru_cache(maxsize=32)
def _window_plan(image_size, roi, overlaps, placement: str, slab_axis: int, tile_steps=None) -> _WindowPlan:
    """Where the windows go, in the order they are visited: MONAI's raster order, or with ``slab_axis`` the
    slowest (stable, so raster order within a slab). Cached, since inference over a data set meets the same
    sizes again and again; the tensors are shared and never modified (and ordinary tensors, also when made
    under inference mode: a later call with autograd saves them for backward)."""
    with torch.inference_mode(False):
        return _make_window_plan(image_size, roi, overlaps, placement, slab_axis, tile_steps)


def _make_window_plan(image_size, roi, overlaps, placement: str, slab_axis: int, tile_steps=None) -> _WindowPlan:
    pad_lo = tuple(max(r - s, 0) // 2 for r, s in zip(roi, image_size))
    padded = tuple(max(r, s) for r, s in zip(roi, image_size))
    if tile_steps is None:
        grid = sliding_windows(padded, roi, overlaps, placement)
    else:  # nnU-Net's own step, used as given
        grid = sliding_windows(padded, roi, style=placement, tile_step_size=tile_steps)
    image_grid = WindowGrid(image_size, roi, tuple(tuple(s - p for s in a) for a, p in zip(grid.starts, pad_lo)))
    coords_pad = lattice_tables(grid.starts).coords
    coords = lattice_tables(image_grid.starts).coords
    if slab_axis != 0:
        order = torch.argsort(coords_pad[:, slab_axis], stable=True)
        coords_pad, coords = coords_pad[order], coords[order]

    def ops_form(c):
        return (F.pad(c, (3 - c.shape[1], 0)) if c.shape[1] < 3 else c).contiguous()

    return _WindowPlan(pad_lo, padded, image_grid, coords_pad, coords, ops_form(coords_pad), ops_form(coords))


def hashable_sigma_scale(value):
    """A sigma_scale (float, sequence, numpy array or tensor) as a float or a tuple of floats."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(float(v) for v in value)
    return float(value)


@functools.lru_cache(maxsize=8)
def _cached_importance(roi, mode: str, sigma_scale, dtype, device) -> torch.Tensor:
    """The importance map (a few ms for an 80^3 Gaussian, MONAI recomputes it every call), once per ROI, mode,
    sigma, dtype and device. Shared: never modified (the blenders only read it); an ordinary tensor, also when
    made under inference mode."""
    with torch.inference_mode(False):
        return importance_map(roi, mode, sigma_scale, dtype=dtype, device=device)


def _importance_peak(imp: torch.Tensor) -> float:
    """The largest value of a cached importance map (computed once per map)."""
    peak = getattr(imp, "_patchblend_peak", None)
    if peak is None:
        peak = imp._patchblend_peak = float(imp.amax())
    return peak


def resolve_importance(roi_weight_map, roi, mode: str, sigma_scale, acc: torch.dtype,
                       device) -> Tuple[Optional[torch.Tensor], float]:
    """The importance map ``[*roi]`` every window is weighted by, and its largest value: ``roi_weight_map``
    (checked: shape ``roi``, finite and >= 0 as accumulated in ``acc``; a floating map keeps its dtype), None for
    ``mode="constant"`` (weight 1, peak 1.0), else ``mode``'s map in ``acc`` on ``device`` (cached, shared: never
    modify it). Used by both the in-memory and the Dask driver, so that they weight windows alike."""
    if roi_weight_map is not None:
        imp = torch.as_tensor(roi_weight_map)
        if not imp.dtype.is_floating_point:
            imp = imp.to(acc)
        if tuple(imp.shape[-len(roi):]) != tuple(roi) or imp.numel() != math.prod(roi):
            raise ValueError(f"roi_weight_map must have shape {tuple(roi)}, got {tuple(imp.shape)}")
        imp = imp.reshape(roi)
        return imp, _check_finite_nonnegative("roi_weight_map", imp.to(acc))  # (as accumulated)
    if mode == "constant":
        return None, 1.0
    imp = _cached_importance(tuple(roi), mode, hashable_sigma_scale(sigma_scale), acc, device)
    return imp, _importance_peak(imp)


def _progress(iterable, enabled: bool, total: int):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm  # imported lazily: tqdm is optional
    except ImportError as exc:
        raise ImportError("progress=True needs tqdm (pip install tqdm)") from exc
    return tqdm(iterable, total=total)


class _Call(NamedTuple):
    """The arguments of one call, checked and resolved (step 0 of the pipeline)."""

    x: torch.Tensor  # the input as a plain tensor
    meta_source: Any  # the MONAI MetaTensor input, or None
    nd: int
    image_size: Tuple[int, ...]
    roi: Tuple[int, ...]
    overlaps: Tuple[float, ...]
    sw_batch_size: int
    mode: str
    sigma_scale: Any
    padding_mode: str
    weighting: Optional[str]
    normalize: str
    placement: str
    slab_axis: Optional[int]  # the user's slab axis (patchblend's memory mode)
    buffer_steps: Optional[int]  # MONAI's buffering: windows visited along buffer_dim, buffer by buffer
    order_axis: int  # windows are visited sorted (stably) by their start along this axis
    reduce: Optional[str]
    threshold: float
    label_dtype: torch.dtype
    device: torch.device
    sw_device: torch.device
    acc: torch.dtype  # accumulation dtype
    confidence: bool  # also blend the weights into the confidence map
    weigh_prediction: bool  # the weights weight the prediction (False: only the confidence map)


def _resolve_call(inputs, roi_size, sw_batch_size, predictor, overlap, mode, sigma_scale, padding_mode, sw_device,
                  device, roi_weight_map, process_fn, buffer_steps, buffer_dim, weighting, normalize, placement,
                  slab_axis, reduce, threshold, label_dtype, confidence=False, weigh_prediction=True) -> _Call:
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor [B, C, *spatial], got {type(inputs).__name__}")
    nd = inputs.dim() - 2
    _check_dims_match_roi(roi_size, inputs.shape)
    if nd < 1:
        raise ValueError(f"inputs must be [B, C, *spatial] with at least one spatial axis, got shape "
                         f"{tuple(inputs.shape)}")
    if inputs.device.type == "meta":
        raise ValueError("inputs is a meta tensor (no data): sliding-window inference needs real data")
    if not callable(predictor):
        raise TypeError("predictor must be callable")
    if process_fn is not None and not callable(process_fn):
        raise TypeError(f"process_fn must be callable or None, got {type(process_fn).__name__}")
    if isinstance(sw_batch_size, torch.Tensor) and sw_batch_size.dim() == 0:
        sw_batch_size = sw_batch_size.item()  # MONAI accepts a 0-d tensor
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, numbers.Integral) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be a positive int, got {sw_batch_size!r}")
    image_size = tuple(int(s) for s in inputs.shape[2:])
    if inputs.shape[0] < 1 or inputs.shape[1] < 1:
        raise ValueError(f"inputs must have a batch and a channel dimension of at least 1, got {tuple(inputs.shape)}")
    if any(s < 1 for s in image_size):
        raise ValueError(f"inputs must have a non-empty spatial size, got {tuple(inputs.shape)}")
    roi = resolve_roi(roi_size, image_size, nd)
    overlaps = _resolve_overlap(overlap, nd)
    mode = _enum_value(mode)
    padding_mode, normalize = check_blend_options(padding_mode, weighting, normalize, placement, reduce, confidence,
                                                  weigh_prediction)
    if confidence and process_fn is not None:
        raise ValueError("confidence=True does not take a process_fn (its weight maps replace the window weights "
                         "the confidence map blends); blend without process_fn")
    if reduce == "argmax":
        check_label_dtype(1, label_dtype)  # the type now; whether it holds every class once C is known
    if slab_axis is not None:
        if isinstance(slab_axis, bool) or not isinstance(slab_axis, numbers.Integral) or not -nd <= slab_axis < nd:
            raise ValueError(f"slab_axis must be None or an int in [{-nd}, {nd}), got {slab_axis!r}")
        if nd not in (2, 3):
            raise ValueError(f"slab_axis needs 2D or 3D inputs, got {nd} spatial axes")
        slab_axis = int(slab_axis) % nd
    # MONAI's buffering: None or <= 0 is off; buffer_dim in [-nd, nd] (MONAI's own bound) when on
    if buffer_steps is not None and (isinstance(buffer_steps, bool) or not isinstance(buffer_steps, numbers.Integral)):
        raise TypeError(f"buffer_steps must be None or an int, got {buffer_steps!r}")
    buffered = buffer_steps is not None and buffer_steps > 0
    order_axis = slab_axis or 0
    if buffered:
        if isinstance(buffer_dim, bool) or not isinstance(buffer_dim, numbers.Integral) or not -nd <= buffer_dim <= nd:
            raise ValueError(f"buffer_dim must be in [{-nd}, {nd}], got {buffer_dim!r}")
        buffer_dim = int(buffer_dim) + nd if buffer_dim < 0 else int(buffer_dim)
        if buffer_dim >= nd:
            raise ValueError(f"buffer_dim must index a spatial axis (< {nd}), got {buffer_dim}")
        if slab_axis is not None and slab_axis != buffer_dim:
            raise ValueError(f"slab_axis ({slab_axis}) and buffer_dim ({buffer_dim}) both order the windows; "
                             "give one, or the same axis")
        order_axis = buffer_dim
    _check_meta("roi_weight_map", roi_weight_map)
    x = inputs.as_subclass(torch.Tensor) if type(inputs) is not torch.Tensor else inputs
    return _Call(
        x=x, meta_source=inputs if hasattr(inputs, "copy_meta_from") else None, nd=nd, image_size=image_size,
        roi=roi, overlaps=overlaps, sw_batch_size=int(sw_batch_size), mode=mode, sigma_scale=sigma_scale,
        padding_mode=padding_mode, weighting=weighting, normalize=normalize, placement=placement,
        slab_axis=slab_axis, buffer_steps=int(buffer_steps) if buffered else None, order_axis=order_axis,
        reduce=reduce, threshold=check_threshold(threshold), label_dtype=label_dtype,
        device=resolve_data_device("device", device, inputs.device),
        sw_device=resolve_data_device("sw_device", sw_device, inputs.device),
        acc=torch.float64 if x.dtype == torch.float64 else torch.float32,
        confidence=confidence, weigh_prediction=weigh_prediction,
    )


def _check_meta(name: str, value) -> None:
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (no data); pass a tensor with values")


def _batches(call: _Call, num_win: int, order_coords: torch.Tensor) -> List[Tuple[int, int]]:
    """The predictor calls as ranges ``[g0, g1)`` of global window indices (image-major, in visit order): runs of
    ``sw_batch_size`` windows (a run may span images, as in MONAI); with MONAI's buffering, runs that restart at
    every buffer of ``buffer_steps`` rows of windows along ``buffer_dim`` and at every image, as MONAI's do."""
    batch, bs = call.x.shape[0], call.sw_batch_size
    total = batch * num_win
    if call.buffer_steps is None:
        return [(g, min(g + bs, total)) for g in range(0, total, bs)]
    rows = order_coords[:, call.order_axis].tolist()
    row_ends = [k for k in range(1, num_win) if rows[k] != rows[k - 1]] + [num_win]  # ends of rows of windows
    bounds = [0, *row_ends][::min(len(row_ends), call.buffer_steps)]
    if bounds[-1] < num_win:
        bounds.append(num_win)
    out = []
    for b in range(batch):
        for lo, hi in zip(bounds, bounds[1:]):
            out += [(b * num_win + g, b * num_win + min(g + bs, hi)) for g in range(lo, hi, bs)]
    return out


def _segments(g0: int, g1: int, num_win: int) -> list:
    """Global windows ``[g0, g1)`` (image-major) as ``(image, first window, end window)`` per image."""
    segments, g = [], g0
    while g < g1:
        b, w0 = divmod(g, num_win)
        w1 = min(num_win, w0 + (g1 - g))
        segments.append((b, w0, w1))
        g += w1 - w0
    return segments


class _WindowSource:
    """Step 2: cuts each batch's windows out of the input (and out of a ``condition`` tensor), onto ``sw_device``.

    Padding (ROI larger than the image) is never materialised for 2D/3D ``padding_mode="constant", cval=0``: the
    windows start outside the image, and the extract op reads zeros there. Small windows are cut for several
    batches at once (one op call; the calls' fixed cost is what bounds a GPU run), up to a chunk of
    ``_CHUNK_BYTES``; large ones one batch at a time (on the CPU the blend then reads them while in cache). Each
    batch still sees the input as it is when its predictor call comes (as in MONAI): a chunk is cut again if the
    input changed in between (its version counter moved). With autograd recording, or for inference tensors (no
    version counter), one batch per cut."""

    def __init__(self, call: _Call, condition, plan: _WindowPlan, padding_mode: str, cval: float):
        x, nd, roi = call.x, call.nd, call.roi
        self.nd, self.roi, self.sw_device, self.num_win = nd, roi, call.sw_device, plan.coords.shape[0]
        if condition is not None and (not isinstance(condition, torch.Tensor) or condition.shape != x.shape):
            raise ValueError(f"condition must be a tensor shaped like inputs {tuple(x.shape)}, got "
                             f"{tuple(condition.shape) if isinstance(condition, torch.Tensor) else type(condition)}")
        padded = any(plan.pad_lo) or any(p > s for p, s in zip(plan.padded, call.image_size))
        kernels = nd in (2, 3)
        if padded and not (kernels and padding_mode == "constant" and float(cval) == 0.0):
            pads = []
            for r, s in zip(reversed(roi), reversed(call.image_size)):
                d = max(r - s, 0)
                pads += [d // 2, d - d // 2]
            pad_kw = {"value": float(cval)} if padding_mode == "constant" else {}
            x = F.pad(x, pads, mode=padding_mode, **pad_kw)
            condition = None if condition is None else F.pad(condition, pads, mode=padding_mode, **pad_kw)
            self.coords = plan.coords_pad3 if kernels else plan.coords_pad
        else:
            self.coords = (plan.coords3 if kernels else plan.coords)
        self.src, self.cond = x, condition
        self.roi3 = [1, *roi] if nd == 2 else list(roi)
        window_bytes = max(1, x.shape[1] * math.prod(roi) * x.element_size())
        chunk_limit = _CHUNK_BYTES["cuda" if x.device.type == "cuda" else "cpu"]
        bs = call.sw_batch_size
        self.per_chunk = max(1, chunk_limit // (window_bytes * bs)) * bs
        self.trackable = not (x.is_inference() or (condition is not None and condition.is_inference()))
        if torch.is_grad_enabled() or not self.trackable or not kernels:
            self.per_chunk = bs
        self.chunk = self.cond_chunk = None
        self.lo = self.hi = 0
        self.version = None

    def _cut(self, source, segments) -> torch.Tensor:
        """The windows of ``segments`` [(image, first, end)] of ``source [B, C, *S]`` → ``[n, C, *roi]``."""
        if self.nd not in (2, 3):
            parts = [source[b][(slice(None), *(slice(s, s + r) for s, r in zip(c, self.roi)))]
                     for b, w0, w1 in segments for c in self.coords[w0:w1].tolist()]
            return torch.stack(parts)
        parts = [_ops.extract(source[b] if self.nd == 3 else source[b].unsqueeze(1), self.coords[w0:w1], self.roi3)
                 for b, w0, w1 in segments]
        win = parts[0] if len(parts) == 1 else torch.cat(parts)
        return win if self.nd == 3 else win.squeeze(2)

    def _source_version(self):
        if not self.trackable:
            return None
        return self.src._version, None if self.cond is None else self.cond._version

    def cut(self, g0: int, g1: int, total: int):
        """``(windows [n, C, *roi], condition windows or None)`` of global windows ``[g0, g1)``."""
        if g0 < self.lo or g1 > self.hi or self._source_version() != self.version:
            self.version = self._source_version()
            self.lo, self.hi = g0, min(max(g0 + self.per_chunk, g1), total)
            segments = _segments(self.lo, self.hi, self.num_win)
            self.chunk = self._cut(self.src, segments).to(self.sw_device)
            if self.cond is not None:
                self.cond_chunk = self._cut(self.cond, segments).to(self.sw_device)
        win = self.chunk[g0 - self.lo:g1 - self.lo]
        cond = None if self.cond is None else self.cond_chunk[g0 - self.lo:g1 - self.lo]
        if g1 == self.hi:  # the chunk's last batch: let its windows go with the batch
            self.chunk = self.cond_chunk = None
            self.lo = self.hi = 0
        return win, cond


def _window_slices(plan: _WindowPlan, segments) -> list:
    """MONAI's ``with_coord`` argument: per window ``[slice(b, b + 1), slice(None), *spatial slices]`` in the padded
    image, the spatial bounds numpy integers as MONAI's are."""
    import numpy as np  # (torch's own dependency; imported only for with_coord)

    roi = plan.image_grid.window_shape
    return [[slice(b, b + 1), slice(None)] + [slice(np.int64(s), np.int64(s + r)) for s, r in zip(c, roi)]
            for b, w0, w1 in segments for c in plan.coords_pad[w0:w1].tolist()]


class _Outputs:
    """Step 4: one accumulator per output of the predictor, made at the first batch (when the outputs' number,
    channels and resolutions are known), each fed every batch; step 5, :meth:`finish`, packs the results in the
    predictor's form (tensor, tuple or dict), as MONAI does."""

    def __init__(self, call: _Call, plan: _WindowPlan, roi_weight_map, process_fn):
        self.call, self.plan = call, plan
        self.num_win = plan.coords.shape[0]
        self.process_fn = process_fn
        c = call
        imp, peak = resolve_importance(roi_weight_map, c.roi, c.mode, c.sigma_scale, c.acc, c.device)
        self.checks = ScoreChecks(c.acc, 1.0 if process_fn is not None else peak)
        self.weighted = imp is not None or c.weighting is not None or process_fn is not None
        self.base_importance = imp  # [*roi] or None (constant)
        self.fn_importance = None  # the map process_fn gets, made once
        self.accumulators = None
        self.confidence = None  # the confidence map's accumulator (confidence=True), at the first output's geometry
        self.terms = None  # the confidence blend's input (ConfidenceTerms), made with the first output's importance
        self.structure = None  # (number of outputs, keys, single) of the first batch
        self.grad = False

    def importance_for(self, roi_out, device) -> Optional[torch.Tensor]:
        """The importance map of an output at its resolution (nearest-exact resized, as MONAI does)."""
        imp = self.base_importance
        if imp is None or self.process_fn is not None:  # (process_fn's map replaces it, per batch)
            return None
        if tuple(roi_out) != tuple(imp.shape):
            imp = F.interpolate(imp[None, None].to(self.call.acc), roi_out, mode="nearest-exact")[0, 0]
        return imp.to(device=device, dtype=self.call.acc) if imp.requires_grad or imp.device != device else imp

    def process_fn_importance(self) -> torch.Tensor:
        """MONAI passes ``process_fn`` the importance map ``[*roi]`` on ``sw_device`` in the input's dtype."""
        if self.fn_importance is None:
            c = self.call
            dt = c.x.dtype if c.x.dtype.is_floating_point else c.acc
            imp = self.base_importance
            self.fn_importance = (torch.ones(c.roi, dtype=dt, device=c.sw_device) if imp is None
                                  else imp.to(device=c.sw_device, dtype=dt))
        return self.fn_importance

    def _start(self, pred: Prediction, weights) -> None:
        c = self.call
        self.structure = (len(pred.segs), pred.keys, pred.single)
        wants_grad = torch.is_grad_enabled() and (
            any(s.requires_grad for s in pred.segs) or (weights is not None and weights.requires_grad)
            or (pred.voxel_weights is not None and any(w.requires_grad for w in pred.voxel_weights))
            or (self.base_importance is not None and self.base_importance.requires_grad))
        self.grad = wants_grad and c.slab_axis is None and c.reduce is None
        if wants_grad and c.slab_axis is not None and c.reduce is None:
            warnings.warn("slab_axis: gradients do not flow through slab mode; the output is detached "
                          "(run under torch.no_grad() to silence this)", stacklevel=3)
        # slab mode: the user's slab_axis, or MONAI's buffering (then the slab accumulates on sw_device)
        slab = c.slab_axis is not None or (c.buffer_steps is not None and not self.grad and c.nd in (2, 3))
        slab_device = c.sw_device if c.slab_axis is None and slab else c.device
        settings = BlendSettings(
            batch=c.x.shape[0], normalize=c.normalize, device=c.device, acc=c.acc,
            out_dtype=c.x.dtype if c.x.dtype.is_floating_point else None, reduce=c.reduce, threshold=c.threshold,
            label_dtype=c.label_dtype, slab_axis=c.order_axis if slab else None, slab_device=slab_device,
            num_win=self.num_win)
        weighted_prediction = c.weighting is not None and c.weigh_prediction
        weights_in_den = c.normalize == "weight" and (weighted_prediction or self.process_fn is not None)
        self.accumulators = []
        for k, seg in enumerate(pred.segs):
            geometry = output_geometry(self.plan, c.roi, c.image_size, tuple(seg.shape[2:]))
            imp = self.importance_for(geometry.roi, slab_device if slab else c.device)
            self.accumulators.append(make_accumulator(
                geometry, seg.shape[1], imp, settings, seg.dtype, grad=self.grad,
                weights_in_den=weights_in_den or self.process_fn is not None, nd=c.nd))
            if k == 0 and c.confidence:
                # the confidence map: one float channel at the first output's geometry, its weights never in the
                # denominator (ConfidenceTerms), floats also when the prediction is reduced
                self.terms = ConfidenceTerms(c.normalize, c.acc, imp)
                conf_settings = settings._replace(reduce=None, normalize=self.terms.normalize)
                if c.nd in (2, 3) and not self.grad and not slab:  # the weights alone, blended at the end
                    self.confidence = CoverageConfidence(geometry, self.terms.importance, conf_settings, seg.dtype)
                else:  # ones (or the weights spread) blended batch by batch, as the prediction
                    self.confidence = make_accumulator(geometry, 1, self.terms.importance, conf_settings, seg.dtype,
                                                       grad=self.grad, weights_in_den=False, nd=c.nd)
        self.shapes = [s.shape[1:] for s in pred.segs]

    def add(self, segments, pred: Prediction) -> None:
        """Blend one batch's outputs (windows ``segments``) into their accumulators."""
        c = self.call
        w = pred.weights
        if w is not None and w.dtype == torch.float64 and c.acc != torch.float64:
            # each score is finite; float64 scores in a float32 accumulator may not be
            w = w.to(c.acc)
            self.checks(f"{'patch' if w.dim() == 1 else 'grid'}_scores (as {c.acc})", w)
        if self.accumulators is None:
            self._start(pred, w)
        elif (len(pred.segs), pred.keys, pred.single) != self.structure or (
                pred.segs[0].shape[1:] != self.shapes[0] if len(self.shapes) == 1 else
                any(s.shape[1:] != shape for s, shape in zip(pred.segs, self.shapes))):
            first_keys = "" if self.structure[1] is None else f" keys {self.structure[1]}"
            raise ValueError(
                f"the predictor's outputs changed between batches: first {self.structure[0]} output(s) "
                f"{[tuple(s) for s in self.shapes]}{first_keys}, now {len(pred.segs)} "
                f"{[tuple(s.shape[1:]) for s in pred.segs]}{'' if pred.keys is None else f' keys {pred.keys}'}")
        grad = self.grad
        if self.weighted:  # a bound on any voxel's weight sum, which must not overflow
            n = pred.segs[0].shape[0]
            if pred.voxel_weights is None:
                self.checks.add_to_sum(w, n)
            else:  # (one bound for every output: their maps are resized from one)
                self.checks.add_to_sum(torch.stack([wk.detach().amax() for wk in pred.voxel_weights]), n)
        if self.confidence is not None:
            device = self.confidence.input_device
            wc = w if w is None or w.device == device else w.to(device)
            if not grad and wc is not None:
                wc = wc.detach()
            seg0 = pred.segs[0]
            if isinstance(self.confidence, CoverageConfidence):
                self.confidence.add(None, wc, segments)
            else:
                self.confidence.add(*self.terms(wc, seg0.shape[0], seg0.shape[2:], device, check_values=False),
                                    segments)
            if not c.weigh_prediction:
                w = None
        for k, (seg, acc) in enumerate(zip(pred.segs, self.accumulators)):
            device = acc.input_device
            wk = w if pred.voxel_weights is None else pred.voxel_weights[k]
            if wk is not None and wk.device != device:
                wk = wk.to(device)
            if seg.device != device:
                seg = seg.to(device)
            if not grad:
                seg, wk = seg.detach(), None if wk is None else wk.detach()
            acc.add(seg, wk, segments)

    def finish(self):
        self.checks.raise_if_bad()
        results = []
        while self.accumulators:
            results.append(self.accumulators.pop(0).finish())  # (each frees its buffers before the next)
        confidence = None if self.confidence is None else self.confidence.finish()
        self.confidence = None
        if self.call.meta_source is not None:
            results = [_as_meta_tensor(r, self.call.meta_source) for r in results]
            confidence = None if confidence is None else _as_meta_tensor(confidence, self.call.meta_source)
        prediction = pack_outputs(results, self.structure[1], self.structure[2])
        return prediction if not self.call.confidence else PredictionWithConfidence(prediction, confidence)


def sliding_window_inference(
    inputs: torch.Tensor,
    roi_size: Union[Sequence[int], int],
    sw_batch_size: int,
    predictor: Callable[..., Any],
    overlap: Union[Sequence[float], float] = _DEFAULT_OVERLAP,
    mode: str = "constant",
    sigma_scale: Union[Sequence[float], float] = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
    sw_device: Union[torch.device, str, None] = None,
    device: Union[torch.device, str, None] = None,
    progress: bool = False,
    roi_weight_map: Optional[torch.Tensor] = None,
    process_fn: Optional[Callable] = None,
    buffer_steps: Optional[int] = None,
    buffer_dim: int = -1,
    with_coord: bool = False,
    *args: Any,
    weighting: Optional[str] = None,
    normalize: Optional[str] = None,
    placement: str = "monai",
    tile_step_size: Union[Sequence[float], float, None] = None,
    slab_axis: Optional[int] = None,
    reduce: Optional[str] = None,
    threshold: float = 0.5,
    label_dtype: torch.dtype = torch.int64,
    confidence: bool = False,
    weigh_prediction: bool = True,
    **kwargs: Any,
):
    """Sliding-window inference with optional calibrated (per-patch / per-cell) blending weights.

    The 17 positional parameters, their names and defaults and ``*args`` / ``**kwargs`` are those of
    ``monai.inferers.sliding_window_inference``; for what MONAI accepts the result is MONAI's (to float rounding).
    patchblend's own options are keyword-only.

    Args:
        inputs: ``[B, C_in, *S]`` with one or more spatial axes (2D and 3D run on the compiled kernels; 1D and 4D+
            on a plain PyTorch path). A MONAI ``MetaTensor`` gives ``MetaTensor`` outputs with its metadata.
        roi_size: window size, an int or one per spatial axis; entries ``None`` or ``<= 0`` mean the full axis
            (whole numbers: ``64.0`` is 64, ``6.5`` a ``TypeError``).
            A window larger than the image pads the image (``padding_mode``, ``cval``), as MONAI does, and the
            output is cropped back.
        sw_batch_size: windows per predictor call (windows of consecutive images may share a call, as in MONAI).
        predictor: ``f(windows [n, C_in, *roi], *args, **kwargs)`` (``f(windows, slices, *args, **kwargs)`` with
            ``with_coord``) returning MONAI's forms: a tensor ``[n, C, *roi']``, a tuple or list of them, or a dict
            of them; each output is blended on its own, with its own channels and resolution (``roi'`` may differ
            from ``roi``: zoom ``roi' / roi`` per axis, windows and importance scaled as in MONAI). For calibrated
            weighting it returns :class:`~patchblend.CalibratedOutput` ``(seg, patch_scores [n], grid_scores
            [n, *G])``, where ``seg`` is any of those forms and the scores weight every output alike (scores must
            be finite and ``>= 0``; those ``weighting`` doesn't use may be None). A plain tuple, list or dict is
            never read as scores.
        overlap: fraction of a window shared with its neighbour, in ``[0, 1)``, scalar or per axis.
        mode: importance of each window voxel: ``"constant"``, ``"gaussian"`` (MONAI's, ``sigma_scale``) or
            ``"nnunet"`` (nnU-Net's Gaussian, peak 10).
        sigma_scale: Gaussian ``sigma = sigma_scale * roi`` (scalar or per axis).
        padding_mode: ``"constant"``, ``"reflect"``, ``"replicate"`` or ``"circular"`` (when roi > image).
        cval: fill value for constant padding.
        sw_device: where the windows and the predictor run (default: ``inputs.device``).
        device: where the output is accumulated and returned (default: ``inputs.device``). Either one ``"meta"`` or
            a device this torch cannot use (``"cuda"`` on a CPU build) is a ``ValueError`` naming it.
        progress: show a tqdm progress bar (tqdm is imported only then).
        roi_weight_map: optional precomputed importance ``[*roi]`` (non-negative), replacing ``mode``'s.
        process_fn: MONAI's ``process_fn(outputs tuple, windows, importance [*roi]) -> (outputs, weight_map)``: the
            outputs it returns are blended with its weight map (``[*roi]``, ``[1, 1, *roi]`` or per window
            ``[n, 1, *roi]``) instead of the importance. The denominator is the sum of the maps actually used
            (MONAI divides by the first batch's map for every window, which differs when the map varies).
        buffer_steps, buffer_dim: MONAI's buffering: windows are visited row by row along ``buffer_dim`` and the
            predictor calls restart at every buffer of ``buffer_steps`` rows and at every image, as MONAI's do;
            the blend runs in slab mode along ``buffer_dim`` on ``sw_device`` (memory: about one window deep), each
            finished slab written to ``device``. Every output is returned (MONAI returns only the first).
        with_coord: pass the windows' MONAI-style slices to the predictor: ``predictor(windows, slices, ...)``.
        args: passed to ``predictor`` after the windows (and the slices).
        weighting: ``None`` (MONAI's averaging), ``"patch"`` (weight each window by its patch score, Eq. 1),
            ``"grid"`` (each grid cell by its cell score, Eq. 2) or ``"patch*grid"``; the predictor must then
            return a :class:`~patchblend.CalibratedOutput`. The importance of ``mode`` multiplies in.
        normalize: ``"weight"`` (divide by the weight sum; the default when the prediction is unweighted:
            ``weighting`` None, MONAI's behaviour, or ``weigh_prediction=False``), ``"count"`` (divide by the number
            of covering windows; the default when ``weighting`` weights the prediction: the paper's Eq. 1/2) or
            ``"none"``.
        placement: window placement, ``"monai"`` (default) or ``"nnunet"`` (nnU-Net v2's lattice; give its
            ``tile_step_size``, or ``overlap`` read as ``tile_step_size = 1 - overlap``).
        tile_step_size: with ``placement="nnunet"``: nnU-Net's step in ``(0, 1]`` (scalar or per axis), used as
            given so the windows are exactly nnU-Net's (``1 - overlap`` rounds differently for some steps, e.g.
            0.1 and 0.3); ``overlap`` must then be left at its default.
        slab_axis: bounded-memory mode (2D/3D): process windows slab by slab along this spatial axis and finalise
            each part of the output as soon as no later window touches it; the float accumulator then spans only
            about one window (times the batch's spread) along the axis. Same result as the full path
            (bitwise for axis 0 when the windows form a lattice, the usual case; to float rounding otherwise,
            e.g. with weights in the denominator or nnU-Net placement with repeated starts).
        reduce: ``None``, ``"argmax"`` (labels ``[B, 1, *S]`` in ``label_dtype``) or ``"threshold"``
            (``[B, C, *S]`` bool, ``value >= threshold``); in slab mode applied slab by slab, so the full float
            output never exists. Applied to every output.
        threshold: for ``reduce="threshold"`` (a real number; NaN is an error).
        label_dtype: dtype of argmax labels. In slab mode they are held in the smallest integer dtype that fits
            (uint8 up to 256 classes) until the last slab is freed, then widened: int64 labels do not raise the
            peak.
        confidence: also return the blended confidence map (needs ``weighting``; ``normalize`` ``"count"`` or
            ``"weight"``; not with ``process_fn``): with ``α_i(x)`` the weight ``weighting`` gives window ``i`` at
            voxel ``x`` and ``N(x)`` the windows covering it, ``C = Σ α_i / N`` under ``"count"`` (Eq. 2 applied to
            the weights alone) and ``Σ α_i imp_i / Σ imp_i`` under ``"weight"`` (``imp`` the importance of
            ``mode``; the same ``Σ α / N`` for ``mode="constant"``); 0 where no window covers. From the same pass
            (no second predictor run, no window read twice): the windows' weights are kept (a few numbers each) and
            the compiled ``coverage`` op blends them at the end; in slab mode (slab by slab) and with autograd they
            are blended batch by batch beside the prediction. On the first output's geometry (a tuple's first item,
            a dict's first key in sorted order). The result is then a :class:`~patchblend.PredictionWithConfidence`
            ``(prediction, confidence)``.
        weigh_prediction: with ``confidence=True`` only. ``False``: the scores go only into the confidence map
            and the prediction is the unweighted blend, what ``weighting=None`` gives with the same ``mode`` (and
            ``normalize``, whose default is then ``"weight"`` as for ``weighting=None``): the average prediction
            and its confidence map from one pass.
        kwargs: passed to ``predictor``; a ``condition`` tensor shaped like ``inputs`` is windowed like it. The
            keyword-only names above are patchblend's and do not reach the predictor (a predictor argument
            called ``threshold``, say, must be bound first, e.g. with ``functools.partial``).

    Returns:
        In the predictor's form (a tensor; a tuple for a tuple or list of two or more outputs; a dict with the same
        keys), each ``[B, C_k, *S_k]`` on ``device`` in ``inputs.dtype`` (the predictor's dtype if ``inputs`` is
        not floating point), ``S_k`` the image size times output ``k``'s zoom; with ``reduce``, labels or masks as
        above. Accumulation is float32 (float64 for float64 inputs) whatever the predictor's precision.
        With ``confidence=True``: ``PredictionWithConfidence(prediction, confidence)``, ``prediction`` the above and
        ``confidence`` ``[B, 1, *S_0]`` in the prediction's float dtype (``inputs.dtype``, or the predictor's),
        floats also with ``reduce``.

    Gradients: when autograd is on and the predictions (or scores) require grad, the output is differentiable in
    ``inputs``, the predictor's parameters, the scores and ``roi_weight_map``, as MONAI's is; every window's
    prediction is then kept until one :func:`~patchblend.calibrated_blend` at the end (autograd keeps the
    predictor's activations anyway). Under ``torch.no_grad()`` / ``torch.inference_mode()`` the streaming paths run.
    Slab mode and ``reduce`` return detached results (slab mode warns).
    """
    # 0. the arguments, checked and resolved
    call = _resolve_call(inputs, roi_size, sw_batch_size, predictor, overlap, mode, sigma_scale, padding_mode,
                         sw_device, device, roi_weight_map, process_fn, buffer_steps, buffer_dim, weighting, normalize,
                         placement, slab_axis, reduce, threshold, label_dtype, confidence, weigh_prediction)
    # 1. where the windows go, in the order they are visited
    tile_steps = _resolve_tile_step_size(tile_step_size, overlap, placement, call.nd)
    plan = _window_plan(call.image_size, call.roi, call.overlaps, placement, call.order_axis, tile_steps)
    num_win = plan.coords.shape[0]
    total = call.x.shape[0] * num_win
    # 2. cutting batches of windows
    source = _WindowSource(call, kwargs.pop("condition", None), plan, call.padding_mode, cval)
    outputs = _Outputs(call, plan, roi_weight_map, process_fn)
    batches = _batches(call, num_win, plan.coords_pad)
    for g0, g1 in _progress(batches, progress, len(batches)):
        segments = _segments(g0, g1, num_win)
        windows, condition = source.cut(g0, g1, total)
        if condition is not None:
            kwargs["condition"] = condition
        # 3. the predictor, and its output read (MONAI's forms, or CalibratedOutput with scores)
        if with_coord:
            out = predictor(windows, _window_slices(plan, segments), *args, **kwargs)
        else:
            out = predictor(windows, *args, **kwargs)
        pred = parse_output(out, g1 - g0, call.nd, call.weighting, outputs.checks, call.acc)
        if process_fn is not None:
            pred = apply_process_fn(process_fn, pred, windows, outputs.process_fn_importance(), call.roi,
                                    outputs.checks)
        # 4. each output into its accumulator
        outputs.add(segments, pred)
        # drop this batch's windows and predictions before the next predictor call allocates its own
        del windows, condition, out, pred
        kwargs.pop("condition", None)
    # 5. finish: divide / reduce, in the predictor's form
    return outputs.finish()


def _as_meta_tensor(result: torch.Tensor, like):
    """Wrap the output as a MONAI MetaTensor carrying ``like``'s metadata (MONAI's behaviour)."""
    try:
        from monai.data.meta_tensor import MetaTensor
    except ImportError:  # pragma: no cover - a MetaTensor input implies MONAI is installed
        return result
    out = MetaTensor(result)
    out.copy_meta_from(like, copy_attr=False)
    return out
