"""Sliding-window inference on patchblend's blend: the driver and its public building blocks.

- :func:`sliding_window_inference`: drop-in for ``monai.inferers.sliding_window_inference`` with calibrated
  weighting (``weighting=``), nnU-Net placement (``placement=``), a bounded-memory slab mode (``slab_axis=``) and
  the blended confidence map (``confidence=True`` → :class:`PredictionWithConfidence`).
- :class:`SlidingWindowOptions`: every driver's options, one frozen object checked once;
  :func:`run_sliding_window` runs the in-memory driver on one.
- Window placement: :func:`sliding_windows`, :func:`window_starts`, :class:`WindowGrid` (``style="monai"`` or
  ``"nnunet"``).
- Importance maps: :func:`importance_map`, :func:`constant_importance`, :func:`monai_gaussian`,
  :func:`nnunet_gaussian`.
- Streaming accumulators: :class:`Blender`, :class:`LatticeBlender` (windows of a lattice in raster order,
  output only), :class:`SlabBlender`; denominators :func:`window_coverage`,
  :func:`lattice_coverage`.
"""
from .blender import Blender, LatticeBlender, SlabBlender, lattice_coverage, window_coverage
from .confidence import PredictionWithConfidence
from .importance import constant_importance, importance_map, monai_gaussian, nnunet_gaussian
from .options import SlidingWindowOptions
from .sliding_window import run_sliding_window, sliding_window_inference
from .windows import WindowGrid, sliding_windows, window_starts

__all__ = [
    "sliding_window_inference",
    "SlidingWindowOptions",
    "run_sliding_window",
    "PredictionWithConfidence",
    "Blender",
    "LatticeBlender",
    "SlabBlender",
    "window_coverage",
    "lattice_coverage",
    "sliding_windows",
    "window_starts",
    "WindowGrid",
    "importance_map",
    "constant_importance",
    "monai_gaussian",
    "nnunet_gaussian",
]
