"""The CIB example's phantom generator and MSSEG-2 loader."""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
nib = pytest.importorskip("nibabel")
pytest.importorskip("nilearn")

from patchblend.examples.cib.data import (  # noqa: E402
    GT_NAME,
    SINGLE_NAME,
    T1_NAME,
    T2_NAME,
    MixedBatchSampler,
    find_cases,
    load_case,
    network_input,
    random_crop,
)
from patchblend.examples.cib.metrics import label_components  # noqa: E402
from patchblend.examples.cib.phantom import PhantomConfig, load_tissue_maps, make_case, write_case  # noqa: E402

CFG = PhantomConfig(downsample=4.0)


@pytest.fixture(scope="module")
def case():
    return make_case(11, CFG)


def test_phantom_is_deterministic_by_seed(case):
    again = make_case(11, CFG)
    for a, b in ((case.t1, again.t1), (case.t2, again.t2), (case.new_mask, again.new_mask)):
        assert np.array_equal(a, b)
    assert case.lesions == again.lesions
    other = make_case(12, CFG)
    assert not np.array_equal(case.t2, other.t2)


def test_phantom_shapes_and_contrast(case):
    brain, csf, gm, wm, affine = load_tissue_maps(4.0)
    assert case.t1.shape == case.t2.shape == case.new_mask.shape == brain.shape
    assert case.t1.dtype == np.float32 and case.new_mask.dtype == bool
    assert np.allclose(np.abs(np.diag(affine)[:3]), 4.0)
    # FLAIR-like: CSF darkest, white matter darker than grey matter (away from lesions)
    clean = ~case.all_mask
    level = {name: float(np.median(case.t1[(m > 0.9) & clean])) for name, m in (("csf", csf), ("gm", gm), ("wm", wm))}
    assert level["csf"] < level["wm"] < level["gm"]
    # skull-stripped: the background is exactly 0 in both time points
    for img in (case.t1, case.t2):
        assert img[0, 0, 0] == 0 and img[-1, -1, -1] == 0 and (img == 0).mean() > 0.2


def test_new_lesion_mask_matches_the_inserted_lesions(case):
    new = [les for les in case.lesions if les["kind"] == "new"]
    others = [les for les in case.lesions if les["kind"] != "new"]
    assert len(new) >= CFG.n_new[0]
    _, n = label_components(case.new_mask)
    assert n == len(new)  # one component per inserted new lesion (they never touch)
    assert case.new_mask.sum() == sum(les["voxels"] for les in new)
    for les in new:
        assert case.new_mask[tuple(np.round(les["centre"]).astype(int))]
    for les in others:
        assert not case.new_mask[tuple(np.round(les["centre"]).astype(int))]
    assert not (case.new_mask & ~case.all_mask).any()
    # new lesions are bright at follow-up only
    diff = case.t2 - case.t1
    assert diff[case.new_mask].mean() > 0.15
    existing = case.all_mask & ~case.new_mask
    assert abs(diff[existing].mean()) < diff[case.new_mask].mean() / 2


def _write(folder, arrays, affine=np.eye(4)):
    os.makedirs(folder, exist_ok=True)
    for name, arr in arrays.items():
        nib.save(nib.Nifti1Image(arr, affine), os.path.join(folder, name))


def test_loader_two_timepoints(tmp_path):
    t1 = np.zeros((12, 14, 10), np.float32)
    t2 = np.zeros_like(t1)
    gt = np.zeros(t1.shape, np.uint8)
    t1[3:9, 4:11, 2:8] = 10 + np.arange(6 * 7 * 6, dtype=np.float32).reshape(6, 7, 6) % 5
    t2[3:9, 4:11, 2:8] = 2 * t1[3:9, 4:11, 2:8]
    gt[5, 6, 4] = 1
    _write(str(tmp_path / "c1"), {T1_NAME: t1, T2_NAME: t2, GT_NAME: gt})
    c = load_case(str(tmp_path / "c1"), margin=1)
    assert not c.single
    assert c.t1.shape == (8, 9, 8)  # brain 6x7x6 plus one voxel each side
    assert c.label.sum() == 1 and c.label[3, 3, 3] == 1
    brain = c.t1 != 0
    assert brain.sum() == 6 * 7 * 6
    assert abs(c.t1[brain].mean()) < 1e-5 and abs(c.t1[brain].std() - 1) < 1e-4
    assert np.allclose(c.t1, c.t2, atol=1e-5)  # t2 = 2 t1: the same after z-scoring
    x = network_input(c.t1, c.t2)
    assert x.shape == (3, 8, 9, 8) and torch.allclose(x[2], x[1] - x[0])


def test_loader_single_timepoint_and_resampling(tmp_path):
    img = np.zeros((10, 10, 10), np.float32)
    img[2:8, 2:8, 2:8] = 5.0
    img[4, 4, 4] = 9.0
    gt = (img == 9.0).astype(np.uint8)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    _write(str(tmp_path / "s1"), {SINGLE_NAME: img, GT_NAME: gt}, aff)
    c = load_case(str(tmp_path / "s1"), margin=0)
    assert c.single and np.array_equal(c.t1, c.t2) and c.t1.shape == (6, 6, 6)
    r = load_case(str(tmp_path / "s1"), margin=0, spacing=1.0)
    assert r.t1.shape == (12, 12, 12) and np.allclose(np.diag(r.affine)[:3], 1.0)
    assert r.label.sum() == 8  # one 2 mm voxel = eight 1 mm voxels
    assert find_cases(str(tmp_path)) == [str(tmp_path / "s1")]


def test_loader_errors_name_the_problem(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=GT_NAME):
        load_case(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_case(str(tmp_path / "missing"))


def test_phantom_roundtrip_through_loader(case, tmp_path):
    write_case(case, str(tmp_path / "two"))
    write_case(case, str(tmp_path / "one"), single_timepoint=True)
    assert sorted(os.listdir(tmp_path / "two")) == sorted([T1_NAME, T2_NAME, GT_NAME, "phantom.json"])
    two = load_case(str(tmp_path / "two"))
    one = load_case(str(tmp_path / "one"))
    assert not two.single and one.single
    assert two.label.sum() == case.new_mask.sum() and one.label.sum() == case.all_mask.sum()


def test_lesion_weighted_crop_and_mixed_batches(case, tmp_path):
    write_case(case, str(tmp_path / "two"))
    write_case(make_case(5, CFG), str(tmp_path / "one"), single_timepoint=True)
    two, one = load_case(str(tmp_path / "two")), load_case(str(tmp_path / "one"))
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = random_crop(two, (16, 16, 16), rng, lesion_prob=1.0, jitter=(0, 0, 0))
        assert x.shape == (3, 16, 16, 16) and y.shape == (1, 16, 16, 16)
        assert y.sum() > 0  # centred on a lesion voxel
    big, _ = random_crop(two, (64, 64, 64), rng)  # larger than the case: zero padded
    assert big.shape == (3, 64, 64, 64)
    s = MixedBatchSampler([two], [one], (16, 16, 16), n_two=2, n_single=3, seed=1)
    x, y, single = s.sample()
    assert x.shape == (5, 3, 16, 16, 16) and y.shape == (5, 1, 16, 16, 16)
    assert single.tolist() == [False, False, True, True, True]
    assert torch.equal(x[2:, 0], x[2:, 1]) and (x[2:, 2] == 0).all()  # single time point: t1 = t2
    only_two = MixedBatchSampler([two], [], (16, 16, 16), n_two=2, n_single=2)
    assert only_two.sample()[2].tolist() == [False] * 4
