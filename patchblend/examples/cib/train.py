"""Training of the CIB V-Net (``python -m patchblend.examples.cib train ...``).

Loss (paper Eq. 6): a soft Dice loss on the task output plus the calibration losses of the library,
``calibration_loss(patch, patch_target, grid, grid_target, lambda_patch, lambda_grid)``, where the
targets are :func:`patchblend.targets.dice_targets` of the thresholded task prediction. The *task
output* is the new-lesion output for two-time-point samples and the lesion-at-follow-up output for
single-time-point samples (whose Dice loss also covers the lesion-at-baseline output, t1 = t2).

With ``aware_heads`` (default on) the prediction-aware heads are trained jointly with the same
calibration loss on the task probability; their inputs are detached, so they do not change the network
(the backbone is the same with or without them).

Schedule: ``stage1_iters`` iterations with ``lambda_patch`` only (the grid head is not trained), then
``stage2_iters`` with both. Adam; mixed precision on CUDA (``--amp``, default on); checkpoints every
``ckpt_every`` iterations and at the end (``OUT/last.pt``; with ``--keep-snapshots`` also the weights
as ``OUT/iter_NNNNNN.pt``); ``--resume`` continues from ``OUT/last.pt``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from patchblend.losses import calibration_loss, soft_dice_loss
from patchblend.targets import dice_targets

from .data import Case, InputError, MixedBatchSampler, check_device, check_spacing, load_cases
from .model import OUTPUT_NEW, OUTPUT_T1, OUTPUT_T2, CIBVNet

__all__ = ["TrainConfig", "train", "compute_losses", "build_model", "load_checkpoint", "read_checkpoint",
           "config_of", "learning_rate", "add_config_arguments", "config_from_args", "check_out_folder", "check_config"]


@dataclass
class TrainConfig:
    """Every training setting (each one is a command-line option: ``stage1_iters`` → ``--stage1-iters``)."""

    data: str = ""  #: folder of case folders (two- and single-time-point cases may be mixed)
    single_data: str = ""  #: optional second folder of single-time-point cases
    out: str = "cib_run"  #: checkpoint folder
    width: int = 16  #: first-stage channels (16 = paper)
    patch: int = 80  #: cubic training patch size (multiple of 16)
    grid: int = 2  #: grid cells per axis
    batch_two: int = 4  #: two-time-point samples per batch
    batch_single: int = 4  #: single-time-point samples per batch
    lesion_prob: float = 0.7  #: probability that a crop is centred on a lesion voxel
    stage1_iters: int = 10000  #: patch head only (lambda_grid = 0)
    stage2_iters: int = 10000  #: both heads
    lr: float = 1e-2  #: Adam learning rate (paper: 1e-2)
    weight_decay: float = 0.0
    lr_decay: bool = True  #: polynomial (power 0.9) decay to 0 over both stages
    lambda_patch: float = 1.0
    lambda_grid: float = 1.0  #: used in stage 2
    spacing: Optional[float] = None  #: resample cases to this voxel size (mm)
    device: str = "cpu"
    amp: bool = True  #: mixed precision (CUDA only)
    threads: int = 0  #: torch CPU threads (0 = torch's default)
    seed: int = 0
    ckpt_every: int = 500
    keep_snapshots: bool = False  #: also keep ``OUT/iter_NNNNNN.pt`` at every checkpoint (model weights only)
    resume: bool = False
    progress: bool = True
    aware_heads: bool = True  #: also train the prediction-aware heads (detached: the network is unchanged)

#: Settings a checkpoint must share with the configuration that resumes or rebuilds it.
ARCHITECTURE = ("width", "grid", "aware_heads")


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig, defaults: Optional[dict] = None,
                         skip: Sequence[str] = ()) -> None:
    """One ``--option`` per dataclass field (booleans get ``--x/--no-x``)."""
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default)
        opt = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(opt, default=default, action=argparse.BooleanOptionalAction)
        elif f.type in ("Optional[float]",):
            parser.add_argument(opt, default=default, type=float)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(opt, default=default, type=typ)


def config_from_args(args: argparse.Namespace, cls=TrainConfig):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def build_model(cfg: TrainConfig) -> CIBVNet:
    return CIBVNet(width=cfg.width, grid=(cfg.grid,) * 3, aware_heads=cfg.aware_heads)


def compute_losses(out, y: torch.Tensor, single: torch.Tensor, grid: Sequence[int], lambda_patch: float,
                   lambda_grid: float, model: Optional[CIBVNet] = None):
    """Loss of one batch.

    Args:
        out: :class:`~.model.CIBOutput` (``logits [B, 3, 2, *P]``, ``patch [B]``, ``grid [B, *G]``).
        y: ``[B, 1, *P]`` labels (new lesions for two-time-point samples, all lesions for single ones).
        single: ``[B]`` bool, which samples are single-time-point.
        model: the network (needed to train its aware heads; without it they are left out).

    Returns ``(total, parts)`` with ``parts = {"dice", "cal", "patch_mse", "grid_mse"}`` (floats), plus
    ``"aware_patch_mse", "aware_grid_mse"`` when ``out`` carries aware scores (the aware heads are then
    scored on the task probability of each sample: new lesions, or lesions at t2 for single samples).
    """
    probs = torch.softmax(out.logits.float(), dim=2)[:, :, 1:2]  # [B, 3, 1, *P]
    two = ~single
    dice = probs.new_zeros(())
    if two.any():
        dice = dice + soft_dice_loss(probs[two, OUTPUT_NEW], y[two], batch=True)
    if single.any():
        dice = dice + 0.5 * (soft_dice_loss(probs[single, OUTPUT_T1], y[single], batch=True)
                             + soft_dice_loss(probs[single, OUTPUT_T2], y[single], batch=True))
    task = torch.where(single[:, None, None, None, None], probs[:, OUTPUT_T2], probs[:, OUTPUT_NEW])
    t_patch, t_grid = dice_targets(task, y, grid=tuple(grid))
    cal = calibration_loss(out.patch.float(), t_patch, out.grid.float(), t_grid, lambda_patch, lambda_grid)
    with torch.no_grad():
        parts = {
            "dice": float(dice),
            "cal": float(cal),
            "patch_mse": float(((out.patch.float() - t_patch) ** 2).mean()),
            "grid_mse": float(((out.grid.float() - t_grid) ** 2).mean()),
        }
    total = dice + cal
    if out.aware_patch is not None and model is not None:
        a_patch, a_grid = out.aware_patch.float(), out.aware_grid.float()
        if single.any():  # single-time-point samples: score the t2 output, as the targets do
            a_patch, a_grid = model.aware_patch_head(task, out.feature), model.aware_grid_head(task, out.feature)
        total = total + calibration_loss(a_patch, t_patch, a_grid, t_grid, lambda_patch, lambda_grid)
        with torch.no_grad():
            parts["aware_patch_mse"] = float(((a_patch - t_patch) ** 2).mean())
            parts["aware_grid_mse"] = float(((a_grid - t_grid) ** 2).mean())
    return total, parts


def check_config(cfg: TrainConfig) -> None:
    """Every setting of ``cfg`` in range, or :class:`~.data.InputError` naming its option (one line on the command
    line), before anything is loaded or allocated."""
    def refuse(field: str, rule: str):
        raise InputError(f"--{field.replace('_', '-')} must be {rule}, got {getattr(cfg, field)!r}")

    def finite(v) -> bool:
        return isinstance(v, (int, float)) and v == v and abs(v) != float("inf")

    if cfg.width < 1:
        refuse("width", "an int >= 1")
    if cfg.patch < 16 or cfg.patch % 16:
        refuse("patch", "a positive multiple of 16 (the V-Net downsamples 4 times)")
    if not 1 <= cfg.grid <= cfg.patch:
        refuse("grid", f"an int in [1, --patch] = [1, {cfg.patch}] (grid cells per axis of a patch)")
    for field in ("batch_two", "batch_single", "stage1_iters", "stage2_iters", "ckpt_every", "threads"):
        if getattr(cfg, field) < 0:
            refuse(field, "an int >= 0")
    if cfg.batch_two + cfg.batch_single < 1:
        raise InputError(f"--batch-two and --batch-single must sum to at least 1, got {cfg.batch_two} and "
                         f"{cfg.batch_single}")
    if not (finite(cfg.lesion_prob) and 0 <= cfg.lesion_prob <= 1):
        refuse("lesion_prob", "a probability in [0, 1]")
    if not (finite(cfg.lr) and cfg.lr > 0):
        refuse("lr", "a finite number > 0")
    for field in ("weight_decay", "lambda_patch", "lambda_grid"):
        if not (finite(getattr(cfg, field)) and getattr(cfg, field) >= 0):
            refuse(field, "a finite number >= 0")
    check_spacing(cfg.spacing)
    check_device(cfg.device)


def check_patch_fits_cases(patch: int, cases: Sequence[Case]) -> None:
    """A training patch larger than every case along every axis would be mostly zero padding, and the network's
    memory grows as ``patch³`` (``--patch 512`` on the phantoms asks for about 24 GB): refuse it by name, before
    anything is allocated (a patch of 16, the smallest, is always taken)."""
    largest = max(max(c.t1.shape) for c in cases)
    if patch > max(largest, 16):
        shapes = sorted({"x".join(map(str, c.t1.shape)) for c in cases})
        raise InputError(f"--patch {patch} is larger than every case (largest extent {largest} voxels; shapes "
                         f"{', '.join(shapes[:3])}{', ...' if len(shapes) > 3 else ''}): crops would be mostly zero "
                         f"padding and memory grows as patch^3; use --patch {max(largest // 16 * 16, 16)} or less")


def learning_rate(cfg: TrainConfig, iteration: int) -> float:
    """Learning rate of iteration ``iteration`` (0-based): ``lr · (1 − iteration / total) ** 0.9`` over
    both stages with ``lr_decay`` (the paper's polynomial decay), else ``lr``."""
    if not cfg.lr_decay:
        return cfg.lr
    return cfg.lr * (1 - iteration / max(cfg.stage1_iters + cfg.stage2_iters, 1)) ** 0.9


def read_checkpoint(path: str, device: str = "cpu") -> dict:
    """The checkpoint dict written by :func:`train`; a missing, unreadable or foreign file raises
    :class:`~.data.InputError` (one line for the command line)."""
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path!r} does not exist" if not os.path.exists(path)
                         else f"checkpoint {path!r} is not a file")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise InputError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or not {"config", "model"} <= set(ckpt):
        raise InputError(f"{path!r} is not a checkpoint of this example (no 'config' and 'model' entries)")
    return ckpt


def config_of(ckpt: dict) -> TrainConfig:
    """The :class:`TrainConfig` stored in a checkpoint (checkpoints from before the aware heads have none)."""
    stored = dict(ckpt["config"])
    stored.setdefault("aware_heads", False)
    return TrainConfig(**{k: v for k, v in stored.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})


def load_checkpoint(path: str, device: str = "cpu"):
    """``(model, config, checkpoint dict)`` from a checkpoint written by :func:`train` (model in eval mode)."""
    ckpt = read_checkpoint(path, device)
    cfg = config_of(ckpt)
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise InputError(f"{path!r}: the weights do not fit the stored configuration "
                         f"({str(e).strip().splitlines()[0]})") from None
    return model.to(device).eval(), cfg, ckpt


def _split(cases: List[Case]):
    return [c for c in cases if not c.single], [c for c in cases if c.single]


def train(cfg: TrainConfig, cases: Optional[List[Case]] = None, log=print) -> str:
    """Train per ``cfg``; returns the path of the final checkpoint (``cfg.out/last.pt``).

    ``cases`` may be given directly (already loaded); otherwise they are read from ``cfg.data``
    (and ``cfg.single_data``).
    """
    check_config(cfg)  # (InputError is a ValueError)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    if cases is None:
        if not cfg.data:
            raise ValueError("data must name a folder of cases (or pass cases=)")
        cases = load_cases(cfg.data, spacing=cfg.spacing, progress=cfg.progress)
        if cfg.single_data:
            cases += load_cases(cfg.single_data, spacing=cfg.spacing, progress=cfg.progress)
    if not cases:
        raise InputError(f"--data {cfg.data!r} holds no cases (folders with a FLAIR and ground_truth.nii.gz)"
                         if cfg.data else "no cases to train on")
    check_patch_fits_cases(cfg.patch, cases)
    two, single = _split(cases)
    sampler = MixedBatchSampler(two, single, (cfg.patch,) * 3, cfg.batch_two, cfg.batch_single,
                                cfg.lesion_prob, seed=cfg.seed)
    model = build_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    total_iters = cfg.stage1_iters + cfg.stage2_iters
    os.makedirs(cfg.out, exist_ok=True)
    last = os.path.join(cfg.out, "last.pt")
    start = 0
    history: List[dict] = []
    if cfg.resume and os.path.isfile(last):
        ckpt = read_checkpoint(last, str(device))
        stored = config_of(ckpt)
        differ = [f"--{k.replace('_', '-')} {getattr(stored, k)} (given {getattr(cfg, k)})" for k in ARCHITECTURE
                  if getattr(stored, k) != getattr(cfg, k)]
        if differ:
            raise InputError(f"--resume: {last} was trained with {', '.join(differ)}; use the same settings "
                             f"or another --out")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        sampler.load_state_dict(ckpt["sampler"])
        torch.set_rng_state(ckpt["torch_rng"])
        start, history = ckpt["iteration"], ckpt.get("history", [])
        log(f"resumed from {last} at iteration {start}")

    def save(it: int):
        tmp = last + ".tmp"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                    "sampler": sampler.state_dict(), "torch_rng": torch.get_rng_state(), "iteration": it,
                    "config": dataclasses.asdict(cfg), "history": history}, tmp)
        os.replace(tmp, last)
        if cfg.keep_snapshots:
            torch.save({"model": model.state_dict(), "iteration": it, "config": dataclasses.asdict(cfg)},
                       os.path.join(cfg.out, f"iter_{it:06d}.pt"))

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_iters, initial=start, desc="train", dynamic_ncols=True)
    model.train()
    grid = (cfg.grid,) * 3
    t0 = time.time()
    running = {}
    for it in range(start, total_iters):
        stage2 = it >= cfg.stage1_iters
        lam_grid = cfg.lambda_grid if stage2 else 0.0
        for g in opt.param_groups:
            g["lr"] = learning_rate(cfg, it)
        x, y, flags = sampler.sample()
        x, y, flags = x.to(device), y.to(device), flags.to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            out = model(x)
        loss, parts = compute_losses(out, y, flags, grid, cfg.lambda_patch, lam_grid, model)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        for k, v in parts.items():
            running[k] = 0.9 * running.get(k, v) + 0.1 * v
        if (it + 1) % 10 == 0 or it + 1 == total_iters:
            history.append({"iteration": it + 1, "stage": 2 if stage2 else 1, **{k: round(v, 5) for k, v in running.items()}})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(stage=2 if stage2 else 1, **{k: f"{v:.3f}" for k, v in running.items()})
        if cfg.ckpt_every > 0 and (it + 1) % cfg.ckpt_every == 0 and it + 1 < total_iters:
            save(it + 1)
    if bar is not None:
        bar.close()
    save(total_iters)
    with open(os.path.join(cfg.out, "history.json"), "w") as f:
        json.dump(history, f)
    log(f"trained {total_iters - start} iterations in {time.time() - t0:.0f} s -> {last}")
    return last


def check_out_folder(path: str, option: str = "--out") -> str:
    """``path`` if it is a folder or can be created as one; :class:`~.data.InputError` if it names a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{option} {path!r} names an existing file, not a folder")
    return path


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m patchblend.examples.cib train", description=__doc__.split("\n")[0])
    add_config_arguments(p)
    cfg = config_from_args(p.parse_args(argv))
    if not cfg.data:
        p.error("--data is required")
    check_config(cfg)
    check_out_folder(cfg.out)
    if not os.path.isdir(cfg.data):
        raise InputError(f"--data {cfg.data!r} is not an existing folder")
    return train(cfg)
