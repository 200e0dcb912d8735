"""``python -m patchblend.examples.cib {demo,study,train,calibrate,evaluate,phantom} ...``

Bad input (a missing or unreadable file, a wrong option value) ends in one line on stderr and exit
status 2, without a traceback."""
from __future__ import annotations

import argparse
import sys

COMMANDS = ("demo", "study", "train", "calibrate", "evaluate", "phantom")


def _phantom(argv):
    from .data import InputError
    from .phantom import PHANTOM_PRESETS, check_downsample, phantom_preset, write_phantom_set
    from .train import check_out_folder

    p = argparse.ArgumentParser(prog="python -m patchblend.examples.cib phantom",
                                description="Write a synthetic MSSEG-2-style phantom set.")
    p.add_argument("--out", required=True)
    p.add_argument("--n-two", type=int, default=8, help="two-time-point cases")
    p.add_argument("--n-single", type=int, default=0, help="single-time-point cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="standard", choices=tuple(PHANTOM_PRESETS))
    p.add_argument("--downsample", type=float, default=2.5, help="voxel size in mm")
    a = p.parse_args(argv)
    check_out_folder(a.out)
    if a.n_two < 0 or a.n_single < 0:
        raise InputError(f"--n-two and --n-single must be >= 0, got {a.n_two} and {a.n_single}")
    check_downsample(a.downsample)
    for f in write_phantom_set(a.out, a.n_two, a.n_single, a.seed, phantom_preset(a.preset, downsample=a.downsample),
                               progress=True):
        print(f)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m patchblend.examples.cib {{{','.join(COMMANDS)}}} [options] (--help per command)",
              file=sys.stderr)
        return 2
    from .data import InputError

    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as run
    elif cmd == "study":
        from .study import main as run
    elif cmd == "train":
        from .train import main as run
    elif cmd == "calibrate":
        from .posthoc import main as run
    elif cmd == "evaluate":
        from .evaluate import main as run
    else:
        run = _phantom
    try:
        run(rest)
    except (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{cmd}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
