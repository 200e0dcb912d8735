"""Writing a blocked result to Zarr, resumably: each output chunk is written whole by the one task that computed it,
and a run that was interrupted (a crash, a killed job, a failed task) and restarted writes only the chunks that
are not stored yet.

A chunk is stored in one ``set`` of the store (a local directory store writes a temporary file and renames it),
so a stored chunk is complete; chunks are written even when they equal the fill value (``write_empty_chunks``),
so "stored" means "computed". Chunks written by someone else without that setting may be missing although
computed: they are recomputed (never wrong, only slower).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

import dask.array as da
from dask.highlevelgraph import HighLevelGraph

__all__ = ["to_zarr", "ZarrWrite"]


@dataclass(frozen=True)
class ZarrWrite:
    """What :func:`to_zarr` did: the zarr ``array`` written to, and how many chunks were ``written`` now and
    ``skipped`` (already stored)."""

    array: Any
    written: int
    skipped: int


def _regular(chunks) -> Tuple[int, ...]:
    sizes = []
    for axis in chunks:
        if any(c != axis[0] for c in axis[:-1]) or axis[-1] > axis[0]:
            raise ValueError(f"array chunks must be regular (all equal but a smaller last one) to match Zarr chunks, "
                             f"got {chunks}; pass regular chunks= to sliding_window_inference or rechunk")
        sizes.append(int(axis[0]))
    return tuple(sizes)


def _stored_keys(z) -> set:
    """Keys of the objects stored under ``z``'s path (one listing of the store)."""
    from zarr.core.sync import sync

    prefix = f"{z.path}/" if z.path else ""

    async def listing():
        return {k[len(prefix):] async for k in z.store.list_prefix(prefix)}

    return sync(listing())


def _write_block(z, block: np.ndarray, region) -> np.ndarray:
    z.with_config({"write_empty_chunks": True})[region.slices] = block
    return np.ones(1, dtype=np.int64)


@dataclass(frozen=True)
class _Region:
    slices: Tuple[slice, ...]


def to_zarr(array: da.Array, store, *, name: Optional[str] = None, resume: bool = True, overwrite: bool = False,
            compute: bool = True, **create_kwargs):
    """Compute ``array`` chunk by chunk into a Zarr array, skipping the chunks already stored (``resume``).

    Args:
        array: a Dask array with regular chunks (the output of
            :func:`~patchblend.distributed.sliding_window_inference`); the Zarr chunks are its chunks.
        store: a Zarr store or path (``"probs.zarr"``); it must be reachable from every worker (a shared
            file system or an object store, not an in-memory store).
        name: the array's path inside the store (a group member), or None for the root.
        resume: skip the chunks already stored in an existing array of the same shape, dtype and chunks (an
            existing array that differs raises ``ValueError``). With False every chunk is written.
        overwrite: start a new array, deleting what is there.
        compute: run now and return a :class:`ZarrWrite`; with False return ``(lazy, zarr_array)``, where
            ``lazy`` is a Dask array with one element per chunk to write (``lazy.compute()`` writes them).
        create_kwargs: passed to ``zarr.create_array`` when the array is created (``compressors=``, ...).

    Interrupted runs: call again with the same arguments; only the missing chunks are computed.
    """
    import zarr

    if not isinstance(array, da.Array):
        raise TypeError(f"array must be a dask.array.Array, got {type(array).__name__}")
    chunk_shape = _regular(array.chunks)
    z = None
    if not overwrite:
        try:
            z = zarr.open_array(store=store, path=name, mode="r+")
        except FileNotFoundError:
            z = None
    if z is not None:
        if tuple(z.shape) != tuple(array.shape) or np.dtype(z.dtype) != np.dtype(array.dtype) \
                or tuple(z.chunks) != chunk_shape:
            raise ValueError(f"the existing zarr array at {name or '/'} is {z.dtype} {tuple(z.shape)} chunked "
                             f"{tuple(z.chunks)}, but array is {array.dtype} {tuple(array.shape)} chunked "
                             f"{chunk_shape}; "
                             "pass overwrite=True to replace it")
    else:
        z = zarr.create_array(store=store, name=name, shape=array.shape, chunks=chunk_shape, dtype=array.dtype,
                              overwrite=overwrite, config={"write_empty_chunks": True}, **create_kwargs)
    stored = _stored_keys(z) if resume else set()
    offsets = [np.cumsum((0,) + tuple(c)) for c in array.chunks]
    todo = []
    for index in np.ndindex(*array.numblocks):
        if z.metadata.encode_chunk_key(tuple(index)) in stored:
            continue
        todo.append(index)
    total = int(np.prod(array.numblocks))
    wname = f"patchblend-to-zarr-{array.name}"
    dsk = {}
    for n, index in enumerate(todo):
        region = _Region(tuple(slice(int(o[i]), int(o[i + 1])) for o, i in zip(offsets, index)))
        dsk[(wname, n)] = (_write_block, z, (array.name, *index), region)
    if todo:
        graph = HighLevelGraph.from_collections(wname, dsk, dependencies=[array])
        lazy = da.Array(graph, wname, chunks=((1,) * len(todo),), dtype=np.int64, meta=np.empty((0,), np.int64))
    else:  # everything is stored already
        lazy = da.zeros((0,), dtype=np.int64, chunks=1)
    if not compute:
        return lazy, z
    written = int(lazy.sum().compute()) if todo else 0
    return ZarrWrite(z, written, total - len(todo))
