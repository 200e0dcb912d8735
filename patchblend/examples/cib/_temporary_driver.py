"""TEMPORARY stand-in for ``patchblend.inference.sliding_window_inference`` (issue 3), used only while
that driver has not landed on main. Remove this file once it has: :mod:`.evaluate` imports the
library's driver first and falls back to this one only on ``ImportError``.

Minimal on purpose: MONAI window placement, constant or MONAI-Gaussian importance, the predictor may
return ``seg`` or ``(seg, patch [B], grid [B, *G])``; blending by :func:`patchblend.calibrated_blend`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from patchblend import calibrated_blend


def _starts(size: int, roi: int, overlap: float):
    step = max(int(roi * (1 - overlap)), 1)
    n = math.ceil((size - roi) / step) + 1 if size > roi else 1
    return sorted({min(i * step, max(size - roi, 0)) for i in range(n)})


def _gaussian(roi, sigma_scale: float, device) -> torch.Tensor:
    imp = None
    for r in roi:
        x = torch.arange(r, dtype=torch.float32, device=device) - (r - 1) / 2
        g = torch.exp(-(x ** 2) / (2 * (sigma_scale * r) ** 2))
        imp = g if imp is None else imp[..., None] * g
    imp = imp / imp.max()
    return imp.clamp_min(max(float(imp[imp > 0].min()), 1e-3))


def sliding_window_inference(inputs, roi_size, sw_batch_size, predictor, overlap=0.25, mode="constant",
                             sigma_scale=0.125, *, weighting=None, normalize=None):
    """``inputs [B, C, D, H, W]`` → ``[B, C_out, D, H, W]`` (see the module docstring)."""
    roi = [int(r) for r in roi_size]
    spatial = list(inputs.shape[2:])
    pad = [max(r - s, 0) for r, s in zip(roi, spatial)]
    x = F.pad(inputs, [v for p in reversed(pad) for v in (0, p)]) if any(pad) else inputs
    size = list(x.shape[2:])
    grids = [_starts(s, r, overlap) for s, r in zip(size, roi)]
    coords = torch.cartesian_prod(*[torch.tensor(g) for g in grids]).reshape(-1, 3)
    importance = _gaussian(roi, sigma_scale, x.device) if mode == "gaussian" else None
    norm = normalize or ("weight" if weighting is None else "count")
    outs = []
    for b in range(x.shape[0]):
        segs, patch_w, grid_w = [], [], []
        for i in range(0, len(coords), sw_batch_size):
            c = coords[i:i + sw_batch_size]
            win = torch.stack([x[b, :, s0:s0 + roi[0], s1:s1 + roi[1], s2:s2 + roi[2]] for s0, s1, s2 in c.tolist()])
            out = predictor(win)
            if isinstance(out, (tuple, list)):
                segs.append(out[0].float())
                patch_w.append(out[1].float())
                grid_w.append(out[2].float())
            else:
                segs.append(out.float())
        seg = torch.cat(segs)
        w = None
        if weighting == "patch":
            w = torch.cat(patch_w)
        elif weighting == "grid":
            w = torch.cat(grid_w)
        elif weighting == "patch*grid":
            g = torch.cat(grid_w)
            w = g * torch.cat(patch_w).reshape(-1, *([1] * (g.dim() - 1)))
        out = calibrated_blend(seg, w, coords.to(seg.device), size, normalize=norm, importance=importance)
        outs.append(out[:, :spatial[0], :spatial[1], :spatial[2]])
    return torch.stack(outs)
