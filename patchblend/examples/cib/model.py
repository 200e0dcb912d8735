"""The CoactSeg-style V-Net of DESIGN §6 with the CIB patch and grid heads.

Encoder: 5 stages of ``w, 2w, 4w, 8w, 16w`` channels (``w = 16``: 16/32/64/128/256) with 1, 2, 3, 3, 3
3×3×3 conv–BN–ReLU layers; between stages a 2×2×2 stride-2 conv. Decoder: stride-2 transposed convs
back up, **additive** skips (``up(x) + skip``), stages of 3, 3, 2, 1 conv layers. Three 1×1×1 output
convs, each 2 classes (softmax): lesions at t1, lesions at t2, new lesions. Input ``[t1, t2, t2 − t1]``.
At ``w = 16`` the network has ≈9.48 M parameters (the paper's figure) and the heads add ≈7.2 K.

Heads (the library's): :class:`patchblend.heads.PatchHead` on the bottleneck (``16w`` channels, 1/16 of
the patch), :class:`patchblend.heads.GridHead` on the last decoder feature (``w`` channels, full size).
Patch sizes must be multiples of 16.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from patchblend.heads import GridHead, PatchHead

__all__ = ["CIBVNet", "CIBOutput", "OUTPUT_T1", "OUTPUT_T2", "OUTPUT_NEW"]

#: Indices of the three outputs in ``CIBOutput.logits[:, k]``.
OUTPUT_T1, OUTPUT_T2, OUTPUT_NEW = 0, 1, 2


class CIBOutput(NamedTuple):
    """``logits [B, 3, 2, *P]`` (output k, class c), ``patch [B]`` and ``grid [B, *G]`` scores in (0, 1)."""

    logits: torch.Tensor
    patch: torch.Tensor
    grid: torch.Tensor

    def probs(self, output: int = OUTPUT_NEW) -> torch.Tensor:
        """Foreground probability of one output: ``[B, 1, *P]``."""
        return torch.softmax(self.logits[:, output].float(), dim=1)[:, 1:2]


def _conv_stage(n: int, cin: int, cout: int) -> nn.Sequential:
    layers = []
    for i in range(n):
        layers += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class CIBVNet(nn.Module):
    """V-Net with three 2-class outputs and the CIB heads.

    Args:
        width: channels of the first stage (16 = the paper's network; 4–8 for a CPU-sized variant).
        in_channels: input channels (3: ``[t1, t2, t2 − t1]``).
        grid: grid-head cells per axis (paper: 2×2×2).
        dropout: dropout probability before the output convs (0 = none).

    ``forward(x [B, in_channels, *P])`` → :class:`CIBOutput`; ``P`` multiples of 16.
    """

    def __init__(self, width: int = 16, in_channels: int = 3, grid: Sequence[int] = (2, 2, 2), dropout: float = 0.0):
        super().__init__()
        if int(width) < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if int(in_channels) < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        w = int(width)
        c = [w, 2 * w, 4 * w, 8 * w, 16 * w]
        self.width, self.in_channels = w, int(in_channels)
        self.enc = nn.ModuleList([_conv_stage(n, cin, cout) for n, cin, cout in
                                  zip((1, 2, 3, 3, 3), [self.in_channels] + c[1:], c)])
        self.down = nn.ModuleList([_down(c[i], c[i + 1]) for i in range(4)])
        self.up = nn.ModuleList([_up(c[i + 1], c[i]) for i in reversed(range(4))])
        self.dec = nn.ModuleList([_conv_stage(n, c[i], c[i]) for n, i in zip((3, 3, 2, 1), (3, 2, 1, 0))])
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.ModuleList([nn.Conv3d(w, 2, 1) for _ in range(3)])
        self.patch_head = PatchHead(c[4])
        self.grid_head = GridHead(w, grid=tuple(grid))

    def features(self, x: torch.Tensor):
        """``(bottleneck [B, 16w, *P/16], last decoder feature [B, w, *P])``."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [B, {self.in_channels}, D, H, W], got shape {tuple(x.shape)}")
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"x spatial size must be a multiple of 16, got {tuple(x.shape[2:])}")
        skips = []
        h = x
        for i in range(5):
            h = self.enc[i](h)
            if i < 4:
                skips.append(h)
                h = self.down[i](h)
        bottleneck = h
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            h = dec(up(h) + skip)
        return bottleneck, h

    def forward(self, x: torch.Tensor) -> CIBOutput:
        bottleneck, last = self.features(x)
        d = self.dropout(last)
        logits = torch.stack([o(d) for o in self.out], dim=1)  # [B, 3, 2, *P]
        return CIBOutput(logits, self.patch_head(bottleneck), self.grid_head(last))

    def head_parameters(self):
        """Parameters of the two CIB heads."""
        return list(self.patch_head.parameters()) + list(self.grid_head.parameters())
