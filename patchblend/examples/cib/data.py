"""MSSEG-2 case loading, lesion-weighted 3D cropping and mixed two-/single-time-point batches.

A *case folder* holds either

- ``flair_time01_on_middle_space.nii.gz``, ``flair_time02_on_middle_space.nii.gz`` and
  ``ground_truth.nii.gz`` (new lesions): a two-time-point case (the MSSEG-2 layout), or
- one FLAIR (``flair.nii.gz``, or ``flair_time02_on_middle_space.nii.gz`` alone) and
  ``ground_truth.nii.gz`` (all lesions): a single-time-point case, used with ``t1 = t2``.

:func:`load_case` crops to the brain's bounding box (voxels above 0 in either time point, plus a
margin), z-scores each time point over its brain voxels and optionally resamples to a voxel size.
The network input of a case is ``[t1, t2, t2 - t1]`` (:func:`network_input`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "InputError",
    "Case",
    "T1_NAME",
    "T2_NAME",
    "GT_NAME",
    "SINGLE_NAME",
    "find_cases",
    "load_case",
    "load_cases",
    "network_input",
    "random_crop",
    "MixedBatchSampler",
]

T1_NAME = "flair_time01_on_middle_space.nii.gz"
T2_NAME = "flair_time02_on_middle_space.nii.gz"
GT_NAME = "ground_truth.nii.gz"
SINGLE_NAME = "flair.nii.gz"


class InputError(ValueError):
    """Bad input from the user (a missing or unreadable file, a wrong option): the command line prints
    its message as one line, without a traceback."""


@dataclass
class Case:
    """One loaded case. ``t1``, ``t2``: ``[D, H, W]`` float32 z-scored; ``label``: ``[D, H, W]`` uint8
    (new lesions for two-time-point cases, all lesions for single-time-point ones)."""

    name: str
    t1: np.ndarray
    t2: np.ndarray
    label: np.ndarray
    single: bool
    affine: np.ndarray
    crop: Tuple[slice, ...]  #: where the arrays sit in the file's voxel grid (before resampling)
    original_shape: Tuple[int, ...]


def check_spacing(spacing: Optional[float]) -> None:
    """``spacing`` (``--spacing``) is None or a finite voxel size > 0 (mm); else :class:`InputError`."""
    if spacing is not None and not (0 < spacing < float("inf")):
        raise InputError(f"--spacing (the voxel size to resample to, mm) must be a finite number > 0, got {spacing}")


def check_device(device: str, option: str = "--device") -> torch.device:
    """``device`` as a ``torch.device`` this torch can use; else :class:`InputError` naming ``option`` (``cuda``
    on a CPU build of torch, an unknown name, a GPU index that does not exist)."""
    try:
        d = torch.device(device)
        torch.empty(0, device=d)  # torch's own check: compiled with CUDA, a device present
    except (RuntimeError, AssertionError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{option} {device!r} is not available here ({first})") from None
    if d.type == "meta":
        raise InputError(f"{option} {device!r} holds shapes without data; use cpu or cuda")
    return d


def find_cases(root: str) -> List[str]:
    """Case folders directly under ``root`` (sorted): those holding a FLAIR (folders without one are
    not cases and are passed over).

    A folder with a FLAIR but no ``ground_truth.nii.gz`` is an error (:class:`InputError` naming every
    such folder), not a case to skip silently."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root!r} does not exist" if not os.path.exists(root)
                                else f"data folder {root!r} is not a folder")
    out, missing = [], []
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if not any(os.path.isfile(os.path.join(d, f)) for f in (T1_NAME, T2_NAME, SINGLE_NAME)):
            continue
        if os.path.isfile(os.path.join(d, GT_NAME)):
            out.append(d)
        else:
            others = sorted(f for f in os.listdir(d) if f.startswith("ground_truth"))
            missing.append(name + (f" (has {', '.join(others)})" if others else ""))
    if missing:
        raise InputError(f"{len(missing)} case folder(s) under {root!r} have no {GT_NAME}: {'; '.join(missing)}")
    return out


def _read_nifti(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(data float32, affine)`` of a NIfTI file; an unreadable file, or one with NaN or infinite voxels (which
    would make the whole z-scored volume NaN and every score 0), raises :class:`InputError`."""
    import nibabel as nib

    try:
        img = nib.load(path)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as e:  # nibabel raises many types for corrupt, truncated or empty files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"cannot read {path!r} as NIfTI ({type(e).__name__}: {first})") from None
    if data.ndim != 3:
        raise InputError(f"{path!r} holds a {data.ndim}D image {data.shape}; a 3D volume is needed")
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InputError(f"{path!r} holds {bad} NaN or infinite voxel(s); fix or mask them (e.g. set them to 0) "
                         "before using the case")
    return data, np.array(img.affine, dtype=np.float64)


def _zscore(img: np.ndarray, brain: np.ndarray) -> np.ndarray:
    vals = img[brain]
    if vals.size == 0:
        return np.zeros_like(img, dtype=np.float32)
    mean, std = float(vals.mean()), float(vals.std())
    out = (img - mean) / max(std, 1e-6)
    out[~brain] = 0.0
    return out.astype(np.float32)


def load_case(folder: str, spacing: Optional[float] = None, margin: int = 2, crop: bool = True) -> Case:
    """Load one case folder (layouts in the module docstring).

    Args:
        folder: the case folder.
        spacing: resample to this isotropic voxel size (mm; linear for images, nearest for labels);
            ``None`` keeps the file's grid.
        margin: voxels kept around the brain's bounding box.
        crop: crop to the brain (``False`` keeps the whole field of view).
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder {folder!r} does not exist")
    p1, p2, ps, pg = (os.path.join(folder, n) for n in (T1_NAME, T2_NAME, SINGLE_NAME, GT_NAME))
    if not os.path.isfile(pg):
        raise FileNotFoundError(f"folder {folder!r} has no {GT_NAME}")
    if os.path.isfile(p1) and os.path.isfile(p2):
        single = False
        t1, _ = _read_nifti(p1)
        t2, affine = _read_nifti(p2)
    else:
        single = True
        path = ps if os.path.isfile(ps) else p2 if os.path.isfile(p2) else None
        if path is None:
            raise FileNotFoundError(f"folder {folder!r} has neither {T1_NAME}+{T2_NAME} nor {SINGLE_NAME}")
        t2, affine = _read_nifti(path)
        t1 = t2
    label = _read_nifti(pg)[0] > 0.5
    if t1.shape != t2.shape or label.shape != t2.shape:
        raise InputError(f"folder {folder!r}: image shapes differ: t1 {t1.shape}, t2 {t2.shape}, gt {label.shape}")
    original_shape = t2.shape
    brain = (t1 > 0) | (t2 > 0)
    box = tuple(slice(0, s) for s in t2.shape)
    if crop and brain.any():
        idx = np.argwhere(brain)
        lo = np.maximum(idx.min(0) - margin, 0)
        hi = np.minimum(idx.max(0) + 1 + margin, t2.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        t1, t2, label, brain = t1[box], t2[box], label[box], brain[box]
        affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    if spacing is not None:
        from scipy import ndimage

        check_spacing(spacing)
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
        factors = zooms / float(spacing)
        t1 = ndimage.zoom(t1, factors, order=1)
        t2 = t1 if single else ndimage.zoom(t2, factors, order=1)
        label = ndimage.zoom(label.astype(np.uint8), factors, order=0) > 0
        brain = ndimage.zoom(brain.astype(np.uint8), factors, order=0) > 0
        affine[:3, :3] = affine[:3, :3] / factors
    z1 = _zscore(t1, brain)
    z2 = z1 if single else _zscore(t2, brain)
    return Case(os.path.basename(os.path.normpath(folder)), z1, z2.copy() if single else z2,
                label.astype(np.uint8), single, affine, box, tuple(original_shape))


def load_cases(root: str, progress: bool = False, **kwargs) -> List[Case]:
    """:func:`load_case` for every case folder under ``root``."""
    folders = find_cases(root)
    if progress:
        from tqdm.auto import tqdm

        folders = tqdm(folders, desc=f"loading {os.path.basename(root)}", leave=False)
    return [load_case(f, **kwargs) for f in folders]


def network_input(t1: np.ndarray, t2: np.ndarray) -> torch.Tensor:
    """``[3, D, H, W]`` float32 tensor ``[t1, t2, t2 - t1]``."""
    a = torch.as_tensor(np.ascontiguousarray(t1), dtype=torch.float32)
    b = torch.as_tensor(np.ascontiguousarray(t2), dtype=torch.float32)
    return torch.stack([a, b, b - a])


def random_crop(case: Case, size: Sequence[int], rng: np.random.Generator, lesion_prob: float = 0.7,
                jitter: Optional[Sequence[int]] = None, lesion_voxels: Optional[np.ndarray] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A ``size`` crop of ``case``: ``(x [3, *size], y [1, *size])`` (zero padded where the case is smaller).

    With probability ``lesion_prob`` and when the label has lesions, the crop is centred on a random
    lesion voxel shifted by up to ``jitter`` voxels per axis (default: a quarter of ``size``);
    otherwise its position is uniform over the volume. ``lesion_voxels`` (``[n, 3]``, default
    ``np.argwhere(case.label)``) lets a caller cache the lesion coordinates.
    """
    size = [int(s) for s in size]
    if len(size) != 3 or any(s < 1 for s in size):
        raise ValueError(f"size must be 3 positive ints, got {size}")
    shape = case.label.shape
    jit = [s // 4 for s in size] if jitter is None else [int(j) for j in jitter]
    starts = []
    fg = None
    if rng.random() < lesion_prob:
        fg = np.argwhere(case.label) if lesion_voxels is None else lesion_voxels
        if len(fg):
            centre = fg[rng.integers(len(fg))]
        else:
            fg = None
    for ax in range(3):
        hi = max(shape[ax] - size[ax], 0)
        if fg is not None:
            s = int(centre[ax]) - size[ax] // 2 + int(rng.integers(-jit[ax], jit[ax] + 1))
        else:
            s = int(rng.integers(0, hi + 1))
        starts.append(min(max(s, 0), hi))
    src = tuple(slice(s, s + n) for s, n in zip(starts, size))
    t1, t2, lab = case.t1[src], case.t2[src], case.label[src]
    x = torch.zeros((3, *size), dtype=torch.float32)
    y = torch.zeros((1, *size), dtype=torch.float32)
    dst = tuple(slice(0, n) for n in t1.shape)
    x[(slice(None),) + dst] = network_input(t1, t2)
    y[(0,) + dst] = torch.as_tensor(lab, dtype=torch.float32)
    return x, y


class MixedBatchSampler:
    """Endless batches mixing two-time-point and single-time-point crops (the paper: 4 + 4).

    Each call of :meth:`sample` returns ``(x [B, 3, *P], y [B, 1, *P], single [B] bool)`` with the
    ``n_two`` two-time-point samples first. If one kind of case is missing, the batch is filled with
    the other kind.
    """

    def __init__(self, two: Sequence[Case], single: Sequence[Case], patch_size: Sequence[int],
                 n_two: int = 4, n_single: int = 4, lesion_prob: float = 0.7, seed: int = 0):
        if not two and not single:
            raise ValueError("two and single are both empty: no cases to sample from")
        if n_two < 0 or n_single < 0 or n_two + n_single < 1:
            raise ValueError(f"n_two and n_single must be >= 0 with a positive sum, got {n_two}, {n_single}")
        self.two, self.single = list(two), list(single)
        if not self.two:
            n_two, n_single = 0, n_two + n_single
        if not self.single:
            n_two, n_single = n_two + n_single, 0
        self.n_two, self.n_single = n_two, n_single
        self.patch_size = [int(p) for p in patch_size]
        self.lesion_prob = lesion_prob
        self.rng = np.random.default_rng(seed)
        self._fg = {id(c): np.argwhere(c.label) for c in self.two + self.single}

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]

    def sample(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, ys, flags = [], [], []
        for pool, n, flag in ((self.two, self.n_two, False), (self.single, self.n_single, True)):
            for _ in range(n):
                case = pool[self.rng.integers(len(pool))]
                x, y = random_crop(case, self.patch_size, self.rng, self.lesion_prob,
                                   lesion_voxels=self._fg[id(case)])
                xs.append(x)
                ys.append(y)
                flags.append(flag)
        return torch.stack(xs), torch.stack(ys), torch.tensor(flags)
