"""Training losses for CIB (paper Eq. 4–6): the heads' calibration loss and two segmentation losses.

The total loss of the paper is ``soft_dice_loss(seg, label) + calibration_loss(...)`` with
``lambda_patch = 1`` and ``lambda_grid = 0`` for the first stage, then both 1. :func:`tversky_loss`
is the alternative segmentation loss the paper combines CIB with (§3.1).

``pred`` / ``target`` conventions are those of :mod:`patchblend.targets`: probabilities
``[B, K, *S]``; for ``K > 1`` channel 0 is the background and only channels ``1..K-1`` are scored.
All losses return a scalar; they are finite on empty patches (smoothing) and on an empty batch
(``B = 0`` gives 0, still attached to the graph).
"""
from __future__ import annotations

from typing import Optional

import torch

from .targets import check_real, dice_ratio, foreground, ratio_or_one

__all__ = ["calibration_loss", "soft_dice_loss", "tversky_loss"]

GRID_REDUCTIONS = ("sum", "mean")


def _mean_or_zero(x: torch.Tensor) -> torch.Tensor:
    """Mean of all elements, 0 (attached to the graph) when there are none."""
    return x.sum() / max(x.numel(), 1)


def _check_pair(pred_name: str, pred, target_name: str, target) -> None:
    for name, t in ((pred_name, pred), (target_name, target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float tensor, got dtype {t.dtype}")
    if pred.shape != target.shape:  # no broadcasting: [B] against [B, 1] would silently give [B, B]
        raise ValueError(
            f"{pred_name} {tuple(pred.shape)} and {target_name} {tuple(target.shape)} must have the same shape"
        )


def calibration_loss(
    patch_pred: torch.Tensor,
    patch_target: torch.Tensor,
    grid_pred: Optional[torch.Tensor] = None,
    grid_target: Optional[torch.Tensor] = None,
    lambda_patch: float = 1.0,
    lambda_grid: float = 1.0,
    *,
    grid_reduction: str = "sum",
) -> torch.Tensor:
    """``lambda_patch · L_patch + lambda_grid · L_grid`` (paper Eq. 4–6, without the Dice term).

    ``L_patch = mean_b (patch_pred - patch_target)²`` (Eq. 4).
    ``L_grid = Σ_cells mean_b (grid_pred - grid_target)²`` (Eq. 5 sums the MSE over the M cells; we
    follow it, so with 2×2×2 cells the grid term weighs 8 cell-MSEs). ``grid_reduction="mean"``
    averages over the cells instead (``L_grid / M``).

    Args:
        patch_pred: ``[B]`` predicted patch scores (the patch head's output).
        patch_target: ``[B]`` Dice targets (from :func:`patchblend.targets.dice_targets`).
        grid_pred, grid_target: ``[B, *G]``, both or neither. Without them the grid term is left out.
        lambda_patch, lambda_grid: weights ``>= 0``. A term whose weight is 0 is left out altogether
            (not multiplied by 0), so its head gets no gradient (``.grad`` stays ``None``).
        grid_reduction: ``"sum"`` (the paper) or ``"mean"`` over the cells.

    Targets are detached here: gradients flow only into the predictions. An empty batch gives 0.
    Returns a scalar tensor in ``patch_pred``'s dtype.
    """
    _check_pair("patch_pred", patch_pred, "patch_target", patch_target)
    if patch_pred.dim() != 1:
        raise ValueError(f"patch_pred must be [B], got shape {tuple(patch_pred.shape)}")
    if (grid_pred is None) != (grid_target is None):
        missing = "grid_target" if grid_target is None else "grid_pred"
        raise ValueError(f"grid_pred and grid_target go together: {missing} is missing")
    lambda_patch = check_real("lambda_patch", lambda_patch, low=0.0)
    lambda_grid = check_real("lambda_grid", lambda_grid, low=0.0)
    if grid_reduction not in GRID_REDUCTIONS:
        raise ValueError(f"grid_reduction must be one of {GRID_REDUCTIONS}, got {grid_reduction!r}")

    loss = patch_pred.sum() * 0.0  # a zero on the graph, whatever terms follow
    if lambda_patch > 0:
        loss = loss + lambda_patch * _mean_or_zero((patch_pred - patch_target.detach().to(patch_pred.dtype)) ** 2)
    if grid_pred is not None:
        _check_pair("grid_pred", grid_pred, "grid_target", grid_target)
        if grid_pred.dim() < 2 or grid_pred.shape[0] != patch_pred.shape[0]:
            raise ValueError(
                f"grid_pred must be [B, *G] with B = {patch_pred.shape[0]} (patch_pred's), "
                f"got shape {tuple(grid_pred.shape)}"
            )
        if lambda_grid > 0:
            sq = (grid_pred - grid_target.detach().to(grid_pred.dtype)) ** 2
            per_cell = sq.sum(0) / max(sq.shape[0], 1)  # [*G]: MSE of each cell over the batch
            grid_term = per_cell.sum() if grid_reduction == "sum" else per_cell.mean()
            loss = loss + lambda_grid * grid_term.to(loss.dtype)
    return loss


def _overlaps(pred: torch.Tensor, target: torch.Tensor, batch: bool):
    """Foreground ``p``, ``t`` and the reduction dims: spatial, plus the batch when ``batch``."""
    p, t = foreground(pred, target)
    dims = tuple(range(2, p.dim()))
    return p, t, ((0,) + dims) if batch else dims


def soft_dice_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth: float = 1e-5,
    batch: bool = False,
    squared: bool = False,
) -> torch.Tensor:
    """Soft Dice loss ``1 - (2·Σpt + smooth) / (Σp + Σt + smooth)``, averaged over samples and
    foreground classes.

    Args:
        pred: probabilities ``[B, K, *S]`` (after sigmoid / softmax).
        target: masks like ``pred`` or a label map (see :mod:`patchblend.targets`).
        smooth: ``>= 0``, added to numerator and denominator. It makes a patch with an empty label
            contribute ``Σp / (Σp + smooth)``, so predicting nothing there is rewarded; a term whose
            denominator is exactly 0 counts as a perfect score.
        batch: sum over the batch before the ratio (one Dice per class for the whole batch, as
            CoactSeg, the paper's baseline, and nnU-Net's batch Dice do) instead of one per sample.
        squared: denominators ``Σp² + Σt²`` (V-Net / CoactSeg form) instead of ``Σp + Σt``.

    Returns a scalar; 0 for an empty batch.
    """
    smooth = check_real("smooth", smooth, low=0.0)
    p, t, dims = _overlaps(pred, target, batch)
    total = (p * p + t * t) if squared else (p + t)
    dice = dice_ratio((p * t).sum(dims), total.sum(dims), smooth)
    return _mean_or_zero(1.0 - dice)


def tversky_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 0.3,
    beta: float = 0.7,
    smooth: float = 1e-5,
    batch: bool = False,
) -> torch.Tensor:
    """Tversky loss (Salehi et al. 2017) ``1 - (TP + smooth) / (TP + α·FP + β·FN + smooth)`` with
    ``TP = Σpt``, ``FP = Σp(1-t)``, ``FN = Σ(1-p)t``, averaged over samples and foreground classes.

    ``alpha`` weighs false positives, ``beta`` false negatives (defaults 0.3 / 0.7, Salehi et al.'s
    best setting, favour recall). ``alpha = beta = 0.5`` gives :func:`soft_dice_loss` with smoothing
    ``2·smooth``. ``smooth``, ``batch``, shapes and the empty cases are as in :func:`soft_dice_loss`.
    Returns a scalar; 0 for an empty batch.
    """
    alpha = check_real("alpha", alpha, low=0.0)
    beta = check_real("beta", beta, low=0.0)
    smooth = check_real("smooth", smooth, low=0.0)
    p, t, dims = _overlaps(pred, target, batch)
    tp = (p * t).sum(dims)
    fp = (p * (1.0 - t)).sum(dims)
    fn = ((1.0 - p) * t).sum(dims)
    index = ratio_or_one(tp + smooth, tp + alpha * fp + beta * fn + smooth)
    return _mean_or_zero(1.0 - index)
