"""Weighted means whose weight sums are subnormal in float32 (below 1.18e-38), and default output shapes past
int64: every path gives the op's answer or refuses by name, never a silently shrunk or cropped result."""
import pytest
import torch

from patchblend import Blender, CalibratedOutput, SlabBlender, calibrated_blend
from patchblend.inference import LatticeBlender, sliding_window_inference, sliding_windows

TINY = torch.finfo(torch.float32).tiny  # 1.1754944e-38, the smallest normal float32
# at the normal/subnormal boundary and well inside the subnormals (1e-40: a patch score of 1e-20 times a
# cell score of 1e-20)
WEIGHTS = [TINY, TINY * (1 - 2 ** -23), 1e-38, 1e-40]
C = torch.tensor([[0, 0, 0], [2, 0, 0]])
OUT = (6, 4, 4)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _patches(dtype):
    return torch.full((2, 1, 4, 4, 4), 0.8).to(dtype)


def _expected(dtype):
    return torch.tensor(0.8).to(dtype).float().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w", WEIGHTS)
def test_blenders_equal_the_op_for_subnormal_weight_sums(w, dtype):
    p = _patches(dtype)
    weights = torch.tensor([w, w])
    op = calibrated_blend(p, weights, C, OUT, normalize="weight").float()
    assert op.min().item() == pytest.approx(_expected(dtype), rel=1e-4)  # the op itself is right

    b = Blender(OUT, 1, normalize="weight")
    b.add(p, C, weights)
    torch.testing.assert_close(b.finalize(), op, rtol=1e-5, atol=0)

    s = SlabBlender(OUT, 1, normalize="weight")
    s.add(p, C, weights)
    torch.testing.assert_close(s.finish(), op, rtol=1e-5, atol=0)


@pytest.mark.parametrize("w", WEIGHTS)
def test_lattice_blender_with_a_subnormal_importance(w):
    p = _patches(torch.float32)
    imp = torch.full((4, 4, 4), w)
    op = calibrated_blend(p, None, C, OUT, normalize="weight", importance=imp)
    b = LatticeBlender(OUT, 1, sliding_windows(OUT, (4, 4, 4), 0.5), (4, 4, 4), normalize="weight", importance=imp)
    b.add(p)
    torch.testing.assert_close(b.finalize(), op, rtol=1e-5, atol=0)
    assert op.min().item() == pytest.approx(0.8, rel=1e-4)


def _constant(x):
    return CalibratedOutput(torch.full_like(x, 0.8), torch.full((len(x),), 1e-20),
                            torch.full((len(x), 2, 2, 2), 1e-20))


@pytest.mark.parametrize("slab_axis", [None, 0])
def test_driver_patch_times_grid_scores_of_1e_20(slab_axis):
    out = sliding_window_inference(torch.rand(1, 1, 12, 12, 12), 8, 2, _constant, 0.5, weighting="patch*grid",
                                   normalize="weight", slab_axis=slab_axis)
    assert out.min().item() == pytest.approx(0.8, rel=1e-4)
    assert out.max().item() == pytest.approx(0.8, rel=1e-4)


@pytest.mark.parametrize("shape", [(1, 1, 12, 12, 12), (1, 1, 12), (1, 1, 6, 6, 6, 6)])
def test_driver_process_fn_map_of_1e_39(shape):
    roi = 8 if len(shape) < 6 else 4

    def process_fn(segs, windows, importance):
        return segs, torch.full_like(importance, 1e-39)

    x = torch.rand(shape)
    out = sliding_window_inference(x, roi, 2, lambda w: torch.full_like(w, 0.8), 0.5, process_fn=process_fn)
    assert out.min().item() == pytest.approx(0.8, rel=1e-4)
    assert out.max().item() == pytest.approx(0.8, rel=1e-4)


def test_zero_weight_sum_still_gives_zero():
    p = _patches(torch.float32)
    b = Blender((10, 4, 4), 1, normalize="weight")
    b.add(p, C, torch.tensor([0.0, 1e-40]))
    out = b.finalize()
    assert out[0, :2].abs().max().item() == 0.0  # only the zero-weight patch: 0, not NaN
    assert out[0, 2:6].min().item() == pytest.approx(0.8, rel=1e-4)
    assert out[0, 6:].abs().max().item() == 0.0  # no patch
    assert not out.isnan().any()


def test_default_out_shape_past_int64_is_refused():
    p = torch.rand(2, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="coords.*int64"):
        calibrated_blend(p, None, [[0, 0, 0], [2 ** 63 - 2, 0, 0]])
    # the largest end that fits is accepted by the check (the output is then too large to allocate: out_shape
    # given explicitly instead keeps the far patch out of a small output)
    out = calibrated_blend(p, None, [[0, 0, 0], [2 ** 63 - 5, 0, 0]], (6, 4, 4))
    torch.testing.assert_close(out[:, :4], p[0])
    assert out[:, 4:].abs().max().item() == 0.0
