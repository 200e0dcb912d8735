"""``python -m patchblend info`` / ``python -m patchblend build``.

- ``info``: the backend, torch and CUDA versions, the compiler and nvcc found, the cache folder, which device
  types have compiled kernels (and from where), and why not.
- ``build``: compiles ahead of time what the installation lacks (the CPU kernels when no compiled library is
  installed; the CUDA kernels when torch has CUDA, a device is visible and the installed library has none)
  into the cache, so that the first ``import patchblend`` of a job does not pay for it. Exit status 1 when
  something could not be built.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m patchblend", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the backend, versions, tools, cache and kernels per device type")
    sub.add_parser("build", help="compile the missing kernels into the cache now")
    args = parser.parse_args(argv)

    # importing patchblend loads the kernels, building the missing ones when allowed (PATCHBLEND_BUILD)
    from . import _backend, _build

    state = _backend.backend_info()
    if args.command == "info":
        print("\n".join(_build.info_lines(state)))
        return 0
    failed = [device for device, where in state["kernels"].items()
              if where.startswith("reference") and not (device == "CUDA" and not _cuda_device())]
    for device, where in state["kernels"].items():
        print(f"{device} kernels: {where}")
    if failed:
        print(f"not built: {', '.join(failed)} ({state['reason']})", file=sys.stderr)
        return 1
    return 0


def _cuda_device() -> bool:
    import torch

    return torch.version.cuda is not None and torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
