"""The CIB example's atlas column: the template's white matter registered to a case, and the lesion head that
reads it."""
import numpy as np
import pytest

pytest.importorskip("scipy")
pytest.importorskip("nilearn")

from scipy import ndimage  # noqa: E402

from patchblend.examples.cib.atlas import register_template  # noqa: E402
from patchblend.examples.cib.gating import (ATLAS_FEATURES, ATLAS_INTERACTIONS, FEATURES, LesionHead,  # noqa: E402
                                            component_features, feature_names, lesion_components, table_names)
from patchblend.examples.cib.phantom import (_rotation, _warp, load_tissue_maps, make_case,  # noqa: E402
                                             phantom_preset)

VOXEL = 4.0  # the quick preset's phantom voxels (mm): small volumes, a fast test


def _true_warp(seed):
    """The affine ``make_case`` drew for ``seed`` (its first draws)."""
    rng = np.random.default_rng(seed)
    matrix = _rotation(rng, 6.0) * rng.uniform(0.94, 1.06, 3)[None, :]
    return matrix, rng.uniform(-3, 3, 3) / VOXEL


@pytest.mark.parametrize("seed", [3])
def test_registration_recovers_the_phantoms_anatomy(seed):
    """A phantom is the template under a random affine (±6° rotation, ±6% scale, ±3 mm shift): registering
    the template to its baseline recovers that affine, and the template's white matter where it lies (what
    :func:`template_white_matter` resamples with it)."""
    case = make_case(seed, phantom_preset("hard", downsample=VOXEL))
    brain = case.t1 > 0
    matrix, offset = register_template(case.t1, brain, VOXEL)
    true_matrix, shift = _true_warp(seed)
    centre = (np.array(case.t1.shape) - 1) / 2
    true_offset = centre - true_matrix @ centre + shift
    assert np.abs(matrix - true_matrix).max() < 0.03
    # where the two affines send the brain's voxels: within half a voxel on average
    voxels = np.argwhere(brain).astype(np.float64)
    moved = np.linalg.norm(voxels @ (matrix - true_matrix).T + (offset - true_offset), axis=1)
    assert moved.mean() < 0.5
    _, _, _, wm, _ = load_tissue_maps(VOXEL)
    got = ndimage.affine_transform(wm, matrix, offset=offset, output_shape=case.t1.shape, order=1)
    true = _warp(wm, true_matrix, shift)
    assert got.shape == case.t1.shape
    assert np.abs(got - true)[brain].mean() < 0.06
    # against no registration at all, the error is several times larger
    assert np.abs(wm - true)[brain].mean() > 2 * np.abs(got - true)[brain].mean()


def _table(atlas_value):
    shape = (14, 13, 12)
    rng = np.random.default_rng(0)
    prob = np.zeros(shape)
    prob[2:6, 2:6, 2:6], prob[8:12, 7:11, 6:10] = 0.9, 0.7
    t1, t2 = rng.normal(size=shape), rng.normal(size=shape)
    ids, _ = lesion_components(prob)
    conf = {w: rng.uniform(size=shape) for w in ("patch", "grid", "patch*grid")}
    white = np.full(shape, atlas_value)
    white[8:12, 7:11, 6:10] = 0.2 * atlas_value
    return ids, component_features(ids, prob, conf, t1, t2, white_matter=white), \
        component_features(ids, prob, conf, t1, t2)


def test_atlas_column_is_the_white_matter_at_each_component_centre():
    ids, with_atlas, without = _table(0.9)
    names = feature_names(0, atlas=True)
    assert with_atlas.shape == (2, len(names)) and table_names(len(names)) == names
    assert table_names(without.shape[1]) == feature_names(0)
    np.testing.assert_allclose(with_atlas[:, names.index(ATLAS_FEATURES[0])], [0.9, 0.18])
    np.testing.assert_array_equal(np.delete(with_atlas, names.index(ATLAS_FEATURES[0]), 1), without)
    with pytest.raises(ValueError, match="white_matter must be"):
        component_features(ids, np.zeros(ids.shape), {w: np.zeros(ids.shape) for w in ("patch", "grid", "patch*grid")},
                           np.zeros(ids.shape), np.zeros(ids.shape), white_matter=np.zeros((3, 3, 3)))


def test_lesion_head_reads_the_atlas_products():
    """With the atlas column the head's design has the products atlas_wm * f of ATLAS_INTERACTIONS (one
    weight each); its state round-trips; a head fitted without the atlas reads its own columns of a table
    with it, and a head fitted with it refuses a table without it."""
    rng = np.random.default_rng(1)
    names = feature_names(2, atlas=True)
    x = rng.normal(size=(40, len(names)))
    y = rng.uniform(size=40) < 0.5
    head = LesionHead().fit(x, y)
    assert head.features == names and len(head.weight) == len(names) + len(ATLAS_INTERACTIONS)
    atlas = x[:, [names.index(ATLAS_FEATURES[0])]]
    expect = np.concatenate([x, atlas * x[:, [names.index(f) for f in ATLAS_INTERACTIONS]]], 1)
    z = (expect - head.mean) / head.std
    np.testing.assert_allclose(head.score(x), 1 / (1 + np.exp(-(z @ head.weight + head.bias))))
    again = LesionHead.from_state(head.state())
    np.testing.assert_array_equal(again.score(x), head.score(x))
    keep = [k for k, n in enumerate(names) if n != ATLAS_FEATURES[0]]
    old = LesionHead().fit(x[:, keep], y)
    assert len(old.weight) == len(keep)
    np.testing.assert_array_equal(old.score(x), old.score(x[:, keep]))
    with pytest.raises(ValueError, match="reads"):
        head.score(x[:, keep])
    assert FEATURES[:len(ATLAS_INTERACTIONS)] == ATLAS_INTERACTIONS


def test_case_white_matter_refuses_anisotropic_voxels():
    from patchblend.examples.cib.data import Case, InputError
    from patchblend.examples.cib.atlas import case_white_matter

    t1 = np.ones((4, 4, 4), np.float32)
    case = Case("c", t1, t1, np.zeros((4, 4, 4), np.uint8), False, np.diag([1.0, 1.0, 3.0, 1.0]),
                (slice(0, 4),) * 3, (4, 4, 4))
    with pytest.raises(InputError, match=r"case 'c': .*isotropic voxels.*--spacing"):
        case_white_matter(case)
    with pytest.raises(InputError, match="0.5-10 mm"):
        case_white_matter(Case("c", t1, t1, case.label, False, np.diag([20.0, 20.0, 20.0, 1.0]), case.crop,
                               case.original_shape))
