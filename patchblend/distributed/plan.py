"""Which windows each output block runs: the global window lattice cut into blocks (no Dask here).

The in-memory driver places its windows on a separable lattice (per-axis start tables, raster order, docs/design.md#window-placement)
over the image padded to at least the ROI. A block ``[lo, hi)`` of the output is covered by exactly the windows
whose start ``s`` along every axis satisfies ``s < hi`` and ``s + roi > lo``; along one axis they are a
contiguous run of the start table, so a block's windows are again a lattice (the product of its per-axis runs),
visited in the same global raster order. Blending only those, with coordinates shifted by ``lo``, gives the
block's voxels of the whole-volume result bit for bit (docs/design.md#block-exactness).

A window that straddles a block border is run by every block it touches. :attr:`BlockPlan.recompute_factor`
is the total number of window runs over the number of windows; along one axis a window of length ``r`` touches
about ``1 + (r - 1) / B`` blocks of length ``B`` (fewer when ``B`` is a multiple of the step), so the factor is
about the product of that over the axes: ~8 for blocks of one ROI, ~2 for blocks of four.
"""
from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

from ..inference import WindowGrid, sliding_windows

__all__ = ["BlockPlan", "block_plan", "advise_block_size", "regular_chunks"]

Chunks = Tuple[Tuple[int, ...], ...]


def regular_chunks(shape: Sequence[int], block: Union[int, Sequence[int]]) -> Chunks:
    """Chunks of ``block`` voxels per axis (the last one smaller), in Dask's ``((c0, c1, ...), ...)`` form."""
    shape = tuple(int(s) for s in shape)
    block = (int(block),) * len(shape) if isinstance(block, int) else tuple(int(b) for b in block)
    if len(block) != len(shape) or any(b < 1 for b in block):
        raise ValueError(f"block must be a positive int or {len(shape)} positive ints, got {block!r}")
    return tuple(tuple(min(b, s - i) for i in range(0, s, b)) for s, b in zip(shape, block))


@dataclass(frozen=True)
class BlockPlan:
    """The global window lattice and the output blocks.

    Attributes:
        image_shape: spatial size ``S`` of the image.
        roi: window size per axis.
        pad_lo: padding before the image per axis (the driver pads an image smaller than the ROI).
        starts: per axis, the window starts in image coordinates (negative where the image is padded), ascending
            (repeated starts possible with nnU-Net placement); the windows are their product in raster order.
        chunks: the output blocks per axis, Dask-style ``((b0, b1, ...), ...)``.
    """

    image_shape: Tuple[int, ...]
    roi: Tuple[int, ...]
    pad_lo: Tuple[int, ...]
    starts: Tuple[Tuple[int, ...], ...]
    chunks: Chunks

    @property
    def grid(self) -> WindowGrid:
        """The global lattice in image coordinates."""
        return WindowGrid(self.image_shape, self.roi, self.starts)

    @property
    def num_windows(self) -> int:
        return math.prod(len(s) for s in self.starts)

    @property
    def num_blocks(self) -> int:
        return math.prod(len(c) for c in self.chunks)

    def block_bounds(self, index: Sequence[int]) -> Tuple[Tuple[int, int], ...]:
        """``(lo, hi)`` per axis of block ``index`` (its position in the block grid)."""
        out = []
        for a, i in enumerate(index):
            lo = sum(self.chunks[a][:i])
            out.append((lo, lo + self.chunks[a][i]))
        return tuple(out)

    def axis_runs(self, axis: int) -> Tuple[Tuple[int, int], ...]:
        """Per block along ``axis``: the run ``[first, end)`` of that axis's start table whose windows meet it."""
        starts, r = self.starts[axis], self.roi[axis]
        runs, lo = [], 0
        for size in self.chunks[axis]:
            hi = lo + size
            first = bisect.bisect_right(starts, lo - r)  # first start with s + r > lo
            end = bisect.bisect_left(starts, hi)  # first start with s >= hi
            runs.append((first, end))
            lo = hi
        return tuple(runs)

    def block_starts(self, index: Sequence[int]) -> Tuple[Tuple[int, ...], ...]:
        """Per axis, the starts (image coordinates) of the windows that meet block ``index``."""
        return tuple(self.starts[a][slice(*self.axis_runs(a)[i])] for a, i in enumerate(index))

    def input_region(self, index: Sequence[int]) -> Tuple[Tuple[int, int], ...]:
        """``(lo, hi)`` per axis of the input that block ``index``'s windows read (clipped to the image)."""
        out = []
        for a, starts in enumerate(self.block_starts(index)):
            out.append((max(starts[0], 0), min(starts[-1] + self.roi[a], self.image_shape[a])))
        return tuple(out)

    def windows_per_block(self, index: Sequence[int]) -> int:
        return math.prod(len(s) for s in self.block_starts(index))

    @property
    def window_runs(self) -> int:
        """Windows run over all blocks (a window is run once by each block it meets)."""
        return math.prod(sum(e - f for f, e in self.axis_runs(a)) for a in range(len(self.starts)))

    @property
    def recompute_factor(self) -> float:
        """``window_runs / num_windows``: 1.0 when every window lies inside one block."""
        return self.window_runs / self.num_windows

    def block_indices(self):
        """Every block index in raster order."""
        return itertools.product(*(range(len(c)) for c in self.chunks))

    def max_block_shape(self) -> Tuple[int, ...]:
        return tuple(max(c) for c in self.chunks)

    def max_region_shape(self) -> Tuple[int, ...]:
        """The largest input region one block reads, per axis."""
        out = []
        for a in range(len(self.starts)):
            widths = [min(self.starts[a][e - 1] + self.roi[a], self.image_shape[a]) - max(self.starts[a][f], 0)
                      for f, e in self.axis_runs(a)]
            out.append(max(widths))
        return tuple(out)

    def summary(self) -> str:
        return (f"{self.num_blocks} blocks of up to {self.max_block_shape()} voxels, {self.num_windows} windows, "
                f"{self.window_runs} window runs (recompute factor {self.recompute_factor:.2f})")


def _check_shape(name: str, value, nd: Optional[int] = None) -> Tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {value!r}") from None
    if (nd is not None and len(out) != nd) or any(v < 1 for v in out):
        raise ValueError(f"{name} must be {nd or 'some'} positive ints, got {value!r}")
    return out


def block_plan(
    image_shape: Sequence[int],
    roi: Sequence[int],
    overlap: Union[Sequence[float], float],
    chunks: Chunks,
    placement: str = "monai",
) -> BlockPlan:
    """Plan the windows exactly as :func:`patchblend.sliding_window_inference` does (padding an image smaller than
    the ROI, then ``sliding_windows(padded, roi, overlap, placement)``), and cut the output into ``chunks``.

    Args:
        image_shape: spatial size ``S`` (2 or 3 axes).
        roi: window size, one int per axis (resolved: no ``None``).
        overlap: scalar or per axis, in ``[0, 1)``.
        chunks: output blocks per axis, ``((b0, b1, ...), ...)`` summing to ``S`` (see :func:`regular_chunks`).
        placement: ``"monai"`` or ``"nnunet"``.
    """
    image_shape = _check_shape("image_shape", image_shape)
    nd = len(image_shape)
    roi = _check_shape("roi", roi, nd)
    chunks = tuple(tuple(int(c) for c in axis) for axis in chunks)
    if len(chunks) != nd or any(sum(c) != s or min(c, default=0) < 1 for c, s in zip(chunks, image_shape)):
        raise ValueError(f"chunks must give {nd} axes of positive block sizes summing to {image_shape}, got {chunks}")
    pad_lo = tuple(max(r - s, 0) // 2 for r, s in zip(roi, image_shape))
    padded = tuple(max(r, s) for r, s in zip(roi, image_shape))
    grid = sliding_windows(padded, roi, overlap, placement)
    starts = tuple(tuple(s - p for s in axis) for axis, p in zip(grid.starts, pad_lo))
    return BlockPlan(image_shape, roi, pad_lo, starts, chunks)


def advise_block_size(
    image_shape: Sequence[int],
    roi: Sequence[int],
    overlap: Union[Sequence[float], float] = 0.25,
    placement: str = "monai",
    *,
    in_channels: int = 1,
    out_channels: int = 2,
    in_itemsize: int = 4,
    max_task_bytes: int = 2 << 30,
) -> Tuple[int, ...]:
    """A block size (per axis) with the lowest recompute factor whose task fits ``max_task_bytes``.

    Candidates are multiples of the window step along each axis (a block border then cuts as few windows as
    possible), the same multiple on every axis, capped at the image. A task holds its input region (the block
    plus a halo of up to ``roi - 1`` each side, ``in_channels * in_itemsize`` bytes a voxel) and its float32
    output block (``out_channels * 4`` bytes a voxel); one predictor batch comes on top.
    """
    image_shape = _check_shape("image_shape", image_shape)
    nd = len(image_shape)
    roi = _check_shape("roi", roi, nd)
    base = block_plan(image_shape, roi, overlap, tuple((s,) for s in image_shape), placement)
    steps = []
    for a in range(nd):
        st = base.starts[a]
        diffs = [b - x for x, b in zip(st, st[1:]) if b > x]
        steps.append(min(diffs) if diffs else roi[a])
    best = None
    m = 1
    while True:
        block = tuple(min(m * t, s) for t, s in zip(steps, image_shape))
        plan = block_plan(image_shape, roi, overlap, regular_chunks(image_shape, block), placement)
        region = plan.max_region_shape()
        task_bytes = math.prod(region) * in_channels * in_itemsize + math.prod(block) * out_channels * 4
        if task_bytes > max_task_bytes and best is not None:
            break
        if best is None or plan.recompute_factor < best[0]:
            best = (plan.recompute_factor, block)
        if block == image_shape:
            break
        m += 1
    return best[1]
