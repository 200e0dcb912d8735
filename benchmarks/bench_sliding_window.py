"""MONAI vs patchblend sliding-window inference, side by side, same arguments.

Cases (docs/design.md#benchmark-cases): S = one 1x1x192x224x192 volume, 80^3 windows, overlap 0.5 (80 windows); CT = 1x1x512x512x256,
96^3 windows, overlap 0.5 (500 windows; ``--ct``, slow on a small CPU); SLAB = a many-class output
(``--classes``, default 16) on 1x1x384x128x128 with 64^3 windows, where patchblend's slab mode with on-the-fly
argmax (int64 labels as MONAI's argmax gives, and uint8 labels: ``patchblend-slab-u8``) is compared with
MONAI + argmax.

Predictors: ``identity`` (measures the inference machinery alone), ``unet`` (a small seeded 3D U-Net) and, for
SLAB, ``conv1x1`` (1 -> C channels). ``sw_batch_size`` 4 (2 for SLAB).
OVH4 / OVH1: S's lattice of 80 windows (4 x 5 x 4) on a volume 20 times smaller per axis (1x1x9x11x9, 4^3
windows), at ``sw_batch_size`` 4 and 1 (MONAI's default): the data is negligible, so this times the machinery
itself per call and per batch, the part that bounds a GPU run (where the data moves in microseconds). Timing only.

Time: for the identity predictor, each case runs in its own subprocess; after one warm-up call of each
implementation, calls alternate MONAI / patchblend ``--repeats`` times and the median wall time is reported
(speedup = MONAI / patchblend). The heavy cases (U-Net, SLAB) are timed by the single (cold) call of the memory
run, to keep the default run short.
Memory: on the CPU, one fresh subprocess per (case, implementation) warms up on a one-window input, then makes ONE
call; we report the growth of the peak resident set size (VmHWM, reset just before the call via
/proc/self/clear_refs) over the RSS just before it, i.e. every byte the call touched at its peak, including the
predictor's activations and allocator slack. On CUDA, ``torch.cuda.max_memory_allocated`` minus the memory
allocated before the call, which needs no fresh process: one subprocess per case measures every implementation
(and then times them), to keep a GPU run short.

    python benchmarks/bench_sliding_window.py                 # S (identity, unet) + SLAB, CPU, ~2-3 min on 2 cores
    python benchmarks/bench_sliding_window.py --ct            # adds the CT-size case (identity; unet with --ct-unet)
    python benchmarks/bench_sliding_window.py --device cuda   # on a GPU
    python benchmarks/bench_sliding_window.py --cases S OVH4  # only these cases (an unknown name is an error)
    python benchmarks/bench_sliding_window.py --baseline DIR  # this tree's driver against DIR's, side by side

``--baseline DIR`` (DIR holds another version's ``patchblend/``, e.g. ``git archive <commit> patchblend | tar -x -C
DIR`` plus the compiled library) alternates fresh processes of the two trees for ``--rounds`` rounds and prints, per
case, the median and range over rounds of the per-call wall time and host CPU time, and their ratio.

Writes a CSV under benchmarks/results/ and prints a table.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CASES = {
    "S": dict(shape=(1, 1, 192, 224, 192), roi=(80, 80, 80), overlap=0.5, bs=4),
    "CT": dict(shape=(1, 1, 512, 512, 256), roi=(96, 96, 96), overlap=0.5, bs=4),
    "SLAB": dict(shape=(1, 1, 384, 128, 128), roi=(64, 64, 64), overlap=0.5, bs=2),
    "OVH4": dict(shape=(1, 1, 9, 11, 9), roi=(4, 4, 4), overlap=0.5, bs=4),
    "OVH1": dict(shape=(1, 1, 9, 11, 9), roi=(4, 4, 4), overlap=0.5, bs=1),
}
OVERHEAD_CASES = ("OVH4", "OVH1")


# ---- worker side -----------------------------------------------------------------------------------------

def _make_predictor(name: str, classes: int, device):
    import torch
    from torch import nn

    if name == "identity":
        return lambda x: x
    torch.manual_seed(0)
    if name == "conv1x1":
        net = nn.Conv3d(1, classes, 1)
    else:  # a small 3D U-Net: strided-conv encoder, one half-resolution block, transposed-conv decoder, skip

        class TinyUNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.down = nn.Sequential(nn.Conv3d(1, 4, 2, stride=2), nn.ReLU())
                self.mid = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1), nn.ReLU())
                self.up = nn.Sequential(nn.ConvTranspose3d(4, 2, 2, stride=2), nn.ReLU())
                self.head = nn.Conv3d(3, classes, 1)

            def forward(self, x):
                return self.head(torch.cat([x, self.up(self.mid(self.down(x)))], 1)).sigmoid()

        net = TinyUNet()
    net = net.to(device).eval()
    return net


def _run_once(impl: str, cfg: dict, x, predictor):
    import torch

    case = CASES[cfg["case"]]
    kw = dict(overlap=case["overlap"], mode=cfg.get("mode", "constant"))
    with torch.no_grad():
        if impl == "monai":
            from monai.inferers import sliding_window_inference as sw

            out = sw(x, case["roi"], case["bs"], predictor, **kw)
            if cfg.get("argmax"):
                out = out.argmax(1, keepdim=True)
        else:
            from patchblend.inference import sliding_window_inference as sw

            extra = {}
            if impl == "patchblend-slab":
                extra = dict(slab_axis=0, reduce="argmax")
            elif impl == "patchblend-slab-u8":  # uint8 labels instead of int64 (C <= 256)
                extra = dict(slab_axis=0, reduce="argmax", label_dtype=torch.uint8)
            elif cfg.get("argmax"):
                extra = dict(reduce="argmax")
            out = sw(x, case["roi"], case["bs"], predictor, **kw, **extra)
    return out


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def worker(cfg: dict) -> dict:
    import torch

    if cfg["what"] == "all":  # CUDA: every implementation's memory, then the timing, in this one process
        result = dict(cfg, memory={i: worker(dict(cfg, what="memory", impl=i)) for i in cfg["impls"]})
        if cfg["repeats"]:
            result["times"] = worker(dict(cfg, what="time"))["times"]
        return result
    device = torch.device(cfg["device"])
    case = CASES[cfg["case"]]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(case["shape"], generator=g).to(device)
    predictor = _make_predictor(cfg["predictor"], cfg["classes"], device)
    import patchblend

    result = dict(cfg, pb_file=patchblend.__file__, backend=patchblend.backend_info()["backend"])
    if cfg["what"] == "memory":
        import gc

        # warm up on a one-window input first, so that code pages and lazy library state (oneDNN kernels, thread
        # pools) are resident before the measurement and only the call's data is counted
        _run_once(cfg["impl"], cfg, torch.rand((1, 1, *case["roi"])).to(device), predictor)
        gc.collect()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            out = _run_once(cfg["impl"], cfg, x, predictor)
            _sync(device)
            result["seconds"] = time.perf_counter() - t0
            result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        else:
            base = _rss_kib("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM (peak RSS) to the current RSS
                reset = True
            except OSError:
                reset = False
            t0 = time.perf_counter()
            out = _run_once(cfg["impl"], cfg, x, predictor)
            result["seconds"] = time.perf_counter() - t0
            peak = _rss_kib("VmHWM")
            result["peak_mib"] = (peak - base) / 1024 if reset else float("nan")
        result["out_shape"] = list(out.shape)
        return result
    # timing: alternate the implementations so that load on a shared machine hits both alike
    impls = cfg["impls"]
    times = {i: [] for i in impls}
    for i in impls:  # warm-up
        _run_once(i, cfg, x, predictor)
        _sync(device)
    for _ in range(cfg["repeats"]):
        for i in impls:
            t0 = time.perf_counter()
            _run_once(i, cfg, x, predictor)
            _sync(device)
            times[i].append(time.perf_counter() - t0)
    result["times"] = times
    return result


# ---- another tree of patchblend, side by side (--baseline) -----------------------------------------------

_TREE_WORKER = r"""
import inspect, json, statistics, sys, time, torch
import patchblend
from patchblend.inference import sliding_window_inference as sw
assert patchblend.__file__.startswith(sys.argv[1]), (patchblend.__file__, sys.argv[1])
cases, repeats = json.loads(sys.argv[2]), int(sys.argv[3])
has_confidence = "confidence" in inspect.signature(sw).parameters
out = {}
threads = int(sys.argv[4]) or torch.get_num_threads()


def scored(w):  # the identity with constant CIB scores (timing does not depend on their values)
    n = w.shape[0]
    return patchblend.CalibratedOutput(w, torch.full((n,), 0.7), torch.full((n, 2, 2, 2), 0.6))


with torch.no_grad():
    for name, (shape, roi, bs, mode, scale, weighting, confidence) in cases.items():
        # the OVH cases time host work only: one thread, so that OpenMP workers spinning while the shared machine
        # deschedules them do not count as the driver's CPU time
        torch.set_num_threads(1 if name.startswith("OVH") else threads)
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        # confidence: "on" (weighted prediction and C), "avg" (the unweighted prediction and C); a tree without the
        # option runs the same call without it ("avg": the plain average, weighting=None)
        kw, pred = {}, (scored if weighting else (lambda w: w))
        if weighting and not (confidence == "avg" and not has_confidence):
            kw["weighting"] = weighting
        if confidence and has_confidence:
            kw.update(confidence=True, weigh_prediction=confidence != "avg")
        sw(x, roi, bs, pred, 0.5, mode, **kw)  # warm-up (window plan, importance map, allocator)
        wall, cpu = [], []
        for _ in range(repeats):  # blocks of `scale` calls (the CPU clock may tick coarsely): time per call
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(scale):
                sw(x, roi, bs, pred, 0.5, mode, **kw)
            cpu.append((time.thread_time() - c0) / scale)
            wall.append((time.perf_counter() - t0) / scale)
        out[name] = dict(wall_ms=statistics.median(wall) * 1e3, cpu_ms=statistics.median(cpu) * 1e3,
                         confidence=bool(kw.get("confidence")))
print(json.dumps(out))
"""


def compare_trees(args) -> None:
    """Time this tree's driver against another tree's (e.g. ``git archive <commit> patchblend | tar -x -C DIR``
    with the compiled ``_C`` library copied in), identity predictor: rounds alternate one fresh process per tree
    (the order flips every round), each timing S (constant, gaussian) and the OVH cases; medians per round, then
    the median and range over rounds, and new/old ratios. ``cpu ms`` is the calling thread's CPU time (the
    driver's host cost; less sensitive to other processes' load than the wall time); the OVH cases run on one thread.

    Calibrated cases (constant scores): ``S-grid`` (``weighting="grid"``), ``S-grid-conf`` (the same with
    ``confidence=True``) and ``S-avg-conf`` (``confidence=True, weigh_prediction=False``: the average and the
    confidence map); a tree without ``confidence`` runs them without it (``S-avg-conf``: the plain average), so their
    ratio is the cost of the confidence map; this tree's ``S-grid-conf`` / ``S-grid`` is printed too."""
    names = args.cases or ["S", "S-gaussian", "OVH4", "OVH1"]
    table = {"S": ("S", "constant", 1, None, None), "S-gaussian": ("S", "gaussian", 1, None, None),
             "CT": ("CT", "constant", 1, None, None), "OVH4": ("OVH4", "constant", 50, None, None),
             "OVH1": ("OVH1", "constant", 50, None, None), "S-grid": ("S", "constant", 1, "grid", None),
             "S-grid-conf": ("S", "constant", 1, "grid", "on"), "S-avg-conf": ("S", "constant", 1, "grid", "avg"),
             "OVH4-grid": ("OVH4", "constant", 50, "grid", None),
             "OVH4-grid-conf": ("OVH4", "constant", 50, "grid", "on")}
    unknown = sorted(set(names) - set(table))
    if unknown:
        sys.exit(f"unknown --cases {unknown} for --baseline; choose from {sorted(table)}")
    cases = {n: (CASES[table[n][0]]["shape"], CASES[table[n][0]]["roi"], CASES[table[n][0]]["bs"], *table[n][1:])
             for n in names}
    trees = {"baseline": str(Path(args.baseline).resolve()), "this": str(ROOT)}
    results = {t: [] for t in trees}
    for r in range(args.rounds):
        order = list(trees.items()) if r % 2 == 0 else list(reversed(list(trees.items())))
        for tree, path in order:
            env = dict(os.environ, PYTHONPATH=path)
            proc = subprocess.run([sys.executable, "-c", _TREE_WORKER, path, json.dumps(cases), str(args.repeats),
                                   str(args.threads)],
                                  capture_output=True, text=True, env=env, cwd="/", timeout=args.case_timeout)
            if proc.returncode:
                sys.exit(f"{tree} ({path}) failed:\n{proc.stderr[-2000:]}")
            results[tree].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  round {r + 1}/{args.rounds} done", flush=True)
    print(f"{'case':14} {'what':7} {'baseline median (range)':>26} {'this median (range)':>26} {'this/baseline':>13}")
    for name in names:
        for what in ("cpu_ms", "wall_ms"):
            b = [d[name][what] for d in results["baseline"]]
            t = [d[name][what] for d in results["this"]]
            mb, mt = statistics.median(b), statistics.median(t)
            flags = "".join(" [" + tree + ": confidence]" for tree in trees if results[tree][0][name]["confidence"])
            print(f"{name:14} {what:7} {mb:10.3f} ({min(b):.3f}-{max(b):.3f}) {mt:10.3f} ({min(t):.3f}-{max(t):.3f})"
                  f" {mt / mb:13.3f}{flags}")
    for on, off in (("S-grid-conf", "S-grid"), ("OVH4-grid-conf", "OVH4-grid")):
        if on in names and off in names:
            for what in ("cpu_ms", "wall_ms"):
                ratios = [d[on][what] / d[off][what] for d in results["this"]]
                print(f"this tree, {on} / {off} ({what}, same process, median (range) over rounds): "
                      f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")


# ---- driver side -----------------------------------------------------------------------------------------

def _spawn(cfg: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {cfg}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure_case(args, case: str, pred: str, mode: str, repeats: int, slab: dict) -> list:
    """One case of the plan, every implementation: rows of the table."""
    rows = []
    base = dict(case=case, predictor=pred, mode=mode, device=args.device, classes=1)
    impls = ["monai", "patchblend"]
    if case == "SLAB":
        base = dict(slab, device=args.device)
        impls = ["monai", "patchblend", "patchblend-slab", "patchblend-slab-u8"]
    if args.device.startswith("cuda"):
        both = _spawn(dict(base, what="all", impls=impls, repeats=repeats), timeout=args.case_timeout)
        mem = both["memory"]
    elif case in OVERHEAD_CASES:  # timing only
        mem = {i: dict(pb_file="", peak_mib=float("nan")) for i in impls}
    else:
        mem = {i: _spawn(dict(base, what="memory", impl=i), timeout=args.case_timeout) for i in impls}
    for i in impls:
        if mem[i]["pb_file"] and not mem[i]["pb_file"].startswith(str(ROOT)):
            print(f"# WARNING: worker imported patchblend from {mem[i]['pb_file']}")
    if repeats and args.device.startswith("cuda"):
        t = both["times"]
    elif repeats:
        t = _spawn(dict(base, what="time", impls=impls, repeats=repeats), timeout=args.case_timeout)["times"]
    else:  # one cold call each, from the memory runs
        t = {i: [mem[i]["seconds"]] for i in impls}
    med = {i: statistics.median(v) for i, v in t.items()}
    for i in impls:
        rows.append(dict(case=case, predictor=pred, mode=mode, classes=base["classes"], impl=i,
                         time_ms=med[i] * 1e3, min_ms=min(t[i]) * 1e3, speedup=med["monai"] / med[i],
                         peak_mib=mem[i]["peak_mib"], mem_ratio=mem[i]["peak_mib"] / mem["monai"]["peak_mib"],
                         calls=len(t[i])))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per implementation (identity predictor)")
    ap.add_argument("--ct", action="store_true", help="add the CT-size case (identity predictor)")
    ap.add_argument("--ct-unet", action="store_true", help="also run the U-Net on the CT-size case (slow on CPU)")
    ap.add_argument("--no-unet", action="store_true", help="skip the U-Net predictor")
    ap.add_argument("--classes", type=int, default=16, help="classes of the SLAB case")
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/sliding_window_<device>.csv)")
    ap.add_argument("--case-timeout", type=float, default=3600, help="seconds per worker process; a case that "
                    "overruns is reported as failed and the run goes on")
    ap.add_argument("--cases", nargs="*", default=None,
                    help=f"run only these cases (of {sorted(CASES)}; with --baseline: S, S-gaussian, CT, OVH4, OVH1, "
                         "S-grid, S-grid-conf, S-avg-conf, OVH4-grid, OVH4-grid-conf)")
    ap.add_argument("--baseline", default=None, help="another patchblend tree (a directory holding patchblend/) to "
                    "time against this one, side by side (see compare_trees); only the identity-predictor timings")
    ap.add_argument("--rounds", type=int, default=4, help="with --baseline: alternated rounds")
    ap.add_argument("--threads", type=int, default=0, help="with --baseline: torch threads for the S/CT cases "
                    "(0: torch's default; 1 keeps spinning OpenMP workers out of the CPU time on a loaded machine)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.baseline is not None:
        compare_trees(args)
        return
    if args.cases is not None:
        unknown = sorted(set(args.cases) - set(CASES))
        if unknown:  # an unknown name is an error, not a silently empty run
            ap.error(f"unknown --cases {unknown}; choose from {sorted(CASES)}")

    sys.path.insert(0, str(ROOT))  # the patchblend next to this script, as the workers use
    import patchblend

    info = patchblend.backend_info()
    print(f"# patchblend {patchblend.__file__} backend={info['backend']} torch={info['torch']} "
          f"threads={info['threads']} device={args.device} cpu={platform.processor() or platform.machine()} "
          f"nproc={os.cpu_count()}")
    print("# NOTE: on a shared CPU, wall times vary with other users' load; ratios come from alternated calls.")

    plan = [("S", "identity", "constant", args.repeats), ("S", "identity", "gaussian", args.repeats)]
    plan += [(c, "identity", "constant", 20 * args.repeats) for c in OVERHEAD_CASES]
    if not args.no_unet:
        plan.append(("S", "unet", "constant", 0))
    if args.ct:
        plan.append(("CT", "identity", "constant", max(1, args.repeats // 2)))
        if args.ct_unet and not args.no_unet:
            plan.append(("CT", "unet", "constant", 0))
    slab = dict(case="SLAB", predictor="conv1x1", mode="gaussian", classes=args.classes, argmax=True)
    plan.append(("SLAB", "conv1x1", "gaussian", 0))
    if args.cases is not None:
        plan = [p for p in plan if p[0] in args.cases]
        if args.ct is False and "CT" in args.cases:
            plan.append(("CT", "identity", "constant", max(1, args.repeats // 2)))
    rows = []
    out = Path(args.out) if args.out else HERE / "results" / f"sliding_window_{args.device}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write_csv():  # after every case, so that a run cut short keeps what it measured
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) + ["device", "backend", "threads"])
            w.writeheader()
            for r in rows:
                w.writerow(dict(r, device=args.device, backend=info["backend"], threads=info["threads"]))

    for case, pred, mode, repeats in plan:
        try:
            rows += _measure_case(args, case, pred, mode, repeats, slab)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:  # report, and go on with the next case
            print(f"  FAILED {case}/{pred}/{mode}: {str(exc)[-1500:]}", flush=True)
            continue
        write_csv()
        print(f"  done {case}/{pred}/{mode}", flush=True)
    if not rows:
        sys.exit("no case could be measured")

    header = f"{'case':5} {'predictor':9} {'mode':8} {'C':>3} {'impl':16} {'median ms':>10} {'min ms':>9} " \
             f"{'speedup':>8} {'peak MiB':>9} {'mem/MONAI':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['case']:5} {r['predictor']:9} {r['mode']:8} {r['classes']:>3} {r['impl']:16} {r['time_ms']:10.2f} "
              f"{r['min_ms']:9.2f} {r['speedup']:8.2f} {r['peak_mib']:9.1f} {r['mem_ratio']:9.2f}")
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
