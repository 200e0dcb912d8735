"""MSSEG-2 evaluation metrics (docs/design.md#evaluation), in voxel units.

All functions take binary 3D masks (numpy arrays, any dtype; non-zero is foreground) of equal shape.
:func:`evaluate_case` applies the challenge's conventions in one call: threshold the probability at
0.5, remove connected components (26-connectivity) smaller than 11 voxels from prediction *and*
ground truth, then compute

- ``dice``, ``jaccard`` (overlap; both masks empty scores 1),
- ``hd95`` (95th percentile of the symmetric surface distances, as ``medpy.metric.hd95``) and
  ``asd`` (mean distance from the predicted surface to the ground-truth surface, as
  ``medpy.metric.asd``, which the CoactSeg code reports); both 0 when both masks are empty and
  ``nan`` (undefined, left out of averages) when exactly one is empty,
- lesion-wise ``sensitivity``, ``precision``, ``f1`` and ``fdr`` with the MSSEG-2 detection rule
  (:func:`lesion_detection`).

Conventions for empty cases (they must not crash): no ground-truth lesion and no predicted lesion
gives F1 = 1 and FDR = 0; lesions on one side only give F1 = 0; FDR is 0 when nothing is predicted.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import numpy as np
from scipy import ndimage

__all__ = [
    "STRUCTURE_26",
    "label_components",
    "remove_small_components",
    "dice",
    "jaccard",
    "surface_distances",
    "hd95",
    "asd",
    "lesion_detection",
    "lesion_f1",
    "evaluate_case",
    "METRIC_NAMES",
]

#: 3×3×3 structuring element: 26-connectivity.
STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)

#: Metric keys of :func:`evaluate_case`, in table order.
METRIC_NAMES = ("dice", "jaccard", "hd95", "asd", "f1", "fdr")


def _as_mask(mask, name: str) -> np.ndarray:
    a = np.asarray(mask)
    if a.ndim != 3:
        raise ValueError(f"{name} must be a 3D mask [D, H, W], got shape {a.shape}")
    return a != 0


def _pair(pred, gt) -> Tuple[np.ndarray, np.ndarray]:
    p, g = _as_mask(pred, "pred"), _as_mask(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} must have the same shape")
    return p, g


def label_components(mask) -> Tuple[np.ndarray, int]:
    """Connected components of a 3D mask with 26-connectivity: ``(labels [D, H, W] int32, count)``."""
    labels, n = ndimage.label(_as_mask(mask, "mask"), structure=STRUCTURE_26)
    return labels.astype(np.int32, copy=False), int(n)


def remove_small_components(mask, min_size: int = 11) -> np.ndarray:
    """``mask [D, H, W]`` without the 26-connected components of fewer than ``min_size`` voxels (bool)."""
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    m = _as_mask(mask, "mask")
    if min_size <= 1 or not m.any():
        return m.copy()
    labels, n = label_components(m)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def dice(pred, gt) -> float:
    """``2|P∩G| / (|P|+|G|)``; 1.0 when both are empty."""
    p, g = _pair(pred, gt)
    total = int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(p, g).sum()) / total


def jaccard(pred, gt) -> float:
    """``|P∩G| / |P∪G|``; 1.0 when both are empty."""
    p, g = _pair(pred, gt)
    union = int(np.logical_or(p, g).sum())
    return 1.0 if union == 0 else int(np.logical_and(p, g).sum()) / union


def _surface(mask: np.ndarray) -> np.ndarray:
    # Border voxels: the mask minus its erosion with the 6-neighbourhood (medpy's convention).
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), iterations=1)
    return mask & ~eroded


def surface_distances(a, b) -> np.ndarray:
    """Distance (voxels) from every surface voxel of ``a`` to the nearest surface voxel of ``b``: ``[n_a]``.

    Both masks must be non-empty (``ValueError`` naming the empty one otherwise)."""
    a, b = _as_mask(a, "a"), _as_mask(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a {a.shape} and b {b.shape} must have the same shape")
    if not a.any():
        raise ValueError("a is empty: surface distances are undefined")
    if not b.any():
        raise ValueError("b is empty: surface distances are undefined")
    # Work in the bounding box of both masks plus one voxel (clipped to the volume): every surface
    # voxel lies inside it and a mask touches the box's border only where it touches the volume's, so
    # surfaces and distances are those of the whole volume, for a fraction of the cost.
    idx = np.argwhere(a | b)
    box = tuple(slice(max(int(lo) - 1, 0), min(int(hi) + 2, n)) for lo, hi, n in zip(idx.min(0), idx.max(0), a.shape))
    a, b = a[box], b[box]
    dist_to_b = ndimage.distance_transform_edt(~_surface(b))
    return dist_to_b[_surface(a)]


def hd95(pred, gt) -> float:
    """95th percentile of the symmetric surface distances (voxels); 0 when both are empty, ``nan``
    when exactly one is."""
    p, g = _pair(pred, gt)
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return math.nan
    return float(np.percentile(np.hstack((surface_distances(p, g), surface_distances(g, p))), 95))


def asd(pred, gt) -> float:
    """Average distance from the predicted surface to the ground-truth surface (voxels); 0 when both
    are empty, ``nan`` when exactly one is."""
    p, g = _pair(pred, gt)
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return math.nan
    return float(surface_distances(p, g).mean())


def _detected(ref_labels: np.ndarray, n_ref: int, other_labels: np.ndarray, other_mask_ref: np.ndarray,
              alpha: float, beta: float, gamma: float) -> np.ndarray:
    """For each component of the reference (1..n_ref): is it detected by the other segmentation?

    ``other_mask_ref`` is the reference mask (to measure how much of an "other" component lies outside it).
    """
    result = np.zeros(n_ref, dtype=bool)
    if n_ref == 0:
        return result
    n_other = int(other_labels.max())
    if n_other == 0:
        return result
    ref_sizes = np.bincount(ref_labels.ravel(), minlength=n_ref + 1)
    other_sizes = np.bincount(other_labels.ravel(), minlength=n_other + 1)
    # Voxels of each "other" component that lie outside the reference mask.
    other_outside = np.bincount(other_labels[~other_mask_ref].ravel(), minlength=n_other + 1)
    both = (ref_labels > 0) & (other_labels > 0)
    pairs = ref_labels[both].astype(np.int64) * (n_other + 1) + other_labels[both]
    ids, counts = np.unique(pairs, return_counts=True)
    ref_ids, oth_ids = ids // (n_other + 1), ids % (n_other + 1)
    for r in range(1, n_ref + 1):
        sel = ref_ids == r
        if not sel.any():
            continue
        overlaps, others = counts[sel], oth_ids[sel]
        covered = int(overlaps.sum())
        if covered <= alpha * ref_sizes[r]:
            continue
        order = np.argsort(-overlaps, kind="stable")
        ok, cum = True, 0
        for k in order:
            j = others[k]
            if other_outside[j] > beta * other_sizes[j]:
                ok = False
                break
            cum += int(overlaps[k])
            if cum >= gamma * covered:
                break
        result[r - 1] = ok
    return result


def lesion_detection(pred, gt, alpha: float = 0.1, beta: float = 0.7, gamma: float = 0.65) -> Dict[str, int]:
    """Lesion-wise detection counts with the MSSEG-2 rule (Commowick et al. 2018), 26-connectivity.

    A ground-truth lesion is *detected* when more than ``alpha`` (10%) of its voxels are covered by
    predicted lesions and the predicted lesions that cover it, taken by decreasing overlap until they
    account for ``gamma`` (65%) of the covered voxels, each have at most ``beta`` (70%) of their
    voxels outside the ground truth. The same rule with the roles swapped decides which predicted
    lesions are true positives.

    Returns ``{"gt_lesions", "pred_lesions", "detected", "true_pred"}``. No component filtering here
    (see :func:`evaluate_case`).
    """
    p, g = _pair(pred, gt)
    gl, ng = label_components(g)
    pl, np_ = label_components(p)
    detected = _detected(gl, ng, pl, g, alpha, beta, gamma)
    true_pred = _detected(pl, np_, gl, p, alpha, beta, gamma)
    return {"gt_lesions": ng, "pred_lesions": np_, "detected": int(detected.sum()), "true_pred": int(true_pred.sum())}


def lesion_f1(counts: Dict[str, int]) -> Dict[str, float]:
    """Sensitivity, precision, F1 and FDR from :func:`lesion_detection` counts (empty-case conventions
    in the module docstring)."""
    ng, np_ = counts["gt_lesions"], counts["pred_lesions"]
    if ng == 0 and np_ == 0:
        return {"sensitivity": 1.0, "precision": 1.0, "f1": 1.0, "fdr": 0.0}
    sens = counts["detected"] / ng if ng else 0.0
    prec = counts["true_pred"] / np_ if np_ else 0.0
    f1 = 0.0 if sens == 0 or prec == 0 else 2 * sens * prec / (sens + prec)
    fdr = 1.0 - prec if np_ else 0.0
    return {"sensitivity": sens, "precision": prec, "f1": f1, "fdr": fdr}


def evaluate_case(prob_or_mask, gt, threshold: float = 0.5, min_size: int = 11) -> Dict[str, float]:
    """All docs/design.md#evaluation metrics for one case.

    Args:
        prob_or_mask: ``[D, H, W]`` probabilities (thresholded with ``> threshold``) or a boolean mask.
        gt: ``[D, H, W]`` ground-truth mask.
        threshold: probability threshold (ignored for boolean input).
        min_size: components smaller than this (26-connectivity) are removed from both masks.

    Returns:
        ``{"dice", "jaccard", "hd95", "asd", "f1", "fdr", "sensitivity", "precision",
        "gt_lesions", "pred_lesions", "detected", "true_pred"}`` (fractions, voxels, counts).
    """
    a = np.asarray(prob_or_mask)
    pred = a if a.dtype == bool else a > threshold
    p, g = _pair(pred, gt)
    p = remove_small_components(p, min_size)
    g = remove_small_components(g, min_size)
    counts = lesion_detection(p, g)
    out: Dict[str, float] = {"dice": dice(p, g), "jaccard": jaccard(p, g)}
    if p.any() and g.any():  # as hd95() and asd(), with the distances computed once
        d_pg, d_gp = surface_distances(p, g), surface_distances(g, p)
        out["hd95"] = float(np.percentile(np.hstack((d_pg, d_gp)), 95))
        out["asd"] = float(d_pg.mean())
    else:
        out["hd95"], out["asd"] = hd95(p, g), asd(p, g)
    out.update(lesion_f1(counts))
    out.update({k: float(v) for k, v in counts.items()})
    return out
