"""A seeded synthetic two-time-point MS phantom on a real brain (the MNI152 2009a template in nilearn).

MSSEG-2 is not public-download, so the example ships this phantom for its demo and tests. Every
case is built from the MNI152 T1 brain mask and grey/white-matter probability maps that are stored
inside the ``nilearn`` package (read from its data folder; nothing is downloaded):

1. **Anatomy**: the template's tissue maps (CSF = brain − GM − WM) after a random per-subject affine
   (±6% scale, ±6° rotation, ±3 voxel shift), resampled by ``downsample``; FLAIR-like contrast
   (CSF dark, WM darker than GM) plus a smooth texture field shared by both time points.
2. **Lesions**: hyperintense ellipsoids (random radii and orientation, soft partial-volume edge)
   centred in white matter. *Existing* lesions appear at both time points (at follow-up with a small
   change of size and brightness); *new* lesions only at follow-up. ``ground_truth`` = new lesions.
3. **Sources of false positives** (none of them is a new lesion): faint transient hyperintensities
   anywhere in the parenchyma at follow-up ("mimics"), resolving hyperintensities at baseline only,
   the size/brightness drift of existing lesions, a different multiplicative bias field and global
   gain per time point, Rician noise, and a small rigid misregistration of each time point around
   the middle space (up to ``misregistration`` voxels).

:func:`write_phantom_set` writes cases in the MSSEG-2 folder layout (``flair_time01_on_middle_space.nii.gz``,
``flair_time02_on_middle_space.nii.gz``, ``ground_truth.nii.gz``) and single-time-point cases as
``flair.nii.gz`` + ``ground_truth.nii.gz`` (all lesions), so :mod:`.data` reads both.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

__all__ = ["PhantomConfig", "PHANTOM_PRESETS", "phantom_preset", "PhantomCase", "load_tissue_maps", "flair_contrast",
           "make_case", "write_case", "write_phantom_set", "match_phantom_objects"]

_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


@dataclass
class PhantomConfig:
    """Phantom settings. Sizes are in millimetres of the 1 mm template; intensities are relative to the
    FLAIR white-matter level 0.6 (grey matter 0.8, CSF 0.15)."""

    downsample: float = 2.5  #: voxel size in mm (1 = template resolution, 2.5 gives ~58×72×62 brains)
    n_existing: Tuple[int, int] = (3, 9)  #: inclusive range of lesions present at both time points
    n_new: Tuple[int, int] = (1, 5)  #: inclusive range of new lesions (follow-up only)
    lesion_radius_mm: Tuple[float, float] = (3.0, 8.0)  #: ellipsoid semi-axes
    lesion_intensity: Tuple[float, float] = (0.95, 1.35)
    n_mimics: Tuple[int, int] = (1, 4)  #: faint transient follow-up hyperintensities (not lesions)
    mimic_radius_mm: Tuple[float, float] = (2.5, 5.0)
    mimic_intensity: Tuple[float, float] = (0.75, 0.95)
    n_resolving: Tuple[int, int] = (0, 2)  #: baseline-only hyperintensities
    existing_change: float = 0.1  #: relative size/brightness drift of existing lesions at follow-up
    noise: Tuple[float, float] = (0.025, 0.045)  #: Rician noise sigma per time point
    bias: float = 0.12  #: amplitude of the log bias field per time point
    gain: float = 0.08  #: relative global gain difference per time point
    misregistration: float = 0.5  #: max displacement (voxels) of each time point from the middle space
    texture: float = 0.04  #: amplitude of the anatomical texture


#: Named phantom settings (changes from :class:`PhantomConfig`'s defaults).
#:
#: - ``standard``: the defaults (few, faint mimics; a trained demo model makes few false positives).
#: - ``hard``: more, larger and brighter mimics and more noise (4–10 mimics of 3–7 mm semi-axes at
#:   0.85–1.10, noise sigma 0.035–0.055), so that average blending of the demo model has an FDR of
#:   25% or more and a lesion F1 of 60–80%, like the paper's MSSEG-2 baseline (F1 62%). These are the
#:   settings of the experiment reported in the project's issue 12, taken as they were (not tuned on
#:   the demo's test cases).
PHANTOM_PRESETS: Dict[str, Dict] = {
    "standard": {},
    "hard": dict(n_mimics=(4, 10), mimic_radius_mm=(3.0, 7.0), mimic_intensity=(0.85, 1.10), noise=(0.035, 0.055)),
}


def phantom_preset(name: str, **overrides) -> "PhantomConfig":
    """The :class:`PhantomConfig` of a preset in :data:`PHANTOM_PRESETS`, with ``overrides``."""
    if name not in PHANTOM_PRESETS:
        raise ValueError(f"phantom preset must be one of {tuple(PHANTOM_PRESETS)}, got {name!r}")
    return PhantomConfig(**{**PHANTOM_PRESETS[name], **overrides})


@dataclass
class PhantomCase:
    """One generated case; arrays are ``[D, H, W]`` float32 (images) or bool (masks)."""

    t1: np.ndarray
    t2: np.ndarray
    new_mask: np.ndarray  #: ground truth of the two-time-point task: new lesions
    all_mask: np.ndarray  #: every lesion visible at follow-up (single-time-point ground truth)
    affine: np.ndarray  #: 4×4 voxel-to-world (mm)
    lesions: List[Dict] = field(default_factory=list)  #: what was inserted (kind, centre, radii, intensity)


def _template_dir() -> str:
    import nilearn

    return os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data")


#: phantom voxel sizes taken (mm): the template is 1 mm, so finer only interpolates and costs memory as
#: 1 / downsample³ (1e-6 mm would ask for terabytes); beyond 10 mm the brain is under 20 voxels across
DOWNSAMPLE_RANGE = (0.5, 10.0)


def check_downsample(downsample: float) -> None:
    """``downsample`` (``--downsample``, the phantom voxel size in mm) within :data:`DOWNSAMPLE_RANGE`, else
    :class:`~.data.InputError`."""
    from .data import InputError

    lo, hi = DOWNSAMPLE_RANGE
    if not lo <= downsample <= hi:
        raise InputError(f"--downsample (the phantom voxel size, mm) must lie in [{lo:g}, {hi:g}], got {downsample}")


@lru_cache(maxsize=4)
def load_tissue_maps(downsample: float = 2.5) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(brain, csf, gm, wm, affine)`` of the MNI152 2009a template cropped to the brain (+4 mm) and
    resampled to ``downsample`` mm voxels; maps are float32 in [0, 1], ``[D, H, W]``."""
    import nibabel as nib

    check_downsample(downsample)
    d = _template_dir()
    paths = [os.path.join(d, _TEMPLATE.format(n)) for n in ("t1", "gm", "wm")]
    if all(os.path.exists(p) for p in paths):
        imgs = [nib.load(p) for p in paths]
    else:  # other nilearn layouts: the loaders return the same packaged images
        from nilearn import datasets

        imgs = [datasets.load_mni152_template(resolution=1), datasets.load_mni152_gm_template(resolution=1),
                datasets.load_mni152_wm_template(resolution=1)]
    t1, gm, wm = (np.asarray(im.get_fdata(dtype=np.float32)) for im in imgs)
    t1, gm, wm = (a / max(float(a.max()), 1e-6) for a in (t1, gm, wm))
    brain = (t1 > 0).astype(np.float32)
    idx = np.argwhere(brain > 0)
    lo = np.maximum(idx.min(0) - 4, 0)
    hi = np.minimum(idx.max(0) + 5, brain.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    maps = [a[box] for a in (brain, gm, wm)]
    if downsample != 1:
        maps = [ndimage.zoom(a, 1.0 / downsample, order=1, prefilter=False) for a in maps]
    brain, gm, wm = (np.clip(a, 0, 1).astype(np.float32) for a in maps)
    gm, wm = gm * brain, wm * brain
    csf = np.clip(brain - gm - wm, 0, 1)
    affine = np.array(imgs[0].affine, dtype=np.float64)
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    affine[:3, :3] = affine[:3, :3] * downsample
    return brain, csf, gm, wm, affine


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def _warp(vol: np.ndarray, matrix: np.ndarray, shift: np.ndarray, order: int = 1) -> np.ndarray:
    """Resample ``vol`` at ``matrix @ (x - c) + c + shift`` (c = centre)."""
    c = (np.array(vol.shape) - 1) / 2.0
    offset = c - matrix @ c + shift
    return ndimage.affine_transform(vol, matrix, offset=offset, order=order, mode="constant", cval=0.0)


def _random_orthonormal(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _ellipsoid(shape, centre, radii, axes, edge: float = 0.35):
    """Soft ellipsoid: ``(box, profile)`` with profile 1 inside, 0 outside, a linear ramp of ``edge``
    (in normalised radius) around radius 1; ``profile >= 0.5`` is the ellipsoid itself."""
    reach = float(np.max(radii)) * (1 + edge) + 1
    lo = np.maximum(np.floor(centre - reach).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None, None
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    d = np.stack([g - c for g, c in zip(grids, centre)], -1)  # [..., 3]
    local = d @ axes  # coordinates along the ellipsoid axes
    r = np.sqrt(((local / radii) ** 2).sum(-1))
    profile = np.clip((1 + edge / 2 - r) / edge, 0, 1).astype(np.float32)
    return tuple(slice(a, b) for a, b in zip(lo, hi)), profile


def _bias_field(shape, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Smooth multiplicative field: exp of a random second-order polynomial in normalised coordinates."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    terms = list(grids) + [g * h for i, g in enumerate(grids) for h in grids[i:]]
    log = sum(rng.uniform(-1, 1) * t for t in terms) / math.sqrt(len(terms))
    return np.exp(amplitude * log).astype(np.float32)


def flair_contrast(brain: np.ndarray, csf: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """The phantoms' FLAIR-like anatomy ``[D, H, W]`` from tissue maps: CSF 0.15, grey matter 0.80, white
    matter 0.60, mixed by the maps, fading out at the brain's edge."""
    total = np.maximum(csf + gm + wm, 1e-6)
    return (0.15 * csf + 0.80 * gm + 0.60 * wm) / total * np.clip(brain * 1.5, 0, 1)


def make_case(seed: int, config: Optional[PhantomConfig] = None) -> PhantomCase:
    """Generate one case, fully determined by ``seed`` and ``config``."""
    cfg = config or PhantomConfig()
    rng = np.random.default_rng(seed)
    brain0, csf0, gm0, wm0, affine = load_tissue_maps(float(cfg.downsample))
    shape = brain0.shape
    vox = float(cfg.downsample)

    # Subject anatomy: a random affine of the template.
    m = _rotation(rng, 6.0) * rng.uniform(0.94, 1.06, 3)[None, :]
    s = rng.uniform(-3, 3, 3) / vox
    brain, csf, gm, wm = (_warp(a, m, s) for a in (brain0, csf0, gm0, wm0))
    base = flair_contrast(brain, csf, gm, wm)
    tex = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 1.0)
    tex /= max(float(tex.std()), 1e-6)
    base = base + cfg.texture * tex * (brain > 0.5)
    parenchyma = (gm + wm) > 0.5

    lesions: List[Dict] = []
    add1 = np.zeros(shape, np.float32)  # lesion profile x intensity, baseline
    add2 = np.zeros(shape, np.float32)  # follow-up
    w1 = np.zeros(shape, np.float32)  # blend weights (max profile)
    w2 = np.zeros(shape, np.float32)
    all_mask = np.zeros(shape, bool)
    new_mask = np.zeros(shape, bool)
    occupied = np.zeros(shape, bool)

    wm_sites = np.argwhere((wm > 0.85) & (brain > 0.9))
    par_sites = np.argwhere(parenchyma & (brain > 0.9))

    def stamp(target_add, target_w, box, prof, inten):
        cur = target_w[box]
        upd = prof > cur
        target_add[box] = np.where(upd, prof * inten, target_add[box])
        target_w[box] = np.where(upd, prof, cur)

    def place(kind, sites, radius_mm, intensity, avoid=True):
        for _ in range(50):
            centre = sites[rng.integers(len(sites))].astype(np.float64) + rng.uniform(-0.5, 0.5, 3)
            radii = rng.uniform(*radius_mm, 3) / vox
            axes = _random_orthonormal(rng)
            box, prof = _ellipsoid(shape, centre, radii, axes)
            if box is None:
                continue
            mask = (prof >= 0.5) & parenchyma[box]
            if mask.sum() < 2:
                continue
            grown = ndimage.binary_dilation(mask, iterations=2)
            if avoid and (occupied[box] & grown).any():
                continue
            occupied[box] |= grown
            inten = float(rng.uniform(*intensity))
            lesions.append({"kind": kind, "centre": centre.round(2).tolist(), "radii": radii.round(3).tolist(),
                            "intensity": round(inten, 4), "voxels": int(mask.sum())})
            return box, prof * parenchyma[box], mask, radii, axes, centre, inten
        return None

    for _ in range(rng.integers(cfg.n_existing[0], cfg.n_existing[1] + 1)):
        got = place("existing", wm_sites, cfg.lesion_radius_mm, cfg.lesion_intensity)
        if got is None:
            continue
        box, prof, mask, radii, axes, centre, inten = got
        stamp(add1, w1, box, prof, inten)
        # follow-up: a small drift of size and brightness
        c = cfg.existing_change
        box2, prof2 = _ellipsoid(shape, centre, radii * rng.uniform(1 - c / 2, 1 + c), axes)
        prof2 = prof2 * parenchyma[box2]
        stamp(add2, w2, box2, prof2, inten * rng.uniform(1 - c, 1 + c))
        all_mask[box2] |= prof2 >= 0.5
    for _ in range(rng.integers(cfg.n_new[0], cfg.n_new[1] + 1)):
        got = place("new", wm_sites, cfg.lesion_radius_mm, cfg.lesion_intensity)
        if got is None:
            continue
        box, prof, mask, _, _, _, inten = got
        stamp(add2, w2, box, prof, inten)
        new_mask[box] |= mask
        all_mask[box] |= mask
    for _ in range(rng.integers(cfg.n_mimics[0], cfg.n_mimics[1] + 1)):
        got = place("mimic", par_sites, cfg.mimic_radius_mm, cfg.mimic_intensity)
        if got is not None:
            box, prof, _, _, _, _, inten = got
            stamp(add2, w2, box, prof, inten)
    for _ in range(rng.integers(cfg.n_resolving[0], cfg.n_resolving[1] + 1)):
        got = place("resolving", wm_sites, cfg.lesion_radius_mm, cfg.lesion_intensity)
        if got is not None:
            box, prof, _, _, _, _, inten = got
            stamp(add1, w1, box, prof, inten)

    images = []
    for add, w in ((add1, w1), (add2, w2)):
        img = base * (1 - w) + add
        # each time point sits a little off the middle space
        r = _rotation(rng, 1.0)
        t = rng.uniform(-1, 1, 3) * cfg.misregistration / math.sqrt(3)
        img = _warp(img, r, t)
        img = img * _bias_field(shape, rng, cfg.bias) * (1 + rng.uniform(-cfg.gain, cfg.gain))
        sigma = rng.uniform(*cfg.noise)
        n1 = rng.normal(scale=sigma, size=shape).astype(np.float32)
        n2 = rng.normal(scale=sigma, size=shape).astype(np.float32)
        img = np.sqrt((img + n1) ** 2 + n2 ** 2)  # Rician magnitude
        img = img * (brain > 0.5)  # skull-stripped
        images.append(img.astype(np.float32))
    return PhantomCase(images[0], images[1], new_mask, all_mask, affine, lesions)


def write_case(case: PhantomCase, folder: str, single_timepoint: bool = False) -> str:
    """Write ``case`` in the MSSEG-2 layout (or, with ``single_timepoint``, as ``flair.nii.gz`` = the
    follow-up and ``ground_truth.nii.gz`` = all lesions), plus ``phantom.json`` with the lesion list."""
    import nibabel as nib

    os.makedirs(folder, exist_ok=True)

    def save(arr, name, dtype):
        img = nib.Nifti1Image(np.asarray(arr, dtype=dtype), case.affine)
        nib.save(img, os.path.join(folder, name))

    if single_timepoint:
        save(case.t2, "flair.nii.gz", np.float32)
        save(case.all_mask, "ground_truth.nii.gz", np.uint8)
    else:
        save(case.t1, "flair_time01_on_middle_space.nii.gz", np.float32)
        save(case.t2, "flair_time02_on_middle_space.nii.gz", np.float32)
        save(case.new_mask, "ground_truth.nii.gz", np.uint8)
    with open(os.path.join(folder, "phantom.json"), "w") as f:
        json.dump({"single_timepoint": single_timepoint, "lesions": case.lesions}, f, indent=1)
    return folder


#: A component lies on a phantom object when its centre is within this many of the object's semi-axes.
MATCH_REACH = 2.0


def match_phantom_objects(folder: str, crop, centres: np.ndarray) -> List[Tuple[str, float]]:
    """What each component of a phantom case lies on: ``[(kind, intensity)]`` per row of ``centres``
    (``[n, 3]``, voxels of the case as loaded with ``crop``, without resampling), from the case's
    ``phantom.json``: the object (``new``, ``existing``, ``mimic``, ``resolving``) nearest in units of its
    semi-axes, ``("", nan)`` when none is within :data:`MATCH_REACH` or the folder has no ``phantom.json``."""
    path = os.path.join(folder, "phantom.json")
    centres = np.asarray(centres, np.float64).reshape(-1, 3)
    if not os.path.isfile(path):
        return [("", math.nan)] * len(centres)
    with open(path) as f:
        objects = json.load(f)["lesions"]
    offset = np.array([sl.start or 0 for sl in crop], np.float64)
    if not objects:
        return [("", math.nan)] * len(centres)
    at = np.array([o["centre"] for o in objects], np.float64)  # [m, 3]
    radii = np.maximum(np.array([o["radii"] for o in objects], np.float64), 1.0)
    reach = np.linalg.norm(((centres + offset)[:, None] - at[None]) / radii[None], axis=2)  # [n, m] in semi-axes
    out = []
    for row in reach:
        k = int(row.argmin())
        out.append((objects[k]["kind"], float(objects[k]["intensity"])) if row[k] <= MATCH_REACH else ("", math.nan))
    return out


def write_phantom_set(root: str, n_two: int, n_single: int = 0, seed: int = 0,
                      config: Optional[PhantomConfig] = None, prefix: str = "case",
                      progress: bool = False) -> List[str]:
    """Write ``n_two`` two-time-point and ``n_single`` single-time-point cases under ``root``
    (``{prefix}_NNN`` and ``{prefix}_single_NNN``); case ``i`` uses seed ``seed * 100003 + i``.
    Returns the case folders."""
    if n_two < 0 or n_single < 0:
        raise ValueError(f"n_two and n_single must be >= 0, got {n_two}, {n_single}")
    cfg = config or PhantomConfig()
    jobs = [(f"{prefix}_{i:03d}", False) for i in range(n_two)]
    jobs += [(f"{prefix}_single_{i:03d}", True) for i in range(n_single)]
    it = jobs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(jobs, desc="phantoms", leave=False)
    folders = []
    for i, (name, single) in enumerate(it):
        case = make_case(seed * 100003 + i, cfg)
        folders.append(write_case(case, os.path.join(root, name), single_timepoint=single))
    with open(os.path.join(root, "phantom_config.json"), "w") as f:
        json.dump({"seed": seed, **asdict(cfg)}, f, indent=1)
    return folders
