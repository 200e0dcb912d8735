"""Lesion gating: keep or drop whole connected components by a confidence map.

Calibrated blending (Eq. 1/2) divides by the overlap count, so every voxel is pulled down by the
mean weight of its windows: a true lesion that shares a window or cell with a false positive is
lowered too. Gating decides per lesion instead: the prediction of plain (average) blending is cut
into connected components, and a component is kept when a statistic of the confidence map over it
(e.g. the blended confidence ``C = Σ α / N``, Eq. 2 applied to the weights alone) reaches ``τ``.
A component is kept or dropped whole: gating never changes a lesion's shape and never adds one.

- :func:`gate_lesions`: the gate (2D and 3D, batches, binary masks, probabilities and label maps
  with several classes), returning the kept prediction and one :class:`LesionComponent` row per
  component.
- :func:`choose_gate_threshold`: ``τ`` chosen on calibration cases: the largest candidate that keeps
  at least ``keep`` of the reference's detected lesions in at least ``coverage`` of the bootstrap
  resamples of the cases, with the bootstrap interval of the per-resample choice.

Connected components come from :mod:`scipy.ndimage`, imported on first use (the ``lesions`` extra:
``pip install "patchblend[lesions]"``); ``import patchblend`` does not import scipy. Tensors on a GPU
are copied to the CPU for the labelling and the result is copied back (the gate is cheap next to
inference: one labelling pass and a few bincounts per volume).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import torch

__all__ = ["STATISTICS", "LesionComponent", "LesionGate", "gate_lesions", "GateThreshold", "choose_gate_threshold"]

#: Statistics of the confidence over a component: its mean, its maximum, and its mean weighted by
#: the foreground probability (``Σ p·c / Σ p``; needs a probability as ``prediction``).
STATISTICS = ("mean", "max", "prob_mean")


class LesionComponent(NamedTuple):
    """One connected component of the prediction (a row of :attr:`LesionGate.components`)."""

    batch: tuple  #: index into the leading (batch) dimensions, ``()`` for a single volume
    label: int  #: its class: 1 for a mask or a probability, the class value for a label map
    id: int  #: its number in :attr:`LesionGate.components_map` (1, 2, ... within one batch item)
    size: int  #: voxels
    mean: float  #: mean confidence over it
    max: float  #: largest confidence in it
    prob_mean: float  #: probability-weighted mean confidence (``nan`` unless a probability was given)
    kept: bool  #: size ≥ ``min_size`` and the chosen statistic ≥ ``tau``


class LesionGate(NamedTuple):
    """What :func:`gate_lesions` returns."""

    mask: torch.Tensor  #: the kept prediction, shape of ``prediction`` (bool; a label map keeps its dtype)
    components: List[LesionComponent]  #: one row per component, in batch, then class, then id order
    components_map: torch.Tensor  #: ``int64``, shape of ``prediction``: each voxel's component id (0: background)


def _scipy_ndimage():
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("patchblend.gate_lesions needs scipy for connected components: "
                          "pip install 'patchblend[lesions]' (or scipy)") from None
    return ndimage


def _real(name: str, value, low: float = -math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or v < low:
        raise ValueError(f"{name} must be a number >= {low}, got {value!r}")
    return v


def gate_lesions(prediction: torch.Tensor, confidence: torch.Tensor, tau: float, *, threshold: float = 0.5,
                 statistic: str = "mean", connectivity: Optional[int] = None, min_size: int = 1,
                 spatial_dims: int = 3) -> LesionGate:
    """Keep the connected components of ``prediction`` whose confidence statistic reaches ``tau``.

    Args:
        prediction: ``[..., *S]`` with ``S`` the last ``spatial_dims`` dimensions (the leading ones are
            batch dimensions, each item gated on its own). A **bool** tensor is a mask; a **floating**
            tensor a foreground probability (foreground: ``p > threshold``); an **integer** tensor a
            label map (0 background), whose every foreground class is cut into components and gated
            on its own (a multi-class probability: pass its argmax).
        confidence: the confidence map, e.g. the blended ``C = Σ α / N``; real and finite, the shape of
            ``prediction`` or broadcastable to it (e.g. ``[*S]`` for a batch that shares it).
        tau: a component is kept when its ``statistic`` is ``>= tau`` (``-inf`` keeps every component
            of at least ``min_size`` voxels).
        threshold: foreground of a probability (ignored for masks and label maps).
        statistic: one of :data:`STATISTICS`; ``"prob_mean"`` needs a probability.
        connectivity: neighbours that join voxels, as :func:`scipy.ndimage.generate_binary_structure`'s
            rank: 1 (faces: 6 in 3D, 4 in 2D) up to ``spatial_dims`` (default: all, 26 in 3D, 8 in 2D).
        min_size: components with fewer voxels are dropped whatever their confidence.
        spatial_dims: 2 or 3.

    Returns:
        :class:`LesionGate` ``(mask, components, components_map)``: ``mask`` is bool (the kept
        foreground) for a mask or probability and the label map with the dropped components set to 0
        for a label map, on ``prediction``'s device. A probability's values are not returned: multiply
        it by ``mask`` to keep them. Tensors on another device go through the CPU.
    """
    if not isinstance(prediction, torch.Tensor):
        raise TypeError(f"prediction must be a torch.Tensor, got {type(prediction).__name__}")
    if not isinstance(confidence, torch.Tensor):
        raise TypeError(f"confidence must be a torch.Tensor, got {type(confidence).__name__}")
    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if prediction.dim() < spatial_dims:
        raise ValueError(f"prediction must have at least spatial_dims={spatial_dims} dimensions [..., *S], "
                         f"got shape {tuple(prediction.shape)}")
    if prediction.is_complex() or confidence.is_complex() or confidence.dtype == torch.bool:
        raise TypeError("prediction and confidence must be real (confidence a floating or integer tensor)")
    try:
        shape = torch.broadcast_shapes(confidence.shape, prediction.shape)
    except RuntimeError:
        shape = None
    if shape != prediction.shape:
        raise ValueError(f"confidence {tuple(confidence.shape)} must have the shape of prediction "
                         f"{tuple(prediction.shape)} or broadcast to it")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    is_prob = prediction.is_floating_point()
    if statistic == "prob_mean" and not is_prob:
        raise ValueError("statistic='prob_mean' needs a probability (a floating prediction), got "
                         f"a {prediction.dtype} tensor")
    tau = _real("tau", tau)
    threshold = _real("threshold", threshold)
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")
    if connectivity is None:
        connectivity = spatial_dims
    if isinstance(connectivity, bool) or connectivity not in range(1, spatial_dims + 1):
        raise ValueError(f"connectivity must be an int in 1..{spatial_dims} (spatial_dims), got {connectivity!r}")

    ndimage = _scipy_ndimage()
    structure = ndimage.generate_binary_structure(spatial_dims, connectivity)
    pred = prediction.detach().cpu()
    conf = confidence.detach().cpu().expand(prediction.shape).double().numpy()
    if not np.isfinite(conf).all():
        raise ValueError("confidence must be finite (it holds nan or inf)")
    if is_prob:
        prob = pred.double().numpy()
        if np.isnan(prob).any():
            raise ValueError("prediction (a probability) holds nan")
        fg = prob > threshold
        classes_of = None
    else:
        values = pred.numpy()
        fg = values != 0 if pred.dtype != torch.bool else values
        prob = None
        classes_of = values if pred.dtype != torch.bool else None

    lead = tuple(prediction.shape[:prediction.dim() - spatial_dims])
    keep = np.zeros(prediction.shape, dtype=bool)
    ids = np.zeros(prediction.shape, dtype=np.int64)
    rows: List[LesionComponent] = []
    for index in np.ndindex(*lead):
        item_fg = fg[index]
        if classes_of is None:
            classes = [1] if item_fg.any() else []
        else:
            classes = [int(c) for c in np.unique(classes_of[index][item_fg])]
        next_id = 0
        for cls in classes:
            region = item_fg if classes_of is None else classes_of[index] == cls
            labels, n = ndimage.label(region, structure=structure)
            if n == 0:
                continue
            flat = labels.ravel()
            c = conf[index].ravel()
            sizes = np.bincount(flat, minlength=n + 1)[1:]
            means = np.bincount(flat, weights=c, minlength=n + 1)[1:] / sizes
            maxima = np.asarray(ndimage.maximum(conf[index], labels, np.arange(1, n + 1)), dtype=np.float64)
            if prob is not None:
                p = prob[index].ravel()
                p_sum = np.bincount(flat, weights=p, minlength=n + 1)[1:]
                prob_means = np.bincount(flat, weights=p * c, minlength=n + 1)[1:] / p_sum
            else:
                prob_means = np.full(n, math.nan)
            stat = {"mean": means, "max": maxima, "prob_mean": prob_means}[statistic]
            kept = (sizes >= min_size) & (stat >= tau)
            lut = np.concatenate([[False], kept])
            keep[index] |= lut[labels]
            ids[index] = np.where(labels > 0, labels + next_id, ids[index])
            for k in range(n):
                rows.append(LesionComponent(tuple(int(i) for i in index), int(cls), next_id + k + 1, int(sizes[k]),
                                            float(means[k]), float(maxima[k]), float(prob_means[k]), bool(kept[k])))
            next_id += n
    if classes_of is None:
        out = torch.from_numpy(keep)
    else:
        out = torch.from_numpy(np.where(keep, classes_of, np.zeros((), classes_of.dtype)))
    return LesionGate(out.to(prediction.device), rows, torch.from_numpy(ids).to(prediction.device))


class GateThreshold(NamedTuple):
    """What :func:`choose_gate_threshold` returns."""

    tau: float  #: the chosen threshold
    low: float  #: lower end of the bootstrap interval of the per-resample choice
    high: float  #: upper end of that interval
    kept_fraction: float  #: detected lesions kept at ``tau`` on all cases (1.0 when the reference has none)
    coverage: float  #: fraction of the resamples in which ``tau`` keeps at least ``keep`` of the lesions


def choose_gate_threshold(candidates: Sequence[float], detected, reference, *, keep: float = 0.95,
                          coverage: float = 0.9, n_boot: int = 1000, interval: Sequence[float] = (0.05, 0.95),
                          seed: int = 0) -> GateThreshold:
    """The largest gate threshold that keeps the lesions in most bootstrap resamples of the cases.

    Args:
        candidates: ``[T]`` thresholds to choose from (e.g. a grid over ``[0, 1]``), any order.
        detected: ``[cases, T]`` lesions detected on each calibration case with the gate at each
            candidate (detection by your rule, e.g. MSSEG-2's).
        reference: ``[cases]`` lesions the ungated prediction (e.g. average blending) detects there.
        keep: the floor: detected ≥ ``keep`` · reference, summed over the (resampled) cases.
        coverage: ``tau`` is the largest candidate that meets the floor in at least this fraction of
            the ``n_boot`` resamples (cases drawn with replacement); the smallest candidate if none does.
        interval: quantiles of the per-resample choice (the largest candidate that meets the floor in
            that resample) reported as ``(low, high)``: how stable ``tau`` is.
        seed: of the resampling.

    Returns a :class:`GateThreshold`. Use calibration cases only, never the test cases.
    """
    cand = np.asarray(candidates, dtype=np.float64).reshape(-1)
    det = np.asarray(detected, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    if cand.size == 0 or not np.isfinite(cand).all():
        raise ValueError("candidates must be a non-empty sequence of finite numbers")
    if det.ndim != 2 or det.shape != (ref.size, cand.size):
        raise ValueError(f"detected must have shape [cases, candidates] = [{ref.size}, {cand.size}], "
                         f"got {tuple(det.shape)}")
    if ref.size == 0:
        raise ValueError("reference is empty: choosing tau needs calibration cases")
    if not (0 < keep <= 1):
        raise ValueError(f"keep must lie in (0, 1], got {keep!r}")
    if not (0 < coverage <= 1):
        raise ValueError(f"coverage must lie in (0, 1], got {coverage!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be an int >= 1, got {n_boot!r}")
    lo_q, hi_q = (float(q) for q in interval)
    if not (0 <= lo_q <= hi_q <= 1):
        raise ValueError(f"interval must be two quantiles 0 <= low <= high <= 1, got {tuple(interval)!r}")
    order = np.argsort(cand, kind="stable")
    cand, det = cand[order], det[:, order]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, ref.size, size=(n_boot, ref.size))
    det_b = det[draws].sum(1)  # [n_boot, T]
    ref_b = ref[draws].sum(1)  # [n_boot]
    ok = det_b >= keep * ref_b[:, None] - 1e-9  # a resample without reference lesions meets any floor
    share = ok.mean(0)
    meets = np.nonzero(share >= coverage)[0]
    t = int(meets.max()) if meets.size else 0
    per_resample = np.array([cand[np.nonzero(row)[0].max()] if row.any() else cand[0] for row in ok])
    kept_fraction = float(det[:, t].sum() / ref.sum()) if ref.sum() > 0 else 1.0
    return GateThreshold(float(cand[t]), float(np.quantile(per_resample, lo_q)),
                         float(np.quantile(per_resample, hi_q)), kept_fraction, float(share[t]))
