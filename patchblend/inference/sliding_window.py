"""``sliding_window_inference``: a drop-in for MONAI's, on patchblend's compiled blend.

The driver is a short pipeline of named steps, run on one :class:`~.options.SlidingWindowOptions`:

0. :func:`resolve_call`: the options resolved against the input (its axes, devices, accumulation dtype);
1. :func:`_window_plan`: where the windows go, in the order they are visited (cached per geometry);
2. :class:`_WindowSource`: each batch's windows cut out of the input (one ``extract`` op call per chunk; padding
   for ``constant`` / ``cval=0`` never materialised: windows start outside the image and read zeros there);
3. the predictor, and :func:`~._predictions.parse_output`: MONAI's output forms (tensor, tuple, list, dict) or
   :class:`~patchblend.CalibratedOutput` with scores; then MONAI's ``process_fn`` if given;
4. :class:`OutputBlend`: one accumulator per output (:mod:`._accumulators`: lattice stream, numerator/denominator,
   slab, autograd-keeping or N-D PyTorch), chosen once at the first batch;
5. :meth:`OutputBlend.finish`: divide / reduce, packed in the predictor's form.

Steps 0, 4 and 5 (and the padding helper :func:`pad_for_windows`) are also the Dask driver's, run on each output
block (:mod:`patchblend.distributed.worker`).
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
from .._validate import as_size, check_finite_nonnegative, resolve_data_device
from ._accumulators import BlendSettings, make_accumulator, make_confidence_accumulator, output_geometry
from ._predictions import WEIGHTINGS, Prediction, ScoreChecks, apply_process_fn, pack_outputs, parse_output
from .confidence import PredictionWithConfidence
from .importance import importance_map
from .options import (DEFAULT_OVERLAP, SlidingWindowOptions, hashable_sigma_scale, split_option_keywords,
                      with_option_keywords)
from .windows import WindowGrid, lattice_tables, sliding_windows

__all__ = ["sliding_window_inference", "run_sliding_window", "resolve_call", "ResolvedCall", "WindowPlan",
           "OutputBlend", "pad_for_windows", "resolve_roi", "resolve_overlap", "resolve_importance", "WEIGHTINGS"]

_ops = torch.ops.patchblend

# windows cut per extraction call, at most (bytes; at least one predictor batch)
_CHUNK_BYTES = {"cpu": 1 << 20, "cuda": 32 << 20}


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


def resolve_roi(roi_size, image_size, nd: int) -> Tuple[int, ...]:
    """``roi_size`` (an int, or one entry per axis; ``None`` / ``<= 0`` the full axis) as ``nd`` ints for an image
    of ``image_size``; a wrong count or a non-integral size raises naming ``roi_size``."""
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
        if r is not None and type(r) is not int:
            r = as_size("roi_size", r)  # (64.0 is 64; 6.5 is refused, not truncated)
        out.append(int(s) if r is None or r <= 0 else r)  # None / non-positive: the full axis (MONAI)
    return tuple(out)


def resolve_overlap(overlap, nd: int) -> Tuple[float, ...]:
    """``overlap`` (a float, or one per axis) as ``nd`` floats in ``[0, 1)``, else an error naming it."""
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


class WindowPlan(NamedTuple):
    """Where the windows go (step 1): in the image, and in the image as padded for windows larger than it."""

    pad_lo: Tuple[int, ...]  # padding before the image per axis (ROI larger than the image)
    padded: Tuple[int, ...]  # the padded image's size
    image_grid: WindowGrid  # the lattice in image coordinates (starts may be negative)
    coords_pad: torch.Tensor  # [N, nd] window starts in the padded image, in the order they are visited
    coords: torch.Tensor  # [N, nd] the same in the image
    coords_pad3: torch.Tensor  # [N, 3] the ops' form of coords_pad (contiguous)
    coords3: torch.Tensor  # [N, 3] the ops' form of coords


def _resolve_tile_step_size(tile_step_size, nd: int) -> Optional[Tuple[float, ...]]:
    """nnU-Net's ``tile_step_size`` (checked by the options) per axis, or None when not given."""
    if tile_step_size is None:
        return None
    if isinstance(tile_step_size, tuple):
        if len(tile_step_size) != nd:
            raise ValueError(f"tile_step_size must be a float or {nd} floats, got {tile_step_size!r}")
        return tile_step_size
    return (tile_step_size,) * nd


@functools.lru_cache(maxsize=32)
def _window_plan(image_size, roi, overlaps, placement: str, slab_axis: int, tile_steps=None) -> WindowPlan:
    """Where the windows go, in the order they are visited: MONAI's raster order, or with ``slab_axis`` the
    slowest (stable, so raster order within a slab). Cached, since inference over a data set meets the same
    sizes again and again; the tensors are shared and never modified (and ordinary tensors, also when made
    under inference mode: a later call with autograd saves them for backward)."""
    with torch.inference_mode(False):
        return _make_window_plan(image_size, roi, overlaps, placement, slab_axis, tile_steps)


def _make_window_plan(image_size, roi, overlaps, placement: str, slab_axis: int, tile_steps=None) -> WindowPlan:
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

    return WindowPlan(pad_lo, padded, image_grid, coords_pad, coords, ops_form(coords_pad), ops_form(coords))


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
        return imp, check_finite_nonnegative("roi_weight_map", imp.to(acc))  # (as accumulated)
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


class ResolvedCall(NamedTuple):
    """The options of one call resolved against its input (step 0 of the pipeline)."""

    options: SlidingWindowOptions  # as given, checked
    x: torch.Tensor  # the input as a plain tensor [B, C, *S]
    meta_source: Any  # the MONAI MetaTensor input, or None
    nd: int
    image_size: Tuple[int, ...]
    roi: Tuple[int, ...]
    overlaps: Tuple[float, ...]
    tile_steps: Optional[Tuple[float, ...]]  # nnU-Net's step per axis, or None
    slab_axis: Optional[int]  # the user's slab axis (patchblend's memory mode), in [0, nd)
    buffer_steps: Optional[int]  # MONAI's buffering (None: off): windows visited along buffer_dim, buffer by buffer
    order_axis: int  # windows are visited sorted (stably) by their start along this axis
    device: torch.device
    sw_device: torch.device
    acc: torch.dtype  # accumulation dtype


def _check_input(inputs, roi_size) -> None:
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor [B, C, *spatial], got {type(inputs).__name__}")
    _check_dims_match_roi(roi_size, inputs.shape)
    if inputs.dim() < 3:
        raise ValueError(f"inputs must be [B, C, *spatial] with at least one spatial axis, got shape "
                         f"{tuple(inputs.shape)}")
    if inputs.device.type == "meta":
        raise ValueError("inputs is a meta tensor (no data): sliding-window inference needs real data")
    if inputs.shape[0] < 1 or inputs.shape[1] < 1:
        raise ValueError(f"inputs must have a batch and a channel dimension of at least 1, got {tuple(inputs.shape)}")
    if any(s < 1 for s in inputs.shape[2:]):
        raise ValueError(f"inputs must have a non-empty spatial size, got {tuple(inputs.shape)}")


def _resolve_slab_axis(slab_axis, nd: int) -> Optional[int]:
    if slab_axis is None:
        return None
    if not -nd <= slab_axis < nd:
        raise ValueError(f"slab_axis must be None or an int in [{-nd}, {nd}), got {slab_axis!r}")
    if nd not in (2, 3):
        raise ValueError(f"slab_axis needs 2D or 3D inputs, got {nd} spatial axes")
    return int(slab_axis) % nd


def _resolve_buffer_dim(buffer_dim, slab_axis: Optional[int], nd: int) -> int:
    """MONAI's ``buffer_dim`` (in ``[-nd, nd]``, MONAI's own bound) as a spatial axis; with ``slab_axis``, the
    same axis."""
    if isinstance(buffer_dim, bool) or not isinstance(buffer_dim, numbers.Integral) or not -nd <= buffer_dim <= nd:
        raise ValueError(f"buffer_dim must be in [{-nd}, {nd}], got {buffer_dim!r}")
    buffer_dim = int(buffer_dim) + nd if buffer_dim < 0 else int(buffer_dim)
    if buffer_dim >= nd:
        raise ValueError(f"buffer_dim must index a spatial axis (< {nd}), got {buffer_dim}")
    if slab_axis is not None and slab_axis != buffer_dim:
        raise ValueError(f"slab_axis ({slab_axis}) and buffer_dim ({buffer_dim}) both order the windows; "
                         "give one, or the same axis")
    return buffer_dim


def resolve_call(inputs: torch.Tensor, options: SlidingWindowOptions) -> ResolvedCall:
    """Step 0: ``options`` resolved against ``inputs [B, C, *S]`` (the window and overlap per axis, the slab and
    buffer axes, the devices, the accumulation dtype: float64 for float64 inputs, else float32); what needs the
    input's axes is checked here, naming the argument."""
    _check_input(inputs, options.roi_size)
    nd = inputs.dim() - 2
    image_size = tuple(int(s) for s in inputs.shape[2:])
    slab_axis = _resolve_slab_axis(options.slab_axis, nd)
    buffered = options.buffer_steps is not None and options.buffer_steps > 0
    order_axis = _resolve_buffer_dim(options.buffer_dim, slab_axis, nd) if buffered else slab_axis or 0
    x = inputs.as_subclass(torch.Tensor) if type(inputs) is not torch.Tensor else inputs
    return ResolvedCall(
        options=options, x=x, meta_source=inputs if hasattr(inputs, "copy_meta_from") else None, nd=nd,
        image_size=image_size, roi=resolve_roi(options.roi_size, image_size, nd),
        overlaps=resolve_overlap(options.overlap, nd), tile_steps=_resolve_tile_step_size(options.tile_step_size, nd),
        slab_axis=slab_axis, buffer_steps=int(options.buffer_steps) if buffered else None, order_axis=order_axis,
        device=resolve_data_device("device", options.device, inputs.device),
        sw_device=resolve_data_device("sw_device", options.sw_device, inputs.device),
        acc=torch.float64 if x.dtype == torch.float64 else torch.float32,
    )


def _batches(call: ResolvedCall, num_win: int, order_coords: torch.Tensor) -> List[Tuple[int, int]]:
    """The predictor calls as ranges ``[g0, g1)`` of global window indices (image-major, in visit order): runs of
    ``sw_batch_size`` windows (a run may span images, as in MONAI); with MONAI's buffering, runs that restart at
    every buffer of ``buffer_steps`` rows of windows along ``buffer_dim`` and at every image, as MONAI's do."""
    batch, bs = call.x.shape[0], call.options.sw_batch_size
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


def pad_for_windows(x: torch.Tensor, roi, image_size, options: SlidingWindowOptions,
                    zeros_free: bool = True) -> Optional[torch.Tensor]:
    """``x [B, C, *S']`` padded as MONAI pads the image for windows larger than it (``options.padding_mode``,
    ``options.cval``; ``(roi - image) // 2`` before, the rest after, on each axis where ``roi`` exceeds
    ``image_size``), or None when there is nothing to pad, or when ``zeros_free`` and the padding is zeros (the
    2D/3D ``extract`` op reads zeros outside the image: windows then start outside it instead). ``S'`` may be a
    region spanning the whole of every padded axis (a Dask block's input)."""
    if all(r <= s for r, s in zip(roi, image_size)) or (
            zeros_free and options.padding_mode == "constant" and float(options.cval) == 0.0):
        return None
    pads = []
    for r, s in zip(reversed(roi), reversed(image_size)):
        d = max(r - s, 0)
        pads += [d // 2, d - d // 2]
    kw = {"value": float(options.cval)} if options.padding_mode == "constant" else {}
    return F.pad(x, pads, mode=options.padding_mode, **kw)


class _WindowSource:
    """Step 2: cuts each batch's windows out of the input (and out of a ``condition`` tensor), onto ``sw_device``.

    Padding (ROI larger than the image) is never materialised for 2D/3D ``padding_mode="constant", cval=0``: the
    windows start outside the image, and the extract op reads zeros there. Small windows are cut for several
    batches at once (one op call; the calls' fixed cost is what bounds a GPU run), up to a chunk of
    ``_CHUNK_BYTES``; large ones one batch at a time (on the CPU the blend then reads them while in cache). Each
    batch still sees the input as it is when its predictor call comes (as in MONAI): a chunk is cut again if the
    input changed in between (its version counter moved). With autograd recording, or for inference tensors (no
    version counter), one batch per cut."""

    def __init__(self, call: ResolvedCall, condition, plan: WindowPlan):
        x, nd, roi = call.x, call.nd, call.roi
        self.nd, self.roi, self.sw_device, self.num_win = nd, roi, call.sw_device, plan.coords.shape[0]
        if condition is not None and (not isinstance(condition, torch.Tensor) or condition.shape != x.shape):
            raise ValueError(f"condition must be a tensor shaped like inputs {tuple(x.shape)}, got "
                             f"{tuple(condition.shape) if isinstance(condition, torch.Tensor) else type(condition)}")
        kernels = nd in (2, 3)
        padded = pad_for_windows(x, roi, call.image_size, call.options, zeros_free=kernels)
        if padded is not None:
            x = padded
            if condition is not None:
                condition = pad_for_windows(condition, roi, call.image_size, call.options, zeros_free=kernels)
            self.coords = plan.coords_pad3 if kernels else plan.coords_pad
        else:
            self.coords = (plan.coords3 if kernels else plan.coords)
        self.src, self.cond = x, condition
        self.roi3 = [1, *roi] if nd == 2 else list(roi)
        window_bytes = max(1, x.shape[1] * math.prod(roi) * x.element_size())
        chunk_limit = _CHUNK_BYTES["cuda" if x.device.type == "cuda" else "cpu"]
        bs = call.options.sw_batch_size
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


def _window_slices(plan: WindowPlan, segments) -> list:
    """MONAI's ``with_coord`` argument: per window ``[slice(b, b + 1), slice(None), *spatial slices]`` in the padded
    image, the spatial bounds numpy integers as MONAI's are."""
    import numpy as np  # (torch's own dependency; imported only for with_coord)

    roi = plan.image_grid.window_shape
    return [[slice(b, b + 1), slice(None)] + [slice(np.int64(s), np.int64(s + r)) for s, r in zip(c, roi)]
            for b, w0, w1 in segments for c in plan.coords_pad[w0:w1].tolist()]


class OutputBlend:
    """Step 4: one accumulator per output of the predictor, made at the first batch (when the outputs' number,
    channels and resolutions are known), each fed every batch (:meth:`add`); step 5, :meth:`finish`, packs the
    results in the predictor's form (tensor, tuple or dict), as MONAI does. The importance map and the score checks
    (:attr:`checks`, for :func:`~._predictions.parse_output`) are the call's. The Dask driver runs one per output
    block, with ``plan`` the block's windows in its coordinates, and ``window_by_window``: where the numerator and
    denominator accumulator is used (weights in the denominator, or repeated starts), each window is added on its
    own, so that the result is bitwise :func:`~patchblend.calibrated_blend` of the windows in order whatever the
    batching (the in-memory driver's at ``sw_batch_size=1``; with larger batches it sums a batch first)."""

    def __init__(self, call: ResolvedCall, plan: WindowPlan, roi_weight_map=None, window_by_window: bool = False):
        self.call, self.plan = call, plan
        self.window_by_window = window_by_window
        self.num_win = plan.coords.shape[0]
        o = call.options
        self.process_fn = o.process_fn
        imp, peak = resolve_importance(roi_weight_map, call.roi, o.mode, o.sigma_scale, call.acc, call.device)
        self.checks = ScoreChecks(call.acc, 1.0 if o.process_fn is not None else peak)
        self.weighted = imp is not None or o.weighting is not None or o.process_fn is not None
        self.base_importance = imp  # [*roi] or None (constant)
        self.fn_importance = None  # the map process_fn gets, made once
        self.accumulators = None
        self.confidence = None  # the confidence map's accumulator (confidence=True), at the first output's geometry
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

    def _wants_grad(self, pred: Prediction, weights) -> bool:
        return torch.is_grad_enabled() and (
            any(s.requires_grad for s in pred.segs) or (weights is not None and weights.requires_grad)
            or (pred.voxel_weights is not None and any(w.requires_grad for w in pred.voxel_weights))
            or (self.base_importance is not None and self.base_importance.requires_grad))

    def _start(self, pred: Prediction, weights) -> None:
        c, o = self.call, self.call.options
        self.structure = (len(pred.segs), pred.keys, pred.single)
        wants_grad = self._wants_grad(pred, weights)
        self.grad = wants_grad and c.slab_axis is None and o.reduce is None
        if wants_grad and c.slab_axis is not None and o.reduce is None:
            warnings.warn("slab_axis: gradients do not flow through slab mode; the output is detached "
                          "(run under torch.no_grad() to silence this)", stacklevel=4)
        # slab mode: the user's slab_axis, or MONAI's buffering (then the slab accumulates on sw_device)
        slab = c.slab_axis is not None or (c.buffer_steps is not None and not self.grad and c.nd in (2, 3))
        slab_device = c.sw_device if c.slab_axis is None and slab else c.device
        settings = BlendSettings.of(o, batch=c.x.shape[0], device=c.device, acc=c.acc,
                                    out_dtype=c.x.dtype if c.x.dtype.is_floating_point else None,
                                    slab_axis=c.order_axis if slab else None, slab_device=slab_device,
                                    num_win=self.num_win)
        self.accumulators, self.one_by_one = [], []
        for k, seg in enumerate(pred.segs):
            geometry = output_geometry(self.plan, c.roi, self.plan.image_grid.image_shape, tuple(seg.shape[2:]))
            imp = self.importance_for(geometry.roi, slab_device if slab else c.device)
            self.accumulators.append(make_accumulator(geometry, seg.shape[1], imp, settings, seg.dtype,
                                                      grad=self.grad, nd=c.nd))
            stream = geometry.lattice is not None and geometry.lattice.is_strict and not settings.weights_in_den
            self.one_by_one.append(self.window_by_window and not stream)
            if k == 0 and o.confidence:
                self.confidence = make_confidence_accumulator(geometry, imp, settings, seg.dtype, grad=self.grad,
                                                              nd=c.nd, slab=slab)
        self.shapes = [s.shape[1:] for s in pred.segs]

    def _raise_changed(self, pred: Prediction) -> None:
        first_keys = "" if self.structure[1] is None else f" keys {self.structure[1]}"
        raise ValueError(
            f"the predictor's outputs changed between batches: first {self.structure[0]} output(s) "
            f"{[tuple(s) for s in self.shapes]}{first_keys}, now {len(pred.segs)} "
            f"{[tuple(s.shape[1:]) for s in pred.segs]}{'' if pred.keys is None else f' keys {pred.keys}'}")

    def add(self, segments, pred: Prediction) -> None:
        """Blend one batch's outputs (windows ``segments``: ``(image, first window, end window)``) into their
        accumulators."""
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
            self._raise_changed(pred)
        if self.weighted:  # a bound on any voxel's weight sum, which must not overflow
            n = pred.segs[0].shape[0]
            if pred.voxel_weights is None:
                self.checks.add_to_sum(w, n)
            else:  # (one bound for every output: their maps are resized from one)
                self.checks.add_to_sum(torch.stack([wk.detach().amax() for wk in pred.voxel_weights]), n)
        if self.confidence is not None:
            self._add_confidence(segments, w)
            if not c.options.weigh_prediction:
                w = None
        for k, (seg, acc) in enumerate(zip(pred.segs, self.accumulators)):
            device = acc.input_device
            wk = w if pred.voxel_weights is None else pred.voxel_weights[k]
            if wk is not None and wk.device != device:
                wk = wk.to(device)
            if seg.device != device:
                seg = seg.to(device)
            if not self.grad:
                seg, wk = seg.detach(), None if wk is None else wk.detach()
            if self.one_by_one[k]:
                _add_window_by_window(acc, seg, wk, segments)
            else:
                acc.add(seg, wk, segments)

    def _add_confidence(self, segments, w) -> None:
        """The confidence map's share of one batch: the window weights ``w`` (None, ``[n]`` or ``[n, *G]``), on
        its accumulator's device (detached without autograd)."""
        device = self.confidence.input_device
        wc = w if w is None or w.device == device else w.to(device)
        if not self.grad and wc is not None:
            wc = wc.detach()
        self.confidence.add_weights(wc, segments)

    def finish(self):
        """The blended outputs ``[B, C_k, *S_k]`` in the predictor's form (with ``confidence``, a
        :class:`~patchblend.PredictionWithConfidence`); raises the score checks' first failure."""
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
        return prediction if not self.call.options.confidence else PredictionWithConfidence(prediction, confidence)


@with_option_keywords
def sliding_window_inference(
    inputs: torch.Tensor,
    roi_size: Union[Sequence[int], int],
    sw_batch_size: int,
    predictor: Callable[..., Any],
    overlap: Union[Sequence[float], float] = DEFAULT_OVERLAP,
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
    **kwargs: Any,
):
    """Sliding-window inference with optional calibrated (per-patch / per-cell) blending weights.

    The 17 positional parameters, their names and defaults and ``*args`` / ``**kwargs`` are those of
    ``monai.inferers.sliding_window_inference``; for what MONAI accepts the result is MONAI's (to float rounding).
    Every option is a field of :class:`~patchblend.inference.options.SlidingWindowOptions`, documented there;
    patchblend's own (``weighting``, ``normalize``, ``placement``, ``tile_step_size``, ``slab_axis``, ``reduce``,
    ``threshold``, ``label_dtype``, ``confidence``, ``weigh_prediction``) are keyword-only.

    Args:
        inputs: ``[B, C_in, *S]`` with one or more spatial axes (2D and 3D run on the compiled kernels; 1D and 4D+
            on a plain PyTorch path). A MONAI ``MetaTensor`` gives ``MetaTensor`` outputs with its metadata.
        predictor: ``f(windows [n, C_in, *roi], *args, **kwargs)`` (``f(windows, slices, *args, **kwargs)`` with
            ``with_coord``) returning MONAI's forms: a tensor ``[n, C, *roi']``, a tuple or list of them, or a dict
            of them; each output is blended on its own, with its own channels and resolution (``roi'`` may differ
            from ``roi``: zoom ``roi' / roi`` per axis, windows and importance scaled as in MONAI). For calibrated
            weighting it returns :class:`~patchblend.CalibratedOutput` ``(seg, patch_scores [n], grid_scores
            [n, *G])``, where ``seg`` is any of those forms and the scores weight every output alike (scores must
            be finite and ``>= 0``; those ``weighting`` doesn't use may be None). A plain tuple, list or dict is
            never read as scores.
        args: passed to ``predictor`` after the windows (and the slices).
        kwargs: the keyword options, then passed to ``predictor``; a ``condition`` tensor shaped like ``inputs`` is
            windowed like it. The options' names do not reach the predictor (a predictor argument called
            ``threshold``, say, must be bound first, e.g. with ``functools.partial``).

    Returns:
        In the predictor's form (a tensor; a tuple for a tuple or list of two or more outputs; a dict with the same
        keys), each ``[B, C_k, *S_k]`` on ``device`` in ``inputs.dtype`` (the predictor's dtype if ``inputs`` is
        not floating point), ``S_k`` the image size times output ``k``'s zoom; with ``reduce``, labels or masks.
        Accumulation is float32 (float64 for float64 inputs) whatever the predictor's precision.
        With ``confidence=True``: ``PredictionWithConfidence(prediction, confidence)``, ``prediction`` the above and
        ``confidence`` ``[B, 1, *S_0]`` in the prediction's float dtype (``inputs.dtype``, or the predictor's),
        floats also with ``reduce``.

    Gradients: when autograd is on and the predictions (or scores) require grad, the output is differentiable in
    ``inputs``, the predictor's parameters, the scores and ``roi_weight_map``, as MONAI's is; every window's
    prediction is then kept until one :func:`~patchblend.calibrated_blend` at the end (autograd keeps the
    predictor's activations anyway). Under ``torch.no_grad()`` / ``torch.inference_mode()`` the streaming paths run.
    Slab mode and ``reduce`` return detached results (slab mode warns).
    """
    own, kwargs = split_option_keywords(kwargs)
    options = SlidingWindowOptions(roi_size, sw_batch_size, overlap, mode, sigma_scale, padding_mode, cval, sw_device,
                                   device, progress, roi_weight_map, process_fn, buffer_steps, buffer_dim, with_coord,
                                   **own)
    return run_sliding_window(inputs, predictor, options, *args, **kwargs)


def run_sliding_window(inputs: torch.Tensor, predictor: Callable[..., Any], options: SlidingWindowOptions,
                       *args: Any, **kwargs: Any):
    """:func:`sliding_window_inference` with its options given as one :class:`SlidingWindowOptions` (what the
    MONAI inferers call); ``args`` and ``kwargs`` go to ``predictor``."""
    if not callable(predictor):
        raise TypeError("predictor must be callable")
    # 0. the options resolved against the input
    call = resolve_call(inputs, options)
    # 1. where the windows go, in the order they are visited
    plan = _window_plan(call.image_size, call.roi, call.overlaps, options.placement, call.order_axis, call.tile_steps)
    num_win = plan.coords.shape[0]
    total = call.x.shape[0] * num_win
    # 2. cutting batches of windows
    source = _WindowSource(call, kwargs.pop("condition", None), plan)
    outputs = OutputBlend(call, plan, options.roi_weight_map)
    batches = _batches(call, num_win, plan.coords_pad)
    nd, weighting, process_fn, checks, acc = call.nd, options.weighting, options.process_fn, outputs.checks, call.acc
    for g0, g1 in _progress(batches, options.progress, len(batches)):
        segments = _segments(g0, g1, num_win)
        windows, condition = source.cut(g0, g1, total)
        if condition is not None:
            kwargs["condition"] = condition
        # 3. the predictor, and its output read (MONAI's forms, or CalibratedOutput with scores)
        if options.with_coord:
            out = predictor(windows, _window_slices(plan, segments), *args, **kwargs)
        else:
            out = predictor(windows, *args, **kwargs)
        pred = parse_output(out, g1 - g0, nd, weighting, checks, acc)
        if process_fn is not None:
            pred = apply_process_fn(process_fn, pred, windows, outputs.process_fn_importance(), call.roi, checks)
        # 4. each output into its accumulator
        outputs.add(segments, pred)
        # drop this batch's windows and predictions before the next predictor call allocates its own
        del windows, condition, out, pred
        kwargs.pop("condition", None)
    # 5. finish: divide / reduce, in the predictor's form
    return outputs.finish()


def _add_window_by_window(accumulator, seg: torch.Tensor, weights, segments) -> None:
    """``accumulator.add`` of a batch, one window at a time."""
    k = 0
    for b, w0, w1 in segments:
        for w in range(w0, w1):
            accumulator.add(seg[k:k + 1], None if weights is None else weights[k:k + 1], [(b, w, w + 1)])
            k += 1


def _as_meta_tensor(result: torch.Tensor, like):
    """Wrap the output as a MONAI MetaTensor carrying ``like``'s metadata (MONAI's behaviour)."""
    try:
        from monai.data.meta_tensor import MetaTensor
    except ImportError:  # pragma: no cover - a MetaTensor input implies MONAI is installed
        return result
    out = MetaTensor(result)
    out.copy_meta_from(like, copy_attr=False)
    return out
