"""The template's white matter, registered to a case: where a brain's deep white matter lies.

New MS lesions sit in deep white matter; a follow-up hyperintensity centred in or near grey matter is a likelier
false positive. A scan's own intensities say this only roughly (texture, noise and partial volume blur white and
grey matter at a few millimetres), so :func:`template_white_matter` registers the MNI152 2009a template that ships
with ``nilearn`` (the phantoms' own anatomy, :func:`.phantom.load_tissue_maps`) to the case's baseline with a
12-parameter affine and returns the template's white-matter probability in the case's voxels. The lesion head
reads it at each component's centre (``atlas_wm``, :mod:`.gating`).

The registration compares the template's FLAIR-like contrast (:func:`.phantom.flair_contrast`) with the
baseline scan, rescaled so that its white- and grey-matter levels (:func:`.gating.tissue_classes`) match the
template's, on grids of about 5 mm, by least squares (L-BFGS-B from the alignment of the brains' centres of
mass). It assumes the case is about in the template's orientation (the phantoms are; a scan in another
orientation must be reoriented first) and that a 12-parameter affine relates them: a brain with large lesions
or atrophy is matched less well, and then the column says less.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import numpy as np

__all__ = ["WORKING_VOXEL_MM", "case_white_matter", "template_white_matter", "register_template"]

#: Voxel size (mm) of the grids the affine is fitted on.
WORKING_VOXEL_MM = 5.0


@lru_cache(maxsize=4)
def _template(voxel_mm: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(contrast, white matter, brain)`` of the template at ``voxel_mm`` mm voxels (float64 ``[D, H, W]``)."""
    from .phantom import flair_contrast, load_tissue_maps

    brain, csf, gm, wm, _ = load_tissue_maps(voxel_mm)
    return (flair_contrast(brain, csf, gm, wm).astype(np.float64), wm.astype(np.float64),
            brain.astype(np.float64))


def _coarse(volume: np.ndarray, factor: int) -> np.ndarray:
    from scipy import ndimage

    # every factor-th voxel of the smoothed volume: coarse voxel y is voxel factor * y
    return ndimage.gaussian_filter(volume, max(1.0, factor / 2))[::factor, ::factor, ::factor]


def register_template(t1: np.ndarray, brain: np.ndarray, voxel_mm: float) -> Tuple[np.ndarray, np.ndarray]:
    """``(matrix [3, 3], offset [3])`` mapping a voxel ``x`` of the case (``t1`` ``[D, H, W]``, the baseline
    scan, any intensity scale; ``brain`` its brain mask; isotropic ``voxel_mm`` mm voxels) to the template
    voxel ``matrix @ x + offset`` at the same voxel size."""
    from scipy import ndimage, optimize

    from .gating import tissue_classes

    contrast, _, template_brain = _template(float(voxel_mm))
    _, levels = tissue_classes(t1, brain, np.zeros(t1.shape, np.int64))
    scale = max(float(levels[2] - levels[1]), 1e-6)
    target = np.where(brain, 0.6 + 0.2 * (t1 - levels[1]) / scale, 0.0)  # the template's WM 0.6, GM 0.8
    factor = max(1, int(round(WORKING_VOXEL_MM / voxel_mm)))
    fixed, moving = _coarse(target, factor), _coarse(contrast, factor)
    start = (np.array(ndimage.center_of_mass(template_brain)) - np.array(ndimage.center_of_mass(brain))) / factor

    def unpack(p):
        return np.eye(3) + 0.1 * p[:9].reshape(3, 3), start + p[9:]

    def cost(p):
        matrix, offset = unpack(p)
        warped = ndimage.affine_transform(moving, matrix, offset=offset, output_shape=fixed.shape, order=1)
        return 1e3 * float(((warped - fixed) ** 2).mean())

    fit = optimize.minimize(cost, np.zeros(12), method="L-BFGS-B", options={"eps": 1e-4, "maxiter": 200})
    matrix, offset = unpack(fit.x)
    return matrix, offset * factor


def template_white_matter(t1: np.ndarray, brain: np.ndarray, voxel_mm: float) -> np.ndarray:
    """``[D, H, W]`` the template's white-matter probability in ``t1``'s voxels (:func:`register_template`)."""
    from scipy import ndimage

    matrix, offset = register_template(t1, brain, voxel_mm)
    _, wm, _ = _template(float(voxel_mm))
    return ndimage.affine_transform(wm, matrix, offset=offset, output_shape=t1.shape, order=1)


def case_white_matter(case) -> np.ndarray:
    """``[D, H, W]`` the template's white matter registered to a loaded :class:`~.data.Case`'s baseline; the
    case's voxels must be about isotropic and of 0.5–10 mm, else :class:`~.data.InputError`."""
    from .data import InputError
    from .phantom import DOWNSAMPLE_RANGE

    sizes = np.linalg.norm(np.asarray(case.affine, np.float64)[:3, :3], axis=0)
    lo, hi = DOWNSAMPLE_RANGE
    if sizes.max() > 1.2 * sizes.min() or not lo <= sizes.mean() <= hi:
        raise InputError(f"case {case.name!r}: the lesion heads' atlas column needs isotropic voxels of {lo:g}-{hi:g} "
                         f"mm, got {np.round(sizes, 3).tolist()} mm (resample with --spacing, or fit the heads with "
                         f"--no-atlas)")
    return template_white_matter(case.t1, (case.t1 != 0) | (case.t2 != 0), float(sizes.mean()))
