"""Block-wise sliding-window inference on Dask (patchblend.distributed) against the in-memory driver.

A Zarr volume ``[1, N, N, N]`` (float32, chunks 128³), a small conv predictor on the CPU (Conv3d 1→8 3³, ReLU,
Conv3d 8→2 1³, softmax), 64³ windows at overlap 0.25, Gaussian importance:

1. the in-memory driver (``patchblend.sliding_window_inference`` on the whole volume), in a child process: wall
   time and peak RSS (VmHWM; the volume read from Zarr included);
2. ``patchblend.distributed.sliding_window_inference(...)`` written with ``patchblend.distributed.to_zarr`` on a
   fresh LocalCluster of 1 and of 2 worker processes (1 thread each), per output block size: wall time, peak RSS
   per worker during the run (VmHWM, reset when the run starts) and the recompute factor; the
   result is compared with the in-memory one (bitwise);
3. Dask's per-task overhead on the same cluster (many empty tasks) and the bytes one block task carries.

Usage: ``python benchmarks/bench_distributed.py [--size 512] [--blocks 128 256] [--workers 1 2]``. The default
size (256) is a quick run; the issue's run is ``--size 512``. Prints markdown tables; one run, no repeats (the
machine is shared, so treat times as indicative).
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROI, OVERLAP, MODE, BATCH = 64, 0.25, "gaussian", 4


class SmallConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Conv3d(1, 8, 3, padding=1)
        self.b = torch.nn.Conv3d(8, 2, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        return torch.softmax(self.b(torch.relu(self.a(x))), 1)


def make_volume(path: str, n: int) -> None:
    """A smooth synthetic volume plus noise, written slab by slab (never whole in memory here)."""
    import zarr

    z = zarr.create_array(path, shape=(1, n, n, n), chunks=(1, 128, 128, 128), dtype="f4", overwrite=True)
    rng = np.random.default_rng(0)
    y, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    for d0 in range(0, n, 128):
        d = np.arange(d0, min(d0 + 128, n))[:, None, None]
        slab = np.sin(d / 17.0) * np.cos(y / 23.0) + np.sin(x / 11.0) + 0.3 * rng.standard_normal((len(d), n, n))
        z[0, d0:d0 + len(d)] = slab.astype(np.float32)


def _status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since exec or the last :func:`reset_peak`) of this process, in MiB.
    (``ru_maxrss`` would not do: Linux keeps it across fork and exec, so a worker inherits its parent's peak.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> float:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); returns the current RSS in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def peak_rss() -> float:
    return _status_mib("VmHWM")


def in_memory(src: str, out_npy: str) -> None:
    """Child process: the in-memory driver on the whole volume; prints time and peak RSS."""
    import zarr

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    image = torch.from_numpy(zarr.open_array(src, mode="r")[...])
    import patchblend

    with torch.no_grad():
        probs = patchblend.sliding_window_inference(image[None], ROI, BATCH, SmallConv(), OVERLAP, MODE)[0]
    wall = time.perf_counter() - t0
    np.save(out_npy, probs.numpy())
    print(f"RESULT {wall:.3f} {peak_rss():.1f}")


def _inc(i: int) -> int:
    return i + 1


def task_overhead(client, n_tasks: int = 4000) -> float:
    """Seconds per empty task through Dask's scheduler (submitted at once, results gathered)."""
    client.gather(client.map(_inc, range(100), pure=False))  # warm up
    t0 = time.perf_counter()
    client.gather(client.map(_inc, range(n_tasks), pure=False))
    return (time.perf_counter() - t0) / n_tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--blocks", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tmp", default=None, help="where the Zarr stores go (default: a temporary directory)")
    ap.add_argument("--in-memory-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.in_memory_child:
        in_memory(*args.in_memory_child)
        return

    import zarr
    from distributed import Client, LocalCluster

    from patchblend.distributed import block_plan, regular_chunks, sliding_window_inference, to_zarr

    n = args.size
    tmp = tempfile.mkdtemp(prefix="pb_bench_dist_", dir=args.tmp)
    try:
        src = os.path.join(tmp, "image.zarr")
        t0 = time.perf_counter()
        make_volume(src, n)
        print(f"volume [1, {n}, {n}, {n}] float32 ({n ** 3 * 4 / 2 ** 20:.0f} MiB) written to Zarr in "
              f"{time.perf_counter() - t0:.1f} s; predictor SmallConv, roi {ROI}³, overlap {OVERLAP}, {MODE}, "
              f"sw_batch_size {BATCH}; torch {torch.__version__}, {os.cpu_count()} CPUs")

        ref_npy = os.path.join(tmp, "ref.npy")
        out = subprocess.run([sys.executable, __file__, "--in-memory-child", src, ref_npy], capture_output=True,
                             text=True, check=True)
        wall_mem, rss_mem = map(float, out.stdout.split("RESULT")[1].split())
        ref = np.load(ref_npy, mmap_mode="r")

        print("\n| block | blocks | recompute factor | max input region |")
        print("| --- | --- | --- | --- |")
        shape = (n, n, n)
        for b in sorted({32, 64, 128, 256, 512, *args.blocks}):
            if b > n:
                continue
            plan = block_plan(shape, (ROI,) * 3, OVERLAP, regular_chunks(shape, b))
            print(f"| {b}³ | {plan.num_blocks} | {plan.recompute_factor:.2f} | {plan.max_region_shape()} |")

        rows = []
        overhead = None
        for workers in args.workers:
            for b in args.blocks:
                if b > n:
                    continue
                with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster, Client(cluster) as client:
                    base = client.run(reset_peak)
                    image = zarr.open_array(src, mode="r")
                    t_graph = time.perf_counter()
                    probs, plan = sliding_window_inference(image, ROI, BATCH, SmallConv(), OVERLAP, MODE,
                                                           chunks=b, out_channels=2, return_plan=True)
                    t_graph = time.perf_counter() - t_graph
                    layer = probs.__dask_graph__().layers[probs.name]
                    block_tasks = [v for k, v in layer.items() if isinstance(k, tuple) and k[0] == probs.name]
                    spec_bytes = sum(len(pickle.dumps(t)) for t in block_tasks) // len(block_tasks)
                    t0 = time.perf_counter()
                    report = to_zarr(probs, os.path.join(tmp, f"probs_{workers}_{b}.zarr"), overwrite=True)
                    wall = time.perf_counter() - t0
                    peak = client.run(peak_rss)
                    if overhead is None and workers == max(args.workers):
                        overhead = task_overhead(client)
                    got = zarr.open_array(os.path.join(tmp, f"probs_{workers}_{b}.zarr"), mode="r")
                    equal = all(np.array_equal(got[:, d0:d0 + 128], ref[:, d0:d0 + 128]) for d0 in range(0, n, 128))
                    rows.append((workers, b, plan, wall, t_graph, max(peak.values()), max(base.values()),
                                 report.written, equal, spec_bytes))
        print(f"\nin-memory driver (1 thread): {wall_mem:.1f} s, peak RSS {rss_mem:.0f} MiB")
        print("\n| workers | block | tasks | recompute factor | wall | graph build | peak RSS per worker "
              "(at start) | equal to in-memory | pickled bytes per block task |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for workers, b, plan, wall, t_graph, peak, base, written, equal, spec_bytes in rows:
            print(f"| {workers} | {b}³ | {written} | {plan.recompute_factor:.2f} | {wall:.1f} s | {t_graph:.2f} s | "
                  f"{peak:.0f} MiB ({base:.0f}) | {'bitwise' if equal else 'NO'} | {spec_bytes} |")
        if overhead is not None:
            print(f"\nDask per-task overhead (empty tasks, {max(args.workers)} workers): {overhead * 1e3:.2f} ms")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
