"""The two CIB prediction heads (paper §2.2, DESIGN §6).

- :class:`PatchHead` reads the deepest encoder feature and predicts the Dice of the whole patch.
- :class:`GridHead` reads a decoder feature and predicts the Dice of each grid cell.

With the paper's CoactSeg channels, ``PatchHead(256)`` has 257 parameters and ``GridHead(16)`` has
``16·16·27 + 16 + 16 + 1 = 6945``: 7,202 together, against the paper's stated 7.35 K (its heads'
exact layout was not published; DESIGN §6 gives this reconstruction).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._reference import cell_index
from .targets import GridArg, cell_sums, check_grid

__all__ = ["PatchHead", "GridHead"]


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

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        _check_feature(feature, self.in_channels, "PatchHead")
        pooled = feature.mean(dim=(2, 3, 4))  # [B, C]
        return torch.sigmoid(self.fc(pooled)).squeeze(1)


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

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        _check_feature(feature, self.in_channels, "GridHead")
        sizes = feature.shape[2:]
        check_grid(self.grid, 3, sizes, name="GridHead grid", what="feature size")
        h = torch.relu(self.conv(feature))  # [B, hidden, D, H, W]
        counts = [torch.bincount(cell_index(s, g, h.device), minlength=g) for s, g in zip(sizes, self.grid)]
        volume = counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]
        pooled = cell_sums(h, self.grid) / volume.to(h.dtype)  # [B, hidden, *grid]
        return torch.sigmoid(self.fc(pooled.movedim(1, -1))).squeeze(-1)
