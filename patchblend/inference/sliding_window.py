"""``sliding_window_inference``: a drop-in for MONAI's, on patchblend's compiled blend.

Per batch of ``sw_batch_size`` windows: one :func:`patchblend.extract_patches` call cuts the windows out of
the input, the predictor runs, and one blend call adds the batch into a float32 accumulator
(:class:`~patchblend.inference.blender.Blender`, or :class:`~.SlabBlender` in slab mode). The denominator is
computed once for all windows when it does not depend on predicted weights. Padding (ROI larger than the
image) is never materialised for ``padding_mode="constant", cval=0``: windows simply start outside the
image, read zeros there, and the blend clips them, which gives exactly MONAI's pad-then-crop result.
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .. import _backend  # noqa: F401  (registers torch.ops.patchblend.*)
from .._validate import _check_finite_nonnegative, finite_nonnegative, resolve_device
from ..ops import calibrated_blend, empty_output, zeros_output
from ..wrapper import CalibratedOutput
from .blender import REDUCTIONS, Blender, LatticeBlender, SlabBlender, check_label_dtype, compact_label_dtype
from .importance import importance_map
from .windows import WINDOW_STYLES, WindowGrid, lattice_tables, sliding_windows

__all__ = ["sliding_window_inference", "WEIGHTINGS"]

_ops = torch.ops.patchblend

WEIGHTINGS = (None, "patch", "grid", "patch*grid")
# windows cut per extraction call, at most (bytes; at least one predictor batch)
_CHUNK_BYTES = {"cpu": 1 << 20, "cuda": 32 << 20}
_PAD_MODES = ("constant", "reflect", "replicate", "circular")


def _enum_value(x):
    return getattr(x, "value", x)


def _resolve_roi(roi_size, image_size, nd: int):
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
        if r is not None and not isinstance(r, int):
            try:
                r = int(r)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"roi_size entries must be ints or None, got {roi_size!r}") from exc
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


def _parse_output(out, n: int, roi, nd: int, weighting, check_values=_check_finite_nonnegative):
    """Predictor output → (seg [n, C, *roi], patch_scores [n] or None, grid_scores [n, *G] or None).

    A tensor is the prediction; CIB scores come only as :class:`~patchblend.CalibratedOutput`
    ``(seg, patch, grid)``. A plain tuple, list or dict is MONAI's multi-output form, never read as scores.
    ``check_values(name, scores)`` checks the values of the scores in use (finite, >= 0)."""
    patch = grid = None
    if isinstance(out, CalibratedOutput):
        seg, patch, grid = out.seg, out.patch, out.grid
    elif isinstance(out, torch.Tensor):
        seg = out
    elif isinstance(out, (tuple, list, Mapping)):
        raise ValueError(
            f"predictor returned a {type(out).__name__}: multi-output predictors (MONAI's tuple/list/dict outputs) "
            "are not supported yet, and a plain tuple is never read as CIB scores; return a tensor, or "
            "patchblend.CalibratedOutput(seg, patch, grid) for calibrated weighting"
        )
    else:
        raise TypeError(f"predictor must return a tensor or a patchblend.CalibratedOutput, got {type(out).__name__}")

    if not isinstance(seg, torch.Tensor) or not seg.dtype.is_floating_point:
        raise TypeError(f"predictor output seg must be a floating-point tensor, got {type(seg).__name__}"
                        + (f" {seg.dtype}" if isinstance(seg, torch.Tensor) else ""))
    if seg.dim() != nd + 2 or seg.shape[0] != n:
        raise ValueError(f"predictor output seg must be [{n}, C, {', '.join(map(str, roi))}] for a batch of {n} "
                         f"windows, got {tuple(seg.shape)}")
    if tuple(seg.shape[2:]) != tuple(roi):
        raise ValueError(f"predictor output seg must have the window's spatial shape {tuple(roi)}, got "
                         f"{tuple(seg.shape[2:])} (outputs at another resolution are not supported)")

    uses_patch = weighting in ("patch", "patch*grid")
    uses_grid = weighting in ("grid", "patch*grid")
    if uses_patch:
        if patch is None:
            raise ValueError(f"weighting={weighting!r} needs patch scores: return "
                             "patchblend.CalibratedOutput(seg, patch, grid) with patch [B]")
        if not isinstance(patch, torch.Tensor) or not patch.dtype.is_floating_point:
            raise TypeError("patch_scores must be a floating-point tensor [B]")
        if patch.dim() == 2 and patch.shape[1] == 1:
            patch = patch[:, 0]
        if tuple(patch.shape) != (n,):
            raise ValueError(f"patch_scores must have shape [{n}] (one per window), got {tuple(patch.shape)}")
        check_values("patch_scores", patch)
    if uses_grid:
        if grid is None:
            raise ValueError(f"weighting={weighting!r} needs grid scores: return "
                             "patchblend.CalibratedOutput(seg, patch, grid) with grid [B, *G]")
        if not isinstance(grid, torch.Tensor) or not grid.dtype.is_floating_point:
            raise TypeError(f"grid_scores must be a floating-point tensor [B, *G] with {nd} grid dims")
        if grid.dim() != nd + 1 or grid.shape[0] != n or any(g < 1 or g > p for g, p in zip(grid.shape[1:], roi)):
            raise ValueError(f"grid_scores must have shape [{n}, *G] with {nd} grid dims, 1 <= G <= roi {tuple(roi)}, "
                             f"got {tuple(grid.shape)}")
        check_values("grid_scores", grid)
    return seg, (patch if uses_patch else None), (grid if uses_grid else None)


class _ScoreChecks:
    """Checks that predictor scores are finite and >= 0: at once on the CPU; on a GPU, one flag per name
    stays on the device and :meth:`raise_if_bad` reads it once at the end (no synchronisation per batch)."""

    def __init__(self):
        self.flags = {}

    def __call__(self, name: str, scores: torch.Tensor) -> None:
        if scores.device.type == "cpu":
            _check_finite_nonnegative(name, scores)
            return
        ok = finite_nonnegative(scores)
        self.flags[name] = ok if name not in self.flags else self.flags[name] & ok

    def raise_if_bad(self) -> None:
        for name, ok in self.flags.items():
            if not bool(ok):
                raise ValueError(f"{name} must be finite and >= 0 (a predictor call returned NaN, inf or a "
                                 "negative value)")


def _weights(patch, grid, nd: int):
    if patch is None:
        return grid
    if grid is None:
        return patch
    # the product in at least float32 (half scores would underflow or overflow in it)
    dt = torch.promote_types(torch.promote_types(patch.dtype, grid.dtype), torch.float32)
    return patch.reshape(-1, *([1] * nd)).to(dt) * grid.to(dt)


class _WindowPlan(NamedTuple):
    pad_lo: Tuple[int, ...]  # padding before the image per axis (ROI larger than the image)
    padded: Tuple[int, ...]  # the padded image's size
    image_grid: WindowGrid  # the lattice in image coordinates (starts may be negative)
    coords_pad: torch.Tensor  # [N, nd] window starts in the padded image, in the order they are visited
    coords: torch.Tensor  # [N, nd] the same in the image
    coords_pad3: torch.Tensor  # [N, 3] the ops' form of coords_pad (contiguous)
    coords3: torch.Tensor  # [N, 3] the ops' form of coords


@functools.lru_cache(maxsize=32)
def _window_plan(image_size, roi, overlaps, placement: str, slab_axis: int) -> _WindowPlan:
    """Where the windows go, in the order they are visited: MONAI's raster order, or with ``slab_axis`` the
    slowest (stable, so raster order within a slab). Cached, since inference over a data set meets the same
    sizes again and again; the tensors are shared and never modified (and ordinary tensors, also when made
    under inference mode: a later call with autograd saves them for backward)."""
    with torch.inference_mode(False):
        return _make_window_plan(image_size, roi, overlaps, placement, slab_axis)


def _make_window_plan(image_size, roi, overlaps, placement: str, slab_axis: int) -> _WindowPlan:
    pad_lo = tuple(max(r - s, 0) // 2 for r, s in zip(roi, image_size))
    padded = tuple(max(r, s) for r, s in zip(roi, image_size))
    grid = sliding_windows(padded, roi, overlaps, placement)
    image_grid = WindowGrid(image_size, roi, tuple(tuple(s - p for s in a) for a, p in zip(grid.starts, pad_lo)))
    coords_pad = lattice_tables(grid.starts).coords
    coords = lattice_tables(image_grid.starts).coords
    if slab_axis != 0:
        order = torch.argsort(coords_pad[:, slab_axis], stable=True)
        coords_pad, coords = coords_pad[order], coords[order]

    def ops_form(c):
        return (F.pad(c, (3 - c.shape[1], 0)) if c.shape[1] < 3 else c).contiguous()

    return _WindowPlan(pad_lo, padded, image_grid, coords_pad, coords, ops_form(coords_pad), ops_form(coords))


def _hashable(value):
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


def _progress(iterable, enabled: bool, total: int):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm  # imported lazily: tqdm is optional
    except ImportError as exc:
        raise ImportError("progress=True needs tqdm (pip install tqdm)") from exc
    return tqdm(iterable, total=total)


def sliding_window_inference(
    inputs: torch.Tensor,
    roi_size: Union[Sequence[int], int],
    sw_batch_size: int,
    predictor: Callable[..., Any],
    overlap: Union[Sequence[float], float] = 0.25,
    mode: str = "constant",
    sigma_scale: Union[Sequence[float], float] = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
    sw_device: Union[torch.device, str, None] = None,
    device: Union[torch.device, str, None] = None,
    progress: bool = False,
    *,
    weighting: Optional[str] = None,
    normalize: Optional[str] = None,
    placement: str = "monai",
    slab_axis: Optional[int] = None,
    reduce: Optional[str] = None,
    threshold: float = 0.5,
    label_dtype: torch.dtype = torch.int64,
    roi_weight_map: Optional[torch.Tensor] = None,
    with_coord: bool = False,
    process_fn: Optional[Callable] = None,
    buffer_steps: Optional[int] = None,
    buffer_dim: int = -1,
    **kwargs: Any,
):
    """Sliding-window inference with optional calibrated (per-patch / per-cell) blending weights.

    Positional arguments, names and defaults follow ``monai.inferers.sliding_window_inference``; for a
    predictor that returns a tensor the result is MONAI's (to float tolerance).

    Args:
        inputs: ``[B, C_in, H, W]`` or ``[B, C_in, D, H, W]``.
        roi_size: window size, an int or one per spatial axis; entries ``None`` or ``<= 0`` mean the full axis.
            A window larger than the image pads the image (``padding_mode``, ``cval``), as MONAI does, and the
            output is cropped back.
        sw_batch_size: windows per predictor call (windows of consecutive images may share a call, as in MONAI).
        predictor: ``f(windows [n, C_in, *roi], **kwargs)`` returning ``seg [n, C, *roi]``; or, for calibrated
            weighting, :class:`~patchblend.CalibratedOutput` ``(seg, patch_scores [n], grid_scores [n, *G])``
            (scores must be finite and ``>= 0``; the ones ``weighting`` doesn't use may be None). A plain tuple,
            list or dict (MONAI's multi-output form) is refused, never read as scores.
        overlap: fraction of a window shared with its neighbour, in ``[0, 1)``, scalar or per axis.
        mode: importance of each window voxel: ``"constant"``, ``"gaussian"`` (MONAI's, ``sigma_scale``) or
            ``"nnunet"`` (nnU-Net's Gaussian, peak 10).
        sigma_scale: Gaussian ``sigma = sigma_scale * roi`` (scalar or per axis).
        padding_mode: ``"constant"``, ``"reflect"``, ``"replicate"`` or ``"circular"`` (when roi > image).
        cval: fill value for constant padding.
        sw_device: where the windows and the predictor run (default: ``inputs.device``).
        device: where the output is accumulated and returned (default: ``inputs.device``).
        progress: show a tqdm progress bar (tqdm is imported only then).
        weighting: ``None`` (MONAI's averaging), ``"patch"`` (weight each window by its patch score, Eq. 1),
            ``"grid"`` (each grid cell by its cell score, Eq. 2) or ``"patch*grid"``. The importance of
            ``mode`` multiplies in.
        normalize: ``"weight"`` (divide by the weight sum; the default when ``weighting`` is None, MONAI's
            behaviour), ``"count"`` (divide by the number of covering windows; the default when ``weighting``
            is set: the paper's Eq. 1/2) or ``"none"``.
        placement: window placement, ``"monai"`` (default) or ``"nnunet"`` (``tile_step_size = 1 - overlap``).
        slab_axis: bounded-memory mode: process windows slab by slab along this spatial axis and finalise each
            part of the output as soon as no later window touches it; the float accumulator then spans only
            about one window (times the batch's spread) along the axis. Same result as the full path
            (bitwise for axis 0 when the windows form a lattice, the usual case; to float rounding otherwise,
            e.g. with weights in the denominator or nnU-Net placement with repeated starts).
        reduce: ``None``, ``"argmax"`` (labels ``[B, 1, *S]`` in ``label_dtype``) or ``"threshold"``
            (``[B, C, *S]`` bool, ``value >= threshold``); in slab mode applied slab by slab, so the full float
            output never exists.
        threshold: for ``reduce="threshold"``.
        label_dtype: dtype of argmax labels. In slab mode they are held in the smallest integer dtype that fits
            (uint8 up to 256 classes) until the last slab is freed, then widened: int64 labels do not raise the
            peak.
        roi_weight_map: optional precomputed importance ``[*roi]`` (non-negative), replacing ``mode``'s.
        with_coord: pass the windows' MONAI-style slices to the predictor: ``predictor(windows, slices, **kwargs)``.
        process_fn: MONAI's per-window hook is not supported (it is normalised wrongly there); raises.
        buffer_steps, buffer_dim: accepted for MONAI compatibility and ignored (see ``slab_axis``).
        kwargs: passed to ``predictor``; a ``condition`` tensor shaped like ``inputs`` is windowed like it. The
            keyword-only names above are patchblend's and do not reach the predictor (a predictor argument
            called ``threshold``, say, must be bound first, e.g. with ``functools.partial``).

    Returns:
        ``[B, C, *S]`` on ``device`` in ``inputs.dtype`` (the predictor's dtype if ``inputs`` is not floating
        point); with ``reduce``, labels or masks as above. A MONAI ``MetaTensor`` input gives a ``MetaTensor``.
        Accumulation is float32 (float64 for float64 inputs) whatever the predictor's precision.

    Gradients: when autograd is on and the predictions (or scores) require grad, the output is differentiable in
    ``inputs``, the predictor's parameters, the scores and ``roi_weight_map``, as MONAI's is; every window's
    prediction is then kept until one :func:`~patchblend.calibrated_blend` at the end (autograd keeps the
    predictor's activations anyway). Under ``torch.no_grad()`` / ``torch.inference_mode()`` the streaming paths run.
    Slab mode and ``reduce`` return detached results (slab mode warns).
    """
    # ---- arguments ------------------------------------------------------------------------------------
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor [B, C, *spatial], got {type(inputs).__name__}")
    nd = inputs.dim() - 2
    if nd not in (2, 3):
        raise ValueError(f"inputs must be [B, C, H, W] or [B, C, D, H, W], got shape {tuple(inputs.shape)}")
    if not callable(predictor):
        raise TypeError("predictor must be callable")
    if isinstance(sw_batch_size, torch.Tensor) and sw_batch_size.dim() == 0:
        sw_batch_size = sw_batch_size.item()  # MONAI accepts a 0-d tensor
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, numbers.Integral) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be a positive int, got {sw_batch_size!r}")
    sw_batch_size = int(sw_batch_size)  # (a numpy integer too)
    image_size = tuple(int(s) for s in inputs.shape[2:])
    if inputs.shape[0] < 1 or inputs.shape[1] < 1:
        raise ValueError(f"inputs must have a batch and a channel dimension of at least 1, got {tuple(inputs.shape)}")
    if any(s < 1 for s in image_size):
        raise ValueError(f"inputs must have a non-empty spatial size, got {tuple(inputs.shape)}")
    roi = _resolve_roi(roi_size, image_size, nd)
    overlaps = _resolve_overlap(overlap, nd)
    mode = _enum_value(mode)
    padding_mode = _enum_value(padding_mode)
    if padding_mode not in _PAD_MODES:
        raise ValueError(f"padding_mode must be one of {_PAD_MODES}, got {padding_mode!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if normalize is None:
        normalize = "weight" if weighting is None else "count"
    if normalize not in ("count", "weight", "none"):
        raise ValueError(f"normalize must be 'count', 'weight' or 'none', got {normalize!r}")
    if placement not in WINDOW_STYLES:
        raise ValueError(f"placement must be one of {WINDOW_STYLES}, got {placement!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if reduce == "argmax":
        check_label_dtype(1, label_dtype)  # the type now; whether it holds every class once C is known
    if slab_axis is not None and (isinstance(slab_axis, bool) or not isinstance(slab_axis, int)
                                  or not -nd <= slab_axis < nd):
        raise ValueError(f"slab_axis must be None or an int in [{-nd}, {nd}), got {slab_axis!r}")
    if process_fn is not None:
        raise NotImplementedError("process_fn is not supported; use weighting= with predictor scores instead")
    del buffer_steps, buffer_dim  # MONAI memory knobs; slab_axis is patchblend's
    batch = inputs.shape[0]
    device = resolve_device(device, inputs.device)
    sw_device = resolve_device(sw_device, inputs.device)

    meta_source = inputs if hasattr(inputs, "copy_meta_from") else None  # a MONAI MetaTensor
    x = inputs.as_subclass(torch.Tensor) if type(inputs) is not torch.Tensor else inputs
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32

    # ---- windows ---------------------------------------------------------------------------------------
    if slab_axis is not None:
        slab_axis %= nd
    plan = _window_plan(image_size, roi, overlaps, placement, slab_axis or 0)
    pad_lo, padded, coords_pad, coords = plan.pad_lo, plan.padded, plan.coords_pad, plan.coords
    image_starts = plan.image_grid.starts
    num_win = coords.shape[0]

    condition = kwargs.pop("condition", None)
    if any(pad_lo) or any(p > s for p, s in zip(padded, image_size)):
        if padding_mode == "constant" and float(cval) == 0.0:
            src, src_coords3, cond_src = x, plan.coords3, condition  # the extract op reads zeros outside
        else:
            pads = []
            for r, s in zip(reversed(roi), reversed(image_size)):
                d = max(r - s, 0)
                pads += [d // 2, d - d // 2]
            pad_kw = {"value": float(cval)} if padding_mode == "constant" else {}
            src = F.pad(x, pads, mode=padding_mode, **pad_kw)
            cond_src = None if condition is None else F.pad(condition, pads, mode=padding_mode, **pad_kw)
            src_coords3 = plan.coords_pad3
    else:
        src, src_coords3, cond_src = x, plan.coords3, condition
    # extraction in the ops' 3D form; the starts stay on the CPU (a GPU kernel uploads them without a sync)
    roi3 = [1, *roi] if nd == 2 else list(roi)

    def windows(source, segments):
        """The windows of ``segments`` [(image, first, end)] of ``source [B, C, *S]`` → ``[n, C, *roi]``."""
        parts = [_ops.extract(source[b] if nd == 3 else source[b].unsqueeze(1), src_coords3[w0:w1], roi3)
                 for b, w0, w1 in segments]
        win = parts[0] if len(parts) == 1 else torch.cat(parts)
        return win if nd == 3 else win.squeeze(2)

    # ---- importance and denominator ---------------------------------------------------------------------
    if roi_weight_map is not None:
        imp = torch.as_tensor(roi_weight_map).to(device=device, dtype=acc)
        if tuple(imp.shape[-nd:]) != roi or imp.numel() != torch.Size(roi).numel():
            raise ValueError(f"roi_weight_map must have shape {roi}, got {tuple(imp.shape)}")
        imp = imp.reshape(roi)
        _check_finite_nonnegative("roi_weight_map", imp)
    elif mode == "constant":
        imp = None
    else:
        imp = _cached_importance(roi, mode, _hashable(sigma_scale), acc, device)
    weights_in_den = normalize == "weight" and weighting is not None
    # The streaming paths need a strict lattice; nnU-Net's placement repeats starts when roi * (1 - overlap) < 1.
    strict_lattice = plan.image_grid.is_strict
    general = weights_in_den or not strict_lattice  # Blender: numerator and denominator, divided at the end
    slab = slab_axis is not None

    out_dtype = x.dtype if x.dtype.is_floating_point else None
    state = {"channels": None, "out": None}
    score_checks = _ScoreChecks()
    blenders = {}
    kept = {}  # with autograd: image -> [(seg, weights)] of every batch

    def blender_for(b: int, channels: int):
        if b in blenders:
            return blenders[b]
        if state["out"] is None:  # first predictor output: now C is known
            state["channels"] = channels
            if reduce == "argmax":
                check_label_dtype(channels, label_dtype)
            if slab:
                odt = out_dtype or state["seg_dtype"]
                shape = (batch, 1 if reduce == "argmax" else channels, *image_size)
                # argmax labels stay compact while slabs exist and are widened at the end (lower peak)
                labels = compact_label_dtype(channels, label_dtype)
                dt = labels if reduce == "argmax" else torch.bool if reduce == "threshold" else odt
                state["out"] = empty_output(shape, dt, device)
            elif not general:  # LatticeBlender: every voxel is written, no zero fill needed
                state["out"] = empty_output((batch, channels, *image_size), acc, device)
            else:  # Blender with a numerator and the weight sum, divided at the end
                state["out"] = zeros_output((batch, channels, *image_size), acc, device)
        if slab:
            blenders[b] = SlabBlender(
                image_size, channels, axis=slab_axis, normalize=normalize, importance=imp, window_shape=roi,
                reduce=reduce, threshold=threshold, device=device, dtype=acc,
                out_dtype=out_dtype or state["seg_dtype"], label_dtype=state["out"].dtype,
                window_lattice=None if general else image_starts, out=state["out"][b],
            )
            blenders[b].check_values = False  # score_checks did it
        elif not general:
            blenders[b] = LatticeBlender(image_size, channels, plan.image_grid, roi, normalize=normalize,
                                         importance=imp, device=device, dtype=acc, out=state["out"][b])
            blenders[b].check_values = False
        else:
            blenders[b] = Blender(image_size, channels, normalize=normalize, importance=imp, window_shape=roi,
                                  device=device, dtype=acc, out=state["out"][b])
            blenders[b].check_values = False
        return blenders[b]

    # ---- the loop: one extraction, one predictor call and one blend per batch -------------------------
    total = batch * num_win

    def segments_of(g0: int, g1: int) -> list:
        """Global windows [g0, g1) (image-major) as (image, first window, end window) per image."""
        segments, g = [], g0
        while g < g1:
            b, w0 = divmod(g, num_win)
            w1 = min(num_win, w0 + (g1 - g))
            segments.append((b, w0, w1))
            g += w1 - w0
        return segments

    # Windows are cut for several batches at once when they are small (one op call instead of one per batch;
    # the calls' fixed cost is what bounds a GPU run), up to a chunk of _CHUNK_BYTES; large windows one batch at
    # a time (on the CPU, the blend then reads them while they are still in cache). Each batch still sees the
    # input as it is when its predictor call comes (as in MONAI): a chunk is cut again if the input changed in
    # between (its version counter moved, e.g. a predictor that writes back into it). With autograd recording,
    # one batch per cut: the batches of a chunk would share one version counter, and a predictor that edits
    # its input in place would invalidate what autograd saved for an earlier batch.
    window_bytes = max(1, src.shape[1] * math.prod(roi) * src.element_size())
    chunk_limit = _CHUNK_BYTES["cuda" if src.device.type == "cuda" else "cpu"]
    per_chunk = max(1, chunk_limit // (window_bytes * sw_batch_size)) * sw_batch_size
    # (Inference tensors have no version counter: a change could not be seen, so they are cut batch by batch.)
    trackable = not (src.is_inference() or (cond_src is not None and cond_src.is_inference()))
    if torch.is_grad_enabled() or not trackable:
        per_chunk = sw_batch_size
    chunk = cond_chunk = None
    chunk_lo = chunk_hi = 0
    chunk_version = None

    def source_version():
        if not trackable:
            return None
        return src._version, None if cond_src is None else cond_src._version

    starts = range(0, total, sw_batch_size)
    for g0 in _progress(starts, progress, len(starts)):
        g1 = min(g0 + sw_batch_size, total)
        segments = segments_of(g0, g1)  # (image, first window, end window) within this batch
        if g0 >= chunk_hi or source_version() != chunk_version:
            chunk_version = source_version()
            chunk_lo, chunk_hi = g0, min(g0 + per_chunk, total)
            chunk = windows(src, segments_of(chunk_lo, chunk_hi)).to(sw_device)
            if cond_src is not None:
                cond_chunk = windows(cond_src, segments_of(chunk_lo, chunk_hi)).to(sw_device)
        win = chunk[g0 - chunk_lo:g1 - chunk_lo]
        if cond_src is not None:
            kwargs["condition"] = cond_chunk[g0 - chunk_lo:g1 - chunk_lo]
        if g1 == chunk_hi:  # the chunk's last batch: let its windows go with the batch
            chunk = cond_chunk = None
        if with_coord:
            slices = [[slice(b, b + 1), slice(None)] + [slice(s, s + r) for s, r in zip(c, roi)]
                      for b, w0, w1 in segments for c in coords_pad[w0:w1].tolist()]
            out = predictor(win, slices, **kwargs)
        else:
            out = predictor(win, **kwargs)
        n = g1 - g0
        seg, patch_scores, grid_scores = _parse_output(out, n, roi, nd, weighting, score_checks)
        if state["channels"] is not None and seg.shape[1] != state["channels"]:
            raise ValueError(f"predictor output seg changed its channel count from {state['channels']} to "
                             f"{seg.shape[1]} between batches")
        state.setdefault("seg_dtype", seg.dtype)
        seg = seg.to(device)
        w = _weights(patch_scores, grid_scores, nd)
        if w is not None:
            # each score is finite; their product, or float64 scores in a float32 accumulator, may not be
            both = patch_scores is not None and grid_scores is not None
            if both or torch.finfo(w.dtype).max > torch.finfo(acc).max:
                w = w.to(acc)
                score_checks("patch_scores * grid_scores" if both else
                             f"{'patch' if patch_scores is not None else 'grid'}_scores (as {acc})", w)
            w = w.to(device)
        if "grad" not in state:  # decided once, at the first batch
            wants_grad = torch.is_grad_enabled() and (seg.requires_grad or (w is not None and w.requires_grad)
                                                      or (imp is not None and imp.requires_grad))
            state["grad"] = wants_grad and not slab and reduce is None
            if wants_grad and slab and reduce is None:
                warnings.warn("slab_axis: gradients do not flow through slab mode; the output is detached "
                              "(run under torch.no_grad() to silence this)", stacklevel=2)
        if not state["grad"]:
            seg, w = seg.detach(), None if w is None else w.detach()
        k = 0
        for b, w0, w1 in segments:
            m = w1 - w0
            bl = None if state["grad"] else blender_for(b, seg.shape[1])
            if bl is None:  # keep the (differentiable) predictions; one differentiable blend at the end
                kept.setdefault(b, []).append((seg[k:k + m], None if w is None else w[k:k + m]))
            elif isinstance(bl, LatticeBlender):
                bl._add(seg[k:k + m], None if w is None else w[k:k + m])  # (checked by _parse_output)
            elif not slab:
                bl.add(seg[k:k + m], coords[w0:w1], None if w is None else w[k:k + m])
            else:
                # one add per run of equal starts along the slab axis, finalising in between, so that the slab
                # buffer stays one window deep even when a predictor batch spans two rows of windows
                axis_starts = coords[w0:w1, slab_axis].tolist()
                r0 = 0
                for r in range(1, m + 1):
                    if r < m and axis_starts[r] == axis_starts[r0]:
                        continue
                    bl.add(seg[k + r0:k + r], coords[w0 + r0:w0 + r], None if w is None else w[k + r0:k + r])
                    if w0 + r < num_win:
                        bl.finalize_until(int(coords[w0 + r, slab_axis]))
                    r0 = r
                if w1 == num_win:
                    bl.finish()
                    del blenders[b]
            k += m
        # drop this batch's windows and predictions before the next predictor call allocates its own
        del win, out, seg, patch_scores, grid_scores, w
        kwargs.pop("condition", None)

    # ---- finalise --------------------------------------------------------------------------------------
    score_checks.raise_if_bad()
    if state.get("grad"):
        result = _differentiable_blend(kept, batch, coords, image_size, normalize, imp, acc)
        kept = None
    else:
        result = state["out"]
        if slab and reduce == "argmax" and result.dtype != label_dtype:
            state["out"] = None
            result = result.to(label_dtype)  # every slab is freed by now
        if not slab:
            for b in range(batch):
                blender_for(b, state["channels"]).finalize()
    if not slab:
        if reduce == "argmax":
            result = result.argmax(1, keepdim=True).to(label_dtype)
        elif reduce == "threshold":
            result = result >= threshold
        else:
            odt = out_dtype or state["seg_dtype"]
            if result.dtype != odt:
                result = result.to(odt)
    if meta_source is not None:
        result = _as_meta_tensor(result, meta_source)
    return result


def _differentiable_blend(kept, batch: int, coords, image_size, normalize, importance, acc) -> torch.Tensor:
    """With autograd: every window's prediction in one :func:`~patchblend.calibrated_blend` per image (the
    spec the streaming paths match), which is differentiable in the predictions, the scores and the importance."""
    outs = []
    for b in range(batch):
        segs, ws = zip(*kept[b])
        weights = None if ws[0] is None else torch.cat(ws)
        outs.append(calibrated_blend(torch.cat(segs).to(acc), weights, coords, image_size, normalize=normalize,
                                     importance=importance))
    return torch.stack(outs)


def _as_meta_tensor(result: torch.Tensor, like):
    """Wrap the output as a MONAI MetaTensor carrying ``like``'s metadata (MONAI's behaviour)."""
    try:
        from monai.data.meta_tensor import MetaTensor
    except ImportError:  # pragma: no cover - a MetaTensor input implies MONAI is installed
        return result
    out = MetaTensor(result)
    out.copy_meta_from(like, copy_attr=False)
    return out
