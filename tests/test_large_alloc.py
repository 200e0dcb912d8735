"""The CPU buffers of the compiled ops (csrc/cpu/large_alloc.cpp, ``empty_large``): sizes checked before anything is
allocated, failures reported with the bytes asked for, memory reused call after call, and a poison switch that makes
a read of a buffer not yet written visible."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import patchblend

COMPILED = patchblend.backend_info()["compiled"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(patchblend.__file__)))
needs_compiled = pytest.mark.skipif(not COMPILED, reason="checks the compiled CPU library")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that imports this tree's patchblend (so that an abort ends only it)."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, **env)
    return subprocess.run([sys.executable, "-W", "ignore", "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=300)


@needs_compiled
def test_sizes_whose_byte_count_overflows_raise_instead_of_aborting():
    """The element count 4 * 2^24 * (2^38 + 1) wraps int64: empty_large passed the wrapped count on, and
    from_blob's check threw a C++ exception across the stable ABI, which killed the interpreter (SIGABRT)."""
    res = run_python("""
        import torch, patchblend
        from patchblend.inference import Blender
        cases = [lambda: patchblend.calibrated_blend(torch.rand(1, 1, 4, 4, 4), None,
                                                     torch.tensor([[0, 2**24 - 4, 2**38 - 3]])),
                 lambda: Blender((1, 2**24, 2**38 + 1), 1),
                 lambda: torch.ops.patchblend.empty_large([2**62, 4], torch.float16)]
        for case in cases:
            try:
                case()
                print("no error")
            except RuntimeError as exc:
                print(str(exc))
    """)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 3 and all("overflows int64" in line for line in lines), lines
    assert "blend: the output [C, *out_shape] = [1, 4, 16777216, 274877906945]" in lines[0]
    assert "[1, 1, 16777216, 274877906945]" in lines[1] and "[4611686018427387904, 4]" in lines[2]


@needs_compiled
def test_allocation_failure_says_how_many_bytes():
    """A buffer no machine can hold (2^62 bytes: beyond any address space) reported
    `torch_call_dispatcher("aten::empty", ...) API call failed`; now the bytes and the shape."""
    with pytest.raises(RuntimeError, match=r"could not allocate 4611686018427387904 bytes \(4294967296\.0 GiB\) for "
                                           r"blend: the output \[C, \*out_shape\] = \[1, 1048576, 1048576, 1048576\]"):
        patchblend.calibrated_blend(torch.rand(1, 1, 2, 2, 2), None, [[0, 0, 0]], (2**20, 2**20, 2**20))
    with pytest.raises(RuntimeError, match=r"could not allocate 4611686018427387904 bytes"):
        torch.ops.patchblend.empty_large([2**60], torch.float32)
    with pytest.raises(RuntimeError, match=r"empty_large: size \[3, -1\] .*sizes must be >= 0"):
        torch.ops.patchblend.empty_large([3, -1], torch.float32)


@needs_compiled
@pytest.mark.parametrize("numel", [5, 20_000, 9_000_000])  # torch's empty, malloc, huge pages
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.uint8, torch.complex64])
def test_empty_large_is_an_ordinary_writable_tensor(numel, dtype):
    t = torch.ops.patchblend.empty_large([numel], dtype)
    assert t.shape == (numel,) and t.dtype == dtype and t.is_contiguous() and t.data_ptr() % 64 == 0
    t.fill_(1)
    assert bool((t == 1).all())


_RSS_SCRIPT = """
    import json, torch, patchblend
    from patchblend import sliding_window_inference

    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    x = torch.rand(1, 1, 48, 40, 44)
    samples = {}
    with torch.no_grad():
        for i in range(120):
            sliding_window_inference(x, 16, 4, lambda t: t, 0.5, mode="gaussian")
            if i in (19, 119):
                samples[f"driver{i}"] = rss_mib()
    patches, coords = torch.rand(8, 1, 32, 32, 32), torch.randint(0, 120, (8, 3))
    weights = torch.rand(8)
    out = None
    for i in range(16):
        out = patchblend.calibrated_blend(patches, weights, coords, (160, 200, 240))  # 29 MiB, under 32 MiB
        if i in (3, 15):
            samples[f"blend{i}"] = rss_mib()
    print(json.dumps(samples))
"""


@needs_compiled
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")
def test_memory_levels_off_over_repeated_calls():
    """The driver (48x40x44, roi 16, gaussian) and a blend into a 29 MiB output, called again and again: the
    process's memory must level off. Torch's 64-byte aligned allocations (posix_memalign) of the window chunks
    and outputs were not reused by glibc (before 2.38) when the slivers it cut off stayed in its thread cache:
    +1 MiB per driver call, +29 MiB per blend, in about half of the runs. GLIBC_TUNABLES lets that cache keep
    every sliver, which makes every run show it."""
    res = run_python(_RSS_SCRIPT, GLIBC_TUNABLES="glibc.malloc.tcache_count=65535")
    assert res.returncode == 0, res.stderr[-2000:]
    rss = json.loads(res.stdout.strip().splitlines()[-1])
    assert rss["driver119"] - rss["driver19"] < 16, rss  # before: about 100 MiB
    assert rss["blend15"] - rss["blend3"] < 32, rss  # before: about 350 MiB


_POISON_SCRIPT = """
    import json, torch, patchblend
    from patchblend import sliding_window_inference
    small, medium, large = (torch.ops.patchblend.empty_large([n], torch.float32) for n in (5, 20_000, 9_000_000))
    x = torch.randn(1, 2, 11, 9, 13, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = sliding_window_inference(x, (6, 5, 7), 3, torch.tanh, 0.3)
        gauss = sliding_window_inference(x, (6, 5, 7), 3, torch.tanh, 0.3, mode="gaussian")
    windows = patchblend.extract_patches(x[0], [[-2, 0, 0], [5, 5, 9]], (8, 8, 8))
    print(json.dumps({"poisoned": [bool(t.isnan().all()) for t in (small, medium, large)],
                      "results": [o.flatten().tolist() for o in (out, gauss, windows)]}))
"""


@needs_compiled
def test_poison_switch_fills_buffers_with_nan_and_results_do_not_change():
    """PATCHBLEND_POISON_EMPTY=1 fills every empty_large buffer (outputs, running sums, extracted windows) with NaN:
    a kernel that read a voxel before writing it would then give NaN. The driver (the case of a nondeterminism seen
    once: 11x9x13, overlap 0.3, tanh) and the extraction give bitwise the unpoisoned results."""
    plain, poisoned = (run_python(_POISON_SCRIPT, PATCHBLEND_POISON_EMPTY=flag) for flag in ("0", "1"))
    assert plain.returncode == 0 and poisoned.returncode == 0, plain.stderr[-2000:] + poisoned.stderr[-2000:]
    plain, poisoned = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (plain, poisoned))
    assert poisoned["poisoned"] == [True, True, True]
    assert poisoned["results"] == plain["results"]
