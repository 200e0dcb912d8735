"""Loads the compiled kernels (building them on first use where the installation lacks them), and lets the
pure-PyTorch reference serve every device type that has no compiled kernel.

The ops ``torch.ops.patchblend.{blend, blend_add_, blend_stream_, coverage, extract, ...}`` always exist after
import, so ``torch.compile`` and ``torch.library.opcheck`` see one custom op whichever backend runs it:

1. ``PATCHBLEND_BACKEND=reference``: the schemas are defined here, read from their one source
   (``csrc/op_schemas.h``, which the compiled library defines its ops from; :mod:`patchblend._op_schemas`), and
   implemented by :mod:`patchblend._reference` on every device.
2. Otherwise the CPU library: the installed ``patchblend._C`` (an ahead-of-time build), else, when the
   installation has none, a build of the sources in the per-user cache (:mod:`patchblend._build`, compiled on
   first use). It defines the schemas and the CPU kernels (and the CUDA kernels when built with nvcc).
3. CUDA: when torch has CUDA and a device is visible but the CPU library has no CUDA kernels, the CUDA library
   from the cache (built on first use when nvcc is found).
4. Every device type (CPU, CUDA) still without a kernel gets the reference, with one warning naming the cause
   and the fix (no warning for CUDA when no CUDA device is visible: nothing runs there).

``PATCHBLEND_BACKEND=compiled`` turns a failure of step 2 into an error. ``PATCHBLEND_BUILD=0`` forbids the
first-use build (the reference serves what is missing, with the warning).
"""
from __future__ import annotations

import importlib.machinery
import os
import sys
import warnings
from pathlib import Path

import torch

from . import _build, _op_schemas, _reference
from ._validate import NORMALIZE_MODES

#: what ``cpu_kernel_isa`` reports when no compiled CPU kernel is loaded
NO_CPU_KERNEL = "none"

_STATE = {"compiled": False, "cuda": False, "reason": "", "kernels": {}, "libraries": []}


def _define_schemas() -> None:
    """The ops from their one source (``csrc/op_schemas.h``, :mod:`patchblend._op_schemas`), with the reference
    implementations of the ops that take no tensor (the blend ops get theirs from :func:`_register_reference`)."""
    lib = torch.library.Library("patchblend", "DEF")
    for schema in _op_schemas.op_schemas():
        lib.define(schema)
    lib.impl("empty_large", lambda size, dtype: torch.empty(size, dtype=dtype), "CompositeExplicitAutograd")
    lib.impl("release_cached_output", lambda: 0, "CompositeExplicitAutograd")
    lib.impl("cpu_kernel_isa", lambda: NO_CPU_KERNEL, "CompositeExplicitAutograd")
    _STATE["libraries"].append(lib)  # keep the registration alive


def _check_normalize(normalize: str) -> None:
    """The compiled ops' check (csrc/blend_binding.h), for the reference: an unknown mode is an error there too
    (the reference alone would read it as "none")."""
    if normalize not in NORMALIZE_MODES:
        modes = ", ".join(f"'{mode}'" for mode in NORMALIZE_MODES[:-1]) + f" or '{NORMALIZE_MODES[-1]}'"
        raise RuntimeError(f"normalize must be {modes}, got '{normalize}'")


def _register_reference(device_type: str) -> None:
    """The reference as the ``device_type`` ("CPU" or "CUDA") kernels of the five blend ops."""

    def blend(patches, weights, coords, importance, out_shape, normalize):
        _check_normalize(normalize)
        with torch.no_grad():
            return _reference.blend_reference(patches, weights, coords, importance, tuple(out_shape), normalize)

    def coverage(weights, coords, importance, patch_shape, out_shape, normalize, dtype):
        _check_normalize(normalize)
        return _reference.coverage_reference(
            weights, coords, importance, tuple(patch_shape), tuple(out_shape), normalize, dtype
        )

    def extract(volume, coords, patch_shape):
        return _reference.extract_patches(volume, coords, tuple(patch_shape))

    def blend_add_(total, den, patches, weights, coords, importance, normalize):
        _check_normalize(normalize)
        with torch.no_grad():
            _reference.blend_add_reference(total, den, patches, weights, coords, importance, normalize)

    def blend_stream_(out, patches, weights, coords, first, importance, normalize):
        _check_normalize(normalize)
        with torch.no_grad():
            _reference.blend_stream_reference(out, patches, weights, coords, first, importance, normalize)

    lib = torch.library.Library("patchblend", "IMPL")
    for name, fn in (("blend", blend), ("coverage", coverage), ("extract", extract), ("blend_add_", blend_add_),
                     ("blend_stream_", blend_stream_)):
        lib.impl(name, fn, device_type)
    _STATE["libraries"].append(lib)


def _has_kernel(device_type: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("patchblend::blend", device_type)


def _installed_library() -> "Path | None":
    """The ahead-of-time built ``patchblend/_C`` in the package folder, if there is one."""
    folder = Path(__file__).resolve().parent
    for suffix in [".abi3.so"] + importlib.machinery.EXTENSION_SUFFIXES:
        if (folder / f"_C{suffix}").is_file():
            return folder / f"_C{suffix}"
    return None


def _build_allowed() -> bool:
    return os.environ.get("PATCHBLEND_BUILD", "1").lower() not in ("0", "false", "no", "off")


def _load_cached(kind: str) -> str:
    """Loads the cached ``kind`` library, building it first when needed and allowed (also when the cached build
    is damaged: :func:`patchblend._build.damaged`, with one warning saying so). Returns where it came from;
    raises RuntimeError with the cause (and the fix) otherwise."""
    lib = _build.library_path(kind)
    if lib is None:
        damage = _build.damaged(kind)
        cached = f"the cached build in {_build.build_dir()} is damaged ({damage})" if damage else "it is not built"
        if not _build_allowed():
            raise RuntimeError(f"{cached} and PATCHBLEND_BUILD=0 forbids building it; unset it and run "
                               "`python -m patchblend build`")
        try:
            lib = _build.build(kind)
        except RuntimeError as exc:
            raise RuntimeError(f"{cached} and rebuilding it failed: {exc}" if damage else str(exc)) from exc
        if damage:
            _warn(f"{cached}; rebuilt it")
    try:
        torch.ops.load_library(str(lib))
    except OSError as exc:
        raise RuntimeError(f"{lib} could not be loaded ({exc}); delete {lib.parent} and run "
                           "`python -m patchblend build`") from exc
    return f"compiled ({lib})"


def _warn(message: str) -> None:
    warnings.warn(f"patchblend: {message}", RuntimeWarning, stacklevel=4)


def _load() -> None:
    wanted = os.environ.get("PATCHBLEND_BACKEND", "auto").lower()
    if wanted not in ("auto", "compiled", "reference"):
        raise ValueError(f"PATCHBLEND_BACKEND must be 'auto', 'compiled' or 'reference', got {wanted!r}")
    kernels = _STATE["kernels"]
    if wanted == "reference":
        _STATE["reason"] = "PATCHBLEND_BACKEND=reference"
        _define_schemas()
        for device_type in ("CPU", "CUDA"):
            _register_reference(device_type)
            kernels[device_type] = "reference (PATCHBLEND_BACKEND=reference)"
        return

    # the CPU library (schemas + CPU kernels): installed, else cached / built on first use
    installed = _installed_library()
    blocked = "patchblend._C" in sys.modules and sys.modules["patchblend._C"] is None
    cpu_error = None
    if installed is not None or blocked:
        try:
            from . import _C  # noqa: F401  (loading the library registers the ops)

            kernels["CPU"] = f"compiled ({installed})"
        except ImportError as exc:
            cpu_error = (f"the compiled kernels could not be loaded ({exc}); reinstall patchblend for this torch "
                         "(they need torch >= 2.11)")
    else:
        try:
            kernels["CPU"] = _load_cached("cpu")
        except (RuntimeError, OSError) as exc:
            cpu_error = f"no compiled CPU kernels: {exc}"
    if cpu_error is not None:
        if wanted == "compiled":
            raise ImportError(f"patchblend: PATCHBLEND_BACKEND=compiled but {cpu_error}")
        _STATE["reason"] = cpu_error
        _define_schemas()
        _register_reference("CPU")
        kernels["CPU"] = "reference"
        _warn(f"{cpu_error}. Using the pure-PyTorch reference, which is much slower.")
    _STATE["compiled"] = cpu_error is None

    # CUDA kernels: in the CPU library, else the cached CUDA library (when there is a CUDA device to run them)
    cuda_device = torch.version.cuda is not None and torch.cuda.is_available()
    if _has_kernel("CUDA"):
        kernels["CUDA"] = kernels["CPU"]
    elif cuda_device and cpu_error is None:
        try:
            kernels["CUDA"] = _load_cached("cuda")
        except (RuntimeError, OSError) as exc:
            _STATE["reason"] = f"no compiled CUDA kernels: {exc}"
            _warn(f"{_STATE['reason']}. CUDA tensors use the pure-PyTorch reference, which is much slower.")
    if not _has_kernel("CUDA"):
        _register_reference("CUDA")
        if "CUDA" not in kernels:
            kernels["CUDA"] = "reference" + ("" if cuda_device else " (no CUDA device)")
    _STATE["cuda"] = _STATE["compiled"] and not kernels["CUDA"].startswith("reference")


_load()


def cpu_isa() -> str:
    """The instruction set the loaded CPU kernels run with, as the kernel library itself reports it (op
    ``cpu_kernel_isa``): ``"avx2"`` (AVX2 + F16C, chosen when this CPU has both) or ``"baseline"``
    (``PATCHBLEND_CPU_ISA=baseline`` forces it; read once, at the first kernel call); ``"none"`` when the
    reference serves the CPU."""
    return str(torch.ops.patchblend.cpu_kernel_isa())


def backend_info() -> dict:
    """Which backend runs the blend.

    Returns a dict with ``compiled`` (the C++ CPU kernels are loaded), ``cuda`` (CUDA kernels are loaded),
    ``cuda_available`` (a CUDA device is usable now), ``backend`` (``"compiled"`` or ``"reference"``),
    ``kernels`` (per device type, ``"CPU"`` and ``"CUDA"``: where its kernels come from, the installed or the
    cached library, or ``"reference"``), ``reason`` (why the reference serves some device type, else empty),
    ``cpu_isa`` (:func:`cpu_isa`: ``"avx2"``, ``"baseline"`` or ``"none"``; ``"error: ..."`` with the message
    when the kernel refuses its switches, e.g. an unknown ``PATCHBLEND_CPU_ISA``), ``torch`` (version) and ``threads``.
    """
    try:
        isa = cpu_isa()
    except RuntimeError as exc:
        isa = f"error: {str(exc).strip().splitlines()[-1]}"
    return {
        "compiled": _STATE["compiled"],
        "cuda": _STATE["cuda"],
        "cuda_available": torch.cuda.is_available(),
        "backend": "compiled" if _STATE["compiled"] else "reference",
        "kernels": dict(_STATE["kernels"]),
        "reason": _STATE["reason"],
        "cpu_isa": isa,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
