"""One accumulator per output of the sliding-window driver, one class per way of blending.

Each output of the predictor (MONAI's tuple/list/dict outputs, each with its own channels and resolution) gets an
:class:`OutputGeometry` (its windows and its size) and one accumulator, chosen once by :func:`make_accumulator`:

- :class:`LatticeAccumulator`: the windows form a strict lattice at the image's resolution and the denominator
  does not depend on predicted weights: the compiled ``blend_stream_`` op, nothing held but the output;
- :class:`BlenderAccumulator`: anything else in 2D/3D (weights in the denominator, rescaled outputs, repeated
  starts, ``process_fn`` weight maps): a numerator and a denominator, divided at the end;
- :class:`SlabAccumulator`: slab mode (``slab_axis``, or MONAI's ``buffer_steps``): only a slab of float buffer;
- :class:`KeepAccumulator`: with autograd, every prediction kept and blended once, differentiably;
- :class:`TorchAccumulator`: 1D and 4D+ inputs, which the 2D/3D kernels do not take: plain PyTorch slice-adds;

Every accumulator takes ``add(seg [n, C, *roi], weights, segments)`` per batch (``segments`` lists
``(image, first window, end window)``) and ``finish() -> [B, C, *S]``.

The confidence map (``confidence=True``) has its own accumulators, chosen once by
:func:`make_confidence_accumulator`; each takes a batch's window weights alone, ``add_weights(weights, segments)``,
and ``finish() -> [B, 1, *S]``:

- :class:`CoverageConfidence`: in 2D/3D without slabs or autograd, only the windows' weights are kept, and the
  ``coverage`` op blends them once at the end;
- :class:`BlendedConfidence`: anything else, the weights made into the blend's input
  (:class:`~patchblend.inference.confidence.ConfidenceTerms`) and blended batch by batch by a one-channel
  accumulator of :func:`make_accumulator`.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

from .._reference import accumulate_reference
from .._validate import check_half_result, prepare_weights
from ..ops import calibrated_blend, coverage_on, empty_output, zeros_output
from .blender import Blender, LatticeBlender, SlabBlender, check_label_dtype, compact_label_dtype, safe_denominator_
from .confidence import ConfidenceTerms
from .windows import WindowGrid

__all__ = ["OutputGeometry", "output_geometry", "BlendSettings", "make_accumulator", "make_confidence_accumulator"]


class OutputGeometry(NamedTuple):
    """Where one output's windows go: its window shape ``roi``, spatial size ``out_shape``, the windows' starts
    ``coords [N, nd]`` in it (visit order; negative where the image was padded), the ``lattice`` when the output
    has the image's resolution (the fast paths' tables), and the zoom ``scale`` per axis."""

    roi: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    coords: torch.Tensor
    lattice: Optional[WindowGrid]
    scale: Tuple[float, ...]


def output_geometry(plan, roi: Tuple[int, ...], image_size: Tuple[int, ...], roi_out: Tuple[int, ...]
                    ) -> OutputGeometry:
    """The geometry of an output whose windows are ``roi_out`` for input windows ``roi``, as MONAI places it:
    zoom ``z = roi_out / roi`` per axis, a window starting at ``s`` (in the padded image) covers
    ``[int(s z), int((s + roi) z))``, the output is ``int(padded z)`` long and, when the image was padded, cropped
    to ``[round(pad z), round((pad + image) z))``."""
    nd = len(roi)
    if tuple(roi_out) == tuple(roi):
        return OutputGeometry(tuple(roi), tuple(image_size), plan.coords, plan.image_grid, (1.0,) * nd)
    scale = tuple(o / float(r) for o, r in zip(roi_out, roi))
    padded_any = any(p > s for p, s in zip(plan.padded, image_size))
    coords = plan.coords_pad.clone()
    out_shape = []
    for a, z in enumerate(scale):
        # (int((s + r) z) - int(s z) is always roi_out: r z = roi_out is an integer)
        table = {s: int(s * z) for s in set(coords[:, a].tolist())}
        full = int(plan.padded[a] * z)
        if padded_any:
            lo = int(round(plan.pad_lo[a] * z))
            hi = min(int(round((plan.pad_lo[a] + image_size[a]) * z)), full)
        else:
            lo, hi = 0, full
        coords[:, a] = torch.tensor([table[s] - lo for s in coords[:, a].tolist()], dtype=coords.dtype)
        out_shape.append(max(hi - lo, 0))
    return OutputGeometry(tuple(roi_out), tuple(out_shape), coords, None, scale)


class BlendSettings(NamedTuple):
    """What every accumulator of one call shares: the call's options (:meth:`of`) and what the driver resolved."""

    batch: int  # images
    normalize: str
    device: torch.device  # where the output is accumulated and returned
    acc: torch.dtype  # accumulation dtype
    out_dtype: Optional[torch.dtype]  # the result's dtype (None: the predictions')
    reduce: Optional[str]
    threshold: float
    label_dtype: torch.dtype
    slab_axis: Optional[int]  # slab mode along this axis, or None
    slab_device: torch.device  # where a slab accumulates (``sw_device`` with MONAI's buffering)
    num_win: int  # windows per image
    weights_in_den: bool  # per-window weights (scores, process_fn's maps) enter the denominator

    @classmethod
    def of(cls, options, **resolved) -> "BlendSettings":
        """The settings of a call with :class:`~patchblend.inference.options.SlidingWindowOptions` ``options``;
        ``resolved`` gives the rest (``batch``, ``device``, ``acc``, ``out_dtype``, ``slab_axis``, ``slab_device``,
        ``num_win``)."""
        weights_in_den = options.weights_in_denominator or options.process_fn is not None
        return cls(normalize=options.normalize, reduce=options.reduce, threshold=options.threshold,
                   label_dtype=options.label_dtype, weights_in_den=weights_in_den, **resolved)


class ImagePart(NamedTuple):
    """One image's part of a predictor batch: the ``image``, its windows ``first .. end - 1`` (visit order) and
    the batch rows that hold them, ``seg [end - first, C, *roi]`` (None when the batch has none) and ``weights``
    (None, ``[end - first]`` or ``[end - first, *G]``)."""

    image: int
    first: int
    end: int
    seg: Optional[torch.Tensor]
    weights: Optional[torch.Tensor]


def split_by_image(seg: Optional[torch.Tensor], weights: Optional[torch.Tensor], segments) -> List[ImagePart]:
    """A batch ``seg [n, ...]`` / ``weights [n, ...]`` split by image: ``segments`` lists ``(image, first window,
    end window)`` in batch order, their windows counts adding up to ``n``."""
    parts, k = [], 0
    for b, w0, w1 in segments:
        m = w1 - w0
        parts.append(ImagePart(b, w0, w1, None if seg is None else seg[k:k + m],
                               None if weights is None else weights[k:k + m]))
        k += m
    return parts


class _Accumulator:
    """The shared part: :meth:`add` splits a batch by image (:func:`split_by_image`) and hands each part to
    :meth:`_add_image`; :meth:`finish` reduces :meth:`_values`. Per-image blenders, where a subclass uses them,
    are made on first use by :meth:`_blender` from :meth:`_new_blender`. (No reference cycle: a finished
    accumulator's buffers are freed as soon as the driver drops it.)"""

    def __init__(self, geometry: OutputGeometry, channels: int, importance, settings: BlendSettings,
                 seg_dtype: torch.dtype):
        self.geometry = geometry
        self.channels = channels
        self.importance = importance
        self.settings = settings
        self.out_dtype = settings.out_dtype or seg_dtype
        self.blenders = {}

    @property
    def input_device(self) -> torch.device:
        """Where :meth:`add` wants the predictions (the slab's device for :class:`SlabAccumulator`)."""
        return self.settings.device

    def add(self, seg: Optional[torch.Tensor], weights: Optional[torch.Tensor], segments) -> None:
        """Blend one batch ``seg [n, C, *roi]`` with its ``weights`` (None, ``[n]``, ``[n, *G]`` or per-voxel
        maps) of the windows ``segments`` (``(image, first window, end window)`` each)."""
        if len(segments) == 1:  # the common case, a batch within one image: passed on as it is (no slicing)
            image, first, end = segments[0]
            self._add_image(image, first, end, seg, weights)
        else:
            for part in split_by_image(seg, weights, segments):
                self._add_image(*part)

    def _add_image(self, image: int, first: int, end: int, seg: Optional[torch.Tensor],
                   weights: Optional[torch.Tensor]) -> None:
        """Blend one image's part of a batch (the fields of an :class:`ImagePart`)."""
        raise NotImplementedError

    def _blender(self, image: int):
        """The blender of ``image``, made by :meth:`_new_blender` on first use."""
        bl = self.blenders.get(image)
        if bl is None:
            bl = self.blenders[image] = self._new_blender(image)
        return bl

    def _new_blender(self, image: int):
        """A new blender for ``image`` (subclasses that blend with one per image)."""
        raise NotImplementedError

    def finish(self) -> torch.Tensor:
        return _finish_values(self._values(), self.settings, self.out_dtype)


def _finish_values(result: torch.Tensor, s: BlendSettings, out_dtype) -> torch.Tensor:
    """The unreduced float result → labels (``argmax``), masks (``threshold``) or ``out_dtype``."""
    if s.reduce == "argmax":
        check_label_dtype(result.shape[1], s.label_dtype)
        return result.argmax(1, keepdim=True).to(s.label_dtype)
    if s.reduce == "threshold":
        return result >= s.threshold
    if out_dtype == torch.float16 and result.dtype != out_dtype:
        check_half_result(result, "inputs (float16, the output's dtype)")
    return result if result.dtype == out_dtype else result.to(out_dtype)


class LatticeAccumulator(_Accumulator):
    """Windows of a strict lattice, denominator fixed: :class:`LatticeBlender` per image (``blend_stream_``)."""

    def __init__(self, *a):
        super().__init__(*a)
        s, g = self.settings, self.geometry
        self.out = empty_output((s.batch, self.channels, *g.out_shape), s.acc, s.device)  # every voxel is written

    def _add_image(self, image, first, end, seg, weights) -> None:
        self._blender(image).add_unchecked(seg, weights)

    def _new_blender(self, image: int) -> LatticeBlender:
        s, g = self.settings, self.geometry
        return LatticeBlender(g.out_shape, self.channels, g.lattice, g.roi, normalize=s.normalize,
                              importance=self.importance, device=s.device, dtype=s.acc, out=self.out[image],
                              check_values=False)  # the driver checked the scores

    def _values(self):
        for bl in self.blenders.values():
            bl.finish()
        return self.out


class BlenderAccumulator(_Accumulator):
    """Any windows and weights in 2D/3D: :class:`Blender` per image (numerator and denominator)."""

    def __init__(self, *a):
        super().__init__(*a)
        s, g = self.settings, self.geometry
        self.out = zeros_output((s.batch, self.channels, *g.out_shape), s.acc, s.device)

    def _add_image(self, image, first, end, seg, weights) -> None:
        self._blender(image).add(seg, self.geometry.coords[first:end], weights)

    def _new_blender(self, image: int) -> Blender:
        s, g = self.settings, self.geometry
        return Blender(g.out_shape, self.channels, normalize=s.normalize, importance=self.importance,
                       window_shape=g.roi, device=s.device, dtype=s.acc, out=self.out[image], check_values=False)

    def _values(self):
        for b in range(self.settings.batch):  # an image with no window (none here) would still be divided
            bl = self.blenders.get(b)
            if bl is not None:
                bl.finish()
        return self.out


class SlabAccumulator(_Accumulator):
    """Slab mode: :class:`SlabBlender` per image, finalised (and reduced) slab by slab along the axis as the
    windows, visited in order of their start along it, move on."""

    def __init__(self, geometry, channels, importance, settings, seg_dtype, fixed_denominator: bool):
        super().__init__(geometry, channels, importance, settings, seg_dtype)
        s = settings
        if s.reduce == "argmax":
            check_label_dtype(channels, s.label_dtype)
        shape = (s.batch, 1 if s.reduce == "argmax" else channels, *geometry.out_shape)
        # argmax labels stay compact while slabs exist and are widened at the end (lower peak)
        labels = compact_label_dtype(channels, s.label_dtype)
        dt = labels if s.reduce == "argmax" else torch.bool if s.reduce == "threshold" else self.out_dtype
        self.out = empty_output(shape, dt, s.device)
        self.lattice = geometry.lattice.starts if fixed_denominator and geometry.lattice is not None else None

    @property
    def input_device(self) -> torch.device:
        return self.settings.slab_device

    def _new_blender(self, image: int) -> SlabBlender:
        s, g = self.settings, self.geometry
        return SlabBlender(g.out_shape, self.channels, axis=s.slab_axis, normalize=s.normalize,
                           importance=self.importance, window_shape=g.roi, reduce=s.reduce, threshold=s.threshold,
                           device=s.slab_device, dtype=s.acc, out_dtype=self.out_dtype, label_dtype=self.out.dtype,
                           window_lattice=self.lattice, out=self.out[image], check_values=False)

    def _add_image(self, image, first, end, seg, weights) -> None:
        s, coords = self.settings, self.geometry.coords
        axis, m = s.slab_axis, end - first
        bl = self._blender(image)
        # one add per run of equal starts along the slab axis, finalising in between, so that the slab buffer
        # stays one window deep even when a predictor batch spans two rows of windows
        axis_starts = coords[first:end, axis].tolist()
        r0 = 0
        for r in range(1, m + 1):
            if r < m and axis_starts[r] == axis_starts[r0]:
                continue
            bl.add(seg[r0:r], coords[first + r0:first + r], None if weights is None else weights[r0:r])
            if first + r < s.num_win:
                bl.finish_until(int(coords[first + r, axis]))
            r0 = r
        if end == s.num_win:
            bl.finish()
            del self.blenders[image]

    def finish(self) -> torch.Tensor:  # (reduced slab by slab already)
        if self.settings.reduce == "argmax" and self.out.dtype != self.settings.label_dtype:
            out, self.out = self.out, None
            return out.to(self.settings.label_dtype)  # every slab is freed by now
        return self.out


class KeepAccumulator(_Accumulator):
    """With autograd: every window's prediction kept, one differentiable :func:`~patchblend.calibrated_blend` per
    image at the end (the spec the streaming paths match)."""

    def __init__(self, *a):
        super().__init__(*a)
        self.kept = {}

    def _add_image(self, image, first, end, seg, weights) -> None:
        self.kept.setdefault(image, []).append((seg, weights))

    def _values(self):
        s, g = self.settings, self.geometry
        outs = []
        for b in range(s.batch):
            segs, ws = zip(*self.kept.pop(b))
            weights = None if ws[0] is None else torch.cat(ws)
            outs.append(calibrated_blend(torch.cat(segs).to(s.acc), weights, g.coords, g.out_shape,
                                         normalize=s.normalize, importance=self.importance))
        return torch.stack(outs)


class TorchAccumulator(_Accumulator):
    """1D and 4D+ inputs (the compiled kernels take 2D/3D): the blend (docs/design.md#blend-semantics) of the
    pure-PyTorch reference (:func:`patchblend._reference.accumulate_reference`, window by window slice-adds into a
    numerator and a denominator per image), divided at the end; differentiable."""

    def __init__(self, *a):
        super().__init__(*a)
        s, g = self.settings, self.geometry
        self.num = torch.zeros((s.batch, self.channels, *g.out_shape), dtype=s.acc, device=s.device)
        self.den = None if s.normalize == "none" else torch.zeros((s.batch, *g.out_shape), dtype=s.acc,
                                                                   device=s.device)

    def _add_image(self, image, first, end, seg, weights) -> None:
        s, g = self.settings, self.geometry
        if weights is not None:
            weights = weights.to(s.acc)
            if weights.dim() == 1:  # per window: one cell per axis
                weights = weights.reshape(-1, *(1,) * len(g.roi))
        accumulate_reference(self.num[image], None if self.den is None else self.den[image], seg.to(s.acc), weights,
                             g.coords[first:end], self.importance, s.normalize)

    def _values(self):
        s = self.settings
        if self.den is None:
            return self.num
        return self.num / safe_denominator_(self.den.unsqueeze(1).clone(), s.normalize)


class CoverageConfidence(_Accumulator):
    """The confidence map ``[B, 1, *S]`` (2D/3D, no slab mode, no autograd) from the windows' weights alone: each
    batch's weights ``[n]`` / ``[n, *G]`` are kept (a few numbers per window; ``add`` ignores ``seg``), and
    :meth:`finish` makes, per image, ``Σ_i w_i(x)`` with the compiled ``coverage`` op (the weight sums of the blend,
    in window order, without reading any patch) and divides by the windows' count (``"count"``) or importance sum
    (``"weight"``, the weights times the importance over the importance alone). Those are the terms, in the order,
    of the blend of the weights spread over the windows (:mod:`.confidence`): bitwise that blend, and cheaper than
    blending a channel of ones batch by batch."""

    def __init__(self, geometry: OutputGeometry, importance, settings: BlendSettings, seg_dtype):
        super().__init__(geometry, 1, importance, settings, seg_dtype)
        self.kept = {}

    def add_weights(self, weights: Optional[torch.Tensor], segments) -> None:
        """Keep one batch's window weights (None, ``[n]`` or ``[n, *G]``) of the windows ``segments``."""
        self.add(None, weights, segments)

    def _add_image(self, image, first, end, seg, weights) -> None:
        self.kept.setdefault(image, []).append(weights)

    def _values(self):
        s, g = self.settings, self.geometry
        nd = len(g.roi)
        out = empty_output((s.batch, 1, *g.out_shape), s.acc, s.device)
        coords = g.coords if nd == 3 else torch.nn.functional.pad(g.coords, (1, 0))
        roi3, out3 = (1,) * (3 - nd) + tuple(g.roi), (1,) * (3 - nd) + tuple(g.out_shape)
        imp = self.importance if self.importance is None or nd == 3 else self.importance.unsqueeze(0)
        for b in range(s.batch):
            parts = self.kept.pop(b)
            w = torch.cat(parts) if len(parts) > 1 else parts[0]
            w = prepare_weights(w.to(s.device), coords.shape[0], g.roi, s.acc, s.device, check_values=False)
            num = coverage_on(w, coords, imp, roi3, out3, "weight", s.acc, s.device)
            den = coverage_on(None, coords, imp, roi3, out3, s.normalize, s.acc, s.device)
            out[b, 0] = num.div_(safe_denominator_(den, s.normalize)).reshape(g.out_shape)
        return out


def make_accumulator(geometry: OutputGeometry, channels: int, importance, settings: BlendSettings, seg_dtype,
                     *, grad: bool, nd: int):
    """The accumulator for one output: N-D → torch; autograd → keep; slab → slab; a lattice with a fixed
    denominator → lattice; anything else → blender."""
    if nd not in (2, 3):
        return TorchAccumulator(geometry, channels, importance, settings, seg_dtype)
    if grad:
        return KeepAccumulator(geometry, channels, importance, settings, seg_dtype)
    fixed = not settings.weights_in_den and geometry.lattice is not None and geometry.lattice.is_strict
    if settings.slab_axis is not None:
        return SlabAccumulator(geometry, channels, importance, settings, seg_dtype, fixed)
    if fixed:
        return LatticeAccumulator(geometry, channels, importance, settings, seg_dtype)
    return BlenderAccumulator(geometry, channels, importance, settings, seg_dtype)


class BlendedConfidence:
    """The confidence map ``[B, 1, *S]`` blended batch by batch like a prediction (slab mode, autograd, 1D and
    4D+): each batch's window weights made into the blend's input by ``terms``
    (:class:`~patchblend.inference.confidence.ConfidenceTerms`) and added to ``accumulator``, one channel of
    :func:`make_accumulator` with ``terms``' normalisation and importance."""

    def __init__(self, terms: ConfidenceTerms, accumulator: _Accumulator):
        self.terms = terms
        self.accumulator = accumulator

    @property
    def input_device(self) -> torch.device:
        """Where :meth:`add_weights` wants the weights: the accumulator's."""
        return self.accumulator.input_device

    def add_weights(self, weights: Optional[torch.Tensor], segments) -> None:
        """Blend one batch's window weights (None, ``[n]`` or ``[n, *G]``, checked by the driver) of the windows
        ``segments``."""
        n = sum(end - first for _, first, end in segments)
        patches, weights = self.terms(weights, n, self.accumulator.geometry.roi, self.input_device,
                                      check_values=False)
        self.accumulator.add(patches, weights, segments)

    def finish(self) -> torch.Tensor:
        return self.accumulator.finish()


def make_confidence_accumulator(geometry: OutputGeometry, importance, settings: BlendSettings, seg_dtype, *,
                                grad: bool, nd: int, slab: bool):
    """The confidence map's accumulator: one float channel at ``geometry`` (the first output's), blended with the
    prediction's ``settings`` and ``importance`` (``[*roi]`` or None) as
    :class:`~patchblend.inference.confidence.ConfidenceTerms` states (its weights never in the denominator, floats
    also when the prediction is reduced). 2D/3D without autograd or slabs → :class:`CoverageConfidence`; anything
    else → :class:`BlendedConfidence`. Both take ``add_weights(weights, segments)`` and ``finish()``."""
    terms = ConfidenceTerms(settings.normalize, settings.acc, importance)
    conf_settings = settings._replace(reduce=None, normalize=terms.normalize, weights_in_den=False)
    if nd in (2, 3) and not grad and not slab:  # the weights alone, blended at the end
        return CoverageConfidence(geometry, terms.importance, conf_settings, seg_dtype)
    return BlendedConfidence(terms, make_accumulator(geometry, 1, terms.importance, conf_settings, seg_dtype,
                                                     grad=grad, nd=nd))
