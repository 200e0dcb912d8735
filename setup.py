"""Builds patchblend: the Python package, the C++/CUDA sources shipped inside it, and, when torch is importable
at build time, the compiled kernels.

- Plain ``pip install .`` / ``pip install patchblend`` (build isolation: the build environment has no torch):
  no binary is built and none is downloaded. The wheel is pure Python (``py3-none-any``) and carries the
  sources in ``patchblend/_csrc``; the kernels are compiled on first use into a per-user cache
  (``patchblend/_build.py``), or ahead of time by ``python -m patchblend build``.
- ``pip install --no-build-isolation .`` (torch installed): the kernels are compiled now, against that torch,
  into ``patchblend/_C``. ``pip wheel --no-build-isolation .`` makes a binary wheel the same way.
- The CUDA kernels are added when torch was built with CUDA and nvcc is found. ``PATCHBLEND_CUDA=1`` forces
  them (the build fails without CUDA), ``PATCHBLEND_CUDA=0`` skips them (a CUDA torch then compiles them on
  first use, see above).
- ``PATCHBLEND_NO_EXTENSION=1`` builds no binary even when torch is importable.
"""
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    """patchblend/_build.py (source lists and flags) without importing the package (which needs torch)."""
    spec = importlib.util.spec_from_file_location("_patchblend_build", os.path.join(ROOT, "patchblend", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = _load_build_module()


class BuildPyWithSources(build_py):
    """Also copies csrc/ into the built package as patchblend/_csrc (the first-use build compiles from it)."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install compiles from the checkout's csrc/
            return
        src = os.path.join(ROOT, "csrc")
        dst = os.path.join(self.build_lib, "patchblend", "_csrc")
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _cuda_wanted(torch_cuda: bool, cuda_home) -> bool:
    flag = os.environ.get("PATCHBLEND_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if not (torch_cuda and cuda_home):
            sys.exit("PATCHBLEND_CUDA=1 but torch has no CUDA or nvcc/CUDA_HOME was not found")
        return True
    return bool(torch_cuda and cuda_home)


def extensions():
    cmdclass = {"build_py": BuildPyWithSources}
    if os.environ.get("PATCHBLEND_NO_EXTENSION", "0") == "1" or not _torch_available():
        return [], cmdclass, {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = [f"csrc/{s}" for s in _build.CPU_SOURCES]
    cxx = list(_build.CXX_FLAGS)
    # a Python module of the limited API (patchblend/_C.abi3.so, a cp39-abi3 wheel): one file for every Python
    # >= 3.9, and (stable ABI, see _build.py) for every torch >= 2.11
    common = dict(py_limited_api=True, define_macros=[("PATCHBLEND_PYTHON_MODULE", None)],
                  extra_link_args=list(_build.LINK_FLAGS))
    if _cuda_wanted(torch.version.cuda is not None, CUDA_HOME):
        sources += [f"csrc/{s}" for s in _build.CUDA_SOURCES]
        nvcc = _build.nvcc_flags(_build.Path(ROOT) / "csrc")
        ext = CUDAExtension("patchblend._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **common)
    else:
        ext = CppExtension("patchblend._C", sources, extra_compile_args={"cxx": cxx}, **common)
    cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=False)
    return [ext], cmdclass, {"bdist_wheel": {"py_limited_api": "cp39"}}


ext_modules, cmdclass, options = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options)
