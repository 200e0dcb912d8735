"""MONAI integration: :class:`CalibratedSlidingWindowInferer`, a subclass of ``monai.inferers.SlidingWindowInferer``
that runs :func:`patchblend.sliding_window_inference`, and :class:`CalibratedSlidingWindowInfererAdapt` (MONAI's
``SlidingWindowInfererAdapt`` behaviour: stitch on the GPU, fall back to buffered / CPU stitching on out-of-memory).

Importable only where MONAI is installed (this module imports it; ``import patchblend`` does not). Switching a
MONAI pipeline is one line::

    from patchblend.integrations.monai import CalibratedSlidingWindowInferer as SlidingWindowInferer
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
from monai.inferers import SlidingWindowInferer, SlidingWindowInfererAdapt

from ..inference.importance import importance_map
from ..inference.options import (KEYWORD_OPTIONS, OPTION_FIELDS, SlidingWindowOptions, split_option_keywords,
                                 with_option_keywords)
from ..inference.sliding_window import run_sliding_window

__all__ = ["CalibratedSlidingWindowInferer", "CalibratedSlidingWindowInfererAdapt"]

#: the options MONAI's inferer keeps as attributes, read at every call as MONAI's ``__call__`` reads them
_MONAI_ATTRIBUTES = ("roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale", "padding_mode", "cval",
                     "sw_device", "device", "progress", "roi_weight_map", "buffer_steps", "buffer_dim", "with_coord")
_MONAI_INIT = inspect.signature(SlidingWindowInferer.__init__)
#: what a call's keyword arguments may override (MONAI's three, and patchblend's options); the rest go to the network
_CALL_OPTIONS = ("device", "buffer_steps", "buffer_dim") + KEYWORD_OPTIONS


class CalibratedSlidingWindowInferer(SlidingWindowInferer):
    """MONAI ``SlidingWindowInferer`` running :func:`patchblend.sliding_window_inference` (``isinstance`` checks
    for MONAI's class hold).

    The positional arguments are those of ``monai.inferers.SlidingWindowInferer``, bound by MONAI's own signature
    (same order and defaults: ``roi_size, sw_batch_size=1, overlap=0.25, mode="constant", sigma_scale=0.125,
    padding_mode="constant", cval=0.0, sw_device=None, device=None, progress=False, cache_roi_weight_map=False,
    cpu_thresh=None, buffer_steps=None, buffer_dim=-1, with_coord=False``); ``cpu_thresh`` stitches on the CPU when the input
    has more voxels than it, as in MONAI. The keyword-only arguments are patchblend's options, the keyword-only
    fields of :class:`~patchblend.inference.options.SlidingWindowOptions` (``weighting``, ``normalize``,
    ``placement``, ``tile_step_size``, ``slab_axis``, ``reduce``, ``threshold``, ``label_dtype``, ``confidence``,
    ``weigh_prediction``), checked here; ``mode`` may also be ``"nnunet"``. :attr:`options` holds them; MONAI's
    attributes (``self.overlap``, ...) are read at every call, as in MONAI.

    Calling it as ``inferer(inputs [B, C, *S], network, *args, **kwargs)`` returns what the function returns
    (a tensor, tuple or dict, as ``network``'s output; with ``confidence=True`` a
    :class:`~patchblend.PredictionWithConfidence` of that and the confidence map ``[B, 1, *S]``); extra ``args`` /
    ``kwargs`` go to ``network`` (``device``, ``buffer_steps`` and ``buffer_dim`` in kwargs override the
    constructor's, as in MONAI; so do patchblend's options).
    """

    @with_option_keywords(names=KEYWORD_OPTIONS, like=SlidingWindowInferer.__init__)
    def __init__(self, roi_size: Union[Sequence[int], int], *args: Any, **kwargs: Any) -> None:
        options, kwargs = split_option_keywords(kwargs, KEYWORD_OPTIONS)
        monai_args = _MONAI_INIT.bind(self, roi_size, *args, **kwargs)  # MONAI's own signature, MONAI's defaults
        monai_args.apply_defaults()
        given = dict(monai_args.arguments)
        del given["self"]
        mode = getattr(given["mode"], "value", given["mode"])
        #: the call's options, checked once (MONAI's fields are refreshed from the attributes at every call)
        self.options = SlidingWindowOptions(**{k: v for k, v in given.items() if k in OPTION_FIELDS}, **options)
        # MONAI's constructor stores the arguments (its BlendMode knows no "nnunet": stored after it); the cached
        # weight map is ours (the same values as MONAI's Gaussian, and nnU-Net's too)
        super().__init__(**dict(given, mode="constant", cache_roi_weight_map=False))
        self.mode = mode
        self.padding_mode = self.options.padding_mode
        static_roi = isinstance(roi_size, Sequence) and all(isinstance(r, int) and r > 0 for r in roi_size)
        if given["cache_roi_weight_map"] and static_roi and self.mode != "constant":
            self.roi_weight_map = importance_map(tuple(roi_size), self.mode, given["sigma_scale"])

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any):
        """Run sliding-window inference of ``network`` over ``inputs`` (see the class docstring)."""
        condition = kwargs.get("condition")
        if condition is not None and condition.shape != inputs.shape:
            raise ValueError(f"condition must match the shape of inputs {tuple(inputs.shape)}, "
                             f"got {tuple(condition.shape)}")
        given, kwargs = split_option_keywords(kwargs, _CALL_OPTIONS)
        options = dataclasses.replace(self.options, **{**{n: getattr(self, n) for n in _MONAI_ATTRIBUTES}, **given})
        if options.device is None and self.cpu_thresh is not None and inputs.shape[2:].numel() > self.cpu_thresh:
            options = dataclasses.replace(options, device="cpu")  # stitch in CPU memory when the image is large
        return run_sliding_window(inputs, network, options, *args, **kwargs)


class CalibratedSlidingWindowInfererAdapt(SlidingWindowInfererAdapt, CalibratedSlidingWindowInferer):
    """MONAI's ``SlidingWindowInfererAdapt`` on patchblend's driver: without ``device``, stitch on the input's GPU,
    and on out-of-memory retry with buffered stitching into CPU memory, then on the CPU (MONAI's logic, inherited
    unchanged; each try runs :class:`CalibratedSlidingWindowInferer`'s call). Same arguments."""
