"""nnU-Net v2 integration: :class:`PatchblendPredictor`, an ``nnUNetPredictor`` whose sliding-window accumulation is
patchblend's.

Importable only where nnU-Net v2 is installed (``pip install patchblend[nnunet]``, or the torch-preserving install in
the README); ``import patchblend`` never imports nnU-Net.

What is replaced: one method, ``nnUNetPredictor._internal_predict_sliding_window_return_logits(data, slicers,
do_on_device)``, which in nnU-Net runs one window at a time and adds into float16 buffers. Here the windows are those
of nnU-Net's own slicers (its ``tile_step_size`` lattice, built by ``_internal_get_sliding_window_slicers``), weighted
by nnU-Net's own Gaussian (``compute_gaussian``: the same float16 values), cut with :func:`patchblend.extract_patches`
``sw_batch_size`` at a time, run through nnU-Net's ``_internal_maybe_mirror_and_predict`` (its mirroring TTA, on the
whole batch) and blended in float32 (:class:`~patchblend.inference.LatticeBlender`). Everything else is nnU-Net's:
preprocessing, padding to the patch size, autocast, the retry with the results on the CPU after a device error,
folds, export, ``predict_from_files``.

Bounded memory: :meth:`PatchblendPredictor.predict_segmentation_from_preprocessed_data` blends slab by slab
(:class:`~patchblend.inference.SlabBlender`) and takes the argmax (or a per-class threshold) as each slab is final,
so the full ``[C, *S]`` logits never exist.

Calibration, post hoc: :func:`calibrate_nnunet` fits prediction-aware heads (:class:`patchblend.CalibratedModel`
with ``heads="aware"``, hooked on the network's last decoder stage) on held-out preprocessed cases, the network
frozen, over nnU-Net's own windows, and installs the calibrated network in the predictor. The decision: nnU-Net
exports an argmax, which calibrated weights change only as a re-weighted vote; the lesion decision is
:meth:`PatchblendPredictor.predict_with_confidence_from_preprocessed_data` (the average's argmax and the confidence
map) followed by :func:`gate_segmentation` (:func:`patchblend.gate_lesions` per foreground class).
"""
from __future__ import annotations

import inspect
import itertools
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch

try:
    from nnunetv2.inference import sliding_window_prediction as _nnunet_windows
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
except ImportError as exc:  # pragma: no cover - exercised by a test that hides nnunetv2
    raise ImportError(
        "patchblend.integrations.nnunet needs nnU-Net v2 (nnunetv2): pip install 'patchblend[nnunet]', or, to keep "
        "the torch you have, the install in patchblend's README (section 'With nnU-Net')") from exc

from ..calibration import calibrate_heads
from ..inference._predictions import parse_output
from ..inference.confidence import PredictionWithConfidence
from ..inference.blender import Blender, LatticeBlender, SlabBlender, compact_label_dtype
from ..inference.options import SlidingWindowOptions
from ..inference.windows import WindowGrid
from ..ops import extract_patches
from ..lesions import LesionGate, gate_lesions
from ..wrapper import CalibratedModel, CalibratedOutput

__all__ = ["PatchblendPredictor", "check_nnunet_internals", "EXPECTED_INTERNALS", "calibrate_nnunet",
           "last_decoder_feature", "gate_segmentation"]

#: the nnU-Net internals this module calls or replaces, with the parameters it relies on (checked at construction)
EXPECTED_INTERNALS = {
    "nnUNetPredictor._internal_predict_sliding_window_return_logits": ("self", "data", "slicers", "do_on_device"),
    "nnUNetPredictor._internal_get_sliding_window_slicers": ("self", "image_size"),
    "nnUNetPredictor._internal_maybe_mirror_and_predict": ("self", "x"),
    "nnUNetPredictor.predict_sliding_window_return_logits": ("self", "input_image"),
    "compute_gaussian": ("tile_size", "sigma_scale", "value_scaling_factor", "dtype", "device"),
}


def _internal(name: str):
    """The nnU-Net object :data:`EXPECTED_INTERNALS` names (None when it is missing)."""
    if name.startswith("nnUNetPredictor."):
        return getattr(nnUNetPredictor, name.split(".", 1)[1], None)
    return getattr(_nnunet_windows, name, None)


def check_nnunet_internals(internals=None) -> None:
    """Raise ``RuntimeError`` naming every nnU-Net internal that is missing or whose parameters differ from
    :data:`EXPECTED_INTERNALS` (an nnU-Net version this module was not written for)."""
    problems = []
    for name, expected in (internals or EXPECTED_INTERNALS).items():
        fn = _internal(name)
        fn = getattr(fn, "__wrapped__", fn)  # compute_gaussian is lru_cached
        if fn is None or not callable(fn):
            problems.append(f"{name} is missing")
            continue
        got = tuple(inspect.signature(fn).parameters)
        if got != expected:
            problems.append(f"{name}{got} (expected parameters {expected})")
    if problems:
        try:
            from importlib.metadata import version
            where = f"nnunetv2 {version('nnunetv2')}"
        except Exception:  # pragma: no cover
            where = "this nnunetv2"
        raise RuntimeError(f"patchblend's PatchblendPredictor was written for nnunetv2 2.8.x; in {where}: "
                           + "; ".join(problems) + ". Use nnUNetPredictor, or an nnunetv2 version it supports.")


class PatchblendPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` with patchblend's sliding-window accumulation (see the module docstring).

    The positional and keyword arguments of ``nnUNetPredictor`` (``tile_step_size=0.5, use_gaussian=True,
    use_mirroring=True, perform_everything_on_device=True, device=cuda, verbose=False, ...``) pass through; the
    options below are keyword-only and fixed for the predictor's life.

    Args:
        sw_batch_size: windows per network call (nnU-Net: 1). With mirroring every flip runs on the whole batch.
        accumulation_dtype: ``torch.float32`` (default) or ``torch.float64``: the dtype windows are blended in.
        output_dtype: dtype of the returned logits; default ``torch.float16``, what nnU-Net returns (the blend is
            float32 and rounded once at the end). ``None`` keeps ``accumulation_dtype``.
        weighting: ``None`` (nnU-Net's Gaussian-weighted mean), or ``"patch"``, ``"grid"`` or ``"patch*grid"``: the
            network returns a :class:`patchblend.CalibratedOutput` ``(logits, patch [n], grid [n, *G])`` and its
            scores weight each window (times the Gaussian); with mirroring the scores of every flip are averaged,
            grid scores flipped back first.
        normalize: ``"weight"``, ``"count"`` or ``"none"`` (default as in
            :func:`patchblend.sliding_window_inference`: ``"weight"`` without ``weighting``, ``"count"`` with it).
        reduce: for :meth:`predict_segmentation_from_preprocessed_data`: ``"argmax"`` (labels) or ``"threshold"``
            (``[C, *S]`` masks, blended logit ``>= threshold``); default ``"argmax"``.
        threshold: a float (logit; 0.0 is probability 0.5 under a sigmoid) for ``reduce="threshold"``.

    Raises:
        RuntimeError: at construction, when the nnU-Net internals it relies on (:data:`EXPECTED_INTERNALS`) are
            missing or have other parameters.
    """

    def __init__(self, *args, sw_batch_size: int = 1, accumulation_dtype: torch.dtype = torch.float32,
                 output_dtype: Optional[torch.dtype] = torch.float16, weighting: Optional[str] = None,
                 normalize: Optional[str] = None, reduce: str = "argmax", threshold: float = 0.0, **kwargs):
        check_nnunet_internals()
        if accumulation_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulation_dtype must be torch.float32 or torch.float64, got {accumulation_dtype!r}")
        if output_dtype is not None and (not isinstance(output_dtype, torch.dtype)
                                         or not output_dtype.is_floating_point):
            raise ValueError(f"output_dtype must be a floating-point torch.dtype or None, got {output_dtype!r}")
        if reduce not in ("argmax", "threshold"):
            raise ValueError(f"reduce must be 'argmax' or 'threshold', got {reduce!r}")
        #: the drivers' options, checked once (the windows are nnU-Net's: its patch size and slicers, so no
        #: roi_size; its Gaussian and mirroring are nnU-Net's own settings)
        self.options = SlidingWindowOptions(None, sw_batch_size, placement="nnunet", weighting=weighting,
                                            normalize=normalize, reduce=reduce, threshold=threshold)
        super().__init__(*args, **kwargs)
        self.accumulation_dtype = accumulation_dtype
        self.output_dtype = output_dtype
        self._reducing = False  # set while predict_segmentation_from_preprocessed_data runs
        self._with_confidence = False  # set while predict_with_confidence_from_preprocessed_data runs

    # the options, read-only, under the names they were given by
    sw_batch_size = property(lambda self: self.options.sw_batch_size, doc="``options.sw_batch_size``")
    weighting = property(lambda self: self.options.weighting, doc="``options.weighting``")
    normalize = property(lambda self: self.options.normalize, doc="``options.normalize`` (resolved)")
    reduce = property(lambda self: self.options.reduce, doc="``options.reduce``")
    threshold = property(lambda self: self.options.threshold, doc="``options.threshold``")

    # ---- the one replaced method ----------------------------------------------------------------------------
    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        """nnU-Net's contract: ``data [C_in, *S]`` (padded), nnU-Net's slicers, results on ``self.device`` if
        ``do_on_device`` else the CPU; returns ``[C, *S]`` logits (labels ``[1, *S]`` / masks ``[C, *S]`` inside
        :meth:`predict_segmentation_from_preprocessed_data`)."""
        results_device = self.device if do_on_device else torch.device("cpu")
        data = data.to(results_device)
        coords, window, squeeze = self._windows_of(slicers, data.dim() - 1)
        channels = self.label_manager.num_segmentation_heads
        importance = self._importance(window, results_device)
        blender = self._blender(tuple(data.shape[1:]), channels, coords, window, importance, results_device)
        coords_on = coords.to(results_device) if results_device.type != "cpu" else coords
        for i in range(0, coords.shape[0], self.options.sw_batch_size):
            j = min(i + self.options.sw_batch_size, coords.shape[0])
            x = extract_patches(data, coords_on[i:j], window).to(self.device)
            if squeeze:  # a 2D network on a 3D image: windows [n, C, 1, P0, P1]
                x = x[:, :, 0]
            seg, weights = self._predict(x)
            if squeeze:
                seg = seg[:, :, None]
                weights = weights[:, None] if weights is not None and weights.dim() > 1 else weights
            seg = seg.to(results_device)
            weights = None if weights is None else weights.to(results_device)
            if isinstance(blender, LatticeBlender):
                blender.add(seg, weights)
            else:
                blender.add(seg, coords[i:j], weights)
            if isinstance(blender, SlabBlender) and j < coords.shape[0]:
                blender.finalize_until(int(coords[j, 0]))  # no later window reaches before the next one's start
            del x, seg, weights
        if self._with_confidence:  # labels and confidence as two float32 channels, so nnU-Net crops both alike
            labels, conf = blender.finish_with_confidence()
            return torch.cat([labels.to(conf.dtype), conf])
        if isinstance(blender, SlabBlender):
            return blender.finish()
        out = blender.finalize()
        return out if self.output_dtype is None else out.to(self.output_dtype)

    # ---- the bounded-memory path ----------------------------------------------------------------------------
    def predict_segmentation_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """Labels ``[1, *S]`` (``reduce="argmax"``, uint8 up to 256 classes, else int64) or masks ``[C, *S]`` bool
        (``"threshold"``) for preprocessed ``data [C_in, *S]``, blended slab by slab so the ``[C, *S]`` logits never
        exist (the peak is about one window deep of them, plus the labels). In preprocessed space: what
        ``predict_logits_from_preprocessed_data`` returns, reduced; nnU-Net's export (resampling, cropping back)
        needs the logits, so use that method for files and probabilities. One parameter set only (ensembling folds
        needs the logits)."""
        if self.list_of_parameters is not None and len(self.list_of_parameters) > 1:
            raise ValueError(f"predict_segmentation_from_preprocessed_data takes one parameter set (fold), got "
                             f"{len(self.list_of_parameters)}; averaging folds needs the logits "
                             "(predict_logits_from_preprocessed_data)")
        if self.list_of_parameters:  # as nnU-Net loads a fold (a torch.compile'd network: into its original module)
            getattr(self.network, "_orig_mod", self.network).load_state_dict(self.list_of_parameters[0])
        self._reducing = True
        try:
            return self.predict_sliding_window_return_logits(data)
        finally:
            self._reducing = False

    def predict_with_confidence_from_preprocessed_data(self, data: torch.Tensor) -> PredictionWithConfidence:
        """The lesion decision's inputs for preprocessed ``data [C_in, *S]``, in one bounded-memory pass:
        ``PredictionWithConfidence(labels [1, *S], confidence [1, *S])``.

        ``labels`` (int64) is the argmax of the **average** blend, nnU-Net's Gaussian-weighted mean with the
        network's scores left out (``weigh_prediction=False``): the same argmax as the uncalibrated predictor.
        ``confidence`` (float32) is the blend of the scores alone, ``C = Σ_i α_i·g_i / Σ_i g_i`` (``α_i`` the
        window's patch, grid-cell or product score by ``weighting``, ``g_i`` nnU-Net's Gaussian; the mirrored
        scores averaged). Decide per lesion with :func:`gate_segmentation`. Needs ``weighting`` (a network
        returning :class:`patchblend.CalibratedOutput`, e.g. after :func:`calibrate_nnunet`); one parameter set,
        as :meth:`predict_segmentation_from_preprocessed_data`, whose slab blending it shares (the ``[C, *S]``
        logits never exist). ``normalize`` and ``reduce`` of the predictor do not apply here."""
        if self.options.weighting is None:
            raise ValueError("predict_with_confidence_from_preprocessed_data needs weighting ('patch', 'grid' or "
                             "'patch*grid'): the confidence map is the blend of the network's scores")
        self._with_confidence = True
        try:
            out = self.predict_segmentation_from_preprocessed_data(data)
        finally:
            self._with_confidence = False
        return PredictionWithConfidence(out[:1].round().to(torch.int64), out[1:].float())

    # ---- pieces ---------------------------------------------------------------------------------------------
    def _windows_of(self, slicers, nd_data: int) -> Tuple[torch.Tensor, Tuple[int, ...], bool]:
        """nnU-Net's slicers → window starts ``[N, nd]``, the window shape, and whether a 2D network runs on a 3D
        image (slicers ``(:, d, x, y)``: windows of depth 1)."""
        patch = tuple(int(p) for p in self.configuration_manager.patch_size)
        if not slicers:
            raise ValueError("nnU-Net produced no sliding-window slicers")
        squeeze = len(patch) == nd_data - 1
        rows = []
        for sl in slicers:
            axes = sl[1:]
            if len(axes) != nd_data:
                raise ValueError(f"unexpected nnU-Net slicer {sl!r} for a {nd_data}D image")
            rows.append([a if isinstance(a, int) else a.start for a in axes])
        window = (1, *patch) if squeeze else patch
        return torch.tensor(rows, dtype=torch.int64), window, squeeze

    def _importance(self, window, device) -> Optional[torch.Tensor]:
        """nnU-Net's Gaussian (its own float16 values, as nnU-Net weights with them), in the accumulation dtype."""
        if not self.use_gaussian:
            return None
        patch = tuple(int(p) for p in self.configuration_manager.patch_size)
        g = compute_gaussian(patch, sigma_scale=1. / 8, value_scaling_factor=10, device=device)
        return g.to(self.accumulation_dtype).reshape(window)

    def _blender(self, shape, channels, coords, window, importance, device):
        acc, o = self.accumulation_dtype, self.options
        weights_in_den = o.weights_in_denominator
        axes = [sorted(set(coords[:, a].tolist())) for a in range(coords.shape[1])]
        grid = WindowGrid(shape, window, tuple(tuple(a) for a in axes))
        lattice = len(grid) == coords.shape[0] and grid.is_strict and torch.equal(grid.coords(), coords)
        slab_lattice = axes if lattice and not weights_in_den else None
        if self._with_confidence:
            # the average (nnU-Net's Gaussian mean: normalize="weight", the scores only in C) reduced to its argmax
            # slab by slab, C beside it; the scores do not enter the prediction, so the lattice's denominator holds
            return SlabBlender(shape, channels, axis=0, normalize="weight", importance=importance,
                               window_shape=window, reduce="argmax", device=device, dtype=acc,
                               label_dtype=compact_label_dtype(channels, torch.int64),
                               window_lattice=axes if lattice else None, confidence=True, weigh_prediction=False)
        if self._reducing:
            # slabs along axis 0, the slowest of nnU-Net's slicers
            return SlabBlender(shape, channels, axis=0, normalize=o.normalize, importance=importance,
                               window_shape=window, reduce=o.reduce, threshold=o.threshold, device=device,
                               dtype=acc, label_dtype=compact_label_dtype(channels, torch.int64),
                               window_lattice=slab_lattice)
        if self.output_dtype is not None and self.output_dtype != acc:
            # logits in a narrower dtype (nnU-Net's float16): blended in float32 one slab deep and written into the
            # float16 output as each slab is final, so the float32 [C, *S] never exists (the LatticeBlender's
            # values, rounded once)
            # (the output in ordinary pages, like nnU-Net's: on the benchmark machine the first writes into
            # patchblend's huge-page output block made the accumulation ~1.6x slower)
            out = torch.empty((channels, *shape), dtype=self.output_dtype, device=device)
            return SlabBlender(shape, channels, axis=0, normalize=o.normalize, importance=importance,
                               window_shape=window, device=device, dtype=acc, out_dtype=self.output_dtype,
                               window_lattice=slab_lattice, out=out)
        if lattice and not weights_in_den:
            return LatticeBlender(shape, channels, grid, window, normalize=o.normalize, importance=importance,
                                  device=device, dtype=acc)
        return Blender(shape, channels, normalize=o.normalize, importance=importance, window_shape=window,
                       device=device, dtype=acc)

    def _predict(self, x: torch.Tensor):
        """Logits ``[n, C, *P]`` and calibrated weights (None, ``[n]`` or ``[n, *G]``) for windows ``x``."""
        if self.options.weighting is None:
            return self._internal_maybe_mirror_and_predict(x), None
        return self._mirror_and_predict_calibrated(x)

    def _mirror_and_predict_calibrated(self, x: torch.Tensor):
        """nnU-Net's mirroring for a network returning :class:`~patchblend.CalibratedOutput`: logits flipped back
        and averaged as nnU-Net does, patch scores averaged, grid scores ``[n, *G]`` flipped back and averaged."""
        nd = x.dim() - 2
        mirror_axes = self.allowed_mirroring_axes if self.use_mirroring else None
        flips = [()]
        if mirror_axes is not None:
            if max(mirror_axes) > nd - 1:
                raise ValueError(f"mirror axes {mirror_axes} do not fit {nd}D windows")
            flips += [c for k in range(len(mirror_axes)) for c in itertools.combinations(mirror_axes, k + 1)]
        seg_sum = w_sum = None
        for axes in flips:
            spatial = [a + 2 for a in axes]
            out = self.network(torch.flip(x, spatial) if axes else x)
            if not isinstance(out, CalibratedOutput):
                raise ValueError(f"weighting={self.options.weighting!r} needs the network to return "
                                 f"patchblend.CalibratedOutput(seg, patch, grid), got {type(out).__name__}")
            pred = parse_output(out, x.shape[0], nd, self.options.weighting)
            seg, w = pred.segs[0], pred.weights
            if axes:
                seg = torch.flip(seg, spatial)
                if w is not None and w.dim() > 1:  # grid scores [n, *G]: the grid's axes are the window's
                    w = torch.flip(w, [a + 1 for a in axes])
            seg_sum = seg.float() if seg_sum is None else seg_sum + seg.float()
            w_sum = w.float() if w_sum is None else w_sum + w.float()
        return seg_sum / len(flips), w_sum / len(flips)


# ---- calibration, post hoc ----------------------------------------------------------------------------------

def last_decoder_feature(network: torch.nn.Module) -> str:
    """Name of the last decoder stage of a dynamic-network-architectures U-Net (``PlainConvUNet``,
    ``ResidualEncoderUNet``: ``"decoder.stages.<n-1>"``, the full-resolution feature ``[B, C, *P]`` the
    segmentation layer reads). Raises ``ValueError`` for a network without ``decoder.stages``."""
    network = getattr(network, "_orig_mod", network)
    stages = getattr(getattr(network, "decoder", None), "stages", None)
    if not isinstance(stages, torch.nn.ModuleList) or len(stages) == 0:
        raise ValueError(f"{type(network).__name__} has no decoder.stages (a dynamic-network-architectures U-Net); "
                         "pass feature='<module name>' (patchblend.candidate_feature_modules lists the modules "
                         "with 5D outputs)")
    return f"decoder.stages.{len(stages) - 1}"


def _case_tensors(index: int, case) -> Tuple[torch.Tensor, torch.Tensor]:
    """One held-out case ``(data [C_in, *S], seg [1, *S])`` as tensors, checked; negative labels (nnU-Net marks
    voxels outside the nonzero crop -1) become background."""
    if not isinstance(case, (tuple, list)) or len(case) != 2:
        raise TypeError(f"cases must yield (data [C_in, *S], seg [1, *S]) pairs; case {index} is a "
                        f"{type(case).__name__}")
    data, seg = (torch.as_tensor(v) for v in case)
    if data.dim() != 4 or not data.is_floating_point():
        raise ValueError(f"cases: data of case {index} must be a floating [C_in, D, H, W] tensor (preprocessed), "
                         f"got {data.dtype} {tuple(data.shape)}")
    if seg.dim() == 3:
        seg = seg[None]
    if seg.dim() != 4 or seg.shape[0] != 1 or seg.shape[1:] != data.shape[1:] or seg.is_floating_point() \
            and not torch.equal(seg, seg.round()):
        raise ValueError(f"cases: seg of case {index} must be an integer label map [1, *S] with data's spatial "
                         f"shape {tuple(data.shape[1:])}, got {seg.dtype} {tuple(seg.shape)}")
    return data.float(), seg.clamp_min(0).float()


def calibrate_nnunet(predictor: "PatchblendPredictor", cases: Iterable, *, feature: Optional[str] = None,
                     grid=(2, 2, 2), hidden: int = 16, threshold: float = 0.5, batch_size: Optional[int] = None,
                     progress: bool = False, **fit_options) -> Dict[str, Any]:
    """Fit prediction-aware heads for the predictor's frozen nnU-Net network on held-out cases, and install the
    calibrated network in the predictor.

    The network (its one fold's parameters loaded, as nnU-Net predicts) is wrapped in
    :class:`patchblend.CalibratedModel` ``(heads="aware")`` hooking ``feature``; the held-out cases are padded as
    nnU-Net pads (to at least the patch size) and cut into nnU-Net's own windows (its slicers, ``tile_step_size``
    lattice), and :func:`patchblend.calibrate_heads` fits the heads' learned parts to each window's and cell's true
    Dice, the network frozen (eval mode, no autograd, its parameters unchanged). The windows are not mirrored; a
    predictor with mirroring averages the scores of the flips. Then ``predictor.network`` becomes the
    :class:`~patchblend.CalibratedModel` (and the predictor's parameter set its state dict), so the predictor
    blends with the fitted scores (its logits, and the confidence map of
    :meth:`PatchblendPredictor.predict_with_confidence_from_preprocessed_data`). The predictor's ``weighting`` is
    fixed at construction: calibrate a predictor made with the ``weighting`` you will use (one with
    ``weighting=None`` is refused: nnU-Net's own prediction path cannot run a network that returns
    :class:`~patchblend.CalibratedOutput`).

    Args:
        predictor: an initialised :class:`PatchblendPredictor` (``initialize_from_trained_model_folder`` or
            ``manual_initialization``) made with ``weighting``, of a 3D configuration, one fold, not
            region-based.
        cases: held-out cases never used for training: an iterable of ``(data [C_in, D, H, W], seg [1, D, H, W])``
            in preprocessed space (e.g. nnU-Net's preprocessed validation cases of the fold: ``data`` floats,
            ``seg`` the integer label map; negative labels count as background). Tensors or numpy arrays.
        feature: the module whose output the heads read (default :func:`last_decoder_feature`).
        grid: grid cells per axis of the grid head (default ``(2, 2, 2)``; each patch size ``>=`` it).
        hidden: the heads' hidden width.
        threshold: a window's prediction is foreground where its probability ``> threshold`` (the Dice targets).
        batch_size: windows per network call (default the predictor's ``sw_batch_size``).
        progress: tqdm bars.
        fit_options: for :func:`patchblend.fit_heads` (``epochs``, ``lr``, ``weight_decay``, ...).

    Returns :func:`patchblend.calibrate_heads`'s history (``patch_mse``, ``grid_mse`` per epoch, ``windows``)
    plus ``"feature"``, the hooked module's name.
    """
    patch, batch_size = _check_calibration_arguments(predictor, batch_size)
    network = _frozen_network(predictor)
    if feature is None:
        feature = last_decoder_feature(network)
    iterator = iter(cases)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("cases is empty: calibration needs held-out cases") from None
    channels = _case_tensors(0, first)[0].shape[0]
    model = CalibratedModel(network, None, feature, heads="aware", grid=grid, hidden_channels=hidden,
                            example_input=torch.zeros((1, channels, *patch), device=predictor.device))
    before = {k: v.detach().clone() for k, v in network.state_dict().items()}
    windows = _calibration_windows(predictor, itertools.chain([first], iterator), channels, patch, batch_size)
    history = calibrate_heads(model, windows, threshold=threshold, progress=progress, **fit_options)
    for k, v in network.state_dict().items():  # frozen: a changed parameter or buffer is a bug, not a result
        if not torch.equal(v, before[k]):
            raise RuntimeError(f"calibrate_nnunet changed the network's {k!r}")
    predictor.network = model
    if predictor.list_of_parameters:
        predictor.list_of_parameters = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    return {**history, "feature": feature}


def _check_calibration_arguments(predictor, batch_size) -> Tuple[Tuple[int, int, int], int]:
    """:func:`calibrate_nnunet`'s checks of ``predictor`` (initialised, made with a ``weighting``, 3D, one fold,
    not region-based) and ``batch_size`` (None: the predictor's ``sw_batch_size``); returns ``(patch size,
    batch_size)``."""
    if not isinstance(predictor, PatchblendPredictor):
        raise TypeError(f"predictor must be a PatchblendPredictor, got {type(predictor).__name__}")
    if getattr(predictor, "network", None) is None or getattr(predictor, "configuration_manager", None) is None:
        raise ValueError("predictor is not initialised: call initialize_from_trained_model_folder or "
                         "manual_initialization first")
    patch = tuple(int(p) for p in predictor.configuration_manager.patch_size)
    if len(patch) != 3:
        raise ValueError(f"calibrate_nnunet needs a 3D configuration (CalibratedModel's heads read 5D features); "
                         f"this predictor's patch size is {patch}")
    if predictor.label_manager.has_regions:
        raise ValueError("calibrate_nnunet does not support region-based nnU-Net models (sigmoid outputs per "
                         "region): the heads score the softmax's foreground")
    folds = predictor.list_of_parameters or []
    if len(folds) > 1:
        raise ValueError(f"calibrate_nnunet takes a predictor with one parameter set (fold), got {len(folds)}: "
                         "heads read one network's features; calibrate one predictor per fold")
    if batch_size is None:
        batch_size = predictor.options.sw_batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if predictor.options.weighting is None:
        raise ValueError("calibrate_nnunet needs a predictor made with weighting ('patch', 'grid' or 'patch*grid'): "
                         "the calibrated network returns patchblend.CalibratedOutput, which only such a predictor "
                         "blends")
    return patch, batch_size


def _frozen_network(predictor) -> torch.nn.Module:
    """The predictor's network with its one fold's parameters loaded (as nnU-Net loads a fold before predicting),
    on the predictor's device; the backbone of a network calibrated before (calibrating again: fresh heads on the
    same backbone)."""
    current = getattr(predictor.network, "_orig_mod", predictor.network)
    if predictor.list_of_parameters:
        current.load_state_dict(predictor.list_of_parameters[0])
    network = current.backbone if isinstance(current, CalibratedModel) else current
    return network.to(predictor.device)


def _calibration_windows(predictor, cases: Iterable, channels: int, patch, batch_size: int):
    """Batches ``(windows [n, C_in, *P], labels [n, 1, *P] int64)`` on the predictor's device, at most
    ``batch_size`` windows each: every case padded as nnU-Net pads (to at least the patch size; labels with
    background) and cut into nnU-Net's own windows (its slicers). Each case must have ``channels`` input
    channels."""
    for index, case in enumerate(cases):
        data, seg = _case_tensors(index, case)
        if data.shape[0] != channels:
            raise ValueError(f"cases: case {index} has {data.shape[0]} input channels, case 0 has {channels}")
        data, _ = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
        seg, _ = pad_nd_image(seg, patch, "constant", {"value": 0}, True, None)
        coords, window, _ = predictor._windows_of(predictor._internal_get_sliding_window_slicers(data.shape[1:]), 3)
        for i in range(0, coords.shape[0], batch_size):
            c = coords[i:i + batch_size]
            yield (extract_patches(data, c, window).to(predictor.device),
                   extract_patches(seg, c, window).round().long().to(predictor.device))


def gate_segmentation(labels: torch.Tensor, confidence: torch.Tensor, tau: Union[float, Mapping[int, float]], *,
                      statistic: str = "mean", connectivity: Optional[int] = None, min_size: int = 1) -> LesionGate:
    """Keep or drop each connected component of each foreground class of ``labels`` by the confidence over it:
    :func:`patchblend.gate_lesions` per class, with one ``tau`` for every class or one per class.

    Args:
        labels: ``[1, D, H, W]`` or ``[D, H, W]`` integer labels (0 background), e.g. from
            :meth:`PatchblendPredictor.predict_with_confidence_from_preprocessed_data`.
        confidence: the confidence map, ``labels``' shape (or broadcastable to it).
        tau: a float for every class, or ``{class: tau}``; every foreground class present in ``labels`` needs
            an entry (``-math.inf`` keeps a class ungated). Choose it on calibration cases, e.g. with
            :func:`patchblend.choose_gate_threshold`.
        statistic, connectivity, min_size: as for :func:`patchblend.gate_lesions`.

    Returns :class:`patchblend.LesionGate`: ``mask`` the gated labels (``labels``' dtype, dropped components set
    to 0), ``components`` one row per component (``label`` its class), ``components_map`` ids unique over classes.
    """
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool or labels.dim() not in (3, 4) or labels.dim() == 4 and labels.shape[0] != 1:
        raise ValueError("labels must be an integer label map [1, D, H, W] or [D, H, W], got "
                         + (f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
                            else type(labels).__name__))
    present = [int(c) for c in torch.unique(labels).tolist() if c != 0]
    if isinstance(tau, Mapping):
        missing = [c for c in present if c not in tau]
        if missing:
            raise ValueError(f"tau has no threshold for the classes {missing} present in labels; give one per "
                             f"class (-math.inf keeps a class ungated), got classes {sorted(tau)}")
        taus = {c: tau[c] for c in present}
    else:
        taus = {c: tau for c in present}
        if not present:  # still check tau and confidence
            return gate_lesions(labels, confidence, tau, statistic=statistic, connectivity=connectivity,
                                min_size=min_size)
    gated = torch.zeros_like(labels)
    ids = torch.zeros(labels.shape, dtype=torch.int64, device=labels.device)
    rows = []
    for c, t in taus.items():
        mask = labels == c
        gate = gate_lesions(mask, confidence, t, statistic=statistic, connectivity=connectivity,
                            min_size=min_size)
        gated[gate.mask] = c
        offset = len(rows)
        ids = torch.where(mask, gate.components_map + offset, ids)
        rows += [r._replace(label=c, id=r.id + offset) for r in gate.components]
    return LesionGate(gated, rows, ids)
