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
from patchblend.examples.cib.evaluate import (METHODS, RESULT_COLUMNS, head_quality_rows, parse_methods,  # noqa: E402
                                              predict_case)
from patchblend.examples.cib.model import CIBOutput, CIBVNet  # noqa: E402
from patchblend.examples.cib.train import TrainConfig, compute_losses, load_checkpoint, train  # noqa: E402
from patchblend.heads import GridHead, PatchHead  # noqa: E402


def test_full_size_parameter_count():
    m = CIBVNet(width=16)
    total = sum(p.numel() for p in m.parameters())
    heads = sum(p.numel() for p in m.head_parameters())
    assert total == pytest.approx(9.48e6, rel=0.01)  # docs/design.md#cib-heads: 9.48 M
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
    # with the model, the aware heads join the loss but never send gradients into the network
    m.zero_grad(set_to_none=True)
    loss, parts = compute_losses(m(x), y, single, (2, 2, 2), 1.0, 1.0, m)
    assert {"aware_patch_mse", "aware_grid_mse"} <= set(parts)
    loss.backward()
    assert all(p.grad is not None for p in m.aware_head_parameters())
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None and "aware" not in n}
    m.zero_grad(set_to_none=True)
    compute_losses(m(x), y, single, (2, 2, 2), 1.0, 1.0)[0].backward()  # without the aware heads' loss
    for n, g in grads.items():
        torch.testing.assert_close(m.get_parameter(n).grad, g, msg=n)


class _Const(torch.nn.Module):
    def __init__(self, shape, value=0.5):
        super().__init__()
        self.shape, self.value = shape, value

    def summarize(self, *inputs):
        return inputs[-1]

    def predict(self, feature):
        return torch.full((feature.shape[0], *self.shape), self.value)


class _Oracle(torch.nn.Module):
    """A fake network: predicts lesions where t2 - t1 > 0.5, and constant head scores (0.5)."""

    def __init__(self):
        super().__init__()
        self.patch_head, self.grid_head = _Const(()), _Const((2, 2, 2))

    def run(self, x):
        fg = (x[:, 2:3] > 0.5).float()
        logits = torch.stack([torch.cat([1 - fg, fg], 1) * 20 - 10] * 3, 1)
        return logits, x, x


def test_oracle_blending_removes_a_false_positive():
    t1 = np.zeros((32, 32, 32), np.float32)
    t2 = t1.copy()
    t2[3:6, 3:6, 3:6] = 1.0  # a new lesion (in the label)
    t2[26:29, 26:29, 26:29] = 1.0  # a false positive (not in the label)
    label = np.zeros(t1.shape, np.uint8)
    label[3:6, 3:6, 3:6] = 1
    case = Case("toy", t1, t2, label, False, np.eye(4), (slice(None),) * 3, t1.shape)
    pairs = {}
    from patchblend.examples.cib.evaluate import GATES

    # the gated rows need thresholds fitted on calibration cases (tests/test_cib_gating.py)
    methods = [m for m in METHODS if m[0] in ("none", "paper", "oracle") and m[1] not in GATES]
    probs = predict_case(_Oracle(), case, methods, roi=(16, 16, 16), overlap=0.5, sw_batch_size=5, head_pairs=pairs)
    assert set(probs) == set(methods)
    assert set(pairs) == {"paper"} and sum(len(p[0]) for p in pairs["paper"]) == 27  # 3 x 3 x 3 windows, once
    q = {r["head"]: r for r in head_quality_rows(pairs)}
    assert q["patch"]["pred_mean"] == pytest.approx(0.5) and q["grid"]["pred_mean"] == pytest.approx(0.5)
    assert 0 < q["patch"]["true_mean"] < 1 and 0 < q["grid"]["failure_fraction"] < 0.2  # the false positive's cells
    assert np.isnan(q["patch"]["corr"]) and q["grid"]["auroc"] == 0.5  # constant predictions: chance
    tp, fp = (slice(3, 6),) * 3, (slice(26, 29),) * 3
    assert probs[("none", "average")][tp].min() > 0.99 and probs[("none", "average")][fp].min() > 0.99
    # oracle grid: the false positive's cells score Dice 0, the lesion's cells Dice 1
    assert probs[("oracle", "grid")][tp].min() > 0.99 and probs[("oracle", "grid")][fp].max() < 1e-6
    # constant predicted scores 0.5, divided by the overlap count: everything halves
    assert np.allclose(probs[("paper", "patch")], 0.5 * probs[("none", "average")], atol=1e-5)
    assert np.allclose(probs[("paper", "patch*grid")], 0.25 * probs[("none", "average")], atol=1e-5)


def test_method_names():
    assert parse_methods(["average", "oracle-grid", "patch*grid", "aware-posthoc:grid"]) == [
        ("none", "average"), ("oracle", "grid"), ("paper", "patch*grid"), ("aware-posthoc", "grid")]
    from patchblend.examples.cib.data import InputError

    with pytest.raises(InputError, match="unknown blending 'bogus'"):
        parse_methods(["bogus"])
    with pytest.raises(InputError, match="needs the 'aware' heads"):
        parse_methods(["aware:grid"], ("none", "paper"))


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
    from patchblend.examples.cib.train import learning_rate

    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(learning_rate(cfg, 2))  # the schedule is used
    assert learning_rate(cfg, 2) == pytest.approx(1e-3 * (1 / 3) ** 0.9)
    cfg.stage2_iters, cfg.resume = 3, True
    messages = []
    train(cfg, cases=cases, log=messages.append)
    assert "resumed" in messages[0]
    assert torch.load(path, weights_only=False)["iteration"] == 5


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    cfg = DemoConfig(**{**PRESETS["quick"], "out": str(out), "progress": False, "threads": 1})
    threads = torch.get_num_threads()
    try:
        return cfg, run_demo(cfg, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)


def test_quick_demo_results_and_per_case_agree(quick_demo):
    cfg, res = quick_demo
    out = cfg.out
    with open(res["results"]) as f:
        header = next(csv.reader(f))
    assert header == ["heads", "blending", *RESULT_COLUMNS]
    results = _read(res["results"])
    from patchblend.examples.cib.evaluate import GATES
    from patchblend.examples.cib.posthoc import load_gating

    gating = load_gating(os.path.join(out, "model", "posthoc_heads.pt"))
    opt_in = ("aware-fine-posthoc", "aware-fine-tempered")  # fitted only with --posthoc ...,aware-fine
    methods = [m for m in METHODS if m[0] not in opt_in and (m[1] not in GATES or m in gating["thresholds"])]
    assert [(r["heads"], r["blending"]) for r in results] == methods
    assert ("aware-posthoc", "gate-grid") in methods and ("oracle", "gate-grid") in methods
    per_case = _read(os.path.join(out, "per_case.csv"))
    cases = sorted({r["case"] for r in per_case})
    assert cases == [f"test_{i:03d}" for i in range(cfg.n_test)]
    assert len(per_case) == cfg.n_test * len(methods)
    for r in results:
        sel = [p for p in per_case if (p["heads"], p["blending"]) == (r["heads"], r["blending"])]
        assert len(sel) == cfg.n_test
        for k in ("dice", "f1", "fdr"):
            assert float(r[k]) == pytest.approx(100 * np.mean([float(p[k]) for p in sel]), abs=1e-3)
        for k in ("detected", "gt_lesions", "true_pred", "pred_lesions"):
            assert int(r[k]) == sum(int(float(p[k])) for p in sel)
        gt = int(r["gt_lesions"])
        assert float(r["sensitivity"]) == pytest.approx(100 * int(r["detected"]) / gt, abs=1e-3) if gt else True
        assert 0 <= float(r["jaccard"]) <= float(r["dice"]) <= 100 and 0 <= float(r["f1"]) <= 100
    quality = _read(res["head_quality"])
    assert list(quality[0])[:5] == ["heads", "head", "corr", "auroc", "ece"]
    window_rows = [(h, k) for h in ("paper", "aware", "paper-posthoc", "aware-posthoc") for k in ("patch", "grid")]
    assert [(q["heads"], q["head"]) for q in quality][:8] == window_rows
    # then one lesion-level row per gated row: its statistic as a score of "true lesion"
    assert [(q["heads"], q["head"]) for q in quality][8:] == [
        (h, "lesion:" + g[len("gate-"):]) for h, g in methods if g in GATES]
    assert os.path.getsize(res["figure"]) > 1000 and os.path.getsize(res["reliability"]) > 1000
    assert os.path.isfile(os.path.join(out, "model", "last.pt"))
    assert os.path.isfile(os.path.join(out, "model", "posthoc_heads.pt"))


def test_quick_demo_average_row_matches_monai(quick_demo):
    """The per-case metrics of `average` equal MONAI's own sliding-window average of the same network,
    scored by evaluate_case: the table's baseline is MONAI's."""
    from monai.inferers import sliding_window_inference as monai_swi

    from patchblend.examples.cib.data import load_cases, network_input
    from patchblend.examples.cib.metrics import evaluate_case
    from patchblend.examples.cib.model import OUTPUT_NEW

    cfg, res = quick_demo
    model, _, _ = load_checkpoint(os.path.join(cfg.out, "model", "last.pt"))
    per_case = {r["case"]: r for r in _read(os.path.join(cfg.out, "per_case.csv")) if r["blending"] == "average"}
    for case in load_cases(os.path.join(cfg.out, "data", "test_hard")):
        x = network_input(case.t1, case.t2)[None]
        with torch.no_grad():
            prob = monai_swi(x, (cfg.patch,) * 3, 4, lambda w: model(w).probs(OUTPUT_NEW), overlap=cfg.overlap)
        m = evaluate_case(prob[0, 0].numpy(), case.label)
        row = per_case[case.name]
        for k in ("dice", "f1", "fdr", "detected", "pred_lesions"):
            assert float(row[k]) == pytest.approx(m[k], abs=1e-6), (case.name, k)


def test_quick_demo_training_length(quick_demo):
    cfg, res = quick_demo
    rows = _read(os.path.join(cfg.out, "training_length.csv"))
    total = cfg.stage1_iters + cfg.stage2_iters
    its = sorted({int(r["iteration"]) for r in rows})
    assert its == list(range(1, total + 1))  # ckpt_every = total // 4 = 1 for the quick preset
    for r in rows:
        assert int(r["stage"]) == (1 if int(r["iteration"]) <= cfg.stage1_iters else 2)
    from patchblend.examples.cib.demo import SWEEP_METHODS
    from patchblend.examples.cib.evaluate import method_name

    assert [method_name((r["heads"], r["blending"])) for r in rows if int(r["iteration"]) == 1] == list(SWEEP_METHODS)
    final = {(r["heads"], r["blending"]): r for r in rows if int(r["iteration"]) == total}
    for r in _read(res["results"]):
        if (r["heads"], r["blending"]) in final:  # the last snapshot is the final model: same numbers
            for k in ("dice", "f1", "fdr", "detected"):
                assert float(final[(r["heads"], r["blending"])][k]) == pytest.approx(float(r[k]), abs=1e-3)


def test_study_aggregates_seeds(tmp_path):
    from patchblend.examples.cib.study import StudyConfig, run_study

    cfg = StudyConfig(**{**PRESETS["quick"], "out": str(tmp_path / "study"), "progress": False, "threads": 1,
                         "seeds": "0,1", "posthoc": "aware", "n_test": 1})
    threads = torch.get_num_threads()
    try:
        res = run_study(cfg, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    study = _read(tmp_path / "study" / "study.csv")
    seeds = [_read(tmp_path / "study" / f"seed_{s}" / "results.csv") for s in (0, 1)]
    assert len(study) == len(seeds[0])
    assert os.path.isdir(tmp_path / "study" / "data" / "train") and not os.path.exists(tmp_path / "study" / "seed_0" / "data")
    for i, row in enumerate(study):
        vals = [float(s[i]["f1"]) for s in seeds]
        assert float(row["f1_mean"]) == pytest.approx(np.mean(vals), abs=1e-3)
        assert float(row["f1_std"]) == pytest.approx(np.std(vals, ddof=1), abs=1e-3)
        assert int(row["seeds"]) == 2
    assert _read(tmp_path / "study" / "study_head_quality.csv")[0]["heads"] == "paper"
    assert "mean ± std over 2 backbone seeds" in res["text"]
    # resuming reads the finished seeds instead of training again
    messages = []
    run_study(cfg, log=messages.append)
    assert any("reading" in m for m in messages) and not any("training" in str(m) for m in messages)


def test_select_exponent():
    from patchblend.examples.cib.posthoc import select_exponent

    stats = {0.125: (60.0, 50), 0.25: (65.0, 49), 0.5: (70.0, 45), 1.0: (75.0, 30)}
    assert select_exponent(stats, floor=47.5) == 0.25  # 0.5 and 1.0 lose too many lesions
    assert select_exponent(stats, floor=45) == 0.5
    assert select_exponent(stats, floor=51) == 0.125  # none keeps enough: the gentlest
    assert select_exponent({0.25: (70.0, 50), 0.5: (70.0, 50)}, floor=0) == 0.25  # ties: the gentler


def test_evaluate_with_the_demo_posthoc_file_reproduces_the_tempered_rows(quick_demo, tmp_path):
    from patchblend.examples.cib.__main__ import main

    cfg, res = quick_demo
    blob = torch.load(os.path.join(cfg.out, "model", "posthoc_heads.pt"), weights_only=False)
    exps = blob["meta"]["exponents"]
    assert set(exps) == {f"{h}-tempered:{w}" for h in ("aware", "paper") for w in ("patch", "grid", "patch*grid")}
    from patchblend.examples.cib.posthoc import EXPONENTS

    assert set(exps.values()) <= set(EXPONENTS)
    names = ["average", "aware-tempered:grid", "paper-tempered:patch*grid", "aware-posthoc:patch",
             "aware-posthoc:gate-grid", "oracle:gate-patch*grid"]
    out = tmp_path / "eval"
    assert main(["evaluate", "--ckpt", os.path.join(cfg.out, "model", "last.pt"), "--data",
                 os.path.join(cfg.out, "data", "test_hard"), "--posthoc", os.path.join(cfg.out, "model", "posthoc_heads.pt"),
                 "--out", str(out), "--no-figure", "--roi", str(cfg.patch), "--sw-batch-size", str(cfg.sw_batch_size),
                 "--blendings", ",".join(names)]) == 0
    again = {(r["heads"], r["blending"]): r for r in _read(out / "results.csv")}
    demo = {(r["heads"], r["blending"]): r for r in _read(res["results"])}
    assert len(again) == 6
    for key, row in again.items():
        for k in ("dice", "f1", "fdr", "detected", "pred_lesions"):
            assert float(row[k]) == pytest.approx(float(demo[key][k]), abs=1e-4), (key, k)
