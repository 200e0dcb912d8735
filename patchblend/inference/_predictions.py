"""The predictor's output as the sliding-window driver reads it: one or several predictions and their weights.

A predictor returns what MONAI's ``sliding_window_inference`` accepts (a tensor, a tuple or list of tensors, or a
dict of tensors, each ``[n, C_k, *roi_k]`` with its own channels and resolution), or a
:class:`patchblend.CalibratedOutput` ``(seg, patch, grid)`` whose ``seg`` is any of those and whose scores weight
every output alike. A plain tuple, list or dict is always MONAI's multi-output form, never CIB scores.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._reference import expand_grid_weights
from .._validate import check_finite_nonnegative, check_sum_fits, finite_nonnegative
from ..wrapper import CalibratedOutput

__all__ = ["Prediction", "parse_output", "pack_outputs", "ScoreChecks", "apply_process_fn", "WEIGHTINGS"]

WEIGHTINGS = (None, "patch", "grid", "patch*grid")


class Prediction(NamedTuple):
    """One predictor call, flattened: ``segs[k]`` is output ``k`` ``[n, C_k, *roi_k]``; ``keys`` the sorted dict
    keys (None for a tensor, tuple or list); ``single`` whether MONAI unpacks the result to one tensor;
    ``weights`` the calibrated weights (``[n]`` or ``[n, *G]``, or None) and ``voxel_weights`` the per-output
    per-voxel weights ``[n, *roi_k]`` that a ``process_fn`` returned (None without one)."""

    segs: Tuple[torch.Tensor, ...]
    keys: Optional[list]
    single: bool
    weights: Optional[torch.Tensor]
    voxel_weights: Optional[Tuple[torch.Tensor, ...]] = None


def flatten_outputs(out: Any, what: str = "predictor output") -> Tuple[Optional[list], Tuple[Any, ...], bool]:
    """MONAI's flattening: a tensor → ``(None, (t,), True)``; a dict → its values in sorted key order; a tuple
    or list → its items (a one-item sequence is unpacked to a tensor at the end, as MONAI does)."""
    if isinstance(out, torch.Tensor):
        return None, (out,), True
    if isinstance(out, Mapping):
        keys = sorted(out.keys())
        if not keys:
            raise ValueError(f"{what} is an empty dict")
        return keys, tuple(out[k] for k in keys), False
    if isinstance(out, (tuple, list)):
        if len(out) == 0:
            raise ValueError(f"{what} is an empty {type(out).__name__}")
        return None, tuple(out), len(out) == 1
    raise TypeError(f"{what} must be a tensor, a tuple/list/dict of tensors or a patchblend.CalibratedOutput, "
                    f"got {type(out).__name__}")


def pack_outputs(results: Sequence[Any], keys: Optional[list], single: bool):
    """The blended outputs in the predictor's form: a dict with the same keys, one tensor, or a tuple."""
    if keys is not None:
        return dict(zip(keys, results))
    if single:
        return results[0]
    return tuple(results)


def check_segs(segs: Sequence[Any], n: int, nd: int, what: str = "predictor output") -> None:
    """Every output a floating-point ``[n, C_k, *roi_k]`` tensor with ``nd`` spatial axes (non-empty)."""
    for k, seg in enumerate(segs):
        if isinstance(seg, torch.Tensor) and seg.dtype.is_floating_point and seg.dim() == nd + 2 \
                and seg.shape[0] == n and 0 not in seg.shape:
            continue  # (the per-batch path: a few attribute reads)
        name = what if len(segs) == 1 else f"{what} {k}"
        if not isinstance(seg, torch.Tensor) or not seg.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {type(seg).__name__}"
                            + (f" {seg.dtype}" if isinstance(seg, torch.Tensor) else ""))
        raise ValueError(f"{name} must be [{n}, C, {', '.join(['spatial'] * nd)}] for a batch of {n} windows, "
                         f"got {tuple(seg.shape)}")


class ScoreChecks:
    """Checks that scores are finite and >= 0: at once on the CPU; on a GPU, one flag per name stays on the
    device and :meth:`raise_if_bad` reads it once at the end (no synchronisation per batch)."""

    def __init__(self, acc: torch.dtype = torch.float32, importance_max: float = 1.0):
        self.flags = {}
        self.acc, self.importance_max = acc, importance_max
        self.sum_bound = 0.0  # terms x largest weight x largest importance so far (a tensor on a GPU)

    def __call__(self, name: str, scores: torch.Tensor) -> None:
        if scores.device.type == "cpu":
            check_finite_nonnegative(name, scores)
            return
        ok = finite_nonnegative(scores)
        self.flags[name] = ok if name not in self.flags else self.flags[name] & ok

    def add_to_sum(self, weights: Optional[torch.Tensor], n: int) -> None:
        """Count ``n`` windows with ``weights`` (already checked; None: weight 1) into the bound on any voxel's
        weight sum, which must stay finite in the accumulation dtype (else inf, or NaN as inf / inf)."""
        if weights is None:
            self.sum_bound = self.sum_bound + n * self.importance_max
        elif weights.device.type == "cpu":
            self.sum_bound = self.sum_bound + n * float(weights.amax()) * self.importance_max
        else:  # stays on the device; read once at the end
            self.sum_bound = self.sum_bound + weights.detach().amax().double() * (n * self.importance_max)
        if isinstance(self.sum_bound, float):
            check_sum_fits("window weights (scores x importance map)", self.sum_bound, self.acc)

    def raise_if_bad(self) -> None:
        for name, ok in self.flags.items():
            if not bool(ok):
                raise ValueError(f"{name} must be finite and >= 0 (a predictor call returned NaN, inf or a "
                                 "negative value)")
        check_sum_fits("window weights (scores x importance map)", float(self.sum_bound), self.acc)


def _scores(patch, grid, n: int, nd: int, segs, weighting, check, acc: torch.dtype) -> Optional[torch.Tensor]:
    """The calibrated weights ``weighting`` asks for: patch ``[n]``, grid ``[n, *G]`` or their product (formed in
    the accumulation dtype ``acc`` or wider)."""
    uses_patch = weighting in ("patch", "patch*grid")
    uses_grid = weighting in ("grid", "patch*grid")
    if uses_patch:
        if patch is None:
            raise ValueError(f"weighting={weighting!r} needs patch scores: return "
                             "patchblend.CalibratedOutput(seg, patch, grid) with patch [B]")
        if not isinstance(patch, torch.Tensor) or not patch.dtype.is_floating_point:
            raise TypeError("patch_scores must be a floating-point tensor [B]")
        if patch.dim() == 2 and patch.shape[1] == 1:
            patch = patch[:, 0]
        if tuple(patch.shape) != (n,):
            raise ValueError(f"patch_scores must have shape [{n}] (one per window), got {tuple(patch.shape)}")
        check("patch_scores", patch)
    if uses_grid:
        roi = [min(s.shape[2 + a] for s in segs) for a in range(nd)]  # the smallest output's window
        if grid is None:
            raise ValueError(f"weighting={weighting!r} needs grid scores: return "
                             "patchblend.CalibratedOutput(seg, patch, grid) with grid [B, *G]")
        if not isinstance(grid, torch.Tensor) or not grid.dtype.is_floating_point:
            raise TypeError(f"grid_scores must be a floating-point tensor [B, *G] with {nd} grid dims")
        if grid.dim() != nd + 1 or grid.shape[0] != n or any(g < 1 or g > p for g, p in zip(grid.shape[1:], roi)):
            raise ValueError(f"grid_scores must have shape [{n}, *G] with {nd} grid dims, 1 <= G <= roi "
                             f"{tuple(roi)} (of every output), got {tuple(grid.shape)}")
        check("grid_scores", grid)
    if not uses_patch:
        return grid if uses_grid else None
    if not uses_grid:
        return patch
    # the product in at least the accumulation dtype (half scores would underflow or overflow in it; float32 scores
    # multiplied in float32 for a float64 accumulation would be rounded once more), checked again: each factor is
    # finite, their product may not be
    dt = torch.promote_types(torch.promote_types(patch.dtype, grid.dtype), acc)
    w = patch.reshape(-1, *([1] * nd)).to(dt) * grid.to(dt)
    check("patch_scores * grid_scores", w)
    return w


def parse_output(out: Any, n: int, nd: int, weighting, check: Callable = check_finite_nonnegative,
                 acc: torch.dtype = torch.float32) -> Prediction:
    """Predictor output → :class:`Prediction`. ``check(name, scores)`` checks the values of the scores in use
    (finite, >= 0); ``acc`` is the accumulation dtype (``patch * grid`` is formed in it, or wider). With
    ``weighting`` set the output must be a :class:`~patchblend.CalibratedOutput`."""
    if type(out) is torch.Tensor and weighting is None:  # the common case, a few attribute reads per batch
        check_segs((out,), n, nd)
        return Prediction((out,), None, True, None)
    patch = grid = None
    if isinstance(out, CalibratedOutput):
        seg_out, patch, grid = out.seg, out.patch, out.grid
    else:
        if weighting is not None:
            raise ValueError(
                f"weighting={weighting!r} needs the predictor to return patchblend.CalibratedOutput(seg, patch, "
                f"grid) (what CalibratedModel returns); it returned a {type(out).__name__}, which is never read as "
                "scores (a plain tuple, list or dict is MONAI's multi-output form)")
        seg_out = out
    what = "predictor output seg" if isinstance(out, CalibratedOutput) else "predictor output"
    keys, segs, single = flatten_outputs(seg_out, what)
    check_segs(segs, n, nd, what)
    weights = _scores(patch, grid, n, nd, segs, weighting, check, acc) if weighting is not None else None
    return Prediction(segs, keys, single, weights)


def apply_process_fn(process_fn: Callable, pred: Prediction, windows: torch.Tensor, importance: torch.Tensor,
                     roi, check: Callable) -> Prediction:
    """MONAI's ``process_fn(seg_tuple, windows, importance [*roi]) -> (seg_tuple, weight_map)``: the outputs it
    returns replace the predictor's, and its weight map (``[*roi]``, ``[1, 1, *roi]`` or per window
    ``[n, 1, *roi]``; resized to each output's resolution with nearest-exact interpolation, as MONAI does) replaces
    the importance map for this batch's windows."""
    n, nd = windows.shape[0], len(roi)
    result = process_fn(pred.segs, windows, importance)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise TypeError("process_fn must return (outputs, weight_map), as MONAI's does")
    segs, w_t = result
    segs = (segs,) if isinstance(segs, torch.Tensor) else tuple(segs)
    if len(segs) != len(pred.segs):
        raise ValueError(f"process_fn returned {len(segs)} outputs for the predictor's {len(pred.segs)}")
    check_segs(segs, n, nd, "process_fn output")
    if not isinstance(w_t, torch.Tensor) or not w_t.dtype.is_floating_point:
        raise TypeError(f"process_fn's weight map must be a floating-point tensor, got {type(w_t).__name__}")
    if w_t.dim() == nd:
        w_t = w_t[None, None]
    if w_t.dim() != nd + 2 or w_t.shape[0] not in (1, n) or w_t.shape[1] != 1 or tuple(w_t.shape[2:]) != tuple(roi):
        raise ValueError(f"process_fn's weight map must be [*roi], [1, 1, *roi] or [{n}, 1, *roi] with roi "
                         f"{tuple(roi)}, got {tuple(w_t.shape)}")
    w_t = w_t.float() if w_t.dtype in (torch.float16, torch.bfloat16) else w_t
    check("process_fn weight map", w_t)
    voxel = []
    for seg in segs:
        shape = tuple(seg.shape[2:])
        w = w_t if shape == tuple(roi) else F.interpolate(w_t, shape, mode="nearest-exact")
        w = w[:, 0].expand(n, *shape)
        if pred.weights is not None:  # calibrated weights multiply in, cell by cell
            cw = pred.weights
            cw = cw.reshape(n, *([1] * nd)) if cw.dim() == 1 else expand_grid_weights(cw, shape)
            dt = torch.promote_types(cw.dtype, w.dtype)
            w = cw.to(device=w.device, dtype=dt) * w.to(dt)
            check("process_fn weight map * scores", w)
        voxel.append(w)
    return Prediction(segs, pred.keys, pred.single, None, tuple(voxel))
