"""Importance maps: MONAI's Gaussian (against MONAI), nnU-Net's (against scipy's filter, as nnU-Net computes it)."""
import math

import pytest
import torch

from patchblend.inference import constant_importance, importance_map, monai_gaussian, nnunet_gaussian

monai_utils = pytest.importorskip("monai.data.utils")


@pytest.mark.parametrize(
    "shape, sigma_scale",
    [((16, 16, 16), 0.125), ((7, 12), 0.125), ((9, 10, 11), (0.1, 0.25, 0.5)), ((32, 5, 8), 0.05), ((1, 3), 1.0)],
)
def test_monai_gaussian_equals_monai(shape, sigma_scale):
    ref = monai_utils.compute_importance_map(shape, mode="gaussian", sigma_scale=sigma_scale, device="cpu")
    got = monai_gaussian(shape, sigma_scale)
    assert got.dtype == torch.float32 and got.shape == shape
    assert torch.equal(got, ref)


def test_monai_gaussian_hand_worked():
    # size 3, sigma = 0.5 * 3 = 1.5, centre 1: exp(-1 / (2 * 2.25)) at the ends
    g = monai_gaussian((3,), 0.5)
    e = math.exp(-1 / 4.5)
    torch.testing.assert_close(g, torch.tensor([e, 1.0, e]))
    # sigma_scale 0.05 on 32 voxels: tails below 1e-3 are clamped to 1e-3
    g = monai_gaussian((32,), 0.05)
    assert float(g.min()) == pytest.approx(1e-3)
    assert float(g.max()) == pytest.approx(math.exp(-0.25 / (2 * 1.6 ** 2)))  # even size: centre between voxels


def nnunet_reference(shape, sigma_scale=1 / 8, value_scaling_factor=10.0, dtype=torch.float32):
    """nnU-Net v2's compute_gaussian, with scipy as it uses it."""
    ndimage = pytest.importorskip("scipy.ndimage")
    import numpy as np

    tmp = np.zeros(shape)
    tmp[tuple(s // 2 for s in shape)] = 1
    g = torch.from_numpy(ndimage.gaussian_filter(tmp, [s * sigma_scale for s in shape], 0, mode="constant", cval=0))
    g = (g / torch.max(g) * value_scaling_factor).to(dtype)
    g[g == 0] = torch.min(g[g != 0])
    return g


@pytest.mark.parametrize("shape", [(16, 16, 16), (7, 12), (9, 10, 11), (5,), (64, 3, 2), (48, 40, 32)])
@pytest.mark.parametrize("sigma_scale", [1 / 8, 1 / 16])  # 1/16 too: scipy's kernel radius int(4 sigma + 0.5) shows
def test_nnunet_gaussian_equals_scipy(shape, sigma_scale):
    got = nnunet_gaussian(shape, sigma_scale, dtype=torch.float64)
    ref = nnunet_reference(shape, sigma_scale, dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(nnunet_gaussian(shape, sigma_scale), nnunet_reference(shape, sigma_scale), rtol=1e-6,
                               atol=0)


def test_nnunet_gaussian_hand_worked():
    g = nnunet_gaussian((8,), dtype=torch.float64)
    assert int(g.argmax()) == 4 and float(g.max()) == 10.0  # peak at size // 2, value 10
    torch.testing.assert_close(g[4 - 3], g[4 + 3], rtol=0, atol=0)  # symmetric about the impulse
    sigma = 8 / 8  # = 1: value at distance k is 10 * exp(-k^2 / 2)
    torch.testing.assert_close(g[4 + 2], torch.tensor(10 * math.exp(-2 / sigma ** 2), dtype=torch.float64))
    # half precision: the far corners underflow and take the smallest non-zero value (nnU-Net's rule)
    h = nnunet_gaussian((64, 64, 64), dtype=torch.float16)
    assert h.dtype == torch.float16 and bool((h > 0).all())


def test_importance_map_modes_and_errors():
    assert torch.equal(importance_map((4, 5), "constant"), constant_importance((4, 5)))
    assert torch.equal(importance_map((4, 5), "gaussian", 0.2), monai_gaussian((4, 5), 0.2))
    assert torch.equal(importance_map((4, 5), "nnunet"), nnunet_gaussian((4, 5)))
    with pytest.raises(ValueError, match="mode"):
        importance_map((4, 5), "hann")
    with pytest.raises(ValueError, match="sigma_scale"):
        monai_gaussian((4, 5), 0.0)
    with pytest.raises(ValueError, match="sigma_scale"):
        nnunet_gaussian((4, 5), (0.1,))
    with pytest.raises(ValueError, match="shape"):
        constant_importance((4, 0))
    with pytest.raises(ValueError, match="value_scaling_factor"):
        nnunet_gaussian((4,), value_scaling_factor=-1)
