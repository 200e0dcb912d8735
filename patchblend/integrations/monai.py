"""MONAI integration: :class:`CalibratedSlidingWindowInferer`, a drop-in for ``monai.inferers.SlidingWindowInferer``.

Importable only where MONAI is installed (this module imports it). Switching a MONAI pipeline is one line::

    from patchblend.integrations.monai import CalibratedSlidingWindowInferer as SlidingWindowInferer
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
from monai.inferers import Inferer

from ..inference.importance import importance_map
from ..inference.sliding_window import sliding_window_inference

__all__ = ["CalibratedSlidingWindowInferer"]


class CalibratedSlidingWindowInferer(Inferer):
    """MONAI ``Inferer`` running :func:`patchblend.sliding_window_inference`.

    The first arguments are those of ``monai.inferers.SlidingWindowInferer`` (same order and defaults:
    ``roi_size, sw_batch_size=1, overlap=0.25, mode="constant", sigma_scale=0.125, padding_mode="constant",
    cval=0.0, sw_device=None, device=None, progress=False, cache_roi_weight_map=False, cpu_thresh=None,
    buffer_steps=None, buffer_dim=-1, with_coord=False``); ``cpu_thresh`` stitches on the CPU when the input
    has more voxels than it, as in MONAI. The keyword-only arguments are patchblend's:
    ``weighting`` (``None``, ``"patch"``, ``"grid"``, ``"patch*grid"``), ``normalize``, ``placement``,
    ``slab_axis``, ``reduce``, ``threshold``, ``label_dtype`` (see :func:`patchblend.sliding_window_inference`).

    Calling it as ``inferer(inputs [B, C, *S], network, *args, **kwargs)`` returns ``[B, C_out, *S]``; extra
    ``args`` / ``kwargs`` go to ``network`` (``device``, ``buffer_steps`` and ``buffer_dim`` in kwargs override
    the constructor's, as in MONAI).
    """

    def __init__(
        self,
        roi_size: Union[Sequence[int], int],
        sw_batch_size: int = 1,
        overlap: Union[Sequence[float], float] = 0.25,
        mode: str = "constant",
        sigma_scale: Union[Sequence[float], float] = 0.125,
        padding_mode: str = "constant",
        cval: float = 0.0,
        sw_device: Union[torch.device, str, None] = None,
        device: Union[torch.device, str, None] = None,
        progress: bool = False,
        cache_roi_weight_map: bool = False,
        cpu_thresh: Optional[int] = None,
        buffer_steps: Optional[int] = None,
        buffer_dim: int = -1,
        with_coord: bool = False,
        *,
        weighting: Optional[str] = None,
        normalize: Optional[str] = None,
        placement: str = "monai",
        slab_axis: Optional[int] = None,
        reduce: Optional[str] = None,
        threshold: float = 0.5,
        label_dtype: torch.dtype = torch.int64,
    ) -> None:
        super().__init__()
        self.roi_size = roi_size
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap
        self.mode = getattr(mode, "value", mode)
        self.sigma_scale = sigma_scale
        self.padding_mode = getattr(padding_mode, "value", padding_mode)
        self.cval = cval
        self.sw_device = sw_device
        self.device = device
        self.progress = progress
        self.cpu_thresh = cpu_thresh
        self.buffer_steps = buffer_steps
        self.buffer_dim = buffer_dim
        self.with_coord = with_coord
        self.options = dict(weighting=weighting, normalize=normalize, placement=placement, slab_axis=slab_axis,
                            reduce=reduce, threshold=threshold, label_dtype=label_dtype)
        self.roi_weight_map = None
        static_roi = isinstance(roi_size, Sequence) and all(isinstance(r, int) and r > 0 for r in roi_size)
        if cache_roi_weight_map and static_roi and self.mode != "constant":
            self.roi_weight_map = importance_map(tuple(roi_size), self.mode, sigma_scale)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any):
        """Run sliding-window inference of ``network`` over ``inputs`` (see the class docstring)."""
        condition = kwargs.get("condition")
        if condition is not None and condition.shape != inputs.shape:
            raise ValueError(f"condition must match the shape of inputs {tuple(inputs.shape)}, "
                             f"got {tuple(condition.shape)}")
        device = kwargs.pop("device", self.device)
        kwargs.pop("buffer_steps", None)
        kwargs.pop("buffer_dim", None)
        if device is None and self.cpu_thresh is not None and inputs.shape[2:].numel() > self.cpu_thresh:
            device = "cpu"  # stitch in CPU memory when the image is large (MONAI's cpu_thresh)

        predictor = network
        if args:
            def predictor(windows, *coords, **kw):  # noqa: E306 - MONAI passes *args after the window coords
                return network(windows, *coords, *args, **kw)

        return sliding_window_inference(
            inputs, self.roi_size, self.sw_batch_size, predictor, self.overlap, self.mode, self.sigma_scale,
            self.padding_mode, self.cval, self.sw_device, device, self.progress,
            roi_weight_map=self.roi_weight_map, with_coord=self.with_coord, **self.options, **kwargs,
        )
