"""``python -m patchblend.examples.cib {demo,train,evaluate,phantom} ...``"""
from __future__ import annotations

import argparse
import sys


def _phantom(argv):
    from .phantom import PhantomConfig, write_phantom_set

    p = argparse.ArgumentParser(prog="python -m patchblend.examples.cib phantom",
                                description="Write a synthetic MSSEG-2-style phantom set.")
    p.add_argument("--out", required=True)
    p.add_argument("--n-two", type=int, default=8, help="two-time-point cases")
    p.add_argument("--n-single", type=int, default=0, help="single-time-point cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--downsample", type=float, default=2.5, help="voxel size in mm")
    a = p.parse_args(argv)
    for f in write_phantom_set(a.out, a.n_two, a.n_single, a.seed, PhantomConfig(downsample=a.downsample),
                               progress=True):
        print(f)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("demo", "train", "evaluate", "phantom")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m patchblend.examples.cib {{{','.join(commands)}}} [options] (--help per command)",
              file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as run
    elif cmd == "train":
        from .train import main as run
    elif cmd == "evaluate":
        from .evaluate import main as run
    else:
        run = _phantom
    run(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
