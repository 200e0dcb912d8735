"""The compiled CPU kernel's other variants, for tests that compare them bitwise with this process's default.

The kernel reads its debug switches once, at its first call (``PATCHBLEND_CPU_ISA=baseline``: the baseline
instruction set instead of AVX2; ``PATCHBLEND_CPU_KERNEL=voxel``: the CUDA kernel's per-voxel function instead of
the row kernel), so setting one in this process after that changes nothing: another variant runs in its own
process. :func:`variant` starts one (spawned, with the switch set before anything runs there) and keeps it for
the session; :meth:`Variant.call` runs a function there on pickled arguments and returns its result.
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import torch


def _set_environment(env: dict) -> None:
    os.environ.update(env)


class Variant:
    """A worker process whose kernel runs with ``switch=value``."""

    def __init__(self, switch: str, value: str):
        if os.environ.get(switch) == value:
            raise RuntimeError(f"this process already runs with {switch}={value}: nothing to compare against")
        self.switch, self.value = switch, value
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_set_environment, initargs=({switch: value},))

    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` in the worker (``fn`` importable there: a module-level function)."""
        return self._pool.submit(fn, *args, **kwargs).result(timeout=600)

    def op(self, name: str, *args):
        """``torch.ops.patchblend.<name>(*args)`` in the worker: (its result, the arguments after the call), so
        that the in-place ops' outputs come back."""
        return self.call(run_op, name, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def run_op(name: str, *args):
    """``torch.ops.patchblend.<name>(*args)``: (its result, the arguments after the call)."""
    import patchblend  # noqa: F401  (registers the ops; imported here, after the worker's switch is set)

    result = getattr(torch.ops.patchblend, name)(*args)
    return result, args


def environment(name: str):
    return os.environ.get(name)


@functools.lru_cache(maxsize=None)
def variant(switch: str, value: str) -> Variant:
    """The session's worker for ``switch=value`` (started on first use, checked to run with it)."""
    worker = Variant(switch, value)
    atexit.register(worker.close)
    assert worker.call(environment, switch) == value
    return worker
