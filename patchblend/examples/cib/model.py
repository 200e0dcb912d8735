"""The CoactSeg-style V-Net of docs/design.md#cib-heads with the CIB patch and grid heads.

Encoder: 5 stages of ``w, 2w, 4w, 8w, 16w`` channels (``w = 16``: 16/32/64/128/256) with 1, 2, 3, 3, 3
3×3×3 conv–BN–ReLU layers; between stages a 2×2×2 stride-2 conv. Decoder: stride-2 transposed convs
back up, **additive** skips (``up(x) + skip``), stages of 3, 3, 2, 1 conv layers. Three 1×1×1 output
convs, each 2 classes (softmax): lesions at t1, lesions at t2, new lesions. Input ``[t1, t2, t2 − t1]``.
At ``w = 16`` the network has ≈9.48 M parameters (the paper's figure) and the heads add ≈7.2 K.

Heads (the library's), two kinds side by side:

- ``paper``: :class:`patchblend.heads.PatchHead` on the bottleneck (``16w`` channels, 1/16 of the
  patch), :class:`patchblend.heads.GridHead` on the last decoder feature (``w`` channels, full size);
- ``aware`` (``aware_heads=True``): :class:`patchblend.heads.AwarePatchHead` and
  :class:`patchblend.heads.AwareGridHead` on the new-lesion probability and the last decoder feature
  (inputs detached: they never change the network).

Patch sizes must be multiples of 16.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from patchblend.heads import AwareGridHead, AwarePatchHead, GridHead, PatchHead

__all__ = ["CIBVNet", "CIBOutput", "OUTPUT_T1", "OUTPUT_T2", "OUTPUT_NEW", "head_scores"]

#: Indices of the three outputs in ``CIBOutput.logits[:, k]``.
OUTPUT_T1, OUTPUT_T2, OUTPUT_NEW = 0, 1, 2


class CIBOutput(NamedTuple):
    """``logits [B, 3, 2, *P]`` (output k, class c), the paper heads' ``patch [B]`` and ``grid [B, *G]``
    scores in (0, 1); with aware heads also theirs (``aware_patch``, ``aware_grid``, read from the
    new-lesion output) and the last decoder feature ``feature [B, w, *P]``."""

    logits: torch.Tensor
    patch: torch.Tensor
    grid: torch.Tensor
    aware_patch: Optional[torch.Tensor] = None
    aware_grid: Optional[torch.Tensor] = None
    feature: Optional[torch.Tensor] = None

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

    def __init__(self, width: int = 16, in_channels: int = 3, grid: Sequence[int] = (2, 2, 2), dropout: float = 0.0,
                 aware_heads: bool = True):
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
        # created last, so that the network and the paper heads start from the same weights with or without them
        self.aware_heads = bool(aware_heads)
        if self.aware_heads:
            self.aware_patch_head = AwarePatchHead(w)
            self.aware_grid_head = AwareGridHead(w, grid=tuple(grid))

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

    def run(self, x: torch.Tensor):
        """``(logits [B, 3, 2, *P], bottleneck, last decoder feature)``: the network without heads."""
        bottleneck, last = self.features(x)
        d = self.dropout(last)
        return torch.stack([o(d) for o in self.out], dim=1), bottleneck, last

    def forward(self, x: torch.Tensor) -> CIBOutput:
        logits, bottleneck, last = self.run(x)
        aware_patch = aware_grid = None
        if self.aware_heads:
            prob = torch.softmax(logits[:, OUTPUT_NEW].float(), dim=1)[:, 1:2]
            aware_patch, aware_grid = self.aware_patch_head(prob, last), self.aware_grid_head(prob, last)
        return CIBOutput(logits, self.patch_head(bottleneck), self.grid_head(last), aware_patch, aware_grid, last)

    def head_parameters(self):
        """Parameters of the two paper heads."""
        return list(self.patch_head.parameters()) + list(self.grid_head.parameters())

    def aware_head_parameters(self):
        """Parameters of the two prediction-aware heads (empty without them)."""
        if not self.aware_heads:
            return []
        return list(self.aware_patch_head.parameters()) + list(self.aware_grid_head.parameters())


def head_scores(kind: str, patch_head: nn.Module, grid_head: nn.Module, prob: torch.Tensor,
                bottleneck: torch.Tensor, last: torch.Tensor, summaries: bool = False):
    """Scores ``(patch [B], grid [B, *G])`` of a head pair of ``kind`` (``"paper"`` or ``"aware"``) on one
    forward's pieces (``prob [B, 1, *P]`` the task probability); with ``summaries=True`` the heads'
    fixed parts instead (what :mod:`patchblend.calibration` caches)."""
    if kind == "paper":
        s = patch_head.summarize(bottleneck), grid_head.summarize(last)
    elif kind == "aware":
        s = patch_head.summarize(prob, last), grid_head.summarize(prob, last)
    else:
        raise ValueError(f"kind must be 'paper' or 'aware', got {kind!r}")
    return s if summaries else (patch_head.predict(s[0]), grid_head.predict(s[1]))
