"""patchblend: calibrated inter-patch blending for 3D sliding-window segmentation.

- :func:`calibrated_blend`: weighted overlap-add with per-patch or per-grid-cell weights (C++/CUDA kernels);
  :func:`extract_patches` (its adjoint); :func:`backend_info`; :func:`empty_cache`.
- Sliding-window inference: :func:`sliding_window_inference` (a drop-in for MONAI's, with calibrated
  weighting and a slab mode), :class:`Blender`, :class:`SlabBlender`; the rest in :mod:`patchblend.inference`.
- CIB heads, Dice targets and losses: :class:`PatchHead`, :class:`GridHead`, :func:`dice_targets`,
  :func:`calibration_loss`, :func:`soft_dice_loss`, :func:`tversky_loss`.
- Bolt-on wrapper for any backbone: :class:`CalibratedModel`, :func:`candidate_feature_modules`.
"""
from ._backend import backend_info
from .heads import GridHead, PatchHead
from .inference import Blender, SlabBlender, sliding_window_inference
from .losses import calibration_loss, soft_dice_loss, tversky_loss
from .ops import calibrated_blend, empty_cache, extract_patches
from .targets import dice_targets
from .wrapper import CalibratedModel, CalibratedOutput, candidate_feature_modules

__version__ = "0.1.0"

__all__ = [
    "calibrated_blend",
    "extract_patches",
    "backend_info",
    "empty_cache",
    "sliding_window_inference",
    "Blender",
    "SlabBlender",
    "PatchHead",
    "GridHead",
    "dice_targets",
    "calibration_loss",
    "soft_dice_loss",
    "tversky_loss",
    "CalibratedModel",
    "CalibratedOutput",
    "candidate_feature_modules",
    "__version__",
]
