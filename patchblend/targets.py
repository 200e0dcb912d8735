"""Dice targets for the CIB heads (paper Eq. 4–5, docs/design.md#cib-heads).

:func:`dice_targets` scores a batch of predicted patches against their labels, once per patch and once
per grid cell, and returns the scores detached: they are what the patch head and the grid head learn
to predict. Grid cells follow the blend's rule (docs/design.md#blend-semantics): voxel ``k`` along an axis of size ``P``
split into ``g`` cells lies in cell ``k * g // P``, so an odd size gives unequal cells (``P = 5``,
``g = 2``: cells of 3 and 2 voxels).

Conventions shared with :mod:`patchblend.losses`:

- ``pred`` holds probabilities ``[B, K, *S]`` (2 or 3 spatial dims), not logits.
- ``K == 1``: the single channel is the foreground probability (sigmoid output).
- ``K > 1``: channel 0 is the background (softmax output); the score is the mean over the foreground
  channels ``1..K-1``, each channel scored on its own.
- ``target`` is either masks with ``pred``'s shape (one-hot for ``K > 1``), or, for ``K > 1``, a
  label map ``[B, 1, *S]`` or ``[B, *S]`` of class indices ``0..K-1``; for ``K == 1`` also ``[B, *S]``.
"""
from __future__ import annotations

import operator
from numbers import Real
from typing import Optional, Sequence, Tuple, Union

import torch

from ._reference import reduce_to_cells

__all__ = ["dice_targets"]

GridArg = Union[int, Sequence[int]]


def check_grid(grid: GridArg, ndim: int, sizes: Optional[Sequence[int]] = None, name: str = "grid",
               what: str = "patch size") -> Tuple[int, ...]:
    """``grid`` as a tuple of ``ndim`` ints ``>= 1`` (an int means the same count on every axis);
    with ``sizes``, also ``g <= size`` on every axis, so that no cell is empty."""
    seq = list(grid) if isinstance(grid, (tuple, list, torch.Size)) else [grid] * ndim
    if any(isinstance(g, bool) for g in seq):
        raise TypeError(f"{name} must hold ints, not bools, got {grid!r}")
    try:
        cells = tuple(operator.index(g) for g in seq)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of {ndim} ints, got {grid!r}") from None
    if len(cells) != ndim:
        raise ValueError(f"{name} must have one entry per spatial axis ({ndim}), got {grid!r}")
    if any(g < 1 for g in cells):
        raise ValueError(f"{name} entries must be >= 1, got {cells}")
    if sizes is not None:
        for axis, (g, p) in enumerate(zip(cells, sizes)):
            if g > p:
                raise ValueError(
                    f"{name} {cells} must satisfy g <= {what} {tuple(sizes)} on every axis "
                    f"(axis {axis}: g={g}, size={p})"
                )
    return cells


def cell_sums(values: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Sum ``values [B, C, *S]`` (2 or 3 spatial dims) over each grid cell → ``[B, C, *grid]``,
    cells by the blend's ``k * g // P`` rule."""
    b, c = values.shape[:2]
    spatial = tuple(values.shape[2:])
    cells = tuple(grid)
    if len(spatial) == 2:  # a 2D patch is a 3D patch of depth 1
        spatial, cells = (1,) + spatial, (1,) + cells
    sums = reduce_to_cells(values.reshape(b * c, *spatial), cells)
    return sums.reshape(b, c, *grid)


def ratio_or_one(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, and 1 where ``den == 0`` (nothing to score counts as perfect).

    Safe for autograd: the division never sees a zero denominator, so no NaN leaks into gradients."""
    empty = den == 0
    return torch.where(empty, torch.ones_like(num), num / torch.where(empty, torch.ones_like(den), den))


def dice_ratio(intersection: torch.Tensor, total: torch.Tensor, smooth: float = 0.0) -> torch.Tensor:
    """``(2·I + smooth) / (total + smooth)``, and 1 where the denominator is 0 (both empty)."""
    return ratio_or_one(2.0 * intersection + smooth, total + smooth)


def check_real(name: str, value, low: Optional[float] = None, high: Optional[float] = None) -> float:
    """``value`` as a finite float within ``[low, high]``; errors name the argument."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return value


def foreground(pred: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Check ``pred`` / ``target`` and return the foreground channels of both as float tensors
    ``[B, K', *S]`` (``K' = 1`` for ``K == 1``, else ``K - 1``), in ``pred``'s float dtype
    (float32 at least). See the module docstring for the accepted forms."""
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"pred must be a torch.Tensor, got {type(pred).__name__}")
    if not pred.dtype.is_floating_point:
        raise TypeError(f"pred must hold float probabilities, got dtype {pred.dtype}")
    if pred.dim() not in (4, 5):
        raise ValueError(
            f"pred must be [B, K, D, H, W] (3D) or [B, K, H, W] (2D) probabilities, got shape {tuple(pred.shape)}"
        )
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_complex:
        raise TypeError(f"target must hold real values, got dtype {target.dtype}")
    b, k = pred.shape[:2]
    spatial = tuple(pred.shape[2:])
    if k == 0:
        raise ValueError(f"pred must have at least one channel, got shape {tuple(pred.shape)}")
    if target.device != pred.device:
        raise ValueError(f"target is on {target.device} but pred is on {pred.device}")
    if target.dim() == pred.dim() - 1:
        target = target.unsqueeze(1)
    if target.dim() != pred.dim() or target.shape[0] != b or tuple(target.shape[2:]) != spatial:
        raise ValueError(
            f"target must be [B, K, *S], [B, 1, *S] (label map) or [B, *S] matching pred {tuple(pred.shape)}, "
            f"got {tuple(target.shape)}"
        )
    dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    if target.shape[1] == k:
        t = target.to(dtype)
    elif target.shape[1] == 1:  # label map of class indices, K > 1
        if target.dtype.is_floating_point and not bool((target == target.round()).all()):
            raise ValueError("target as a label map must hold integer class indices, found fractional values")
        labels = target[:, 0].to(torch.int64)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError(
                f"target label map values must lie in 0..{k - 1} (pred has K={k} channels), "
                f"got range {int(labels.min())}..{int(labels.max())}"
            )
        t = torch.nn.functional.one_hot(labels, k).movedim(-1, 1).to(dtype)
    else:
        raise ValueError(
            f"target has {target.shape[1]} channels; expected {k} (masks like pred) or 1 (label map)"
        )
    p = pred.to(dtype)
    if k > 1:
        p, t = p[:, 1:], t[:, 1:]
    return p, t


@torch.no_grad()
def dice_targets(
    pred: torch.Tensor,
    target: torch.Tensor,
    grid: GridArg = (2, 2, 2),
    threshold: float = 0.5,
    soft: bool = False,
    *,
    smooth: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dice of the prediction against the label, per patch and per grid cell (the heads' targets).

    Args:
        pred: probabilities ``[B, K, *P]`` with ``*P`` 3 (or 2) spatial dims. ``K == 1``: foreground
            probability; ``K > 1``: channel 0 is background and the result is the mean of the Dice of
            channels ``1..K-1``.
        target: masks with ``pred``'s shape (binary; one-hot for ``K > 1``), or for ``K > 1`` a label
            map ``[B, 1, *P]`` / ``[B, *P]`` of class indices; ``[B, *P]`` is also accepted for ``K == 1``.
            In the hard mode masks are binarised at 0.5; in the soft mode they are used as given.
        grid: cells per spatial axis (an int means the same on every axis), ``1 <= g <= P``.
            Voxel ``k`` along an axis of size ``P`` is in cell ``k * g // P`` (the blend's rule).
        threshold: hard mode: a voxel is predicted foreground when ``pred > threshold``.
        soft: use the probabilities themselves (soft Dice ``2·Σpt / (Σp + Σt)``) instead of
            thresholding. Note that a soft prediction is never exactly empty, so on an empty label it
            scores 0 however small it is, unless ``smooth > 0``.
        smooth: added to numerator and denominator, ``(2·I + smooth) / (|p| + |t| + smooth)``. Default 0:
            the exact Dice.

    Returns:
        ``(patch, grid)``: ``patch [B]`` and ``grid [B, *grid]``, float32 (float64 for float64
        ``pred``), on ``pred``'s device, detached (no autograd history). A patch or cell where both
        prediction and label are empty scores 1; a false positive alone (or a missed lesion alone)
        scores 0.
    """
    p, t = foreground(pred, target)
    spatial_dims = tuple(range(2, p.dim()))
    cells = check_grid(grid, len(spatial_dims), p.shape[2:])
    threshold = check_real("threshold", threshold)
    smooth = check_real("smooth", smooth, low=0.0)
    if not isinstance(soft, bool):
        raise TypeError(f"soft must be a bool, got {type(soft).__name__}")
    if not soft:
        p = (p > threshold).to(p.dtype)
        t = (t > 0.5).to(t.dtype)
    inter, total = p * t, p + t
    patch = dice_ratio(inter.sum(spatial_dims), total.sum(spatial_dims), smooth).mean(1)
    per_cell = dice_ratio(cell_sums(inter, cells), cell_sums(total, cells), smooth).mean(1)
    return patch, per_cell
