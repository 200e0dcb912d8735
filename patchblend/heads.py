"""The CIB prediction heads: the paper's pair (§2.2, docs/design.md#cib-heads) and a prediction-aware pair.

- :class:`PatchHead` reads the deepest encoder feature and predicts the Dice of the whole patch.
- :class:`GridHead` reads a decoder feature and predicts the Dice of each grid cell.
- :class:`AwarePatchHead` / :class:`AwareGridHead` (not in the paper) also read the network's own
  predicted probability: statistics of it per window and per cell (:func:`prediction_statistics`)
  plus mean and max pooling of a late decoder feature → LayerNorm → a small MLP → sigmoid. Most
  windows whose true Dice is low hold an empty label and a few stray predicted voxels, which an
  average of the bottleneck cannot see; the statistics of the prediction can.

Every head splits into a fixed part and a learned part: ``head(*inputs) == head.predict(head.summarize(*inputs))``.
:mod:`patchblend.calibration` caches the summaries of a frozen network and fits ``predict`` alone.

With the paper's CoactSeg channels, ``PatchHead(256)`` has 257 parameters and ``GridHead(16)`` has
``16·16·27 + 16 + 16 + 1 = 6945``: 7,202 together, against the paper's stated 7.35 K (its heads'
exact layout was not published; docs/design.md#cib-heads gives this reconstruction).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._reference import cell_index
from .targets import GridArg, cell_sums, check_grid

__all__ = ["PatchHead", "GridHead", "AwarePatchHead", "AwareGridHead", "prediction_statistics",
           "PREDICTION_STATISTICS", "HEAD_KINDS"]

#: Head kinds: ``"paper"`` (:class:`PatchHead` + :class:`GridHead`) and ``"aware"``
#: (:class:`AwarePatchHead` + :class:`AwareGridHead`).
HEAD_KINDS = ("paper", "aware")

#: Names of the statistics :func:`prediction_statistics` computes per region, in order.
PREDICTION_STATISTICS = ("mean", "max", "frac_fg", "frac_uncertain", "log_count_fg", "log_count_uncertain",
                         "mean_fg")


def _check_channels(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_feature(feature: torch.Tensor, channels: int, head: str) -> None:
    if not isinstance(feature, torch.Tensor):
        raise TypeError(f"{head}: feature must be a torch.Tensor, got {type(feature).__name__}")
    if feature.dim() != 5:
        raise ValueError(f"{head}: feature must be 5D [B, C, D, H, W], got shape {tuple(feature.shape)}")
    if feature.shape[1] != channels:
        raise ValueError(
            f"{head}: feature has {feature.shape[1]} channels but the head was built for in_channels={channels}"
        )


class PatchHead(nn.Module):
    """Patch score: global average pool → ``Linear(in_channels, 1)`` → sigmoid.

    Input ``[B, in_channels, D, H, W]`` (the deepest encoder feature); output ``[B]`` in (0, 1),
    the predicted Dice of each patch.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = _check_channels("in_channels", in_channels)
        self.fc = nn.Linear(in_channels, 1)

    def summarize(self, feature: torch.Tensor) -> torch.Tensor:
        """The fixed part: ``feature [B, C, D, H, W]`` → its global average ``[B, C]``."""
        _check_feature(feature, self.in_channels, "PatchHead")
        return feature.mean(dim=(2, 3, 4))

    def predict(self, summary: torch.Tensor) -> torch.Tensor:
        """The learned part: ``[B, C]`` → ``[B]`` in (0, 1)."""
        return torch.sigmoid(self.fc(summary)).squeeze(1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.predict(self.summarize(feature))


class GridHead(nn.Module):
    """Grid-cell scores: ``Conv3d(in, hidden, 3, padding=1)`` → ReLU → average per cell →
    ``Linear(hidden, 1)`` shared by the cells → sigmoid.

    Input ``[B, in_channels, D, H, W]`` (a decoder feature, any spatial size ``>= grid``); output
    ``[B, *grid]`` in (0, 1), the predicted Dice of each cell.

    Two choices of ours (the paper gives no more detail than "a 3D convolution, average pooling, a
    linear layer and a sigmoid"):

    - the ReLU after the convolution: without a nonlinearity, convolution, pooling and linear layer
      compose into one linear map and the convolution adds nothing (it adds no parameters);
    - the pooling averages each cell by the blend's rule (voxel ``k`` of ``S`` in cell ``k * g // S``),
      so the head's cells are exactly the cells :func:`patchblend.targets.dice_targets` scores and
      the blend weights. It equals ``adaptive_avg_pool3d`` when each size is a multiple of ``g``;
      for other sizes adaptive pooling would make neighbouring cells overlap.

    Args:
        in_channels: channels of the decoder feature.
        grid: cells per axis ``(gd, gh, gw)``, or an int for all three. Default ``(2, 2, 2)``.
        hidden_channels: output channels of the convolution; default ``in_channels``.
    """

    def __init__(self, in_channels: int, grid: GridArg = (2, 2, 2), hidden_channels: Optional[int] = None):
        super().__init__()
        self.in_channels = _check_channels("in_channels", in_channels)
        hidden = in_channels if hidden_channels is None else _check_channels("hidden_channels", hidden_channels)
        self.grid = check_grid(grid, 3)
        self.conv = nn.Conv3d(in_channels, hidden, kernel_size=3, padding=1)
        self.fc = nn.Linear(hidden, 1)

    def summarize(self, feature: torch.Tensor) -> torch.Tensor:
        """The fixed part: the feature itself, checked (the convolution is learned)."""
        _check_feature(feature, self.in_channels, "GridHead")
        check_grid(self.grid, 3, feature.shape[2:], name="GridHead grid", what="feature size")
        return feature

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.predict(self.summarize(feature))

    def predict(self, feature: torch.Tensor) -> torch.Tensor:
        """The learned part: ``[B, C, D, H, W]`` → ``[B, *grid]`` in (0, 1)."""
        sizes = feature.shape[2:]
        h = torch.relu(self.conv(feature))  # [B, hidden, D, H, W]
        counts = [torch.bincount(cell_index(s, g, h.device), minlength=g) for s, g in zip(sizes, self.grid)]
        volume = counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]
        pooled = cell_sums(h, self.grid) / volume.to(h.dtype)  # [B, hidden, *grid]
        return torch.sigmoid(self.fc(pooled.movedim(1, -1))).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Prediction-aware heads
# ---------------------------------------------------------------------------------------------


def _cell_ids(sizes, grid, device) -> torch.Tensor:
    """Flat cell id of every voxel ``[D*H*W]`` by the blend's rule (voxel ``k`` in cell ``k * g // S``)."""
    i, j, k = (cell_index(s, g, device) for s, g in zip(sizes, grid))
    return ((i[:, None, None] * grid[1] + j[None, :, None]) * grid[2] + k[None, None, :]).reshape(-1)


def _cell_max(values: torch.Tensor, grid) -> torch.Tensor:
    """Maximum of ``values [B, C, D, H, W]`` over each cell → ``[B, C, *grid]``."""
    b, c = values.shape[:2]
    ids = _cell_ids(values.shape[2:], grid, values.device)
    n = grid[0] * grid[1] * grid[2]
    flat = values.reshape(b, c, ids.numel())
    out = flat.new_full((b, c, n), float("-inf")).scatter_reduce(2, ids.expand(b, c, -1), flat, "amax",
                                                                include_self=False)
    return out.reshape(b, c, *grid)


def _cell_counts(sizes, grid, device, dtype) -> torch.Tensor:
    counts = [torch.bincount(cell_index(s, g, device), minlength=g).to(dtype) for s, g in zip(sizes, grid)]
    return counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]


def _check_probability(prob: torch.Tensor, head: str) -> None:
    if not isinstance(prob, torch.Tensor):
        raise TypeError(f"{head}: prob must be a torch.Tensor, got {type(prob).__name__}")
    if prob.dim() != 5 or prob.shape[1] != 1:
        raise ValueError(f"{head}: prob must be the foreground probability [B, 1, D, H, W], got shape "
                         f"{tuple(prob.shape)}")
    if not prob.dtype.is_floating_point:
        raise TypeError(f"{head}: prob must hold float probabilities, got dtype {prob.dtype}")


@torch.no_grad()
def prediction_statistics(prob: torch.Tensor, grid: Optional[GridArg] = None) -> torch.Tensor:
    """Statistics of a predicted foreground probability, per window or per grid cell.

    For each region (the whole window, or each cell by the blend's ``k * g // S`` rule) with ``n``
    voxels, in the order of :data:`PREDICTION_STATISTICS`:

    ``mean`` of ``p``; ``max`` of ``p``; ``frac_fg`` = fraction with ``p > 0.5``; ``frac_uncertain`` =
    fraction with ``0.1 < p < 0.9``; ``log_count_fg`` = ``log(1 + #{p > 0.5})``;
    ``log_count_uncertain`` = ``log(1 + #{0.1 < p < 0.9})``; ``mean_fg`` = mean of ``p`` over the voxels
    with ``p > 0.5`` (0 if none).

    Args:
        prob: ``[B, 1, D, H, W]`` foreground probability.
        grid: ``None`` for one region per window, or cells per axis.

    Returns:
        ``[B, 7]`` (``grid=None``) or ``[B, 7, *grid]``, float32 (float64 for float64 input), no autograd.
    """
    _check_probability(prob, "prediction_statistics")
    p = prob if prob.dtype == torch.float64 else prob.float()
    fg = (p > 0.5).to(p.dtype)
    unc = ((p > 0.1) & (p < 0.9)).to(p.dtype)
    if grid is None:
        dims = (2, 3, 4)
        n = float(p[0, 0].numel()) if p.shape[0] else 1.0
        s_p, s_fg, s_unc, s_pfg = (v.sum(dims) for v in (p, fg, unc, p * fg))
        mx = p.amax(dims) if p.shape[0] else p.new_zeros(p.shape[:2])
    else:
        cells = check_grid(grid, 3, p.shape[2:], name="grid", what="prob size")
        n = _cell_counts(p.shape[2:], cells, p.device, p.dtype)
        s_p, s_fg, s_unc, s_pfg = (cell_sums(v, cells) for v in (p, fg, unc, p * fg))
        mx = _cell_max(p, cells)
    stats = [s_p / n, mx, s_fg / n, s_unc / n, torch.log1p(s_fg), torch.log1p(s_unc),
             s_pfg / s_fg.clamp_min(1.0)]
    return torch.cat(stats, dim=1)


def _pool_mean_max(feature: torch.Tensor, grid=None) -> torch.Tensor:
    """Mean and max of ``feature [B, C, D, H, W]`` per window ``[B, 2C]`` or per cell ``[B, 2C, *grid]``."""
    if grid is None:
        return torch.cat([feature.mean((2, 3, 4)), feature.amax((2, 3, 4))], dim=1)
    counts = _cell_counts(feature.shape[2:], grid, feature.device, feature.dtype)
    return torch.cat([cell_sums(feature, grid) / counts, _cell_max(feature, grid)], dim=1)


def _aware_inputs(head: str, prob: torch.Tensor, feature: torch.Tensor, in_channels: int, detach: bool):
    """The prediction-aware heads' inputs checked: ``(prob detached, feature detached if detach)``."""
    _check_probability(prob, head)
    _check_feature(feature, in_channels, head)
    if prob.shape[0] != feature.shape[0]:
        raise ValueError(f"{head}: prob and feature have different batch sizes "
                         f"({prob.shape[0]} and {feature.shape[0]})")
    return prob.detach(), (feature.detach() if detach else feature)


def _mlp(features: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(features), nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class AwarePatchHead(nn.Module):
    """Prediction-aware patch score: ``[statistics of prob (7), mean and max of feature (2C)]`` →
    ``LayerNorm`` → ``Linear(7 + 2C, hidden)`` → ReLU → ``Linear(hidden, 1)`` → sigmoid.

    ``forward(prob [B, 1, D, H, W], feature [B, C, D', H', W'])`` → ``[B]`` in (0, 1), the predicted
    Dice of each window. ``prob`` is the network's foreground probability for the window; ``feature``
    a late decoder feature (any spatial size).

    Args:
        in_channels: channels ``C`` of the feature.
        hidden: width of the MLP's hidden layer (default 16).
        detach: cut the inputs from autograd (default ``True``): training the head then never changes
            the network it reads, so it can be trained jointly with the segmentation loss or fitted
            afterwards (:func:`patchblend.calibration.fit_heads`) with the same result for the network.
    """

    def __init__(self, in_channels: int, hidden: int = 16, detach: bool = True):
        super().__init__()
        self.in_channels = _check_channels("in_channels", in_channels)
        self.hidden = _check_channels("hidden", hidden)
        self.detach = bool(detach)
        self.features = len(PREDICTION_STATISTICS) + 2 * in_channels
        self.mlp = _mlp(self.features, hidden)

    def summarize(self, prob: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """The fixed part: ``[B, 7 + 2C]`` (statistics of ``prob``, then mean and max of ``feature``)."""
        prob, feature = _aware_inputs("AwarePatchHead", prob, feature, self.in_channels, self.detach)
        stats = prediction_statistics(prob).to(feature.dtype)
        return torch.cat([stats, _pool_mean_max(feature)], dim=1)

    def predict(self, summary: torch.Tensor) -> torch.Tensor:
        """The learned part: ``[B, 7 + 2C]`` → ``[B]`` in (0, 1)."""
        return torch.sigmoid(self.mlp(summary)).squeeze(1)

    def forward(self, prob: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        return self.predict(self.summarize(prob, feature))


class AwareGridHead(nn.Module):
    """Prediction-aware grid-cell scores. For each cell: ``[statistics of prob in the cell (7), the
    same for the whole window (7), mean and max of feature in the cell (2C)]`` → ``LayerNorm`` → an
    MLP shared by the cells (``Linear(14 + 2C, hidden)`` → ReLU → ``Linear(hidden, 1)``) → sigmoid.

    ``forward(prob [B, 1, D, H, W], feature [B, C, D', H', W'])`` → ``[B, *grid]`` in (0, 1). Cells
    follow the blend's rule on each input's own size (each size ``>= grid``), as :class:`GridHead`.

    Args:
        in_channels: channels ``C`` of the feature.
        grid: cells per axis (default ``(2, 2, 2)``).
        hidden: width of the MLP's hidden layer (default 16).
        detach: cut the inputs from autograd (default ``True``; see :class:`AwarePatchHead`).
    """

    def __init__(self, in_channels: int, grid: GridArg = (2, 2, 2), hidden: int = 16, detach: bool = True):
        super().__init__()
        self.in_channels = _check_channels("in_channels", in_channels)
        self.hidden = _check_channels("hidden", hidden)
        self.grid = check_grid(grid, 3)
        self.detach = bool(detach)
        self.features = 2 * len(PREDICTION_STATISTICS) + 2 * in_channels
        self.mlp = _mlp(self.features, hidden)

    def summarize(self, prob: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """The fixed part: ``[B, 14 + 2C, *grid]``."""
        prob, feature = _aware_inputs("AwareGridHead", prob, feature, self.in_channels, self.detach)
        check_grid(self.grid, 3, prob.shape[2:], name="AwareGridHead grid", what="prob size")
        check_grid(self.grid, 3, feature.shape[2:], name="AwareGridHead grid", what="feature size")
        cell = prediction_statistics(prob, self.grid).to(feature.dtype)
        window = prediction_statistics(prob).to(feature.dtype)[:, :, None, None, None].expand_as(cell)
        return torch.cat([cell, window, _pool_mean_max(feature, self.grid)], dim=1)

    def predict(self, summary: torch.Tensor) -> torch.Tensor:
        """The learned part: ``[B, 14 + 2C, *grid]`` → ``[B, *grid]`` in (0, 1)."""
        return torch.sigmoid(self.mlp(summary.movedim(1, -1))).squeeze(-1)

    def forward(self, prob: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        return self.predict(self.summarize(prob, feature))
