"""The sliding-window drivers' blending options, checked and normalised in one place (used by the in-memory
driver and by :mod:`patchblend.distributed`)."""
from __future__ import annotations

from typing import Optional, Tuple

from ._predictions import WEIGHTINGS
from .blender import REDUCTIONS
from .windows import WINDOW_STYLES

__all__ = ["PAD_MODES", "check_blend_options"]

#: ``padding_mode`` values (MONAI's, for windows larger than the image)
PAD_MODES = ("constant", "reflect", "replicate", "circular")


def check_blend_options(padding_mode, weighting: Optional[str], normalize: Optional[str], placement: str,
                        reduce: Optional[str]) -> Tuple[str, str]:
    """Raise ``ValueError`` naming the first option out of range; return ``(padding_mode, normalize)`` resolved
    (an enum's value; ``normalize=None`` is ``"weight"`` without ``weighting``, ``"count"`` with it)."""
    padding_mode = getattr(padding_mode, "value", padding_mode)
    if padding_mode not in PAD_MODES:
        raise ValueError(f"padding_mode must be one of {PAD_MODES}, got {padding_mode!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if normalize is None:
        normalize = "weight" if weighting is None else "count"
    if normalize not in ("count", "weight", "none"):
        raise ValueError(f"normalize must be 'count', 'weight' or 'none', got {normalize!r}")
    if placement not in WINDOW_STYLES:
        raise ValueError(f"placement must be one of {WINDOW_STYLES}, got {placement!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    return padding_mode, normalize
