"""Window placement: MONAI's (checked against MONAI itself) and nnU-Net's (hand-worked sizes + its formula)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchblend.inference import WindowGrid, sliding_windows, window_starts

monai_utils = pytest.importorskip("monai.data.utils")
monai_inferer_utils = pytest.importorskip("monai.inferers.utils")


def monai_starts(image_shape, window_shape, overlap):
    """Starts per axis as MONAI's sliding_window_inference computes them (scan interval + dense_patch_slices)."""
    nd = len(image_shape)
    interval = monai_inferer_utils._get_scan_interval(image_shape, window_shape, nd, (overlap,) * nd)
    slices = monai_utils.dense_patch_slices(image_shape, window_shape, interval)
    return [tuple(s[a].start for s in slices) for a in range(nd)]


# ---- MONAI ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "size, window, overlap, expected",
    [
        (192, 80, 0.5, (0, 40, 80, 112)),  # case S, axis 0
        (224, 80, 0.5, (0, 40, 80, 120, 144)),  # case S, axis 1: last window flush with the border
        (192, 80, 0.0, (0, 80, 112)),
        (80, 80, 0.5, (0,)),  # window == image: one window
        (10, 3, 0.9, tuple(range(8))),  # int(3 * 0.1) = 0 -> step 1
        (100, 96, 0.25, (0, 4)),
    ],
)
def test_monai_hand_worked(size, window, overlap, expected):
    assert window_starts(size, window, overlap, "monai") == expected


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 300), frac=st.floats(0.01, 1.0), overlap=st.floats(0.0, 0.99))
def test_monai_matches_monai_1d(size, frac, overlap):
    window = max(1, min(size, int(round(size * frac))))
    assert [window_starts(size, window, overlap, "monai")] == monai_starts((size,), (window,), overlap)


def test_monai_grid_order_matches_dense_patch_slices():
    image, window, overlap = (30, 41, 17), (16, 20, 17), 0.3
    grid = sliding_windows(image, window, overlap)
    nd = len(image)
    interval = monai_inferer_utils._get_scan_interval(image, window, nd, (overlap,) * nd)
    slices = monai_utils.dense_patch_slices(image, window, interval)
    expected = torch.tensor([[s.start for s in sl] for sl in slices])
    assert torch.equal(grid.coords(), expected)
    assert len(grid) == len(slices) and grid.lattice_shape == tuple(len(s) for s in grid.starts)


def test_per_axis_overlap():
    grid = sliding_windows((192, 224, 192), 80, (0.5, 0.0, 0.25))
    assert grid.starts == ((0, 40, 80, 112), (0, 80, 144), (0, 60, 112))


# ---- nnU-Net -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "size, window, step, expected",
    [
        (110, 64, 0.5, (0, 23, 46)),  # the example in nnU-Net's own comment
        (192, 80, 0.5, (0, 37, 75, 112)),  # n = ceil(112 / 40) + 1 = 4, step 112/3 = 37.33
        (224, 80, 0.5, (0, 36, 72, 108, 144)),  # n = ceil(144 / 40) + 1 = 5, step 36
        (13, 8, 0.5, (0, 2, 5)),  # 5/2 = 2.5 rounds half to even -> 2
        (80, 80, 0.5, (0,)),
        (100, 50, 1.0, (0, 50)),
    ],
)
def test_nnunet_hand_worked(size, window, step, expected):
    overlap = 1.0 - step
    assert window_starts(size, window, overlap, "nnunet") == expected


def test_nnunet_float_arithmetic():
    # 32 voxels, tile 3, step 0.7: n = ceil(29 / 2.1) + 1 = 15 windows, step 29/14; window 7 starts at
    # (29/14) * 7, which is 14.500000000000002 in float64 (nnU-Net's arithmetic) and rounds to 15, not to even 14.
    starts = window_starts(32, 3, 1.0 - 0.7, "nnunet")
    assert len(starts) == 15 and starts[7] == 15 and starts[-1] == 29


def nnunet_formula(size, window, step):
    """nnU-Net v2's compute_steps_for_sliding_window, one axis (numpy, as it is written there)."""
    target = window * step
    n = int(np.ceil((size - window) / target)) + 1
    actual = (size - window) / (n - 1) if n > 1 else 99999999999
    return tuple(int(np.round(actual * i)) for i in range(n))


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 400), frac=st.floats(0.01, 1.0), step=st.sampled_from([0.25, 0.5, 0.7, 0.8, 1.0]))
def test_nnunet_matches_formula(size, frac, step):
    window = max(1, min(size, int(round(size * frac))))
    got = window_starts(size, window, 1.0 - step, "nnunet")
    assert got == nnunet_formula(size, window, 1.0 - (1.0 - step))
    assert got[0] == 0 and got[-1] == size - window
    assert all(b - a <= math.ceil(window * step) for a, b in zip(got, got[1:]))  # no gaps


# ---- errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overlap", [1.0, -0.1, 1.5, float("nan")])
def test_bad_overlap(overlap):
    with pytest.raises(ValueError, match="overlap"):
        window_starts(100, 10, overlap)


def test_bad_arguments():
    with pytest.raises(ValueError, match="window"):
        window_starts(10, 11)
    with pytest.raises(ValueError, match="window"):
        window_starts(10, 0)
    with pytest.raises(ValueError, match="style"):
        window_starts(10, 5, 0.5, "torchio")
    with pytest.raises(ValueError, match="window_shape"):
        sliding_windows((10, 10), (5, 5, 5))
    with pytest.raises(ValueError, match="overlap"):
        sliding_windows((10, 10), 5, (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="style"):
        sliding_windows((10, 10), 5, style="x")


def test_window_grid_coords_2d():
    grid = WindowGrid((5, 7), (3, 4), ((0, 2), (0, 3)))
    assert grid.coords().tolist() == [[0, 0], [0, 3], [2, 0], [2, 3]]
    assert len(grid) == 4
