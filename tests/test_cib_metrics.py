"""Metrics of the CIB example (docs/design.md#evaluation) on hand-made masks."""
import math

import numpy as np
import pytest

pytest.importorskip("scipy")

from patchblend.examples.cib.metrics import (  # noqa: E402
    asd,
    dice,
    evaluate_case,
    hd95,
    jaccard,
    label_components,
    lesion_detection,
    lesion_f1,
    remove_small_components,
)

SHAPE = (20, 20, 20)


def box(lo, hi, shape=SHAPE):
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def gt_lesion():
    """A 100-voxel ground-truth lesion: 5 x 5 x 4."""
    return box((2, 2, 2), (7, 7, 6))


def test_overlap_metrics_hand_worked():
    g = box((0, 0, 0), (2, 2, 2))  # 8 voxels
    p = box((1, 0, 0), (3, 2, 2))  # 8 voxels, 4 shared
    assert dice(p, g) == pytest.approx(0.5)
    assert jaccard(p, g) == pytest.approx(4 / 12)
    assert dice(g, g) == 1.0 and jaccard(g, g) == 1.0


def test_distances_single_voxels():
    p = np.zeros(SHAPE, bool)
    g = np.zeros(SHAPE, bool)
    p[5, 5, 5] = True
    g[5, 5, 8] = True
    assert hd95(p, g) == pytest.approx(3.0)
    assert asd(p, g) == pytest.approx(3.0)
    assert hd95(g, g) == 0.0 and asd(g, g) == 0.0


def test_asd_is_pred_to_gt():
    g = np.zeros(SHAPE, bool)
    g[5, 5, 5] = True
    p = g.copy()
    p[5, 5, 9] = True  # an extra voxel 4 away: asd = (0 + 4) / 2
    assert asd(p, g) == pytest.approx(2.0)
    assert asd(g, p) == pytest.approx(0.0)


def test_components_26_connectivity_and_filter():
    m = np.zeros(SHAPE, bool)
    m[1, 1, 1] = m[2, 2, 2] = True  # corner neighbours: one component with 26-connectivity
    assert label_components(m)[1] == 1
    small = box((10, 10, 10), (12, 12, 12))  # 8 voxels
    small[12, 10, 10] = small[12, 11, 10] = True  # 10 voxels
    big = box((0, 10, 0), (3, 13, 2))  # 18 voxels
    assert small.sum() == 10
    kept = remove_small_components(small | big, 11)
    assert np.array_equal(kept, big)
    eleven = small.copy()
    eleven[12, 12, 10] = True
    assert np.array_equal(remove_small_components(eleven, 11), eleven)


def test_detection_needs_more_than_ten_percent():
    g = gt_lesion()
    p10 = np.zeros(SHAPE, bool)
    p10[2, 2, 2:6] = p10[2, 3, 2:6] = True
    p10[2, 4, 2:4] = True  # 10 voxels, all inside the lesion: exactly 10%
    assert p10.sum() == 10
    c = lesion_detection(p10, g)
    assert c["detected"] == 0
    p11 = p10.copy()
    p11[2, 4, 4] = True
    c = lesion_detection(p11, g)
    assert (c["gt_lesions"], c["pred_lesions"], c["detected"]) == (1, 1, 1)
    # The reverse direction: the predicted lesion is covered by a ground-truth lesion that lies 89%
    # outside it (> 70%), so the prediction is not a true positive lesion.
    assert c["true_pred"] == 0


def test_true_prediction_rule_is_the_same_rule_reversed():
    g = gt_lesion()  # 100 voxels
    p = box((2, 2, 2), (7, 7, 4))  # 50 voxels inside: g is 50% outside p -> a true prediction
    c = lesion_detection(p, g)
    assert (c["detected"], c["true_pred"]) == (1, 1)
    p = box((2, 2, 2), (7, 7, 3))  # 25 voxels: g is 75% outside p -> detected, but not a true prediction
    c = lesion_detection(p, g)
    assert (c["detected"], c["true_pred"]) == (1, 0)
    # and in the other direction: prediction 100, ground truth 25 inside it
    c = lesion_detection(g, p)
    assert (c["detected"], c["true_pred"]) == (0, 1)


def test_detection_outside_fraction_limit():
    g = gt_lesion()
    # 12 voxels inside (rows 2..3, z 2..5 → 8; plus 4 of row 4) and k outside along x
    inside = np.zeros(SHAPE, bool)
    inside[2, 2:5, 2:6] = True  # 12 voxels inside the lesion
    outside = np.zeros(SHAPE, bool)
    outside[1, 2:9, 2:6] = True  # 28 voxels in the slab x=1, outside the lesion
    p = inside | outside  # 40 voxels, 28 outside = 70%: allowed (no more than 70%)
    assert p.sum() == 40 and (p & ~g).sum() == 28
    c = lesion_detection(p, g)
    assert c["detected"] == 1
    p2 = p.copy()
    p2[0, 2, 2] = True  # 29 of 41 outside = 70.7%: too much
    c = lesion_detection(p2, g)
    assert c["detected"] == 0 and c["true_pred"] == 0


def test_detection_uses_largest_overlaps_up_to_65_percent():
    g = box((2, 2, 2), (12, 7, 6))  # 200 voxels
    good = box((2, 2, 2), (7, 7, 4))  # 50 voxels inside
    bad_in = box((10, 2, 2), (11, 7, 4))  # 10 voxels inside
    bad_out = box((13, 2, 2), (19, 7, 6))  # 120 voxels outside, touching bad_in? no: x=11..12 gap
    bad_out |= box((11, 2, 2), (13, 3, 3))  # bridge: x=11 is inside g, x=12 inside g
    p = good | bad_in | bad_out
    labels, n = label_components(p)
    assert n == 2
    # covered = 50 + (bad component's overlap); 65% of it is reached by "good" alone → detected
    c = lesion_detection(p, g)
    assert c["detected"] == 1
    assert c["true_pred"] == 1  # the bad component is mostly outside the ground truth
    # shrink the good component so the bad one is needed to reach 65%: not detected any more
    p_small = box((2, 2, 2), (3, 7, 4)) | bad_in | bad_out  # 10 voxels good
    c = lesion_detection(p_small, g)
    assert c["detected"] == 0


def test_empty_prediction():
    g = gt_lesion()
    r = evaluate_case(np.zeros(SHAPE, np.float32), g)
    assert r["dice"] == 0.0 and r["jaccard"] == 0.0
    assert math.isnan(r["hd95"]) and math.isnan(r["asd"])
    assert r["f1"] == 0.0 and r["fdr"] == 0.0 and r["sensitivity"] == 0.0


def test_empty_ground_truth():
    p = gt_lesion().astype(np.float32)
    r = evaluate_case(p, np.zeros(SHAPE, bool))
    assert r["dice"] == 0.0 and r["f1"] == 0.0 and r["fdr"] == 1.0
    assert r["pred_lesions"] == 1 and r["gt_lesions"] == 0


def test_both_empty_and_nothing_left_after_filtering():
    z = np.zeros(SHAPE, np.float32)
    r = evaluate_case(z, z > 0)
    assert (r["dice"], r["jaccard"], r["hd95"], r["asd"], r["f1"], r["fdr"]) == (1.0, 1.0, 0.0, 0.0, 1.0, 0.0)
    tiny_p = box((1, 1, 1), (3, 3, 3)).astype(np.float32)  # 8 voxels: filtered out
    tiny_g = box((10, 10, 10), (12, 12, 12))
    r2 = evaluate_case(tiny_p, tiny_g)
    assert r2 == r


def test_threshold_and_probabilities():
    g = gt_lesion()
    prob = np.where(g, 0.6, 0.4).astype(np.float32)
    assert evaluate_case(prob, g)["dice"] == 1.0
    assert evaluate_case(prob, g, threshold=0.7)["dice"] == 0.0


def test_f1_from_counts():
    r = lesion_f1({"gt_lesions": 4, "pred_lesions": 5, "detected": 3, "true_pred": 2})
    assert r["sensitivity"] == 0.75 and r["precision"] == 0.4
    assert r["f1"] == pytest.approx(2 * 0.75 * 0.4 / 1.15)
    assert r["fdr"] == pytest.approx(0.6)


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="pred"):
        dice(np.zeros((3, 3)), np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="same shape"):
        dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))


# ---------------------------------------------------------------------------------------------
# Boundaries (each test fails if the boundary moves by one step)
# ---------------------------------------------------------------------------------------------


def test_probability_of_exactly_one_half_is_background():
    g = gt_lesion()
    prob = np.where(g, 0.5, 0.0).astype(np.float32)
    r = evaluate_case(prob, g)
    assert r["dice"] == 0.0 and r["pred_lesions"] == 0 and r["detected"] == 0  # 0.5 is not > 0.5
    prob = np.where(g, np.nextafter(np.float32(0.5), np.float32(1)), 0.0).astype(np.float32)
    assert evaluate_case(prob, g)["dice"] == 1.0


def test_ten_voxel_lesion_is_removed_eleven_kept_by_default():
    ten = box((2, 2, 2), (4, 7, 3))  # 2 x 5 x 1 = 10 voxels
    eleven = ten.copy()
    eleven[4, 2, 2] = True  # 26-connected to the rest
    assert ten.sum() == 10 and eleven.sum() == 11
    assert not remove_small_components(ten).any()
    assert remove_small_components(eleven).sum() == 11
    big = gt_lesion()
    # a 10-voxel false positive does not count, an 11-voxel one does
    r10 = evaluate_case(big | box((12, 12, 12), (14, 17, 13)), big)
    fp11 = box((12, 12, 12), (14, 17, 13))
    fp11[14, 12, 12] = True
    r11 = evaluate_case(big | fp11, big)
    assert (r10["pred_lesions"], r10["fdr"]) == (1, 0.0)
    assert (r11["pred_lesions"], r11["fdr"]) == (2, 0.5)
    # and a 10-voxel ground-truth lesion is not a lesion to find
    assert evaluate_case(np.zeros(SHAPE, np.float32), ten)["gt_lesions"] == 0


def _brute_surface_distances(a, b):
    """Surface voxels (6-neighbourhood) by loops, nearest distances by brute force."""
    def surface(m):
        pts = []
        for idx in zip(*np.nonzero(m)):
            for ax in range(3):
                for d in (-1, 1):
                    n = list(idx)
                    n[ax] += d
                    if not (0 <= n[ax] < m.shape[ax]) or not m[tuple(n)]:
                        pts.append(idx)
                        break
                else:
                    continue
                break
        return np.array(sorted(set(pts)), float)

    sa, sb = surface(a), surface(b)
    return np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1)).min(1)


def test_hd95_is_the_95th_percentile_with_unequal_distances():
    g = box((4, 4, 4), (10, 10, 10))
    p = box((4, 4, 4), (10, 10, 10))
    p[10:13, 6:8, 6:8] = True  # a finger sticking out: a few large distances among many zeros
    p[4:6, 4:6, 2:4] = True  # and a shorter one
    d = np.hstack([_brute_surface_distances(p, g), _brute_surface_distances(g, p)])
    assert np.percentile(d, 90) != np.percentile(d, 95) != np.percentile(d, 99)  # the test can tell them apart
    assert hd95(p, g) == pytest.approx(np.percentile(d, 95))
    assert asd(p, g) == pytest.approx(_brute_surface_distances(p, g).mean())
    assert asd(g, p) != pytest.approx(asd(p, g))  # asd is directed: prediction to ground truth


def test_default_crop_is_lesion_centred_seventy_percent_of_the_time():
    from patchblend.examples.cib.data import Case, random_crop
    from patchblend.examples.cib.train import TrainConfig

    shape = (64, 64, 64)
    label = np.zeros(shape, np.uint8)
    label[32, 32, 32] = 1
    z = np.zeros(shape, np.float32)
    case = Case("c", z, z, label, False, np.eye(4), (slice(None),) * 3, shape)
    rng = np.random.default_rng(0)
    hits = sum(bool(random_crop(case, (8, 8, 8), rng)[1].any()) for _ in range(600))
    # lesion-centred crops always hold the lesion, uniform ones almost never ((8/57)^3 = 0.3%)
    assert 0.64 < hits / 600 < 0.76
    assert TrainConfig().lesion_prob == 0.7


def test_learning_rate_decays_polynomially_with_power_0_9(tmp_path):
    from patchblend.examples.cib.train import TrainConfig, learning_rate

    cfg = TrainConfig(lr=1.0, stage1_iters=4, stage2_iters=6)
    assert learning_rate(cfg, 0) == 1.0
    assert learning_rate(cfg, 5) == pytest.approx(0.5 ** 0.9)
    assert learning_rate(cfg, 9) == pytest.approx(0.1 ** 0.9)
    cfg.lr_decay = False
    assert learning_rate(cfg, 9) == 1.0


def test_surface_distances_in_the_bounding_box_equal_the_whole_volume():
    """The cropped computation equals the EDT of the whole volume, masks touching the border included."""
    from scipy import ndimage

    from patchblend.examples.cib.metrics import surface_distances

    def full(a, b):
        six = ndimage.generate_binary_structure(3, 1)
        sa = a & ~ndimage.binary_erosion(a, structure=six)
        sb = b & ~ndimage.binary_erosion(b, structure=six)
        return ndimage.distance_transform_edt(~sb)[sa]

    r = np.random.default_rng(3)
    for _ in range(20):
        a = ndimage.binary_dilation(r.random((12, 14, 10)) > 0.985, iterations=int(r.integers(0, 3)))
        b = ndimage.binary_dilation(r.random((12, 14, 10)) > 0.985, iterations=int(r.integers(0, 3)))
        a[0, r.integers(14), r.integers(10)] = True  # touch the border
        b[r.integers(12), 13, r.integers(10)] = True
        np.testing.assert_allclose(surface_distances(a, b), full(a, b))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_case_hd95_equals_hd95_on_random_blobs(seed):
    """evaluate_case computes the distances once for HD95 and ASD: its HD95 is hd95()'s (the 95th percentile,
    not another), on random blobs whose distances spread (checked: the 90th and 99th percentiles differ)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((2, 24, 24, 24)), (0, 2, 2, 2))  # two independent fields
    p, g = noise[0] > 0.1, noise[1] > 0.1
    r = evaluate_case(p.astype(np.float32), g, min_size=1)  # (min_size 1: nothing removed, as hd95 sees it)
    d = np.hstack([_brute_surface_distances(p, g), _brute_surface_distances(g, p)])
    assert len({np.percentile(d, q) for q in (90, 95, 99)}) == 3
    assert r["hd95"] == pytest.approx(hd95(p, g)) and r["hd95"] == pytest.approx(np.percentile(d, 95))
    assert r["asd"] == pytest.approx(asd(p, g))


def test_choose_exponents_default_floor_keeps_95_percent_of_average_detections(monkeypatch):
    """choose_exponents' default keep is 0.95: with average detecting 100 lesions, a power that detects 94 is out
    (however good its F1) and one that detects 95 is in. The evaluation is replaced by a fixed summary."""
    import types

    from patchblend.examples.cib import evaluate as evaluate_module
    from patchblend.examples.cib.posthoc import choose_exponents

    detected = {0.125: 99, 0.25: 97, 0.5: 95, 1.0: 94}
    f1 = {0.125: 60.0, 0.25: 62.0, 0.5: 64.0, 1.0: 80.0}

    def fake_summarize(rows, methods):
        out = [{"heads": "none", "blending": "average", "f1": 50.0, "detected": 100}]
        for heads, blending in methods[1:]:
            g = float(heads.split("@")[1])
            out.append({"heads": heads, "blending": blending, "f1": f1[g], "detected": detected[g]})
        return out

    monkeypatch.setattr(evaluate_module, "evaluate_model", lambda *a, **k: ([], None))
    monkeypatch.setattr(evaluate_module, "summarize", fake_summarize)
    model = types.SimpleNamespace(grid_head=types.SimpleNamespace(grid=(2, 2, 2)))
    chosen = choose_exponents(model, {"aware-posthoc": None}, [], (16, 16, 16))
    assert chosen == {("aware-tempered", w): 0.5 for w in evaluate_module.WEIGHTINGS}
    # (a floor of 0.90 would take 1.0, the best F1)
    assert set(choose_exponents(model, {"aware-posthoc": None}, [], (16, 16, 16), keep=0.9).values()) == {1.0}
