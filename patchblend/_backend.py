"""Loads the compiled kernels, or registers the pure-PyTorch reference under the same operator names.

The ops ``torch.ops.patchblend.{blend, blend_add_, coverage, extract}`` always exist after import, so
``torch.compile`` and ``torch.library.opcheck`` see one custom op whichever backend runs it:

- compiled (default): ``patchblend._C`` defines the schemas (``TORCH_LIBRARY``) and the CPU/CUDA kernels;
- reference: when ``PATCHBLEND_BACKEND=reference`` is set, or the compiled library cannot be loaded
  (then with one warning), the schemas are defined here and implemented by :mod:`patchblend._reference`.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import _reference

_STATE = {"compiled": False, "cuda": False, "reason": ""}


def _register_reference_ops() -> None:
    lib = torch.library.Library("patchblend", "DEF")
    lib.define(
        "blend(Tensor patches, Tensor? weights, Tensor coords, Tensor? importance, SymInt[] out_shape, "
        "str normalize) -> Tensor"
    )
    lib.define(
        "coverage(Tensor? weights, Tensor coords, Tensor? importance, SymInt[] patch_shape, SymInt[] out_shape, "
        "str normalize, ScalarType dtype) -> Tensor"
    )
    lib.define("extract(Tensor volume, Tensor coords, SymInt[] patch_shape) -> Tensor")
    lib.define(
        "blend_add_(Tensor(a!) sum, Tensor(b!)? den, Tensor patches, Tensor? weights, Tensor coords, "
        "Tensor? importance, str normalize) -> ()"
    )

    lib.define(
        "blend_stream_(Tensor(a!) out, Tensor patches, Tensor? weights, Tensor coords, int first, "
        "Tensor? importance, str normalize) -> ()"
    )

    lib.define("empty_large(SymInt[] size, ScalarType dtype) -> Tensor")
    lib.impl("empty_large", lambda size, dtype: torch.empty(size, dtype=dtype), "CompositeExplicitAutograd")
    lib.define("release_cached_output() -> int")
    lib.impl("release_cached_output", lambda: 0, "CompositeExplicitAutograd")

    def blend(patches, weights, coords, importance, out_shape, normalize):
        with torch.no_grad():
            return _reference.blend_reference(patches, weights, coords, importance, tuple(out_shape), normalize)

    def coverage(weights, coords, importance, patch_shape, out_shape, normalize, dtype):
        return _reference.coverage_reference(
            weights, coords, importance, tuple(patch_shape), tuple(out_shape), normalize, dtype
        )

    def extract(volume, coords, patch_shape):
        return _reference.extract_patches(volume, coords, tuple(patch_shape))

    def blend_add_(total, den, patches, weights, coords, importance, normalize):
        with torch.no_grad():
            _reference.blend_add_reference(total, den, patches, weights, coords, importance, normalize)

    def blend_stream_(out, patches, weights, coords, first, importance, normalize):
        with torch.no_grad():
            _reference.blend_stream_reference(out, patches, weights, coords, first, importance, normalize)

    for key in ("CPU", "CUDA"):
        lib.impl("blend_add_", blend_add_, key)
        lib.impl("blend_stream_", blend_stream_, key)
        lib.impl("blend", blend, key)
        lib.impl("coverage", coverage, key)
        lib.impl("extract", extract, key)
    _STATE["library"] = lib  # keep the registration alive


def _load() -> None:
    wanted = os.environ.get("PATCHBLEND_BACKEND", "auto").lower()
    if wanted not in ("auto", "compiled", "reference"):
        raise ValueError(f"PATCHBLEND_BACKEND must be 'auto', 'compiled' or 'reference', got {wanted!r}")
    if wanted != "reference":
        try:
            from . import _C  # noqa: F401  (loading the library registers the ops)

            _STATE["compiled"] = True
            _STATE["cuda"] = torch._C._dispatch_has_kernel_for_dispatch_key("patchblend::blend", "CUDA")
            return
        except ImportError as exc:
            if wanted == "compiled":
                raise
            _STATE["reason"] = f"compiled kernels could not be loaded ({exc})"
            warnings.warn(
                f"patchblend: {_STATE['reason']}; using the pure-PyTorch reference, which is much slower. "
                "Build them with `pip install --no-build-isolation .`",
                RuntimeWarning,
                stacklevel=3,
            )
    else:
        _STATE["reason"] = "PATCHBLEND_BACKEND=reference"
    _register_reference_ops()


_load()


def backend_info() -> dict:
    """Which backend runs the blend.

    Returns a dict with ``compiled`` (the C++ kernels are loaded), ``cuda`` (CUDA kernels are compiled in),
    ``cuda_available`` (a CUDA device is usable now), ``backend`` (``"compiled"`` or ``"reference"``),
    ``reason`` (why the reference is used, else empty), ``torch`` (version) and ``threads``.
    """
    return {
        "compiled": _STATE["compiled"],
        "cuda": _STATE["cuda"],
        "cuda_available": torch.cuda.is_available(),
        "backend": "compiled" if _STATE["compiled"] else "reference",
        "reason": _STATE["reason"],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
