"""patchblend: calibrated inter-patch blending for 3D sliding-window segmentation.

Core API: :func:`calibrated_blend` (weighted overlap-add with per-patch or per-grid-cell weights,
C++/CUDA kernels), :func:`extract_patches` (its adjoint) and :func:`backend_info`.
"""
from ._backend import backend_info
from .ops import calibrated_blend, extract_patches

__version__ = "0.1.0"

__all__ = ["calibrated_blend", "extract_patches", "backend_info", "__version__"]
