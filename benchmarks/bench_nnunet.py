"""nnU-Net v2's predictor against patchblend's (patchblend.integrations.nnunet.PatchblendPredictor), same network,
same data, same nnU-Net lattice and Gaussian, side by side in one run.

Cases:
- ACC (accumulation only; 3x the repeats): 1x192x192x160, 64^3 windows, tile_step_size 0.5 (100 windows), 4 classes,
  a "network" that only repeats its input into 4 channels, so the time is nnU-Net's sliding-window machinery (window copies,
  Gaussian multiply, float16 adds) against patchblend's (extract_patches, float32 blend, float16 output).
  ``predict_sliding_window_return_logits`` is timed.
- E2E / E2E-TTA: a seeded PlainConvUNet (4-8-16 features, 3 stages) through ``predict_logits_from_preprocessed_data``
  (what predict_from_files runs per case): 1x128x128x128 without mirroring (27 windows of 64^3), and 1x96x96x96 with
  mirroring on 3 axes (8 windows x 8 flips).
- MANY (``--many``): 105 classes (a 1x1x1 convolution), a long CT-sized volume 1x512x160x160, 64^3 windows
  (240 windows): nnU-Net's float16 logits, patchblend's float16 logits, and patchblend's slab argmax
  (``predict_segmentation_from_preprocessed_data``: uint8 labels, the logits never held). Peak memory: each in a
  fresh subprocess, the growth of the peak RSS (VmHWM, reset just before the call) over the RSS before it; on CUDA,
  ``torch.cuda.max_memory_allocated`` growth.

Timing: each implementation is warmed up once, then the calls alternate nnU-Net / patchblend (sw_batch_size 1) /
patchblend (sw_batch_size 4) ``--repeats`` times; the median is reported, with nnU-Net's median divided by it.

    python benchmarks/bench_nnunet.py                     # ACC + E2E + E2E-TTA, CPU
    python benchmarks/bench_nnunet.py --many              # adds the 105-class case (about 3 GB of RAM for nnU-Net)
    python benchmarks/bench_nnunet.py --device cuda --many
    python benchmarks/bench_nnunet.py --cases ACC E2E       # only these

Needs nnunetv2 and dynamic-network-architectures (.ci/install_nnunet.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# OpenMP worker threads sleep instead of spinning between operations: on a CPU shared with other jobs (this
# project's 2-core machine runs at a load of 10+), spinning workers are descheduled in the middle of every parallel
# region and small operations take 10x longer, which drowns what is measured. Set for both implementations alike
# (an explicit OMP_WAIT_POLICY in the environment wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the toy nnU-Net setup shared with tests/test_nnunet.py

from nnunet_helpers import init_predictor, toy_unet  # noqa: E402


class ChannelRepeat(torch.nn.Module):
    """A near-free "network": the input repeated into ``classes`` channels (a fresh tensor, as nnU-Net scales it
    in place)."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        return x.repeat(1, self.classes, *([1] * (x.dim() - 2)))


def make(kind: str, network, patch, classes, device, mirror_axes=None, sw_batch_size=1, **kwargs):
    """An initialised predictor: ``kind`` "nnunet" (nnUNetPredictor) or "patchblend" (PatchblendPredictor)."""
    common = dict(tile_step_size=0.5, use_mirroring=mirror_axes is not None, device=torch.device(device),
                  allow_tqdm=False)
    if kind == "nnunet":
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        predictor = nnUNetPredictor(**common)
    else:
        from patchblend.integrations.nnunet import PatchblendPredictor
        predictor = PatchblendPredictor(sw_batch_size=sw_batch_size, **common, **kwargs)
    return init_predictor(predictor, network.to(device), patch, classes, mirror_axes)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed_alternating(calls: dict, repeats: int, device: str) -> dict:
    """Median wall seconds per call of each entry, calls alternating (after one warm-up call of each)."""
    for fn in calls.values():
        fn()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def quiet(fn):
    """Call ``fn`` with nnU-Net's per-call prints silenced."""
    def run():
        with open(os.devnull, "w") as null:
            old, sys.stdout = sys.stdout, null
            try:
                return fn()
            finally:
                sys.stdout = old
    return run


def case_acc(args):
    classes, patch = 4, (64, 64, 64)
    data = torch.randn(1, 192, 192, 160, device=args.device)
    net = ChannelRepeat(classes)
    nn = make("nnunet", net, patch, classes, args.device)
    pb1 = make("patchblend", net, patch, classes, args.device, sw_batch_size=1)
    pb4 = make("patchblend", net, patch, classes, args.device, sw_batch_size=4)
    calls = {k: quiet(lambda p=p: p.predict_sliding_window_return_logits(data))
             for k, p in (("nnunet", nn), ("patchblend bs1", pb1), ("patchblend bs4", pb4))}
    return timed_alternating(calls, 3 * args.repeats, args.device), {}  # about 1 s a call: more repeats


def case_e2e(args, tta: bool):
    classes, patch = 3, (64, 64, 64)
    size = 96 if tta else 128
    data = torch.randn(1, size, size, size)
    net = toy_unet(3, num_classes=classes, features=(4, 8, 16))
    axes = (0, 1, 2) if tta else None
    nn = make("nnunet", net, patch, classes, args.device, mirror_axes=axes)
    pb1 = make("patchblend", net, patch, classes, args.device, mirror_axes=axes, sw_batch_size=1)
    pb4 = make("patchblend", net, patch, classes, args.device, mirror_axes=axes, sw_batch_size=4)
    calls = {k: quiet(lambda p=p: p.predict_logits_from_preprocessed_data(data))
             for k, p in (("nnunet", nn), ("patchblend bs1", pb1), ("patchblend bs4", pb4))}
    return timed_alternating(calls, max(1, args.repeats // 2) if tta else args.repeats, args.device), {}


MANY_SHAPE = (1, 512, 160, 160)
MANY_CLASSES = 105


def many_child(kind: str, device: str) -> dict:
    """One call of one implementation on the many-class case, in this (fresh) process: seconds and peak bytes."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, MANY_CLASSES, 1)
    patch = (64, 64, 64)
    if kind == "nnunet":
        predictor = make("nnunet", net, patch, MANY_CLASSES, device)
        call = predictor.predict_logits_from_preprocessed_data
    else:
        predictor = make("patchblend", net, patch, MANY_CLASSES, device, sw_batch_size=4)
        call = (predictor.predict_segmentation_from_preprocessed_data if kind == "patchblend slab argmax"
                else predictor.predict_logits_from_preprocessed_data)
    quiet(lambda: call(torch.randn(1, 64, 64, 64)))()  # warm-up on one window
    data = torch.randn(*MANY_SHAPE)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        base = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    out = quiet(lambda: call(data))()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _status_kib("VmHWM") * 1024) - base
    return {"seconds": seconds, "peak_bytes": peak, "out": f"{tuple(out.shape)} {out.dtype}"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def case_many(args):
    times, extra = {}, {}
    for kind in ("nnunet", "patchblend bs4", "patchblend slab argmax"):
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--device", args.device],
                             capture_output=True, text=True, timeout=args.case_timeout)
        if out.returncode != 0:
            raise RuntimeError(f"many-class child {kind} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        times[kind] = r["seconds"]
        extra[kind] = r
    return times, extra


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--many", action="store_true", help="add the 105-class case (peak memory)")
    ap.add_argument("--only-many", action="store_true", help="only the 105-class case")
    ap.add_argument("--cases", nargs="+", choices=["ACC", "E2E", "E2E-TTA", "MANY"],
                    help="only these cases (MANY: the 105-class case)")
    ap.add_argument("--case-timeout", type=int, default=900)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(many_child(args.child, args.device)))
        return
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']}, "
          f"load average {os.getloadavg()[0]:.1f}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    cases = [] if args.only_many else [("ACC", case_acc), ("E2E", lambda a: case_e2e(a, False)),
                                       ("E2E-TTA", lambda a: case_e2e(a, True))]
    if args.many or args.only_many:
        cases.append(("MANY", case_many))
    if args.cases:
        every = dict([("ACC", case_acc), ("E2E", lambda a: case_e2e(a, False)),
                      ("E2E-TTA", lambda a: case_e2e(a, True)), ("MANY", case_many)])
        cases = [(name, every[name]) for name in args.cases]
    print("| case | implementation | time (s) | nnU-Net / this | peak memory (MiB) |")
    print("|---|---|---:|---:|---:|")
    for name, fn in cases:
        times, extra = fn(args)
        ref = times["nnunet"]
        for impl, t in times.items():
            mem = extra.get(impl, {}).get("peak_bytes")
            mem_s = "" if mem is None else f"{mem / 2**20:.0f}"
            if mem is not None and impl != "nnunet":
                mem_s += f" ({mem / extra['nnunet']['peak_bytes']:.2f} of nnU-Net's)"
            print(f"| {name} | {impl} | {t:.3f} | {ref / t:.2f} | {mem_s} |", flush=True)


if __name__ == "__main__":
    main()
