"""Evaluation of every blending through patchblend's sliding-window driver (``... cib evaluate``).

Blendings (one trained model, the same windows for all):

==============  ==============================================================================
``average``      plain average (MONAI ``mode="constant"``), the paper's baseline
``gaussian``     MONAI/nnU-Net Gaussian importance, weighted mean
``patch``        predicted patch scores as weights, divided by the overlap count (Eq. 1)
``grid``         predicted grid-cell scores (Eq. 2)
``patch*grid``   their product
``oracle-patch`` the *true* Dice of each window's prediction as its weight (the paper's Table 1)
``oracle-grid``  the true Dice of each grid cell
==============  ==============================================================================

The oracle weights come from the ground truth: it travels as a fourth input channel through the
driver, so each window sees its own label, and :func:`patchblend.targets.dice_targets` scores the
window's prediction against it. The model runs once per window; the other blendings replay its
outputs. Metrics: :func:`.metrics.evaluate_case` on the new-lesion probability.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from patchblend import CalibratedOutput
from patchblend.inference import sliding_window_inference
from patchblend.targets import dice_targets

from .data import Case, load_cases, network_input
from .metrics import METRIC_NAMES, evaluate_case
from .model import OUTPUT_NEW

__all__ = ["BLENDINGS", "CalibratedPredictor", "predict_case", "head_calibration", "evaluate_model", "summarize",
           "format_table", "write_csv", "pick_figure_case", "plot_comparison"]

BLENDINGS = ("average", "gaussian", "patch", "grid", "patch*grid", "oracle-patch", "oracle-grid")

#: driver arguments per blending: (mode, weighting, normalize, scores) with scores None | "model" | "oracle".
#: Calibrated blendings divide by the overlap count (the paper's Eq. 1/2), the others by the weight sum.
_SETTINGS = {
    "average": ("constant", None, "weight", None),
    "gaussian": ("gaussian", None, "weight", None),
    "patch": ("constant", "patch", "count", "model"),
    "grid": ("constant", "grid", "count", "model"),
    "patch*grid": ("constant", "patch*grid", "count", "model"),
    "oracle-patch": ("constant", "patch", "count", "oracle"),
    "oracle-grid": ("constant", "grid", "count", "oracle"),
}


class CalibratedPredictor:
    """The predictor handed to the driver.

    Called with windows ``[b, 4, *P]`` (``[t1, t2, t2 − t1, label]``), it returns the new-lesion
    probability ``[b, 1, *P]``, alone (``scores=None``) or with ``(patch [b], grid [b, *G])`` scores:
    the heads' (``"model"``) or the true Dice of the prediction (``"oracle"``). The network runs once
    per window batch: :meth:`start` with ``replay=True`` reuses the outputs recorded in the first pass
    (checked against the inputs).
    """

    def __init__(self, model, device, grid: Sequence[int], amp: bool = False):
        self.model, self.device, self.grid, self.amp = model, torch.device(device), tuple(grid), amp
        self.scores: Optional[str] = None
        #: ``(head patch, true patch, head grid, true grid)`` per window batch of the first oracle pass
        self.pairs: List = []
        self._cache: List = []
        self._index = 0
        self._replay = False
        self._recorded = False

    def start(self, scores: Optional[str], replay: bool) -> None:
        self._recorded = bool(self.pairs)
        self.scores, self._replay, self._index = scores, replay, 0
        if not replay:
            self._cache = []

    @torch.no_grad()
    def _run(self, x: torch.Tensor):
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp and self.device.type == "cuda"):
            out = self.model(x)
        return out.probs(OUTPUT_NEW), out.patch.float(), out.grid.float()

    def __call__(self, windows: torch.Tensor):
        x, label = windows[:, :3], windows[:, 3:4]
        key = (tuple(x.shape), float(x.double().sum()))
        if self._replay and self._index < len(self._cache) and self._cache[self._index][0] == key:
            seg, patch, grid = self._cache[self._index][1]
        else:
            seg, patch, grid = self._run(x.to(self.device))
            if not self._replay:
                self._cache.append((key, (seg, patch, grid)))
        self._index += 1
        seg = seg.to(windows.device)
        if self.scores is None:
            return seg
        if self.scores == "oracle":
            true_patch, true_grid = dice_targets(seg, label.to(seg.device), grid=self.grid)
            if not self._recorded:
                self.pairs.append((patch.cpu(), true_patch.cpu(), grid.cpu(), true_grid.cpu()))
            patch, grid = true_patch, true_grid
        return CalibratedOutput(seg, patch.to(windows.device), grid.to(windows.device))


def predict_case(model, case: Case, blendings: Sequence[str] = BLENDINGS, roi: Sequence[int] = (80, 80, 80),
                 overlap: float = 0.5, sw_batch_size: int = 4, device="cpu", amp: bool = False,
                 grid: Sequence[int] = (2, 2, 2), head_pairs: Optional[list] = None) -> Dict[str, np.ndarray]:
    """New-lesion probability ``[D, H, W]`` of ``case`` for each blending (driver on ``device``).

    ``head_pairs``: a list that receives, when an oracle blending is among ``blendings``, the heads'
    scores and the true Dice of every window (see :func:`head_calibration`)."""
    unknown = [b for b in blendings if b not in _SETTINGS]
    if unknown:
        raise ValueError(f"blendings has unknown names {unknown}; choose from {BLENDINGS}")
    x = network_input(case.t1, case.t2)
    lab = torch.as_tensor(case.label, dtype=torch.float32)[None]
    inputs = torch.cat([x, lab])[None].to(device)  # [1, 4, D, H, W]
    pred = CalibratedPredictor(model, device, grid, amp)
    out = {}
    for i, name in enumerate(blendings):
        mode, weighting, normalize, scores = _SETTINGS[name]
        pred.start(scores, replay=i > 0)
        prob = sliding_window_inference(inputs, list(roi), sw_batch_size, pred, overlap=overlap, mode=mode,
                                        weighting=weighting, normalize=normalize)
        out[name] = prob[0, 0].float().cpu().numpy()
    if head_pairs is not None:
        head_pairs.extend(pred.pairs)
    return out


def head_calibration(pairs: list) -> Dict[str, float]:
    """How well the heads predict the true Dice, over all windows (or cells) in ``pairs``
    (from :func:`predict_case`): Pearson correlation, mean absolute error, the mean prediction and the
    mean true Dice, and the mean prediction on windows/cells whose true Dice is below 0.5."""
    out: Dict[str, float] = {}
    if not pairs:
        return out
    for name, i in (("patch", 0), ("grid", 2)):
        pred = torch.cat([p[i].flatten() for p in pairs]).double().numpy()
        true = torch.cat([p[i + 1].flatten() for p in pairs]).double().numpy()
        bad = true < 0.5
        corr = float(np.corrcoef(pred, true)[0, 1]) if pred.std() > 0 and true.std() > 0 else math.nan
        out.update({f"{name}_corr": corr, f"{name}_mae": float(np.abs(pred - true).mean()),
                    f"{name}_pred_mean": float(pred.mean()), f"{name}_true_mean": float(true.mean()),
                    f"{name}_pred_on_bad": float(pred[bad].mean()) if bad.any() else math.nan,
                    f"{name}_pred_on_good": float(pred[~bad].mean()) if (~bad).any() else math.nan,
                    f"{name}_bad_fraction": float(bad.mean())})
    return out


def evaluate_model(model, cases: Sequence[Case], blendings: Sequence[str] = BLENDINGS, roi=(80, 80, 80),
                   overlap: float = 0.5, sw_batch_size: int = 4, device="cpu", amp: bool = False,
                   grid=(2, 2, 2), progress: bool = True, keep: Sequence[str] = (),
                   head_pairs: Optional[list] = None):
    """Per-case metrics of every blending.

    Returns ``(rows, kept)``: ``rows`` a list of dicts ``{"case", "blending", **metrics}``;
    ``kept[case name][blending]`` the probability volumes of the blendings named in ``keep``.
    ``head_pairs`` (a list) collects the heads' scores against the true Dice (:func:`head_calibration`).
    """
    model.eval()
    rows, kept = [], {}
    it = cases
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(cases, desc="evaluate", leave=False)
    for case in it:
        probs = predict_case(model, case, blendings, roi, overlap, sw_batch_size, device, amp, grid, head_pairs)
        for name in blendings:
            rows.append({"case": case.name, "blending": name, **evaluate_case(probs[name], case.label)})
        kept[case.name] = {k: probs[k] for k in keep if k in probs}
    return rows, kept


def summarize(rows: List[dict], blendings: Sequence[str] = BLENDINGS) -> List[dict]:
    """Mean over cases per blending (``nan`` entries left out); dice/jaccard/f1/fdr in %."""
    out = []
    for name in blendings:
        sel = [r for r in rows if r["blending"] == name]
        if not sel:
            continue
        row = {"blending": name}
        for k in METRIC_NAMES:
            vals = [r[k] for r in sel if not math.isnan(r[k])]
            v = float(np.mean(vals)) if vals else math.nan
            row[k] = 100 * v if k in ("dice", "jaccard", "f1", "fdr") else v
        row["pred_lesions"] = float(np.sum([r["pred_lesions"] for r in sel]))
        row["true_pred"] = float(np.sum([r["true_pred"] for r in sel]))
        row["detected"] = float(np.sum([r["detected"] for r in sel]))
        row["gt_lesions"] = float(np.sum([r["gt_lesions"] for r in sel]))
        out.append(row)
    return out


def format_table(summary: List[dict]) -> str:
    """A fixed-width text table of :func:`summarize`'s rows (with lesion counts summed over cases)."""
    head = f"{'blending':<13}{'Dice%':>7}{'Jacc%':>7}{'HD95':>7}{'ASD':>7}{'F1%':>7}{'FDR%':>7}   TP/pred  det/GT"
    lines = [head, "-" * len(head)]
    for r in summary:
        lines.append(f"{r['blending']:<13}{r['dice']:>7.2f}{r['jaccard']:>7.2f}{r['hd95']:>7.2f}{r['asd']:>7.2f}"
                     f"{r['f1']:>7.2f}{r['fdr']:>7.2f}   {int(r['true_pred']):>3}/{int(r['pred_lesions']):<4}"
                     f" {int(r['detected']):>3}/{int(r['gt_lesions'])}")
    return "\n".join(lines)


def write_csv(path: str, summary: List[dict]) -> str:
    """``blending,dice,jaccard,hd95,asd,f1,fdr`` (Dice, Jaccard, F1, FDR in %; distances in voxels)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["blending", *METRIC_NAMES])
        for r in summary:
            w.writerow([r["blending"], *[f"{r[k]:.4f}" for k in METRIC_NAMES]])
    return path


def _components(mask: np.ndarray, gt: np.ndarray):
    """Filtered prediction and its false-positive part (components that are not true lesions)."""
    from .metrics import _detected, label_components, remove_small_components

    p = remove_small_components(mask)
    g = remove_small_components(gt)
    pl, n = label_components(p)
    gl, _ = label_components(g)
    ok = _detected(pl, n, gl, p, 0.1, 0.7, 0.65)
    fp = np.isin(pl, np.nonzero(~ok)[0] + 1) & p
    return p, fp


def pick_figure_case(rows: List[dict], cases: Sequence[Case], baseline: str = "average",
                     calibrated: str = "patch*grid") -> Case:
    """The case for :func:`plot_comparison`: most false-positive lesions removed by ``calibrated``,
    then most false positives of ``baseline``, then most lesion voxels."""
    def key(case):
        r = {x["blending"]: x for x in rows if x["case"] == case.name}
        fp_a = r[baseline]["pred_lesions"] - r[baseline]["true_pred"]
        fp_c = r[calibrated]["pred_lesions"] - r[calibrated]["true_pred"]
        return fp_a - fp_c, fp_a, int(case.label.sum())

    return max(cases, key=key)


def plot_comparison(case: Case, probs: Dict[str, np.ndarray], path: str, baseline: str = "average",
                    calibrated: str = "patch*grid") -> str:
    """The paper's Fig. 4 for one case: baseline, follow-up, ground truth, ``baseline``-blended and
    ``calibrated``-blended predictions on the axial slice where the two differ most in false positives;
    true positives green, false positives red and circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    gt = case.label > 0
    pa, fpa = _components(probs[baseline] > 0.5, gt)
    pc, fpc = _components(probs[calibrated] > 0.5, gt)
    # the slice with the most false positives removed by calibration, then the most false positives,
    # then the most lesion
    big = float(gt.size)
    score = big * big * (fpa.sum((0, 1)) - fpc.sum((0, 1))) + big * fpa.sum((0, 1)) + gt.sum((0, 1))
    z = int(np.argmax(score))

    def show(ax, img, title):
        sl = img[:, :, z]
        ax.imshow(np.where(sl == 0, -2.5, sl).T, cmap="gray", origin="lower", vmin=-2.5, vmax=3.5)  # background black
        ax.set_title(title, fontsize=9)
        ax.axis("off")

    fig, axes = plt.subplots(1, 5, figsize=(15, 3.6))
    show(axes[0], case.t1, "baseline (t1)")
    show(axes[1], case.t2, "follow-up (t2)")
    show(axes[2], case.t2, "ground truth (new lesions)")
    axes[2].contour(gt[:, :, z].T, levels=[0.5], colors="yellow", linewidths=1)
    for ax, (name, p, fp) in zip(axes[3:], ((baseline, pa, fpa), (calibrated, pc, fpc))):
        show(ax, case.t2, f"{name} blending")
        overlay = np.zeros((*p.shape[:2], 4))
        overlay[p[:, :, z] & ~fp[:, :, z]] = (0, 1, 0, 0.7)
        overlay[fp[:, :, z]] = (1, 0, 0, 0.8)
        ax.imshow(overlay.transpose(1, 0, 2), origin="lower")
        ax.contour(gt[:, :, z].T, levels=[0.5], colors="yellow", linewidths=0.6)
        lab, n = ndimage.label(fp[:, :, z])
        for c in ndimage.center_of_mass(fp[:, :, z], lab, range(1, n + 1)):
            ax.add_patch(plt.Circle((c[0], c[1]), 4, fill=False, color="red", linewidth=1.2))
        ax.set_title(f"{name} blending: {int(lab.max())} FP in slice", fontsize=9)
    fig.suptitle(f"{case.name}, slice z={z}: green = true positive, red = false positive, yellow = ground truth",
                 fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    from .train import load_checkpoint

    p = argparse.ArgumentParser(prog="python -m patchblend.examples.cib evaluate",
                                description="Evaluate every blending of a trained CIB model.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train (last.pt)")
    p.add_argument("--data", required=True, help="folder of two-time-point case folders")
    p.add_argument("--out", default="cib_eval", help="output folder (results.csv, per_case.csv, figure)")
    p.add_argument("--blendings", default=",".join(BLENDINGS), help="comma-separated subset of " + ",".join(BLENDINGS))
    p.add_argument("--roi", type=int, default=0, help="window size (default: the training patch size)")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--sw-batch-size", type=int, default=4)
    p.add_argument("--spacing", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--figure", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    blendings = [b.strip() for b in args.blendings.split(",") if b.strip()]
    model, cfg, _ = load_checkpoint(args.ckpt, args.device)
    roi = (args.roi or cfg.patch,) * 3
    cases = [c for c in load_cases(args.data, spacing=args.spacing) if not c.single]
    if not cases:
        p.error(f"--data {args.data!r} holds no two-time-point cases")
    keep = [b for b in ("average", "patch*grid") if b in blendings]
    rows, kept = evaluate_model(model, cases, blendings, roi, args.overlap, args.sw_batch_size, args.device,
                                amp=args.device.startswith("cuda"), grid=(cfg.grid,) * 3, keep=keep)
    summary = summarize(rows, blendings)
    print(format_table(summary))
    write_csv(os.path.join(args.out, "results.csv"), summary)
    with open(os.path.join(args.out, "per_case.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    if args.figure and len(keep) == 2:
        best = pick_figure_case(rows, cases)
        print("figure:", plot_comparison(best, kept[best.name], os.path.join(args.out, "fig4_comparison.png")))
    return summary
