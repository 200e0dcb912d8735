"""Any benchmark of this directory run against two trees of patchblend, side by side in one run.

Rounds alternate one fresh process per tree (the order flips every round). Each process runs *this* tree's
benchmark script with ``PYTHONPATH`` set to the tree, so only the library differs; the script writes its CSV
(``--csv``), and the rows are matched on ``--key`` columns. Printed per row: the median of ``--metric`` over
rounds for each tree, its range, and the ratio this/baseline (< 1: this tree is faster).

    git archive <commit> patchblend csrc | tar -x -C /tmp/base
    python benchmarks/compare_trees.py --baseline /tmp/base --rounds 6 -- \\
        benchmarks/bench_blend.py --impls compiled stream --cases S-C1 --copy-mib 256

The baseline tree compiles its own kernels on first import (or shares the build cache when ``csrc/`` is equal).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_once(tree: str, script: list, csv_path: str, timeout: float) -> list:
    """One process of ``script`` against ``tree``; its CSV rows."""
    env = dict(os.environ, PYTHONPATH=tree)
    proc = subprocess.run([sys.executable, *script, "--csv", csv_path], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)
    if proc.returncode:
        sys.exit(f"{tree} failed:\n{proc.stdout[-1000:]}\n{proc.stderr[-2000:]}")
    first = proc.stdout.splitlines()[0] if proc.stdout else ""
    print(f"    {tree}: {first}", flush=True)
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="a directory holding another version's patchblend/ (and csrc/)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--metric", default="ms", help="the CSV column compared (default: ms)")
    ap.add_argument("--key", nargs="*", default=["case", "dtype", "weights", "impl"],
                    help="the CSV columns naming a row (default: bench_blend's)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    ap.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS]: the benchmark and its arguments")
    args = ap.parse_args(argv)
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        ap.error("name the benchmark script after --")
    trees = {"baseline": str(Path(args.baseline).resolve()), "this": str(ROOT)}
    if not (Path(trees["baseline"]) / "patchblend").is_dir():
        ap.error(f"--baseline {args.baseline} holds no patchblend/")
    values = {t: {} for t in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(trees.items()) if r % 2 == 0 else list(reversed(list(trees.items())))
            for name, path in order:
                for row in run_once(path, script, os.path.join(tmp, f"{name}.csv"), args.timeout):
                    key = tuple(row[k] for k in args.key)
                    values[name].setdefault(key, []).append(float(row[args.metric]))
            print(f"  round {r + 1}/{args.rounds} done", flush=True)
    width = max((len(" ".join(k)) for k in values["this"]), default=10) + 2
    print(f"{' '.join(args.key):<{width}}{'baseline median (range)':>28}{'this median (range)':>28}{'this/baseline':>15}")
    for key, this in values["this"].items():
        base = values["baseline"].get(key)
        if not base:
            print(f"{' '.join(key):<{width}}{'(not in baseline)':>28}")
            continue
        mb, mt = statistics.median(base), statistics.median(this)
        print(f"{' '.join(key):<{width}}{mb:>12.3f} ({min(base):.3f}-{max(base):.3f})"
              f"{mt:>12.3f} ({min(this):.3f}-{max(this):.3f}){mt / mb:>15.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
