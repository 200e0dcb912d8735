"""The CIB example's gated rows: the blended confidence, the lesion head, the gate and its threshold."""
import numpy as np
import pytest
import torch

pytest.importorskip("scipy")

from patchblend import CalibratedOutput  # noqa: E402
from patchblend.examples.cib.data import Case, InputError  # noqa: E402
from patchblend.examples.cib.evaluate import (CalibratedPredictor, best_row, parse_methods,  # noqa: E402
                                              predict_case)
from patchblend.examples.cib.gating import (CONFIDENCE_FEATURES, FEATURES, TISSUE_FEATURES, GATES,  # noqa: E402
                                            LesionHead, blended_confidence, component_context,
                                            component_features, component_truth, confidence_features,
                                            decoder_feature_map, feature_names, fit_gating, gating_from_state,
                                            gating_state, lesion_components, tissue_classes)
from patchblend.inference import sliding_window_inference  # noqa: E402


class _Const(torch.nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = shape

    def summarize(self, *inputs):
        return inputs[-1]

    def predict(self, feature):  # a score that differs between windows: their mean input
        m = feature.mean(dim=tuple(range(1, feature.dim()))).sigmoid()
        return m.view(-1, *([1] * len(self.shape))).expand(-1, *self.shape).contiguous()


class _Toy(torch.nn.Module):
    """A fake network: lesions where t2 - t1 > 0.5; window-varying head scores."""

    def __init__(self):
        super().__init__()
        self.patch_head, self.grid_head = _Const(()), _Const((2, 2, 2))

    def run(self, x):
        fg = (x[:, 2:3] > 0.5).float()
        logits = torch.stack([torch.cat([1 - fg, fg], 1) * 20 - 10] * 3, 1)
        return logits, x, x


def toy_case(name="toy", fp=True):
    t1 = np.zeros((32, 32, 32), np.float32)
    t2 = t1.copy()
    t2[3:6, 3:6, 3:6] = 1.0  # a new lesion (27 voxels, in the label)
    if fp:
        t2[24:28, 24:28, 24:28] = 1.0  # a false positive (64 voxels)
    label = np.zeros(t1.shape, np.uint8)
    label[3:6, 3:6, 3:6] = 1
    return Case(name, t1, t2, label, False, np.eye(4), (slice(None),) * 3, t1.shape)


def test_blended_confidence_is_the_average_of_window_constant_scores():
    """C = Σ α / N: for patch weights it equals plain averaging of windows filled with their score, for
    grid weights of windows filled cell by cell (an independent path through the driver)."""
    case = toy_case()
    model = _Toy()
    from patchblend.examples.cib.data import network_input

    x = network_input(case.t1, case.t2)
    inputs = torch.cat([x, torch.as_tensor(case.label, dtype=torch.float32)[None]])[None]
    pred = CalibratedPredictor(model, "cpu", (2, 2, 2))
    pred.start("paper", replay=False)
    sliding_window_inference(inputs, [16] * 3, 3, pred, overlap=0.5, mode="constant", weighting="patch",
                             normalize="count")
    for weighting in ("patch", "grid", "patch*grid"):
        got = blended_confidence(pred, inputs, (16,) * 3, 3, 0.5, "paper", weighting)

        def filled(windows):
            patch, grid = model.patch_head.predict(windows[:, :3]), model.grid_head.predict(windows[:, :3])
            g = grid.repeat_interleave(8, 1).repeat_interleave(8, 2).repeat_interleave(8, 3)[:, None]
            w = {"patch": patch.view(-1, 1, 1, 1, 1).expand_as(g), "grid": g,
                 "patch*grid": patch.view(-1, 1, 1, 1, 1) * g}[weighting]
            return w.double()

        expect = sliding_window_inference(inputs.double(), [16] * 3, 3, filled, overlap=0.5, mode="constant")
        np.testing.assert_allclose(got, expect[0, 0].numpy(), rtol=1e-5, atol=1e-6)
        assert got.min() > 0 and got.max() < 1


def test_oracle_gate_keeps_the_lesion_and_drops_the_false_positive():
    cases = [toy_case(f"c{i}") for i in range(3)]
    comps = {}
    for c in cases:
        predict_case(_Toy(), c, ["average"], roi=(16, 16, 16), overlap=0.5, sw_batch_size=4, components=comps,
                     component_sets=("oracle", "paper"))
    assert [len(c["truth"]) for c in comps["oracle"]] == [2, 2, 2]
    assert comps["oracle"][0]["truth"].tolist() == [True, False]
    assert comps["oracle"][0]["features"].shape == (2, len(feature_names(3)))  # the toy's decoder: 3 channels
    gating = fit_gating(comps, log=lambda *a: None)
    t = gating["thresholds"][("oracle", "gate-grid")]
    assert t.kept_fraction == 1.0 and t.tau > 0  # the false positive's cells score 0
    assert "paper" in gating["lesion_heads"] and ("paper", "gate-lesion") in gating["thresholds"]
    # saved and loaded as plain data
    again = gating_from_state(gating_state(gating))
    assert again["thresholds"] == gating["thresholds"]
    x = comps["paper"][0]["features"]
    np.testing.assert_allclose(again["lesion_heads"]["paper"].score(x), gating["lesion_heads"]["paper"].score(x))
    # the gated row on a new case
    probs = predict_case(_Toy(), toy_case("new"), ["average", "oracle:gate-grid"], roi=(16, 16, 16), overlap=0.5,
                         sw_batch_size=4, gating=gating)
    avg, gated = probs[("none", "average")], probs[("oracle", "gate-grid")]
    assert avg[24:28, 24:28, 24:28].min() > 0.99 and gated[24:28, 24:28, 24:28].max() == 0
    np.testing.assert_array_equal(gated[:16, :16, :16], avg[:16, :16, :16])
    with pytest.raises(InputError, match="needs a gate threshold"):
        predict_case(_Toy(), toy_case("new"), ["paper:gate-grid"], roi=(16, 16, 16), overlap=0.5,
                     gating={"thresholds": {}, "lesion_heads": {}})


def test_decoder_features_are_the_averaged_last_feature_pooled_per_component():
    """The decoder map replays the recorded windows and equals plain average blending of the network's
    last feature (an independent path through the driver); the lesion head's decoder columns are its
    channel means inside each component and in the ring."""
    case = toy_case()
    model = _Toy()
    from patchblend.examples.cib.data import network_input

    x = network_input(case.t1, case.t2)
    inputs = torch.cat([x, torch.as_tensor(case.label, dtype=torch.float32)[None]])[None]
    pred = CalibratedPredictor(model, "cpu", (2, 2, 2))
    pred.start(None, replay=False)
    sliding_window_inference(inputs, [16] * 3, 3, pred, overlap=0.5, mode="constant")
    calls = len(pred._cache)
    got = decoder_feature_map(pred, inputs, (16,) * 3, 3, 0.5)
    assert len(pred._cache) == calls  # replayed, not run again
    expect = sliding_window_inference(inputs, [16] * 3, 3, lambda w: model.run(w[:, :3])[2], overlap=0.5,
                                      mode="constant")
    np.testing.assert_array_equal(got, expect[0].double().numpy())
    prob = np.zeros(case.t1.shape)
    prob[3:6, 3:6, 3:6] = 0.9
    ids, _ = lesion_components(prob)
    conf = {w: np.zeros(prob.shape) for w in ("patch", "grid", "patch*grid")}
    f = component_features(ids, prob, conf, case.t1, case.t2, got)
    names = feature_names(3)
    assert f.shape == (1, len(names)) and names[-1] == "dec_2_ring"
    for k in range(3):
        np.testing.assert_allclose(f[0, names.index(f"dec_{k}")], got[k][3:6, 3:6, 3:6].mean())
    base = len(FEATURES) + len(TISSUE_FEATURES)
    np.testing.assert_array_equal(f[:, :base], component_features(ids, prob, conf, case.t1, case.t2))
    with pytest.raises(ValueError, match="decoder must be"):
        component_features(ids, prob, conf, case.t1, case.t2, got[:, :-1])
    head = LesionHead().fit(np.concatenate([f, f + 1]), np.array([True, False]))
    assert head.features == names and LesionHead.from_state(head.state()).features == names
    with pytest.raises(ValueError, match=f"reads {base + 6} features"):
        head.score(f[:, :len(FEATURES)])
    # heads saved before the decoder columns, and before the tissue columns, read their own columns by name
    old = LesionHead().fit(np.concatenate([f, f + 1])[:, :len(FEATURES)], np.array([True, False]))
    np.testing.assert_array_equal(old.score(f), old.score(f[:, :len(FEATURES)]))
    legacy = list(FEATURES) + [n for n in names if n.startswith("dec_")]
    columns = [names.index(n) for n in legacy]
    before = LesionHead.from_state(dict(head.state(), features=legacy, mean=[0.0] * len(legacy),
                                        std=[1.0] * len(legacy), weight=np.linspace(-1, 1, len(legacy)).tolist()))
    np.testing.assert_array_equal(before.score(f), before.score(f[:, columns]))
    bad = dict(head.state(), features=list(FEATURES) + ["dec_0"])
    with pytest.raises(ValueError, match="other features"):
        LesionHead.from_state(bad)


def test_tissue_features_read_the_baseline_around_a_component():
    """A hand-worked baseline: CSF (-2) in the first two slices and at the border, white matter (0) up to slice 10,
    grey matter (1) after; a 3x3x3 component at slices 5-7 sees white matter within 3 voxels, then grey matter and
    CSF beyond."""
    t1 = np.zeros((16, 12, 12))
    t1[:2], t1[2:11], t1[11:] = -2.0, 0.0, 1.0
    t1[:, 0], t1[:, -1], t1[:, :, 0], t1[:, :, -1] = -2.0, -2.0, -2.0, -2.0  # CSF around
    t1 += 1e-3  # (a z-scored scan is 0 only outside the brain)
    ids = np.zeros(t1.shape, np.int64)
    ids[5:8, 4:7, 4:7] = 1
    classes, levels = tissue_classes(t1, np.ones(t1.shape, bool), ids)
    np.testing.assert_allclose(levels, [-2 + 1e-3, 1e-3, 1 + 1e-3])
    assert classes[5, 5, 5] == 1 and classes[12, 5, 5] == 2 and classes[0, 5, 5] == 0
    prob = np.where(ids > 0, 0.9, 0.0)
    conf = {w: np.zeros(t1.shape) for w in ("patch", "grid", "patch*grid")}
    f = component_features(ids, prob, conf, t1, t1)[0]
    col = {name: f[len(FEATURES) + k] for k, name in enumerate(TISSUE_FEATURES)}
    assert col["wm_near"] == 1.0 and col["csf_near"] == col["gm_near"] == 0.0  # slices 2-10, rows 1-9: all WM
    assert col["gm_far"] > 0 and col["csf_far"] > 0  # slices 11.. (GM), 0-1 and the border (CSF)
    assert col["t1_wm_like"] == 1.0
    assert col["csf_distance"] == pytest.approx(np.mean([min(z - 1, y, 11 - y, x, 11 - x)
                                                         for z in range(5, 8) for y in range(4, 7)
                                                         for x in range(4, 7)]))


def test_one_context_serves_every_head_set():
    """The head-independent part computed once, completed by two head sets' confidence maps: each table is
    the one computed in full, and only the confidence columns differ between them."""
    rng = np.random.default_rng(0)
    shape = (14, 13, 12)
    prob = np.zeros(shape)
    prob[2:6, 2:6, 2:6], prob[8:12, 7:11, 6:10] = 0.9, 0.7
    t1, t2 = rng.normal(size=shape), rng.normal(size=shape)
    decoder = rng.normal(size=(2,) + shape)
    ids, _ = lesion_components(prob)
    context = component_context(ids, prob, t1, t2, decoder)
    before = context.table.copy()
    confs = [{w: rng.uniform(size=shape) for w in ("patch", "grid", "patch*grid")} for _ in range(2)]
    tables = [confidence_features(context, conf) for conf in confs]
    np.testing.assert_array_equal(context.table, before)  # completed on a copy
    for conf, table in zip(confs, tables):
        np.testing.assert_array_equal(table, component_features(ids, prob, conf, t1, t2, decoder))
        assert table[1, FEATURES.index("C_grid_max")] == conf["grid"][8:12, 7:11, 6:10].max()
        np.testing.assert_allclose(table[0, FEATURES.index("C_patch")], conf["patch"][2:6, 2:6, 2:6].mean())
    differ = np.flatnonzero((tables[0] != tables[1]).any(0))
    assert [feature_names(2)[k] for k in differ] == list(CONFIDENCE_FEATURES)


def test_components_follow_the_metrics_rules():
    prob = np.zeros((12, 12, 12))
    prob[0:3, 0:3, 0:3] = 0.9  # 27 voxels
    prob[8:10, 8:10, 8:10] = 0.9  # 8 voxels: under the 11-voxel minimum
    prob[0:3, 8:12, 8:12] = 0.4  # under the threshold
    ids, sizes = lesion_components(prob)
    assert sizes.tolist() == [27] and ids.max() == 1 and ids[9, 9, 9] == 0
    label = np.zeros(prob.shape, np.uint8)
    assert component_truth(ids, label).tolist() == [False]
    label[0:3, 0:3, 0:3] = 1
    assert component_truth(ids, label).tolist() == [True]


def test_lesion_head_fits_separable_components():
    r = np.random.default_rng(0)
    x = r.normal(size=(60, len(FEATURES)))
    y = x[:, 1] + 0.1 * r.normal(size=60) > 0
    from patchblend.head_metrics import failure_auroc

    s = LesionHead(l2=1e-2).fit(x, y).score(x)
    assert ((s > 0.5) == y).mean() > 0.9
    # the default (strong) penalty shrinks the scores towards the base rate but keeps their order
    assert failure_auroc(LesionHead().fit(x, y).score(x), y.astype(float)) > 0.95
    with pytest.raises(ValueError, match="features"):
        LesionHead().fit(x[:5], y[:4])


def test_gate_names_and_best_row():
    assert parse_methods(["aware-posthoc:gate-lesion", "oracle:gate-grid"]) == [
        ("aware-posthoc", "gate-lesion"), ("oracle", "gate-grid")]
    assert set(GATES) == {"gate-patch", "gate-grid", "gate-patch*grid", "gate-lesion"}
    row = lambda h, b, f1, fdr, det: {"heads": h, "blending": b, "f1": f1, "fdr": fdr, "detected": det}  # noqa: E731
    summary = [row("none", "average", 60, 50, 40), row("a", "gate-grid", 80, 10, 37), row("a", "grid", 70, 20, 38),
               row("oracle", "grid", 95, 1, 40)]
    assert best_row(summary)["blending"] == "grid"  # 37 < 0.95 * 40 = 38
    assert best_row(summary, floor=0.9)["blending"] == "gate-grid"


def test_oracle_pass_scores_each_head_set_against_the_cells_of_its_own_grid():
    """A head set with a finer grid (4×4×4, as ``aware-fine-posthoc``) is recorded against the true Dice of
    its own cells, the 2×2×2 one against its cells: the same truths as dice_targets on each window."""
    from patchblend.examples.cib.data import network_input
    from patchblend.targets import dice_targets

    case = toy_case()
    model = _Toy()
    sets = {"coarse": ("paper", _Const(()), _Const((2, 2, 2))), "fine": ("paper", _Const(()), _Const((4, 4, 4)))}
    pairs = {}
    predict_case(model, case, ["oracle:grid"], roi=(16, 16, 16), overlap=0.5, sw_batch_size=4, head_pairs=pairs,
                 head_sets=sets, grid=(2, 2, 2))
    x = network_input(case.t1, case.t2)
    window = (slice(None), slice(0, 16), slice(0, 16), slice(0, 16))  # the first window the driver cuts
    seg = (x[window][2:3] > 0.5).float()[None]
    label = torch.as_tensor(case.label, dtype=torch.float32)[None][window][None]
    for name, cells in (("coarse", (2, 2, 2)), ("fine", (4, 4, 4))):
        _, _, pred_grid, true_grid = pairs[name][0]
        assert tuple(pred_grid.shape[1:]) == cells and tuple(true_grid.shape[1:]) == cells
        np.testing.assert_allclose(true_grid[0].numpy(), dice_targets(seg, label, grid=cells)[1][0].numpy(),
                                   atol=1e-6)


def test_fine_posthoc_heads_keep_their_grid_when_saved_and_loaded(tmp_path):
    """``aware-fine`` heads (4×4×4 cells on a 2×2×2 model) are fitted, saved with their cells and loaded
    back with them: the grid head's weights are shared over cells, so the state dict alone would load
    into a 2×2×2 head without error."""
    from patchblend.examples.cib.model import CIBVNet, head_scores
    from patchblend.examples.cib.posthoc import FINE_GRID, fit_posthoc_heads, load_heads, save_heads

    torch.manual_seed(0)
    model = CIBVNet(width=2, grid=(2, 2, 2)).eval()
    heads = fit_posthoc_heads(model, [toy_case()], ["aware-fine"], roi=(16, 16, 16), epochs={"aware": 2},
                              log=lambda *a: None)
    kind, ph, gh = heads["aware-fine-posthoc"]
    assert kind == "aware" and tuple(gh.grid) == FINE_GRID
    loaded = load_heads(save_heads(str(tmp_path / "h.pt"), heads), model)
    kind2, ph2, gh2 = loaded["aware-fine-posthoc"]
    assert kind2 == "aware" and tuple(gh2.grid) == FINE_GRID
    x = torch.randn(1, 3, 16, 16, 16)
    with torch.no_grad():
        logits, bottleneck, last = model.run(x)
        prob = torch.softmax(logits[:, 0].float(), dim=1)[:, 1:2]
        a = head_scores(kind, ph, gh, prob, bottleneck, last)
        b = head_scores(kind2, ph2, gh2, prob, bottleneck, last)
    assert a[1].shape == (1, *FINE_GRID)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_component_table_rows_and_phantom_matching(tmp_path):
    """components.csv: one row per component and gated row; the ground truth's own lesions of a written
    phantom case match its new lesions, a component away from every object matches none."""
    from patchblend.examples.cib.data import load_cases
    from patchblend.examples.cib.gating import COMPONENT_COLUMNS, GatedComponents, component_centres, component_rows
    from patchblend.examples.cib.phantom import match_phantom_objects, phantom_preset, write_phantom_set
    from patchblend.examples.cib.evaluate import phantom_matcher, write_rows

    write_phantom_set(str(tmp_path), 1, 0, seed=7, config=phantom_preset("hard", downsample=4.0), prefix="p")
    (case,) = load_cases(str(tmp_path))
    ids, sizes = lesion_components(case.label.astype(np.float64))
    assert ids.max() >= 1
    truth = component_truth(ids, case.label)
    score = np.linspace(0.1, 0.9, int(ids.max()))
    g = GatedComponents(case.name, sizes, component_centres(ids), score, truth, 0.5)
    assert g.size.tolist() == np.bincount(ids.ravel())[1:].tolist() and g.truth.all()
    for k in range(int(ids.max())):
        np.testing.assert_allclose(g.centre[k], np.argwhere(ids == k + 1).mean(0))
    rows = component_rows({("aware-posthoc", "gate-grid"): [g]}, phantom_matcher(str(tmp_path), [case]))
    assert [r["phantom_object"] for r in rows] == ["new"] * len(rows)
    assert [r["kept"] for r in rows] == [int(s >= 0.5) for s in score]
    assert {r["row"] for r in rows} == {"aware-posthoc:gate-grid"} and all(r["true_lesion"] == 1 for r in rows)
    far = np.array([[-1000.0, -1000.0, -1000.0]])
    assert match_phantom_objects(str(tmp_path / case.name), case.crop, far)[0][0] == ""
    assert match_phantom_objects(str(tmp_path), case.crop, far)[0][0] == ""  # no phantom.json there
    # a hand-worked case: the arrays start 5 voxels into the file's grid
    import json
    hand = tmp_path / "hand"
    hand.mkdir()
    json.dump({"lesions": [{"kind": "mimic", "centre": [10.0, 10.0, 10.0], "radii": [2.0, 2.0, 2.0],
                            "intensity": 0.9}]}, open(hand / "phantom.json", "w"))
    crop = (slice(5, 30),) * 3
    got = match_phantom_objects(str(hand), crop, np.array([[5.0, 5.0, 5.0], [5.0, 5.0, 8.9], [10.0, 10.0, 10.0]]))
    assert got[:2] == [("mimic", 0.9)] * 2 and got[2][0] == ""  # 2.5 semi-axes away from the object
    path = write_rows(str(tmp_path / "components.csv"), rows, COMPONENT_COLUMNS)
    assert open(path).read().splitlines()[0].startswith("case,component,size,centre_0")
    # without a matcher the object columns stay empty
    assert all(r["phantom_object"] == "" for r in component_rows({("a", "gate-grid"): [g]}))
