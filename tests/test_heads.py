"""PatchHead / GridHead: shapes, ranges, parameter counts, the cell rule of the grid pooling, errors."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from patchblend.heads import GridHead, PatchHead


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_reconstruction_of_the_paper():
    # docs/design.md#cib-heads: Linear(256, 1) = 257; Conv3d(16, 16, 3) = 16·16·27 + 16 = 6928, Linear(16, 1) = 17.
    assert n_params(PatchHead(256)) == 257
    assert n_params(GridHead(16)) == 6945
    assert n_params(PatchHead(256)) + n_params(GridHead(16)) == 7202  # paper: "7.35 K"
    assert n_params(GridHead(16, hidden_channels=8)) == 16 * 8 * 27 + 8 + 8 + 1


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(0, 3),
    c=st.integers(1, 4),
    sizes=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)),
    data=st.data(),
)
def test_output_shapes_and_range(b, c, sizes, data):
    grid = tuple(data.draw(st.integers(1, s)) for s in sizes)
    torch.manual_seed(0)
    x = torch.randn(b, c, *sizes) * 3
    patch = PatchHead(c)(x)
    cells = GridHead(c, grid=grid)(x)
    assert patch.shape == (b,)
    assert cells.shape == (b, *grid)
    for out in (patch, cells):
        assert out.dtype == torch.float32
        assert bool(((out > 0) & (out < 1)).all())


def test_patch_head_is_pool_linear_sigmoid():
    torch.manual_seed(1)
    head = PatchHead(3)
    x = torch.randn(2, 3, 4, 5, 6)
    expected = torch.sigmoid(x.mean(dim=(2, 3, 4)) @ head.fc.weight[0] + head.fc.bias[0])
    torch.testing.assert_close(head(x), expected)


def test_grid_head_equals_adaptive_pooling_when_sizes_divide():
    torch.manual_seed(2)
    head = GridHead(4, grid=(2, 2, 2))
    x = torch.randn(3, 4, 6, 4, 8)
    h = torch.relu(head.conv(x))
    expected = torch.sigmoid(head.fc(F.adaptive_avg_pool3d(h, (2, 2, 2)).movedim(1, -1))).squeeze(-1)
    torch.testing.assert_close(head(x), expected)


def identity_grid_head(channels, grid):
    """A GridHead whose conv is the identity and whose linear layer sums the channels, so its output
    is sigmoid(Σ_c mean over the cell of relu(x_c))."""
    head = GridHead(channels, grid=grid)
    with torch.no_grad():
        head.conv.weight.zero_()
        head.conv.bias.zero_()
        for ch in range(channels):
            head.conv.weight[ch, ch, 1, 1, 1] = 1.0
        head.fc.weight.fill_(1.0)
        head.fc.bias.zero_()
    return head


def test_grid_head_cells_follow_the_blend_rule_on_odd_sizes():
    # Axis of 5 voxels in 2 cells: k*g//P puts voxels 0,1,2 in cell 0 and 3,4 in cell 1 (adaptive
    # pooling would put voxel 2 in both). Axis of 3 in 2 cells: {0, 1} and {2}.
    head = identity_grid_head(1, (2, 2, 1))
    x = torch.zeros(1, 1, 5, 3, 2)
    x[0, 0, 2, 0, 0] = 6.0  # cell (0, 0, 0), which holds 3·2·2 = 12 voxels
    x[0, 0, 3, 2, 1] = 4.0  # cell (1, 1, 0), which holds 2·1·2 = 4 voxels
    out = head(x)
    expected_means = torch.tensor([[[6.0 / 12], [0.0]], [[0.0], [4.0 / 4]]])
    torch.testing.assert_close(out[0], torch.sigmoid(expected_means))


def test_grid_int_means_every_axis():
    assert GridHead(2, grid=3)(torch.randn(1, 2, 3, 4, 5)).shape == (1, 3, 3, 3)


def test_heads_pass_gradients_to_the_feature():
    x = torch.randn(2, 4, 4, 4, 4, requires_grad=True)
    (PatchHead(4)(x).sum() + GridHead(4)(x).sum()).backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


@pytest.mark.parametrize("make", [PatchHead, GridHead])
def test_feature_errors(make):
    head = make(4)
    with pytest.raises(ValueError, match="in_channels=4"):
        head(torch.randn(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="5D"):
        head(torch.randn(1, 4, 4, 4))
    with pytest.raises(TypeError, match="feature"):
        head([1.0, 2.0])


@pytest.mark.parametrize("make", [PatchHead, GridHead])
def test_constructor_errors(make):
    with pytest.raises(ValueError, match="in_channels"):
        make(0)
    with pytest.raises(TypeError, match="in_channels"):
        make(4.0)


def test_grid_errors():
    with pytest.raises(ValueError, match="grid"):
        GridHead(4, grid=(2, 2))
    with pytest.raises(ValueError, match="grid"):
        GridHead(4, grid=(2, 0, 2))
    with pytest.raises(TypeError, match="grid"):
        GridHead(4, grid=(2, 2.5, 2))
    with pytest.raises(TypeError, match="hidden_channels"):
        GridHead(4, hidden_channels="8")
    with pytest.raises(ValueError, match="feature size"):
        GridHead(4, grid=(2, 2, 2))(torch.randn(1, 4, 4, 1, 4))


# ---------------------------------------------------------------------------------------------
# Prediction-aware heads
# ---------------------------------------------------------------------------------------------
from patchblend.heads import (PREDICTION_STATISTICS, AwareGridHead, AwarePatchHead,  # noqa: E402
                              prediction_statistics)


def test_prediction_statistics_by_hand():
    p = torch.zeros(1, 1, 4, 4, 4)
    p[0, 0, 0, 0, 0] = 0.95  # one confident voxel in cell (0, 0, 0)
    p[0, 0, 0, 0, 1] = 0.6  # one uncertain foreground voxel, same cell
    p[0, 0, 3, 3, 3] = 0.3  # one uncertain background voxel in cell (1, 1, 1)
    s = prediction_statistics(p)
    assert s.shape == (1, len(PREDICTION_STATISTICS))
    mean, mx, frac_fg, frac_unc, log_fg, log_unc, mean_fg = s[0].tolist()
    assert mean == pytest.approx((0.95 + 0.6 + 0.3) / 64)
    assert mx == pytest.approx(0.95)
    assert frac_fg == pytest.approx(2 / 64) and frac_unc == pytest.approx(2 / 64)
    assert log_fg == pytest.approx(torch.log1p(torch.tensor(2.0)).item())
    assert log_unc == pytest.approx(torch.log1p(torch.tensor(2.0)).item())
    assert mean_fg == pytest.approx((0.95 + 0.6) / 2)
    c = prediction_statistics(p, grid=2)
    assert c.shape == (1, 7, 2, 2, 2)
    assert c[0, 1, 0, 0, 0] == pytest.approx(0.95) and c[0, 1, 1, 1, 1] == pytest.approx(0.3)
    assert c[0, 2, 0, 0, 0] == pytest.approx(2 / 8) and c[0, 2, 1, 1, 1] == 0
    assert c[0, 3, 1, 1, 1] == pytest.approx(1 / 8) and c[0, 6, 1, 1, 1] == 0  # no foreground: mean_fg 0
    assert (c[0, :, 0, 1, 0] == 0).all()  # an empty cell


def test_prediction_statistics_threshold_is_strict():
    p = torch.full((1, 1, 2, 2, 2), 0.5)
    s = prediction_statistics(p)[0]
    assert s[2] == 0 and s[4] == 0  # 0.5 is not foreground (p > 0.5, as dice_targets)
    assert s[3] == 1  # but it is uncertain


@settings(max_examples=20, deadline=None)
@given(sizes=st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7)), data=st.data())
def test_cell_statistics_follow_the_blend_rule(sizes, data):
    """Per-cell statistics equal those of the voxels k with k * g // S == cell, for unequal cells too."""
    grid = tuple(data.draw(st.integers(1, s)) for s in sizes)
    torch.manual_seed(0)
    p = torch.rand(2, 1, *sizes)
    c = prediction_statistics(p, grid)
    idx = [torch.arange(s) * g // s for s, g in zip(sizes, grid)]
    for cell in [(0, 0, 0), tuple(g - 1 for g in grid)]:
        sel = p[:, 0][:, idx[0] == cell[0]][:, :, idx[1] == cell[1]][:, :, :, idx[2] == cell[2]]
        sel = sel.reshape(2, 1, *sel.shape[1:])
        torch.testing.assert_close(c[(slice(None), slice(None)) + cell], prediction_statistics(sel))


def test_aware_heads_shapes_parameters_and_detach():
    torch.manual_seed(0)
    prob = torch.rand(3, 1, 8, 8, 8, requires_grad=True)
    feature = torch.randn(3, 4, 4, 4, 4, requires_grad=True)
    ph, gh = AwarePatchHead(4), AwareGridHead(4, grid=2)
    f = 7 + 8
    assert n_params(ph) == 2 * f + f * 16 + 16 + 16 + 1
    assert n_params(gh) == 2 * (f + 7) + (f + 7) * 16 + 16 + 16 + 1
    patch, grid = ph(prob, feature), gh(prob, feature)
    assert patch.shape == (3,) and grid.shape == (3, 2, 2, 2)
    assert bool(((patch > 0) & (patch < 1)).all()) and bool(((grid > 0) & (grid < 1)).all())
    (patch.sum() + grid.sum()).backward()
    assert prob.grad is None and feature.grad is None  # detached: the network is never changed
    assert all(p.grad is not None for p in ph.parameters())
    feature.grad = None
    AwarePatchHead(4, detach=False)(prob, feature).sum().backward()
    assert feature.grad is not None and prob.grad is None  # statistics are never differentiated


def test_aware_heads_see_stray_voxels():
    """The point of the design: two windows with the same feature, one with a stray foreground voxel,
    get different summaries (a bottleneck average cannot tell them apart)."""
    feature = torch.zeros(2, 2, 4, 4, 4)
    prob = torch.zeros(2, 1, 8, 8, 8)
    prob[1, 0, 6, 6, 6] = 0.9
    s = AwarePatchHead(2).summarize(prob, feature)
    assert not torch.equal(s[0], s[1])
    g = AwareGridHead(2).summarize(prob, feature)
    assert not torch.equal(g[1, :7, 1, 1, 1], g[1, :7, 0, 0, 0])  # the cell holding it differs


def test_aware_heads_errors():
    with pytest.raises(ValueError, match="prob must be"):
        AwarePatchHead(2)(torch.rand(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        AwareGridHead(2)(torch.rand(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="batch sizes"):
        AwarePatchHead(2)(torch.rand(2, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="grid"):
        AwareGridHead(2, grid=4)(torch.rand(1, 1, 4, 4, 4), torch.zeros(1, 2, 2, 2, 2))
    with pytest.raises(TypeError, match="hidden"):
        AwarePatchHead(2, hidden=1.5)


def test_split_heads_equal_their_forward():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 4, 4, 4)
    for head in (PatchHead(3), GridHead(3)):
        torch.testing.assert_close(head.predict(head.summarize(x)), head(x))
