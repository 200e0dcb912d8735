"""The sliding-window drivers' blending options, checked and normalised in one place (used by the in-memory
driver and by :mod:`patchblend.distributed`)."""
from __future__ import annotations

from typing import Optional, Tuple

from .._validate import NORMALIZE_MODES
from ._predictions import WEIGHTINGS
from .confidence import check_confidence_options
from .blender import REDUCTIONS
from .windows import WINDOW_STYLES

__all__ = ["PAD_MODES", "check_blend_options"]

#: ``padding_mode`` values (MONAI's, for windows larger than the image)
PAD_MODES = ("constant", "reflect", "replicate", "circular")


def check_blend_options(padding_mode, weighting: Optional[str], normalize: Optional[str], placement: str,
                        reduce: Optional[str], confidence: bool = False, weigh_prediction: bool = True
                        ) -> Tuple[str, str]:
    """Raise ``ValueError`` (``TypeError``) naming the first option out of range; return ``(padding_mode,
    normalize)`` resolved (an enum's value; ``normalize=None`` is ``"weight"`` when the prediction is unweighted,
    i.e. without ``weighting`` or with ``weigh_prediction=False``, and ``"count"`` when it is weighted)."""
    padding_mode = getattr(padding_mode, "value", padding_mode)
    if padding_mode not in PAD_MODES:
        raise ValueError(f"padding_mode must be one of {PAD_MODES}, got {padding_mode!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    check_confidence_options(confidence, weigh_prediction, normalize, weighting)
    if normalize is None:
        normalize = "weight" if weighting is None or not weigh_prediction else "count"
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if placement not in WINDOW_STYLES:
        raise ValueError(f"placement must be one of {WINDOW_STYLES}, got {placement!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    return padding_mode, normalize
