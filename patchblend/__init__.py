"""patchblend: calibrated inter-patch blending for 3D sliding-window segmentation.

- :func:`calibrated_blend`: weighted overlap-add with per-patch or per-grid-cell weights (C++/CUDA kernels);
  :func:`extract_patches` (its adjoint); :func:`backend_info`; :func:`empty_cache`.
- Sliding-window inference: :func:`sliding_window_inference` (a drop-in for MONAI's, with calibrated
  weighting, a slab mode and a blended confidence map, :class:`PredictionWithConfidence`), :class:`Blender`,
  :class:`SlabBlender`; the rest in :mod:`patchblend.inference`.
- CIB heads, Dice targets and losses: :class:`PatchHead`, :class:`GridHead`, :func:`dice_targets`,
  :func:`calibration_loss`, :func:`soft_dice_loss`, :func:`tversky_loss`.
- Bolt-on wrapper for any backbone: :class:`CalibratedModel`, :func:`candidate_feature_modules`.
- Prediction-aware heads: :class:`AwarePatchHead`, :class:`AwareGridHead`, :func:`prediction_statistics`.
- Post-hoc calibration (:mod:`patchblend.calibration`): :func:`calibrate_heads`, :func:`collect_calibration_data`,
  :func:`fit_heads`, :class:`CalibrationData`.
- Lesion gating (:mod:`patchblend.lesions`, scipy imported on first use): :func:`gate_lesions`,
  :func:`choose_gate_threshold`.
- Head quality (:mod:`patchblend.head_metrics`): :func:`head_quality`, :func:`failure_auroc`,
  :func:`reliability_table`, :func:`expected_calibration_error`, :func:`plot_reliability`.
"""
from ._backend import backend_info
from .calibration import CalibrationData, calibrate_heads, collect_calibration_data, fit_heads
from .head_metrics import expected_calibration_error, failure_auroc, head_quality, plot_reliability, reliability_table
from .heads import AwareGridHead, AwarePatchHead, GridHead, PatchHead, prediction_statistics
from .lesions import GateThreshold, LesionComponent, LesionGate, choose_gate_threshold, gate_lesions
from .inference import Blender, PredictionWithConfidence, SlabBlender, sliding_window_inference
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
    "PredictionWithConfidence",
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
    "AwarePatchHead",
    "AwareGridHead",
    "prediction_statistics",
    "CalibrationData",
    "collect_calibration_data",
    "fit_heads",
    "calibrate_heads",
    "head_quality",
    "failure_auroc",
    "reliability_table",
    "expected_calibration_error",
    "plot_reliability",
    "gate_lesions",
    "LesionGate",
    "LesionComponent",
    "choose_gate_threshold",
    "GateThreshold",
    "__version__",
]
