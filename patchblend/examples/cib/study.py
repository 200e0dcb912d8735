"""The demo over several backbone seeds (``python -m patchblend.examples.cib study --out DIR --seeds 0,1``).

Each seed trains its own network (initialisation and training crops differ; the phantoms are the
same, written once under ``DIR/data``), fits its post-hoc heads and evaluates every method: a full
:func:`.demo.run_demo` in ``DIR/seed_N`` (without the training-length sweep). A seed whose
``results.csv`` and ``head_quality.csv`` already exist is read, not rerun, and an interrupted
training continues from its last checkpoint, so an interrupted study resumes. Writes

- ``DIR/study.csv``: ``heads,blending,seeds`` and the mean and standard deviation over seeds of
  ``dice, f1, fdr, sensitivity, detected, pred_lesions`` (``f1_mean, f1_std, ...``);
- ``DIR/study_head_quality.csv``: ``heads,head,seeds`` and mean and std of ``corr, auroc, ece``;
- ``DIR/study.txt``: both tables and the checks of the study's targets: the declared rows' F1 at least
  5 points above the better of average and gaussian, losing at most 5% of the lesions average finds;
  the primary gated row and the best predicted-weight row keeping ≥ 95% of average's detected
  lesions (on the mean over seeds) against ``+ GATED_MARGIN`` F1 points with a lower FDR.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, List

import numpy as np

from .data import InputError
from .demo import PRIMARY, PRIMARY_GATED, TEMPERED, DemoConfig, parse_config, run_demo
from .evaluate import LESION_FLOOR

__all__ = ["StudyConfig", "run_study", "aggregate"]

#: F1 points over max(average, gaussian) that the gated rows are held to (mean over seeds).
GATED_MARGIN = 8
STUDY_METRICS = ("dice", "f1", "fdr", "sensitivity", "detected", "pred_lesions")
QUALITY_METRICS = ("corr", "auroc", "ece")


@dataclass
class StudyConfig(DemoConfig):
    """The demo's settings plus the seeds (``--seeds 0,1,2``)."""

    out: str = "cib_study"
    seeds: str = "0,1"  #: backbone seeds, comma-separated (>= 2 for a standard deviation)
    sweep: bool = False  #: the training-length sweep per seed (off: it doubles the evaluation time)


def _read(path: str) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _mean_std(values: List[float]):
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan


def aggregate(per_seed: Dict[int, Dict[str, List[dict]]]) -> Dict[str, List[dict]]:
    """Mean and sample standard deviation over seeds of the per-seed ``results`` and ``quality`` rows
    (as read from the CSV files). Returns ``{"results": [...], "quality": [...]}``."""
    out: Dict[str, List[dict]] = {"results": [], "quality": []}
    for table, keys, metrics in (("results", ("heads", "blending"), STUDY_METRICS),
                                 ("quality", ("heads", "head"), QUALITY_METRICS)):
        order: List[tuple] = []
        for seed_rows in per_seed.values():
            for r in seed_rows[table]:
                k = tuple(r[x] for x in keys)
                if k not in order:
                    order.append(k)
        for k in order:
            rows = [r for seed_rows in per_seed.values() for r in seed_rows[table] if tuple(r[x] for x in keys) == k]
            row = dict(zip(keys, k))
            row["seeds"] = len(rows)
            for m in metrics:
                row[f"{m}_mean"], row[f"{m}_std"] = _mean_std([float(r[m]) for r in rows])
            out[table].append(row)
    return out


def _fmt(row: dict, m: str, digits: int = 1) -> str:
    mean, std = row[f"{m}_mean"], row[f"{m}_std"]
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if not math.isnan(std) else f"{mean:.{digits}f}"


def study_text(agg: Dict[str, List[dict]], seeds: List[int]) -> str:
    lines = [f"mean ± std over {len(seeds)} backbone seeds ({', '.join(map(str, seeds))})",
             f"{'heads':<15}{'blending':<11}{'Dice%':>14}{'F1%':>14}{'FDR%':>14}{'Sens%':>14}{'detected':>14}"]
    lines.append("-" * len(lines[-1]))
    for r in agg["results"]:
        lines.append(f"{r['heads']:<15}{r['blending']:<11}" + "".join(
            f"{_fmt(r, m):>14}" for m in ("dice", "f1", "fdr", "sensitivity", "detected")))
    lines += ["", f"{'heads':<14}{'head':<18}{'corr':>16}{'AUROC':>16}{'ECE':>16}"]
    lines.append("-" * len(lines[-1]))
    for r in agg["quality"]:
        lines.append(f"{r['heads']:<14}{r['head']:<18}" + "".join(f"{_fmt(r, m, 3):>16}" for m in QUALITY_METRICS))
    rows = {(r["heads"] + ":" + r["blending"]) if r["heads"] != "none" else r["blending"]: r for r in agg["results"]}
    if "average" in rows and "gaussian" in rows:
        lines.append("")
        for name in (PRIMARY, TEMPERED):
            if name not in rows:
                continue
            p, a, g = rows[name], rows["average"], rows["gaussian"]
            bar = max(a["f1_mean"], g["f1_mean"]) + 5
            lost = (a["detected_mean"] - p["detected_mean"]) / max(a["detected_mean"], 1e-9)
            lines.append(f"target: {name} F1 {p['f1_mean']:.1f} >= max(average, gaussian) + 5 = {bar:.1f}: "
                         f"{'met' if p['f1_mean'] >= bar else 'NOT met'}; lesions lost against average "
                         f"{100 * lost:.1f}% (<= 5%: {'met' if lost <= 0.05 else 'NOT met'})")
        a, g = rows["average"], rows["gaussian"]
        bar = max(a["f1_mean"], g["f1_mean"]) + GATED_MARGIN
        floor = LESION_FLOOR * a["detected_mean"]
        keeping = [(n, r) for n, r in rows.items() if r["heads"] not in ("none", "oracle")
                   and r["detected_mean"] >= floor]
        best = max(keeping, key=lambda kv: (kv[1]["f1_mean"], -kv[1]["fdr_mean"])) if keeping else None
        for label, item in (("primary gated row", (PRIMARY_GATED, rows.get(PRIMARY_GATED))),
                            (f"best row keeping >= {100 * LESION_FLOOR:.0f}% of average's lesions", best)):
            if not item or item[1] is None:
                lines.append(f"target ({label}): no such row")
                continue
            name, p = item
            kept = p["detected_mean"] / max(a["detected_mean"], 1e-9)
            ok = p["f1_mean"] >= bar and p["fdr_mean"] < min(a["fdr_mean"], g["fdr_mean"]) and kept >= LESION_FLOOR
            lines.append(f"target ({label}) {name}: F1 {p['f1_mean']:.1f} >= max(average, gaussian) + "
                         f"{GATED_MARGIN} = {bar:.1f}, FDR {p['fdr_mean']:.1f} < {min(a['fdr_mean'], g['fdr_mean']):.1f}, "
                         f"keeps {100 * kept:.1f}% of average's detected lesions (>= {100 * LESION_FLOOR:.0f}%): "
                         f"{'met' if ok else 'NOT met'}")
    return "\n".join(lines) + "\n"


def run_study(cfg: StudyConfig, log=print) -> dict:
    """Run (or resume) the study; returns ``{"aggregate", "per_seed", "text", "seconds"}``."""
    try:
        seeds = [int(s) for s in cfg.seeds.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--seeds must be comma-separated integers, got {cfg.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds must name distinct seeds, got {cfg.seeds!r}")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise InputError(f"--out {cfg.out!r} names an existing file, not a folder")
    t0 = time.time()
    data = cfg.data or os.path.join(cfg.out, "data")
    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    per_seed: Dict[int, Dict[str, List[dict]]] = {}
    seconds: Dict[int, float] = {}
    for seed in seeds:
        out = os.path.join(cfg.out, f"seed_{seed}")
        res, hq = os.path.join(out, "results.csv"), os.path.join(out, "head_quality.csv")
        if not (os.path.isfile(res) and os.path.isfile(hq)):
            log(f"=== seed {seed} -> {out}")
            demo_cfg = DemoConfig(**{**{k: v for k, v in dataclasses.asdict(cfg).items() if k in fields},
                                     "out": out, "seed": seed, "data": data, "resume": True})
            seconds[seed] = run_demo(demo_cfg, log=log)["seconds"]
        else:
            log(f"=== seed {seed}: reading {out}")
        per_seed[seed] = {"results": _read(res), "quality": _read(hq)}
    agg = aggregate(per_seed)
    os.makedirs(cfg.out, exist_ok=True)
    for name, rows in (("study.csv", agg["results"]), ("study_head_quality.csv", agg["quality"])):
        with open(os.path.join(cfg.out, name), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
    text = study_text(agg, seeds)
    total = time.time() - t0
    text += f"study time {total:.0f} s" + (
        " (" + ", ".join(f"seed {s}: {v:.0f} s" for s, v in seconds.items()) + ")" if seconds else "") + "\n"
    with open(os.path.join(cfg.out, "study.txt"), "w") as f:
        f.write(text)
    log(text)
    return {"aggregate": agg, "per_seed": per_seed, "text": text, "seconds": total}


def main(argv=None) -> dict:
    cfg = parse_config(argv, "python -m patchblend.examples.cib study", StudyConfig,
                       description=__doc__.split("\n")[0])
    return run_study(cfg)
