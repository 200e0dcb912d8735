"""patchblend.integrations.monai: CalibratedSlidingWindowInferer against MONAI's SlidingWindowInferer."""
import pytest
import torch

from patchblend import CalibratedOutput

monai_inferers = pytest.importorskip("monai.inferers")
from patchblend.integrations.monai import CalibratedSlidingWindowInferer  # noqa: E402


def net(x, scale=1.0):
    return torch.cat([x.sin() * scale, x.cos()], 1)


def test_is_a_monai_inferer_and_matches_sliding_window_inferer():
    x = torch.rand(2, 1, 14, 17, 11, generator=torch.Generator().manual_seed(0))
    for kw in (dict(), dict(mode="gaussian", sigma_scale=0.2, cache_roi_weight_map=True, overlap=0.5)):
        ours = CalibratedSlidingWindowInferer((6, 8, 5), 3, **kw)
        ref = monai_inferers.SlidingWindowInferer((6, 8, 5), 3, **kw)
        assert isinstance(ours, monai_inferers.Inferer)
        torch.testing.assert_close(ours(x, net), ref(x, net), rtol=1e-5, atol=1e-6)
        # extra positional / keyword arguments reach the network, as in MONAI
        torch.testing.assert_close(ours(x, net, 2.0), ref(x, net, 2.0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x, net, scale=3.0), ref(x, net, scale=3.0), rtol=1e-5, atol=1e-6)


def test_calibrated_options_and_cpu_thresh():
    x = torch.rand(1, 1, 12, 12, 12, generator=torch.Generator().manual_seed(1))

    def scored(w):
        return CalibratedOutput(net(w), w.mean((1, 2, 3, 4)), None)

    from patchblend.inference import sliding_window_inference

    inferer = CalibratedSlidingWindowInferer(6, 2, 0.5, weighting="patch", slab_axis=0, reduce="argmax",
                                             cpu_thresh=10)
    ref = sliding_window_inference(x, 6, 2, scored, 0.5, weighting="patch").argmax(1, keepdim=True)
    out = inferer(x, scored)
    assert out.device.type == "cpu" and torch.equal(out, ref)
    with pytest.raises(ValueError, match="condition"):
        inferer(x, scored, condition=torch.rand(1, 1, 3, 3, 3))
