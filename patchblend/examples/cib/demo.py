"""The end-to-end demo (``python -m patchblend.examples.cib demo --out DIR``).

1. writes a phantom set (:mod:`.phantom`): training cases (two-time-point and single-time-point) and
   held-out two-time-point test cases with other seeds, under ``DIR/data``;
2. trains one CIB V-Net (:mod:`.train`) on them, checkpoint in ``DIR/model``;
3. evaluates every blending (:mod:`.evaluate`) on the test cases with that one model, prints the
   table and writes ``DIR/results.csv`` (``blending,dice,jaccard,hd95,asd,f1,fdr``),
   ``DIR/per_case.csv`` and ``DIR/fig4_comparison.png``.

Presets: the default is sized for a 2-core CPU (about 10 minutes of training); ``--quick`` is a
smoke test (seconds); ``--full`` is the paper's configuration (80³ patches, width 16, 10k + 10k
iterations, batch 4 + 4, lr 1e-2, 1 mm phantoms) for a GPU (``--device cuda``). Any option given on
the command line overrides the preset.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .data import load_cases
from .evaluate import (BLENDINGS, evaluate_model, format_table, head_calibration, pick_figure_case, plot_comparison,
                       summarize, write_csv)
from .phantom import PhantomConfig, write_phantom_set
from .train import TrainConfig, add_config_arguments, train

__all__ = ["DemoConfig", "PRESETS", "run_demo"]


@dataclass
class DemoConfig:
    """Demo settings (the default preset; see :data:`PRESETS`)."""

    out: str = "cib_demo"
    n_train_two: int = 8  #: two-time-point training phantoms
    n_train_single: int = 8  #: single-time-point training phantoms
    n_test: int = 10  #: held-out two-time-point phantoms
    downsample: float = 2.5  #: phantom voxel size (mm)
    width: int = 4
    patch: int = 32
    batch_two: int = 4
    batch_single: int = 4
    stage1_iters: int = 600
    stage2_iters: int = 600
    lr: float = 3e-3
    overlap: float = 0.5
    sw_batch_size: int = 8
    device: str = "cpu"
    #: torch CPU threads (0 = torch's default). One thread by default: on a shared 2-core machine, two
    #: OpenMP threads competing with other processes ran a training step up to 10x slower than one.
    threads: int = 1
    seed: int = 0
    progress: bool = True
    sweep: bool = True  #: also evaluate the intermediate checkpoints (``DIR/training_length.csv``)


PRESETS = {
    "default": {},
    "quick": dict(n_train_two=1, n_train_single=1, n_test=1, downsample=4.0, width=2, patch=16, batch_two=1,
                  batch_single=1, stage1_iters=2, stage2_iters=2, sw_batch_size=8),
    "full": dict(n_train_two=32, n_train_single=32, n_test=8, downsample=1.0, width=16, patch=80, batch_two=4,
                 batch_single=4, stage1_iters=10000, stage2_iters=10000, lr=1e-2, sw_batch_size=4, threads=0),
}


def run_demo(cfg: DemoConfig, log=print) -> dict:
    """Run the demo; returns ``{"summary", "rows", "results", "figure", "train_seconds", "seconds"}``."""
    t0 = time.time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    data = os.path.join(cfg.out, "data")
    pcfg = PhantomConfig(downsample=cfg.downsample)
    log(f"[1/3] phantoms: {cfg.n_train_two} + {cfg.n_train_single} training, {cfg.n_test} test "
        f"({cfg.downsample} mm voxels) -> {data}")
    write_phantom_set(os.path.join(data, "train"), cfg.n_train_two, cfg.n_train_single, seed=cfg.seed, config=pcfg,
                      prefix="train", progress=cfg.progress)
    write_phantom_set(os.path.join(data, "test"), cfg.n_test, 0, seed=cfg.seed + 1000, config=pcfg, prefix="test",
                      progress=cfg.progress)
    train_cases = load_cases(os.path.join(data, "train"))
    test_cases = load_cases(os.path.join(data, "test"))
    log(f"      case size {train_cases[0].t1.shape} voxels after the brain crop")

    tcfg = TrainConfig(data=os.path.join(data, "train"), out=os.path.join(cfg.out, "model"), width=cfg.width,
                       patch=cfg.patch, batch_two=cfg.batch_two, batch_single=cfg.batch_single,
                       stage1_iters=cfg.stage1_iters, stage2_iters=cfg.stage2_iters, lr=cfg.lr, device=cfg.device,
                       threads=cfg.threads, seed=cfg.seed, progress=cfg.progress,
                       ckpt_every=max((cfg.stage1_iters + cfg.stage2_iters) // 4, 1), keep_snapshots=cfg.sweep)
    log(f"[2/3] training: width {cfg.width}, patch {cfg.patch}^3, {cfg.stage1_iters} + {cfg.stage2_iters} "
        f"iterations, batch {cfg.batch_two} + {cfg.batch_single}, {cfg.device}")
    t1 = time.time()
    ckpt = train(tcfg, cases=train_cases, log=log)
    train_seconds = time.time() - t1

    from .train import load_checkpoint

    model, _, _ = load_checkpoint(ckpt, cfg.device)
    log(f"[3/3] evaluating {len(BLENDINGS)} blendings on {len(test_cases)} held-out cases")
    pairs: list = []
    rows, kept = evaluate_model(model, test_cases, BLENDINGS, (cfg.patch,) * 3, cfg.overlap, cfg.sw_batch_size,
                                cfg.device, amp=cfg.device.startswith("cuda"), progress=cfg.progress,
                                keep=("average", "patch*grid"), head_pairs=pairs)
    heads = head_calibration(pairs)
    summary = summarize(rows)
    results = write_csv(os.path.join(cfg.out, "results.csv"), summary)
    import csv

    with open(os.path.join(cfg.out, "per_case.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)

    case = pick_figure_case(rows, test_cases)
    figure = plot_comparison(case, kept[case.name], os.path.join(cfg.out, "fig4_comparison.png"))
    table = format_table(summary)
    sweep_text = ""
    if cfg.sweep:
        sweep_text = _training_length(cfg, test_cases, rows, log)
    seconds = time.time() - t0
    text = (f"{table}\n\n{len(test_cases)} held-out phantoms; mean over cases; distances in voxels; "
            f"TP/pred = true / predicted lesions, det/GT = detected / ground-truth lesions (summed).\n"
            f"training {train_seconds:.0f} s, total {seconds:.0f} s on {cfg.device} "
            f"({torch.get_num_threads()} threads)\n{_heads_text(heads)}{sweep_text}")
    with open(os.path.join(cfg.out, "summary.txt"), "w") as f:
        f.write(text)
    log(text)
    log(f"results: {results}\nfigure: {figure}")
    return {"summary": summary, "rows": rows, "results": results, "figure": figure, "heads": heads,
            "train_seconds": train_seconds, "seconds": seconds}


def _heads_text(h: dict) -> str:
    """Head quality on the test windows (true Dice = the oracle weights)."""
    if not h:
        return ""
    lines = ["head quality on the test windows (true Dice of each window / cell as reference):"]
    for name in ("patch", "grid"):
        lines.append(f"  {name:<5} head: corr {h[f'{name}_corr']:+.2f}, MAE {h[f'{name}_mae']:.3f}, "
                     f"mean prediction {h[f'{name}_pred_mean']:.3f} (true {h[f'{name}_true_mean']:.3f}); "
                     f"on true Dice < 0.5 ({100 * h[f'{name}_bad_fraction']:.1f}%) it predicts "
                     f"{h[f'{name}_pred_on_bad']:.3f}, elsewhere {h[f'{name}_pred_on_good']:.3f}")
    return "\n".join(lines) + "\n"


def _training_length(cfg: DemoConfig, test_cases, final_rows, log) -> str:
    """Evaluate every kept snapshot (``iter_*.pt``) with every blending: does calibrated blending help
    more or less as training goes on? Writes ``DIR/training_length.csv``; returns a compact table.

    Before stage 2 the grid head is untrained (its scores are meaningless), so grid blendings of those
    snapshots are shown for completeness only."""
    import csv
    import glob

    from .train import load_checkpoint

    model_dir = os.path.join(cfg.out, "model")
    snaps = sorted(glob.glob(os.path.join(model_dir, "iter_*.pt")))
    all_rows = []
    for path in snaps:
        it = int(os.path.basename(path)[5:11])
        if it == cfg.stage1_iters + cfg.stage2_iters:
            rows = final_rows
        else:
            model, _, _ = load_checkpoint(path, cfg.device)
            rows, _ = evaluate_model(model, test_cases, BLENDINGS, (cfg.patch,) * 3, cfg.overlap, cfg.sw_batch_size,
                                     cfg.device, amp=cfg.device.startswith("cuda"), progress=cfg.progress)
        for r in summarize(rows):
            all_rows.append({"iteration": it, "stage": 1 if it <= cfg.stage1_iters else 2, **r})
    if not all_rows:
        return ""
    with open(os.path.join(cfg.out, "training_length.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(all_rows[0].keys()))
        w.writeheader()
        w.writerows(all_rows)
    names = ("average", "gaussian", "patch", "grid", "patch*grid", "oracle-grid")
    short = {"average": "avg", "gaussian": "gauss", "patch": "patch", "grid": "grid", "patch*grid": "p*g",
             "oracle-grid": "orc-g"}
    head = f"{'iter':>6} {'st':>2} | " + " ".join(f"{short[n]:>6}" for n in names) + " | " + \
        " ".join(f"{short[n]:>6}" for n in names)
    lines = ["lesion F1 % (left) and FDR % (right) by training length:", head, "-" * len(head)]
    for it in sorted({r["iteration"] for r in all_rows}):
        sel = {r["blending"]: r for r in all_rows if r["iteration"] == it}
        st = next(iter(sel.values()))["stage"]
        lines.append(f"{it:>6} {st:>2} | " + " ".join(f"{sel[n]['f1']:>6.1f}" for n in names) + " | "
                     + " ".join(f"{sel[n]['fdr']:>6.1f}" for n in names))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m patchblend.examples.cib demo", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="tiny smoke-test preset (seconds)")
    g.add_argument("--full", action="store_true", help="the paper-size preset (for a GPU)")
    add_config_arguments(p, DemoConfig, defaults={f.name: None for f in dataclasses.fields(DemoConfig)})
    args = p.parse_args(argv)
    preset = dict(PRESETS["quick" if args.quick else "full" if args.full else "default"])
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig) if getattr(args, f.name) is not None}
    cfg = DemoConfig(**{**preset, **given})
    return run_demo(cfg)
