"""Builds patchblend's compiled kernels against the torch that is already installed.

Install with ``pip install --no-build-isolation .`` (a build-isolated install would fetch a second torch).

- The CPU extension (``patchblend._C``) is always built.
- The CUDA kernels are added when torch was built with CUDA and nvcc is found.
  ``PATCHBLEND_CUDA=1`` forces them (the build fails without CUDA), ``PATCHBLEND_CUDA=0`` skips them.
- ``PATCHBLEND_NO_EXTENSION=1`` installs the pure-Python package only (the reference backend).
- ``PATCHBLEND_CPU_FLAGS``: extra x86 flags for the CPU kernel. Default ``auto``: ``-mavx2 -mf16c`` when the
  building machine has them (8-wide loops and hardware half conversion); ``none`` builds for baseline x86-64.
"""
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted(torch_cuda: bool, cuda_home) -> bool:
    flag = os.environ.get("PATCHBLEND_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if not (torch_cuda and cuda_home):
            sys.exit("PATCHBLEND_CUDA=1 but torch has no CUDA or nvcc/CUDA_HOME was not found")
        return True
    return bool(torch_cuda and cuda_home)


def _cpu_flags():
    flag = os.environ.get("PATCHBLEND_CPU_FLAGS", "auto")
    if flag != "auto":
        return [] if flag in ("", "none") else flag.split()
    try:
        with open("/proc/cpuinfo") as f:
            have = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return []
    return ["-mavx2", "-mf16c"] if {"avx2", "f16c"} <= have else []


def _nvcc_flags():
    """csrc/cuda/nvcc.flags, one per line (also read by .ci/check_cuda.sh, which compiles the kernels with torch's
    COMMON_NVCC_FLAGS in front, as the build does): torch's -D__CUDA_NO_HALF_CONVERSIONS__ (and bf16) undone,
    since the shared arithmetic converts half to float with casts; --fmad=false so that the GPU rounds
    multiply-adds as the CPU kernel does."""
    with open(os.path.join(ROOT, "csrc", "cuda", "nvcc.flags")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def extensions():
    if os.environ.get("PATCHBLEND_NO_EXTENSION", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/blend_ops.cpp", "csrc/cpu/blend_cpu.cpp", "csrc/cpu/large_alloc.cpp"]
    # -fno-trapping-math: lets the compiler vectorise the branch-free normalisation loops (it may then compute
    # a quotient that a select discards); results are unchanged, FP exceptions are never enabled here.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math"] + _cpu_flags()
    link = ["-fopenmp"]
    use_cuda = _cuda_wanted(torch.version.cuda is not None, CUDA_HOME)
    if use_cuda:
        sources += ["csrc/cuda/blend_cuda.cu", "csrc/cuda/blend_cuda_binding.cpp"]
        ext = CUDAExtension(
            "patchblend._C",
            sources,
            extra_compile_args={"cxx": cxx, "nvcc": _nvcc_flags()},
            extra_link_args=link,
        )
    else:
        ext = CppExtension("patchblend._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
