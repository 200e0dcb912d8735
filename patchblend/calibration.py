"""Post-hoc calibration: fit the CIB heads on held-out cases with the network frozen.

The paper trains the heads jointly with the network (two stages). Like temperature scaling, the heads
can instead be fitted *after* training, on held-out cases the network has not seen: on its own
training cases a network fails less often than on new ones, so heads fitted there learn too rosy a
picture. The network does not change: it runs once, in eval mode and without autograd, over the
held-out windows; the heads' fixed parts (``head.summarize``) are cached; then only the heads'
learned parts (``head.predict``) are fitted to the true Dice of each window and cell
(:func:`patchblend.targets.dice_targets`) with the calibration loss.

Recipe::

    model.eval()                                   # a trained CalibratedModel (or any model with
    data = collect_calibration_data(model, batches)  # calibration_inputs / patch_head / grid_head)
    report = fit_heads(model.patch_head, model.grid_head, data)
    # or both in one call: calibrate_heads(model, batches)

``batches`` yields ``(inputs, label)`` pairs of windows cut from held-out cases the way inference
cuts them (same window size; all positions, not lesion-centred crops). A model works here when it has
``calibration_inputs(*inputs) -> (probabilities [B, K, *P], patch summary, grid summary)`` and
``patch_head`` / ``grid_head`` with ``predict`` (:class:`patchblend.CalibratedModel` has them).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, NamedTuple, Optional

import torch
from torch import nn

from .losses import calibration_loss
from .targets import GridArg, check_real, dice_targets
from .wrapper import frozen_eval

__all__ = ["CalibrationData", "collect_calibration_data", "fit_heads", "calibrate_heads"]


class CalibrationData(NamedTuple):
    """Cached head inputs and their targets, one row per window (``N`` windows)."""

    patch_summary: torch.Tensor  #: ``[N, ...]`` the patch head's fixed part (``patch_head.summarize``)
    patch_target: torch.Tensor  #: ``[N]`` true Dice of each window
    grid_summary: torch.Tensor  #: ``[N, ...]`` the grid head's fixed part
    grid_target: torch.Tensor  #: ``[N, *grid]`` true Dice of each cell

    def __len__(self) -> int:  # number of windows (not the tuple's length)
        return int(self.patch_target.shape[0])

    @staticmethod
    def concatenate(parts: List["CalibrationData"]) -> "CalibrationData":
        """One :class:`CalibrationData` of several (e.g. collected case by case)."""
        if not parts:
            raise ValueError("parts is empty: nothing to concatenate")
        return CalibrationData(*(torch.cat([tuple.__getitem__(p, i) for p in parts]) for i in range(4)))


def collect_calibration_data(model: nn.Module, batches: Iterable, *, grid: Optional[GridArg] = None,
                             threshold: float = 0.5, device=None, progress: bool = False) -> CalibrationData:
    """Run the frozen ``model`` over held-out windows once and cache what the heads need.

    Args:
        model: has ``calibration_inputs(*inputs) -> (prob [B, K, *P], patch_summary, grid_summary)``
            (e.g. :class:`patchblend.CalibratedModel`). It runs in eval mode without autograd; every
            module's training flag is restored afterwards.
        batches: iterable of ``(inputs, label)``: ``inputs`` a tensor ``[B, C, *P]`` (or a tuple of the
            model's positional arguments), ``label`` the masks or label map for
            :func:`patchblend.targets.dice_targets` (``[B, 1, *P]`` or ``[B, K, *P]``).
        grid: cells per axis of the targets (default: the grid head's ``grid``).
        threshold: the prediction is foreground where ``p > threshold`` (as in training).
        device: where the summaries are kept (default: where the model produced them).

    Returns a :class:`CalibrationData` (summaries and targets on ``device``, float32).
    """
    if not hasattr(model, "calibration_inputs"):
        raise TypeError(f"model must have calibration_inputs(*inputs) (e.g. patchblend.CalibratedModel), "
                        f"{type(model).__name__} has not")
    if grid is None:
        grid = getattr(getattr(model, "grid_head", None), "grid", None)
        if grid is None:
            raise ValueError("grid is needed: the model has no grid_head.grid")
    parts: List[CalibrationData] = []
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="calibration windows", leave=False)
    with frozen_eval(model):
        for item in it:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise TypeError("batches must yield (inputs, label) pairs")
            inputs, label = item
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            prob, patch_summary, grid_summary = model.calibration_inputs(*args)
            t_patch, t_grid = dice_targets(prob.float(), label.to(prob.device), grid=grid, threshold=threshold)
            parts.append(CalibrationData(*(t.float().to(device or t.device)
                                           for t in (patch_summary, t_patch, grid_summary, t_grid))))
    if not parts:
        raise ValueError("batches is empty: no calibration windows")
    return CalibrationData.concatenate(parts)


def _check_head_reads(name: str, head: nn.Module, summary: torch.Tensor, target: torch.Tensor) -> None:
    """``head.predict`` on the first cached rows must run and give one score per target (``[n]`` for the patch
    head, ``[n, *G]`` for the grid head); else a ``ValueError`` naming the argument ``name`` (e.g. the two heads
    passed the other way round, or a head of another model)."""
    rows = summary[:2]
    try:
        with torch.no_grad():
            out = head.predict(rows)
    except (RuntimeError, ValueError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{name} ({type(head).__name__}) cannot read the cached {name[:-5]} summaries "
                         f"[N, {', '.join(map(str, summary.shape[1:]))}] ({first}); are the heads swapped? "
                         "fit_heads(patch_head, grid_head, data)") from None
    if tuple(out.shape) != (len(rows), *target.shape[1:]):
        raise ValueError(f"{name} ({type(head).__name__}) gives scores {tuple(out.shape[1:])} per window where the "
                         f"{name[:-5]} targets are {tuple(target.shape[1:])}; are the heads swapped? "
                         "fit_heads(patch_head, grid_head, data)")


def fit_heads(patch_head: Optional[nn.Module], grid_head: Optional[nn.Module], data: CalibrationData, *,
              epochs: int = 300, lr: float = 1e-2, weight_decay: float = 1e-4, batch_size: int = 256,
              grid_reduction: str = "mean", seed: int = 0, progress: bool = False) -> Dict[str, Any]:
    """Fit the heads' learned parts (``head.predict``) to the cached targets (MSE, Adam).

    Each head is fitted on its own (``None`` skips one); ``epochs`` passes over the ``N`` windows in
    shuffled mini-batches of ``batch_size``. The heads are left in eval mode. The loss is
    :func:`patchblend.calibration_loss` (patch: MSE per window; grid: MSE per cell, averaged over the
    cells with the default ``grid_reduction="mean"``).

    Returns ``{"patch_mse": [...], "grid_mse": [...]}``: the loss after each epoch (on all windows).
    """
    if not isinstance(data, CalibrationData):
        raise TypeError(f"data must be a CalibrationData (collect_calibration_data), got {type(data).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    lr = check_real("lr", lr, low=0.0)
    weight_decay = check_real("weight_decay", weight_decay, low=0.0)
    n = len(data)
    if n == 0:
        raise ValueError("data holds no windows")
    history: Dict[str, List[float]] = {"patch_mse": [], "grid_mse": []}
    generator = torch.Generator().manual_seed(int(seed))
    for key, head, summary, target in (("patch_mse", patch_head, data.patch_summary, data.patch_target),
                                       ("grid_mse", grid_head, data.grid_summary, data.grid_target)):
        if head is None:
            continue
        if not hasattr(head, "predict"):
            raise TypeError(f"{type(head).__name__} has no predict(summary); use a patchblend head")
        param = next(head.parameters())
        summary, target = summary.to(param.device, param.dtype), target.to(param.device, param.dtype)
        _check_head_reads(key[:-4] + "_head", head, summary, target)
        opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
        is_patch = key == "patch_mse"

        def loss_of(s, t):
            pred = head.predict(s)
            if is_patch:
                return calibration_loss(pred, t, lambda_patch=1.0)
            return calibration_loss(pred.new_zeros(pred.shape[0]), pred.new_zeros(pred.shape[0]), pred, t,
                                    lambda_patch=0.0, lambda_grid=1.0, grid_reduction=grid_reduction)

        head.train()
        steps = range(epochs)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"fit {key[:-4]} head", leave=False)
        for _ in steps:
            order = torch.randperm(n, generator=generator).to(param.device)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                loss = loss_of(summary[idx], target[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                history[key].append(float(loss_of(summary, target)))
        head.eval()
    return history


def calibrate_heads(model: nn.Module, batches: Iterable, *, grid: Optional[GridArg] = None, threshold: float = 0.5,
                    progress: bool = False, **fit_options) -> Dict[str, Any]:
    """:func:`collect_calibration_data` then :func:`fit_heads` on ``model.patch_head`` and
    ``model.grid_head``: post-hoc calibration in one call. ``fit_options`` go to :func:`fit_heads`.
    Returns its history plus ``"windows"`` (how many windows were used)."""
    data = collect_calibration_data(model, batches, grid=grid, threshold=threshold, progress=progress)
    history = fit_heads(model.patch_head, model.grid_head, data, progress=progress, **fit_options)
    return {**history, "windows": len(data)}
