"""Per-voxel window importance maps (the ``importance`` argument of the blend).

- :func:`constant_importance`: all ones (plain averaging).
- :func:`monai_gaussian`: MONAI's ``compute_importance_map(mode="gaussian")``: separable
  ``exp(-x^2 / (2 sigma^2))`` with ``sigma = sigma_scale * size`` and ``x`` measured from the window
  centre ``(size - 1) / 2``, evaluated in float32, then clamped below at ``max(min, 1e-3)``.
- :func:`nnunet_gaussian`: nnU-Net v2's ``compute_gaussian``: a unit impulse at ``size // 2`` filtered
  with a normalised, truncated (radius ``int(4 sigma + 0.5)``) Gaussian kernel, ``sigma = sigma_scale * size``,
  in float64, scaled to peak ``value_scaling_factor`` (nnU-Net's predictor uses 10), cast to ``dtype``,
  zeros replaced by the smallest non-zero value.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from .._validate import as_sizes

__all__ = ["constant_importance", "monai_gaussian", "nnunet_gaussian", "importance_map", "IMPORTANCE_MODES"]

IMPORTANCE_MODES = ("constant", "gaussian", "nnunet")


def _shape(shape: Union[Sequence[int], int], name: str = "shape") -> tuple:
    if isinstance(shape, int):
        shape = (shape,)
    shape = as_sizes(name, shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"{name} must be one or more positive ints, got {shape}")
    return shape


def _scales(sigma_scale, nd: int) -> tuple:
    if isinstance(sigma_scale, (int, float)):
        sigma_scale = (sigma_scale,) * nd
    sigma_scale = tuple(float(s) for s in sigma_scale)
    if len(sigma_scale) != nd:
        raise ValueError(f"sigma_scale must be a float or {nd} floats, got {sigma_scale}")
    if any(not (s > 0) or math.isinf(s) for s in sigma_scale):
        raise ValueError(f"sigma_scale must be positive and finite, got {sigma_scale}")
    return sigma_scale


def constant_importance(shape: Union[Sequence[int], int], *, dtype=torch.float32, device=None) -> torch.Tensor:
    """All-ones importance ``[*shape]``."""
    return torch.ones(_shape(shape), dtype=dtype, device=device)


def monai_gaussian(
    shape: Union[Sequence[int], int], sigma_scale: Union[Sequence[float], float] = 0.125, *, dtype=torch.float32,
    device=None,
) -> torch.Tensor:
    """MONAI's Gaussian importance map ``[*shape]`` (same values as ``monai.data.utils.compute_importance_map``).

    Args:
        shape: window size per axis.
        sigma_scale: ``sigma = sigma_scale * size`` per axis (scalar or per axis), > 0.
        dtype, device: of the result (computed in float32 as MONAI does, then cast).
    """
    shape = _shape(shape)
    scales = _scales(sigma_scale, len(shape))
    out = None
    for size, s in zip(shape, scales):
        sigma = size * s
        half = (size - 1) / 2.0
        x = torch.arange(-half, half + 1, dtype=torch.float32, device=device)
        g = torch.exp(x ** 2 / (-2 * sigma ** 2))
        out = g if out is None else out.unsqueeze(-1) * g  # ((g0 ⊗ g1) ⊗ g2), float32
    floor = max(float(out.min()), 1e-3)
    return out.clamp_(min=floor).to(dtype)


def _scipy_gaussian_kernel(sigma: float) -> list:
    """The normalised 1D kernel ``scipy.ndimage.gaussian_filter`` applies (truncate=4), as float64 values."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    phi = torch.exp(-0.5 / (sigma * sigma) * x ** 2)
    return phi / phi.sum(), radius


def nnunet_gaussian(
    shape: Union[Sequence[int], int],
    sigma_scale: Union[Sequence[float], float] = 1.0 / 8,
    value_scaling_factor: float = 10.0,
    *,
    dtype=torch.float32,
    device=None,
) -> torch.Tensor:
    """nnU-Net v2's Gaussian importance map ``[*shape]`` (peak ``value_scaling_factor``, default 10 as in its
    predictor). Computed in float64 without scipy; nnU-Net itself uses ``dtype=torch.float16`` and accumulates
    in half precision, patchblend accumulates in float32 so float32 is the default here.
    """
    shape = _shape(shape)
    scales = _scales(sigma_scale, len(shape))
    if not (value_scaling_factor > 0) or math.isinf(value_scaling_factor):
        raise ValueError(f"value_scaling_factor must be positive and finite, got {value_scaling_factor}")
    out = None
    for size, s in zip(shape, scales):
        kernel, radius = _scipy_gaussian_kernel(size * s)
        centre = size // 2
        k = torch.arange(size) - centre  # offset of each voxel from the impulse
        inside = k.abs() <= radius
        g = torch.zeros(size, dtype=torch.float64)
        g[inside] = kernel[(k[inside] + radius)]
        # scipy filters axis by axis, so voxel value = g_last * (... * (g1 * g0)).
        out = g if out is None else out.unsqueeze(-1) * g
    out = (out / out.max() * value_scaling_factor).to(dtype)
    zero = out == 0
    if bool(zero.any()):
        out[zero] = out[~zero].min()
    return out.to(device)


def importance_map(
    window_shape: Union[Sequence[int], int],
    mode: str = "constant",
    sigma_scale: Union[Sequence[float], float] = 0.125,
    *,
    dtype=torch.float32,
    device=None,
) -> Optional[torch.Tensor]:
    """The importance map for ``mode``: ``"constant"`` (ones), ``"gaussian"`` (:func:`monai_gaussian`)
    or ``"nnunet"`` (:func:`nnunet_gaussian`, peak 10). Returns ``[*window_shape]``."""
    mode = getattr(mode, "value", mode)  # accept MONAI's BlendMode enum
    if mode == "constant":
        return constant_importance(window_shape, dtype=dtype, device=device)
    if mode == "gaussian":
        return monai_gaussian(window_shape, sigma_scale, dtype=dtype, device=device)
    if mode == "nnunet":
        return nnunet_gaussian(window_shape, sigma_scale, dtype=dtype, device=device)
    raise ValueError(f"mode must be one of {IMPORTANCE_MODES}, got {mode!r}")
