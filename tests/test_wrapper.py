"""CalibratedModel and candidate_feature_modules on a plain module, MONAI UNet and BasicUNet (the README
section's code is run by test_readme.py)."""
import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from patchblend.losses import calibration_loss, soft_dice_loss
from patchblend.targets import dice_targets
from patchblend.wrapper import CalibratedModel, CalibratedOutput, candidate_feature_modules



class TinyUNet(nn.Module):
    """A home-grown two-level encoder-decoder with BatchNorm (to check the dry run leaves it alone)."""

    def __init__(self, in_channels=1, out_channels=2, width=4):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv3d(in_channels, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU())
        self.down = nn.Conv3d(width, 2 * width, 2, stride=2)
        self.bottleneck = nn.Sequential(nn.Conv3d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose3d(2 * width, width, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv3d(2 * width, width, 3, padding=1), nn.ReLU())
        self.out = nn.Conv3d(width, out_channels, 1)

    def forward(self, x):
        e = self.enc(x)
        b = self.bottleneck(self.down(e))
        return self.out(self.dec(torch.cat([e, self.up(b)], dim=1)))


def tiny():
    return TinyUNet(), "bottleneck", "dec", 16


def monai_unet():
    nets = pytest.importorskip("monai.networks.nets")
    net = nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2))
    return net, "model.1.submodule.1.submodule", "model.1", 16


def monai_basic_unet():
    nets = pytest.importorskip("monai.networks.nets")
    net = nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4))
    return net, "down_4", "upcat_1", 32


@pytest.fixture(autouse=True)
def one_thread():
    """These small convolutions run several times faster on one thread when the CPU is shared with
    other jobs (OpenMP threads wait on each other); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


BACKBONES = {"plain": tiny, "monai-UNet": monai_unet, "monai-BasicUNet": monai_basic_unet}


def blobs(batch, size, gen):
    """Random lesion-like masks [B, 1, S, S, S] and a noisy image of them."""
    noise = torch.rand(batch, 1, size, size, size, generator=gen)
    label = (F.avg_pool3d(noise, 5, stride=1, padding=2) > 0.53).float()
    image = label + 0.5 * torch.randn(label.shape, generator=gen)
    return image, label


@pytest.mark.parametrize("name", list(BACKBONES))
def test_training_a_few_steps_lowers_the_loss(name):
    torch.manual_seed(0)
    backbone, bottleneck, decoder, size = BACKBONES[name]()
    model = CalibratedModel(backbone, bottleneck=bottleneck, decoder=decoder,
                            example_input=torch.zeros(1, 1, size, size, size))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)  # built before any training forward
    image, label = blobs(2, size, torch.Generator().manual_seed(1))
    head_params = list(model.patch_head.parameters()) + list(model.grid_head.parameters())
    before = [p.detach().clone() for p in head_params]
    losses = []
    for _ in range(8):
        out = model(image)
        assert isinstance(out, CalibratedOutput) and isinstance(out, tuple)
        prob = torch.softmax(out.seg, dim=1)
        patch_t, grid_t = dice_targets(prob, label.long())
        loss = soft_dice_loss(prob, label.long()) + calibration_loss(out.patch, patch_t, out.grid, grid_t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses))
    assert sum(losses[-3:]) / 3 < losses[0], losses
    assert all(not torch.equal(a, p) for a, p in zip(before, head_params))  # the heads were trained


@pytest.mark.parametrize("name", list(BACKBONES))
def test_outputs_and_shapes(name):
    torch.manual_seed(0)
    backbone, bottleneck, decoder, size = BACKBONES[name]()
    model = CalibratedModel(backbone, bottleneck, decoder, example_input=torch.zeros(1, 1, size, size, size),
                            grid=(2, 1, 2))
    model.eval()
    x = torch.randn(3, 1, size, size, size)
    seg, patch, grid = model(x)
    torch.testing.assert_close(seg, backbone(x))  # the backbone's output is passed through untouched
    assert patch.shape == (3,) and grid.shape == (3, 2, 1, 2)
    assert bool(((patch > 0) & (patch < 1)).all()) and bool(((grid > 0) & (grid < 1)).all())
    out = model(x)
    assert out._asdict().keys() == {"seg", "patch", "grid"}


def test_channels_are_inferred_from_the_features():
    model = CalibratedModel(TinyUNet(width=3), "bottleneck", "dec", example_input=torch.zeros(1, 1, 8, 8, 8))
    assert model.patch_head.in_channels == 6 and model.grid_head.in_channels == 3
    explicit = CalibratedModel(TinyUNet(width=3), "bottleneck", "dec", channels=(6, 3), hidden_channels=5)
    assert explicit.grid_head.conv.out_channels == 5
    assert explicit(torch.zeros(2, 1, 8, 8, 8)).grid.shape == (2, 2, 2, 2)
    wrong = CalibratedModel(TinyUNet(width=3), "bottleneck", "dec", channels=(6, 4))
    with pytest.raises(ValueError, match="in_channels=4"):
        wrong(torch.zeros(1, 1, 8, 8, 8))


def test_dry_run_leaves_training_state_and_batchnorm_statistics_alone():
    net = TinyUNet()
    net.train()
    bn = net.enc[1]
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    CalibratedModel(net, "bottleneck", "dec", example_input=torch.randn(2, 1, 8, 8, 8) + 5)
    assert all(m.training for m in net.modules())
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert torch.equal(bn.num_batches_tracked, count)
    net.eval()
    candidate_feature_modules(net, torch.zeros(1, 1, 8, 8, 8))
    assert not any(m.training for m in net.modules())


def test_backbone_called_directly_keeps_no_feature_alive():
    net = TinyUNet()
    model = CalibratedModel(net, "bottleneck", "dec", example_input=torch.zeros(1, 1, 8, 8, 8))
    refs = []
    net.bottleneck.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    out = net(torch.randn(1, 1, 8, 8, 8, requires_grad=True))
    del out
    gc.collect()
    assert refs and refs[-1]() is None  # the wrapper's hook did not keep the feature
    out = model(torch.randn(1, 1, 8, 8, 8))  # and the wrapper still works afterwards
    assert out.patch.shape == (1,)


def test_deepcopy_and_state_dict():
    torch.manual_seed(0)
    model = CalibratedModel(TinyUNet(), "bottleneck", "dec", example_input=torch.zeros(1, 1, 8, 8, 8)).eval()
    x = torch.randn(2, 1, 8, 8, 8)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.patch_head.fc.bias.add_(3.0)
    assert bool((twin(x).patch > model(x).patch).all())  # the copy's hooks feed the copy's heads
    fresh = CalibratedModel(TinyUNet(), "bottleneck", "dec", channels=(8, 4)).eval()
    fresh.load_state_dict(model.state_dict())
    for a, b in zip(fresh(x), model(x)):
        torch.testing.assert_close(a, b)


class TupleBlock(nn.Module):
    def forward(self, x):
        return x, x


class Odd(nn.Module):
    """A backbone with a tuple-valued module, a 2D-valued module and a module that never runs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.pair = TupleBlock()
        self.flat = nn.Flatten()
        self.unused = nn.Conv3d(2, 2, 1)

    def forward(self, x):
        y = self.pair(self.conv(x))[0]
        self.flat(y)
        return y


def test_errors_name_the_module():
    x = torch.zeros(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"bottleneck='convv'.*Did you mean 'conv'"):
        CalibratedModel(Odd(), "convv", "conv", example_input=x)
    with pytest.raises(ValueError, match=r"decoder='nope'"):
        CalibratedModel(Odd(), "conv", "nope", example_input=x)
    with pytest.raises(TypeError, match=r"bottleneck='pair'.*tuple"):
        CalibratedModel(Odd(), "pair", "conv", example_input=x)
    with pytest.raises(ValueError, match=r"decoder='flat'.*\(1, 128\)"):
        CalibratedModel(Odd(), "conv", "flat", example_input=x)
    with pytest.raises(RuntimeError, match=r"decoder='unused'.*did not run"):
        CalibratedModel(Odd(), "conv", "unused", example_input=x)
    lazy = CalibratedModel(Odd(), "conv", "pair", channels=(2, 2))  # checked on the first forward
    with pytest.raises(TypeError, match=r"decoder='pair'"):
        lazy(x)
    lazy.backbone(x)  # the failed forward left no hook behind
    with pytest.raises(TypeError, match="example_input"):
        CalibratedModel(Odd(), "conv", "conv")
    with pytest.raises(TypeError, match="example_input"):
        CalibratedModel(Odd(), "conv", "conv", example_input=x, channels=(2, 2))
    with pytest.raises(TypeError, match="channels"):
        CalibratedModel(Odd(), "conv", "conv", channels=2)
    with pytest.raises(TypeError, match="bottleneck"):
        CalibratedModel(Odd(), 0, "conv", example_input=x)
    with pytest.raises(TypeError, match="backbone"):
        CalibratedModel(lambda t: t, "conv", "conv", example_input=x)
    with pytest.raises(ValueError, match="feature size"):  # grid larger than the decoder feature
        CalibratedModel(Odd(), "conv", "conv", example_input=x, grid=(8, 2, 2))


def test_candidate_feature_modules_lists_5d_outputs_in_order():
    found = candidate_feature_modules(TinyUNet(width=2), torch.zeros(1, 1, 8, 8, 8))
    assert found == [
        ("enc.0", (1, 2, 8, 8, 8)), ("enc.1", (1, 2, 8, 8, 8)), ("enc.2", (1, 2, 8, 8, 8)), ("enc", (1, 2, 8, 8, 8)),
        ("down", (1, 4, 4, 4, 4)),
        ("bottleneck.0", (1, 4, 4, 4, 4)), ("bottleneck.1", (1, 4, 4, 4, 4)), ("bottleneck", (1, 4, 4, 4, 4)),
        ("up", (1, 2, 8, 8, 8)),
        ("dec.0", (1, 2, 8, 8, 8)), ("dec.1", (1, 2, 8, 8, 8)), ("dec", (1, 2, 8, 8, 8)),
        ("out", (1, 2, 8, 8, 8)),
    ]
    names = [n for n, _ in candidate_feature_modules(Odd(), torch.zeros(1, 1, 4, 4, 4))]
    assert names == ["conv"]  # not the tuple, not the flattened output, not the module that never ran


def test_candidate_feature_modules_names_monai_unet_features():
    net, bottleneck, decoder, size = monai_unet()
    found = dict(candidate_feature_modules(net, torch.zeros(1, 1, size, size, size)))
    assert found[bottleneck] == (1, 16, 4, 4, 4)
    assert found[decoder] == (1, 8, 8, 8, 8)


def test_aware_heads_read_the_output_and_the_decoder_feature():
    from patchblend.heads import AwareGridHead, AwarePatchHead
    from patchblend.wrapper import foreground_probability

    torch.manual_seed(0)
    net = TinyUNet()
    x = torch.randn(2, 1, 16, 16, 16)
    model = CalibratedModel(net, None, "dec", example_input=torch.zeros(1, 1, 16, 16, 16), heads="aware").eval()
    assert isinstance(model.patch_head, AwarePatchHead) and isinstance(model.grid_head, AwareGridHead)
    assert "bottleneck" not in model.feature_names
    with torch.no_grad():
        seg, patch, grid = model(x)
        feature = net.dec(torch.cat([net.enc(x), net.up(net.bottleneck(net.down(net.enc(x))))], 1))
        fg = foreground_probability(torch.softmax(net(x), 1))
    torch.testing.assert_close(seg, net(x))
    torch.testing.assert_close(patch, model.patch_head(fg, feature))
    torch.testing.assert_close(grid, model.grid_head(fg, feature))
    torch.testing.assert_close(fg, 1 - torch.softmax(seg, 1)[:, :1])
    # a custom probability: the heads see what it returns
    flip = CalibratedModel(net, None, "dec", channels=(8, 4), heads="aware", probability=lambda s: torch.sigmoid(-s[:, 1:]))
    flip.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(flip.eval()(x).patch, model.patch_head(torch.sigmoid(-seg[:, 1:]), feature))
    # training the aware heads never changes the backbone (their inputs are detached)
    model.train()
    out = model(x)
    (out.patch.sum() + out.grid.sum()).backward()
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="heads must be one of"):
        CalibratedModel(net, None, "dec", channels=(8, 4), heads="mine")
    with pytest.raises(TypeError, match="bottleneck must be"):
        CalibratedModel(net, None, "dec", channels=(8, 4))  # the paper heads need the bottleneck
