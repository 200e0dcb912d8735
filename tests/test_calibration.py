"""Post-hoc calibration: collect with the network frozen, fit the heads' learned parts only."""
import copy

import pytest
import torch
from torch import nn

from patchblend import CalibratedModel, calibrate_heads, collect_calibration_data, dice_targets, fit_heads
from patchblend.calibration import CalibrationData
from patchblend.head_metrics import head_quality


class Thresholder(nn.Module):
    """A fake 'network': foreground logit = 8 * (x - 0.5); a decoder-like feature = [x, x²]; BatchNorm
    to check that eval mode is used and its statistics are left alone."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm3d(1)
        self.feat = nn.Identity()

    def forward(self, x):
        self.bn(x)
        self.feat(torch.cat([x, x * x], 1))
        return torch.cat([torch.zeros_like(x), 8 * (x - 0.5)], 1)


def windows(n, seed):
    """Windows with a bright blob (a true lesion) or a small stray bright spot (a false positive)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, 8, generator=g) * 0.3
    y = torch.zeros(n, 1, 8, 8, 8, dtype=torch.long)
    kind = torch.randint(0, 3, (n,), generator=g)
    for i in range(n):
        if kind[i] == 1:  # true lesion, predicted well
            x[i, 0, 2:6, 2:6, 2:6] = 0.9
            y[i, 0, 2:6, 2:6, 2:6] = 1
        elif kind[i] == 2:  # stray false positive: label empty, true Dice 0
            x[i, 0, 1, 1, 1:3] = 0.8
    return x, y


def test_posthoc_fit_learns_the_true_dice_and_leaves_the_network_alone():
    torch.manual_seed(0)
    net = Thresholder()
    model = CalibratedModel(net, None, "feat", example_input=torch.zeros(1, 1, 8, 8, 8), heads="aware")
    model.train()
    bn_state = copy.deepcopy(net.bn.state_dict())
    x, y = windows(96, seed=1)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 96, 16)]
    data = collect_calibration_data(model, batches)
    assert isinstance(data, CalibrationData) and len(data) == 96
    assert data.grid_target.shape == (96, 2, 2, 2) and data.patch_summary.shape == (96, 7 + 4)
    assert model.training and net.training  # flags restored
    for k, v in net.bn.state_dict().items():
        assert torch.equal(v, bn_state[k]), k  # eval mode: running statistics untouched
    with torch.no_grad():
        prob = torch.softmax(net.eval()(x), 1)
    torch.testing.assert_close(data.patch_target, dice_targets(prob, y)[0])
    backbone_state = copy.deepcopy(net.state_dict())
    history = fit_heads(model.patch_head, model.grid_head, data, epochs=150, lr=1e-2)
    assert history["patch_mse"][-1] < 0.2 * history["patch_mse"][0]
    assert not model.patch_head.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, backbone_state[k]), k
    xt, yt = windows(60, seed=2)  # held-out windows
    with torch.no_grad():
        model.eval()
        out = model(xt)
    true_patch, _ = dice_targets(torch.softmax(out.seg, 1), yt)
    q = head_quality(out.patch, true_patch)
    assert q["auroc"] > 0.95 and q["corr"] > 0.9


def test_calibrate_heads_paper_kind_and_one_call():
    torch.manual_seed(0)
    net = Thresholder()
    model = CalibratedModel(net, "bn", "feat", example_input=torch.zeros(1, 1, 8, 8, 8))
    x, y = windows(32, seed=3)
    report = calibrate_heads(model, [(x, y)], epochs=3, batch_size=8)
    assert report["windows"] == 32 and len(report["patch_mse"]) == 3 and len(report["grid_mse"]) == 3


def test_fit_heads_skips_a_head_and_checks_arguments():
    data = CalibrationData(torch.randn(10, 3), torch.rand(10), torch.randn(10, 5, 2, 2, 2), torch.rand(10, 2, 2, 2))
    from patchblend import AwarePatchHead

    head = AwarePatchHead(1)  # 7 + 2 = 9 features: does not match 3
    with pytest.raises(ValueError, match="patch_head .AwarePatchHead. cannot read the cached patch summaries"):
        fit_heads(head, None, data, epochs=1)
    head = nn.Module()
    with pytest.raises(TypeError, match="data must be"):
        fit_heads(None, None, (1, 2, 3, 4), epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        fit_heads(None, None, data, epochs=-1)
    with pytest.raises(ValueError, match="batch_size"):
        fit_heads(None, None, data, batch_size=0)
    assert fit_heads(None, None, data, epochs=2) == {"patch_mse": [], "grid_mse": []}
    with pytest.raises(TypeError, match="calibration_inputs"):
        collect_calibration_data(nn.Linear(1, 1), [])
    with pytest.raises(ValueError, match="empty"):
        collect_calibration_data(CalibratedModel(Thresholder(), None, "feat", channels=(1, 2), heads="aware"), [])


def _aware_data(n=48, seed=4, faint=False, **kw):
    torch.manual_seed(0)
    model = CalibratedModel(Thresholder(), None, "feat", example_input=torch.zeros(1, 1, 8, 8, 8), heads="aware")
    x, y = windows(n, seed=seed)
    if faint:  # every third window: a labelled lesion at x = 0.45, probability 0.40 (above 0.3, below 0.5)
        x[::3, 0, 3:6, 3:6, 3:6] = 0.45
        y[::3, 0, 3:6, 3:6, 3:6] = 1
    return model, x, y, collect_calibration_data(model, [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)], **kw)


def test_collect_calibration_data_uses_its_threshold():
    """The targets are the Dice of prob > threshold: 0.3 and 0.5 give different targets, each equal to
    dice_targets at that threshold."""
    model, x, y, at_half = _aware_data(faint=True)
    _, _, _, at_03 = _aware_data(threshold=0.3, faint=True)
    with torch.no_grad():
        prob = torch.softmax(model.backbone.eval()(x), 1)
    for data, threshold in ((at_half, 0.5), (at_03, 0.3)):
        patch, grid = dice_targets(prob, y, threshold=threshold)
        torch.testing.assert_close(data.patch_target, patch)
        torch.testing.assert_close(data.grid_target, grid)
    assert not torch.equal(at_half.patch_target, at_03.patch_target)
    assert not torch.equal(at_half.grid_target, at_03.grid_target)


def test_fit_heads_reports_the_per_cell_mean_grid_mse():
    """history["grid_mse"][-1] is the fitted grid head's MSE averaged over windows and cells (grid_reduction
    "mean"; "sum" is that times the 8 cells), and patch_mse the patch head's MSE over windows."""
    model, _, _, data = _aware_data()
    for reduction, cells in (("mean", 1), ("sum", 8)):
        history = fit_heads(model.patch_head, model.grid_head, data, epochs=3, grid_reduction=reduction)
        with torch.no_grad():
            grid_mse = (model.grid_head.predict(data.grid_summary) - data.grid_target).square().mean()
            patch_mse = (model.patch_head.predict(data.patch_summary) - data.patch_target).square().mean()
        assert history["grid_mse"][-1] == pytest.approx(cells * float(grid_mse), rel=1e-5)
        assert history["patch_mse"][-1] == pytest.approx(float(patch_mse), rel=1e-5)


def test_fit_heads_with_the_heads_swapped_names_the_argument():
    model, _, _, data = _aware_data()
    with pytest.raises(ValueError, match="patch_head .AwareGridHead.*swapped"):
        fit_heads(model.grid_head, model.patch_head, data, epochs=1)
    with pytest.raises(ValueError, match="grid_head .AwarePatchHead.*swapped"):
        fit_heads(None, model.patch_head, data, epochs=1)
