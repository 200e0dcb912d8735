"""The blended confidence map: the window weights blended like the predictions, in the same pass.

For window ``i`` with weight ``α_i(x)`` at voxel ``x`` (its patch score, its grid cell's score or their product)
and ``N(x)`` windows covering ``x``:

- ``normalize="count"``: ``C(x) = Σ_i α_i(x) / N(x)`` (the paper's Eq. 2 applied to the weights alone);
- ``normalize="weight"``: ``C(x) = Σ_i α_i(x) imp_i(x) / Σ_i imp_i(x)`` (the importance-weighted mean weight;
  without an importance map, ``imp = 1``, it is the same ``Σ α / N``),

0 where no window covers ``x``. Both are one blend: the patches ``A_i = α_i`` (each window's weight spread over its
voxels) blended without weights, with the importance only under ``"weight"``::

    C = calibrated_blend(A, None, coords, normalize=normalize, importance=importance if "weight" else None)

:class:`ConfidenceTerms` states that blend's settings (its normalisation and importance) once, and turns a batch's
weights into its input for the accumulators that blend it batch by batch (the blenders' ``confidence=True``, the
Dask blocks, the driver's slab and autograd paths): under ``"count"`` patches of ones with the weights as the
blend's weights (``α · 1 = 1 · α`` exactly: the same terms, and nothing the size of the windows is made per batch);
under ``"weight"`` the weights spread over the voxels (the weight sum must not include them). The driver's usual
path keeps only the weights and makes the same sums at the end with the ``coverage`` op
(:class:`~patchblend.inference._accumulators.CoverageConfidence`). Either way, bitwise the blend above where the
prediction is bitwise ``calibrated_blend``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from .._reference import expand_grid_weights
from .._validate import prepare_weights_and_max

__all__ = ["PredictionWithConfidence", "ConfidenceTerms", "check_confidence_options", "CONFIDENCE_NORMALIZE"]

#: the ``normalize`` modes the confidence is defined for (``"none"``, a weighted sum, has no mean weight)
CONFIDENCE_NORMALIZE = ("count", "weight")


class PredictionWithConfidence(NamedTuple):
    """A prediction and its blended confidence map (what ``confidence=True`` returns).

    Attributes:
        prediction: what the call returns without ``confidence`` (a tensor, tuple or dict; labels or masks with
            ``reduce``).
        confidence: ``[B, 1, *S]`` (the drivers; ``[1, *S]`` from a blender): the blended weights ``C``, floats
            also when the prediction is reduced.
    """

    prediction: object
    confidence: torch.Tensor


def check_confidence_options(confidence, weigh_prediction, normalize: Optional[str], weighting="unused") -> None:
    """Raise ``TypeError`` / ``ValueError`` naming the argument: ``confidence`` and ``weigh_prediction`` are bools,
    ``weigh_prediction=False`` only with ``confidence=True``, ``confidence`` only with ``normalize`` "count" or
    "weight" and (for the drivers, which pass ``weighting``) with a ``weighting``."""
    for name, value in (("confidence", confidence), ("weigh_prediction", weigh_prediction)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if not weigh_prediction and not confidence:
        raise ValueError("weigh_prediction=False needs confidence=True (the weights then go only into the "
                         "confidence map; without it nothing would use them)")
    if not confidence:
        return
    if weighting is None:
        raise ValueError("confidence=True needs weighting ('patch', 'grid' or 'patch*grid'): the confidence map is "
                         "the blend of those window scores")
    if normalize is not None and normalize not in CONFIDENCE_NORMALIZE:
        raise ValueError(f"confidence=True needs normalize 'count' (C = sum of weights / window count) or 'weight' "
                         f"(the importance-weighted mean weight), got normalize={normalize!r}")


class ConfidenceTerms:
    """What a batch of window weights adds to the confidence blend (see the module docstring), in the accumulation
    ``dtype``: the blend's input per batch (``terms(weights, n, window_shape, device)``) and its settings,
    :attr:`normalize` and :attr:`importance`, for the one-channel accumulator that receives it.

    Args:
        normalize: ``"count"`` or ``"weight"``, the prediction's.
        dtype: the accumulation dtype (float32 or float64).
        importance: the prediction's window importance ``[*P]`` or None (constant).

    Without an importance map ``"weight"``'s ``Σ α·1 / Σ 1`` is ``"count"``'s ``Σ α / N`` (bitwise: the same terms in
    the same order, an integer denominator), so it is blended as ``"count"`` (:attr:`normalize`), which needs no
    weights spread over the windows.
    """

    def __init__(self, normalize: str, dtype: torch.dtype, importance: Optional[torch.Tensor] = None):
        if normalize not in CONFIDENCE_NORMALIZE:
            raise ValueError(f"the confidence map needs normalize in {CONFIDENCE_NORMALIZE}, got {normalize!r}")
        #: the confidence blend's normalisation: "weight" only with an importance map
        self.normalize = "weight" if normalize == "weight" and importance is not None else "count"
        #: the confidence blend's importance: the prediction's under "weight", none under "count"
        self.importance = importance if self.normalize == "weight" else None
        self.dtype = dtype
        # ones read by the kernels under "count": half for float32 accumulation (converted exactly, half the bytes)
        self.ones_dtype = torch.float16 if dtype == torch.float32 else dtype
        self._ones: Optional[torch.Tensor] = None
        self._ones_device: Optional[torch.device] = None

    def ones(self, n: int, window_shape: Sequence[int], device) -> torch.Tensor:
        """``[n, 1, *window_shape]`` ones (one cached buffer, grown as needed; never written)."""
        shape, device = (1, *window_shape), torch.device(device)
        o = self._ones
        # (keyed by the device as asked, so that "cuda" and the tensor's "cuda:0" do not remake it every batch)
        if o is None or o.shape[0] < n or tuple(o.shape[1:]) != shape or device != self._ones_device:
            self._ones = o = torch.ones((max(n, 1), *shape), dtype=self.ones_dtype, device=device)
            self._ones_device = device
        return o[:n]

    def __call__(self, weights: Optional[torch.Tensor], n: int, window_shape: Sequence[int], device,
                 check_values: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(patches [n, 1, *window_shape], weights or None)`` for the confidence blend of ``n`` windows with
        ``weights`` (None: every weight 1, so ``C`` is 1 wherever a window covers).

        Under ``"count"``: ones, and ``weights`` as given (the accumulator checks them). Under ``"weight"``: the
        weights spread over the voxels (checked here when ``check_values``: finite, ``>= 0``, and their shape)."""
        window_shape = tuple(int(p) for p in window_shape)
        if self.normalize == "count" or weights is None:
            return self.ones(n, window_shape, device), weights
        nd = len(window_shape)
        w, _ = prepare_weights_and_max(weights, n, window_shape, self.dtype, torch.device(device), check_values)
        cells = w.reshape(n, *([1] * nd)) if weights.dim() == 1 else w.reshape(weights.shape)
        grid = cells.shape[1:]
        if all(p % g == 0 for p, g in zip(window_shape, grid)):
            # equal cells (voxel k of an axis lies in cell k * g // P = k // (P / g)): one broadcast copy
            blocks = [d for g, p in zip(grid, window_shape) for d in (g, p // g)]
            a = cells.reshape(n, *[d for g in grid for d in (g, 1)]).expand(n, *blocks).reshape(n, 1, *window_shape)
        else:  # unequal cells: the reference's expansion
            a = expand_grid_weights(cells, window_shape).unsqueeze(1)
        return a.contiguous(), None
