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
"""
from __future__ import annotations

import inspect
import itertools
from typing import Optional, Tuple

import torch

try:
    from nnunetv2.inference import sliding_window_prediction as _nnunet_windows
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian
except ImportError as exc:  # pragma: no cover - exercised by a test that hides nnunetv2
    raise ImportError(
        "patchblend.integrations.nnunet needs nnU-Net v2 (nnunetv2): pip install 'patchblend[nnunet]', or, to keep "
        "the torch you have, the install in patchblend's README (section 'With nnU-Net')") from exc

from ..inference._predictions import parse_output
from ..inference.blender import Blender, LatticeBlender, SlabBlender, compact_label_dtype
from ..inference.options import check_blend_options
from ..inference.windows import WindowGrid
from ..ops import extract_patches
from ..wrapper import CalibratedOutput

__all__ = ["PatchblendPredictor", "check_nnunet_internals", "EXPECTED_INTERNALS"]

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
        if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be a positive int, got {sw_batch_size!r}")
        if accumulation_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulation_dtype must be torch.float32 or torch.float64, got {accumulation_dtype!r}")
        if output_dtype is not None and (not isinstance(output_dtype, torch.dtype)
                                         or not output_dtype.is_floating_point):
            raise ValueError(f"output_dtype must be a floating-point torch.dtype or None, got {output_dtype!r}")
        if reduce not in ("argmax", "threshold"):
            raise ValueError(f"reduce must be 'argmax' or 'threshold', got {reduce!r}")
        _, normalize = check_blend_options("constant", weighting, normalize, "nnunet", reduce)
        super().__init__(*args, **kwargs)
        self.sw_batch_size = sw_batch_size
        self.accumulation_dtype = accumulation_dtype
        self.output_dtype = output_dtype
        self.weighting = weighting
        self.normalize = normalize
        self.reduce = reduce
        self.threshold = float(threshold)
        self._reducing = False  # set while predict_segmentation_from_preprocessed_data runs

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
        for i in range(0, coords.shape[0], self.sw_batch_size):
            j = min(i + self.sw_batch_size, coords.shape[0])
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
        acc = self.accumulation_dtype
        weights_in_den = self.weighting is not None and self.normalize == "weight"
        axes = [sorted(set(coords[:, a].tolist())) for a in range(coords.shape[1])]
        grid = WindowGrid(shape, window, tuple(tuple(a) for a in axes))
        lattice = len(grid) == coords.shape[0] and grid.is_strict and torch.equal(grid.coords(), coords)
        slab_lattice = axes if lattice and not weights_in_den else None
        if self._reducing:
            # slabs along axis 0, the slowest of nnU-Net's slicers
            return SlabBlender(shape, channels, axis=0, normalize=self.normalize, importance=importance,
                               window_shape=window, reduce=self.reduce, threshold=self.threshold, device=device,
                               dtype=acc, label_dtype=compact_label_dtype(channels, torch.int64),
                               window_lattice=slab_lattice)
        if self.output_dtype is not None and self.output_dtype != acc:
            # logits in a narrower dtype (nnU-Net's float16): blended in float32 one slab deep and written into the
            # float16 output as each slab is final, so the float32 [C, *S] never exists (the LatticeBlender's
            # values, rounded once)
            # (the output in ordinary pages, like nnU-Net's: on the benchmark machine the first writes into
            # patchblend's huge-page output block made the accumulation ~1.6x slower)
            out = torch.empty((channels, *shape), dtype=self.output_dtype, device=device)
            return SlabBlender(shape, channels, axis=0, normalize=self.normalize, importance=importance,
                               window_shape=window, device=device, dtype=acc, out_dtype=self.output_dtype,
                               window_lattice=slab_lattice, out=out)
        if lattice and not weights_in_den:
            return LatticeBlender(shape, channels, grid, window, normalize=self.normalize, importance=importance,
                                  device=device, dtype=acc)
        return Blender(shape, channels, normalize=self.normalize, importance=importance, window_shape=window,
                       device=device, dtype=acc)

    def _predict(self, x: torch.Tensor):
        """Logits ``[n, C, *P]`` and calibrated weights (None, ``[n]`` or ``[n, *G]``) for windows ``x``."""
        if self.weighting is None:
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
                raise ValueError(f"weighting={self.weighting!r} needs the network to return "
                                 f"patchblend.CalibratedOutput(seg, patch, grid), got {type(out).__name__}")
            pred = parse_output(out, x.shape[0], nd, self.weighting)
            seg, w = pred.segs[0], pred.weights
            if axes:
                seg = torch.flip(seg, spatial)
                if w is not None and w.dim() > 1:  # grid scores [n, *G]: the grid's axes are the window's
                    w = torch.flip(w, [a + 1 for a in axes])
            seg_sum = seg.float() if seg_sum is None else seg_sum + seg.float()
            w_sum = w.float() if w_sum is None else w_sum + w.float()
        return seg_sum / len(flips), w_sum / len(flips)
