"""Bolt CIB heads onto an existing 3D segmentation network without editing it.

:class:`CalibratedModel` wraps a backbone (any ``nn.Module`` whose features are 5D tensors; MONAI
``UNet``, ``BasicUNet`` and a home-grown module are tested), catches two intermediate features with
forward hooks, and feeds them to a :class:`~patchblend.heads.PatchHead` and a
:class:`~patchblend.heads.GridHead`. Its output is a
:class:`CalibratedOutput` named tuple ``(seg, patch, grid)``, which the sliding-window driver accepts
as it is. :func:`candidate_feature_modules` lists the module names that can serve as features.

``heads="aware"`` builds the prediction-aware pair instead (:class:`~patchblend.heads.AwarePatchHead`,
:class:`~patchblend.heads.AwareGridHead`): both read the decoder feature and the backbone's own output
turned into a foreground probability, so the bottleneck is not needed.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from .heads import HEAD_KINDS, AwareGridHead, AwarePatchHead, GridHead, PatchHead
from .targets import GridArg

__all__ = ["CalibratedModel", "CalibratedOutput", "candidate_feature_modules", "default_probability",
           "foreground_probability"]


def default_probability(seg: torch.Tensor) -> torch.Tensor:
    """Probabilities of a logit tensor ``[B, K, *P]``: softmax over ``K`` when ``K > 1``, sigmoid when ``K == 1``."""
    if not isinstance(seg, torch.Tensor) or seg.dim() < 3:
        raise TypeError(
            "the backbone's output must be a logit tensor [B, K, *P] to derive probabilities from it, got "
            + (f"shape {tuple(seg.shape)}" if isinstance(seg, torch.Tensor) else type(seg).__name__)
            + "; pass probability=<callable returning [B, K, *P] probabilities>"
        )
    seg = seg.float() if seg.dtype in (torch.float16, torch.bfloat16) else seg
    return torch.softmax(seg, dim=1) if seg.shape[1] > 1 else torch.sigmoid(seg)


def foreground_probability(prob: torch.Tensor) -> torch.Tensor:
    """``[B, 1, *P]`` foreground probability of ``[B, K, *P]`` probabilities: the channel itself for
    ``K == 1``, ``1 - p[:, 0]`` (any foreground class; channel 0 is the background) for ``K > 1``."""
    return prob if prob.shape[1] == 1 else 1.0 - prob[:, :1]


class CalibratedOutput(NamedTuple):
    """What :class:`CalibratedModel` returns; unpacks as ``seg, patch, grid = model(x)``."""

    seg: Any  #: the backbone's own output, untouched (usually ``[B, K, *P]`` logits)
    patch: torch.Tensor  #: ``[B]`` predicted patch Dice, in (0, 1)
    grid: torch.Tensor  #: ``[B, *grid]`` predicted grid-cell Dice, in (0, 1)


def _as_args(example_input: Any) -> tuple:
    """A tuple is the backbone's positional arguments; anything else is its one argument."""
    return example_input if isinstance(example_input, tuple) else (example_input,)


@contextmanager
def frozen_eval(model: nn.Module):
    """Eval mode and no autograd (a dry run, or post-hoc calibration: BatchNorm statistics untouched), every
    module's ``training`` flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def candidate_feature_modules(model: nn.Module, example_input: Any) -> List[Tuple[str, Tuple[int, ...]]]:
    """Names of ``model``'s submodules whose output is a 5D tensor, with that output's shape.

    Runs ``model(example_input)`` once (eval mode, no autograd; training flags restored) and returns
    ``[(name, (B, C, D, H, W)), ...]`` in the order the modules first ran (a module that runs several
    times is listed once, with its first shape). Pick the bottleneck (deepest encoder feature: fewest
    voxels, most channels) and a late decoder feature from this list. ``example_input`` is passed to
    ``model`` as the only argument (a tuple is passed as several arguments).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found: Dict[str, Tuple[int, ...]] = {}

    def record(name, module, inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 5 and name not in found:
            found[name] = tuple(output.shape)

    handles = [m.register_forward_hook(partial(record, name)) for name, m in model.named_modules() if name]
    try:
        with frozen_eval(model):
            model(*_as_args(example_input))
    finally:
        for h in handles:
            h.remove()
    return list(found.items())


class CalibratedModel(nn.Module):
    """A backbone plus the two CIB heads, fed by forward hooks on two named submodules.

    ``model(x)`` runs the backbone as usual and returns ``CalibratedOutput(seg, patch, grid)``:
    ``seg`` is the backbone's output, ``patch [B]`` the patch head's score of the ``bottleneck``
    feature, ``grid [B, *grid]`` the grid head's scores of the ``decoder`` feature.

    Args:
        backbone: the segmentation network (not modified, except for the two hooks).
        bottleneck: dotted name (as in ``backbone.named_modules()``) of the module whose output is the
            deepest encoder feature ``[B, C_b, d, h, w]``.
        decoder: name of the module whose output is the decoder feature ``[B, C_d, D', H', W']`` the
            grid head reads (each spatial size ``>= grid``). Its cells cover exactly the patch's cells
            when, on every axis, the patch size is a multiple of ``g`` times the downsampling factor
            (patch size / feature size).
        example_input: a tensor the backbone accepts (e.g. ``torch.zeros(1, C_in, 32, 32, 32)``). The
            constructor runs it through once (eval mode, no autograd, training flags restored) to read
            the two features' channel counts and check them. A tuple is passed as several positional
            arguments. Give this **or** ``channels``.
        channels: ``(C_b, C_d)`` to build the heads without a dry run; the features are then checked
            on the first forward.
        grid: grid cells per axis for the grid head (default ``(2, 2, 2)``, the paper's).
        hidden_channels: the paper grid head's convolution width (default ``C_d``), or, for
            ``heads="aware"``, the MLPs' hidden width (default 16).
        heads: ``"paper"`` (default: :class:`~patchblend.heads.PatchHead` on the bottleneck,
            :class:`~patchblend.heads.GridHead` on the decoder feature) or ``"aware"``
            (:class:`~patchblend.heads.AwarePatchHead` and :class:`~patchblend.heads.AwareGridHead`, both
            on the decoder feature and the backbone's output; ``bottleneck`` may then be ``None``).
        probability: turns the backbone's output into probabilities ``[B, K, *P]`` (default
            :func:`default_probability`: softmax for ``K > 1``, sigmoid for ``K == 1``). The aware heads
            read its foreground (:func:`foreground_probability`); post-hoc calibration
            (:func:`patchblend.calibration.calibrate_heads`) scores it against the labels.

    The heads exist from construction on, so an optimizer built right after sees their parameters
    (lazy creation on the first forward would silently leave them out). They are placed on the device
    and dtype of the backbone's first parameter; ``.to()`` on the wrapper moves everything.

    The hooks are in place only while the wrapper's own forward runs: calling ``backbone`` directly
    is unaffected. If a named module runs more than once per forward, its last output is used. A
    named module that does not exist, whose output is not a 5D tensor, or that does not run raises an
    error naming it.
    """

    def __init__(
        self,
        backbone: nn.Module,
        bottleneck: str,
        decoder: str,
        *,
        example_input: Any = None,
        channels: Optional[Sequence[int]] = None,
        grid: GridArg = (2, 2, 2),
        hidden_channels: Optional[int] = None,
        heads: str = "paper",
        probability: Optional[Callable[[Any], torch.Tensor]] = None,
    ):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")
        if heads not in HEAD_KINDS:
            raise ValueError(f"heads must be one of {HEAD_KINDS}, got {heads!r}")
        if probability is not None and not callable(probability):
            raise TypeError(f"probability must be callable, got {type(probability).__name__}")
        self.head_kind = heads
        self.probability = default_probability if probability is None else probability
        modules = dict(backbone.named_modules())
        named = (("decoder", decoder),) if heads == "aware" and bottleneck is None else \
            (("bottleneck", bottleneck), ("decoder", decoder))
        for arg, name in named:
            if not isinstance(name, str):
                raise TypeError(f"{arg} must be a module name (str), got {type(name).__name__}")
            if name not in modules or name == "":
                close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ValueError(
                    f"{arg}={name!r}: {type(backbone).__name__} has no submodule of that name.{hint} "
                    f"candidate_feature_modules(backbone, example_input) lists the modules with 5D outputs."
                )
        if (example_input is None) == (channels is None):
            raise TypeError(
                "CalibratedModel needs exactly one of example_input (a tensor the backbone accepts; one "
                "dry run reads the features' channel counts) or channels=(bottleneck_channels, decoder_channels)"
            )

        self.backbone = backbone
        self.feature_names = dict((key, name) for key, name in named)

        seg = None
        if channels is not None:
            if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or len(channels) != 2:
                raise TypeError(f"channels must be a pair (bottleneck_channels, decoder_channels), got {channels!r}")
            c_bottleneck, c_decoder = channels
            features = None
        else:
            with frozen_eval(backbone):
                seg, features = self._run_backbone(_as_args(example_input), {})
            c_bottleneck = features["bottleneck"].shape[1] if "bottleneck" in features else None
            c_decoder = features["decoder"].shape[1]

        if heads == "paper":
            self.patch_head = PatchHead(c_bottleneck)
            self.grid_head = GridHead(c_decoder, grid=grid, hidden_channels=hidden_channels)
        else:
            hidden = 16 if hidden_channels is None else hidden_channels
            self.patch_head = AwarePatchHead(c_decoder, hidden=hidden)
            self.grid_head = AwareGridHead(c_decoder, grid=grid, hidden=hidden)
        reference = next(backbone.parameters(), None)
        if reference is not None:
            self.patch_head.to(device=reference.device, dtype=reference.dtype)
            self.grid_head.to(device=reference.device, dtype=reference.dtype)
        if features is not None:  # check the heads fit the features now, not at the first training step
            with torch.no_grad():
                dtype = next(self.grid_head.parameters()).dtype
                self._head_scores(seg, {k: v.to(dtype) for k, v in features.items()})

    def _capture(self, features: Dict[str, torch.Tensor], key: str, module: nn.Module, inputs, output) -> None:
        name = self.feature_names[key]
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"{key}={name!r}: the output of {type(module).__name__} {name!r} is a {type(output).__name__}, "
                f"not a 5D tensor [B, C, D, H, W]; pick another module (candidate_feature_modules lists them)"
            )
        if output.dim() != 5:
            raise ValueError(
                f"{key}={name!r}: the output of {type(module).__name__} {name!r} has shape {tuple(output.shape)}, "
                f"not 5D [B, C, D, H, W]; pick another module (candidate_feature_modules lists them)"
            )
        features[key] = output

    def _run_backbone(self, args: tuple, kwargs: dict):
        """Run the backbone with the two hooks in place; return ``(seg, {"bottleneck": f_b, "decoder": f_d})``.

        The hooks live only for this call, so the backbone called on its own keeps nothing, and a copy
        of the wrapper (``copy.deepcopy``, ``nn.DataParallel`` replicas) hooks its own modules."""
        features: Dict[str, torch.Tensor] = {}
        handles = [
            self.backbone.get_submodule(name).register_forward_hook(partial(self._capture, features, key))
            for key, name in self.feature_names.items()
        ]
        try:
            seg = self.backbone(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        for key, name in self.feature_names.items():
            if key not in features:
                raise RuntimeError(f"{key}={name!r}: that module did not run during the backbone's forward")
        return seg, features

    def _summaries(self, seg, features: Dict[str, torch.Tensor]):
        """``(probabilities [B, K, *P] or None, patch summary, grid summary)``: the heads' fixed parts."""
        if self.head_kind == "paper":
            return None, self.patch_head.summarize(features["bottleneck"]), self.grid_head.summarize(features["decoder"])
        prob = self.probability(seg)
        if not isinstance(prob, torch.Tensor) or prob.dim() != 5:
            raise ValueError(
                "probability(seg) must return probabilities [B, K, D, H, W], got "
                + (f"shape {tuple(prob.shape)}" if isinstance(prob, torch.Tensor) else type(prob).__name__)
            )
        fg = foreground_probability(prob)
        return prob, self.patch_head.summarize(fg, features["decoder"]), self.grid_head.summarize(fg, features["decoder"])

    def _head_scores(self, seg, features):
        _, patch_summary, grid_summary = self._summaries(seg, features)
        return self.patch_head.predict(patch_summary), self.grid_head.predict(grid_summary)

    def calibration_inputs(self, *args, **kwargs):
        """``(probabilities [B, K, *P], patch summary, grid summary)`` of one forward: what
        :func:`patchblend.calibration.collect_calibration_data` caches to fit the heads' learned parts
        (``head.predict``) with the backbone frozen."""
        seg, features = self._run_backbone(args, kwargs)
        prob, patch_summary, grid_summary = self._summaries(seg, features)
        return (self.probability(seg) if prob is None else prob), patch_summary, grid_summary

    def forward(self, *args, **kwargs) -> CalibratedOutput:
        """``model(x)`` → ``CalibratedOutput(seg, patch [B], grid [B, *grid])``; arguments go to the backbone."""
        seg, features = self._run_backbone(args, kwargs)
        return CalibratedOutput(seg, *self._head_scores(seg, features))
