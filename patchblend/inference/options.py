"""The sliding-window drivers' options: :class:`SlidingWindowOptions`, defined, checked and normalised in one place.

Every driver builds one: the in-memory :func:`~patchblend.sliding_window_inference`, the MONAI inferers
(:mod:`patchblend.integrations.monai`) and the Dask driver (:mod:`patchblend.distributed`, whose block tasks carry it).
Its fields are MONAI's positional parameters (``roi_size`` to ``with_coord``, in MONAI's order, without ``inputs``
and ``predictor``) and then patchblend's own, keyword-only. A driver's keyword-only parameters are the fields
themselves (:func:`split_option_keywords`, :func:`with_option_keywords`): adding an option is one field here plus
its use.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .._validate import NORMALIZE_MODES, check_threshold
from ._predictions import WEIGHTINGS
from .blender import REDUCTIONS, check_label_dtype
from .confidence import check_confidence_options
from .importance import IMPORTANCE_MODES
from .windows import WINDOW_STYLES, check_tile_step_size

__all__ = ["SlidingWindowOptions", "PAD_MODES", "DEFAULT_OVERLAP", "OPTION_FIELDS", "KEYWORD_OPTIONS",
           "check_blend_options", "split_option_keywords", "with_option_keywords", "bind_positional_options",
           "hashable_sigma_scale"]

#: ``padding_mode`` values (MONAI's, for windows larger than the image)
PAD_MODES = ("constant", "reflect", "replicate", "circular")


class _DefaultOverlap(float):
    """MONAI's default overlap (0.25), told apart from an overlap the caller gives: ``tile_step_size`` excludes
    the latter."""

    def __reduce__(self):  # unpickled as the one default, so that it is still told apart
        return (_default_overlap, ())


def _default_overlap():
    return DEFAULT_OVERLAP


DEFAULT_OVERLAP = _DefaultOverlap(0.25)


def check_blend_options(padding_mode, weighting: Optional[str], normalize: Optional[str], placement: str,
                        reduce: Optional[str], confidence: bool = False, weigh_prediction: bool = True
                        ) -> Tuple[str, str]:
    """Raise ``ValueError`` (``TypeError``) naming the first option out of range; return ``(padding_mode,
    normalize)`` resolved (an enum's value; ``normalize=None`` is ``"weight"`` when the prediction is unweighted,
    i.e. without ``weighting`` or with ``weigh_prediction=False``, and ``"count"`` when it is weighted)."""
    padding_mode = getattr(padding_mode, "value", padding_mode)
    if padding_mode not in PAD_MODES:
        raise ValueError(f"padding_mode must be one of {PAD_MODES}, got {padding_mode!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    check_confidence_options(confidence, weigh_prediction, normalize, weighting)
    if normalize is None:
        normalize = "weight" if weighting is None or not weigh_prediction else "count"
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if placement not in WINDOW_STYLES:
        raise ValueError(f"placement must be one of {WINDOW_STYLES}, got {placement!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    return padding_mode, normalize


def hashable_sigma_scale(value):
    """A sigma_scale (float, sequence, numpy array or tensor) as a float or a tuple of floats."""
    if type(value) is float:
        return value
    if hasattr(value, "tolist"):
        value = value.tolist()
    try:
        if isinstance(value, Sequence) and not isinstance(value, str):
            return tuple(float(v) for v in value)
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"sigma_scale must be a float or one float per spatial axis, got {value!r}") from None


def _as_tuple_or_scalar(value):
    """A per-axis value as given (a scalar, ``None``) or, for a sequence / array / tensor, a tuple: hashable and
    picklable; its entries are checked against the input's axes when a driver resolves them."""
    if type(value) in (int, float, tuple) or value is None:  # (the common cases, at once)
        return value
    if hasattr(value, "tolist"):  # a tensor, numpy array or numpy scalar (MONAI accepts them)
        value = value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(value)
    return value


def _check_optional_int(name: str, value, exc=TypeError):
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise exc(f"{name} must be None or an int, got {value!r}")


@dataclass(frozen=True, slots=True)
class SlidingWindowOptions:
    """One sliding-window call's options, checked once when built (a bad value raises naming the argument) and
    normalised (enums to their values, ``normalize=None`` to its default, per-axis sequences / tensors to tuples,
    ``sigma_scale`` to floats). Frozen and picklable (the Dask driver ships it with every block task); derive one
    with :func:`dataclasses.replace` (checked again). Checks that need the input's number of axes (per-axis
    lengths, ``slab_axis`` and ``buffer_dim`` ranges) run when a driver resolves the options against its input.

    Attributes:
        roi_size: window size, an int or one per spatial axis; entries ``None`` or ``<= 0`` mean the full axis
            (whole numbers: ``64.0`` is 64, ``6.5`` a ``TypeError``). A window larger than the image pads the
            image (``padding_mode``, ``cval``), as MONAI does, and the output is cropped back.
        sw_batch_size: windows per predictor call (windows of consecutive images may share a call, as in MONAI).
        overlap: fraction of a window shared with its neighbour, in ``[0, 1)``, scalar or per axis.
        mode: importance of each window voxel: ``"constant"``, ``"gaussian"`` (MONAI's, ``sigma_scale``) or
            ``"nnunet"`` (nnU-Net's Gaussian, peak 10). Not checked when ``roi_weight_map`` replaces it (MONAI).
        sigma_scale: Gaussian ``sigma = sigma_scale * roi`` (scalar or per axis).
        padding_mode: ``"constant"``, ``"reflect"``, ``"replicate"`` or ``"circular"`` (when roi > image).
        cval: fill value for constant padding.
        sw_device: where the windows and the predictor run (default: the input's device).
        device: where the output is accumulated and returned (default: the input's device). Either one ``"meta"``
            or a device this torch cannot use (``"cuda"`` on a CPU build) is a ``ValueError`` naming it.
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
            ``None`` or ``<= 0`` is off.
        with_coord: pass the windows' MONAI-style slices to the predictor: ``predictor(windows, slices, ...)``.
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
            (no second predictor run, no window read twice). On the first output's geometry (a tuple's first item,
            a dict's first key in sorted order). The result is then a :class:`~patchblend.PredictionWithConfidence`
            ``(prediction, confidence)``.
        weigh_prediction: with ``confidence=True`` only. ``False``: the scores go only into the confidence map
            and the prediction is the unweighted blend, what ``weighting=None`` gives with the same ``mode`` (and
            ``normalize``, whose default is then ``"weight"`` as for ``weighting=None``): the average prediction
            and its confidence map from one pass.
    """

    # MONAI's positional parameters, in MONAI's order (without inputs and predictor)
    roi_size: Any
    sw_batch_size: int
    overlap: Any = DEFAULT_OVERLAP
    mode: str = "constant"
    sigma_scale: Any = 0.125
    padding_mode: str = "constant"
    cval: float = 0.0
    sw_device: Any = None
    device: Any = None
    progress: bool = False
    roi_weight_map: Optional[torch.Tensor] = field(default=None, compare=False)
    process_fn: Optional[Callable] = field(default=None, compare=False)
    buffer_steps: Optional[int] = None
    buffer_dim: int = -1
    with_coord: bool = False
    # patchblend's own, keyword-only
    _: dataclasses.KW_ONLY
    weighting: Optional[str] = None
    normalize: Optional[str] = None
    placement: str = "monai"
    tile_step_size: Any = None
    slab_axis: Optional[int] = None
    reduce: Optional[str] = None
    threshold: float = 0.5
    label_dtype: torch.dtype = torch.int64
    confidence: bool = False
    weigh_prediction: bool = True

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        sw_batch_size = self.sw_batch_size
        if type(sw_batch_size) is not int:
            if isinstance(sw_batch_size, torch.Tensor) and sw_batch_size.dim() == 0:
                sw_batch_size = sw_batch_size.item()  # MONAI accepts a 0-d tensor
            if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, numbers.Integral):
                raise ValueError(f"sw_batch_size must be a positive int, got {sw_batch_size!r}")
            put("sw_batch_size", int(sw_batch_size))
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be a positive int, got {sw_batch_size!r}")
        put("roi_size", _as_tuple_or_scalar(self.roi_size))
        if not isinstance(self.overlap, _DefaultOverlap):
            put("overlap", _as_tuple_or_scalar(self.overlap))
        if type(self.mode) is not str:
            put("mode", getattr(self.mode, "value", self.mode))
        if self.roi_weight_map is None and self.mode not in IMPORTANCE_MODES:
            raise ValueError(f"mode must be one of {IMPORTANCE_MODES}, got {self.mode!r}")
        put("sigma_scale", hashable_sigma_scale(self.sigma_scale))
        padding_mode, normalize = check_blend_options(self.padding_mode, self.weighting, self.normalize,
                                                      self.placement, self.reduce, self.confidence,
                                                      self.weigh_prediction)
        put("padding_mode", padding_mode)
        put("normalize", normalize)
        if isinstance(self.roi_weight_map, torch.Tensor) and self.roi_weight_map.device.type == "meta":
            raise ValueError("roi_weight_map is a meta tensor (no data); pass a tensor with values")
        if self.process_fn is not None and not callable(self.process_fn):
            raise TypeError(f"process_fn must be callable or None, got {type(self.process_fn).__name__}")
        if self.confidence and self.process_fn is not None:
            raise ValueError("confidence=True does not take a process_fn (its weight maps replace the window weights "
                             "the confidence map blends); blend without process_fn")
        _check_optional_int("buffer_steps", self.buffer_steps)
        if self.tile_step_size is not None:
            self._check_tile_step_size()
        _check_optional_int("slab_axis", self.slab_axis, ValueError)
        if self.reduce == "argmax":
            check_label_dtype(1, self.label_dtype)  # the type now; whether it holds every class once C is known
        put("threshold", check_threshold(self.threshold))

    def _check_tile_step_size(self):
        if self.placement != "nnunet":
            raise ValueError(f"tile_step_size is nnU-Net's step and needs placement='nnunet', got {self.placement!r}")
        if not isinstance(self.overlap, _DefaultOverlap):
            raise ValueError("give overlap or tile_step_size, not both (with placement='nnunet', tile_step_size "
                             "replaces overlap; 1 - overlap equals it only up to float rounding)")
        steps = _as_tuple_or_scalar(self.tile_step_size)
        steps = tuple(map(check_tile_step_size, steps)) if isinstance(steps, tuple) else check_tile_step_size(steps)
        object.__setattr__(self, "tile_step_size", steps)

    def keywords(self) -> Dict[str, Any]:
        """The options as keyword arguments, for any driver: ``sliding_window_inference(x, predictor=f,
        **options.keywords())`` (in memory or on Dask) runs with exactly these options."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def weights_in_denominator(self) -> bool:
        """Whether per-window weights enter the denominator: ``normalize="weight"`` with the scores weighting the
        prediction, or with ``process_fn``'s weight maps (the drivers then cannot use the lattice fast path)."""
        weighted_prediction = self.weighting is not None and self.weigh_prediction
        return self.normalize == "weight" and (weighted_prediction or self.process_fn is not None)


#: the fields of :class:`SlidingWindowOptions`
OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(SlidingWindowOptions))
#: patchblend's own options: the keyword-only fields
KEYWORD_OPTIONS = tuple(f.name for f in dataclasses.fields(SlidingWindowOptions) if f.kw_only)


def split_option_keywords(kwargs: Dict[str, Any], names: Sequence[str] = OPTION_FIELDS
                          ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``kwargs`` split into ``(options, rest)``: the entries that name options (``names``, fields of
    :class:`SlidingWindowOptions`; a driver's options given by keyword) and the others (for the predictor)."""
    if not kwargs:
        return {}, kwargs
    options = {k: kwargs[k] for k in names if k in kwargs}
    rest = {k: v for k, v in kwargs.items() if k not in options}
    return options, rest


def with_option_keywords(fn=None, *, names: Sequence[str] = OPTION_FIELDS, like=None, positional: Sequence[str] = ()):
    """Decorate ``fn`` (whose ``*args`` / ``**kwargs`` take the options) with the signature it accepts, so that
    ``inspect.signature`` and ``help`` show every option: ``like``'s signature (default ``fn``'s) with ``*args``
    replaced by the fields ``positional`` (positional-or-keyword) and the fields ``names`` it does not name itself
    as keyword-only parameters, each with the field's default, before ``**kwargs``."""
    if fn is None:
        return functools.partial(with_option_keywords, names=names, like=like, positional=positional)
    sig = inspect.signature(like if like is not None else fn)
    defaults = {f.name: f.default for f in dataclasses.fields(SlidingWindowOptions)}
    params, var_kw = [], []
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL and positional:
            params += [inspect.Parameter(n, p.POSITIONAL_OR_KEYWORD, default=defaults[n]) for n in positional]
        elif p.kind == p.VAR_KEYWORD:
            var_kw.append(p)
        else:
            params.append(p)
    named = {p.name for p in params}
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=defaults[n]) for n in names
               if n not in named and defaults[n] is not dataclasses.MISSING]
    fn.__signature__ = sig.replace(parameters=params + var_kw)
    return fn


def bind_positional_options(args, given: Dict[str, Any], positional: Sequence[str]) -> Dict[str, Any]:
    """``given`` (options by keyword) with ``args``, the options ``positional`` given by position; too many, or
    one given both ways, is a ``TypeError`` naming it."""
    if len(args) > len(positional):
        raise TypeError(f"at most {len(positional)} options may be given by position ({', '.join(positional)}), "
                        f"got {len(args)}")
    by_position = dict(zip(positional, args))
    twice = sorted(by_position.keys() & given.keys())
    if twice:
        raise TypeError(f"got multiple values for argument {twice[0]!r}")
    return {**by_position, **given}
