"""The blend in plain PyTorch: the readable specification, the test oracle and the fallback.

It follows docs/design.md#blend-semantics literally, one patch at a time::

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

import itertools
import math
from typing import Optional, Sequence, Tuple

import torch

from ._validate import accumulation_dtype


def cell_index(patch_size: int, grid_size: int, device=None) -> torch.Tensor:
    """Grid cell of every voxel along one axis: ``k * g // P`` for ``k = 0..P-1``. Shape ``[P]``."""
    return torch.arange(patch_size, device=device) * grid_size // patch_size


def expand_grid_weights(weights: torch.Tensor, patch_shape: Sequence[int]) -> torch.Tensor:
    """Per-cell weights ``[N, *G]`` → per-voxel weights ``[N, *P]`` (any number of spatial axes; differentiable)."""
    for axis, p in enumerate(patch_shape):
        weights = weights.index_select(axis + 1, cell_index(p, weights.shape[axis + 1], weights.device))
    return weights


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


def accumulate_reference(
    num: torch.Tensor,
    den: Optional[torch.Tensor],
    patches: torch.Tensor,
    weights: Optional[torch.Tensor],
    coords: torch.Tensor,
    importance: Optional[torch.Tensor],
    normalize: str,
) -> None:
    """The blend's sums, in place, patch after patch: ``num [C, *O] += w_i * p_i`` and ``den [*O] +=`` 1
    (``"count"``) or ``w_i`` (else) on the part of each patch inside the output; ``den`` may be None. Any number of
    spatial axes: ``patches [N, C, *P]`` (read in ``num``'s dtype), ``weights None | [N, *G]``, ``coords [N, nd]``,
    ``importance None | [*P]``. Differentiable (``add_`` on views: no write-back of a whole leaf buffer)."""
    patch_shape, out_shape = tuple(patches.shape[2:]), tuple(num.shape[1:])
    w = voxel_weights(weights, importance, patches.shape[0], patch_shape, num.dtype, num.device)
    for i, start in enumerate(coords.tolist()):
        boxes = clipped_boxes(start, patch_shape, out_shape)
        if boxes is None:
            continue
        out_box, patch_box = boxes
        w_i = w[i][patch_box]
        num[(slice(None),) + out_box].add_(w_i * patches[i][(slice(None),) + patch_box].to(num.dtype))
        if den is not None:
            den[out_box].add_(1.0 if normalize == "count" else w_i)


def blend_reference(
    patches: torch.Tensor,
    weights: Optional[torch.Tensor],
    coords: torch.Tensor,
    importance: Optional[torch.Tensor],
    out_shape: Tuple[int, int, int],
    normalize: str,
) -> torch.Tensor:
    """Reference blend, canonical 3D form. Returns ``[C, *out_shape]`` in ``patches.dtype``."""
    c = patches.shape[1]
    acc = accumulation_dtype(patches.dtype)
    num = torch.zeros((c, *out_shape), dtype=acc, device=patches.device)
    den = torch.zeros(tuple(out_shape), dtype=acc, device=patches.device)
    accumulate_reference(num, den, patches, weights, coords, importance, normalize)
    if normalize == "count":
        out = num / den.clamp(min=1.0)
    elif normalize == "weight":
        covered = den > 0
        out = torch.where(covered, num / torch.where(covered, den, torch.ones_like(den)), torch.zeros_like(num))
    else:
        out = num
    return out.to(patches.dtype)


def check_accumulators(total: torch.Tensor, den: Optional[torch.Tensor], patches: torch.Tensor) -> None:
    """The checks of the compiled accumulate-mode ops (RuntimeError, as theirs): ``total [C, *O]`` and
    ``den [*O]`` contiguous, in the accumulation dtype of ``patches``."""
    acc = accumulation_dtype(patches.dtype)
    if total.dim() != 4 or total.shape[0] != patches.shape[1]:
        raise RuntimeError(f"sum must be [C, O0, O1, O2] with C = {patches.shape[1]}, got {tuple(total.shape)}")
    if total.dtype != acc:
        raise RuntimeError(f"sum must have the accumulation dtype {acc}, got {total.dtype}")
    if den is not None:
        if tuple(den.shape) != tuple(total.shape[1:]):
            raise RuntimeError(f"den must be [O0, O1, O2] = {tuple(total.shape[1:])}, got {tuple(den.shape)}")
        if den.dtype != acc:
            raise RuntimeError(f"den must have the accumulation dtype {acc}")


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
    check_accumulators(total, den, patches)
    out_shape = tuple(total.shape[1:])
    total += blend_reference(patches.to(total.dtype), weights, coords, importance, out_shape, "none")
    if den is not None and normalize != "none":
        den += coverage_reference(weights, coords, importance, tuple(patches.shape[2:]), out_shape, normalize,
                                  den.dtype, den.device)


def is_raster_lattice(coords: torch.Tensor) -> bool:
    """Whether ``coords [N, nd]`` are every combination of their per-axis starts, each once, in raster order
    (last axis fastest): the window order ``blend_stream_`` needs."""
    return lattice_axes(coords.tolist()) is not None


def lattice_axes(rows: list) -> Optional[list]:
    """The per-axis starts (ascending) if ``rows`` (starts as int lists) are every combination of them, each
    once, in raster order (last axis fastest); else None. (Python lists: cheaper than tensor ops at these
    sizes, and this runs once per sliding-window call.)"""
    if not rows:
        return None
    axes = [sorted(set(col)) for col in zip(*rows)]
    if len(rows) != math.prod(len(a) for a in axes):
        return None
    expected = itertools.product(*axes)
    return axes if all(tuple(r) == e for r, e in zip(rows, expected)) else None


def blend_stream_reference(
    out: torch.Tensor,
    patches: torch.Tensor,
    weights: Optional[torch.Tensor],
    coords: torch.Tensor,
    first: int,
    importance: Optional[torch.Tensor],
    normalize: str,
) -> None:
    """Stream mode, in place (canonical 3D form). ``coords [N, 3]`` are all windows of a lattice in raster
    order, ``patches [n, C, *P]`` windows ``first .. first + n - 1``, ``weights None | [n, *G]``.
    ``out [C, *O]`` (accumulation dtype) is the running output: for each voxel a window of this batch covers,
    start from ``out`` if an earlier window covers it (else 0), add this batch's weighted terms in order, and
    divide by the denominator over all windows if no later window covers it. After the last batch, ``out``
    is the blend of all windows."""
    check_accumulators(out, None, patches)
    n_all, n = coords.shape[0], patches.shape[0]
    end = first + n
    if weights is not None and normalize == "weight":
        raise RuntimeError("blend_stream_: normalize='weight' cannot take weights")
    if not 0 <= first <= end <= n_all:
        raise RuntimeError(f"blend_stream_: windows [{first}, {end}) are not within the {n_all} windows of coords")
    if not is_raster_lattice(coords):
        raise RuntimeError("blend_stream_: coords must be the windows of a lattice (every combination of per-axis "
                           "starts, each once) in raster order")
    if n == 0:
        return
    out_shape, patch_shape, acc = tuple(out.shape[1:]), tuple(patches.shape[2:]), out.dtype
    first_window = torch.full(out_shape, n_all, dtype=torch.int64, device=out.device)
    last_window = torch.full(out_shape, -1, dtype=torch.int64, device=out.device)
    hit = torch.zeros(out_shape, dtype=torch.bool, device=out.device)
    for i, start in enumerate(coords.tolist()):
        boxes = clipped_boxes(start, patch_shape, out_shape)
        if boxes is None:
            continue
        box = boxes[0]
        first_window[box] = first_window[box].clamp(max=i)
        last_window[box] = i
        if first <= i < end:
            hit[box] = True
    running = torch.where(first_window < first, out, torch.zeros_like(out))
    w = voxel_weights(weights, importance, n, patch_shape, acc, out.device)
    for k, start in enumerate(coords[first:end].tolist()):
        boxes = clipped_boxes(start, patch_shape, out_shape)
        if boxes is not None:
            out_box, patch_box = boxes
            running[(slice(None),) + out_box] += w[k][patch_box] * patches[k][(slice(None),) + patch_box].to(acc)
    den = coverage_reference(None, coords, importance if normalize == "weight" else None, patch_shape, out_shape,
                             normalize, acc, out.device)
    if normalize == "count":
        value = running / den.clamp(min=1.0)
    elif normalize == "weight":
        value = torch.where(den > 0, running / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    else:
        value = running
    value = torch.where(last_window < end, value, running)
    out[:, hit] = value[:, hit]


def coverage_reference(
    weights: Optional[torch.Tensor],
    coords: torch.Tensor,
    importance: Optional[torch.Tensor],
    patch_shape: Tuple[int, int, int],
    out_shape: Tuple[int, int, int],
    normalize: str,
    dtype: torch.dtype,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """The blend's denominator ``[*out_shape]``: patch count (``"count"``), weight sum (``"weight"``),
    or ones (``"none"``); on ``device``, by default that of ``weights`` or ``importance`` if given, else of
    ``coords`` (which may be on the CPU for patches on a GPU)."""
    if device is None:
        device = next((t.device for t in (weights, importance) if t is not None), coords.device)
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
