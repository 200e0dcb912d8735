"""Sliding-window inference beyond one machine: exact block-wise blending on Dask, with Zarr storage.

- :func:`sliding_window_inference`: ``[C, *S]`` Dask or Zarr array in, lazy Dask array out, one task per output
  block; equal to :func:`patchblend.sliding_window_inference` (bitwise on the CPU for batch-independent predictors).
- :class:`PredictorFactory`: build the model on each worker instead of shipping it.
- :func:`to_zarr`: write the result to Zarr, resuming an interrupted run (the chunks already written are skipped).
- :func:`block_plan`, :class:`BlockPlan`, :func:`advise_block_size`: the windows each block runs, the recompute
  factor of the windows on block borders, and a block size that keeps it low.

Needs the ``distributed`` extra (``pip install patchblend[distributed]``: dask[distributed], zarr); ``import
patchblend`` never imports this package.
"""
try:
    import dask.array  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("patchblend.distributed needs dask: pip install 'patchblend[distributed]' "
                      "(dask[distributed], zarr)") from exc

from .graph import sliding_window_inference
from .plan import BlockPlan, advise_block_size, block_plan, regular_chunks
from .store import to_zarr
from .worker import PredictorFactory, clear_worker_cache

__all__ = [
    "sliding_window_inference",
    "PredictorFactory",
    "to_zarr",
    "block_plan",
    "BlockPlan",
    "advise_block_size",
    "regular_chunks",
    "clear_worker_cache",
]
