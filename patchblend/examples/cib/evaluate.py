"""Evaluation of every blending through patchblend's sliding-window driver (``... cib evaluate``).

A *method* is a blending with, for the calibrated ones, the head scores it weights by. Its name is
``average``, ``gaussian`` or ``HEADS:WEIGHTING`` with WEIGHTING one of ``patch`` (the patch score of
each window, the paper's Eq. 1), ``grid`` (each grid cell's score, Eq. 2) or ``patch*grid`` (their
product), and HEADS one of

==================  ==============================================================================
``none``            no scores: ``average`` (MONAI ``mode="constant"``, the paper's baseline) and
                    ``gaussian`` (MONAI/nnU-Net Gaussian importance, weighted mean)
``paper``           the paper's heads (:class:`patchblend.PatchHead`, :class:`patchblend.GridHead`),
                    trained jointly with the network (two stages)
``aware``           the prediction-aware heads (:class:`patchblend.AwarePatchHead`,
                    :class:`patchblend.AwareGridHead`), trained jointly on the training crops
``paper-posthoc``,  the same kinds fitted after training on held-out calibration cases with the
``aware-posthoc``   network frozen (:mod:`patchblend.calibration`)
``aware-fine-``     post-hoc aware heads whose grid head has 4×4×4 cells (:data:`.posthoc.FINE_GRID`),
``posthoc``         opt-in (``--posthoc aware,paper,aware-fine``); its grid quality is measured
                    against the true Dice of its own cells
``*-tempered``      the post-hoc heads' weights raised to a power ``γ`` in (0, 1] chosen per
                    weighting on the calibration cases (:func:`.posthoc.choose_exponents`): the best
                    lesion F1 there that keeps 95% of the lesions ``average`` detects
``oracle``          the *true* Dice of each window / cell (the paper's Table 1): an upper bound
==================  ==============================================================================

and the **gated** rows ``HEADS:gate-patch``, ``HEADS:gate-grid``, ``HEADS:gate-patch*grid`` and
``HEADS:gate-lesion`` (:mod:`.gating`): average blending's prediction with whole lesions dropped
by their blended confidence ``C = Σ α / N`` or by a lesion head, τ chosen on the calibration cases.

Calibrated blendings divide by the overlap count (Eq. 1/2); ``average`` and ``gaussian`` by the weight
sum. The old names ``patch``, ``grid``, ``patch*grid``, ``oracle-patch``, ``oracle-grid`` still work
(``paper:...``, ``oracle:...``).

The oracle weights come from the ground truth: it travels as a fourth input channel through the
driver, so each window sees its own label, and :func:`patchblend.targets.dice_targets` scores the
window's prediction against it. The model runs once per window; the other blendings replay its
outputs. During the first oracle pass the head scores of every head set are recorded against the true
Dice (:func:`head_quality_rows`). Metrics: :func:`.metrics.evaluate_case` on the new-lesion probability.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from patchblend import CalibratedOutput
from patchblend.head_metrics import head_quality
from patchblend.inference import sliding_window_inference
from patchblend.targets import dice_targets

from .data import Case, InputError, check_device, check_spacing, load_cases, network_input
from .gating import DECODER, GATES
from .metrics import METRIC_NAMES, evaluate_case
from .model import OUTPUT_NEW, head_scores

__all__ = ["WEIGHTINGS", "GATES", "GATED_HEAD_SETS", "HEAD_SETS", "METHODS", "BLENDINGS", "parse_methods", "method_name", "CalibratedPredictor",
           "predict_case", "head_quality_rows", "evaluate_model", "summarize", "format_table", "write_csv",
           "write_head_quality", "write_rows", "write_component_table", "pick_figure_case", "plot_comparison", "plot_reliability_figure"]

WEIGHTINGS = ("patch", "grid", "patch*grid")
#: Head sets in table order (``none`` and ``oracle`` need no heads).
HEAD_SETS = ("none", "paper", "aware", "paper-posthoc", "aware-posthoc", "aware-fine-posthoc", "paper-tempered",
             "aware-tempered", "aware-fine-tempered", "oracle")
#: Head sets whose gated rows are in :data:`METHODS` (their τ and lesion heads come from the calibration cases).
GATED_HEAD_SETS = ("paper-posthoc", "aware-posthoc", "aware-fine-posthoc", "oracle")
#: Every method, in table order: ``(heads, blending)``; the gated rows last (no lesion head for the oracle).
METHODS: Tuple[Tuple[str, str], ...] = (("none", "average"), ("none", "gaussian")) + tuple(
    (h, w) for h in HEAD_SETS[1:] for w in WEIGHTINGS) + tuple(
    (h, g) for h in GATED_HEAD_SETS for g in GATES if not (h == "oracle" and g == "gate-lesion"))
_LEGACY = {"patch": ("paper", "patch"), "grid": ("paper", "grid"), "patch*grid": ("paper", "patch*grid"),
           "oracle-patch": ("oracle", "patch"), "oracle-grid": ("oracle", "grid")}
#: The old method names (one per paper/oracle blending), kept as aliases.
BLENDINGS = ("average", "gaussian") + tuple(_LEGACY)


def method_name(method: Tuple[str, str]) -> str:
    """``("none", "average")`` → ``"average"``; ``("aware", "grid")`` → ``"aware:grid"``."""
    heads, blending = method
    return blending if heads == "none" else f"{heads}:{blending}"


def parse_methods(names: Sequence[str], available: Sequence[str] = HEAD_SETS) -> List[Tuple[str, str]]:
    """Method names (module docstring) → ``(heads, blending)`` pairs; unknown names, or head sets not
    in ``available``, raise :class:`~.data.InputError` listing the valid names."""
    out = []
    for raw in names:
        name = raw.strip()
        if name in ("average", "gaussian"):
            m = ("none", name)
        elif name in _LEGACY:
            m = _LEGACY[name]
        elif ":" in name and name.split(":", 1)[0] not in ("", "none") and name.split(":", 1)[1] in WEIGHTINGS + GATES:
            m = tuple(name.split(":", 1))
        else:
            raise InputError(f"unknown blending {name!r}; use average, gaussian or HEADS:WEIGHTING with HEADS in "
                             f"{','.join(HEAD_SETS[1:])} and WEIGHTING in {','.join(WEIGHTINGS + GATES)}")
        if m[0] not in available and m[0] not in HEAD_SETS:
            raise InputError(f"unknown blending {name!r}; use average, gaussian or HEADS:WEIGHTING with HEADS in "
                             f"{','.join(HEAD_SETS[1:])} and WEIGHTING in {','.join(WEIGHTINGS + GATES)}")
        if m[0] not in available:
            raise InputError(f"blending {name!r} needs the {m[0]!r} heads, which this model does not have "
                             f"(available: {', '.join(available)})")
        if m not in out:
            out.append(m)
    if not out:
        raise InputError("no blending given")
    return out


#: driver arguments per blending: (mode, weighting, normalize)
_DRIVER = {"average": ("constant", None, "weight"), "gaussian": ("gaussian", None, "weight"),
           **{w: ("constant", w, "count") for w in WEIGHTINGS}}


def model_head_sets(model, posthoc: Optional[dict] = None) -> Dict[str, tuple]:
    """``{name: (kind, patch_head, grid_head)}`` of the heads a model carries (``paper``; ``aware`` when
    it has them) plus ``posthoc`` (``{"paper-posthoc": (kind, patch_head, grid_head), ...}``)."""
    sets = {"paper": ("paper", model.patch_head, model.grid_head)}
    if getattr(model, "aware_heads", False):
        sets["aware"] = ("aware", model.aware_patch_head, model.aware_grid_head)
    sets.update(posthoc or {})
    return sets


class CalibratedPredictor:
    """The predictor handed to the driver.

    Called with windows ``[b, 4, *P]`` (``[t1, t2, t2 − t1, label]``), it returns the new-lesion
    probability ``[b, 1, *P]``, alone (``heads`` ``None``/``"none"``) or as a
    :class:`patchblend.CalibratedOutput` with the scores of one head set (a key of ``head_sets``) or the
    true Dice of the prediction (``"oracle"``). The network and every head set run once per window
    batch: :meth:`start` with ``replay=True`` reuses the outputs recorded in the first pass (checked
    against the inputs). ``heads=DECODER`` (``"decoder"``, a replay only) returns the network's last
    decoder feature ``[b, w, *P]`` instead (what the lesion head pools over each component).
    """

    def __init__(self, model, device, grid: Sequence[int], amp: bool = False, head_sets: Optional[dict] = None):
        self.model, self.device, self.grid, self.amp = model, torch.device(device), tuple(grid), amp
        self.head_sets = model_head_sets(model) if head_sets is None else head_sets
        self.heads: Optional[str] = None
        self.exponent = 1.0
        # head sets that share their heads with an earlier one (the tempered sets) are scored once
        first: Dict[tuple, str] = {}
        self._canonical = {name: first.setdefault((id(ph), id(gh)), name) for name, (_, ph, gh) in self.head_sets.items()}
        #: ``{head set: [(pred patch, true patch, pred grid, true grid), ...]}`` from the first oracle pass
        self.pairs: Dict[str, List] = {k: [] for k in self.head_sets if self._canonical[k] == k}
        self._cache: List = []
        self._index = 0
        self._replay = False
        self._recorded = False

    def start(self, heads: Optional[str], replay: bool, exponent: float = 1.0) -> None:
        """Next pass: scores of ``heads`` raised to ``exponent`` (1: as predicted)."""
        if heads not in (None, "none", "oracle", DECODER) and heads not in self.head_sets:
            raise ValueError(f"heads {heads!r}: this predictor has {tuple(self.head_sets)} (and oracle)")
        self._recorded = any(self.pairs.values())
        self.heads, self._replay, self._index, self.exponent = heads, replay, 0, float(exponent)
        if not replay:
            self._cache = []

    @torch.no_grad()
    def _run(self, x: torch.Tensor):
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp and self.device.type == "cuda"):
            logits, bottleneck, last = self.model.run(x)
        bottleneck, last = bottleneck.float(), last.float()
        prob = torch.softmax(logits[:, OUTPUT_NEW].float(), dim=1)[:, 1:2]
        scores = {name: tuple(t.float() for t in head_scores(kind, ph, gh, prob, bottleneck, last))
                  for name, (kind, ph, gh) in self.head_sets.items() if self._canonical[name] == name}
        return prob, {name: scores[self._canonical[name]] for name in self.head_sets}, last

    def __call__(self, windows: torch.Tensor):
        x, label = windows[:, :3], windows[:, 3:4]
        key = (tuple(x.shape), float(x.double().sum()))
        if self._replay and self._index < len(self._cache) and self._cache[self._index][0] == key:
            seg, scores, last = self._cache[self._index][1]
        else:
            seg, scores, last = self._run(x.to(self.device))
            if not self._replay:
                self._cache.append((key, (seg, scores, last)))
        self._index += 1
        if self.heads == DECODER:
            return last.to(windows.device)
        seg = seg.to(windows.device)
        if self.heads in (None, "none"):
            return seg
        if self.heads == "oracle":
            true_patch, true_grid = dice_targets(seg, label.to(seg.device), grid=self.grid)
            if not self._recorded:
                truth = {tuple(true_grid.shape[1:]): true_grid}  # each head set against cells of its own grid
                for name in self.pairs:
                    patch, grid = scores[name]
                    cells = tuple(grid.shape[1:])
                    if cells not in truth:
                        truth[cells] = dice_targets(seg, label.to(seg.device), grid=cells)[1]
                    self.pairs[name].append((patch.cpu(), true_patch.cpu(), grid.cpu(), truth[cells].cpu()))
            patch, grid = true_patch, true_grid
        else:
            patch, grid = scores[self.heads]
            if self.exponent != 1.0:
                patch, grid = patch ** self.exponent, grid ** self.exponent
        return CalibratedOutput(seg, patch.to(windows.device), grid.to(windows.device))


def predict_case(model, case: Case, methods: Sequence = METHODS, roi: Sequence[int] = (80, 80, 80),
                 overlap: float = 0.5, sw_batch_size: int = 4, device="cpu", amp: bool = False,
                 grid: Sequence[int] = (2, 2, 2), head_pairs: Optional[dict] = None,
                 head_sets: Optional[dict] = None, exponents: Optional[dict] = None,
                 gating: Optional[dict] = None, lesion_pairs: Optional[dict] = None,
                 components: Optional[dict] = None, component_sets: Sequence[str] = (), atlas: bool = False
                 ) -> Dict[Tuple[str, str], np.ndarray]:
    """New-lesion probability ``[D, H, W]`` of ``case`` for each method (driver on ``device``).

    ``methods``: ``(heads, blending)`` pairs or names (:func:`parse_methods`). ``head_sets``: the head
    sets to score with (default :func:`model_head_sets`). ``head_pairs``: a dict that receives, per head
    set, the heads' scores against the true Dice of every window, when an oracle method is run.
    ``exponents``: ``{(heads, blending): γ}``, weights raised to ``γ`` for those methods (default 1).
    ``gating``: τ and lesion heads of the gated methods (:func:`.gating.fit_gating`); ``lesion_pairs``
    receives ``{(heads, gate): [GatedComponents per case]}`` of the gated methods;
    ``components`` receives, for each head set in ``component_sets``, this case's components of average's
    prediction with their features (what :func:`.gating.fit_gating` reads). ``atlas``: the features include the
    registered template's white matter (:mod:`.atlas`; also whenever a lesion head of ``gating`` reads it)."""
    from .gating import (ATLAS_FEATURES, GatedComponents, blended_confidence, component_centres, component_context,
                         component_scores, component_truth, confidence_features, decoder_feature_map, gated_prediction,
                         lesion_components)

    head_sets = model_head_sets(model) if head_sets is None else head_sets
    methods = [tuple(m) if not isinstance(m, str) else m for m in methods]
    methods = parse_methods([m if isinstance(m, str) else method_name(m) for m in methods],
                            ("none", "oracle", *head_sets))
    gated = [m for m in methods if m[1] in GATES]
    blended = [m for m in methods if m[1] not in GATES]
    if (gated or component_sets) and ("none", "average") not in blended:
        blended.append(("none", "average"))
    x = network_input(case.t1, case.t2)
    lab = torch.as_tensor(case.label, dtype=torch.float32)[None]
    inputs = torch.cat([x, lab])[None].to(device)  # [1, 4, D, H, W]
    pred = CalibratedPredictor(model, device, grid, amp, head_sets)
    out = {}
    for i, (heads, blending) in enumerate(blended):
        mode, weighting, normalize = _DRIVER[blending]
        pred.start(heads, replay=i > 0, exponent=(exponents or {}).get((heads, blending), 1.0))
        prob = sliding_window_inference(inputs, list(roi), sw_batch_size, pred, overlap=overlap, mode=mode,
                                        weighting=weighting, normalize=normalize)
        out[(heads, blending)] = prob[0, 0].float().cpu().numpy()
    if gated or component_sets:
        average = out[("none", "average")]
        ids, sizes = lesion_components(average)
        truth = component_truth(ids, case.label)
        centres = component_centres(ids) if lesion_pairs is not None else None
        gating = gating or {"lesion_heads": {}, "thresholds": {}}
        atlas = atlas or any(ATLAS_FEATURES[0] in head.features for head in gating["lesion_heads"].values())
        from .atlas import case_white_matter

        context = component_context(ids, average, case.t1, case.t2,
                                    decoder_feature_map(pred, inputs, roi, sw_batch_size, overlap),
                                    case_white_matter(case) if atlas else None)
        for heads in dict.fromkeys([h for h, _ in gated] + list(component_sets)):
            conf = {w: blended_confidence(pred, inputs, roi, sw_batch_size, overlap, heads, w) for w in WEIGHTINGS}
            features = confidence_features(context, conf)
            if components is not None and heads in component_sets:
                components.setdefault(heads, []).append({"prob": average, "ids": ids, "features": features,
                                                         "truth": truth, "label": case.label})
            for gate in [g for h, g in gated if h == heads]:
                if (heads, gate) not in gating["thresholds"]:
                    raise InputError(f"blending {heads}:{gate} needs a gate threshold fitted on calibration cases "
                                     f"(calibrate or demo write it into the post-hoc heads file)")
                score = component_scores(gate, features, gating["lesion_heads"].get(heads))
                tau = gating["thresholds"][(heads, gate)].tau
                out[(heads, gate)] = gated_prediction(average, ids, score, tau)
                if lesion_pairs is not None:
                    lesion_pairs.setdefault((heads, gate), []).append(
                        GatedComponents(case.name, sizes, centres, np.asarray(score, np.float64), truth, float(tau)))
        out = {m: out[m] for m in methods}
    if head_pairs is not None:
        for name, pairs in pred.pairs.items():
            head_pairs.setdefault(name, []).extend(pairs)
    return out


def _flat(pairs: list, i: int) -> np.ndarray:
    return torch.cat([p[i].flatten() for p in pairs]).double().numpy() if pairs else np.zeros(0)


def head_quality_rows(head_pairs: Dict[str, list], bins: int = 10) -> List[dict]:
    """One row per head set and head: ``{"heads", "head", "n", "corr", "auroc", "ece", "mae", "pred_mean",
    "true_mean", "failure_fraction"}`` (:func:`patchblend.head_quality`; AUROC for true Dice < 0.5)."""
    rows = []
    order = sorted(head_pairs, key=lambda k: (HEAD_SETS.index(k) if k in HEAD_SETS else len(HEAD_SETS), k))
    for name in order:
        pairs = head_pairs[name]
        if not pairs:
            continue
        for head, i in (("patch", 0), ("grid", 2)):
            rows.append({"heads": name, "head": head, **head_quality(_flat(pairs, i), _flat(pairs, i + 1), bins)})
    return rows


def evaluate_model(model, cases: Sequence[Case], methods: Sequence = METHODS, roi=(80, 80, 80),
                   overlap: float = 0.5, sw_batch_size: int = 4, device="cpu", amp: bool = False,
                   grid=(2, 2, 2), progress: bool = True, keep: Sequence = (),
                   head_pairs: Optional[dict] = None, head_sets: Optional[dict] = None,
                   exponents: Optional[dict] = None, gating: Optional[dict] = None,
                   lesion_pairs: Optional[dict] = None, components: Optional[dict] = None,
                   component_sets: Sequence[str] = (), atlas: bool = False):
    """Per-case metrics of every method.

    Returns ``(rows, kept)``: ``rows`` a list of dicts ``{"case", "heads", "blending", **metrics}``;
    ``kept[case name][method name]`` the probability volumes of the methods named in ``keep``.
    ``head_pairs`` (a dict) collects the heads' scores against the true Dice (:func:`head_quality_rows`);
    ``exponents``, ``gating``, ``lesion_pairs``, ``components``, ``component_sets``, ``atlas`` as in
    :func:`predict_case`.
    """
    model.eval()
    head_sets = model_head_sets(model) if head_sets is None else head_sets
    methods = parse_methods([m if isinstance(m, str) else method_name(m) for m in methods],
                            ("none", "oracle", *head_sets))
    keep = {k if isinstance(k, str) else method_name(k): parse_methods([k if isinstance(k, str) else method_name(k)],
                                                                        ("none", "oracle", *head_sets))[0]
            for k in keep}
    rows, kept = [], {}
    it = cases
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(cases, desc="evaluate", leave=False)
    for case in it:
        probs = predict_case(model, case, methods, roi, overlap, sw_batch_size, device, amp, grid, head_pairs,
                             head_sets, exponents, gating, lesion_pairs, components, component_sets, atlas)
        for heads, blending in methods:
            rows.append({"case": case.name, "heads": heads, "blending": blending,
                         **evaluate_case(probs[(heads, blending)], case.label)})
        kept[case.name] = {name: probs[m] for name, m in keep.items() if m in probs}
    return rows, kept


#: Columns of ``results.csv`` after ``heads,blending``: the metrics (Dice, Jaccard, F1, FDR and the
#: pooled lesion sensitivity in %, distances in voxels), then lesion counts summed over the cases.
RESULT_COLUMNS = METRIC_NAMES + ("sensitivity", "detected", "gt_lesions", "true_pred", "pred_lesions")


def summarize(rows: List[dict], methods: Optional[Sequence] = None) -> List[dict]:
    """Per method: the mean over cases (``nan`` entries left out; dice/jaccard/f1/fdr in %), the lesion
    counts summed over the cases, and ``sensitivity`` = detected / ground-truth lesions pooled over the
    cases (in %)."""
    if methods is None:
        methods = []
        for r in rows:
            if (r["heads"], r["blending"]) not in methods:
                methods.append((r["heads"], r["blending"]))
    out = []
    for heads, blending in methods:
        sel = [r for r in rows if r["heads"] == heads and r["blending"] == blending]
        if not sel:
            continue
        row = {"heads": heads, "blending": blending}
        for k in METRIC_NAMES:
            vals = [r[k] for r in sel if not math.isnan(r[k])]
            v = float(np.mean(vals)) if vals else math.nan
            row[k] = 100 * v if k in ("dice", "jaccard", "f1", "fdr") else v
        for k in ("detected", "gt_lesions", "true_pred", "pred_lesions"):
            row[k] = float(np.sum([r[k] for r in sel]))
        row["sensitivity"] = 100 * row["detected"] / row["gt_lesions"] if row["gt_lesions"] else math.nan
        out.append(row)
    return out


def format_table(summary: List[dict]) -> str:
    """A fixed-width text table of :func:`summarize`'s rows."""
    w = max([15] + [len(r["heads"]) + 1 for r in summary])  # 15, or wider for a longer head-set name
    head = (f"{'heads':<{w}}{'blending':<11}{'Dice%':>7}{'HD95':>6}{'F1%':>7}{'FDR%':>7}{'Sens%':>7}"
            f"   TP/pred  det/GT")
    lines = [head, "-" * len(head)]
    for r in summary:
        lines.append(f"{r['heads']:<{w}}{r['blending']:<11}{r['dice']:>7.2f}{r['hd95']:>6.2f}{r['f1']:>7.2f}"
                     f"{r['fdr']:>7.2f}{r['sensitivity']:>7.1f}   {int(r['true_pred']):>3}/{int(r['pred_lesions']):<4}"
                     f" {int(r['detected']):>3}/{int(r['gt_lesions'])}")
    return "\n".join(lines)


#: The gated row the example's claims are about, fixed before its first test run on the calibration cases'
#: evidence only (τ by :data:`.gating.GATE_RULE`): the mean grid confidence separated their true lesions from
#: false positives better (AUROC 0.86) than the cross-fitted lesion head (0.81-0.83).
PRIMARY_GATED = "aware-posthoc:gate-grid"
#: Share of average's detected lesions a row must keep to be "best" (:func:`best_row`).
LESION_FLOOR = 0.95


def best_row(summary: List[dict], floor: float = LESION_FLOOR) -> Optional[dict]:
    """The predicted-weight row (not ``none``, not ``oracle``) with the best lesion F1 (then lower FDR)
    among those detecting at least ``floor`` of the lesions ``average`` detects; ``None`` if none does."""
    avg = next((r for r in summary if (r["heads"], r["blending"]) == ("none", "average")), None)
    if avg is None:
        return None
    ok = [r for r in summary if r["heads"] not in ("none", "oracle") and r["detected"] >= floor * avg["detected"]]
    return max(ok, key=lambda r: (r["f1"], -r["fdr"])) if ok else None


def best_row_text(summary: List[dict]) -> str:
    """One line: :func:`best_row` against average and gaussian."""
    rows = {method_name((r["heads"], r["blending"])): r for r in summary}
    best = best_row(summary)
    if best is None or "average" not in rows:
        return f"no predicted-weight row keeps >= {100 * LESION_FLOOR:.0f}% of average's detected lesions"
    a = rows["average"]
    bar = max(a["f1"], rows["gaussian"]["f1"]) if "gaussian" in rows else a["f1"]
    return (f"best row keeping >= {100 * LESION_FLOOR:.0f}% of average's detected lesions: "
            f"{method_name((best['heads'], best['blending']))}: F1 {best['f1']:.1f} ({best['f1'] - bar:+.1f} against "
            f"max(average, gaussian) {bar:.1f}), FDR {best['fdr']:.1f} (average {a['fdr']:.1f}), detected "
            f"{int(best['detected'])} of {int(a['detected'])} that average detects")


def threshold_text(gating: dict) -> str:
    """The gate thresholds τ with their bootstrap intervals, one line per gated row."""
    return "gate thresholds tau (calibration cases; bootstrap 5-95% of the per-resample choice):\n" + "\n".join(
        f"  {h}:{g}  tau {t.tau:.2f} [{t.low:.2f}, {t.high:.2f}], keeps {100 * t.kept_fraction:.1f}% of average's "
        f"detected calibration lesions" for (h, g), t in gating["thresholds"].items())


def format_head_quality(rows: List[dict]) -> str:
    w = max([14] + [len(r["heads"]) + 1 for r in rows])  # 14, or wider for a longer head-set name
    head = f"{'heads':<{w}}{'head':<18}{'corr':>7}{'AUROC':>7}{'ECE':>7}{'MAE':>7}  pred/true mean  Dice<0.5"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['heads']:<{w}}{r['head']:<18}{r['corr']:>+7.2f}{r['auroc']:>7.3f}{r['ece']:>7.3f}"
                     f"{r['mae']:>7.3f}  {r['pred_mean']:.3f}/{r['true_mean']:.3f}    {100 * r['failure_fraction']:.1f}%")
    return "\n".join(lines)


def write_csv(path: str, summary: List[dict]) -> str:
    """``heads,blending,`` + :data:`RESULT_COLUMNS` (Dice, Jaccard, F1, FDR, sensitivity in %; HD95 and ASD
    in voxels; lesion counts summed over the cases)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["heads", "blending", *RESULT_COLUMNS])
        for r in summary:
            w.writerow([r["heads"], r["blending"], *[f"{r[k]:.4f}" if k in METRIC_NAMES + ("sensitivity",)
                                                     else str(int(r[k])) for k in RESULT_COLUMNS]])
    return path


def write_head_quality(path: str, rows: List[dict]) -> str:
    """``heads,head,corr,auroc,ece`` (then ``mae,n``): one row per head set and head."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["heads", "head", "corr", "auroc", "ece", "mae", "n"])
        for r in rows:
            w.writerow([r["heads"], r["head"], *[f"{r[k]:.4f}" for k in ("corr", "auroc", "ece", "mae")], r["n"]])
    return path


def write_rows(path: str, rows: List[dict], columns: Optional[Sequence[str]] = None) -> str:
    """A CSV of dict ``rows``, one column per key (``columns``, default the first row's keys)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns if columns is not None else rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    return path


def write_per_case(path: str, rows: List[dict]) -> str:
    """``per_case.csv``: one row per case and method (:func:`evaluate_model`'s rows)."""
    return write_rows(path, rows)


def plot_reliability_figure(head_pairs: Dict[str, list], path: str, bins: int = 10) -> str:
    """Reliability diagrams (patch head left, grid head right) of every head set on the test windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from patchblend.head_metrics import plot_reliability

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    for ax, (head, i) in zip(axes, (("patch", 0), ("grid", 2))):
        curves = {name: (_flat(p, i), _flat(p, i + 1)) for name, p in head_pairs.items() if p}
        plot_reliability(curves, bins=bins, ax=ax)
        ax.set_title(f"{head} head on the test {'windows' if head == 'patch' else 'grid cells'}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
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
                     calibrated: str = "aware-posthoc:patch*grid") -> Case:
    """The case for :func:`plot_comparison`: most false-positive lesions removed by ``calibrated``,
    then most false positives of ``baseline``, then most lesion voxels (methods by name)."""
    def key(case):
        r = {method_name((x["heads"], x["blending"])): x for x in rows if x["case"] == case.name}
        fp_a = r[baseline]["pred_lesions"] - r[baseline]["true_pred"]
        fp_c = r[calibrated]["pred_lesions"] - r[calibrated]["true_pred"]
        return fp_a - fp_c, fp_a, int(case.label.sum())

    return max(cases, key=key)


def plot_comparison(case: Case, probs: Dict[str, np.ndarray], path: str, baseline: str = "average",
                    calibrated: str = "aware-posthoc:patch*grid") -> str:
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


def phantom_matcher(root: str, cases: Sequence[Case]):
    """``objects`` of :func:`.gating.component_rows` for the cases under ``root`` (loaded without
    resampling): what each component lies on, from each case folder's ``phantom.json``."""
    from .data import find_cases
    from .phantom import match_phantom_objects

    folders = {os.path.basename(os.path.normpath(f)): f for f in find_cases(root)}
    crops = {c.name: c.crop for c in cases}
    return lambda name, centres: match_phantom_objects(folders[name], crops[name], centres)


def write_component_table(path: str, lesion_pairs: dict, root: Optional[str], cases: Sequence[Case]) -> Optional[str]:
    """``components.csv`` of the gated rows (:func:`.gating.component_rows`), each component matched to the
    phantom object it lies on when ``root`` is given; ``None`` when no gated row ran."""
    from .gating import COMPONENT_COLUMNS, component_rows

    if not lesion_pairs:
        return None
    return write_rows(path, component_rows(lesion_pairs, phantom_matcher(root, cases) if root else None),
                      COMPONENT_COLUMNS)


def check_overlap(overlap: float) -> float:
    if not (0 <= overlap < 1):
        raise InputError(f"--overlap must lie in [0, 1), got {overlap}")
    return overlap


def check_roi(roi: int, option: str = "--roi") -> int:
    if roi < 16 or roi % 16:
        raise InputError(f"{option} must be a positive multiple of 16 (the V-Net downsamples 4 times), got {roi}")
    return roi


def load_posthoc_heads(path: str, model, device="cpu"):
    """Post-hoc heads written by the demo or ``calibrate``: ``({"paper-posthoc": (kind, patch, grid), ...},
    {(tempered head set, weighting): γ})``."""
    from .posthoc import load_heads

    return load_heads(path, model, device, with_exponents=True)


def main(argv=None):
    from .train import check_out_folder, load_checkpoint

    p = argparse.ArgumentParser(prog="python -m patchblend.examples.cib evaluate",
                                description="Evaluate every blending of a trained CIB model.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train (last.pt)")
    p.add_argument("--data", required=True, help="folder of two-time-point case folders")
    p.add_argument("--out", default="cib_eval", help="output folder (results.csv, per_case.csv, head_quality.csv, components.csv, figures)")
    p.add_argument("--posthoc", default="", help="heads fitted post hoc (posthoc_heads.pt from demo or calibrate)")
    p.add_argument("--blendings", default="all",
                   help="comma-separated methods: average, gaussian, HEADS:WEIGHTING (HEADS in "
                        + ",".join(HEAD_SETS[1:]) + "; WEIGHTING in " + ",".join(WEIGHTINGS) + "), or all")
    p.add_argument("--roi", type=int, default=None,
                   help="window size, a positive multiple of 16 (default: the training patch size)")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--sw-batch-size", type=int, default=4)
    p.add_argument("--spacing", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--figure", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    check_out_folder(args.out)
    check_overlap(args.overlap)
    if args.roi is not None:  # (0 is an error, not the default)
        check_roi(args.roi)
    check_spacing(args.spacing)
    check_device(args.device)
    if args.sw_batch_size < 1:
        raise InputError(f"--sw-batch-size must be >= 1, got {args.sw_batch_size}")
    if not os.path.isdir(args.data):
        raise InputError(f"--data {args.data!r} is not an existing folder")
    model, cfg, _ = load_checkpoint(args.ckpt, args.device)
    posthoc, exponents = load_posthoc_heads(args.posthoc, model, args.device) if args.posthoc else ({}, {})
    from .posthoc import load_gating

    gating = load_gating(args.posthoc) if args.posthoc else None
    head_sets = model_head_sets(model, posthoc)
    available = ("none", "oracle", *head_sets)
    if args.blendings == "all":
        methods = [m for m in METHODS if m[0] in available
                   and (m[1] not in GATES or (gating and m in gating["thresholds"]))]
    else:
        methods = parse_methods(args.blendings.split(","), available)
    roi = (cfg.patch if args.roi is None else args.roi,) * 3
    cases = load_cases(args.data, spacing=args.spacing)
    singles = [c.name for c in cases if c.single]
    if singles:
        raise InputError(f"--data {args.data!r} holds single-time-point cases ({', '.join(singles)}); evaluate "
                         f"scores new lesions and needs two time points per case")
    if not cases:
        raise InputError(f"--data {args.data!r} holds no case folders")
    names = [method_name(m) for m in methods]
    calibrated = next((n for n in (PRIMARY_GATED, "aware-posthoc:patch*grid", "aware:patch*grid", "paper:patch*grid")
                       if n in names), None)
    keep = ["average", calibrated] if "average" in names and calibrated else []
    pairs: Dict[str, list] = {}
    lesion_pairs: Dict[tuple, list] = {}
    rows, kept = evaluate_model(model, cases, methods, roi, args.overlap, args.sw_batch_size, args.device,
                                amp=args.device.startswith("cuda"), grid=(cfg.grid,) * 3, keep=keep,
                                head_pairs=pairs, head_sets=head_sets, exponents=exponents, gating=gating,
                                lesion_pairs=lesion_pairs)
    summary = summarize(rows, methods)
    print(format_table(summary))
    print(best_row_text(summary))
    if gating and gating["thresholds"]:
        print(threshold_text(gating))
    write_csv(os.path.join(args.out, "results.csv"), summary)
    write_per_case(os.path.join(args.out, "per_case.csv"), rows)
    from .gating import lesion_quality_rows

    quality = head_quality_rows(pairs) + lesion_quality_rows(lesion_pairs)
    if quality:
        print(format_head_quality(quality))
        write_head_quality(os.path.join(args.out, "head_quality.csv"), quality)
    table = write_component_table(os.path.join(args.out, "components.csv"), lesion_pairs,
                                  args.data if args.spacing is None else None, cases)
    if table:
        print("components:", table)
    if args.figure and keep:
        best = pick_figure_case(rows, cases, calibrated=calibrated)
        print("figure:", plot_comparison(best, kept[best.name], os.path.join(args.out, "fig4_comparison.png"),
                                         calibrated=calibrated))
        if quality:
            print("figure:", plot_reliability_figure(pairs, os.path.join(args.out, "reliability.png")))
    return summary
