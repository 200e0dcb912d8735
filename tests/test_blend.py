"""calibrated_blend: the compiled kernels against the reference and against hand-worked cases."""
import itertools
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patchblend
from patchblend import _reference as ref
from patchblend._validate import prepare_blend_args
from kernel_variants import variant  # (tests/ is on sys.path)

COMPILED = patchblend.backend_info()["compiled"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def reference_blend(patches, weights, coords, out_shape=None, normalize="count", importance=None):
    """The oracle: the reference on the canonical arguments, shaped like the public result."""
    a = prepare_blend_args(patches, weights, coords, out_shape, normalize, importance)
    out = ref.blend_reference(a.patches, a.weights, a.coords, a.importance, a.out_shape, a.normalize)
    return out.squeeze(1) if a.spatial_dims == 2 else out


def assert_close(actual, expected, dtype):
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected.double(), atol=TOL[dtype], rtol=TOL[dtype])


def lattice(img, patch, step):
    """Raster-ordered sliding-window starts, last window flush with the border."""
    axes = []
    for i, p, s in zip(img, patch, step):
        starts = sorted({min(k * s, max(i - p, 0)) for k in range(-(-max(i - p, 0) // s) + 1)})
        axes.append(starts)
    return torch.tensor(list(itertools.product(*axes)), dtype=torch.int64)


# ---------------------------------------------------------------- hand-worked cases (Eq. 1, Eq. 2)


def test_eq1_patch_weights_count_by_hand():
    # Two 1×1×4 patches on a 1×1×6 line, starting at 0 and 2; patch values 1 and 3, weights 0.5 and 2.
    patches = torch.tensor([1.0, 3.0]).reshape(2, 1, 1, 1, 1).expand(2, 1, 1, 1, 4).contiguous()
    coords = torch.tensor([[0, 0, 0], [0, 0, 2]])
    weights = torch.tensor([0.5, 2.0])
    out = patchblend.calibrated_blend(patches, weights, coords)
    # voxels 0,1: only patch 0 -> 0.5*1/1; voxels 2,3: both -> (0.5*1 + 2*3)/2; voxels 4,5: 2*3/1
    expected = torch.tensor([0.5, 0.5, 3.25, 3.25, 6.0, 6.0]).reshape(1, 1, 1, 6)
    torch.testing.assert_close(out, expected)
    weighted_mean = patchblend.calibrated_blend(patches, weights, coords, normalize="weight")
    torch.testing.assert_close(weighted_mean, torch.tensor([1.0, 1.0, 6.5 / 2.5, 6.5 / 2.5, 3.0, 3.0]).reshape(1, 1, 1, 6))
    weighted_sum = patchblend.calibrated_blend(patches, weights, coords, normalize="none")
    torch.testing.assert_close(weighted_sum, torch.tensor([0.5, 0.5, 6.5, 6.5, 6.0, 6.0]).reshape(1, 1, 1, 6))


def test_eq2_grid_weights_count_by_hand():
    # One 1×1×5 patch with a 1×1×2 grid: cells by k*g//P = [0,0,0,1,1]; a second patch of ones at 3 with
    # cell weights [1, 0] (cells of its voxels 3..7: [0,0,0,1,1]).
    patches = torch.stack([torch.arange(1.0, 6.0), torch.ones(5)]).reshape(2, 1, 1, 1, 5)
    weights = torch.tensor([[0.5, 2.0], [1.0, 0.0]]).reshape(2, 1, 1, 2)
    coords = torch.tensor([[0, 0, 0], [0, 0, 3]])
    out = patchblend.calibrated_blend(patches, weights, coords, (1, 1, 8))
    first = [0.5 * 1, 0.5 * 2, 0.5 * 3, 2.0 * 4, 2.0 * 5]
    expected = [first[0], first[1], first[2], (first[3] + 1.0) / 2, (first[4] + 1.0) / 2, 1.0, 0.0, 0.0]
    torch.testing.assert_close(out.flatten(), torch.tensor(expected))
    # "weight": voxels 6 and 7 see only the zero-weight cell / nothing -> 0
    wm = patchblend.calibrated_blend(patches, weights, coords, (1, 1, 8), normalize="weight")
    torch.testing.assert_close(wm.flatten(), torch.tensor([1, 2, 3, (8 + 1) / 3, (10 + 1) / 3, 1, 0, 0.0]))


def test_odd_patch_grid_cells_follow_k_g_over_p():
    # P = 5, g = 2 -> cells [0,0,0,1,1]; P = 3, g = 3 -> [0,1,2]
    assert ref.cell_index(5, 2).tolist() == [0, 0, 0, 1, 1]
    assert ref.cell_index(3, 3).tolist() == [0, 1, 2]
    patches = torch.ones(1, 1, 3, 1, 5)
    weights = torch.arange(1.0, 7.0).reshape(1, 3, 1, 2)
    out = patchblend.calibrated_blend(patches, weights, [[0, 0, 0]], normalize="none")
    expected = torch.tensor([[1, 1, 1, 2, 2], [3, 3, 3, 4, 4], [5, 5, 5, 6, 6.0]]).reshape(1, 3, 1, 5)
    torch.testing.assert_close(out, expected)


def test_importance_multiplies_and_uncovered_is_zero():
    patches = torch.full((1, 2, 2, 2, 2), 4.0)
    imp = torch.tensor([0.5, 1.0]).reshape(1, 1, 2).expand(2, 2, 2).contiguous()
    out = patchblend.calibrated_blend(patches, None, [[1, 1, 1]], (4, 4, 4), normalize="none", importance=imp)
    assert out.shape == (2, 4, 4, 4)
    torch.testing.assert_close(out[:, 1:3, 1:3, 1], torch.full((2, 2, 2), 2.0))
    torch.testing.assert_close(out[:, 1:3, 1:3, 2], torch.full((2, 2, 2), 4.0))
    mask = torch.ones(4, 4, 4, dtype=torch.bool)
    mask[1:3, 1:3, 1:3] = False
    assert (out[:, mask] == 0).all()
    # "weight" divides the importance back out
    wm = patchblend.calibrated_blend(patches, None, [[1, 1, 1]], (4, 4, 4), normalize="weight", importance=imp)
    torch.testing.assert_close(wm[:, 1:3, 1:3, 1:3], torch.full((2, 2, 2, 2), 4.0))


def test_clipped_and_negative_coords():
    patches = torch.arange(8.0).reshape(1, 1, 2, 2, 2)
    out = patchblend.calibrated_blend(patches, None, [[-1, -1, -1]], (2, 2, 2))
    assert out[0, 0, 0, 0] == 7.0
    assert out.sum() == 7.0
    out = patchblend.calibrated_blend(patches, None, [[5, 5, 5]], (2, 2, 2))
    assert (out == 0).all()


def test_default_out_shape_and_2d():
    patches = torch.rand(3, 2, 4, 5)
    coords = torch.tensor([[0, 0], [2, 3], [1, 1]])
    out = patchblend.calibrated_blend(patches, torch.rand(3, 2, 2), coords)
    assert out.shape == (2, 6, 8)
    w = torch.rand(3, 2, 2)
    assert_close(patchblend.calibrated_blend(patches, w, coords), reference_blend(patches, w, coords), torch.float32)


def test_zero_patches_gives_zeros():
    out = patchblend.calibrated_blend(torch.zeros(0, 3, 4, 4, 4), None, torch.zeros(0, 3, dtype=torch.long), (5, 6, 7))
    assert out.shape == (3, 5, 6, 7) and (out == 0).all()
    out = patchblend.calibrated_blend(torch.zeros(0, 1, 4, 4, 4), torch.zeros(0), [], (2, 2, 2), normalize="weight")
    assert out.shape == (1, 2, 2, 2) and (out == 0).all()


# ---------------------------------------------------------------- properties against the reference


@st.composite
def blend_cases(draw):
    nd = draw(st.sampled_from([3, 3, 2]))
    # the last axis long enough, at times, for the vectorised row loops (8 floats per step) to run
    patch = tuple(draw(st.integers(1, 6)) for _ in range(nd - 1)) + (draw(st.integers(1, 20)),)
    out_shape = tuple(draw(st.integers(1, 12)) for _ in range(nd - 1)) + (draw(st.integers(1, 40)),)
    n = draw(st.integers(0, 7))
    c = draw(st.integers(1, 3))
    if draw(st.booleans()) and n > 0:  # a sliding-window lattice (the fast path)
        step = tuple(draw(st.integers(1, p)) for p in patch)
        coords = lattice(out_shape, patch, step)
        if draw(st.booleans()):
            coords = coords[torch.randperm(len(coords), generator=torch.Generator().manual_seed(n))]
        n = len(coords)
    else:  # arbitrary starts, out of range and duplicates allowed
        coords = torch.tensor(
            [[draw(st.integers(-p, o)) for p, o in zip(patch, out_shape)] for _ in range(n)], dtype=torch.int64
        ).reshape(n, nd)
    kind = draw(st.sampled_from(["none", "patch", "grid"]))
    grid = tuple(draw(st.integers(1, p)) for p in patch)
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
    wdtype = draw(st.sampled_from([torch.float32, torch.float64, dtype]))
    normalize = draw(st.sampled_from(["count", "weight", "none"]))
    use_importance = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return dict(patch=patch, out_shape=out_shape, n=n, c=c, coords=coords, kind=kind, grid=grid, dtype=dtype,
                wdtype=wdtype, normalize=normalize, use_importance=use_importance, seed=seed,
                zero_weights=draw(st.booleans()))


def make_inputs(case, device):
    g = torch.Generator().manual_seed(case["seed"])
    patches = torch.rand((case["n"], case["c"], *case["patch"]), generator=g).to(case["dtype"]).to(device)
    weights = None
    if case["kind"] == "patch":
        weights = torch.rand(case["n"], generator=g)
    elif case["kind"] == "grid":
        weights = torch.rand((case["n"], *case["grid"]), generator=g)
    if weights is not None:
        if case["zero_weights"]:
            weights = weights * (weights > 0.3)
        weights = weights.to(case["wdtype"]).to(device)
    importance = torch.rand(case["patch"], generator=g).to(device) if case["use_importance"] else None
    return patches, weights, case["coords"].to(device), importance


@settings(max_examples=120)
@given(case=blend_cases())
def test_matches_reference(case):
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        patches, weights, coords, importance = make_inputs(case, device)
        out = patchblend.calibrated_blend(patches, weights, coords, case["out_shape"], normalize=case["normalize"],
                                          importance=importance)
        expected = reference_blend(patches, weights, coords, case["out_shape"], case["normalize"], importance)
        assert_close(out, expected, case["dtype"])


@pytest.mark.skipif(not COMPILED, reason="needs the compiled kernel")
@settings(max_examples=40)
@given(case=blend_cases())
def test_cpu_row_kernel_equals_per_voxel_kernel_bitwise(case):
    """The CPU's row kernel (blend_run) and the CUDA kernel's per-voxel function (blend_voxel, run on the CPU in
    a second process: PATCHBLEND_CPU_KERNEL is read once) sum the same terms in the same order: bitwise equal
    results."""
    patches, weights, coords, importance = make_inputs(case, "cpu")
    args = (patches, weights, coords, case["out_shape"])
    kwargs = dict(normalize=case["normalize"], importance=importance)
    per_voxel = variant("PATCHBLEND_CPU_KERNEL", "voxel").call(patchblend.calibrated_blend, *args, **kwargs)
    rows = patchblend.calibrated_blend(*args, **kwargs)
    assert torch.equal(rows, per_voxel)


def test_sliding_window_lattice_matches_reference(device):
    img, patch = (23, 19, 21), (8, 7, 9)
    coords = lattice(img, patch, (4, 3, 5))
    patches = torch.rand(len(coords), 2, *patch, device=device)
    w = torch.rand(len(coords), 2, 2, 2, device=device)
    imp = torch.rand(patch, device=device)
    for normalize in ("count", "weight", "none"):
        out = patchblend.calibrated_blend(patches, w, coords, img, normalize=normalize, importance=imp)
        assert_close(out, reference_blend(patches, w, coords, img, normalize, imp), torch.float32)


def test_deterministic_bitwise(device):
    torch.manual_seed(1)
    coords = torch.cat([lattice((20, 20, 20), (8, 8, 8), (3, 3, 3)), torch.randint(-4, 18, (30, 3))])
    patches = torch.randn(len(coords), 3, 8, 8, 8, device=device)
    w = torch.rand(len(coords), 2, 2, 2, device=device)
    first = patchblend.calibrated_blend(patches, w, coords, (20, 20, 20), normalize="weight")
    for _ in range(3):
        assert torch.equal(first, patchblend.calibrated_blend(patches, w, coords, (20, 20, 20), normalize="weight"))


def test_extract_patches_is_the_adjoint(device):
    vol = torch.rand(2, 9, 8, 7, device=device)
    coords = torch.tensor([[0, 0, 0], [-2, 3, 4], [6, 6, 6], [20, 0, 0]])
    out = patchblend.extract_patches(vol, coords, (4, 4, 4))
    expected = ref.extract_patches(vol, coords.to(device), (4, 4, 4))
    assert torch.equal(out, expected)
    # <blend(p), v> == <p, extract(v)> for an unweighted "none" blend
    p = torch.rand(4, 2, 4, 4, 4, device=device, dtype=torch.float64)
    v = vol.double()
    lhs = (patchblend.calibrated_blend(p, None, coords, (9, 8, 7), normalize="none") * v).sum()
    rhs = (p * patchblend.extract_patches(v, coords, (4, 4, 4))).sum()
    torch.testing.assert_close(lhs, rhs)
    out2d = patchblend.extract_patches(vol[:, 0], coords[:, 1:], (3, 3))
    depth1 = ref.extract_patches(vol[:, :1], torch.nn.functional.pad(coords[:, 1:], (1, 0)).to(device), (1, 3, 3))
    assert out2d.shape == (4, 2, 3, 3) and torch.equal(out2d, depth1[:, :, 0])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(weights=torch.tensor([1.0, -0.5])), ValueError, "weights"),
        (dict(weights=torch.tensor([1.0, float("nan")])), ValueError, "weights"),
        (dict(weights=torch.tensor([1.0, float("inf")])), ValueError, "weights"),
        (dict(weights=torch.ones(3)), ValueError, "weights"),
        (dict(weights=torch.ones(2, 5, 1, 1)), ValueError, "weights"),
        (dict(weights=torch.ones(2, 2, 2)), ValueError, "weights"),
        (dict(weights=torch.ones(2, dtype=torch.int64)), TypeError, "weights"),
        (dict(weights=torch.ones(2, device="meta")), ValueError, "weights"),
        (dict(coords=torch.zeros(2, 3)), TypeError, "coords"),
        (dict(coords=torch.zeros(3, 3, dtype=torch.long)), ValueError, "coords"),
        (dict(coords=torch.zeros(2, 2, dtype=torch.long)), ValueError, "coords"),
        (dict(normalize="mean"), ValueError, "normalize"),
        (dict(importance=torch.ones(4, 4)), ValueError, "importance"),
        (dict(importance=-torch.ones(4, 4, 4)), ValueError, "importance"),
        (dict(importance=torch.ones(4, 4, 4, device="meta")), ValueError, "importance"),
        (dict(patches=torch.ones(2, 1, 4, 4, 4, dtype=torch.int32)), TypeError, "patches"),
        (dict(patches=torch.ones(2, 4, 4)), ValueError, "patches"),
        (dict(out_shape=(4, 4)), ValueError, "out_shape"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, word):
    args = dict(patches=torch.ones(2, 1, 4, 4, 4), weights=None, coords=torch.zeros(2, 3, dtype=torch.long),
                out_shape=(4, 4, 4), normalize="count", importance=None)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        patchblend.calibrated_blend(args.pop("patches"), args.pop("weights"), args.pop("coords"), args.pop("out_shape"),
                                    **args)


def test_out_shape_required_for_zero_patches():
    with pytest.raises(ValueError, match="out_shape"):
        patchblend.calibrated_blend(torch.zeros(0, 1, 2, 2, 2), None, torch.zeros(0, 3, dtype=torch.long))


# ---------------------------------------------------------------- autograd, custom-op machinery, compile


def _gradcheck_case(normalize, kind, importance):
    torch.manual_seed(3)
    coords = torch.tensor([[0, 0, 0], [0, 1, 2], [2, 0, 1], [-1, 2, 2]])
    patches = torch.rand(4, 2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    if kind == "patch":
        weights = (torch.rand(4, dtype=torch.float64) + 0.1).requires_grad_()
    else:
        weights = (torch.rand(4, 2, 1, 2, dtype=torch.float64) + 0.1).requires_grad_()
    imp = torch.rand(3, 3, 4, dtype=torch.float64) + 0.1 if importance else None
    return patches, weights, coords, imp


@pytest.mark.parametrize("normalize", ["count", "weight", "none"])
@pytest.mark.parametrize("kind", ["patch", "grid"])
@pytest.mark.parametrize("importance", [False, True])
def test_gradcheck(normalize, kind, importance):
    patches, weights, coords, imp = _gradcheck_case(normalize, kind, importance)

    def f(p, w):
        return patchblend.calibrated_blend(p, w, coords, (5, 4, 6), normalize=normalize, importance=imp)

    assert torch.autograd.gradcheck(f, (patches, weights))


@pytest.mark.parametrize("normalize", ["count", "weight", "none"])
@pytest.mark.parametrize("kind", [None, "patch", "grid"])
def test_gradcheck_importance(normalize, kind):
    # the importance map is differentiable too (with and without weights; "weight" mode divides by it)
    patches, weights, coords, imp = _gradcheck_case(normalize, kind or "patch", True)
    weights = None if kind is None else weights
    imp.requires_grad_()

    def f(p, i, w):
        return patchblend.calibrated_blend(p, w, coords, (5, 4, 6), normalize=normalize, importance=i)

    assert torch.autograd.gradcheck(f, (patches, imp, weights))


def test_extract_gradcheck():
    # extraction is differentiable in the volume: its backward is the unweighted blend with normalize="none"
    volume = torch.rand(2, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    coords = torch.tensor([[0, 0, 0], [2, 1, 3], [-1, 2, 4], [3, -2, -1]])  # partly outside
    assert torch.autograd.gradcheck(lambda v: patchblend.extract_patches(v, coords, (3, 3, 3)), (volume,))
    torch.library.opcheck(torch.ops.patchblend.extract.default, (volume, coords, [3, 3, 3]))


def test_gradient_matches_reference_autograd():
    patches, weights, coords, imp = _gradcheck_case("weight", "grid", True)
    g = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    for normalize in ("count", "weight", "none"):
        out = patchblend.calibrated_blend(patches, weights, coords, (5, 4, 6), normalize=normalize, importance=imp)
        got = torch.autograd.grad((out * g).sum(), (patches, weights))
        expected_out = reference_blend(patches, weights, coords, (5, 4, 6), normalize, imp)
        expected = torch.autograd.grad((expected_out * g).sum(), (patches, weights))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)


def test_mixed_dtype_gradients_keep_dtypes():
    patches = torch.rand(2, 1, 3, 3, 3, dtype=torch.float16, requires_grad=True)
    weights = torch.rand(2, dtype=torch.float32, requires_grad=True)
    out = patchblend.calibrated_blend(patches, weights, [[0, 0, 0], [1, 1, 1]], normalize="weight")
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert patches.grad.dtype == torch.float16 and weights.grad.dtype == torch.float32
    assert torch.isfinite(weights.grad).all()


def _opcheck_samples():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 2, 3, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 2, 2, 1, generator=g, dtype=torch.float64, requires_grad=True)
    coords = torch.tensor([[0, 0, 0], [1, 2, 1], [-1, 0, 2]])
    imp = torch.rand(3, 4, 2, generator=g, dtype=torch.float64)
    return p, w, coords, imp


@pytest.mark.parametrize("normalize", ["count", "weight", "none"])
def test_opcheck_blend(normalize):
    p, w, coords, imp = _opcheck_samples()
    torch.library.opcheck(torch.ops.patchblend.blend.default, (p, w, coords, imp, [4, 6, 4], normalize))
    torch.library.opcheck(torch.ops.patchblend.blend.default, (p.detach().float(), None, coords, None, [4, 6, 4], normalize))


def test_opcheck_coverage_and_extract():
    p, w, coords, imp = _opcheck_samples()
    for normalize in ("count", "weight", "none"):
        torch.library.opcheck(torch.ops.patchblend.coverage.default,
                              (w.detach(), coords, imp, [3, 4, 2], [4, 6, 4], normalize, torch.float64))
    torch.library.opcheck(torch.ops.patchblend.extract.default, (torch.rand(2, 4, 6, 4), coords, [3, 4, 2]))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    p, w, coords, imp = _opcheck_samples()
    p, w = p.detach().float(), w.detach().float()

    def f(patches, weights):
        out = patchblend.calibrated_blend(patches, weights, coords, (4, 6, 4), normalize="weight",
                                          importance=imp.float())
        return out * 2

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(p, w), f(p, w))
    p.requires_grad_()
    w.requires_grad_()
    compiled(p, w).sum().backward()
    got = (p.grad.clone(), w.grad.clone())
    p.grad = w.grad = None
    f(p, w).sum().backward()
    torch.testing.assert_close(got[0], p.grad)
    torch.testing.assert_close(got[1], w.grad)


@pytest.mark.skipif(not COMPILED, reason="checks the compiled backend against the reference backend")
def test_reference_backend_env_and_fallback_warning():
    code = (
        "import torch, patchblend, json;"
        "p = torch.arange(16.).reshape(2, 1, 2, 2, 2);"
        "o = patchblend.calibrated_blend(p, torch.tensor([1., 2.]), [[0, 0, 0], [1, 1, 1]]);"
        "print(json.dumps([patchblend.backend_info()['compiled'], o.flatten().tolist()]))"
    )
    env = dict(os.environ, PATCHBLEND_BACKEND="reference")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    compiled_flag, values = eval(res.stdout.strip().splitlines()[-1].replace("false", "False").replace("true", "True"))
    assert compiled_flag is False
    p = torch.arange(16.0).reshape(2, 1, 2, 2, 2)
    expected = patchblend.calibrated_blend(p, torch.tensor([1.0, 2.0]), [[0, 0, 0], [1, 1, 1]])
    torch.testing.assert_close(torch.tensor(values), expected.flatten())
    # a compiled library that cannot be loaded: one warning, then the reference
    broken = "import sys; sys.modules['patchblend._C'] = None\n" + code.replace(";", "\n")
    res = subprocess.run([sys.executable, "-c", broken], env=dict(os.environ, PATCHBLEND_BACKEND="auto"),
                         capture_output=True, text=True, check=True)
    assert res.stderr.count("RuntimeWarning") == 1 and "pure-PyTorch reference" in res.stderr


# ---------------------------------------------------------------- accumulate mode (streaming)


@settings(max_examples=60)
@given(case=blend_cases())
def test_blend_add_matches_reference(case):
    """blend_add_ adds the weighted sums and the denominator into existing buffers (random contents)."""
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        patches, weights, coords, importance = make_inputs(case, device)
        a = prepare_blend_args(patches, weights, coords, case["out_shape"], case["normalize"], importance)
        acc = torch.float64 if patches.dtype == torch.float64 else torch.float32
        g = torch.Generator().manual_seed(case["seed"] + 1)
        total = torch.rand((a.patches.shape[1], *a.out_shape), generator=g, dtype=acc).to(device)
        den = torch.rand(a.out_shape, generator=g, dtype=acc).to(device)
        expected_total, expected_den = total.clone(), den.clone()
        ref.blend_add_reference(expected_total, expected_den, a.patches, a.weights, a.coords, a.importance,
                                a.normalize)
        torch.ops.patchblend.blend_add_(total, den, a.patches, a.weights, a.coords, a.importance, a.normalize)
        torch.testing.assert_close(total, expected_total, atol=TOL[patches.dtype], rtol=TOL[patches.dtype])
        torch.testing.assert_close(den, expected_den, atol=1e-5, rtol=1e-5)


def test_blend_add_bad_buffers():
    p = torch.rand(2, 3, 2, 2, 2)
    coords = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="sum must be"):
        torch.ops.patchblend.blend_add_(torch.zeros(2, 4, 4, 4), None, p, None, coords, None, "count")
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        torch.ops.patchblend.blend_add_(torch.zeros(3, 4, 4, 4, dtype=torch.float64), None, p, None, coords, None,
                                        "count")
    with pytest.raises(RuntimeError, match="den must be"):
        torch.ops.patchblend.blend_add_(torch.zeros(3, 4, 4, 4), torch.zeros(4, 4), p, None, coords, None, "count")


def test_opcheck_blend_add():
    p, w, coords, imp = _opcheck_samples()
    for normalize in ("count", "weight", "none"):
        total = torch.rand(2, 4, 6, 4, dtype=torch.float64)
        den = torch.rand(4, 6, 4, dtype=torch.float64)
        torch.library.opcheck(torch.ops.patchblend.blend_add_.default,
                              (total, den, p.detach(), w.detach(), coords, imp, normalize),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("shape, dtype", [((3, 5), torch.float16), ((9, 1024, 1024), torch.float32),
                                          ((2, 64, 64, 1024), torch.int64), ((40 << 20,), torch.bool)])
def test_empty_output_is_an_ordinary_tensor(shape, dtype):
    """Large outputs live in their own huge-page mapping (compiled backend): still a normal, writable,
    contiguous CPU tensor whose memory is released with it. Such storage cannot grow (the stable ABI hands it
    to torch with from_blob): resize_ past its size is a clear error, and a clone resizes as usual."""
    from patchblend.ops import empty_output, zeros_output

    t = empty_output(shape, dtype, "cpu")
    assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    nbytes = t.numel() * t.element_size()
    own_mapping = COMPILED and nbytes >= 32 << 20 and sys.platform.startswith("linux")
    if own_mapping:
        assert t.data_ptr() % (2 << 20) == 0  # its own 2 MiB-aligned mapping
    t.fill_(1)
    assert int(t.sum()) == t.numel()
    if own_mapping:
        u = t.clone()
        with pytest.raises(RuntimeError, match="not resizable"):
            t.resize_(t.numel() + 1000)  # torch has already set the new sizes: t is unusable, as with numpy memory
        del t
        t = u
    t.resize_(t.numel() + 1000)  # an ordinary storage grows
    t[-1] = 0
    assert int(t[: t.numel() - 1000].sum()) == t.numel() - 1000
    z = zeros_output(shape, dtype, "cpu")
    assert not z.any()
    del t, z


def test_empty_cache_releases_the_kept_block():
    """After a large output is freed its block is kept for the next one (compiled, Linux); empty_cache
    releases it and says how many bytes; a kept block is reused only for a request it fits."""
    from patchblend.ops import empty_output

    patchblend.empty_cache()
    t = empty_output((40 << 20,), torch.float32, "cpu")  # 160 MiB
    address = t.data_ptr()
    del t
    large = COMPILED and sys.platform.startswith("linux")
    u = empty_output((30 << 20,), torch.float32, "cpu")  # fits: at least its size, at most twice it
    assert (u.data_ptr() == address) == large
    u.fill_(2)  # the reused block is ordinary memory
    assert float(u[-1]) == 2
    del u
    assert patchblend.empty_cache() == ((40 << 20) * 4 if large else 0)
    assert patchblend.empty_cache() == 0


@pytest.mark.skipif(not (COMPILED and sys.platform.startswith("linux")), reason="huge-page outputs: compiled, Linux")
def test_blocks_over_one_gib_are_not_kept():
    from patchblend.ops import empty_output

    patchblend.empty_cache()
    t = empty_output((257 << 20,), torch.float32, "cpu")  # 1028 MiB, never touched: no memory used
    del t
    assert patchblend.empty_cache() == 0


# ---------------------------------------------------------------- index memory: O(patches), not O(output)

@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 6), p=st.lists(st.integers(1, 5), min_size=3, max_size=3),
       out=st.lists(st.integers(20, 90), min_size=3, max_size=3), seed=st.integers(0, 10 ** 6),
       grid=st.booleans(), normalize=st.sampled_from(["count", "weight", "none"]))
def test_sparse_patches_in_a_large_output_match_the_reference(n, p, out, seed, grid, normalize):
    """A few small patches in a large output: the tile index then uses tiles larger than the patches (at most
    max(4096, 8 N) tiles); every voxel still sees exactly its covering patches, in patch order."""
    g = torch.Generator().manual_seed(seed)
    patches = torch.rand(n, 2, *p, generator=g)
    coords = torch.stack([torch.randint(-q + 1, o, (n,), generator=g) for q, o in zip(p, out)], 1)
    weights = torch.rand(n, *[min(2, q) for q in p], generator=g) + 0.1 if grid else torch.rand(n, generator=g)
    got = patchblend.calibrated_blend(patches, weights, coords, out, normalize=normalize)
    assert_close(got, reference_blend(patches, weights, coords, out, normalize), torch.float32)


@pytest.mark.skipif(not COMPILED or not sys.platform.startswith("linux"), reason="compiled kernel; Linux /proc")
def test_index_memory_does_not_grow_with_the_output():
    """Two 1x1x1 patches into a 256^3 output (64 MiB): the peak memory is the output, not an index of 24 bytes per
    output voxel (384 MiB before)."""
    code = (
        "import torch, patchblend\n"
        "patchblend.calibrated_blend(torch.rand(1, 1, 1, 1, 1), None, torch.zeros(1, 3, dtype=torch.long), (2, 2, 2))\n"
        "def field(k):\n"
        "    return [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(k + ':')][0]\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "base = field('VmRSS')\n"
        "out = patchblend.calibrated_blend(torch.ones(2, 1, 1, 1, 1), None, torch.tensor([[5, 100, 7], [250, 2, 255]]),"
        " (256, 256, 256))\n"
        "assert out.sum().item() == 2.0\n"
        "print((field('VmHWM') - base) / 1024)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if res.returncode != 0 and "clear_refs" in res.stderr:
        pytest.skip("cannot reset the peak RSS here")
    assert res.returncode == 0, res.stderr
    assert float(res.stdout.strip().splitlines()[-1]) < 1.5 * 64  # MiB: the output and a little slack
