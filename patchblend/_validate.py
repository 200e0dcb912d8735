"""Argument checking and normalisation for :func:`patchblend.calibrated_blend`.

Every public entry point funnels its arguments through :func:`prepare_blend_args`, so the compiled
kernels, the reference and the sliding-window driver all see the same canonical form:

- ``patches``: ``[N, C, D, H, W]`` (2D input ``[N, C, H, W]`` becomes depth 1);
- ``weights``: ``None`` or a float tensor ``[N, Gd, Gh, Gw]`` (a per-patch weight is the grid ``1×1×1``),
  in the accumulation dtype;
- ``coords``: ``[N, 3]`` int64 on the CPU (the kernels build their index on the host; CUDA kernels take CPU
  coords without a device synchronisation);
- ``importance``: ``None`` or ``[D, H, W]`` in the accumulation dtype;
- ``out_shape``: a tuple of 3 ints.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import _op_schemas

#: the blend's ``normalize`` modes, from their one source (``csrc/op_schemas.h``'s ``kNormalizeModes``, which the
#: compiled ops parse the argument with): ``("count", "weight", "none")``
NORMALIZE_MODES = _op_schemas.normalize_modes()
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT64_MAX = 2 ** 63 - 1
#: the smallest magnitude float16 rounds to inf (its largest finite value is 65504)
HALF_OVERFLOW = 65520.0


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for everything else (half inputs are accumulated in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class BlendArgs:
    patches: torch.Tensor  # [N, C, D, H, W]
    weights: Optional[torch.Tensor]  # [N, Gd, Gh, Gw] in acc dtype, or None
    coords: torch.Tensor  # [N, 3] int64
    importance: Optional[torch.Tensor]  # [D, H, W] in acc dtype, or None
    out_shape: Tuple[int, int, int]
    normalize: str
    spatial_dims: int  # 2 or 3: the caller's dimensionality, to shape the output back


def as_size(name: str, value) -> int:
    """One size (or index) as an int: ints, numpy and 0-d torch integers, and integral floats (``64.0``) are taken;
    bools, strings, non-integral numbers (``6.5``, NaN, inf) raise a ``TypeError`` naming ``name`` (never
    truncated)."""
    if hasattr(value, "item") and getattr(value, "ndim", getattr(value, "dim", lambda: 1)()) == 0:
        value = value.item()  # a numpy or 0-d torch scalar
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must hold ints, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if not (math.isfinite(value) and float(value).is_integer()):
        raise TypeError(f"{name} must hold ints, got {value!r} (not a whole number)")
    return int(value)


def as_sizes(name: str, value) -> Tuple[int, ...]:
    """A sequence of sizes (tuple, list, ``torch.Size``, 1-d tensor or array) as a tuple of ints, each through
    :func:`as_size`; a string (``"666"``) or a single number is not a sequence of sizes."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {value!r}")
    return tuple(as_size(name, v) for v in value)


def check_threshold(value) -> float:
    """``reduce="threshold"``'s threshold as a float: a real number, not NaN (``value >= nan`` is False
    everywhere, an all-False mask)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"threshold must be a real number (not NaN), got {value!r}")
    return float(value)


def resolve_device(device, default="cpu") -> torch.device:
    """``device`` (default ``default``) as a ``torch.device`` with its index, as tensors report theirs
    (``"cuda"`` → ``cuda:<current>``), so that comparing it with a tensor's device holds."""
    d = torch.device(device if device is not None else default)
    if d.type == "cpu" and d.index is None:
        return d
    return torch.empty(0, device=d).device  # ("cpu:0" is "cpu", "cuda" the current device)


def resolve_data_device(name: str, device, default) -> torch.device:
    """:func:`resolve_device` for an argument ``name`` where data must live: a device this torch cannot use
    (``"cuda"`` on a CPU build) or ``"meta"`` (shapes only) raises a ``ValueError`` naming ``name``."""
    try:
        d = resolve_device(device, default)
    except (AssertionError, RuntimeError) as exc:  # torch: "Torch not compiled with CUDA enabled", no device, ...
        raise ValueError(f"{name}={device!r} is not available here: {exc}") from None
    if d.type == "meta":
        raise ValueError(f"{name}={device!r}: a meta device holds shapes without data; sliding-window inference "
                         "needs a device with data (cpu, cuda)")
    return d


def check_float_tensor(name: str, t: torch.Tensor) -> None:
    """Raise a ``TypeError`` naming ``name`` unless ``t`` is a tensor of a floating dtype patchblend blends
    (float16, bfloat16, float32, float64)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def as_coords(coords, nd: int, n: Optional[int] = None) -> torch.Tensor:
    """Patch starts ``coords`` (a tensor, an array or nested sequences of ints) as ``[N, nd]`` int64 on the CPU
    (the kernels build their index on the host); ``n``: the number of patches they must match (None: any). An
    empty ``coords`` (``[]``) is ``[0, nd]`` where ``n`` is None or 0. Raises a ``TypeError`` (not integers) or
    ``ValueError`` (a meta tensor, the shape) naming ``coords``."""
    if not isinstance(coords, torch.Tensor):
        try:
            coords = torch.as_tensor(coords)
        except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
            raise TypeError(f"coords must be an integer tensor [N, {nd}]: {exc}") from exc
    check_not_meta("coords", coords)
    if coords.numel() == 0:
        coords = coords.to(torch.int64)  # an empty list has no integer dtype of its own
    if coords.dtype.is_floating_point or coords.dtype.is_complex or coords.dtype == torch.bool:
        raise TypeError(f"coords must hold integers, got dtype {coords.dtype}")
    if not n and coords.numel() == 0:
        coords = coords.reshape(0, nd)
    if coords.dim() != 2 or coords.shape[1] != nd or (n is not None and coords.shape[0] != n):
        expected = f"[N, {nd}]" if n is None else f"[N, {nd}] = [{n}, {nd}] to match patches"
        raise ValueError(f"coords must have shape {expected}, got {tuple(coords.shape)}")
    return coords.to(device="cpu", dtype=torch.int64)


def check_not_meta(name: str, t) -> None:
    """A meta tensor has shapes but no values, and the checks and the index need values: refuse it by name."""
    if isinstance(t, torch.Tensor) and t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (shape only, no data); patchblend needs real tensors here "
                         "(under torch.compile the ops' fake kernels handle shapes)")


def check_finite_nonnegative(name: str, t: torch.Tensor) -> float:
    """Raise a ValueError naming ``name`` unless every value of ``t`` is finite and >= 0 (one pass); return the
    largest value (0.0 when empty).

    Under torch.compile (tracing) the values are unknown: on the CPU the check is compiled into the graph
    (``torch._assert_async``: a RuntimeError when the compiled code runs); on a GPU it is skipped (a device-side
    assert would poison the CUDA context), and 0.0 is returned."""
    if torch.compiler.is_compiling():
        if t.device.type == "cpu" and t.numel():
            torch._assert_async(finite_nonnegative(t), f"{name} must be finite and >= 0")
        return 0.0
    check_not_meta(name, t)
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.stack(torch.aminmax(t.detach())).tolist()  # one read (one synchronisation on a GPU)
    if not (hi < float("inf") and lo > float("-inf")) or lo != lo or hi != hi:
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    if not lo >= 0:
        raise ValueError(f"{name} must be >= 0 (found a negative value, {lo:g})")
    return hi


def check_sum_fits(name: str, largest_sum: float, acc: torch.dtype) -> None:
    """Raise unless sums of weights bounded by ``largest_sum`` (terms x largest weight x largest importance) stay
    finite in the accumulation dtype ``acc``: an overflowing weight sum would give inf or NaN (inf / inf)."""
    if largest_sum > torch.finfo(acc).max:
        raise ValueError(f"{name} are too large for {acc} accumulation: a voxel's weight sum can reach "
                         f"{largest_sum:.3g} (terms x largest weight x largest importance), beyond "
                         f"{torch.finfo(acc).max:.3g}; scale the weights down")


def max_coverage_bound(coords: torch.Tensor, patch_shape: Sequence[int]) -> int:
    """An upper bound on the number of patches (starts ``coords [N, nd]``, size ``patch_shape``) covering any one
    voxel, without a volume: the smallest, over the axes, of the most patch intervals holding one point of that
    axis (every patch covering a voxel covers its coordinate on each axis). O(N log N)."""
    if coords.shape[0] == 0:
        return 0
    bound = coords.shape[0]
    for axis, p in enumerate(patch_shape):
        s = torch.sort(coords[:, axis]).values  # the most starts within p consecutive values
        bound = min(bound, int((torch.arange(len(s)) - torch.searchsorted(s, s - p + 1) + 1).max()))
    return bound


def check_half_output_fits(a: BlendArgs, largest_weight: float, largest_importance: float) -> None:
    """float16 results hold at most 65504: raise a ``ValueError`` naming ``patches`` when the blend of finite
    float16 patches would exceed that bound (``"none"``: most covering patches x largest |patch| x largest weight
    x largest importance; ``"count"``, a mean: largest |patch| x largest weight x largest importance) instead of
    returning inf. Reads the patches only when that factor exceeds 1 (otherwise every result lies within the
    patches' own range), and counts the covering patches exactly (the ``coverage`` op) only when a cheap bound
    on them is not enough."""
    factor = largest_weight * largest_importance
    if factor * (max_coverage_bound(a.coords, a.patches.shape[2:]) if a.normalize == "none" else 1) <= 1.0:
        return
    if a.patches.numel() == 0 or torch.compiler.is_compiling():
        return
    limit = HALF_OVERFLOW
    peak = float(a.patches.detach().abs().amax())
    if not peak < float("inf"):
        return  # inf patches give inf results: their own
    if a.normalize == "none":
        covering = max_coverage_bound(a.coords, a.patches.shape[2:])
        if peak * factor * covering > limit:  # the cheap bound is not enough: count exactly
            from .ops import coverage_on  # (ops imports this module)
            covering = int(coverage_on(None, a.coords, None, tuple(a.patches.shape[2:]), a.out_shape, "count",
                                       torch.float32, a.patches.device).amax()) if math.prod(a.out_shape) else 0
        factor *= covering
    if peak * factor >= limit:
        raise ValueError(
            f"patches: the float16 result would overflow (normalize={a.normalize!r}: up to {peak * factor:.4g} = "
            f"largest |patch| {peak:.4g} x {factor:.4g} ({'covering patches x ' if a.normalize == 'none' else ''}"
            f"largest weight x largest importance); float16 rounds {limit:.0f} and beyond to inf); pass float32 "
            "patches or scale them down")


def check_half_result(values: torch.Tensor, name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` when a finite value of ``values`` (a float32/float64 result about to
    be converted to float16) would become inf in float16 (``|v| >= 65520``): nothing inf comes out that the inputs
    did not contain. One read of ``values``."""
    if values.numel() == 0 or torch.compiler.is_compiling():
        return
    v = values.detach()
    peak = float(v.abs().amax())
    if peak == float("inf"):  # an inf of the inputs' own: look at the finite values only
        peak = float(torch.where(v.isfinite(), v.abs(), 0).amax())
    if HALF_OVERFLOW <= peak < float("inf"):
        raise ValueError(f"{name}: the float16 output would overflow: a blended value reaches {peak:.4g}, and "
                         f"float16 rounds {HALF_OVERFLOW:.0f} and beyond to inf; use float32 (inputs, out_dtype) "
                         "or scale the predictions down")


def finite_nonnegative(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on ``t``'s device: every value finite and ``>= 0`` (NaN fails). Unlike
    :func:`check_finite_nonnegative` it does not synchronise with a GPU; check it later, once."""
    return torch.all((t >= 0) & (t < float("inf")))


def prepare_weights(
    weights: Optional[torch.Tensor],
    n: int,
    patch_shape: Sequence[int],
    acc: torch.dtype,
    device: torch.device,
    check_values: bool = True,
) -> Optional[torch.Tensor]:
    """Check ``weights`` (None, ``[N]`` or ``[N, *G]`` with ``1 <= G <= P``) for ``n`` patches of spatial shape
    ``patch_shape`` and return them as ``[N, Gd, Gh, Gw]`` in ``acc``. ``check_values=False`` skips the finite and
    non-negative check (one device synchronisation each) when the caller has done it."""
    return prepare_weights_and_max(weights, n, patch_shape, acc, device, check_values)[0]


def prepare_weights_and_max(weights, n: int, patch_shape, acc, device, check_values: bool = True):
    """:func:`prepare_weights` and the largest weight (after the conversion to ``acc``; 0.0 when not checked)."""
    if weights is None:
        return None, 0.0
    spatial_dims = len(patch_shape)
    check_float_tensor("weights", weights)
    check_not_meta("weights", weights)
    if weights.device != device:
        raise ValueError(f"weights is on {weights.device} but patches is on {device}")
    if weights.dim() == 1:
        if weights.shape[0] != n:
            raise ValueError(f"weights [N] must have N = {n} entries, got {tuple(weights.shape)}")
    elif weights.dim() == 1 + spatial_dims:
        if weights.shape[0] != n:
            raise ValueError(f"weights [N, *G] must have N = {n}, got {tuple(weights.shape)}")
        for axis, (g, p) in enumerate(zip(weights.shape[1:], patch_shape)):
            if g < 1 or g > p:
                raise ValueError(
                    f"weights grid size {tuple(weights.shape[1:])} must satisfy 1 <= g <= patch size "
                    f"{tuple(patch_shape)} on every axis (axis {axis}: g={g}, P={p})"
                )
    else:
        raise ValueError(
            f"weights must be [N] (one per patch) or [N, *G] with {spatial_dims} grid dims, "
            f"got shape {tuple(weights.shape)}"
        )
    weights = weights.to(acc)
    # checked after the conversion: float64 weights beyond the float32 range become inf in it
    largest = check_finite_nonnegative("weights", weights) if check_values else 0.0
    if weights.dim() == 1:
        return weights.reshape(n, 1, 1, 1), largest
    return (weights.unsqueeze(1) if spatial_dims == 2 else weights), largest


def prepare_blend_args(
    patches: torch.Tensor,
    weights: Optional[torch.Tensor],
    coords,
    out_shape: Optional[Sequence[int]],
    normalize: str,
    importance: Optional[torch.Tensor],
    check_values: bool = True,
) -> BlendArgs:
    """Check every argument of ``calibrated_blend`` and return them in canonical 3D form (``check_values``:
    see :func:`prepare_weights`)."""
    check_float_tensor("patches", patches)
    check_not_meta("patches", patches)
    if patches.dim() not in (4, 5):
        raise ValueError(
            f"patches must be [N, C, D, H, W] (3D) or [N, C, H, W] (2D), got shape {tuple(patches.shape)}"
        )
    spatial_dims = patches.dim() - 2
    n = patches.shape[0]
    patch_shape = tuple(patches.shape[2:])
    if any(s == 0 for s in patch_shape) or patches.shape[1] == 0:
        raise ValueError(f"patches must have at least one channel and non-empty spatial size, got {tuple(patches.shape)}")

    if not isinstance(normalize, str) or normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")

    coords = as_coords(coords, spatial_dims, n)

    acc = accumulation_dtype(patches.dtype)

    weights, largest_weight = prepare_weights_and_max(weights, n, patch_shape, acc, patches.device, check_values)

    if importance is not None:
        check_float_tensor("importance", importance)
        check_not_meta("importance", importance)
        if importance.device != patches.device:
            raise ValueError(f"importance is on {importance.device} but patches is on {patches.device}")
        if tuple(importance.shape) != patch_shape:
            raise ValueError(
                f"importance must have the patch's spatial shape {patch_shape}, got {tuple(importance.shape)}"
            )
        importance = importance.to(acc)
        largest_importance = check_finite_nonnegative("importance", importance)
        if check_values:
            check_sum_fits("weights" if weights is not None else "importance values",
                           n * (largest_weight if weights is not None else 1.0) * largest_importance, acc)
        if spatial_dims == 2:
            importance = importance.unsqueeze(0)
    elif weights is not None and check_values:
        check_sum_fits("weights", n * largest_weight, acc)

    if out_shape is None:
        if n == 0:
            raise ValueError("out_shape is required when there are no patches (N = 0)")
        if torch.compiler.is_compiling():
            raise ValueError("out_shape must be given explicitly under torch.compile")
        # in Python ints: coords + P in int64 wraps past 2**63 - 1 and would drop the far patches silently
        ends = [c + p for c, p in zip(coords.amax(0).tolist(), patch_shape)]
        if max(ends) > _INT64_MAX:
            raise ValueError(f"coords: a patch ends at {max(ends)} on some axis, past the largest int64 size "
                             f"({_INT64_MAX}); the default out_shape (max(coords + P) per axis) cannot hold it")
        out_shape = tuple(max(e, 0) for e in ends)
    else:
        out_shape = as_sizes("out_shape", out_shape)
        if len(out_shape) != spatial_dims or any(s < 0 for s in out_shape):
            raise ValueError(f"out_shape must be {spatial_dims} non-negative ints, got {out_shape}")

    if spatial_dims == 2:
        patches = patches.unsqueeze(2)
        coords = torch.cat([torch.zeros_like(coords[:, :1]), coords], dim=1)
        out_shape = (1,) + tuple(out_shape)

    args = BlendArgs(patches, weights, coords, importance, tuple(out_shape), normalize, spatial_dims)
    if patches.dtype == torch.float16 and normalize != "weight" and check_values:
        check_half_output_fits(args, largest_weight if weights is not None else 1.0,
                               largest_importance if importance is not None else 1.0)
    return args
