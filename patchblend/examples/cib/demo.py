"""The end-to-end demo (``python -m patchblend.examples.cib demo --out DIR``).

1. writes three phantom sets (:mod:`.phantom`) under ``DIR/data``: training cases (two-time-point
   and single-time-point, ``standard`` preset), held-out **calibration** cases and held-out **test**
   cases (both two-time-point, of the ``--preset``, default ``hard``; other seeds);
2. trains one CIB V-Net (:mod:`.train`) with both head kinds (``paper`` and the prediction-aware
   ``aware``, trained jointly), checkpoint in ``DIR/model``;
3. fits both head kinds again **post hoc** on the calibration cases with the network frozen
   (:mod:`.posthoc`; ``DIR/model/posthoc_heads.pt``);
4. evaluates every method (:data:`.evaluate.METHODS`: average, gaussian, and patch / grid /
   patch*grid weights from each head set and from the oracle) on the test cases with that one
   network, and writes ``DIR/results.csv`` (``heads,blending,...``), ``DIR/per_case.csv``,
   ``DIR/head_quality.csv`` (``heads,head,corr,auroc,ece,...``), ``DIR/components.csv`` (every component of
   average's prediction under every gated row, with the phantom object it lies on), ``DIR/fig4_comparison.png``,
   ``DIR/reliability.png`` and ``DIR/summary.txt``;
5. with ``sweep`` (default on), evaluates the intermediate checkpoints too (``DIR/training_length.csv``).

With ``gate`` (default on) step 3 also fits the gated rows' lesion heads and thresholds τ on the
calibration cases (:mod:`.gating`) and step 4 evaluates the gated rows; the figure then shows the
primary gated row (:data:`.evaluate.PRIMARY_GATED`) beside average.

The primary calibrated method, declared before any run, is ``aware-posthoc:patch*grid``; the summary
compares it (and the best of the predicted-weight rows) with ``average`` and ``gaussian``.

Presets: the default is sized for a 2-core CPU; ``--quick`` is a smoke test (seconds); ``--full`` is
the paper's configuration (80³ patches, width 16, 10k + 10k iterations, batch 4 + 4, lr 1e-2, 1 mm
phantoms) for a GPU (``--device cuda``). Any option given on the command line overrides the preset.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, List

import torch

from .data import InputError, load_cases
from .evaluate import (GATED_HEAD_SETS, GATES, METHODS, PRIMARY_GATED, best_row_text, check_overlap, check_roi, evaluate_model, format_head_quality, format_table,
                       head_quality_rows, method_name, model_head_sets, pick_figure_case, plot_comparison,
                       plot_reliability_figure, summarize, threshold_text, write_component_table, write_csv, write_head_quality,
                       write_per_case)
from .gating import gating_state, lesion_quality_rows
from .phantom import PHANTOM_PRESETS, phantom_preset, write_phantom_set
from .posthoc import POSTHOC_KINDS, choose_exponents, choose_gates, fit_posthoc_heads, save_heads
from .train import TrainConfig, add_config_arguments, check_out_folder, train

__all__ = ["DemoConfig", "PRESETS", "PRIMARY", "PRIMARY_GATED", "TEMPERED", "run_demo", "prepare_data"]

#: The calibrated method the demo's claims are about, fixed before the first run (no choice on the test cases).
PRIMARY = "aware-posthoc:patch*grid"
#: Added after the first run showed that PRIMARY loses lesions: the same heads with tempered weights,
#: the power chosen on the calibration cases (:func:`.posthoc.choose_exponents`).
TEMPERED = "aware-tempered:patch*grid"


@dataclass
class DemoConfig:
    """Demo settings (the default preset; see :data:`PRESETS`)."""

    out: str = "cib_demo"
    n_train_two: int = 8  #: two-time-point training phantoms (standard preset)
    n_train_single: int = 8  #: single-time-point training phantoms (standard preset)
    n_cal: int = 16  #: held-out calibration phantoms (``preset``), for the post-hoc heads
    n_test: int = 20  #: held-out test phantoms (``preset``)
    preset: str = "hard"  #: phantom preset of the calibration and test cases (``standard`` or ``hard``)
    downsample: float = 2.5  #: phantom voxel size (mm)
    data_seed: int = 0  #: seed of the phantoms (training: this, test: +1000, calibration: +2000)
    data: str = ""  #: phantom folder to use / write (default ``OUT/data``; the study shares one)
    width: int = 4
    patch: int = 32
    batch_two: int = 4
    batch_single: int = 4
    stage1_iters: int = 600
    stage2_iters: int = 600
    lr: float = 3e-3
    overlap: float = 0.5
    sw_batch_size: int = 8
    posthoc: str = "aware,paper"  #: head kinds fitted post hoc ("" for none)
    posthoc_epochs: int = 300  #: epochs of the aware post-hoc heads (cached statistics: fast)
    #: epochs of the paper post-hoc heads, warm-started from the joint ones (their grid head convolves the
    #: full decoder feature of every window at every step: about 5 s per epoch here)
    paper_posthoc_epochs: int = 10
    device: str = "cpu"
    #: torch CPU threads (0 = torch's default). One thread by default: on a shared 2-core machine, two
    #: OpenMP threads competing with other processes ran a training step up to 10x slower than one.
    threads: int = 1
    seed: int = 0  #: seed of the network's initialisation, the training crops and the post-hoc heads
    progress: bool = True
    sweep: bool = True  #: also evaluate the intermediate checkpoints (``DIR/training_length.csv``)
    #: continue from ``DIR/model/last.pt`` if it exists (a finished training is then not repeated)
    resume: bool = False
    #: also evaluate the post-hoc heads with tempered weights (``w ** γ``, γ chosen on the calibration cases)
    temper: bool = True
    #: also evaluate the gated rows (lesion heads and τ fitted on the calibration cases, :mod:`.gating`)
    gate: bool = True
    #: the lesion heads also read the template's white matter registered to each case (:mod:`.atlas`)
    atlas: bool = True


PRESETS = {
    "default": {},
    "quick": dict(n_train_two=1, n_train_single=1, n_cal=1, n_test=2, downsample=4.0, width=2, patch=16,
                  batch_two=1, batch_single=1, stage1_iters=2, stage2_iters=2, sw_batch_size=8, posthoc_epochs=3,
                  paper_posthoc_epochs=1),
    "full": dict(n_train_two=32, n_train_single=32, n_cal=16, n_test=20, downsample=1.0, width=16, patch=80,
                 batch_two=4, batch_single=4, stage1_iters=10000, stage2_iters=10000, lr=1e-2, sw_batch_size=4,
                 threads=0),
}

#: Methods evaluated on the intermediate checkpoints (``training_length.csv``).
SWEEP_METHODS = ("average", "gaussian", "paper:patch*grid", "aware:patch*grid", "oracle:grid")


def check_config(cfg: DemoConfig) -> DemoConfig:
    """Refuse bad settings with one-line :class:`~.data.InputError` messages."""
    check_out_folder(cfg.out)
    if cfg.preset not in PHANTOM_PRESETS:
        raise InputError(f"--preset must be one of {', '.join(PHANTOM_PRESETS)}, got {cfg.preset!r}")
    check_roi(cfg.patch, "--patch")
    check_overlap(cfg.overlap)
    for name in ("n_train_two", "n_train_single", "n_cal", "n_test", "stage1_iters", "stage2_iters"):
        if getattr(cfg, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.n_test < 1 or cfg.n_train_two + cfg.n_train_single < 1:
        raise InputError("the demo needs at least one training case and one test case")
    kinds = [k for k in cfg.posthoc.split(",") if k.strip()]
    if any(k.strip() not in POSTHOC_KINDS for k in kinds):
        raise InputError(f"--posthoc must name some of {','.join(POSTHOC_KINDS)} (or be empty), got {cfg.posthoc!r}")
    if kinds and cfg.n_cal < 1:
        raise InputError("--posthoc needs calibration cases (--n-cal >= 1)")
    if cfg.width < 1 or cfg.sw_batch_size < 1:
        raise InputError("--width and --sw-batch-size must be >= 1")
    return cfg


def _write_set(root: str, n_two: int, n_single: int, seed: int, pcfg, prefix: str, progress: bool) -> None:
    """Write a phantom set unless ``root`` already holds the same one (same seed, counts and settings)."""
    stamp = {"seed": seed, "n_two": n_two, "n_single": n_single, **asdict(pcfg)}
    stamp = json.loads(json.dumps(stamp))  # tuples as lists, as read back
    marker = os.path.join(root, "phantom_set.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == stamp:
                return
    write_phantom_set(root, n_two, n_single, seed=seed, config=pcfg, prefix=prefix, progress=progress)
    with open(marker, "w") as f:
        json.dump(stamp, f, indent=1)


def prepare_data(cfg: DemoConfig, log=print) -> Dict[str, list]:
    """Write (or reuse) the three phantom sets; returns ``{"train", "cal", "test"}`` lists of cases."""
    data = cfg.data or os.path.join(cfg.out, "data")
    train_cfg = phantom_preset("standard", downsample=cfg.downsample)
    eval_cfg = phantom_preset(cfg.preset, downsample=cfg.downsample)
    log(f"[1/4] phantoms: {cfg.n_train_two} + {cfg.n_train_single} training (standard), {cfg.n_cal} calibration "
        f"and {cfg.n_test} test ({cfg.preset}), {cfg.downsample} mm voxels -> {data}")
    _write_set(os.path.join(data, "train"), cfg.n_train_two, cfg.n_train_single, cfg.data_seed, train_cfg, "train",
               cfg.progress)
    _write_set(os.path.join(data, f"test_{cfg.preset}"), cfg.n_test, 0, cfg.data_seed + 1000, eval_cfg, "test",
               cfg.progress)
    sets = {"train": load_cases(os.path.join(data, "train")),
            "test": load_cases(os.path.join(data, f"test_{cfg.preset}"))}
    if cfg.n_cal:
        _write_set(os.path.join(data, f"cal_{cfg.preset}"), cfg.n_cal, 0, cfg.data_seed + 2000, eval_cfg, "cal",
                   cfg.progress)
        sets["cal"] = load_cases(os.path.join(data, f"cal_{cfg.preset}"))
    else:
        sets["cal"] = []
    return sets


def _compare(summary: List[dict], name: str) -> str:
    rows = {method_name((r["heads"], r["blending"])): r for r in summary}
    if name not in rows:
        return ""
    c = rows[name]
    parts = []
    for base in ("average", "gaussian"):
        if base in rows:
            b = rows[base]
            parts.append(f"{base}: F1 {c['f1'] - b['f1']:+.1f}, FDR {c['fdr'] - b['fdr']:+.1f}, detected "
                         f"{int(c['detected'] - b['detected']):+d} of {int(b['gt_lesions'])} lesions")
    return f"{name} against " + "; ".join(parts)


def compare_text(summary: List[dict]) -> str:
    """The primary method and the best predicted-weight row (by F1) against average and gaussian."""
    predicted = [r for r in summary if r["heads"] not in ("none", "oracle")]
    lines = [_compare(summary, PRIMARY), _compare(summary, TEMPERED), _compare(summary, PRIMARY_GATED),
             best_row_text(summary)]
    if predicted:
        best = max(predicted, key=lambda r: (r["f1"], -r["fdr"]))
        name = method_name((best["heads"], best["blending"]))
        if name not in (PRIMARY, TEMPERED, PRIMARY_GATED):
            lines.append("best predicted row: " + _compare(summary, name))
    return "\n".join(x for x in lines if x)


def run_demo(cfg: DemoConfig, log=print) -> dict:
    """Run the demo; returns ``{"summary", "rows", "results", "head_quality", "quality", "figure",
    "reliability", "train_seconds", "seconds"}``."""
    check_config(cfg)
    t0 = time.time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    sets = prepare_data(cfg, log)
    train_cases, cal_cases, test_cases = sets["train"], sets["cal"], sets["test"]
    log(f"      case size {train_cases[0].t1.shape} voxels after the brain crop")

    tcfg = TrainConfig(data="", out=os.path.join(cfg.out, "model"), width=cfg.width,
                       patch=cfg.patch, batch_two=cfg.batch_two, batch_single=cfg.batch_single,
                       stage1_iters=cfg.stage1_iters, stage2_iters=cfg.stage2_iters, lr=cfg.lr, device=cfg.device,
                       threads=cfg.threads, seed=cfg.seed, progress=cfg.progress,
                       ckpt_every=max((cfg.stage1_iters + cfg.stage2_iters) // 4, 1), keep_snapshots=cfg.sweep,
                       resume=cfg.resume)
    log(f"[2/4] training: width {cfg.width}, patch {cfg.patch}^3, {cfg.stage1_iters} + {cfg.stage2_iters} "
        f"iterations, batch {cfg.batch_two} + {cfg.batch_single}, paper and aware heads, {cfg.device}")
    t1 = time.time()
    ckpt = train(tcfg, cases=train_cases, log=log)
    train_seconds = time.time() - t1

    from .train import load_checkpoint

    model, _, _ = load_checkpoint(ckpt, cfg.device)
    roi = (cfg.patch,) * 3
    kinds = [k.strip() for k in cfg.posthoc.split(",") if k.strip()]
    posthoc, exponents, gating = {}, {}, None
    if kinds:
        log(f"[3/4] post-hoc heads ({', '.join(kinds)}) on {len(cal_cases)} held-out calibration cases, network frozen")
        posthoc = fit_posthoc_heads(model, cal_cases, kinds, roi, cfg.overlap,
                                    {"aware": cfg.posthoc_epochs, "paper": cfg.paper_posthoc_epochs},
                                    seed=cfg.seed, device=cfg.device, progress=cfg.progress, log=log)
        if cfg.temper:
            exponents = choose_exponents(model, posthoc, cal_cases, roi, cfg.overlap, cfg.sw_batch_size, cfg.device,
                                         progress=cfg.progress)
            log("      weight powers chosen on the calibration cases: " + ", ".join(
                f"{h}:{w} {g}" for (h, w), g in exponents.items()))
        if cfg.gate:
            gating = choose_gates(model, posthoc, cal_cases, roi, cfg.overlap, cfg.sw_batch_size, cfg.device,
                                  gate_sets=[h for h in GATED_HEAD_SETS if h in posthoc or h == "oracle"],
                                  progress=cfg.progress, log=log, atlas=cfg.atlas)
        save_heads(os.path.join(cfg.out, "model", "posthoc_heads.pt"), posthoc,
                   {"cases": [c.name for c in cal_cases], "exponents": {f"{h}:{w}": g for (h, w), g in exponents.items()},
                    "gating": gating_state(gating) if gating else {}})
    tempered = {h: posthoc[h.replace("-tempered", "-posthoc")] for h, _ in exponents}
    head_sets = model_head_sets(model, {**posthoc, **tempered})
    methods = [m for m in METHODS if m[0] in ("none", "oracle", *head_sets)
               and (m[1] not in GATES or (gating and m in gating["thresholds"]))]
    names = [method_name(m) for m in methods]
    calibrated = next(n for n in (PRIMARY_GATED, PRIMARY, "paper:patch*grid") if n in names)
    log(f"[4/4] evaluating {len(methods)} methods on {len(test_cases)} held-out {cfg.preset} cases")
    pairs: Dict[str, list] = {}
    lesion_pairs: Dict[tuple, list] = {}
    rows, kept = evaluate_model(model, test_cases, methods, roi, cfg.overlap, cfg.sw_batch_size,
                                cfg.device, amp=cfg.device.startswith("cuda"), progress=cfg.progress,
                                keep=("average", calibrated), head_pairs=pairs, head_sets=head_sets,
                                exponents=exponents, gating=gating, lesion_pairs=lesion_pairs)
    summary = summarize(rows, methods)
    results = write_csv(os.path.join(cfg.out, "results.csv"), summary)
    write_per_case(os.path.join(cfg.out, "per_case.csv"), rows)
    quality = head_quality_rows(pairs) + lesion_quality_rows(lesion_pairs)
    hq_path = write_head_quality(os.path.join(cfg.out, "head_quality.csv"), quality)
    write_component_table(os.path.join(cfg.out, "components.csv"), lesion_pairs,
                          os.path.join(cfg.data or os.path.join(cfg.out, "data"), f"test_{cfg.preset}"), test_cases)

    case = pick_figure_case(rows, test_cases, calibrated=calibrated)
    figure = plot_comparison(case, kept[case.name], os.path.join(cfg.out, "fig4_comparison.png"),
                             calibrated=calibrated)
    reliability = plot_reliability_figure(pairs, os.path.join(cfg.out, "reliability.png"))
    sweep_text = _training_length(cfg, test_cases, rows, log) if cfg.sweep else ""
    seconds = time.time() - t0
    text = (f"{format_table(summary)}\n\n{len(test_cases)} held-out {cfg.preset} phantoms; Dice, HD95 (voxels), F1, "
            f"FDR: means over cases; Sens = detected / ground-truth lesions pooled; TP/pred = true / predicted "
            f"lesions, det/GT = detected / ground-truth lesions (summed).\n{compare_text(summary)}\n"
            + ("weight powers γ of the tempered rows (chosen on the calibration cases): "
               + ", ".join(f"{h}:{w} {g}" for (h, w), g in exponents.items()) + "\n" if exponents else "")
            + (threshold_text(gating) + "\n" if gating and gating["thresholds"] else "") + "\n"
            f"head quality on the test windows (AUROC: spotting true Dice < 0.5; ECE over 10 bins; lesion:* rows: "
            f"per component of average's prediction, spotting false positives):\n"
            f"{format_head_quality(quality)}\n\n"
            f"training {train_seconds:.0f} s, total {seconds:.0f} s on {cfg.device} "
            f"({torch.get_num_threads()} threads)\n{sweep_text}")
    with open(os.path.join(cfg.out, "summary.txt"), "w") as f:
        f.write(text)
    log(text)
    log(f"results: {results}\nhead quality: {hq_path}\nfigures: {figure}, {reliability}")
    return {"summary": summary, "rows": rows, "results": results, "head_quality": hq_path, "quality": quality,
            "figure": figure, "reliability": reliability, "train_seconds": train_seconds, "seconds": seconds}


def _training_length(cfg: DemoConfig, test_cases, final_rows, log) -> str:
    """Evaluate every kept snapshot (``iter_*.pt``) with :data:`SWEEP_METHODS`: does calibrated blending
    help more or less as training goes on? Writes ``DIR/training_length.csv`` (``iteration,stage,`` then
    the columns of ``results.csv``); returns a compact table.

    Before stage 2 the grid heads are untrained (their scores are meaningless), so grid blendings of
    those snapshots are shown for completeness only."""
    import csv
    import glob

    from .evaluate import RESULT_COLUMNS, parse_methods
    from .train import load_checkpoint

    methods = parse_methods(SWEEP_METHODS)
    model_dir = os.path.join(cfg.out, "model")
    snaps = sorted(glob.glob(os.path.join(model_dir, "iter_*.pt")))
    all_rows = []
    for path in snaps:
        it = int(os.path.basename(path)[5:11])
        if it == cfg.stage1_iters + cfg.stage2_iters:
            rows = final_rows
        else:
            model, _, _ = load_checkpoint(path, cfg.device)
            rows, _ = evaluate_model(model, test_cases, methods, (cfg.patch,) * 3, cfg.overlap, cfg.sw_batch_size,
                                     cfg.device, amp=cfg.device.startswith("cuda"), progress=cfg.progress)
        for r in summarize(rows, methods):
            all_rows.append({"iteration": it, "stage": 1 if it <= cfg.stage1_iters else 2,
                             **{k: r[k] for k in ("heads", "blending", *RESULT_COLUMNS)}})
    if not all_rows:
        return ""
    with open(os.path.join(cfg.out, "training_length.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(all_rows[0].keys()))
        w.writeheader()
        w.writerows(all_rows)
    short = {"average": "avg", "gaussian": "gauss", "paper:patch*grid": "pap-pg", "aware:patch*grid": "awa-pg",
             "oracle:grid": "orc-g"}
    head = f"{'iter':>6} {'st':>2} | " + " ".join(f"{short[n]:>6}" for n in SWEEP_METHODS) + " | " + \
        " ".join(f"{short[n]:>6}" for n in SWEEP_METHODS)
    lines = ["lesion F1 % (left) and FDR % (right) by training length:", head, "-" * len(head)]
    for it in sorted({r["iteration"] for r in all_rows}):
        sel = {method_name((r["heads"], r["blending"])): r for r in all_rows if r["iteration"] == it}
        st = next(iter(sel.values()))["stage"]
        lines.append(f"{it:>6} {st:>2} | " + " ".join(f"{sel[n]['f1']:>6.1f}" for n in SWEEP_METHODS) + " | "
                     + " ".join(f"{sel[n]['fdr']:>6.1f}" for n in SWEEP_METHODS))
    return "\n".join(lines) + "\n"


def parse_config(argv, prog: str, cls=None, description: str = "") -> "DemoConfig":
    """Parse demo-style options (``--quick`` / ``--full`` presets, then one option per field)."""
    cls = cls or DemoConfig
    p = argparse.ArgumentParser(prog=prog, description=description)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="tiny smoke-test preset (seconds)")
    g.add_argument("--full", action="store_true", help="the paper-size preset (for a GPU)")
    add_config_arguments(p, cls, defaults={f.name: None for f in dataclasses.fields(cls)})
    args = p.parse_args(argv)
    preset = dict(PRESETS["quick" if args.quick else "full" if args.full else "default"])
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}
    return cls(**{**preset, **given})


def main(argv=None) -> dict:
    cfg = parse_config(argv, "python -m patchblend.examples.cib demo", description=__doc__.split("\n")[0])
    return run_demo(cfg)
