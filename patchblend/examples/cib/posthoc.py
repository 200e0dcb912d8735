"""Post-hoc calibration of the CIB V-Net's heads on held-out cases (``... cib calibrate``).

The network is frozen (eval mode, no autograd). Every window that inference would cut from the
held-out calibration cases (same window size and overlap) runs through it once;
:func:`patchblend.calibration.collect_calibration_data` caches the heads' fixed parts and the true Dice
of each window and cell, and :func:`patchblend.calibration.fit_heads` fits fresh heads' learned parts.
The calibration cases must not be the test cases: they play the role of a validation set, as for
temperature scaling.
"""
from __future__ import annotations

import argparse
import copy
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from patchblend.calibration import collect_calibration_data, fit_heads
from patchblend.heads import AwareGridHead, AwarePatchHead, GridHead, PatchHead

from .data import Case, InputError, check_device, load_cases, network_input
from .model import OUTPUT_NEW, CIBVNet, head_scores

__all__ = ["window_batches", "HeadAdapter", "fit_posthoc_heads", "save_heads", "load_heads", "load_gating",
           "choose_gates", "POSTHOC_KINDS"]

POSTHOC_KINDS = ("aware", "paper", "aware-fine")
#: Cells per axis of the ``aware-fine`` grid head: with the example's 32³ windows, 8³-voxel cells, nearer the
#: size of the small lesions the gate judges (the ``aware`` heads use the model's grid, 2×2×2: 16³ cells).
FINE_GRID = (4, 4, 4)
#: Head family (what :func:`.model.head_scores` runs) of each post-hoc kind.
HEAD_FAMILY = {"aware": "aware", "paper": "paper", "aware-fine": "aware"}


def _starts(size: int, roi: int, step: int) -> List[int]:
    if size <= roi:
        return [0]
    starts = list(range(0, size - roi + 1, step))
    if starts[-1] != size - roi:
        starts.append(size - roi)
    return starts


def window_batches(cases: Sequence[Case], roi: Sequence[int], overlap: float = 0.5, batch_size: int = 16
                   ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``(x [b, 3, *roi], label [b, 1, *roi])`` batches of every sliding window of every case (step
    ``roi · (1 − overlap)`` as the driver; windows that stick out are zero padded)."""
    roi = [int(r) for r in roi]
    steps = [max(int(r * (1 - overlap)), 1) for r in roi]
    xs, ys = [], []
    for case in cases:
        x = network_input(case.t1, case.t2)
        y = torch.as_tensor(case.label, dtype=torch.float32)[None]
        shape = case.label.shape
        for a in _starts(shape[0], roi[0], steps[0]):
            for b in _starts(shape[1], roi[1], steps[1]):
                for c in _starts(shape[2], roi[2], steps[2]):
                    src = (slice(a, a + roi[0]), slice(b, b + roi[1]), slice(c, c + roi[2]))
                    wx = torch.zeros(3, *roi)
                    wy = torch.zeros(1, *roi)
                    part = x[(slice(None),) + src]
                    dst = tuple(slice(0, n) for n in part.shape[1:])
                    wx[(slice(None),) + dst] = part
                    wy[(slice(None),) + dst] = y[(slice(None),) + src]
                    xs.append(wx)
                    ys.append(wy)
                    if len(xs) == batch_size:
                        yield torch.stack(xs), torch.stack(ys)
                        xs, ys = [], []
    if xs:
        yield torch.stack(xs), torch.stack(ys)


class HeadAdapter(nn.Module):
    """The CIB V-Net seen through one head pair, in the form :mod:`patchblend.calibration` expects:
    ``calibration_inputs(x)`` → ``(new-lesion probability [B, 1, *P], patch summary, grid summary)``."""

    def __init__(self, model: CIBVNet, kind: str, patch_head: nn.Module, grid_head: nn.Module):
        super().__init__()
        self.model, self.kind, self.patch_head, self.grid_head = model, kind, patch_head, grid_head

    def calibration_inputs(self, x: torch.Tensor):
        logits, bottleneck, last = self.model.run(x)
        prob = torch.softmax(logits[:, OUTPUT_NEW].float(), dim=1)[:, 1:2]
        patch_s, grid_s = head_scores(self.kind, self.patch_head, self.grid_head, prob, bottleneck.float(),
                                      last.float(), summaries=True)
        return prob, patch_s, grid_s


def new_heads(kind: str, model: CIBVNet, grid: Optional[Sequence[int]] = None) -> Tuple[nn.Module, nn.Module]:
    """Fresh heads of ``kind`` (a post-hoc kind, or a head family) shaped for ``model``; the grid head has
    ``grid`` cells per axis (default: :data:`FINE_GRID` for ``aware-fine``, else the model's grid)."""
    w = model.width
    if grid is None:
        grid = FINE_GRID if kind == "aware-fine" else model.grid_head.grid
    grid = tuple(int(g) for g in grid)
    if kind == "paper":
        return PatchHead(16 * w), GridHead(w, grid=grid)
    if kind in ("aware", "aware-fine"):
        return AwarePatchHead(w), AwareGridHead(w, grid=grid)
    raise ValueError(f"kind must be one of {POSTHOC_KINDS}, got {kind!r}")


def model_heads(model: CIBVNet, kind: str):
    """The model's jointly trained ``(patch_head, grid_head)`` of ``kind`` (``None`` if it has none)."""
    if kind == "paper":
        return model.patch_head, model.grid_head
    return (model.aware_patch_head, model.aware_grid_head) if getattr(model, "aware_heads", False) else None


def fit_posthoc_heads(model: CIBVNet, cases: Sequence[Case], kinds: Sequence[str] = POSTHOC_KINDS,
                      roi: Sequence[int] = (32, 32, 32), overlap: float = 0.5, epochs: Dict[str, int] = None,
                      lr: float = 1e-2, seed: int = 0, device="cpu", progress: bool = False, log=print,
                      warm_start: Sequence[str] = ("paper",)) -> Dict[str, tuple]:
    """Fit head pairs of each kind on the windows of ``cases`` with ``model`` frozen.

    ``epochs``: per kind (default ``{"aware": 300, "paper": 10}``: the paper grid head convolves the
    full-size decoder feature of every window at every step, the aware heads only read cached
    statistics). Kinds in ``warm_start`` start from copies of the model's jointly trained heads (the
    paper's, refitted), the others from fresh heads (seeded by ``seed``). Returns
    ``{"<kind>-posthoc": (kind, patch_head, grid_head)}`` (heads in eval mode)."""
    epochs = {"aware": 300, "paper": 10, **(epochs or {})}
    if not cases:
        raise ValueError("cases is empty: post-hoc calibration needs held-out cases")
    model.eval()
    out = {}
    for kind in kinds:
        torch.manual_seed(seed)
        if kind in warm_start:
            joint = model_heads(model, kind)
            if joint is None:
                raise ValueError(f"warm start of the {kind} heads: the model has none")
            patch_head, grid_head = (copy.deepcopy(h).to(device) for h in joint)
        else:
            patch_head, grid_head = (h.to(device) for h in new_heads(kind, model))
        family = HEAD_FAMILY[kind]
        adapter = HeadAdapter(model, family, patch_head, grid_head)
        data = collect_calibration_data(adapter, window_batches(cases, roi, overlap), device="cpu", progress=progress)
        n_epochs = epochs.get(kind, epochs[family])
        history = fit_heads(patch_head, grid_head, data, epochs=n_epochs, lr=lr, seed=seed, progress=progress,
                            batch_size=256 if family == "aware" else 64)
        log(f"      {kind}-posthoc heads: {len(data)} windows, {n_epochs} epochs, "
            f"MSE patch {history['patch_mse'][-1]:.4f}, grid {history['grid_mse'][-1]:.4f}")
        out[f"{kind}-posthoc"] = (family, patch_head.eval(), grid_head.eval())
    return out


def save_heads(path: str, heads: Dict[str, tuple], meta: dict = None) -> str:
    """Write ``{name: (kind, patch_head, grid_head)}`` (state dicts, and the grid head's cells per axis: its
    weights are shared over cells, so they alone do not say the grid) to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"posthoc_heads": {name: {"kind": kind, "patch": ph.state_dict(), "grid": gh.state_dict(),
                                         "cells": list(gh.grid)}
                                  for name, (kind, ph, gh) in heads.items()}, "meta": meta or {}}, path)
    return path


def load_heads(path: str, model: CIBVNet, device="cpu", with_exponents: bool = False):
    """Read what :func:`save_heads` wrote, for ``model``; a wrong file raises :class:`~.data.InputError`.
    With ``with_exponents``: ``(heads, {(tempered head set, weighting): γ})`` (the tempered sets added to
    ``heads``, sharing the post-hoc heads)."""
    if not os.path.isfile(path):
        raise InputError(f"post-hoc heads file {path!r} does not exist")
    try:
        blob = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise InputError(f"cannot read post-hoc heads {path!r} ({type(e).__name__})") from None
    if not isinstance(blob, dict) or "posthoc_heads" not in blob:
        raise InputError(f"{path!r} is not a post-hoc heads file (written by demo or calibrate)")
    out = {}
    for name, entry in blob["posthoc_heads"].items():
        ph, gh = new_heads(entry["kind"], model, entry.get("cells"))
        try:
            ph.load_state_dict(entry["patch"])
            gh.load_state_dict(entry["grid"])
        except RuntimeError:
            raise InputError(f"{path!r}: the {name} heads do not fit this checkpoint's width") from None
        out[name] = (entry["kind"], ph.to(device).eval(), gh.to(device).eval())
    if not with_exponents:
        return out
    exponents = {tuple(k.split(":", 1)): float(g) for k, g in blob.get("meta", {}).get("exponents", {}).items()}
    for h, _ in exponents:
        source = h.replace("-tempered", "-posthoc")
        if source in out:
            out[h] = out[source]
    return out, {k: g for k, g in exponents.items() if k[0] in out}


def load_gating(path: str) -> dict:
    """The gate thresholds and lesion heads saved with the post-hoc heads (:func:`choose_gates`), as
    :func:`.gating.fit_gating` returns them; empty when the file has none (written before gating)."""
    from .gating import gating_from_state

    blob = torch.load(path, map_location="cpu", weights_only=False)
    try:
        return gating_from_state(blob.get("meta", {}).get("gating"))
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path!r}: unreadable gating entry ({e})") from None


def choose_gates(model: CIBVNet, head_sets: Dict[str, tuple], cases: Sequence[Case], roi: Sequence[int],
                 overlap: float = 0.5, sw_batch_size: int = 8, device="cpu", gate_sets: Sequence[str] = (),
                 progress: bool = False, log=print, atlas: bool = True) -> dict:
    """Lesion heads and gate thresholds τ of the gated rows of ``gate_sets`` (head sets of ``head_sets``,
    or ``"oracle"``), fitted on the held-out calibration ``cases`` only (:func:`.gating.fit_gating`); with
    ``atlas`` the lesion heads also read the registered template's white matter (:mod:`.atlas`)."""
    from .evaluate import evaluate_model
    from .gating import fit_gating

    components: Dict[str, list] = {}
    evaluate_model(model, cases, ["average"], roi, overlap, sw_batch_size, device, grid=model.grid_head.grid,
                   progress=progress, head_sets=head_sets, components=components, component_sets=tuple(gate_sets),
                   atlas=atlas)
    return fit_gating(components, log=log)


def main(argv=None):
    from .evaluate import check_overlap, check_roi
    from .train import load_checkpoint

    p = argparse.ArgumentParser(prog="python -m patchblend.examples.cib calibrate",
                                description="Fit the heads post hoc on held-out cases, the network frozen.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train (last.pt)")
    p.add_argument("--data", required=True, help="held-out two-time-point cases (not the test cases)")
    p.add_argument("--out", default="posthoc_heads.pt", help="file to write")
    p.add_argument("--kinds", default="aware,paper", help="head kinds to fit: aware, paper")
    p.add_argument("--roi", type=int, default=None,
                   help="window size, a positive multiple of 16 (default: the training patch size)")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=None, help="epochs for every kind (default: aware 300, paper 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temper", action=argparse.BooleanOptionalAction, default=True,
                   help="also choose the weight powers of the tempered head sets on these cases")
    p.add_argument("--gate", action=argparse.BooleanOptionalAction, default=True,
                   help="also fit the lesion heads and gate thresholds of the gated rows on these cases")
    p.add_argument("--atlas", action=argparse.BooleanOptionalAction, default=True,
                   help="the lesion heads also read the template's white matter registered to each case")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in POSTHOC_KINDS]
    if bad or not kinds:
        raise InputError(f"--kinds must name some of {','.join(POSTHOC_KINDS)}, got {args.kinds!r}")
    check_overlap(args.overlap)
    if args.roi is not None:  # (0 is an error, not the default)
        check_roi(args.roi)
    if args.epochs is not None and args.epochs < 1:
        raise InputError(f"--epochs must be an int >= 1, got {args.epochs}")
    check_device(args.device)
    if os.path.isdir(args.out):
        raise InputError(f"--out {args.out!r} is a folder; name the file to write")
    if not os.path.isdir(args.data):
        raise InputError(f"--data {args.data!r} is not an existing folder")
    model, cfg, _ = load_checkpoint(args.ckpt, args.device)
    cases = [c for c in load_cases(args.data) if not c.single]
    if not cases:
        raise InputError(f"--data {args.data!r} holds no two-time-point cases")
    epochs = {k: args.epochs for k in kinds} if args.epochs is not None else None
    roi = (cfg.patch if args.roi is None else args.roi,) * 3
    heads = fit_posthoc_heads(model, cases, kinds, roi, args.overlap, epochs,
                              seed=args.seed, device=args.device, progress=True)
    exps = choose_exponents(model, heads, cases, roi, args.overlap, device=args.device) if args.temper else {}
    if exps:
        print("weight powers: " + ", ".join(f"{h}:{w} {g}" for (h, w), g in exps.items()))
    gating = {}
    if args.gate:
        from .evaluate import GATED_HEAD_SETS
        from .gating import gating_state

        gating = gating_state(choose_gates(model, heads, cases, roi, args.overlap, device=args.device,
                                           gate_sets=[h for h in GATED_HEAD_SETS if h in heads or h == "oracle"],
                                           atlas=args.atlas))
    print(save_heads(args.out, heads, {"ckpt": os.path.abspath(args.ckpt), "cases": [c.name for c in cases],
                                       "exponents": {f"{h}:{w}": g for (h, w), g in exps.items()},
                                       "gating": gating}))
    return heads


#: Exponents tried by :func:`choose_exponents` (0 would be average blending).
EXPONENTS = (0.125, 0.25, 0.5, 1.0)


def choose_exponents(model: CIBVNet, posthoc: Dict[str, tuple], cases: Sequence[Case], roi: Sequence[int],
                     overlap: float = 0.5, sw_batch_size: int = 8, device="cpu", exponents: Sequence[float] = EXPONENTS,
                     keep: float = 0.95, progress: bool = False) -> Dict[Tuple[str, str], float]:
    """Per post-hoc head set and weighting, the power ``γ`` of the weights chosen on held-out ``cases``.

    Blending divides by the overlap count, so weights below 1 pull every voxel down: calibrated heads
    that score a window with a true lesion and a false positive at 0.5 halve the lesion too, and small
    lesions drop under the threshold or the minimum size. ``w ** γ`` with ``γ < 1`` keeps the order of
    the weights but pulls them towards 1 (``γ → 0`` is average blending). For each ``(head set,
    weighting)`` the ``γ`` in ``exponents`` with the best mean lesion F1 on ``cases`` among those that
    detect at least ``keep`` of the lesions average blending detects there; if none does, the
    smallest ``γ``. Returns ``{("<kind>-tempered", weighting): γ}``. ``cases`` must be held-out
    calibration cases (never the test cases)."""
    from .evaluate import WEIGHTINGS, evaluate_model, method_name, summarize

    head_sets = {f"{name}@{g}": heads for name, heads in posthoc.items() for g in exponents}
    exps = {(f"{name}@{g}", w): g for name, heads in posthoc.items() for g in exponents for w in WEIGHTINGS}
    methods = [("none", "average")] + sorted(exps)
    rows, _ = evaluate_model(model, cases, [method_name(m) for m in methods], roi, overlap, sw_batch_size, device,
                             grid=model.grid_head.grid, progress=progress, head_sets=head_sets, exponents=exps)
    summary = {(r["heads"], r["blending"]): r for r in summarize(rows, methods)}
    floor = keep * summary[("none", "average")]["detected"]
    chosen = {}
    for name in posthoc:
        for w in WEIGHTINGS:
            stats = {g: (summary[(f"{name}@{g}", w)]["f1"], summary[(f"{name}@{g}", w)]["detected"]) for g in exponents}
            chosen[(name.replace("-posthoc", "-tempered"), w)] = select_exponent(stats, floor)
    return chosen


def select_exponent(stats: Dict[float, Tuple[float, float]], floor: float) -> float:
    """``stats = {γ: (F1, detected lesions)}`` → the ``γ`` with the best F1 among those detecting at least
    ``floor`` lesions (ties: the smaller ``γ``, the gentler weights); the smallest ``γ`` if none does."""
    ok = [g for g, (_, detected) in stats.items() if detected >= floor]
    if not ok:
        return min(stats)
    return max(ok, key=lambda g: (stats[g][0], -g))
