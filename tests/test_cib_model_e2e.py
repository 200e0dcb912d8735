"""The CIB example's model, training loop, blendings and the tiny end-to-end demo."""
import csv
import os

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("nibabel")
pytest.importorskip("nilearn")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from patchblend.examples.cib.data import Case  # noqa: E402
from patchblend.examples.cib.demo import PRESETS, DemoConfig, run_demo  # noqa: E402
from patchblend.examples.cib.evaluate import BLENDINGS, head_calibration, predict_case  # noqa: E402
from patchblend.examples.cib.model import CIBOutput, CIBVNet  # noqa: E402
from patchblend.examples.cib.train import TrainConfig, compute_losses, load_checkpoint, train  # noqa: E402
from patchblend.heads import GridHead, PatchHead  # noqa: E402


def test_full_size_parameter_count():
    m = CIBVNet(width=16)
    total = sum(p.numel() for p in m.parameters())
    heads = sum(p.numel() for p in m.head_parameters())
    assert total == pytest.approx(9.48e6, rel=0.01)  # DESIGN §6: 9.48 M
    assert heads == pytest.approx(7.35e3, rel=0.03)  # the paper: 7.35 K for both heads
    assert isinstance(m.patch_head, PatchHead) and isinstance(m.grid_head, GridHead)
    assert m.patch_head.in_channels == 256 and m.grid_head.in_channels == 16


def test_small_model_outputs():
    m = CIBVNet(width=2).eval()
    out = m(torch.randn(2, 3, 16, 32, 16))
    assert isinstance(out, CIBOutput)
    assert out.logits.shape == (2, 3, 2, 16, 32, 16)
    assert out.patch.shape == (2,) and out.grid.shape == (2, 2, 2, 2)
    assert ((out.patch > 0) & (out.patch < 1)).all() and ((out.grid > 0) & (out.grid < 1)).all()
    p = out.probs()
    assert p.shape == (2, 1, 16, 32, 16) and ((p >= 0) & (p <= 1)).all()
    with pytest.raises(ValueError, match="multiple of 16"):
        m(torch.randn(1, 3, 16, 16, 20))
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(1, 2, 16, 16, 16))


def test_stage_one_leaves_the_grid_head_untrained():
    torch.manual_seed(0)
    m = CIBVNet(width=2)
    x = torch.randn(2, 3, 16, 16, 16)
    y = (torch.rand(2, 1, 16, 16, 16) > 0.9).float()
    single = torch.tensor([False, True])
    loss, parts = compute_losses(m(x), y, single, (2, 2, 2), 1.0, 0.0)
    loss.backward()
    assert m.grid_head.fc.weight.grad is None and m.patch_head.fc.weight.grad is not None
    m.zero_grad(set_to_none=True)
    loss, parts = compute_losses(m(x), y, single, (2, 2, 2), 1.0, 1.0)
    loss.backward()
    assert m.grid_head.fc.weight.grad is not None and m.grid_head.fc.weight.grad.abs().sum() > 0
    assert set(parts) == {"dice", "cal", "patch_mse", "grid_mse"} and all(np.isfinite(list(parts.values())))


class _Oracle(torch.nn.Module):
    """A fake network: predicts lesions where t2 - t1 > 0.5, and constant head scores."""

    def forward(self, x):
        fg = (x[:, 2:3] > 0.5).float()
        logits = torch.stack([torch.cat([1 - fg, fg], 1) * 20 - 10] * 3, 1)
        b = x.shape[0]
        return CIBOutput(logits, torch.full((b,), 0.5), torch.full((b, 2, 2, 2), 0.5))


def test_oracle_blending_removes_a_false_positive():
    t1 = np.zeros((32, 32, 32), np.float32)
    t2 = t1.copy()
    t2[3:6, 3:6, 3:6] = 1.0  # a new lesion (in the label)
    t2[26:29, 26:29, 26:29] = 1.0  # a false positive (not in the label)
    label = np.zeros(t1.shape, np.uint8)
    label[3:6, 3:6, 3:6] = 1
    case = Case("toy", t1, t2, label, False, np.eye(4), (slice(None),) * 3, t1.shape)
    pairs = []
    probs = predict_case(_Oracle(), case, BLENDINGS, roi=(16, 16, 16), overlap=0.5, sw_batch_size=5, head_pairs=pairs)
    assert set(probs) == set(BLENDINGS)
    assert sum(len(p[0]) for p in pairs) == 27  # 3 x 3 x 3 windows, recorded once
    h = head_calibration(pairs)
    assert h["patch_pred_mean"] == pytest.approx(0.5) and h["grid_pred_mean"] == pytest.approx(0.5)
    assert 0 < h["patch_true_mean"] < 1 and 0 < h["grid_bad_fraction"] < 0.2  # the false positive's cells
    assert np.isnan(h["patch_corr"])  # constant predictions: no correlation
    tp, fp = (slice(3, 6),) * 3, (slice(26, 29),) * 3
    assert probs["average"][tp].min() > 0.99 and probs["average"][fp].min() > 0.99
    # oracle grid: the false positive's cells score Dice 0, the lesion's cells Dice 1
    assert probs["oracle-grid"][tp].min() > 0.99 and probs["oracle-grid"][fp].max() < 1e-6
    # constant predicted scores 0.5, divided by the overlap count: everything halves
    assert np.allclose(probs["patch"], 0.5 * probs["average"], atol=1e-5)
    assert np.allclose(probs["patch*grid"], 0.25 * probs["average"], atol=1e-5)


def test_train_resume_and_checkpoint(tmp_path):
    from patchblend.examples.cib.data import load_cases
    from patchblend.examples.cib.phantom import PhantomConfig, write_phantom_set

    write_phantom_set(str(tmp_path / "data"), 1, 1, seed=3, config=PhantomConfig(downsample=4.0))
    cases = load_cases(str(tmp_path / "data"))
    assert [c.single for c in cases] == [False, True]
    cfg = TrainConfig(out=str(tmp_path / "run"), width=2, patch=16, batch_two=1, batch_single=1, stage1_iters=2,
                      stage2_iters=1, lr=1e-3, progress=False, ckpt_every=1)
    path = train(cfg, cases=cases, log=lambda *a: None)
    model, cfg2, ckpt = load_checkpoint(path)
    assert ckpt["iteration"] == 3 and cfg2.width == 2
    cfg.stage2_iters, cfg.resume = 3, True
    messages = []
    train(cfg, cases=cases, log=messages.append)
    assert "resumed" in messages[0]
    assert torch.load(path, weights_only=False)["iteration"] == 5


def test_quick_demo_end_to_end(tmp_path):
    cfg = DemoConfig(**{**PRESETS["quick"], "out": str(tmp_path / "demo"), "progress": False, "threads": 0})
    res = run_demo(cfg, log=lambda *a: None)
    with open(res["results"]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["blending", "dice", "jaccard", "hd95", "asd", "f1", "fdr"]
    assert [r[0] for r in rows[1:]] == list(BLENDINGS)
    for r in rows[1:]:
        dice, jac, f1, fdr = (float(r[i]) for i in (1, 2, 5, 6))
        assert 0 <= jac <= dice <= 100 and 0 <= f1 <= 100 and 0 <= fdr <= 100
    assert os.path.getsize(res["figure"]) > 1000
    assert os.path.isfile(tmp_path / "demo" / "model" / "last.pt")
