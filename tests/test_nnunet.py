"""patchblend.integrations.nnunet.PatchblendPredictor against nnU-Net v2 itself (a toy PlainConvUNet, a manually
initialised predictor, CPU): the logits against a float64 evaluation of nnU-Net's own formula (its slicers, its
Gaussian, its mirroring, one window at a time), against nnU-Net's float16 path, batched windows, a 2D network on a
3D image, the bounded-memory argmax, calibrated weights, and the clear errors (no nnU-Net, changed internals)."""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("nnunetv2")
pytest.importorskip("dynamic_network_architectures")

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: E402
from nnunetv2.inference.sliding_window_prediction import compute_gaussian  # noqa: E402

import patchblend  # noqa: E402
from patchblend.integrations.nnunet import PatchblendPredictor  # noqa: E402
from patchblend.inference import sliding_window_inference  # noqa: E402

from nnunet_helpers import nnunet_predictor, patchblend_predictor, toy_unet  # noqa: E402  (tests/ is on sys.path)

PATCH3 = (16, 16, 16)


@torch.inference_mode()
def float64_reference(predictor, data):
    """nnU-Net's blend, sum_i g f_i / sum_i g, in float64: nnU-Net's slicers and float16 Gaussian, each window
    through nnU-Net's _internal_maybe_mirror_and_predict on its own (data at least the patch size)."""
    patch = tuple(predictor.configuration_manager.patch_size)
    g = compute_gaussian(patch, sigma_scale=1. / 8, value_scaling_factor=10, device=torch.device("cpu")).double()
    num = torch.zeros((predictor.label_manager.num_segmentation_heads, *data.shape[1:]), dtype=torch.float64)
    den = torch.zeros(data.shape[1:], dtype=torch.float64)
    for sl in predictor._internal_get_sliding_window_slicers(data.shape[1:]):
        f = predictor._internal_maybe_mirror_and_predict(data[sl][None])[0].double()
        num[sl] += f * g
        den[sl[1:]] += g
    return num / den


@pytest.fixture(scope="module")
def net3():
    return toy_unet(3, num_classes=3)


@pytest.fixture(scope="module")
def image3():
    torch.manual_seed(1)
    return torch.randn(1, 30, 27, 21)


@pytest.mark.parametrize("mirror_axes", [None, (0, 1, 2)])
@pytest.mark.parametrize("sw_batch_size", [1, 3])
def test_logits_equal_float64_nnunet_formula(net3, image3, mirror_axes, sw_batch_size):
    ours = patchblend_predictor(net3, PATCH3, 3, mirror_axes=mirror_axes, sw_batch_size=sw_batch_size,
                                output_dtype=None)
    got = ours.predict_logits_from_preprocessed_data(image3)
    assert got.dtype == torch.float32 and got.shape == (3, *image3.shape[1:])
    ref = float64_reference(ours, image3)
    assert (got.double() - ref).abs().max() <= 1e-5


def test_default_output_is_nnunets_float16_rounded_once(net3, image3):
    full = patchblend_predictor(net3, PATCH3, 3, output_dtype=None).predict_logits_from_preprocessed_data(image3)
    half = patchblend_predictor(net3, PATCH3, 3).predict_logits_from_preprocessed_data(image3)
    nn = nnunet_predictor(net3, PATCH3, 3).predict_logits_from_preprocessed_data(image3)
    assert half.dtype == nn.dtype == torch.float16
    assert torch.equal(half, full.half())


def test_against_nnunets_float16_path(net3, image3):
    """nnU-Net's float16 accumulation differs from its own formula by its known error only: the ours-vs-reference
    error is tiny, nnU-Net's is larger (float16 sums of Gaussian weights that are tiny at the window borders), and
    the argmax agrees wherever the float64 top-2 margin exceeds nnU-Net's error there."""
    ours = patchblend_predictor(net3, PATCH3, 3, output_dtype=None)
    ref = float64_reference(ours, image3)
    got = ours.predict_logits_from_preprocessed_data(image3).double()
    nn = nnunet_predictor(net3, PATCH3, 3).predict_logits_from_preprocessed_data(image3).double()
    err_nn = (nn - ref).abs()
    assert err_nn.max() <= 0.5 + 1e-3  # nnU-Net's float16 error bound seen on toy cases (up to 0.5 at borders)
    assert (got - ref).abs().max() <= 1e-5 < err_nn.max()
    top2 = ref.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 2 * err_nn.amax(0)
    assert clear.float().mean() > 0.5
    assert torch.equal(nn.argmax(0)[clear], ref.argmax(0)[clear])
    assert torch.equal(got.argmax(0)[clear], ref.argmax(0)[clear])


def test_batched_network_calls(net3, image3):
    calls = []
    hook = net3.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        ours = patchblend_predictor(net3, PATCH3, 3, sw_batch_size=4, mirror_axes=(0, 1))
        ours.predict_logits_from_preprocessed_data(image3)
    finally:
        hook.remove()
    n_windows = len(ours._internal_get_sliding_window_slicers(image3.shape[1:]))
    flips = 4  # identity + 2 single-axis + 1 two-axis mirror
    assert len(calls) == -(-n_windows // 4) * flips and max(calls) == 4 and sum(calls) == n_windows * flips


def test_2d_network_on_3d_image():
    """nnU-Net's 2D configurations: a 2D network on [C, Z, X, Y], window by window over the slices."""
    net = toy_unet(2, num_classes=3)
    torch.manual_seed(2)
    image = torch.randn(1, 3, 29, 23)
    ours = patchblend_predictor(net, (16, 16), 3, mirror_axes=(0, 1), sw_batch_size=5, output_dtype=None)
    got = ours.predict_logits_from_preprocessed_data(image)
    ref = float64_reference(ours, image)
    assert got.shape == (3, 3, 29, 23) and (got.double() - ref).abs().max() <= 1e-5
    nn = nnunet_predictor(net, (16, 16), 3, mirror_axes=(0, 1)).predict_logits_from_preprocessed_data(image)
    assert (nn.double() - ref).abs().max() <= 0.5 + 1e-3


def test_image_smaller_than_patch_is_padded_by_nnunet(net3):
    image = torch.randn(1, 12, 20, 16)
    ours = patchblend_predictor(net3, PATCH3, 3, output_dtype=None)
    got = ours.predict_logits_from_preprocessed_data(image)
    nn = nnunet_predictor(net3, PATCH3, 3).predict_logits_from_preprocessed_data(image)
    assert got.shape == nn.shape == (3, 12, 20, 16)
    assert (got - nn.float()).abs().max() <= 0.5 + 1e-3


@pytest.mark.parametrize("num_classes", [3, 12])
def test_slab_argmax_equals_full_argmax(num_classes, image3):
    net = toy_unet(3, num_classes=num_classes)
    full = patchblend_predictor(net, PATCH3, num_classes, output_dtype=None, sw_batch_size=2)
    logits = full.predict_logits_from_preprocessed_data(image3)
    slab = patchblend_predictor(net, PATCH3, num_classes, sw_batch_size=2)
    labels = slab.predict_segmentation_from_preprocessed_data(image3)
    assert labels.shape == (1, *image3.shape[1:]) and labels.dtype == torch.uint8
    assert torch.equal(labels[0].long(), logits.argmax(0))
    masks = patchblend_predictor(net, PATCH3, num_classes, reduce="threshold", threshold=0.1,
                                 sw_batch_size=2).predict_segmentation_from_preprocessed_data(image3)
    assert masks.dtype == torch.bool and torch.equal(masks, logits >= 0.1)


def test_slab_refuses_several_folds(net3, image3):
    ours = patchblend_predictor(net3, PATCH3, 3)
    ours.list_of_parameters = ours.list_of_parameters * 2
    with pytest.raises(ValueError, match="one parameter set"):
        ours.predict_segmentation_from_preprocessed_data(image3)


class CalibratedToy(torch.nn.Module):
    """A flip-equivariant network returning CalibratedOutput: 1x1x1 logits, patch score from the window mean,
    grid scores [n, 2, 2, 2] from the window's cell means (so mirrored scores flipped back equal the unmirrored)."""

    def __init__(self, num_classes=3):
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv3d(1, num_classes, 1)

    def forward(self, x):
        seg = self.conv(x)
        patch = torch.sigmoid(x.mean(dim=(1, 2, 3, 4)))
        grid = torch.sigmoid(torch.nn.functional.adaptive_avg_pool3d(x, 2)[:, 0] * 3)
        return patchblend.CalibratedOutput(seg, patch, grid)


@pytest.mark.parametrize("weighting", ["patch", "grid", "patch*grid"])
@pytest.mark.parametrize("normalize", ["count", "weight"])
def test_calibrated_weights_match_the_driver(image3, weighting, normalize):
    """The predictor's calibrated blend equals patchblend's own driver on nnU-Net's lattice and Gaussian; with
    mirroring (scores flipped back) it equals the unmirrored result for this flip-equivariant network."""
    net = CalibratedToy().eval()
    ours = patchblend_predictor(net, PATCH3, 3, weighting=weighting, normalize=normalize, output_dtype=None,
                                sw_batch_size=3)
    got = ours.predict_logits_from_preprocessed_data(image3)
    g = compute_gaussian(PATCH3, sigma_scale=1. / 8, value_scaling_factor=10, device=torch.device("cpu")).float()
    with torch.inference_mode():
        expected = sliding_window_inference(image3[None], PATCH3, 3, net, roi_weight_map=g, placement="nnunet",
                                            tile_step_size=0.5, weighting=weighting, normalize=normalize)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    mirrored = patchblend_predictor(net, PATCH3, 3, weighting=weighting, normalize=normalize, output_dtype=None,
                                    sw_batch_size=3, mirror_axes=(0, 1, 2))
    torch.testing.assert_close(mirrored.predict_logits_from_preprocessed_data(image3), got, rtol=1e-5, atol=1e-5)


def test_calibrated_weighting_needs_calibrated_output(net3, image3):
    ours = patchblend_predictor(net3, PATCH3, 3, weighting="patch")
    with pytest.raises(ValueError, match="CalibratedOutput"):
        ours.predict_logits_from_preprocessed_data(image3)


@pytest.mark.parametrize("kwargs, words", [
    (dict(sw_batch_size=0), "sw_batch_size"), (dict(accumulation_dtype=torch.float16), "accumulation_dtype"),
    (dict(weighting="dice"), "weighting"), (dict(reduce="mean"), "reduce"), (dict(output_dtype=torch.int8),
                                                                             "output_dtype"),
])
def test_bad_options_named(kwargs, words):
    with pytest.raises(ValueError, match=words):
        PatchblendPredictor(device=torch.device("cpu"), **kwargs)


def test_changed_internal_signature_refused(monkeypatch):
    def changed(self, x, mirror_axes):  # an nnU-Net version that passes the mirror axes in
        return x

    monkeypatch.setattr(nnUNetPredictor, "_internal_maybe_mirror_and_predict", changed)
    with pytest.raises(RuntimeError, match=r"_internal_maybe_mirror_and_predict.*expected parameters"):
        PatchblendPredictor(device=torch.device("cpu"))


def test_missing_internal_refused(monkeypatch):
    monkeypatch.delattr(nnUNetPredictor, "_internal_get_sliding_window_slicers")
    with pytest.raises(RuntimeError, match="_internal_get_sliding_window_slicers is missing"):
        PatchblendPredictor(device=torch.device("cpu"))


def test_missing_nnunet_gives_clear_import_error_and_patchblend_never_imports_it():
    code = ("import sys; sys.modules['nnunetv2'] = None\n"
            "import patchblend, patchblend.integrations, patchblend.inference\n"
            "assert 'nnunetv2' not in sys.modules or sys.modules['nnunetv2'] is None\n"
            "try:\n    import patchblend.integrations.nnunet\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "patchblend[nnunet]" in out.stdout
    clean = subprocess.run([sys.executable, "-c", "import sys, patchblend, patchblend.inference; "
                            "print(any(m.startswith('nnunetv2') for m in sys.modules))"],
                           capture_output=True, text=True, timeout=300)
    assert clean.stdout.strip() == "False", clean.stderr


@pytest.mark.parametrize("normalize", ["count", "weight"])
def test_calibrated_default_output_is_the_float32_blend_rounded_once(image3, normalize):
    """The float16 output (slab by slab) equals the float32 result rounded, also when the weights enter the
    denominator (normalize='weight': an accumulated denominator instead of the lattice's)."""
    net = CalibratedToy().eval()
    kw = dict(weighting="patch*grid", normalize=normalize, sw_batch_size=3)
    full = patchblend_predictor(net, PATCH3, 3, output_dtype=None, **kw).predict_logits_from_preprocessed_data(image3)
    half = patchblend_predictor(net, PATCH3, 3, **kw).predict_logits_from_preprocessed_data(image3)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), full.half().float(), rtol=1e-3, atol=1e-3)


def test_nnunets_pipeline_kept_preprocessing_export_probabilities(net3):
    """predict_single_npy_array (nnU-Net's preprocessing, prediction, resampling and export back to the input's
    shape, with probabilities) runs unchanged through PatchblendPredictor and agrees with nnU-Net's own result up
    to nnU-Net's float16 error."""
    import numpy as np
    rng = np.random.default_rng(4)
    image = rng.standard_normal((1, 26, 23, 20)).astype(np.float32)
    props = {"spacing": [1.0, 1.0, 1.0]}
    seg_nn, prob_nn = nnunet_predictor(net3, PATCH3, 3).predict_single_npy_array(
        image, props, save_or_return_probabilities=True)
    seg_pb, prob_pb = patchblend_predictor(net3, PATCH3, 3, sw_batch_size=4).predict_single_npy_array(
        image, props, save_or_return_probabilities=True)
    assert seg_pb.shape == seg_nn.shape == image.shape[1:] and prob_pb.shape == prob_nn.shape == (3, *image.shape[1:])
    assert np.abs(prob_pb - prob_nn).max() < 0.15  # softmax of logits that differ by nnU-Net's error (<= 0.5)
    top2 = np.sort(prob_pb, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 2 * np.abs(prob_pb - prob_nn).max(axis=0)  # nnU-Net's error cannot flip these
    assert clear.mean() > 0.5 and np.array_equal(seg_pb[clear], seg_nn[clear])


# ---- calibration, post hoc, and the lesion decision -----------------------------------------------------------

from patchblend.integrations.nnunet import (  # noqa: E402
    calibrate_nnunet, gate_segmentation, last_decoder_feature)


def halves_case(net, seed, size=(24, 24, 32)):
    """A case whose left half (last axis < 16) is bright and labelled with the network's own argmax (its windows'
    Dice about 1) and whose right half is dark and labelled with another class (Dice 0): heads that read the
    decoder feature can tell the halves apart, so fitted scores must be high on the left, low on the right."""
    torch.manual_seed(seed)
    data = torch.randn(1, *size)
    data[..., :16] += 2.0
    data[..., 16:] -= 2.0
    with torch.no_grad():
        own = patchblend_predictor(net, PATCH3, 3).predict_logits_from_preprocessed_data(data).float().argmax(0)
    seg = own.clone()
    seg[..., 16:] = (own[..., 16:] + 1) % 3
    return data, seg[None]


@pytest.fixture(scope="module")
def calibrated():
    """A grid-weighted predictor of a toy PlainConvUNet calibrated on three held-out cases (mirroring on)."""
    net = toy_unet(3, num_classes=3, seed=5)
    with torch.no_grad():  # confident logits, so that a window's prediction (p > 0.5) is its argmax
        net.decoder.seg_layers[-1].weight.mul_(30)
        net.decoder.seg_layers[-1].bias.mul_(30)
    cases = [halves_case(net, seed) for seed in (11, 12, 13)]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pred = patchblend_predictor(net, PATCH3, 3, weighting="grid", output_dtype=None, sw_batch_size=4,
                                mirror_axes=(0, 1, 2))
    history = calibrate_nnunet(pred, cases, epochs=150)
    return net, before, pred, history


def test_calibrate_nnunet_fits_heads_with_the_network_frozen(calibrated):
    net, before, pred, history = calibrated
    assert history["feature"] == last_decoder_feature(net) == "decoder.stages.0"
    per_case = len(pred._internal_get_sliding_window_slicers((24, 24, 32)))
    assert per_case == 2 * 2 * 3 and history["windows"] == 3 * per_case  # nnU-Net's windows of the three cases
    assert history["grid_mse"][-1] < 0.7 * history["grid_mse"][0]
    assert history["patch_mse"][-1] < history["patch_mse"][0]
    assert isinstance(pred.network, patchblend.CalibratedModel) and pred.network.backbone is net
    for k, v in net.state_dict().items():  # the network frozen
        assert torch.equal(v, before[k]), k
    # the predictor's one parameter set is the calibrated model's (nnU-Net loads it before predicting)
    assert set(pred.list_of_parameters[0]) == set(pred.network.state_dict())


def test_calibrated_scores_flow_into_the_blend(calibrated):
    """On a new case: the confidence map is high on the half the network gets right and low on the other; the
    average's argmax is the uncalibrated predictor's; the grid-weighted logits (count) are pulled towards 0 on the
    doubted half, relative to the average, far more than on the other half, and they are patchblend's own driver run
    on the calibrated model."""
    net, _, pred, _ = calibrated
    data, _ = halves_case(net, 21)
    labels, conf = pred.predict_with_confidence_from_preprocessed_data(data)
    plain = patchblend_predictor(net, PATCH3, 3, output_dtype=None, mirror_axes=(0, 1, 2))
    avg = plain.predict_logits_from_preprocessed_data(data)
    assert labels.shape == conf.shape == (1, *data.shape[1:]) and labels.dtype == torch.int64
    assert torch.equal(labels[0], avg.argmax(0))
    left, right = conf[..., 2:12].mean(), conf[..., 20:30].mean()
    assert left > 0.6 and right < 0.3 and left - right > 0.4, (float(left), float(right))  # seen: 0.72, 0.17
    weighted = pred.predict_logits_from_preprocessed_data(data)
    ratio = weighted.abs().mean(dim=(0, 1, 2)) / avg.abs().mean(dim=(0, 1, 2))
    assert ratio[20:30].mean() < 0.5 * ratio[2:12].mean(), ratio
    unmirrored = patchblend_predictor(pred.network, PATCH3, 3, weighting="grid", output_dtype=None)
    g = compute_gaussian(PATCH3, sigma_scale=1. / 8, value_scaling_factor=10, device=torch.device("cpu")).float()
    with torch.inference_mode():
        expected = sliding_window_inference(data[None], PATCH3, 3, pred.network, roi_weight_map=g, placement="nnunet",
                                            tile_step_size=0.5, weighting="grid", normalize="count")[0]
    unmirrored.list_of_parameters = pred.list_of_parameters
    # (logits up to about 1e2 here: float32 rounding of differently ordered sums)
    torch.testing.assert_close(unmirrored.predict_logits_from_preprocessed_data(data), expected, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("weighting", ["patch", "grid", "patch*grid"])
def test_confidence_pass_equals_the_driver(image3, weighting):
    """predict_with_confidence_from_preprocessed_data (slab by slab): the argmax of the driver's average and its
    confidence map C = sum(alpha g) / sum(g) on nnU-Net's lattice and Gaussian."""
    net = CalibratedToy().eval()
    ours = patchblend_predictor(net, PATCH3, 3, weighting=weighting, sw_batch_size=3)
    labels, conf = ours.predict_with_confidence_from_preprocessed_data(image3)
    g = compute_gaussian(PATCH3, sigma_scale=1. / 8, value_scaling_factor=10, device=torch.device("cpu")).float()
    with torch.inference_mode():
        ref = sliding_window_inference(image3[None], PATCH3, 3, net, roi_weight_map=g, placement="nnunet",
                                       tile_step_size=0.5, weighting=weighting, normalize="weight", confidence=True,
                                       weigh_prediction=False)
    torch.testing.assert_close(conf, ref.confidence[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(labels[0], ref.prediction[0].argmax(0))


def test_gate_segmentation_keeps_confident_components_per_class():
    labels = torch.zeros(1, 12, 12, 12, dtype=torch.int64)
    labels[0, 1:3, 1:3, 1:3] = 1   # class 1, confident
    labels[0, 8:10, 8:10, 8:10] = 1  # class 1, doubted
    labels[0, 1:3, 8:11, 1:3] = 2  # class 2, middling
    conf = torch.full((1, 12, 12, 12), 0.1)
    conf[0, :6, :6, :6] = 0.9
    conf[0, :6, 6:, :6] = 0.5
    gate = gate_segmentation(labels, conf, 0.6)
    expected = labels.clone()
    expected[expected == 2] = 0
    expected[0, 8:10, 8:10, 8:10] = 0
    assert torch.equal(gate.mask, expected)
    assert [(c.label, c.size, c.kept) for c in gate.components] == [(1, 8, True), (1, 8, False), (2, 12, False)]
    assert sorted(torch.unique(gate.components_map).tolist()) == [0, 1, 2, 3]
    per_class = gate_segmentation(labels, conf, {1: 0.6, 2: 0.4})
    assert torch.equal(per_class.mask[labels == 2], labels[labels == 2])
    assert not per_class.mask[0, 8:10, 8:10, 8:10].any()


def test_calibration_and_gate_bad_arguments(net3, image3):
    with pytest.raises(ValueError, match="classes \\[2\\]"):
        gate_segmentation(torch.tensor([[[0, 1, 2]]]), torch.ones(1, 1, 3), {1: 0.5})
    with pytest.raises(ValueError, match="labels must be an integer label map"):
        gate_segmentation(torch.rand(1, 4, 4, 4), torch.ones(1, 4, 4, 4), 0.5)
    pred = patchblend_predictor(net3, PATCH3, 3, weighting="grid")
    with pytest.raises(ValueError, match="cases is empty"):
        calibrate_nnunet(pred, [])
    with pytest.raises(TypeError, match="pairs"):
        calibrate_nnunet(pred, [image3])
    with pytest.raises(ValueError, match="seg of case 0"):
        calibrate_nnunet(pred, [(image3, torch.zeros(1, 3, 3, 3, dtype=torch.int64))])
    with pytest.raises(ValueError, match="no submodule"):
        calibrate_nnunet(pred, [(image3, torch.zeros(1, *image3.shape[1:], dtype=torch.int64))],
                         feature="decoder.stage.0")
    with pytest.raises(ValueError, match="batch_size"):
        calibrate_nnunet(pred, [], batch_size=0)
    with pytest.raises(ValueError, match="decoder.stages"):
        last_decoder_feature(torch.nn.Conv3d(1, 1, 1))
    with pytest.raises(ValueError, match="needs weighting"):
        patchblend_predictor(net3, PATCH3, 3).predict_with_confidence_from_preprocessed_data(image3)
    two = patchblend_predictor(net3, PATCH3, 3, weighting="grid")
    two.list_of_parameters = two.list_of_parameters * 2
    with pytest.raises(ValueError, match="one parameter set"):
        calibrate_nnunet(two, [])
    with pytest.raises(ValueError, match="made with weighting"):
        calibrate_nnunet(patchblend_predictor(net3, PATCH3, 3), [])
    with pytest.raises(ValueError, match="3D configuration"):
        calibrate_nnunet(patchblend_predictor(toy_unet(2), (16, 16), 3, weighting="grid"), [])
