"""Streaming blenders for sliding-window inference: one image's output, blended batch by batch.

:class:`Blender` takes batches of patches (with their starts and optional calibrated weights) and keeps
only a float32 numerator ``[C, *out_shape]`` and, when it depends on the weights, a denominator
``[*out_shape]``: each batch is blended by the compiled op into its bounding box with
``normalize="none"`` and added in; :meth:`Blender.finish` divides once at the end. The result is the
:func:`patchblend.calibrated_blend` of all patches added (docs/design.md#blend-semantics), up to float32 summation order.

:class:`SlabBlender` does the same with a buffer that spans only a slab along one spatial axis:
patches must arrive in non-decreasing order of their start along that axis, and
:meth:`SlabBlender.finish_until` finalises (and optionally reduces: argmax or threshold) the part
of the slab that no later patch can touch, writing it into the output.

Every blender has one interface: ``add`` a batch, ``finish()`` (the result) and, with ``confidence=True``,
``finish_with_confidence()``; ``check_values`` is a constructor argument. ``finalize``, ``finalize_with_confidence``
and ``SlabBlender.finalize_until`` are the earlier names, kept as aliases.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from .. import _backend  # noqa: F401  (registers torch.ops.patchblend.*)
from .._validate import (NORMALIZE_MODES, accumulation_dtype, as_coords, as_sizes, check_finite_nonnegative,
                         check_float_tensor, check_half_result, check_not_meta, check_sum_fits, check_threshold,
                         prepare_blend_args, prepare_weights_and_max, resolve_device)
from .._reference import lattice_axes
from .confidence import ConfidenceTerms, PredictionWithConfidence, check_confidence_options
from .windows import WindowGrid, lattice_tables
from ..ops import coverage_on, empty_output, zeros_output

__all__ = ["Blender", "LatticeBlender", "SlabBlender", "window_coverage", "lattice_coverage", "REDUCTIONS"]

_ops = torch.ops.patchblend

REDUCTIONS = (None, "argmax", "threshold")


def _canonical_importance(importance, window_shape, acc, device) -> Optional[torch.Tensor]:
    """Check ``importance [*window_shape]`` once and return it as ``[D, H, W]`` in ``acc`` on ``device``."""
    return _importance_and_max(importance, window_shape, acc, device)[0]


def _importance_and_max(importance, window_shape, acc, device):
    """:func:`_canonical_importance` and the map's largest value (after the conversion to ``acc``)."""
    if importance is None:
        return None, 1.0
    if not isinstance(importance, torch.Tensor) or not importance.dtype.is_floating_point:
        raise TypeError("importance must be a floating-point tensor [*window_shape]")
    check_not_meta("importance", importance)
    if tuple(importance.shape) != tuple(window_shape):
        raise ValueError(f"importance must have shape {tuple(window_shape)}, got {tuple(importance.shape)}")
    # Checked once per tensor, version, storage and accumulation dtype (the driver passes one cached map for
    # every image and call; on a GPU each check waits for the device). The storage is part of the key because a
    # copy carries the attribute along; inference tensors have no version counter and are checked every time.
    version = None if importance.is_inference() else (importance._version, importance.data_ptr(), acc)
    checked = getattr(importance, "_patchblend_checked", None)
    converted = importance.to(device=device, dtype=acc)
    if version is not None and checked is not None and checked[0] == version:
        largest = checked[1]
    else:
        # after the conversion: a float64 map beyond the float32 range becomes inf in it
        largest = check_finite_nonnegative("importance", converted)
        if version is not None:
            importance._patchblend_checked = (version, largest)
    while converted.dim() < 3:
        converted = converted.unsqueeze(0)
    return converted.contiguous(), largest


def _to3(shape: Sequence[int]) -> Tuple[int, int, int]:
    return (1,) * (3 - len(shape)) + tuple(shape)


def window_coverage(
    coords,
    window_shape: Sequence[int],
    out_shape: Sequence[int],
    normalize: str = "count",
    importance: Optional[torch.Tensor] = None,
    *,
    dtype=torch.float32,
    device=None,
) -> torch.Tensor:
    """The blend's denominator ``[*out_shape]`` for unweighted windows at ``coords [N, nd]``: the number of
    windows covering each voxel (``"count"``), the importance sum (``"weight"``) or ones (``"none"``)."""
    nd = len(out_shape)
    coords = as_coords(coords, nd)
    if nd == 2:
        coords = torch.nn.functional.pad(coords, (1, 0))
    device = resolve_device(device)
    imp = _canonical_importance(importance, window_shape, dtype, device) if normalize == "weight" else None
    den = coverage_on(None, coords, imp, _to3(window_shape), _to3(out_shape), normalize, dtype, device)
    return den.reshape(tuple(out_shape))


def _overlap_add_axis(f: torch.Tensor, axis: int, starts, size: int, lo: int = 0, hi: Optional[int] = None):
    """Along ``axis``: ``g[v] = sum_i f[v - starts[i]]`` for ``v`` in ``[lo, hi)`` (ascending ``i``; ``f`` is 0
    outside its extent). Returns ``g`` with that axis of length ``hi - lo``."""
    hi = size if hi is None else hi
    p = f.shape[axis]
    shape = list(f.shape)
    shape[axis] = hi - lo
    g = f.new_zeros(shape)
    for s in starts:
        a, b = max(s, lo), min(s + p, hi)
        if a < b:
            g.narrow(axis, a - lo, b - a).add_(f.narrow(axis, a - s, b - a))
    return g


def lattice_coverage(
    starts: Sequence[Sequence[int]],
    window_shape: Sequence[int],
    out_shape: Sequence[int],
    importance: Optional[torch.Tensor] = None,
    *,
    dtype=torch.float32,
    device=None,
) -> torch.Tensor:
    """The denominator ``[*out_shape]`` for unweighted windows on a separable lattice (the windows are all
    combinations of ``starts[a]`` per axis, as :class:`WindowGrid` makes them): ``sum_i importance[v - s_i]``,
    i.e. the window count when ``importance`` is None. Because the lattice is separable this is applied axis by
    axis (last axis first) with a few slice-adds per axis instead of a pass over every window; the importance
    itself need not be separable (MONAI's clamped Gaussian is not)."""
    nd = len(out_shape)
    f = (torch.ones(tuple(window_shape), dtype=dtype, device=device) if importance is None
         else importance.to(device=device, dtype=dtype))
    for axis in reversed(range(nd)):
        f = _overlap_add_axis(f, axis, starts[axis], out_shape[axis])
    return f


class _BlendCore:
    """Shared by the blenders: argument checks and one batch blended into its bounding box."""

    #: Check that weights are finite and >= 0 on every ``add`` (one device synchronisation on a GPU); set by the
    #: constructor's ``check_values`` (the sliding-window driver passes False: it checks predictor scores itself,
    #: once per call on a GPU). Assigning the attribute still works (the documented way before the argument).
    check_values: bool = True

    def __init__(self, out_shape, channels, window_shape, normalize, importance, device, dtype,
                 check_values: bool = True):
        self.check_values = bool(check_values)
        self.out_shape = as_sizes("out_shape", out_shape)
        self.nd = len(self.out_shape)
        if self.nd not in (2, 3) or any(s < 0 for s in self.out_shape):
            raise ValueError(f"out_shape must be 2 or 3 non-negative ints, got {out_shape}")
        self.channels = int(channels)
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.window_shape = None if window_shape is None else as_sizes("window_shape", window_shape)
        if self.window_shape is not None and (len(self.window_shape) != self.nd or min(self.window_shape) < 1):
            raise ValueError(f"window_shape must be {self.nd} positive ints, got {window_shape}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        self.normalize = normalize
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype (the accumulation dtype) must be float32 or float64, got {dtype}")
        self.dtype = dtype
        self.device = resolve_device(device)
        self._importance_raw = importance
        self.importance = None
        self._importance_max = 1.0
        self._weight_sum_bound = 0.0  # terms x largest weight x largest importance added so far (see _patches...)
        if importance is not None:
            if self.window_shape is None:
                self.window_shape = tuple(importance.shape)
            self.importance, self._importance_max = _importance_and_max(importance, self.window_shape, dtype,
                                                                        self.device)

    #: the confidence companion (a one-channel blender of the same kind, see :meth:`_setup_confidence`) or None
    _confidence = None
    #: whether weights given to ``add`` weight the prediction (False: they go only into the confidence map)
    weigh_prediction: bool = True

    def _setup_confidence(self, confidence: bool, weigh_prediction: bool, make) -> None:
        """``confidence=True``: ``make(normalize, importance)`` builds the companion blender, one channel, that
        receives the confidence terms of every batch, with the confidence blend's normalisation and importance
        (:class:`~.confidence.ConfidenceTerms`)."""
        check_confidence_options(confidence, weigh_prediction, self.normalize)
        self.weigh_prediction = weigh_prediction
        if confidence:
            self._terms = ConfidenceTerms(self.normalize, self.dtype, self._importance_raw)
            self._confidence = make(self._terms.normalize, self._terms.importance)

    def _confidence_terms(self, weights, n: int):
        """The companion's ``(patches, weights)`` for a batch of ``n`` windows with ``weights``."""
        self._confidence.check_values = self.check_values
        return self._terms(weights, n, self.window_shape, self.device, self.check_values)

    def _require_confidence(self, method: str) -> None:
        if self._confidence is None:
            raise RuntimeError(f"{type(self).__name__}.{method}: this blender was made without confidence=True")

    def finalize(self, *args, **kwargs) -> torch.Tensor:
        """Alias of ``finish`` (its earlier name), kept for existing code."""
        return self.finish(*args, **kwargs)

    def finalize_with_confidence(self, *args, **kwargs) -> PredictionWithConfidence:
        """Alias of ``finish_with_confidence`` (its earlier name), kept for existing code."""
        return self.finish_with_confidence(*args, **kwargs)

    def _output_buffer(self, out: Optional[torch.Tensor], make) -> torch.Tensor:
        """The caller's ``out`` (checked: contiguous ``[C, *out_shape]`` of the accumulation dtype on the device)
        or a new one from ``make`` (``zeros_output`` / ``empty_output``)."""
        full = (self.channels, *self.out_shape)
        if out is None:
            return make(full, self.dtype, self.device)
        if tuple(out.shape) != full or out.dtype != self.dtype or out.device != self.device or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {self.dtype} tensor {full} on {self.device}, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
        return out

    def _check_patches(self, patches: torch.Tensor) -> None:
        check_float_tensor("patches", patches)
        check_not_meta("patches", patches)
        if patches.dim() != self.nd + 2:
            raise ValueError(f"patches must be [N, C, *P] with {self.nd} spatial dims, got {tuple(patches.shape)}")
        if patches.shape[1] != self.channels:
            raise ValueError(f"patches must have {self.channels} channels, got {patches.shape[1]}")
        if self.window_shape is None:
            self.window_shape = tuple(patches.shape[2:])
        elif tuple(patches.shape[2:]) != self.window_shape:
            raise ValueError(f"patches must have spatial shape {self.window_shape}, got {tuple(patches.shape[2:])}")
        if patches.device != self.device:
            raise ValueError(f"patches is on {patches.device} but the blender accumulates on {self.device}")

    def _bbox(self, rows):
        """Bounding box of the patches (their starts as lists of ints) clipped to the output: (lo, hi) per axis,
        or None if empty."""
        if not rows:
            return None
        lo = [max(min(c), 0) for c in zip(*rows)]
        hi = [min(max(c) + w, s) for c, w, s in zip(zip(*rows), self.window_shape, self.out_shape)]
        if any(b <= a for a, b in zip(lo, hi)):
            return None
        return lo, hi

    def _groups(self, rows: list, boxes: bool = True):
        """Split a batch (its starts, a list of int lists) into runs of consecutive patches that share their
        start on every axis but the last (rows of MONAI's raster order) when that at least halves the volume
        blended; ``[(i, j, bbox)]`` (bbox None when ``boxes`` is False and the batch is one run). (Python ints
        throughout: a batch has a handful of patches, and tensor ops would cost more.)"""
        n = len(rows)
        change = [k for k in range(1, n) if rows[k][:-1] != rows[k - 1][:-1]] if self.nd >= 2 else []
        if not change:
            return [(0, n, self._bbox(rows) if boxes else None)]
        whole = [(0, n, self._bbox(rows))]
        bounds = [0, *change, n]
        runs = [(i, j, self._bbox(rows[i:j])) for i, j in zip(bounds, bounds[1:])]

        def volume(b):
            return 0 if b is None else math.prod(h - l for l, h in zip(*b))

        if 2 * sum(volume(r[2]) for r in runs) <= volume(whole[0][2]):
            return runs
        return whole

    @staticmethod
    def _check_weights_rows(weights, n: int) -> None:
        if weights is not None and isinstance(weights, torch.Tensor) and (weights.dim() == 0 or weights.shape[0] != n):
            raise ValueError(f"weights must have N = {n} rows (one per patch), got shape {tuple(weights.shape)}")

    def _accumulate(self, num: torch.Tensor, den: Optional[torch.Tensor], patches, coords, weights) -> None:
        """Add one batch into ``num [C, *S]`` (and its denominator into ``den [*S]``) in place, with the
        compiled accumulate-mode blend (``torch.ops.patchblend.blend_add_``): only the box the patches cover
        is touched, half patches are read as half. ``coords`` are relative to the buffers' origin."""
        p, w, coords3 = self._batch_args(patches, weights, coords, tuple(num.shape[1:]))
        if self.nd == 2:
            num = num.unsqueeze(1)
            den = None if den is None else den.unsqueeze(0)
        _ops.blend_add_(num, den, p, w, coords3, self.importance, self.normalize)

    def _batch_args(self, patches, weights, coords, out_shape):
        """One batch checked by ``prepare_blend_args`` and put in the ops' canonical 3D form: ``(patches,
        weights, coords [n, 3])``, weights in the accumulation dtype; patches keep their dtype when it
        accumulates in it (half is read as half by the kernels), else are converted."""
        a = prepare_blend_args(patches, None, coords, out_shape, "none", None)
        return (*self._patches_and_weights(patches, weights), a.coords)

    def _patches_and_weights(self, patches, weights):
        """``patches`` in the ops' 3D form, kept in their dtype when it accumulates in :attr:`dtype` (half is read
        as half by the kernels), else converted; ``weights`` checked and made ``[n, Gd, Gh, Gw]`` straight in
        :attr:`dtype` (not through the patches' accumulation dtype: float64 weights stay exact)."""
        p = patches if accumulation_dtype(patches.dtype) == self.dtype else patches.to(self.dtype)
        w, largest = prepare_weights_and_max(weights, patches.shape[0], patches.shape[2:], self.dtype,
                                             patches.device, self.check_values)
        if self.check_values and (w is not None or self.importance is not None):
            # a running bound on any voxel's weight sum: it must not overflow (inf, or NaN as inf / inf)
            self._weight_sum_bound += patches.shape[0] * (largest if w is not None else 1.0) * self._importance_max
            check_sum_fits("weights" if w is not None else "importance values", self._weight_sum_bound, self.dtype)
        return (p.unsqueeze(2) if self.nd == 2 else p), w

    def _finalize_values(self, num: torch.Tensor, den: Optional[torch.Tensor]) -> torch.Tensor:
        """``num / den`` in place by docs/design.md#blend-semantics's rules (``"count"``: ``den`` clamped at 1; ``"weight"``: 0 where
        ``den`` is 0, since ``num`` is 0 there too). ``den`` is made safe in place (idempotent)."""
        if self.normalize == "none":
            return num
        return num.div_(safe_denominator_(den, self.normalize))


def safe_denominator_(den: torch.Tensor, normalize: str) -> torch.Tensor:
    """In place: clamp a count at 1, or replace a weight sum of exactly 0 by 1. Where a weight sum is 0 the
    numerator is 0 too (weights are >= 0), so the quotient is 0 as docs/design.md#blend-semantics asks; any other sum, subnormal
    ones included (a patch score of 1e-20 times a cell score of 1e-20), is divided by as it is, as the op does
    (clamping it at the smallest normal float shrank such weighted means)."""
    if normalize == "count":
        return den.clamp_(min=1.0)
    return den.masked_fill_(den == 0, 1.0)


class Blender(_BlendCore):
    """Streaming weighted overlap-add of patch batches into ``[C, *out_shape]``.

    Args:
        out_shape: spatial output size ``(D, H, W)`` or ``(H, W)``.
        channels: ``C``, the channels of every patch.
        normalize: ``"count"`` (divide by the number of covering patches), ``"weight"`` (by the sum of
            weight × importance) or ``"none"``, as in :func:`patchblend.calibrated_blend`.
        importance: optional ``[*P]`` window importance (e.g. a Gaussian), multiplied into every weight.
        window_shape: ``P``; taken from ``importance`` or from the first batch when omitted.
        device: where the buffers live (default CPU); patches must be on it.
        dtype: accumulation dtype, float32 (default) or float64.
        out: optional preallocated, zeroed numerator ``[C, *out_shape]`` of ``dtype`` to accumulate into (and
            finalise in place).
        denominator: optional precomputed denominator ``[*out_shape]`` for every patch that will be added
            (e.g. :func:`window_coverage`); then no denominator is accumulated per batch, which is only
            valid when it does not depend on the weights (``"count"``, or ``"weight"`` without weights).
            :meth:`finish` makes it safe to divide by in place (counts clamped at 1, zero weight sums
            replaced by 1), which is idempotent, so several blenders may share one.
        confidence: also accumulate the blended confidence map ``[1, *out_shape]`` of the weights given to
            :meth:`add` (``"count"``: ``C = Σ α / N``; ``"weight"``: ``Σ α·imp / Σ imp``; 0 where nothing covers;
            see :mod:`patchblend.inference.confidence`), returned by :meth:`finish_with_confidence`. Needs
            ``normalize`` ``"count"`` or ``"weight"``. Costs a one-channel numerator (and denominator) more.
        weigh_prediction: with ``confidence=True`` only: ``False`` sends the weights given to :meth:`add` only
            into the confidence map; the prediction is then the unweighted blend.
        check_values: check on every ``add`` that weights are finite and ``>= 0`` (one device synchronisation on a
            GPU); ``False`` when the caller has checked them (the sliding-window driver checks predictor scores).

    Memory: the numerator and the denominator; each batch is added in place (``blend_add_``). Patches are
    never kept. Half-precision patches are accumulated in float32.

    Example:
        >>> b = Blender((64, 64, 64), channels=2, normalize="count")
        >>> for patches, coords, scores in batches:   # patches [n, 2, 32, 32, 32], coords [n, 3], scores [n]
        ...     b.add(patches, coords, scores)
        >>> out = b.finish()                           # [2, 64, 64, 64]
    """

    def __init__(
        self,
        out_shape: Sequence[int],
        channels: int,
        *,
        normalize: str = "count",
        importance: Optional[torch.Tensor] = None,
        window_shape: Optional[Sequence[int]] = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        out: Optional[torch.Tensor] = None,
        denominator: Optional[torch.Tensor] = None,
        confidence: bool = False,
        weigh_prediction: bool = True,
        check_values: bool = True,
    ):
        super().__init__(out_shape, channels, window_shape, normalize, importance, device, dtype, check_values)
        self._setup_confidence(confidence, weigh_prediction, lambda norm, imp: Blender(
            out_shape, 1, normalize=norm, importance=imp, window_shape=self.window_shape, device=self.device,
            dtype=dtype, denominator=denominator))
        self.num = self._output_buffer(out, zeros_output)
        self._fixed_den = denominator is not None
        if denominator is not None:
            if tuple(denominator.shape) != self.out_shape or denominator.device != self.device:
                raise ValueError(f"denominator must be {self.out_shape} on {self.device}, "
                                 f"got {tuple(denominator.shape)} on {denominator.device}")
            self.den = denominator
        elif normalize != "none":
            self.den = zeros_output(self.out_shape, dtype, self.device)
        else:
            self.den = None
        self._finalized = False

    def add(self, patches: torch.Tensor, coords, weights: Optional[torch.Tensor] = None) -> None:
        """Blend one batch in.

        Args:
            patches: ``[n, C, *P]``, any float dtype, on the blender's device.
            coords: ``[n, nd]`` integer starts in the output (parts outside are clipped).
            weights: ``None``, ``[n]`` (per patch) or ``[n, *G]`` (per grid cell); finite, ``>= 0``. With
                ``confidence=True`` they also go into the confidence map (only there with
                ``weigh_prediction=False``).
        """
        if self._finalized:
            raise RuntimeError("Blender.add called after finish() (or its alias finalize())")
        self._check_patches(patches)
        coords = as_coords(coords, self.nd)
        if coords.shape[0] != patches.shape[0]:
            raise ValueError(f"coords must have {patches.shape[0]} rows (one per patch), got {coords.shape[0]}")
        all_weights, weights = weights, weights if self.weigh_prediction else None
        if weights is not None and self._fixed_den and self.normalize == "weight":
            raise ValueError("weights cannot be used with a precomputed denominator under normalize='weight' "
                             "(the weight sum depends on them)")
        self._check_weights_rows(all_weights, patches.shape[0])
        if patches.shape[0] == 0:
            return
        with_den = self.den is not None and not self._fixed_den
        for i, j, bbox in self._groups(coords.tolist()):
            w = None if weights is None else weights[i:j]
            if bbox is None:  # every patch lies outside the output; still check the weights
                prepare_blend_args(patches[i:j], w, coords[i:j], self.out_shape, "none", None, self.check_values)
                continue
            self._accumulate(self.num, self.den if with_den else None, patches[i:j], coords[i:j], w)
        if self._confidence is not None:
            c_patches, c_weights = self._confidence_terms(all_weights, patches.shape[0])
            self._confidence.add(c_patches, coords, c_weights)

    def finish(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Divide by the denominator (in place, once) and return ``[C, *out_shape]`` (cast to ``dtype`` if given).
        Voxels no patch covered are 0."""
        if not self._finalized:
            self._finalize_values(self.num, self.den)
            self._finalized = True
            self.den = None
        return self.num if dtype is None or dtype == self.num.dtype else self.num.to(dtype)

    def finish_with_confidence(self, dtype: Optional[torch.dtype] = None) -> PredictionWithConfidence:
        """``(prediction [C, *out_shape], confidence [1, *out_shape])`` (both cast to ``dtype`` if given); needs
        ``confidence=True``. The prediction is :meth:`finish`'s."""
        self._require_confidence("finish_with_confidence")
        return PredictionWithConfidence(self.finish(dtype), self._confidence.finish(dtype))


def _covers(axes: Sequence[Sequence[int]], window_shape, out_shape) -> bool:
    """Whether the windows of a lattice with per-axis starts ``axes`` (ascending) leave no voxel of
    ``out_shape`` uncovered."""
    for starts, p, o in zip(axes, window_shape, out_shape):
        reach = 0
        for s in starts:
            if s > reach:
                return False
            reach = max(reach, s + p)
        if reach < o:
            return False
    return True


class LatticeBlender(_BlendCore):
    """Streaming blend of the windows of a lattice arriving in raster order; holds nothing but the output.

    The windows are known up front (``coords``, e.g. :meth:`WindowGrid.coords`); each :meth:`add` takes the
    next batch of them. The compiled ``blend_stream_`` op adds a batch's weighted terms to the running sums
    of the voxels it covers and divides each voxel by its denominator (computed from the lattice) as soon as
    its last window has been added. So there is no zero-filled numerator, no denominator volume and no final
    division pass, and the result is bitwise :func:`patchblend.calibrated_blend` of all windows.

    Args:
        out_shape: spatial output size ``(D, H, W)`` or ``(H, W)``.
        channels: ``C``.
        coords: ``[N, nd]`` starts of all windows: every combination of per-axis starts, each once, in raster
            order (last axis fastest); or the :class:`WindowGrid` itself (then nothing is checked per window).
        window_shape: ``P``.
        normalize: ``"count"``, ``"weight"`` or ``"none"``. Per-window ``weights`` may be passed to
            :meth:`add` with ``"count"`` and ``"none"``; ``"weight"`` takes only the fixed ``importance`` (its
            denominator must not depend on later batches; use :class:`Blender` otherwise).
        importance: optional ``[*P]`` window importance, multiplied into every weight.
        device, dtype: where and in which float dtype (float32 or float64) the output is accumulated.
        out: optional preallocated contiguous ``[C, *out_shape]`` buffer of ``dtype``; it need not be zeroed.
        confidence: also blend the confidence map ``[1, *out_shape]`` of the weights given to :meth:`add`, in the
            same stream mode (a one-channel output more), returned by :meth:`finish_with_confidence`; bitwise
            :func:`patchblend.calibrated_blend` of the weights spread over their windows (see
            :mod:`patchblend.inference.confidence`). Needs ``normalize`` ``"count"`` or ``"weight"``.
        weigh_prediction: with ``confidence=True`` only: ``False`` sends the weights only into the confidence map
            (the prediction is the unweighted blend); so weights may be given under ``"weight"`` too.
        check_values: check on every ``add`` that weights are finite and ``>= 0`` (one device synchronisation on a
            GPU); ``False`` when the caller has checked them (the sliding-window driver checks predictor scores).

    Example:
        >>> grid = sliding_windows((64, 64, 64), (32, 32, 32), 0.5)
        >>> b = LatticeBlender((64, 64, 64), 2, grid.coords(), (32, 32, 32))
        >>> for k in range(0, len(grid), 4):
        ...     b.add(predictor(windows[k:k + 4]))      # [n, 2, 32, 32, 32], the next n windows
        >>> out = b.finish()                             # [2, 64, 64, 64]
    """

    def __init__(
        self,
        out_shape: Sequence[int],
        channels: int,
        coords,
        window_shape: Sequence[int],
        *,
        normalize: str = "count",
        importance: Optional[torch.Tensor] = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        out: Optional[torch.Tensor] = None,
        confidence: bool = False,
        weigh_prediction: bool = True,
        check_values: bool = True,
    ):
        super().__init__(out_shape, channels, window_shape, normalize, importance, device, dtype, check_values)
        self._setup_confidence(confidence, weigh_prediction, lambda norm, imp: LatticeBlender(
            out_shape, 1, coords, window_shape, normalize=norm, importance=imp, device=self.device, dtype=dtype))
        not_lattice = ("coords must be the windows of a lattice (every combination of per-axis starts, each once) "
                       "in raster order, as WindowGrid.coords() gives them")
        if isinstance(coords, WindowGrid):  # a lattice by construction: nothing to check per window
            if len(coords.starts) != self.nd or not coords.is_strict or len(coords) == 0:
                raise ValueError(not_lattice + f"; got a WindowGrid with starts {coords.starts}")
            axes = coords.starts
        else:
            axes = lattice_axes(as_coords(coords, self.nd).tolist())
            if axes is None:
                raise ValueError(not_lattice)
        tables = lattice_tables(tuple(tuple(a) for a in axes))  # (shared, read-only)
        self.coords, self._rows, self._coords3 = tables.coords, tables.rows, tables.coords3  # all on the CPU
        self.out = self._output_buffer(out, empty_output)
        if not _covers(axes, self.window_shape, self.out_shape):
            self.out.zero_()  # voxels no window covers are never written by the op
        self.next = 0  # index of the next window to be added

    def add(self, patches: torch.Tensor, weights: Optional[torch.Tensor] = None) -> None:
        """Blend in the next ``n`` windows.

        Args:
            patches: ``[n, C, *P]``, any float dtype, on the blender's device: windows ``next .. next + n - 1``.
            weights: ``None``, ``[n]`` or ``[n, *G]``; finite, ``>= 0``; not with ``normalize="weight"`` (unless
                they go only into the confidence map: ``weigh_prediction=False``).
        """
        self._check_patches(patches)
        n = patches.shape[0]
        if self.next + n > self.coords.shape[0]:
            raise ValueError(f"patches has {n} windows but only {self.coords.shape[0] - self.next} of the "
                             f"{self.coords.shape[0]} are left")
        if weights is not None and self.normalize == "weight" and self.weigh_prediction:
            raise ValueError("weights cannot be used with normalize='weight' in a LatticeBlender (the weight sum "
                             "depends on later batches); use Blender")
        self._check_weights_rows(weights, n)
        self.add_unchecked(patches, weights)

    def add_unchecked(self, patches: torch.Tensor, weights: Optional[torch.Tensor]) -> None:
        """:meth:`add` without its checks of the arguments' structure (shapes, dtypes, window count), for a caller
        that built the batches itself (the sliding-window driver's per-batch path: a few microseconds of Python
        besides the op, and no device synchronisation unless :attr:`check_values`). Wrong shapes are not caught."""
        n = patches.shape[0]
        if n == 0:
            return
        if self._confidence is not None:
            self._confidence.add_unchecked(*self._confidence_terms(weights, n))
            if not self.weigh_prediction:
                weights = None
        p, w = self._patches_and_weights(patches, weights)
        out = self.out.unsqueeze(1) if self.nd == 2 else self.out
        # a batch that spans two rows of windows is blended row by row (tighter boxes, see _groups)
        for i, j, _ in self._groups(self._rows[self.next:self.next + n], boxes=False):
            _ops.blend_stream_(out, p[i:j], None if w is None else w[i:j], self._coords3, self.next + i,
                               self.importance, self.normalize)
        self.next += n

    def finish(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``[C, *out_shape]`` once every window has been added (cast to ``dtype`` if given)."""
        if self.next != self.coords.shape[0]:
            raise RuntimeError(f"LatticeBlender.finish: only {self.next} of {self.coords.shape[0]} windows added")
        return self.out if dtype is None or dtype == self.out.dtype else self.out.to(dtype)

    def finish_with_confidence(self, dtype: Optional[torch.dtype] = None) -> PredictionWithConfidence:
        """``(prediction [C, *out_shape], confidence [1, *out_shape])`` once every window has been added (cast to
        ``dtype`` if given); needs ``confidence=True``."""
        self._require_confidence("finish_with_confidence")
        return PredictionWithConfidence(self.finish(dtype), self._confidence.finish(dtype))


def check_label_dtype(channels: int, label_dtype) -> None:
    """Raise unless ``label_dtype`` holds every argmax label ``0 .. channels - 1`` exactly (no silent wrap)."""
    if not isinstance(label_dtype, torch.dtype) or label_dtype == torch.bool or label_dtype.is_complex:
        raise TypeError(f"label_dtype must be an integer or floating torch.dtype, got {label_dtype!r}")
    if label_dtype.is_floating_point:
        largest = int(2 / torch.finfo(label_dtype).eps)  # 2 ** (mantissa bits + 1): every integer up to it is exact
    else:
        largest = torch.iinfo(label_dtype).max
    if channels - 1 > largest:
        raise ValueError(f"label_dtype {label_dtype} cannot hold the argmax labels of {channels} channels "
                         f"(labels up to {channels - 1}, the dtype holds up to {largest}); use a wider dtype "
                         "such as torch.int64")


def compact_label_dtype(channels: int, label_dtype: torch.dtype) -> torch.dtype:
    """The smallest integer dtype that holds the labels ``0 .. channels - 1`` exactly, if it is smaller than
    ``label_dtype`` (else ``label_dtype``). Slab mode stores argmax labels in it while the slab exists and widens
    them to ``label_dtype`` once the slab is freed, so that the peak holds the slab or the wide labels, not both."""
    for dt in (torch.uint8, torch.int16, torch.int32):
        if channels - 1 <= torch.iinfo(dt).max and dt.itemsize < label_dtype.itemsize:
            return dt
    return label_dtype


def _reduce(values: torch.Tensor, reduce, threshold: float, label_dtype) -> torch.Tensor:
    if reduce is None:
        return values
    if reduce == "argmax":
        return values.argmax(0, keepdim=True).to(label_dtype)
    return values >= threshold


class SlabBlender(_BlendCore):
    """Streaming blend that holds only a slab of the output along one spatial ``axis``.

    Patches must be added in non-decreasing order of their start along ``axis`` (a patch may not touch a
    finalised part). Call :meth:`finish_until` with the start of the next patch to be added: everything
    before it is final and is divided, optionally reduced, and written to :attr:`out`; :meth:`finish`
    finalises the rest. The result equals :class:`Blender`'s (bitwise when the batches are the same).

    Args:
        out_shape, channels, normalize, importance, window_shape, device, dtype: as for :class:`Blender`.
        axis: the spatial axis to slab along (default 0, the slowest in raster order).
        reduce: ``None`` (output ``[C, *out_shape]`` in ``out_dtype``), ``"argmax"`` (``[1, *out_shape]``
            labels in ``label_dtype``) or ``"threshold"`` (``[C, *out_shape]`` bool, ``value >= threshold``).
        threshold: for ``reduce="threshold"``.
        out_dtype: dtype of the unreduced output (default: the accumulation dtype).
        label_dtype: dtype of argmax labels (default int64). Without ``out``, the labels are stored in the
            smallest integer dtype that holds them until :meth:`finish` (:func:`compact_label_dtype`), so
            :attr:`out` has ``label_dtype`` only after :meth:`finish`.
        out_device: where the output lives (default ``device``).
        out: optional preallocated output (shape and dtype as described under ``reduce``); every voxel of it
            is written by the time :meth:`finish` returns.
        window_coords: optionally, the starts ``[N, nd]`` of every patch that will be added: then the
            denominator of each finalised slab is computed from them (one pass over the volume) instead of
            being accumulated per batch; only valid when it does not depend on weights (as for ``denominator``
            in :class:`Blender`).
        window_lattice: alternatively, the per-axis starts of a window lattice (as :func:`lattice_coverage`
            takes them); same validity condition. With ``axis=0`` the patches must then arrive in the lattice's
            raster order, and each batch goes through the compiled ``blend_stream_`` op as in
            :class:`LatticeBlender`: the slab holds only the running output (no denominator, no zero fill), and
            the result is bitwise that of :class:`LatticeBlender` and :func:`patchblend.calibrated_blend`.
            Otherwise the denominator is computed axis by axis.
        confidence: also blend the confidence map of the weights given to :meth:`add` (see :class:`Blender`), slab
            by slab beside the output (a one-channel slab more; the map ``[1, *out_shape]`` is floats in
            ``out_dtype`` also with ``reduce``), returned by :meth:`finish_with_confidence`.
        weigh_prediction: with ``confidence=True`` only: ``False`` sends the weights only into the confidence map.
        check_values: check on every ``add`` that weights are finite and ``>= 0`` (one device synchronisation on a
            GPU); ``False`` when the caller has checked them (the sliding-window driver checks predictor scores).

    Memory: ``C × slab × (other axes)`` accumulation floats, where the slab spans the patches of the widest
    batch along ``axis`` (at least one window), plus the output.
    """

    def __init__(
        self,
        out_shape: Sequence[int],
        channels: int,
        *,
        axis: int = 0,
        normalize: str = "count",
        importance: Optional[torch.Tensor] = None,
        window_shape: Optional[Sequence[int]] = None,
        reduce: Optional[str] = None,
        threshold: float = 0.5,
        device=None,
        dtype: torch.dtype = torch.float32,
        out_dtype: Optional[torch.dtype] = None,
        label_dtype: torch.dtype = torch.int64,
        out_device=None,
        window_coords=None,
        window_lattice: Optional[Sequence[Sequence[int]]] = None,
        out: Optional[torch.Tensor] = None,
        confidence: bool = False,
        weigh_prediction: bool = True,
        check_values: bool = True,
    ):
        super().__init__(out_shape, channels, window_shape, normalize, importance, device, dtype, check_values)
        if not isinstance(axis, int) or not (-self.nd <= axis < self.nd):
            raise ValueError(f"axis must be an int in [{-self.nd}, {self.nd}), got {axis!r}")
        self._setup_confidence(confidence, weigh_prediction, lambda norm, imp: SlabBlender(
            out_shape, 1, axis=axis, normalize=norm, importance=imp, window_shape=self.window_shape,
            device=self.device, dtype=dtype, out_dtype=out_dtype or dtype, out_device=out_device,
            window_coords=window_coords, window_lattice=window_lattice))
        self.axis = axis % self.nd
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        self.reduce = reduce
        self.threshold = check_threshold(threshold)
        self.label_dtype = label_dtype
        out_device = torch.device(out_device) if out_device is not None else self.device
        self._widen_to = None  # argmax labels kept compact while the slab exists (see compact_label_dtype)
        if reduce == "argmax":
            check_label_dtype(self.channels, label_dtype)
            shape, odt = (1, *self.out_shape), label_dtype
            if out is None and compact_label_dtype(self.channels, label_dtype) != label_dtype:
                self._widen_to, odt = label_dtype, compact_label_dtype(self.channels, label_dtype)
                self.label_dtype = odt
        elif reduce == "threshold":
            shape, odt = (self.channels, *self.out_shape), torch.bool
        else:
            shape, odt = (self.channels, *self.out_shape), out_dtype or dtype
        if out is not None:
            if tuple(out.shape) != shape or out.dtype != odt:  # (a given out is written in its own dtype)
                raise ValueError(f"out must be a {odt} tensor {shape}, got {out.dtype} {tuple(out.shape)}")
            self.out = out
        else:
            self.out = empty_output(shape, odt, out_device)
        # the denominator mode: one strategy object (see _SlabDenominator)
        if window_lattice is not None:
            if self.window_shape is None or len(window_lattice) != self.nd:
                raise ValueError(f"window_lattice needs {self.nd} start lists and a window_shape")
            lattice = [list(map(int, a)) for a in window_lattice]
            # stream mode: windows in raster order of the lattice, slabs along the slowest axis
            self._den = (_StreamDenominator(lattice, self.window_shape, self.out_shape) if self.axis == 0
                         else _LatticeDenominator(lattice))
        elif window_coords is not None:
            self._den = _CoordsDenominator(as_coords(window_coords, self.nd), self.axis)
        else:
            self._den = _AccumulatedDenominator()
        self._added = 0  # windows added so far
        self._slab_spec = None  # what the denominator strategy is told (see _spec)
        self.lo = 0  # first index along axis not yet finalised
        self._cap = 0
        self.num = None  # [C, cap, ...] slab buffer covering [lo, lo + cap) along axis
        self.den = None
        self.peak_buffer_bytes = 0  # largest accumulation buffer allocated (numerator + denominator)

    # -- slab buffer -------------------------------------------------------------------------------------
    def _slab_shape(self, cap: int) -> list:
        return self._spec().slab_shape(cap)

    def _ensure_capacity(self, hi: int) -> None:
        need = hi - self.lo
        if need <= self._cap:
            return
        shape = self._slab_shape(need)
        fill = torch.empty if self._den.writes_before_reading else torch.zeros
        num = fill((self.channels, *shape), dtype=self.dtype, device=self.device)
        den = None
        if self.normalize != "none" and self._den.accumulated:
            den = torch.zeros(shape, dtype=self.dtype, device=self.device)  # else computed when finalised
        if self._cap:
            keep = [slice(None)] * self.nd
            keep[self.axis] = slice(0, self._cap)
            num[(slice(None),) + tuple(keep)] = self.num
            if den is not None:
                den[tuple(keep)] = self.den
        self.num, self.den, self._cap = num, den, need
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, num.numel() * num.element_size() +
                                     (0 if den is None else den.numel() * den.element_size()))

    def _along(self, start: int, stop: int, channel_dim: bool) -> tuple:
        idx = [slice(None)] * self.nd
        idx[self.axis] = slice(start, stop)
        return ((slice(None),) if channel_dim else ()) + tuple(idx)

    def add(self, patches: torch.Tensor, coords, weights: Optional[torch.Tensor] = None) -> None:
        """Blend one batch in (arguments as :meth:`Blender.add`). Raises if a patch reaches a finalised part."""
        self._check_patches(patches)
        coords = as_coords(coords, self.nd)
        if coords.shape[0] != patches.shape[0]:
            raise ValueError(f"coords must have {patches.shape[0]} rows (one per patch), got {coords.shape[0]}")
        if self._confidence is not None:
            self._check_weights_rows(weights, patches.shape[0])
            if patches.shape[0]:
                c_patches, c_weights = self._confidence_terms(weights, patches.shape[0])
                self._confidence.add(c_patches, coords, c_weights)
            if not self.weigh_prediction:
                weights = None
        if weights is not None and not self._den.accumulated and self.normalize == "weight":
            raise ValueError("weights cannot be used with window_coords or window_lattice under normalize='weight' "
                             "(the weight sum depends on them)")
        self._check_weights_rows(weights, patches.shape[0])
        if patches.shape[0] == 0:
            return
        rows = coords.tolist()
        groups = self._groups(rows)
        for _, _, bbox in groups:
            if bbox is not None and bbox[0][self.axis] < self.lo:
                raise ValueError(f"a patch reaches index {bbox[0][self.axis]} along axis {self.axis}, which is "
                                 f"already finalised (up to {self.lo}); add patches in order of their start "
                                 "along the axis")
        self._den.take(rows, coords, self._added)
        if self._den.stream_coords is not None:
            self._add_stream(patches, coords, weights, groups)
        else:
            self._add_accumulated(patches, coords, weights, groups)
        self._added += patches.shape[0]

    def _origin(self) -> torch.Tensor:
        """The slab buffer's origin in the output: ``lo`` along the axis."""
        origin = torch.zeros(self.nd, dtype=torch.int64)
        origin[self.axis] = self.lo
        return origin

    def _add_accumulated(self, patches, coords, weights, groups) -> None:
        """Each run of the batch blended into the slab's numerator (and denominator) with ``blend_add_``."""
        with_den = self.normalize != "none" and self._den.accumulated
        for i, j, bbox in groups:
            w = None if weights is None else weights[i:j]
            if bbox is None:
                prepare_blend_args(patches[i:j], w, coords[i:j], self.out_shape, "none", None, self.check_values)
                continue
            self._ensure_capacity(bbox[1][self.axis])
            self._accumulate(self.num, self.den if with_den else None, patches[i:j], coords[i:j] - self._origin(), w)

    def _add_stream(self, patches, coords, weights, groups) -> None:
        """The batch (the lattice's next windows, axis 0) blended into the running slab with ``blend_stream_``, which
        divides each voxel once its last window is in (as in :class:`LatticeBlender`)."""
        boxes = [bb for _, _, bb in groups if bb is not None]
        self._ensure_capacity(max(bb[1][0] for bb in boxes) if boxes else self.lo)
        if not self._cap:
            return
        p, w, _ = self._batch_args(patches, weights, coords, self.out_shape)
        all_coords, num = self._den.stream_coords - self._origin(), self.num
        if self.nd == 2:
            all_coords, num = torch.nn.functional.pad(all_coords, (1, 0)), num.unsqueeze(1)
        _ops.blend_stream_(num, p, w, all_coords, self._added, self.importance, self.normalize)

    def finish_until(self, stop: int) -> None:
        """Finalise ``[lo, stop)`` along the axis: the caller promises that no later patch touches it."""
        if self._confidence is not None:
            self._confidence.finish_until(stop)
        stop = min(int(stop), self.out_shape[self.axis])
        if stop > self.lo:
            self._den.check_complete(stop)
        while self.lo < stop:
            k = min(stop - self.lo, self._cap)
            if k == 0:  # nothing buffered: the region was never touched by a patch, its value is 0
                values = torch.zeros((self.channels, *self._slab_shape(stop - self.lo)), dtype=self.dtype,
                                     device=self.device)
                self._write(values, stop)
                continue
            values = self.num[self._along(0, k, True)]  # finalised in place: this part is dropped next
            if self.normalize != "none" and self._den.divides:  # (the stream op has divided already)
                accumulated = None if self.den is None else self.den[self._along(0, k, False)]
                den = self._den.of_slab(self._spec(), self.lo, self.lo + k, accumulated)
                values.div_(safe_denominator_(den, self.normalize))
            self._write(values, self.lo + k)
            self._shift(k)

    def _spec(self) -> "_SlabSpec":
        """What the denominator strategy is told; made once the window shape is known (at the latest from the
        first batch; it does not change after that)."""
        if self._slab_spec is None or self._slab_spec.window_shape != self.window_shape:
            self._slab_spec = _SlabSpec(self.axis, self.window_shape, self.out_shape, self.normalize,
                                        self._importance_raw, self.dtype, self.device)
        return self._slab_spec

    def _write(self, values: torch.Tensor, stop: int) -> None:
        values = _reduce(values, self.reduce, self.threshold, self.label_dtype)
        if self.out.dtype == torch.float16 and values.dtype != torch.float16:
            check_half_result(values, "out_dtype (float16)")
        self.out[self._along(self.lo, stop, True)] = values.to(self.out.device)
        self.lo = stop

    def _shift(self, k: int) -> None:
        """Drop the first ``k`` slices of the slab buffer: move the rest to the front, zero the tail."""
        cap = self._cap
        rest = cap - k
        for buf, ch in ((self.num, True), (self.den, False)):
            if buf is None:
                continue
            # Copy in chunks of k slices so that source and destination of one copy never overlap.
            for j in range(0, rest, k):
                m = min(k, rest - j)
                buf[self._along(j, j + m, ch)] = buf[self._along(j + k, j + k + m, ch)]
            if not self._den.writes_before_reading:
                buf[self._along(max(rest, 0), cap, ch)] = 0

    def finish(self) -> torch.Tensor:
        """Finalise everything left and return :attr:`out`."""
        if self._confidence is not None:
            self._confidence.finish()
        self.finish_until(self.out_shape[self.axis])
        self.num = self.den = None
        self._den.release()
        if self._widen_to is not None:  # the slab is gone: now the labels may take their requested width
            self.out, self._widen_to = self.out.to(self._widen_to), None
            self.label_dtype = self.out.dtype
        return self.out

    def finish_with_confidence(self) -> PredictionWithConfidence:
        """``(out, confidence [1, *out_shape])``: :meth:`finish`'s result and the confidence map (floats in
        ``out_dtype``); needs ``confidence=True``."""
        self._require_confidence("finish_with_confidence")
        return PredictionWithConfidence(self.finish(), self._confidence.finish())

    def finalize_until(self, stop: int) -> None:
        """Alias of :meth:`finish_until` (its earlier name), kept for existing code."""
        self.finish_until(stop)


# ---- SlabBlender's denominator modes: one strategy object each ----------------------------------------------

class _SlabSpec(NamedTuple):
    """What a denominator strategy is told of its :class:`SlabBlender` when it computes a denominator."""

    axis: int
    window_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    normalize: str
    importance: Optional[torch.Tensor]  # as given to the blender
    dtype: torch.dtype
    device: torch.device

    def slab_shape(self, length: int) -> list:
        """``out_shape`` with ``length`` along the axis."""
        shape = list(self.out_shape)
        shape[self.axis] = length
        return shape


class _SlabDenominator:
    """How a :class:`SlabBlender` gets the denominator of a finalised part ``[lo, hi)`` of its slab. The blender
    owns every buffer and passes a strategy what it needs; a strategy keeps only its own bookkeeping."""

    accumulated = False  # a denominator buffer is accumulated in the slab, batch by batch
    divides = True  # finalising divides (the stream op divides by itself)
    writes_before_reading = False  # the slab need not be zero-filled (the stream op writes before it reads)
    #: the windows of a lattice in raster order ``[N, nd]`` when the batches go through ``blend_stream_`` (the
    #: blender passes the index of a batch's first window), else None (``blend_add_`` into the slab)
    stream_coords: Optional[torch.Tensor] = None

    def take(self, rows: list, coords: torch.Tensor, first: int) -> None:
        """Note the windows of one ``add`` before they are blended: their starts as int lists (``rows``) and as a
        tensor ``[n, nd]``, and ``first``, the number of windows added before them."""

    def check_complete(self, stop: int) -> None:
        """Raise if finalising up to ``stop`` along the axis would use a denominator with missing windows."""

    def of_slab(self, spec: _SlabSpec, lo: int, hi: int, accumulated: Optional[torch.Tensor]) -> torch.Tensor:
        """The denominator of ``[lo, hi)`` along the axis (``accumulated``: the blender's denominator slab of that
        part, when :attr:`accumulated`)."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop what was cached for the finalising (at :meth:`SlabBlender.finish`)."""


class _AccumulatedDenominator(_SlabDenominator):
    """The default: each batch adds its (weighted) coverage into a denominator slab beside the numerator."""

    accumulated = True

    def of_slab(self, spec, lo, hi, accumulated):
        return accumulated


class _CoordsDenominator(_SlabDenominator):
    """``window_coords``: every patch that will be added is listed up front; the denominator of a finalised part
    is computed from the list (:func:`window_coverage`), so every patch added must be in it, as often as listed,
    and every listed window that reaches a part must have been added before that part is finalised."""

    def __init__(self, coords: torch.Tensor, axis: int):
        self.coords, self.axis = coords, axis
        self.pending = Counter(map(tuple, coords.tolist()))  # listed, not added yet
        self.pending_starts = Counter(coords[:, axis].tolist())

    def take(self, rows, coords, first):
        batch = Counter(map(tuple, rows))
        for row, k in batch.items():
            if self.pending[row] < k:
                raise ValueError(f"a patch at {list(row)} is not in window_coords (or is added more often than it is "
                                 "listed there): the denominator is computed from window_coords")
        for row, k in batch.items():
            self.pending[row] -= k
            self.pending_starts[row[self.axis]] -= k

    def check_complete(self, stop):
        missing = sorted(a for a, k in self.pending_starts.items() if k > 0 and a < stop)
        if missing:
            raise ValueError(f"window_coords lists windows starting at {missing[:4]} along axis {self.axis} that "
                             f"were not added before finalising up to {stop}: their part of the output would be "
                             "divided by a denominator that counts them")

    def of_slab(self, spec, lo, hi, accumulated):
        origin = [0] * self.coords.shape[1]
        origin[self.axis] = lo
        return window_coverage(self.coords - torch.tensor(origin), spec.window_shape, spec.slab_shape(hi - lo),
                               spec.normalize, spec.importance, dtype=spec.dtype, device=spec.device)


class _LatticeDenominator(_SlabDenominator):
    """``window_lattice`` (slab axis other than 0): the lattice's denominator, the other axes' sums once, then
    this axis per finalised part (for axis 0 the same order of additions as :func:`lattice_coverage`, hence
    bitwise the same values)."""

    def __init__(self, lattice: list):
        self.lattice = lattice
        self.partial = None  # the lattice sum over every axis but the slab axis, computed once

    def of_slab(self, spec, lo, hi, accumulated):
        if self.partial is None:
            imp = spec.importance if spec.normalize == "weight" else None
            f = (torch.ones(spec.window_shape, dtype=spec.dtype, device=spec.device) if imp is None
                 else imp.to(device=spec.device, dtype=spec.dtype))
            for axis in reversed(range(len(spec.out_shape))):
                if axis != spec.axis:
                    f = _overlap_add_axis(f, axis, self.lattice[axis], spec.out_shape[axis])
            self.partial = f
        return _overlap_add_axis(self.partial, spec.axis, self.lattice[spec.axis], spec.out_shape[spec.axis], lo, hi)

    def release(self):
        self.partial = None


class _StreamDenominator(_SlabDenominator):
    """``window_lattice`` with slab axis 0: the patches arrive in the lattice's raster order and each batch goes
    through the compiled ``blend_stream_`` op, which divides each voxel once its last window is in (as in
    :class:`LatticeBlender`): the slab holds only the running output, no denominator, no zero fill."""

    divides = False

    def __init__(self, lattice: list, window_shape, out_shape):
        self.stream_coords = lattice_tables(tuple(map(tuple, lattice))).coords  # (shared, read-only)
        self.writes_before_reading = _covers([sorted(set(a)) for a in lattice], window_shape, out_shape)

    def take(self, rows, coords, first):
        expected = self.stream_coords[first:first + coords.shape[0]]
        if not torch.equal(coords, expected):
            raise ValueError("with window_lattice and axis=0, patches must arrive in the lattice's raster order: "
                             f"expected coords {expected.tolist()[:4]}..., got {coords.tolist()[:4]}...")
