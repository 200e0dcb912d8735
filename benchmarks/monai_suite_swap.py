"""Run a pytest folder (e.g. a checkout of MONAI's own tests) with MONAI's sliding window swapped for patchblend's.

MONAI's test code is not part of this project: point the script at a local copy of the MONAI tests you want to
run (for example ``tests/inferers/test_sliding_window_inference.py``, the occlusion-sensitivity, HoVerNet-inferer
and sliding-window integration tests, laid out as in MONAI's repository so that ``tests.test_utils`` imports).

    python benchmarks/monai_suite_swap.py --rootdir /path/to/monai_tests tests/        # patchblend swapped in
    python benchmarks/monai_suite_swap.py --monai --rootdir /path/to/monai_tests tests/  # MONAI's own (baseline)

With the swap, every name under which MONAI's code reaches its sliding window is replaced before the tests are
imported: ``monai.inferers.sliding_window_inference`` (and in ``monai.inferers.utils``, ``monai.inferers.inferer``,
``monai.apps.pathology.inferers.inferer``, which MONAI's occlusion sensitivity and HoVerNet inferer call), and
``SlidingWindowInferer`` / ``SlidingWindowInfererAdapt`` by ``CalibratedSlidingWindowInferer`` /
``CalibratedSlidingWindowInfererAdapt``. Remaining arguments go to pytest; the pass/fail summary is pytest's.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys


def swap_in_patchblend() -> list:
    """Replace MONAI's sliding-window function and inferer classes by patchblend's; returns what was replaced."""
    import patchblend
    from patchblend.integrations.monai import CalibratedSlidingWindowInferer, CalibratedSlidingWindowInfererAdapt

    replaced = []
    targets = {
        "sliding_window_inference": patchblend.sliding_window_inference,
        "SlidingWindowInferer": CalibratedSlidingWindowInferer,
        "SlidingWindowInfererAdapt": CalibratedSlidingWindowInfererAdapt,
    }
    for module_name in ("monai.inferers", "monai.inferers.utils", "monai.inferers.inferer",
                        "monai.apps.pathology.inferers.inferer", "monai.apps.pathology.inferers"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, ours in targets.items():
            if hasattr(module, name):
                setattr(module, name, ours)
                replaced.append(f"{module_name}.{name}")
    return replaced


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--monai", action="store_true", help="run unpatched (MONAI's own functions: the baseline)")
    parser.add_argument("--rootdir", default=".", help="folder the tests import from (MONAI-style 'tests' package)")
    args, pytest_args = parser.parse_known_args(argv)
    import pytest

    # this checkout's patchblend (the script's parent folder), whatever the working directory
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rootdir = os.path.abspath(args.rootdir)
    sys.path.insert(1, rootdir)
    os.chdir(rootdir)
    if not args.monai:
        replaced = swap_in_patchblend()
        import patchblend

        print("patchblend", patchblend.__file__, "swapped in for:", ", ".join(replaced))
    else:
        print("MONAI unpatched (baseline)")
    return pytest.main(["-p", "no:cacheprovider", *pytest_args])


if __name__ == "__main__":
    sys.exit(main())
