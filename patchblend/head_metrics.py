"""How well do the heads' scores track the true Dice? Head-quality metrics.

Every function takes the heads' predictions and the true Dice of the same windows (or grid cells),
as numpy arrays or tensors of any shape (flattened), and ignores nothing: NaNs are refused.

- :func:`pearson`: linear correlation of predicted and true Dice.
- :func:`failure_auroc`: how well a low prediction spots a failed window (true Dice < 0.5): the area
  under the ROC curve of ``-prediction`` for the positives ``true < threshold`` (0.5 = chance, 1 = every
  failure scored below every success; ties count one half).
- :func:`reliability_table` / :func:`expected_calibration_error`: predictions binned into equal-width
  bins of [0, 1]; per bin the mean prediction against the mean true Dice (a reliability diagram), and
  ``ECE = Σ_bins (n_bin / N) · |mean prediction − mean true Dice|``.
- :func:`head_quality`: all of them in one dict; :func:`plot_reliability` draws the diagram
  (matplotlib, imported only there).
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

__all__ = ["pearson", "failure_auroc", "reliability_table", "expected_calibration_error", "head_quality",
           "plot_reliability"]


def _pair(pred, true) -> Tuple[np.ndarray, np.ndarray]:
    def flat(name, x):
        if hasattr(x, "detach"):
            x = x.detach().cpu().double().numpy()
        a = np.asarray(x, dtype=np.float64).ravel()
        if np.isnan(a).any():
            raise ValueError(f"{name} holds NaN values")
        return a

    p, t = flat("pred", pred), flat("true", true)
    if p.shape != t.shape:
        raise ValueError(f"pred and true must have the same number of values, got {p.size} and {t.size}")
    return p, t


def pearson(pred, true) -> float:
    """Pearson correlation of ``pred`` and ``true``; ``nan`` when either is constant or has < 2 values."""
    p, t = _pair(pred, true)
    if p.size < 2 or p.std() == 0 or t.std() == 0:
        return math.nan
    return float(np.corrcoef(p, t)[0, 1])


def failure_auroc(pred, true, threshold: float = 0.5) -> float:
    """AUROC of a low ``pred`` for the failures ``true < threshold`` (Mann–Whitney, ties count 1/2).

    ``nan`` when there are no failures or no successes."""
    p, t = _pair(pred, true)
    bad = t < threshold
    n_bad, n_good = int(bad.sum()), int((~bad).sum())
    if n_bad == 0 or n_good == 0:
        return math.nan
    # ranks of -pred (average ranks for ties): the probability that a failure scores lower than a success
    _, inverse, counts = np.unique(-p, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based ranks, ties share their mean
    ranks = average_rank[inverse.ravel()]
    u = ranks[bad].sum() - n_bad * (n_bad + 1) / 2.0
    return float(u / (n_bad * n_good))


def reliability_table(pred, true, bins: int = 10) -> List[Dict[str, float]]:
    """Rows ``{"low", "high", "count", "pred_mean", "true_mean"}`` for ``bins`` equal-width bins of
    [0, 1] (a prediction of exactly 1 falls in the last bin; values outside [0, 1] are refused).
    Empty bins have ``count`` 0 and ``nan`` means."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an int >= 1, got {bins!r}")
    p, t = _pair(pred, true)
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError(f"pred must lie in [0, 1], got range [{p.min()}, {p.max()}]")
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    rows = []
    for b in range(bins):
        sel = index == b
        n = int(sel.sum())
        rows.append({"low": b / bins, "high": (b + 1) / bins, "count": n,
                     "pred_mean": float(p[sel].mean()) if n else math.nan,
                     "true_mean": float(t[sel].mean()) if n else math.nan})
    return rows


def expected_calibration_error(pred, true, bins: int = 10) -> float:
    """``Σ_bins (n_bin / N) · |mean pred − mean true|`` over :func:`reliability_table`'s bins;
    ``nan`` for no values."""
    rows = reliability_table(pred, true, bins)
    total = sum(r["count"] for r in rows)
    if total == 0:
        return math.nan
    return float(sum(r["count"] / total * abs(r["pred_mean"] - r["true_mean"]) for r in rows if r["count"]))


def head_quality(pred, true, bins: int = 10, threshold: float = 0.5) -> Dict[str, float]:
    """``{"n", "corr", "auroc", "ece", "mae", "pred_mean", "true_mean", "failure_fraction"}`` of one head."""
    p, t = _pair(pred, true)
    return {"n": int(p.size), "corr": pearson(p, t), "auroc": failure_auroc(p, t, threshold),
            "ece": expected_calibration_error(p, t, bins),
            "mae": float(np.abs(p - t).mean()) if p.size else math.nan,
            "pred_mean": float(p.mean()) if p.size else math.nan,
            "true_mean": float(t.mean()) if t.size else math.nan,
            "failure_fraction": float((t < threshold).mean()) if t.size else math.nan}


def plot_reliability(curves: Mapping[str, Tuple], path: Optional[str] = None, bins: int = 10, ax=None):
    """Reliability diagram: for each ``name -> (pred, true)``, mean true Dice against mean prediction per
    bin (marker size ∝ bin count), with the diagonal of perfect calibration and each curve's ECE in
    the legend. Draws on ``ax`` or a new figure; saves it to ``path`` when given. Returns the figure."""
    import matplotlib

    if path is not None and ax is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = ax.figure if ax is not None else plt.figure(figsize=(4.5, 4.5))
    ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect")
    for name, (pred, true) in curves.items():
        rows = [r for r in reliability_table(pred, true, bins) if r["count"]]
        total = sum(r["count"] for r in rows) or 1
        xs, ys = [r["pred_mean"] for r in rows], [r["true_mean"] for r in rows]
        sizes = [10 + 200 * r["count"] / total for r in rows]
        (line,) = ax.plot(xs, ys, marker=None, linewidth=1.2,
                          label=f"{name} (ECE {expected_calibration_error(pred, true, bins):.3f})")
        ax.scatter(xs, ys, s=sizes, color=line.get_color(), alpha=0.7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted Dice (bin mean)")
    ax.set_ylabel("true Dice (bin mean)")
    ax.legend(fontsize=7, loc="upper left")
    if path is not None:
        import os

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    return fig
