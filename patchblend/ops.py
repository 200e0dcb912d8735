"""``calibrated_blend``: the public op, its fake (meta) kernels and its autograd formula.

The kernels behind ``torch.ops.patchblend.*`` come from :mod:`patchblend._backend` (compiled C++/CUDA,
or the pure-PyTorch reference). This module only adds what torch needs around them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _backend  # noqa: F401  (registers the ops)
from ._reference import reduce_to_cells, voxel_weights
from ._validate import accumulation_dtype, prepare_blend_args

_ops = torch.ops.patchblend


def coverage_on(weights, coords, importance, patch_shape, out_shape, normalize: str, dtype, device) -> torch.Tensor:
    """The ``coverage`` op's denominator ``[*out_shape]`` on ``device``. The op runs where its tensors are;
    ``coords`` are passed on the CPU (no device synchronisation) unless nothing else names the device."""
    if weights is None and importance is None:
        coords = coords.to(device)
    return _ops.coverage(weights, coords, importance, list(patch_shape), list(out_shape), normalize, dtype)


@torch.library.register_fake("patchblend::blend")
def _blend_fake(patches, weights, coords, importance, out_shape, normalize):
    return patches.new_empty((patches.shape[1], *out_shape))


@torch.library.register_fake("patchblend::blend_add_")
def _blend_add_fake(total, den, patches, weights, coords, importance, normalize):
    return None


@torch.library.register_fake("patchblend::blend_stream_")
def _blend_stream_fake(out, patches, weights, coords, first, importance, normalize):
    return None


@torch.library.register_fake("patchblend::coverage")
def _coverage_fake(weights, coords, importance, patch_shape, out_shape, normalize, dtype):
    # on the device of weights or importance when given (coords may be on the CPU then), else of coords
    like = next((t for t in (weights, importance) if t is not None), coords)
    return like.new_empty(tuple(out_shape), dtype=dtype)


@torch.library.register_fake("patchblend::extract")
def _extract_fake(volume, coords, patch_shape):
    return volume.new_empty((coords.shape[0], volume.shape[0], *patch_shape))


@torch.library.register_fake("patchblend::empty_large")
def _empty_large_fake(size, dtype):
    # (a factory op: the fake is a CPU tensor, where the op puts its buffers)
    return torch.empty(tuple(size), dtype=dtype, device="cpu")


@torch.library.register_fake("patchblend::release_cached_output")
def _release_cached_output_fake():
    return 0


@torch.library.register_fake("patchblend::cpu_kernel_isa")
def _cpu_kernel_isa_fake():
    # (no tensor in or out: the real answer, which no tracing changes)
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        return _ops.cpu_kernel_isa()


def _blend_setup_context(ctx, inputs, output):
    patches, weights, coords, importance, out_shape, normalize = inputs
    ctx.out_shape = tuple(out_shape)
    ctx.normalize = normalize
    ctx.has_weights = weights is not None
    ctx.has_importance = importance is not None
    # the weight-sum derivative needs the output: only when some weight (or the importance) is differentiable
    varies = weights is not None or (importance is not None and importance.requires_grad)
    saved_out = output if normalize == "weight" and varies else None
    ctx.save_for_backward(patches, weights, coords, importance, saved_out)


def _blend_backward(ctx, grad_out):
    """out = num / den with num = Σ w·imp·p: d/dp = w·imp·G, and with D = Σ_c G·(p − out·[weight mode]) per
    voxel, d/dw = Σ over each cell of D·imp and d/dimp = Σ_n D·w, where G = grad_out / den is read back at
    every patch position (patch extraction, the adjoint)."""
    patches, weights, coords, importance, out = ctx.saved_tensors
    weights = weights if ctx.has_weights else None
    importance = importance if ctx.has_importance else None
    n = patches.shape[0]
    patch_shape = list(patches.shape[2:])
    acc = accumulation_dtype(patches.dtype)
    g = grad_out.to(acc)
    if ctx.normalize != "none":
        den = coverage_on(weights, coords, importance, patch_shape, ctx.out_shape, ctx.normalize, acc, g.device)
        covered = den > 0
        g = torch.where(covered, g / torch.where(covered, den, torch.ones_like(den)), torch.zeros_like(g))
    g_at_patches = _ops.extract(g, coords, patch_shape)  # [N, C, *P]

    grad_patches = grad_weights = grad_importance = None
    if ctx.needs_input_grad[0]:
        w = voxel_weights(weights, importance, n, patch_shape, acc, patches.device)
        grad_patches = (g_at_patches * w[:, None]).to(patches.dtype)
    need_weights = weights is not None and ctx.needs_input_grad[1]
    need_importance = importance is not None and ctx.needs_input_grad[3]
    if need_weights or need_importance:
        p = patches.to(acc)
        if out is not None:
            p = p - _ops.extract(out.to(acc), coords, patch_shape)
        per_voxel = (g_at_patches * p).sum(1)  # D [N, *P]
        if need_weights:
            d = per_voxel if importance is None else per_voxel * importance
            grad_weights = reduce_to_cells(d, weights.shape[1:]).to(weights.dtype)
        if need_importance:
            d = per_voxel if weights is None else per_voxel * voxel_weights(weights, None, n, patch_shape, acc,
                                                                            patches.device)
            grad_importance = d.sum(0).to(importance.dtype)
    return grad_patches, grad_weights, None, grad_importance, None, None


torch.library.register_autograd("patchblend::blend", _blend_backward, setup_context=_blend_setup_context)


def _extract_setup_context(ctx, inputs, output):
    volume, coords, patch_shape = inputs
    ctx.volume_shape = list(volume.shape[1:])
    ctx.volume_dtype = volume.dtype
    ctx.save_for_backward(coords)


def _extract_backward(ctx, grad_windows):
    """The adjoint of extraction: the windows' gradients added back where they were cut (an unweighted blend
    with normalize="none"); parts outside the volume are dropped."""
    (coords,) = ctx.saved_tensors
    grad = _ops.blend(grad_windows.contiguous(), None, coords, None, ctx.volume_shape, "none")
    return grad.to(ctx.volume_dtype), None, None


torch.library.register_autograd("patchblend::extract", _extract_backward, setup_context=_extract_setup_context)


def calibrated_blend(
    patches: torch.Tensor,
    weights: Optional[torch.Tensor],
    coords,
    out_shape: Optional[Sequence[int]] = None,
    *,
    normalize: str = "count",
    importance: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Weighted overlap-add of patch predictions (docs/design.md#blend-semantics).

    Args:
        patches: ``[N, C, D, H, W]`` (or ``[N, C, H, W]`` for 2D), float16/bfloat16/float32/float64.
        weights: ``None`` (plain average), ``[N]`` (one weight per patch, Eq. 1) or ``[N, *G]``
            (one weight per grid cell, Eq. 2; voxel ``k`` of an axis of size ``P`` lies in cell ``k*g//P``).
            Finite and ``>= 0``; any float dtype.
        coords: ``[N, 3]`` (``[N, 2]``) integer start of each patch in the output; parts outside are clipped.
        out_shape: spatial output size; default ``max(coords + P)`` per axis.
        normalize: ``"count"`` (divide by the number of covering patches: the paper), ``"weight"``
            (divide by the weight sum: a weighted mean, 0 where it is 0) or ``"none"`` (the weighted sum).
        importance: optional ``[*P]`` per-voxel window weight (e.g. a Gaussian), multiplied into every weight.

    Returns:
        ``[C, *out_shape]`` in ``patches.dtype`` (accumulated in float32, float64 for float64 input).
        Voxels no patch covers are 0. Deterministic; differentiable in ``patches``, ``weights`` and
        ``importance``.
    """
    a = prepare_blend_args(patches, weights, coords, out_shape, normalize, importance)
    out = _ops.blend(a.patches, a.weights, a.coords, a.importance, list(a.out_shape), a.normalize)
    return out.squeeze(1) if a.spatial_dims == 2 else out


def empty_output(shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised tensor like ``torch.empty``; a large CPU one (32 MiB and more) lives in transparent
    huge pages (the compiled backend, Linux), which makes its first write several times cheaper, and the
    most recently freed such block is kept for the next one (see :func:`empty_cache`;
    csrc/cpu/large_alloc.h). For output buffers and running sums, which are written once per call."""
    device = torch.device(device)
    if device.type == "cpu":
        return _ops.empty_large([int(s) for s in shape], dtype)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def empty_cache() -> int:
    """Free the one large CPU block that patchblend keeps after a large output (32 MiB to 1 GiB) is freed,
    for reuse by the next one (a fresh block must be zeroed by the kernel on first touch, which costs about
    a third of a large blend). Returns the bytes released (0 if none). Like ``torch.cuda.empty_cache``."""
    return int(_ops.release_cached_output())


def zeros_output(shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """:func:`empty_output`, zero-filled."""
    return empty_output(shape, dtype, device).zero_()


def extract_patches(volume: torch.Tensor, coords, patch_shape: Sequence[int]) -> torch.Tensor:
    """Windows of ``volume [C, *S]`` at integer ``coords [N, nd]``: ``[N, C, *patch_shape]``, zeros outside.

    The adjoint of an unweighted :func:`calibrated_blend` with ``normalize="none"`` (and differentiable in
    ``volume``, with that blend as its backward); also what the sliding-window driver uses to cut windows out
    of the input in one call.
    """
    if not isinstance(volume, torch.Tensor) or volume.dim() not in (3, 4):
        raise ValueError("volume must be a [C, D, H, W] or [C, H, W] tensor")
    nd = volume.dim() - 1
    coords = torch.as_tensor(coords)
    if coords.dtype.is_floating_point or coords.dim() != 2 or coords.shape[1] != nd:
        raise ValueError(f"coords must be an integer tensor [N, {nd}], got {tuple(coords.shape)} {coords.dtype}")
    patch_shape = [int(s) for s in patch_shape]
    if len(patch_shape) != nd or any(s < 1 for s in patch_shape):
        raise ValueError(f"patch_shape must be {nd} positive ints, got {patch_shape}")
    # coords stay on the CPU (a CUDA kernel uploads them without synchronising) or on the volume's device
    coords = coords.to(device=coords.device if coords.device == volume.device else "cpu", dtype=torch.int64)
    if nd == 2:
        out = _ops.extract(volume.unsqueeze(1), torch.nn.functional.pad(coords, (1, 0)), [1] + patch_shape)
        return out.squeeze(2)
    return _ops.extract(volume, coords, patch_shape)
