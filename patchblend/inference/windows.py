"""Window placement for sliding-window inference (docs/design.md#window-placement).

Both conventions are separable: each spatial axis gets its own table of window starts, and the windows
are the Cartesian product of those tables in raster order (axis 0 slowest), which is the order MONAI
visits them in.

- ``style="monai"`` (``monai.inferers.sliding_window_inference``): step ``int(window * (1 - overlap))``
  (at least 1; the whole window when it equals the image), starts ``i * step``, the last window moved
  back to end flush with the border.
- ``style="nnunet"`` (nnU-Net v2's ``compute_steps_for_sliding_window``) with nnU-Net's own ``tile_step_size``
  ``t`` in ``(0, 1]``: ``n = ceil((size - window) / (window * t)) + 1`` windows at
  ``round(i * ((size - window) / (n - 1)))``, evaluated in float64 exactly as nnU-Net does (``round`` is
  round-half-to-even). Pass ``tile_step_size=t`` to get nnU-Net's lattice exactly; given an ``overlap`` instead,
  ``t = 1 - overlap``, and that float subtraction can move a window (``1 - (1 - t) != t`` for e.g. t = 0.1 or
  0.3: size 60, window 24, t = 0.3 gives nnU-Net's 7 windows with ``tile_step_size=0.3`` and 6 with
  ``overlap=0.7``).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from .._validate import as_sizes

__all__ = ["WindowGrid", "sliding_windows", "window_starts", "nnunet_starts", "WINDOW_STYLES"]

WINDOW_STYLES = ("monai", "nnunet")


def _check_overlap(overlap: float, name: str = "overlap") -> float:
    try:
        o = float(overlap)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a float in [0, 1), got {overlap!r}") from exc
    if not (0.0 <= o < 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be >= 0 and < 1, got {overlap!r}")
    return o


def check_tile_step_size(tile_step_size, name: str = "tile_step_size") -> float:
    """nnU-Net's ``tile_step_size`` (a fraction of the window) as a float in ``(0, 1]``, else an error naming it."""
    try:
        t = float(tile_step_size)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a float in (0, 1], got {tile_step_size!r}") from exc
    if isinstance(tile_step_size, bool) or not (0.0 < t <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be > 0 and <= 1 (nnU-Net's tile_step_size), got {tile_step_size!r}")
    return t


def nnunet_starts(size: int, window: int, tile_step_size: float) -> Tuple[int, ...]:
    """nnU-Net v2's window starts along one axis for its ``tile_step_size`` ``t`` (``0 < t <= 1``, used as given):
    ``n = ceil((size - window) / (window * t)) + 1`` windows at ``round(i * (size - window) / (n - 1))`` in float64,
    ``round`` half to even. ``1 <= window <= size`` is the caller's to check."""
    n = int(math.ceil((size - window) / (window * tile_step_size))) + 1
    if n == 1:
        return (0,)
    actual = (size - window) / (n - 1)
    return tuple(int(round(actual * i)) for i in range(n))


def window_starts(size: int, window: int, overlap: Optional[float] = None, style: str = "monai", *,
                  tile_step_size: Optional[float] = None) -> Tuple[int, ...]:
    """Starts of the windows along one axis of length ``size`` for windows of length ``window``.

    Args:
        size: image length along the axis (``>= 1``).
        window: window length, ``1 <= window <= size`` (pad the image first when it is smaller).
        overlap: fraction of the window shared by neighbours, in ``[0, 1)`` (default 0.25); not with
            ``tile_step_size``.
        style: ``"monai"`` or ``"nnunet"`` (see the module docstring).
        tile_step_size: with ``style="nnunet"`` only: nnU-Net's step as a fraction of the window, in ``(0, 1]``,
            used as given (nnU-Net's exact lattice); ``overlap`` must then be left out.

    Returns:
        A tuple of ascending starts; the first is 0 and the last is ``size - window``.
    """
    size, window = int(size), int(window)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if window > size:
        raise ValueError(f"window ({window}) must not exceed the image size ({size}); pad the image first")
    if tile_step_size is not None:
        if style != "nnunet":
            raise ValueError(f"tile_step_size is nnU-Net's step and needs style='nnunet', got style={style!r}")
        if overlap is not None:
            raise ValueError("give overlap or tile_step_size, not both (tile_step_size = 1 - overlap is the same "
                             "step only up to float rounding)")
        return nnunet_starts(size, window, check_tile_step_size(tile_step_size))
    o = _check_overlap(0.25 if overlap is None else overlap)
    if style == "monai":
        if window == size:
            return (0,)
        step = max(int(window * (1 - o)), 1)
        n = -(-(size - window) // step) + 1  # ceil((size - window) / step) + 1
        return tuple(min(i * step, size - window) for i in range(n))
    if style == "nnunet":
        return nnunet_starts(size, window, 1 - o)
    raise ValueError(f"style must be one of {WINDOW_STYLES}, got {style!r}")


def _per_axis(value, nd: int, name: str) -> tuple:
    """A scalar (or None) repeated for every axis, or a sequence of ``nd`` entries."""
    if value is None or isinstance(value, (int, float)):
        return (value,) * nd
    value = tuple(value)
    if len(value) != nd:
        raise ValueError(f"{name} must be a float or {nd} floats, got {value}")
    return value


@dataclass(frozen=True)
class WindowGrid:
    """A separable lattice of windows: ``starts[a]`` are the starts along spatial axis ``a``.

    ``len(grid)`` windows, enumerated in raster order (axis 0 slowest) by :meth:`coords`.
    """

    image_shape: Tuple[int, ...]
    window_shape: Tuple[int, ...]
    starts: Tuple[Tuple[int, ...], ...]

    @property
    def lattice_shape(self) -> Tuple[int, ...]:
        """Number of windows along each axis."""
        return tuple(len(s) for s in self.starts)

    def __len__(self) -> int:
        return math.prod(self.lattice_shape)

    def coords(self, device=None) -> torch.Tensor:
        """Window starts ``[N, nd]`` (int64) in raster order, axis 0 slowest."""
        return lattice_tables(self.starts).coords.to(device=device, copy=True)

    @property
    def is_strict(self) -> bool:
        """Whether the starts increase strictly along every axis (no window twice; nnU-Net's placement repeats
        starts when ``window * (1 - overlap) < 1``)."""
        return all(b > a for axis in self.starts for a, b in zip(axis, axis[1:]))


@dataclass(frozen=True)
class LatticeTables:
    """A lattice's windows in raster order, shared and read-only (from :func:`lattice_tables`)."""

    coords: torch.Tensor  # [N, nd] int64, CPU
    coords3: torch.Tensor  # [N, 3]: with a leading 0 column for 2D (the ops' canonical form)
    rows: list  # the same as a list of int tuples


@functools.lru_cache(maxsize=64)
def lattice_tables(starts: Tuple[Tuple[int, ...], ...]) -> LatticeTables:
    """Every combination of the per-axis ``starts`` in raster order, as a tensor and as Python rows. Cached (a
    sliding-window run asks for the same lattice for every image and call): the results must not be modified."""
    rows = list(itertools.product(*starts))
    with torch.inference_mode(False):  # ordinary tensors even when first asked for under inference mode
        coords = torch.tensor(rows, dtype=torch.int64).reshape(-1, len(starts))
        coords3 = torch.nn.functional.pad(coords, (3 - len(starts), 0)) if len(starts) < 3 else coords
    return LatticeTables(coords, coords3, rows)


def sliding_windows(
    image_shape: Sequence[int],
    window_shape: Union[Sequence[int], int],
    overlap: Union[Sequence[float], float, None] = None,
    style: str = "monai",
    *,
    tile_step_size: Union[Sequence[float], float, None] = None,
) -> WindowGrid:
    """Place sliding windows over an image.

    Args:
        image_shape: spatial size ``(D, H, W)`` or ``(H, W)``.
        window_shape: window size per axis (an int is used for every axis); each ``<= image_shape``.
        overlap: scalar or per-axis overlap in ``[0, 1)`` (default 0.25); not with ``tile_step_size``.
        style: ``"monai"`` (MONAI's ``dense_patch_slices`` placement) or ``"nnunet"``
            (nnU-Net v2's ``compute_steps_for_sliding_window``).
        tile_step_size: ``style="nnunet"`` only, scalar or per axis in ``(0, 1]``: nnU-Net's own step, used as
            given, so the lattice is nnU-Net's exactly (``1 - overlap`` can round differently).

    Returns:
        A :class:`WindowGrid`; ``grid.coords()`` is ``[N, nd]``.

    Example:
        >>> sliding_windows((192, 224, 192), 80, 0.5).starts
        ((0, 40, 80, 112), (0, 40, 80, 120, 144), (0, 40, 80, 112))
        >>> sliding_windows((192,), 80, style="nnunet", tile_step_size=0.5).starts
        ((0, 37, 75, 112),)
    """
    image_shape = as_sizes("image_shape", image_shape)
    nd = len(image_shape)
    if nd < 1:
        raise ValueError("image_shape must have at least one axis")
    if isinstance(window_shape, int):
        window_shape = (window_shape,) * nd
    window_shape = as_sizes("window_shape", window_shape)
    if len(window_shape) != nd:
        raise ValueError(f"window_shape must have {nd} entries to match image_shape {image_shape}, got {window_shape}")
    if style not in WINDOW_STYLES:
        raise ValueError(f"style must be one of {WINDOW_STYLES}, got {style!r}")
    overlap = _per_axis(overlap, nd, "overlap")
    steps = _per_axis(tile_step_size, nd, "tile_step_size")
    starts = tuple(window_starts(s, w, o, style, tile_step_size=t)
                   for s, w, o, t in zip(image_shape, window_shape, overlap, steps))
    return WindowGrid(image_shape, window_shape, starts)
