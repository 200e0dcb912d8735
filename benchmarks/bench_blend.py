"""Benchmark of calibrated_blend against plain-PyTorch blends, side by side in one run.

Implementations (registry ``IMPLEMENTATIONS``):
  compiled   patchblend's kernel (C++ on the CPU, CUDA on the GPU)
  stream     the same kernels' stream mode (blend_stream_ via LatticeBlender, batches of 4 windows)
  reference  patchblend's pure-PyTorch reference (one slice-add per patch)
  index_add  a pure-PyTorch blend: precomputed flat indices, one ``index_add_`` (index build not timed)
  monai_loop a MONAI-style loop: per window ``out[sl] += w * p; count[sl] += 1``, then divide

Cases (registry ``CASES``, docs/design.md#benchmark-cases): S (192×224×192, 80³ windows, overlap 0.5, 80 patches), a CT-size
case (512×512×256, 96³, overlap 0.5, 500 patches) and a many-class case (16 channels, 128³ windows).
Each is run for float32/float16 patches with per-patch and per-grid-cell weights.

For each row: milliseconds (median of --repeat), achieved GB/s (patch bytes read + output bytes
written, divided by the time), % of the copy bandwidth measured in the same run (``dst.copy_(src)`` on
buffers far larger than the last-level cache, ``--copy-mib``: memory bandwidth, not cache bandwidth),
the ideal time (bytes / copy bandwidth), and ratios to the ideal and to the compiled kernel.
Results also go to a CSV (``--csv``; default ``benchmarks/results/bench_blend_<device>.csv``).

    python benchmarks/bench_blend.py                 # CPU, all cases
    python benchmarks/bench_blend.py --device cuda   # GPU
    python benchmarks/bench_blend.py --quick         # small sizes, a smoke run
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

import patchblend
from patchblend import _reference
from patchblend._validate import prepare_blend_args


@dataclass
class Case:
    name: str
    image: tuple
    roi: tuple
    overlap: float
    channels: int


CASES: Dict[str, Case] = {
    "S-C1": Case("S-C1", (192, 224, 192), (80, 80, 80), 0.5, 1),
    "S-C2": Case("S-C2", (192, 224, 192), (80, 80, 80), 0.5, 2),
    "CT": Case("CT", (512, 512, 256), (96, 96, 96), 0.5, 1),
    "many-class": Case("many-class", (192, 192, 192), (128, 128, 128), 0.5, 16),
}
QUICK_CASES: Dict[str, Case] = {
    "quick-C1": Case("quick-C1", (48, 56, 48), (20, 20, 20), 0.5, 1),
    "quick-C4": Case("quick-C4", (40, 40, 40), (24, 24, 24), 0.5, 4),
}


def window_starts(image, roi, overlap) -> torch.Tensor:
    """MONAI's placement: step int(roi*(1-overlap)), last window flush with the border; raster order."""
    axes = []
    for size, r in zip(image, roi):
        step = max(int(r * (1 - overlap)), 1)
        n = -(-max(size - r, 0) // step) + 1
        axes.append(sorted({min(i * step, max(size - r, 0)) for i in range(n)}))
    return torch.tensor(list(itertools.product(*axes)), dtype=torch.int64)


# ----------------------------------------------------------------------------- implementations


def impl_compiled(p, w, coords, image, device):
    return lambda: patchblend.calibrated_blend(p, w, coords, image)


def impl_stream(p, w, coords, image, device):
    """The compiled stream op, as the sliding-window driver uses it: batches of 4 windows in raster order
    into the output alone (LatticeBlender)."""
    from patchblend.inference import LatticeBlender

    def run():
        b = LatticeBlender(image, p.shape[1], coords, p.shape[2:], normalize="count", device=device)
        for k in range(0, p.shape[0], 4):
            b.add(p[k:k + 4], None if w is None else w[k:k + 4])
        return b.finalize(p.dtype)

    return run


def impl_reference(p, w, coords, image, device):
    a = prepare_blend_args(p, w, coords, image, "count", None)
    return lambda: _reference.blend_reference(a.patches, a.weights, a.coords, a.importance, a.out_shape, "count")


def impl_index_add(p, w, coords, image, device):
    """Flat output index of every patch voxel (clipped voxels go to a dump slot), one index_add_."""
    n, c = p.shape[:2]
    roi = p.shape[2:]
    grids = torch.meshgrid(*[torch.arange(r, device=device) for r in roi], indexing="ij")
    local = torch.stack([g.flatten() for g in grids], 1)  # [V, 3]
    vol = image[0] * image[1] * image[2]
    pos = coords.to(device)[:, None, :] + local[None]  # [N, V, 3]
    inside = ((pos >= 0) & (pos < torch.tensor(image, device=device))).all(-1)
    flat = (pos[..., 0] * image[1] + pos[..., 1]) * image[2] + pos[..., 2]
    flat = torch.where(inside, flat, torch.full_like(flat, vol)).flatten()
    del pos, grids
    chan = (torch.arange(c, device=device)[None, :, None] * (vol + 1) + flat.view(n, 1, -1)).flatten().to(torch.int32)
    wv = _reference.voxel_weights(
        None if w is None else w.reshape(n, *([1] * 3)) if w.dim() == 1 else w, None, n, roi, torch.float32, device
    ).reshape(n, 1, -1)
    ones = torch.ones(n * wv.shape[-1], device=device)

    def run():
        num = torch.zeros(c * (vol + 1), device=device)
        num.index_add_(0, chan, (p.float().reshape(n, c, -1) * wv).flatten())
        cnt = torch.zeros(vol + 1, device=device).index_add_(0, flat.to(torch.int32), ones)
        out = num.view(c, vol + 1)[:, :vol] / cnt[:vol].clamp(min=1)
        return out.view(c, *image).to(p.dtype)

    return run


def impl_monai_loop(p, w, coords, image, device):
    roi = p.shape[2:]
    starts = coords.tolist()
    a = prepare_blend_args(p, w, coords, image, "count", None)
    wv = _reference.voxel_weights(a.weights, None, p.shape[0], roi, torch.float32, device)

    def run():
        num = torch.zeros((p.shape[1], *image), device=device)
        cnt = torch.zeros(image, device=device)
        for i, s in enumerate(starts):
            sl = tuple(slice(b, b + r) for b, r in zip(s, roi))
            num[(slice(None),) + sl] += wv[i] * p[i]
            cnt[sl] += 1
        return (num / cnt.clamp(min=1)).to(p.dtype)

    return run


IMPLEMENTATIONS: Dict[str, Callable] = {
    "compiled": impl_compiled,
    "stream": impl_stream,
    "reference": impl_reference,
    "index_add": impl_index_add,
    "monai_loop": impl_monai_loop,
}


# ----------------------------------------------------------------------------- timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, repeat, warmup=1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, nbytes, repeat) -> float:
    """Read+write GB/s of ``dst.copy_(src)`` for buffers of ``nbytes`` each (dst preallocated). Use buffers far
    larger than the last-level cache (``--copy-mib``, default 512 MiB against a 32 MiB LLC here): a buffer the
    size of one case's output stays mostly in cache and gives a cache bandwidth (71.6 GB/s against about 40-45
    GB/s from memory on this project's CPU machine), which made the "x ideal" column a cache ratio."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, max(repeat, 5))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", nargs="*", help="subset of case names (default: all)")
    ap.add_argument("--impls", nargs="*", default=list(IMPLEMENTATIONS), help="subset of implementations")
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float16"])
    ap.add_argument("--weights", nargs="*", default=["patch", "grid"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--slow-baseline-limit", type=float, default=3e8,
                    help="skip reference/index_add/monai_loop when N*C*P voxels exceed this (CPU only; 0 = never)")
    ap.add_argument("--quick", action="store_true", help="small cases (a smoke run)")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--copy-mib", type=int, default=512,
                    help="size of each copy-bandwidth buffer (MiB): far larger than the last-level cache")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cases = QUICK_CASES if args.quick else CASES
    if args.cases:
        unknown = sorted(set(args.cases) - set(cases))
        if unknown:  # an unknown name is an error, not a silently empty run
            ap.error(f"unknown --cases {unknown}; choose from {sorted(cases)}")
        cases = {k: v for k, v in cases.items() if k in args.cases}
    unknown = sorted(set(args.impls) - set(IMPLEMENTATIONS))
    if unknown:
        ap.error(f"unknown --impls {unknown}; choose from {sorted(IMPLEMENTATIONS)}")
    info = patchblend.backend_info()
    print(f"# patchblend {patchblend.__version__} backend={info['backend']} cuda_kernels={info['cuda']} "
          f"torch={info['torch']} threads={torch.get_num_threads()} device={device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    if not info["compiled"]:
        print("# WARNING: compiled kernels not loaded; 'compiled' rows run the reference", file=sys.stderr)

    rows: List[dict] = []
    header = (f"{'case':<11}{'dtype':<9}{'weights':<8}{'impl':<11}{'ms':>10}{'GB/s':>8}{'%copy':>7}"
              f"{'x ideal':>9}{'x compiled':>11}")
    for case in cases.values():
        coords = window_starts(case.image, case.roi, case.overlap)
        n = len(coords)
        vox = n * case.channels * case.roi[0] * case.roi[1] * case.roi[2]
        bw = copy_bandwidth(device, args.copy_mib << 20, args.repeat)
        print(f"\n## {case.name}: image {case.image}, roi {case.roi}, overlap {case.overlap}, N={n}, "
              f"C={case.channels}; copy bandwidth {bw:.1f} GB/s (read+write)")
        print(header)
        for dtype_name, kind in itertools.product(args.dtypes, args.weights):
            dtype = getattr(torch, dtype_name)
            g = torch.Generator().manual_seed(0)
            p = torch.rand((n, case.channels, *case.roi), generator=g).to(dtype).to(device)
            w = (torch.rand(n, generator=g) if kind == "patch" else torch.rand(n, 2, 2, 2, generator=g)).to(device)
            out_bytes = case.channels * case.image[0] * case.image[1] * case.image[2] * p.element_size()
            nbytes = p.numel() * p.element_size() + out_bytes
            ideal = nbytes / (bw * 1e9) * 1e3
            compiled_ms = None
            for name in args.impls:
                slow = name != "compiled" and device.type == "cpu" and args.slow_baseline_limit and vox > args.slow_baseline_limit
                if slow:
                    print(f"{case.name:<11}{dtype_name:<9}{kind:<8}{name:<11}{'skipped (slow baseline; --slow-baseline-limit 0 runs it)':>30}")
                    continue
                fn = IMPLEMENTATIONS[name](p, w, coords, case.image, device)
                ms = time_ms(fn, device, args.repeat if name == "compiled" else max(1, args.repeat // 2))
                del fn
                if name == "compiled":
                    compiled_ms = ms
                gbs = nbytes / (ms * 1e-3) / 1e9
                row = dict(device=str(device), case=case.name, dtype=dtype_name, weights=kind, impl=name, n=n,
                           channels=case.channels, ms=round(ms, 3), gb_per_s=round(gbs, 2),
                           pct_copy=round(100 * gbs / bw, 1), ideal_ms=round(ideal, 3),
                           x_ideal=round(ms / ideal, 2), x_compiled=round(ms / compiled_ms, 2) if compiled_ms else "",
                           copy_gb_per_s=round(bw, 2))
                rows.append(row)
                print(f"{case.name:<11}{dtype_name:<9}{kind:<8}{name:<11}{ms:>10.2f}{gbs:>8.1f}{row['pct_copy']:>7.1f}"
                      f"{row['x_ideal']:>9.2f}{str(row['x_compiled']):>11}")
            del p, w
    path = args.csv or os.path.join(os.path.dirname(__file__), "results", f"bench_blend_{device.type}.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["case"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
