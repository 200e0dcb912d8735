"""The blend in plain PyTorch: the readable specification, the test oracle and the fallback.

It follows DESIGN §2 literally, one patch at a time::

    w_i(v)  = weights[i, cell(v - s_i)] * importance[v - s_i]      cell(k) = k * g // P per axis
    num(v)  = sum_i w_i(v) * p_i[:, v - s_i]
    "count":  out = num / max(1, #patches covering v)
    "weight": out = num / sum_i w_i(v)   (0 where that sum is 0)
    "none":   out = num

All functions here take the canonical 3D form produced by :mod:`patchblend._validate`
(``patches [N, C, D, H, W]``, ``weights None | [N, Gd, Gh, Gw]``, ``coords [N, 3]``,
``importance None | [D, H, W]``). They are differentiable through autograd.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ._validate import accumulation_dtype


def cell_index(patch_size: int, grid_size: int, device=None) -> torch.Tensor:
    """Grid cell of every voxel along one axis: ``k * g // P`` for ``k = 0..P-1``. Shape ``[P]``."""
    return torch.arange(patch_size, device=device) * grid_size // patch_size


def expand_grid_weights(weights: torch.Tensor, patch_shape: Sequence[int]) -> torch.Tensor:
    """Per-cell weights ``[N, Gd, Gh, Gw]`` → per-voxel weights ``[N, D, H, W]`` (differentiable)."""
    n, gd, gh, gw = weights.shape
    d, h, w = patch_shape
    cd = cell_index(d, gd, weights.device)
    ch = cell_index(h, gh, weights.device)
    cw = cell_index(w, gw, weights.device)
    return weights[:, cd][:, :, ch][:, :, :, cw]


def voxel_weights(
    weights: Optional[torch.Tensor], importance: Optional[torch.Tensor], n: int, patch_shape, dtype, device
) -> torch.Tensor:
    """``w_i(local)`` for every patch and local voxel: ``[N, D, H, W]``."""
    w = torch.ones((n, *patch_shape), dtype=dtype, device=device)
    if weights is not None:
        w = w * expand_grid_weights(weights, patch_shape)
    if importance is not None:
        w = w * importance
    return w


def clipped_boxes(start: Sequence[int], patch_shape: Sequence[int], out_shape: Sequence[int]):
    """The slices of the output and of the patch that overlap, or ``None`` when they don't."""
    out_slices, patch_slices = [], []
    for s, p, o in zip(start, patch_shape, out_shape):
        lo, hi = max(s, 0), min(s + p, o)
        if lo >= hi:
            return None
        out_slices.append(slice(lo, hi))
        patch_slices.append(slice(lo - s, hi - s))
    return tuple(out_slices), tuple(patch_slices)


def blend_reference(
    patches: torch.Tensor,
    weights: Optional[torch.Tensor],
    coords: torch.Tensor,
    importance: Optional[torch.Tensor],
    out_shape: Tuple[int, int, int],
    normalize: str,
) -> torch.Tensor:
    """Reference blend, canonical 3D form. Returns ``[C, *out_shape]`` in ``patches.dtype``."""
    n, c = patches.shape[:2]
    patch_shape = tuple(patches.shape[2:])
    acc = accumulation_dtype(patches.dtype)
    device = patches.device
    num = torch.zeros((c, *out_shape), dtype=acc, device=device)
    den = torch.zeros(tuple(out_shape), dtype=acc, device=device)
    w = voxel_weights(weights, importance, n, patch_shape, acc, device)
    for i, start in enumerate(coords.tolist()):
        boxes = clipped_boxes(start, patch_shape, out_shape)
        if boxes is None:
            continue
        out_box, patch_box = boxes
        w_i = w[i][patch_box]
        num[(slice(None),) + out_box] += w_i * patches[i][(slice(None),) + patch_box].to(acc)
        den[out_box] += 1.0 if normalize == "count" else w_i
    if normalize == "count":
        out = num / den.clamp(min=1.0)
    elif normalize == "weight":
        covered = den > 0
        out = torch.where(covered, num / torch.where(covered, den, torch.ones_like(den)), torch.zeros_like(num))
    else:
        out = num
    return out.to(patches.dtype)


def blend_add_reference(
    total: torch.Tensor,
    den: Optional[torch.Tensor],
    patches: torch.Tensor,
    weights: Optional[torch.Tensor],
    coords: torch.Tensor,
    importance: Optional[torch.Tensor],
    normalize: str,
) -> None:
    """Accumulate mode, in place: ``total [C, *O] += num`` and ``den [*O] +=`` the denominator
    (patch count, or weight sum for ``"weight"``); both in the accumulation dtype. Canonical 3D form."""
    out_shape = tuple(total.shape[1:])
    total += blend_reference(patches.to(total.dtype), weights, coords, importance, out_shape, "none")
    if den is not None and normalize != "none":
        den += coverage_reference(weights, coords, importance, tuple(patches.shape[2:]), out_shape, normalize,
                                  den.dtype)


def coverage_reference(
    weights: Optional[torch.Tensor],
    coords: torch.Tensor,
    importance: Optional[torch.Tensor],
    patch_shape: Tuple[int, int, int],
    out_shape: Tuple[int, int, int],
    normalize: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The blend's denominator ``[*out_shape]``: patch count (``"count"``), weight sum (``"weight"``),
    or ones (``"none"``)."""
    device = coords.device
    if normalize == "none":
        return torch.ones(tuple(out_shape), dtype=dtype, device=device)
    den = torch.zeros(tuple(out_shape), dtype=dtype, device=device)
    n = coords.shape[0]
    w = voxel_weights(weights if normalize == "weight" else None,
                      importance if normalize == "weight" else None, n, patch_shape, dtype, device)
    for i, start in enumerate(coords.tolist()):
        boxes = clipped_boxes(start, patch_shape, out_shape)
        if boxes is not None:
            den[boxes[0]] += w[i][boxes[1]]
    return den


def extract_patches(volume: torch.Tensor, coords: torch.Tensor, patch_shape: Sequence[int]) -> torch.Tensor:
    """The adjoint of an unweighted overlap-add: read ``[N, C, *patch_shape]`` windows out of
    ``volume [C, D, H, W]`` at ``coords [N, 3]``; voxels outside the volume read as 0."""
    c = volume.shape[0]
    n = coords.shape[0]
    out = volume.new_zeros((n, c, *patch_shape))
    for i, start in enumerate(coords.tolist()):
        boxes = clipped_boxes(start, patch_shape, volume.shape[1:])
        if boxes is not None:
            out[(i, slice(None)) + boxes[1]] = volume[(slice(None),) + boxes[0]]
    return out


def reduce_to_cells(values: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Sum per-voxel values ``[N, D, H, W]`` over each grid cell → ``[N, Gd, Gh, Gw]``
    (the adjoint of :func:`expand_grid_weights`)."""
    d, h, w = values.shape[1:]
    one_hot = [
        (cell_index(size, g, values.device)[None, :] == torch.arange(g, device=values.device)[:, None]).to(values.dtype)
        for size, g in zip((d, h, w), grid)
    ]
    return torch.einsum("ndhw,id,jh,kw->nijk", values, *one_hot)
