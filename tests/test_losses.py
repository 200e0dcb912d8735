"""calibration_loss, soft_dice_loss, tversky_loss: hand-worked values, gradients, empty inputs, errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchblend.heads import GridHead, PatchHead
from patchblend.losses import calibration_loss, soft_dice_loss, tversky_loss
from patchblend.targets import dice_targets


# ---------------------------------------------------------------- calibration_loss (Eq. 4-6)

def test_calibration_loss_values():
    patch_pred = torch.tensor([0.5, 1.0])
    patch_target = torch.tensor([1.0, 1.0])
    grid_pred = torch.zeros(2, 2, 2, 2)
    grid_target = torch.ones(2, 2, 2, 2)
    grid_target[:, 0, 0, 0] = 0.0  # one cell predicted exactly
    # L_patch = (0.25 + 0) / 2 = 0.125;  L_grid = Σ over 8 cells of the batch MSE = 7 (paper, Eq. 5)
    assert calibration_loss(patch_pred, patch_target).item() == 0.125
    assert calibration_loss(patch_pred, patch_target, grid_pred, grid_target).item() == 0.125 + 7.0
    assert calibration_loss(patch_pred, patch_target, grid_pred, grid_target, lambda_patch=2.0,
                            lambda_grid=0.5).item() == 0.25 + 3.5
    assert calibration_loss(patch_pred, patch_target, grid_pred, grid_target,
                            grid_reduction="mean").item() == 0.125 + 7.0 / 8


def test_calibration_loss_reaches_every_head_parameter():
    torch.manual_seed(0)
    patch_head, grid_head = PatchHead(8), GridHead(4)
    bottleneck = torch.randn(3, 8, 2, 2, 2)
    decoder = torch.randn(3, 4, 8, 8, 8)
    seg_prob = torch.rand(3, 1, 8, 8, 8, requires_grad=True)
    label = torch.rand(3, 1, 8, 8, 8) > 0.7
    patch_t, grid_t = dice_targets(seg_prob, label)
    loss = calibration_loss(patch_head(bottleneck), patch_t, grid_head(decoder), grid_t)
    loss.backward()
    for name, p in list(patch_head.named_parameters()) + list(grid_head.named_parameters()):
        assert p.grad is not None, name
        assert bool(p.grad.abs().sum() > 0), name
    assert seg_prob.grad is None  # the targets are constants


def test_stage_one_leaves_the_grid_head_out():
    grid_head = GridHead(4)
    patch_pred = torch.rand(2, requires_grad=True)
    loss = calibration_loss(patch_pred, torch.ones(2), grid_head(torch.randn(2, 4, 4, 4, 4)), torch.ones(2, 2, 2, 2),
                            lambda_patch=1.0, lambda_grid=0.0)
    loss.backward()
    assert patch_pred.grad is not None
    assert all(p.grad is None for p in grid_head.parameters())


def test_calibration_loss_detaches_targets():
    pred = torch.rand(4, requires_grad=True)
    target = torch.rand(4, requires_grad=True)
    calibration_loss(pred, target).backward()
    assert pred.grad is not None and target.grad is None


def test_calibration_loss_empty_batch():
    pred = torch.zeros(0, requires_grad=True)
    grid = torch.zeros(0, 2, 2, 2, requires_grad=True)
    loss = calibration_loss(pred, torch.zeros(0), grid, torch.zeros(0, 2, 2, 2))
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad.shape == (0,)


def test_calibration_loss_errors():
    p = torch.rand(3)
    with pytest.raises(ValueError, match="patch_target"):
        calibration_loss(p, p[:, None])  # [B] vs [B, 1] must not broadcast
    with pytest.raises(ValueError, match="patch_pred"):
        calibration_loss(p[:, None], p[:, None])
    with pytest.raises(TypeError, match="patch_target"):
        calibration_loss(p, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="grid_target"):
        calibration_loss(p, p, torch.rand(3, 2, 2, 2))
    with pytest.raises(ValueError, match="grid_pred"):
        calibration_loss(p, p, torch.rand(2, 2, 2, 2), torch.rand(2, 2, 2, 2))
    with pytest.raises(ValueError, match="lambda_grid"):
        calibration_loss(p, p, lambda_grid=-1.0)
    with pytest.raises(ValueError, match="lambda_patch"):
        calibration_loss(p, p, lambda_patch=float("nan"))
    with pytest.raises(ValueError, match="grid_reduction"):
        calibration_loss(p, p, grid_reduction="max")


# ---------------------------------------------------------------- soft Dice and Tversky

def flat(values):
    """[1, 1, 1, 1, n] tensor from a list."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 1, 1, -1)


def test_soft_dice_values():
    pred, target = flat([0.5, 0.5, 0.0, 0.0]), flat([1.0, 0.0, 0.0, 0.0])
    # 1 - 2·0.5 / (1 + 1) = 0.5
    torch.testing.assert_close(soft_dice_loss(pred, target, smooth=0.0), torch.tensor(0.5))
    # squared denominators: 1 - 2·0.5 / (0.5 + 1)
    torch.testing.assert_close(soft_dice_loss(pred, target, smooth=0.0, squared=True), torch.tensor(1 - 1 / 1.5))
    assert soft_dice_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(1 - target, target, smooth=0.0).item() == 1.0


def test_batch_dice_pools_the_batch():
    pred = torch.cat([flat([1.0, 0.0]), flat([1.0, 0.0])])
    target = torch.cat([flat([1.0, 0.0]), flat([0.0, 0.0])])
    # per sample: mean(1 - 1, 1 - 0) = 0.5;  batch: 1 - 2·1 / (2 + 1) = 1/3
    torch.testing.assert_close(soft_dice_loss(pred, target, smooth=0.0), torch.tensor(0.5))
    torch.testing.assert_close(soft_dice_loss(pred, target, smooth=0.0, batch=True), torch.tensor(1 / 3))


@pytest.mark.parametrize("loss_fn", [soft_dice_loss, tversky_loss])
@pytest.mark.parametrize("smooth", [0.0, 1e-5])
@pytest.mark.parametrize("batch", [False, True])
def test_finite_on_empty_patches_and_empty_batches(loss_fn, smooth, batch):
    for b in (0, 2):
        pred = torch.zeros(b, 1, 4, 4, 4, requires_grad=True)
        loss = loss_fn(pred, torch.zeros(b, 1, 4, 4, 4), smooth=smooth, batch=batch)
        assert loss.item() == 0.0  # nothing to find and nothing found: perfect
        loss.backward()
        assert bool(torch.isfinite(pred.grad).all())


@pytest.mark.parametrize("loss_fn", [soft_dice_loss, tversky_loss])
def test_empty_label_pushes_false_positives_down(loss_fn):
    pred = torch.full((1, 1, 4, 4, 4), 1e-3, requires_grad=True)
    loss = loss_fn(pred, torch.zeros(1, 1, 4, 4, 4), smooth=1.0)
    assert 0.0 < loss.item() < 1.0
    loss.backward()
    assert bool((pred.grad > 0).all())  # gradient descent lowers every probability


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), k=st.integers(1, 3), batch=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_tversky_with_equal_weights_is_soft_dice(b, k, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.rand(b, k, 3, 4, 5, generator=gen, dtype=torch.float64)
    target = (torch.rand(b, k, 3, 4, 5, generator=gen) > 0.6).double()
    torch.testing.assert_close(
        tversky_loss(pred, target, alpha=0.5, beta=0.5, smooth=1e-3, batch=batch),
        soft_dice_loss(pred, target, smooth=2e-3, batch=batch),
    )


def test_tversky_weighs_false_positives_by_alpha():
    target = flat([1.0, 1.0, 0.0, 0.0])
    fp_only = flat([1.0, 1.0, 1.0, 0.0])  # TP 2, FP 1
    fn_only = flat([1.0, 0.0, 0.0, 0.0])  # TP 1, FN 1
    torch.testing.assert_close(tversky_loss(fp_only, target, alpha=0.3, beta=0.7, smooth=0.0),
                               torch.tensor(1 - 2 / (2 + 0.3)))
    torch.testing.assert_close(tversky_loss(fn_only, target, alpha=0.3, beta=0.7, smooth=0.0),
                               torch.tensor(1 - 1 / (1 + 0.7)))


@pytest.mark.parametrize("loss_fn", [soft_dice_loss, tversky_loss])
def test_multiclass_ignores_background(loss_fn):
    torch.manual_seed(4)
    prob = torch.softmax(torch.randn(2, 3, 4, 4, 4), dim=1)
    labels = torch.randint(0, 3, (2, 4, 4, 4))
    base = loss_fn(prob, labels)
    changed = prob.clone()
    changed[:, 0] = torch.rand(2, 4, 4, 4)
    torch.testing.assert_close(loss_fn(changed, labels), base)
    one_hot = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float()
    torch.testing.assert_close(loss_fn(prob, one_hot), base)


def test_segmentation_loss_errors():
    pred = torch.rand(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="target"):
        soft_dice_loss(pred, torch.rand(1, 1, 4, 4, 3))
    with pytest.raises(TypeError, match="pred"):
        soft_dice_loss(pred.long(), pred)
    with pytest.raises(ValueError, match="smooth"):
        soft_dice_loss(pred, pred, smooth=-1e-5)
    with pytest.raises(ValueError, match="alpha"):
        tversky_loss(pred, pred, alpha=-0.1)
    with pytest.raises(TypeError, match="beta"):
        tversky_loss(pred, pred, beta=None)
