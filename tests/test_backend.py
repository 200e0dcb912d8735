"""The loaded backend: kernels per device type, the CPU instruction-set variants, raw-op argument checks."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patchblend
from patchblend import _backend
from patchblend import _reference as ref
from kernel_variants import run_op, variant  # (tests/ is on sys.path)

INFO = patchblend.backend_info()
COMPILED = INFO["compiled"]


def test_every_device_type_has_a_kernel():
    """CPU and CUDA always have a kernel for every blend op: compiled, or the reference where none is compiled
    (before, a CPU-only library left CUDA tensors with no kernel at all)."""
    for op in ("blend", "blend_add_", "blend_stream_", "coverage", "extract"):
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"patchblend::{op}", key), (op, key)
    assert set(INFO["kernels"]) == {"CPU", "CUDA"}
    if not torch.cuda.is_available():
        assert INFO["kernels"]["CUDA"].startswith("reference") and INFO["cuda"] is False


@pytest.mark.skipif(not (COMPILED and INFO["cpu_isa"] == "avx2"), reason="needs the compiled kernels on an AVX2 CPU")
@settings(max_examples=25)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    n=st.integers(1, 6),
    channels=st.integers(1, 3),
    patch=st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 21)),
    grid=st.booleans(),
    normalize=st.sampled_from(["count", "weight", "none"]),
    seed=st.integers(0, 2**16),
)
def test_avx2_kernels_equal_baseline_bitwise(dtype, n, channels, patch, grid, normalize, seed):
    """The AVX2 + F16C variant (chosen at run time on this CPU) and the baseline variant (PATCHBLEND_CPU_ISA, read
    once: a second process) give bitwise equal blends and denominators, equal to the reference."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    patches = torch.randn(n, channels, *patch, generator=g).to(dtype)
    coords = torch.stack([torch.randint(-2, 6, (n,), generator=g) for _ in range(3)], 1)
    out_shape = [8, 8, 24]
    cells = [min(2, p) for p in patch] if grid else [1, 1, 1]
    weights = torch.rand(n, *cells, generator=g, dtype=acc) + 0.1
    importance = torch.rand(*patch, generator=g, dtype=acc) + 0.1
    args = (patches, weights, coords, importance, out_shape, normalize)
    coverage_args = (weights, coords, importance, list(patch), out_shape, normalize, acc)
    baseline = variant("PATCHBLEND_CPU_ISA", "baseline")
    assert baseline.call(_backend.cpu_isa) == "baseline"
    results = [(torch.ops.patchblend.blend(*args), torch.ops.patchblend.coverage(*coverage_args)),
               (baseline.op("blend", *args)[0], baseline.op("coverage", *coverage_args)[0])]
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    expected = ref.blend_reference(patches, weights, coords, importance, tuple(out_shape), normalize)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype)
    torch.testing.assert_close(results[0][0], expected, rtol=tol, atol=tol)


@pytest.mark.skipif(not (COMPILED and INFO["cpu_isa"] == "avx2"), reason="needs the compiled kernels on an AVX2 CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_avx2_stream_and_accumulate_equal_baseline_bitwise(dtype):
    """Stream mode (batches of a lattice) and accumulate mode: both variants bitwise equal, and the stream
    result bitwise that of one blend."""
    g = torch.Generator().manual_seed(3)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    patch, out_shape = (6, 7, 9), [9, 11, 19]
    starts = [(0, 3), (0, 4), (0, 5, 10)]
    coords = torch.cartesian_prod(*[torch.tensor(s) for s in starts])  # raster order
    n = coords.shape[0]
    patches = torch.randn(n, 2, *patch, generator=g).to(dtype)
    importance = torch.rand(*patch, generator=g, dtype=acc) + 0.1
    weights = torch.rand(n, 1, 1, 1, generator=g, dtype=acc) + 0.1
    baseline = variant("PATCHBLEND_CPU_ISA", "baseline")
    assert baseline.call(_backend.cpu_isa) == "baseline"
    results = {}
    for isa, run in (("auto", run_op), ("baseline", baseline.op)):
        out = torch.full((2, *out_shape), float("nan"), dtype=acc)
        for first in range(0, n, 5):
            _, (out, *_) = run("blend_stream_", out, patches[first:first + 5], weights[first:first + 5], coords,
                               first, importance, "count")
        total, den = torch.zeros(2, *out_shape, dtype=acc), torch.zeros(out_shape, dtype=acc)
        _, (total, den, *_) = run("blend_add_", total, den, patches, weights, coords, importance, "weight")
        results[isa] = (out, total, den)
    for a, b in zip(results["auto"], results["baseline"]):
        assert torch.equal(a, b)
    blended = torch.ops.patchblend.blend(patches, weights, coords, importance, out_shape, "count")
    assert torch.equal(results["auto"][0].to(dtype), blended)


@pytest.mark.skipif(not COMPILED, reason="checks the compiled op")
def test_blend_stream_first_near_int64_max_is_refused():
    """first + n overflowed int64 and passed the range check (then read out of bounds); now a clear error."""
    coords = torch.tensor([[0, 0, 0], [0, 0, 2]])
    out = torch.zeros(1, 2, 2, 4)
    patches = torch.ones(1, 1, 2, 2, 2)
    for first in (2**63 - 1, 2**63 - 2, 2):
        with pytest.raises(RuntimeError, match=rf"first = {first} .*not within the 2 windows"):
            torch.ops.patchblend.blend_stream_(out, patches, None, coords, first, None, "count")
    torch.ops.patchblend.blend_stream_(out, patches, None, coords, 1, None, "count")  # the last window: fine


@pytest.mark.skipif(not COMPILED, reason="checks the compiled op")
@pytest.mark.parametrize("bad", ["patch_shape", "out_shape"])
def test_coverage_negative_shape_names_the_argument(bad):
    """A negative patch shape reached std::vector (a length error naming nothing); now the argument is named."""
    shapes = {"patch_shape": [2, 2, 2], "out_shape": [4, 4, 4]}
    shapes[bad] = [2, -3, 2]
    with pytest.raises(RuntimeError, match=rf"{bad} must be non-negative, got \[2, -3, 2\]"):
        torch.ops.patchblend.coverage(None, torch.zeros(1, 3, dtype=torch.long), None, shapes["patch_shape"],
                                      shapes["out_shape"], "count", torch.float32)


def test_info_command_reports_backend_and_kernels():
    res = subprocess.run([sys.executable, "-m", "patchblend", "info"], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(patchblend.__file__)))
    out = res.stdout
    assert f"backend: {INFO['backend']}" in out
    assert f"torch: {torch.__version__}" in out
    for line in ("compiler: ", "nvcc: ", "cache: ", "CPU kernels: ", "CUDA kernels: "):
        assert line in out
    assert ("CPU kernels: compiled" in out) == COMPILED


def info_output(**env) -> str:
    """``python -m patchblend info`` in a fresh process with the kernel switches unset, then ``env`` set."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PATCHBLEND_CPU_ISA", "PATCHBLEND_CPU_KERNEL")}
    res = subprocess.run([sys.executable, "-W", "ignore", "-m", "patchblend", "info"], capture_output=True, text=True,
                         check=True, env={**clean, **env}, cwd=os.path.dirname(os.path.dirname(patchblend.__file__)))
    return res.stdout


def cpu_has_avx2_f16c() -> bool:
    with open("/proc/cpuinfo") as f:
        return {"avx2", "f16c"} <= set(next((line for line in f if line.startswith("flags")), "").split())


@pytest.mark.skipif(not COMPILED, reason="needs the compiled kernels")
@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU flags from /proc/cpuinfo")
def test_info_reports_the_instruction_set_the_kernel_chose():
    """`info` prints what the kernel library reports it runs (its cpu_kernel_isa op), not a guess from the OS's
    CPU flags: baseline when PATCHBLEND_CPU_ISA=baseline is set in the process, even on an AVX2 CPU; else AVX2
    exactly when the CPU has AVX2 and F16C."""
    assert "CPU instruction set: baseline" in info_output(PATCHBLEND_CPU_ISA="baseline")
    chosen = "avx2" if cpu_has_avx2_f16c() else "baseline"
    assert f"CPU instruction set: {chosen}" in info_output()
    assert f"CPU instruction set: {chosen}" in info_output(PATCHBLEND_CPU_ISA="auto")
    assert "CPU instruction set: none" in info_output(PATCHBLEND_BACKEND="reference")


@pytest.mark.skipif(not COMPILED, reason="needs the compiled kernels")
@pytest.mark.parametrize("switch, value, accepted", [("PATCHBLEND_CPU_ISA", "avx512", "'auto' or 'baseline'"),
                                                     ("PATCHBLEND_CPU_KERNEL", "voxels", "'rows' or 'voxel'")])
def test_an_unknown_kernel_switch_value_is_an_error_naming_it(switch, value, accepted):
    """Before, any value but the one recognised silently meant the default."""
    message = f"{switch} must be {accepted}, got '{value}'"
    assert f"CPU instruction set: error: {message}" in info_output(**{switch: value})
    worker = variant(switch, value)
    with pytest.raises(RuntimeError, match=message):
        worker.op("blend", torch.ones(1, 1, 2, 2, 2), None, torch.zeros(1, 3, dtype=torch.long), None, [2, 2, 2],
                  "count")


def test_the_raw_ops_take_exactly_the_normalize_modes_of_the_python_side():
    """Every mode of ``NORMALIZE_MODES`` (the Python side's one list) runs, and anything else is refused with the
    same message by the compiled ops and the reference (which alone read an unknown mode as "none")."""
    from patchblend._validate import NORMALIZE_MODES

    patches, coords = torch.ones(2, 1, 2, 2, 2), torch.tensor([[0, 0, 0], [0, 0, 1]])
    weights = torch.ones(2, 1, 1, 1)

    def calls(normalize):
        sum_, den = torch.zeros(1, 2, 2, 3), torch.zeros(2, 2, 3)
        yield lambda: torch.ops.patchblend.blend(patches, weights, coords, None, [2, 2, 3], normalize)
        yield lambda: torch.ops.patchblend.blend_add_(sum_, den, patches, weights, coords, None, normalize)
        yield lambda: torch.ops.patchblend.blend_stream_(sum_, patches, None, coords, 0, None, normalize)
        yield lambda: torch.ops.patchblend.coverage(weights, coords, None, [2, 2, 2], [2, 2, 3], normalize,
                                                    torch.float32)

    for normalize in NORMALIZE_MODES:
        for call in calls(normalize):
            call()
    accepted = ", ".join(f"'{mode}'" for mode in NORMALIZE_MODES[:-1]) + f" or '{NORMALIZE_MODES[-1]}'"
    for call in calls("mean"):
        with pytest.raises(RuntimeError, match=f"normalize must be {accepted}, got 'mean'"):
            call()
