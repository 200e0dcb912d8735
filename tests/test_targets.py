"""dice_targets: hand-worked cases per patch and per cell, odd patch sizes, a brute-force oracle,
multi-class conventions, detachment, errors."""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchblend.targets import dice_targets

ALL_ONES = torch.ones(2, 2, 2)


def masks(shape=(4, 4, 4)):
    return torch.zeros(1, 1, *shape), torch.zeros(1, 1, *shape)


def test_perfect_prediction():
    pred, target = masks()
    target[0, 0, 0:2, 0:2, 0:1] = 1
    pred[0, 0, 0:2, 0:2, 0:1] = 0.9
    patch, grid = dice_targets(pred, target)
    assert patch.tolist() == [1.0]
    torch.testing.assert_close(grid[0], ALL_ONES)


def test_false_positive_only():
    pred, target = masks()
    pred[0, 0, 0, 0, 0] = 0.8  # cell (0, 0, 0)
    patch, grid = dice_targets(pred, target)
    assert patch.tolist() == [0.0]
    expected = ALL_ONES.clone()
    expected[0, 0, 0] = 0.0  # the other seven cells are empty in both: 1
    torch.testing.assert_close(grid[0], expected)


def test_missed_lesion():
    pred, target = masks()
    target[0, 0, 3, 3, 2:4] = 1  # cell (1, 1, 1)
    pred[0, 0, 3, 3, 2:4] = 0.4  # below the threshold
    patch, grid = dice_targets(pred, target)
    assert patch.tolist() == [0.0]
    expected = ALL_ONES.clone()
    expected[1, 1, 1] = 0.0
    torch.testing.assert_close(grid[0], expected)


def test_partial_overlap():
    pred, target = masks()
    target[0, 0, 0, 0, 0:2] = 1  # two voxels in cell (0, 0, 0)
    pred[0, 0, 0, 0, 0] = 1  # one of them ...
    pred[0, 0, 3, 3, 3] = 1  # ... and a false positive in cell (1, 1, 1)
    patch, grid = dice_targets(pred, target)
    # patch: 2·1 / (2 + 2) = 0.5;  cell (0,0,0): 2·1 / (1 + 2) = 2/3;  cell (1,1,1): 0
    torch.testing.assert_close(patch, torch.tensor([0.5]))
    expected = ALL_ONES.clone()
    expected[0, 0, 0] = 2 / 3
    expected[1, 1, 1] = 0.0
    torch.testing.assert_close(grid[0], expected)


def test_both_empty_scores_one():
    pred, target = masks()
    pred += 0.3  # below the threshold everywhere
    patch, grid = dice_targets(pred, target)
    assert patch.tolist() == [1.0]
    torch.testing.assert_close(grid[0], ALL_ONES)


def test_odd_patch_sizes_give_unequal_cells():
    # P = (5, 3, 4), g = 2: axis 0 cells {0,1,2} {3,4}; axis 1 cells {0,1} {2}; axis 2 {0,1} {2,3}.
    pred, target = masks((5, 3, 4))
    pred[0, 0, 2, 1, 1] = 1  # cell (0, 0, 0): voxel 2 of 5 belongs to cell 0 only
    target[0, 0, 2, 1, 1] = 1
    target[0, 0, 3, 2, 2] = 1  # cell (1, 1, 1), missed
    pred[0, 0, 2, 2, 0] = 1  # cell (0, 1, 0): voxel 2 of 3 is cell 1; a false positive
    patch, grid = dice_targets(pred, target)
    torch.testing.assert_close(patch, torch.tensor([2 * 1 / (2 + 2)]))
    expected = ALL_ONES.clone()
    expected[1, 1, 1] = 0.0
    expected[0, 1, 0] = 0.0
    torch.testing.assert_close(grid[0], expected)


def test_batch_entries_are_scored_independently():
    pred, target = torch.zeros(3, 1, 4, 4, 4), torch.zeros(3, 1, 4, 4, 4)
    pred[0, 0, 0, 0, 0] = 1  # FP only
    target[1, 0, 0, 0, 0] = 1  # missed
    pred[2, 0, 1, 1, 1] = target[2, 0, 1, 1, 1] = 1  # perfect
    patch, grid = dice_targets(pred, target)
    assert patch.tolist() == [0.0, 0.0, 1.0]
    assert grid[:, 0, 0, 0].tolist() == [0.0, 0.0, 1.0]
    assert bool((grid[:, 1, 1, 1] == 1).all())


def test_threshold_is_strict_and_adjustable():
    pred, target = masks()
    target[0, 0, 0, 0, 0] = 1
    pred[0, 0, 0, 0, 0] = 0.5
    assert dice_targets(pred, target)[0].tolist() == [0.0]  # 0.5 is not > 0.5
    assert dice_targets(pred, target, threshold=0.3)[0].tolist() == [1.0]


def test_soft_dice():
    pred, target = masks()
    target[0, 0, 0, 0, 0] = 1
    pred[0, 0, 0, 0, 0] = 0.5
    pred[0, 0, 3, 3, 3] = 0.25
    patch, grid = dice_targets(pred, target, soft=True)
    # 2·0.5 / (0.75 + 1)
    torch.testing.assert_close(patch, torch.tensor([1.0 / 1.75]))
    torch.testing.assert_close(grid[0, 0, 0, 0], torch.tensor(1.0 / 1.5))  # 2·0.5 / (0.5 + 1)
    torch.testing.assert_close(grid[0, 1, 1, 1], torch.tensor(0.0))  # soft FP only


def test_soft_empty_label_needs_smoothing():
    pred, target = masks()
    pred += 1e-4
    assert dice_targets(pred, target, soft=True)[0].tolist() == [0.0]
    patch, _ = dice_targets(pred, target, soft=True, smooth=1.0)
    torch.testing.assert_close(patch, torch.tensor([1.0 / (1 + 64e-4)]))


def test_targets_carry_no_gradient():
    pred = torch.rand(2, 1, 4, 4, 4, requires_grad=True)
    target = torch.rand(2, 1, 4, 4, 4) > 0.5
    for soft in (False, True):
        patch, grid = dice_targets(pred, target, soft=soft)
        assert not patch.requires_grad and patch.grad_fn is None
        assert not grid.requires_grad and grid.grad_fn is None


def test_multiclass_channel_zero_is_background():
    # K = 3: class 1 perfect, class 2 a false positive only → mean over foreground classes = 0.5.
    labels = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    labels[0, 0, 0, 0] = 1
    pred = torch.zeros(1, 3, 4, 4, 4)
    pred[:, 0] = 1.0
    pred[0, :, 0, 0, 0] = torch.tensor([0.0, 1.0, 0.0])
    pred[0, :, 3, 3, 3] = torch.tensor([0.0, 0.0, 1.0])  # class 2 where the label is background
    patch, grid = dice_targets(pred, labels)
    assert patch.tolist() == [0.5]
    assert grid[0, 0, 0, 0].item() == 1.0  # class 1 perfect, class 2 empty in both
    assert grid[0, 1, 1, 1].item() == 0.5  # class 1 empty in both, class 2 FP only
    # the label map [B, 1, *P], [B, *P] and the one-hot form agree
    one_hot = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1)
    for form in (labels[:, None], one_hot, one_hot.float()):
        p2, g2 = dice_targets(pred, form)
        torch.testing.assert_close(p2, patch)
        torch.testing.assert_close(g2, grid)
    # the background channel plays no part
    pred_bg = pred.clone()
    pred_bg[:, 0] = 0.0
    torch.testing.assert_close(dice_targets(pred_bg, labels)[0], patch)


def test_two_class_softmax_equals_single_foreground_channel():
    torch.manual_seed(3)
    prob = torch.softmax(torch.randn(2, 2, 5, 6, 4), dim=1)
    target = torch.rand(2, 5, 6, 4) > 0.6
    a = dice_targets(prob, target.long())
    b = dice_targets(prob[:, 1:], target[:, None].float())
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def brute_force(pred, target, grid, threshold, soft):
    """Per-voxel loops in numpy, cells by k*g//P: the specification, written the slow way."""
    pred, target = pred.numpy(), target.numpy()
    b, _, *size = pred.shape
    p = pred[:, 0] if soft else (pred[:, 0] > threshold).astype(np.float64)
    t = target[:, 0] if soft else (target[:, 0] > 0.5).astype(np.float64)
    inter = np.zeros((b, *grid))
    tot = np.zeros((b, *grid))
    for i in range(b):
        for v in itertools.product(*(range(s) for s in size)):
            cell = tuple(k * g // s for k, g, s in zip(v, grid, size))
            inter[(i,) + cell] += p[(i,) + v] * t[(i,) + v]
            tot[(i,) + cell] += p[(i,) + v] + t[(i,) + v]
    dice = lambda num, den: np.where(den > 0, 2 * num / np.where(den > 0, den, 1), 1.0)  # noqa: E731
    axes = tuple(range(1, 1 + len(grid)))
    return dice(inter.sum(axes), tot.sum(axes)), dice(inter, tot)


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(0, 2),
    size=st.lists(st.integers(1, 5), min_size=2, max_size=3),
    soft=st.booleans(),
    threshold=st.sampled_from([0.3, 0.5, 0.7]),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_matches_brute_force(b, size, soft, threshold, seed, data):
    grid = tuple(data.draw(st.integers(1, s)) for s in size)
    gen = torch.Generator().manual_seed(seed)
    pred = torch.rand(b, 1, *size, generator=gen, dtype=torch.float64)
    target = (torch.rand(b, 1, *size, generator=gen) > 0.7).double()
    patch, cells = dice_targets(pred, target, grid=grid, threshold=threshold, soft=soft)
    want_patch, want_cells = brute_force(pred, target, grid, threshold, soft)
    assert patch.shape == (b,) and cells.shape == (b, *grid)
    assert patch.dtype == torch.float64
    np.testing.assert_allclose(patch.numpy(), want_patch, rtol=1e-12)
    np.testing.assert_allclose(cells.numpy(), want_cells, rtol=1e-12)


def test_empty_batch_and_2d():
    patch, grid = dice_targets(torch.zeros(0, 1, 4, 4, 4), torch.zeros(0, 1, 4, 4, 4))
    assert patch.shape == (0,) and grid.shape == (0, 2, 2, 2)
    patch, grid = dice_targets(torch.ones(2, 1, 6, 6), torch.ones(2, 6, 6), grid=(3, 2))
    assert patch.tolist() == [1.0, 1.0] and grid.shape == (2, 3, 2)
    assert dice_targets(torch.rand(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4), grid=1)[1].shape == (1, 1, 1, 1)


def test_errors_name_the_argument():
    pred = torch.rand(1, 1, 4, 4, 4)
    with pytest.raises(TypeError, match="pred"):
        dice_targets(pred.long(), pred)
    with pytest.raises(ValueError, match="pred"):
        dice_targets(torch.rand(4, 4, 4), torch.rand(4, 4, 4))
    with pytest.raises(TypeError, match="target"):
        dice_targets(pred, pred.numpy())
    with pytest.raises(ValueError, match="target"):
        dice_targets(pred, torch.rand(1, 1, 4, 4, 5))
    with pytest.raises(ValueError, match="target"):
        dice_targets(torch.rand(1, 3, 4, 4, 4), torch.full((1, 1, 4, 4, 4), 3))  # class 3 of K=3
    with pytest.raises(ValueError, match="target"):
        dice_targets(torch.rand(1, 3, 4, 4, 4), torch.full((1, 1, 4, 4, 4), 0.5))  # not an index
    with pytest.raises(ValueError, match="target"):
        dice_targets(torch.rand(1, 3, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="grid"):
        dice_targets(pred, pred, grid=(2, 2, 5))
    with pytest.raises(ValueError, match="grid"):
        dice_targets(pred, pred, grid=(2, 2))
    with pytest.raises(TypeError, match="threshold"):
        dice_targets(pred, pred, threshold="0.5")
    with pytest.raises(ValueError, match="smooth"):
        dice_targets(pred, pred, smooth=-1.0)
    with pytest.raises(TypeError, match="soft"):
        dice_targets(pred, pred, soft=1)
