"""nnU-Net v2's window lattice, exactly: ``tile_step_size`` is used as given (no ``1 - overlap`` round trip).

nnU-Net's rule (``compute_steps_for_sliding_window``), one axis of ``size`` voxels, tile ``P``, step ``t`` in (0, 1]:
``n = ceil((size - P) / (P * t)) + 1`` windows (``P * t`` and the quotient in float64), starting at
``round(i * ((size - P) / (n - 1)))`` for ``i = 0 .. n - 1`` (round half to even; a single window at 0 when n = 1).
Checked against nnU-Net's own function when nnunetv2 is installed, else against that rule written out below.
"""
import math

import pytest
import torch

from patchblend.inference import sliding_window_inference, sliding_windows, window_starts

try:
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
except ImportError:  # nnU-Net not installed: its rule as stated in the module docstring
    compute_steps_for_sliding_window = None

SIZES_ABOVE_PATCH = range(0, 121)  # size = P + k
PATCHES = range(1, 41)
STEPS = tuple(k / 20 for k in range(1, 21)) + (1 / 3, 0.33, 0.66, 0.85)  # 0.05, 0.1, .. 1.0 and a few more


def rule_starts(size, patch, t):
    """nnU-Net's starts along one axis: nnU-Net's function, or its rule (module docstring) in float64."""
    if compute_steps_for_sliding_window is not None:
        return tuple(compute_steps_for_sliding_window((size,), (patch,), t)[0])
    span = size - patch
    n = math.ceil(span / (patch * t)) + 1
    if n == 1:
        return (0,)
    spacing = span / (n - 1)
    return tuple(round(spacing * i) for i in range(n))  # Python's round: half to even, as numpy's


def test_exhaustive_lattice_equals_nnunet():
    cases = mismatches = overlap_mismatches = 0
    for t in STEPS:
        for patch in PATCHES:
            for k in SIZES_ABOVE_PATCH:
                size = patch + k
                expected = rule_starts(size, patch, t)
                cases += 1
                mismatches += window_starts(size, patch, style="nnunet", tile_step_size=t) != expected
                overlap_mismatches += window_starts(size, patch, 1 - t, "nnunet") != expected
    assert cases == 24 * 40 * 121 == 116_160  # (size, patch, t) combinations
    assert mismatches == 0
    # why tile_step_size exists: the overlap = 1 - t round trip moves windows in some of these cases
    assert overlap_mismatches > 0


def test_issue_example_t03_patch24_size60():
    expected = rule_starts(60, 24, 0.3)
    assert len(expected) == 7
    assert window_starts(60, 24, style="nnunet", tile_step_size=0.3) == expected
    assert len(window_starts(60, 24, 0.7, "nnunet")) == 6  # 1 - 0.7 = 0.30000000000000004


def test_grid_per_axis_tile_step_size():
    grid = sliding_windows((60, 192), (24, 80), style="nnunet", tile_step_size=(0.3, 0.5))
    assert grid.starts == (rule_starts(60, 24, 0.3), rule_starts(192, 80, 0.5))


def test_driver_uses_tile_step_size_as_given():
    x = torch.randn(1, 1, 60, 61, 20)
    seen = []

    def predictor(windows):
        seen.append(windows.shape[0])
        return windows * 2

    out = sliding_window_inference(x, (24, 24, 20), 1000, predictor, placement="nnunet", tile_step_size=0.3)
    assert seen == [len(rule_starts(60, 24, 0.3)) * len(rule_starts(61, 24, 0.3))]  # 7 x 7 x 1
    torch.testing.assert_close(out, x * 2)


@pytest.mark.parametrize("kwargs, words", [
    (dict(overlap=0.7, placement="nnunet", tile_step_size=0.3), "overlap or tile_step_size"),
    (dict(overlap=0.25, placement="nnunet", tile_step_size=0.3), "overlap or tile_step_size"),
    (dict(placement="monai", tile_step_size=0.3), "placement='nnunet'"),
    (dict(placement="nnunet", tile_step_size=0.0), "tile_step_size"),
    (dict(placement="nnunet", tile_step_size=1.5), "tile_step_size"),
    (dict(placement="nnunet", tile_step_size=(0.5, 0.5)), "tile_step_size"),
])
def test_driver_refuses_bad_tile_step_size(kwargs, words):
    x = torch.randn(1, 1, 30, 30, 30)
    with pytest.raises(ValueError, match=words):
        sliding_window_inference(x, (16, 16, 16), 4, lambda w: w, **kwargs)


def test_window_starts_refuses_mixed_arguments():
    with pytest.raises(ValueError, match="not both"):
        window_starts(60, 24, 0.7, "nnunet", tile_step_size=0.3)
    with pytest.raises(ValueError, match="style='nnunet'"):
        window_starts(60, 24, style="monai", tile_step_size=0.3)
    with pytest.raises(TypeError, match="tile_step_size"):
        window_starts(60, 24, style="nnunet", tile_step_size="half")
