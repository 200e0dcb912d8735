"""blend_stream_ and LatticeBlender: streaming raster-ordered lattice windows equals one blend, bitwise."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patchblend
from patchblend import _reference as ref
from patchblend.inference import LatticeBlender, monai_gaussian
from kernel_variants import variant  # (tests/ is on sys.path)

COMPILED = patchblend.backend_info()["compiled"]
ops = torch.ops.patchblend
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def raster_lattice(axes):
    return torch.tensor(list(itertools.product(*axes)), dtype=torch.int64).reshape(-1, len(axes))


@st.composite
def stream_cases(draw):
    nd = draw(st.sampled_from([2, 3]))
    # the last axis long enough, at times, for the vectorised row loops (8 floats per step) to run
    out_shape = tuple(draw(st.integers(1, 12)) for _ in range(nd - 1)) + (draw(st.integers(1, 40)),)
    patch = tuple(draw(st.integers(1, 6)) for _ in range(nd - 1)) + (draw(st.integers(1, 20)),)
    axes = []
    for o, p in zip(out_shape, patch):
        # steps may leave gaps; starts may lie outside the output (clipped windows)
        step = draw(st.integers(1, p + 2))
        first = draw(st.integers(-p + 1, 1))
        count = draw(st.integers(1, max(1, (o - first) // step + 1)))
        axes.append([first + k * step for k in range(count)])
    n = 1
    for a in axes:
        n *= len(a)
    normalize = draw(st.sampled_from(["count", "weight", "none"]))
    weights = draw(st.sampled_from([None, "patch", "grid"])) if normalize != "weight" else None
    return dict(nd=nd, out_shape=out_shape, patch=patch, coords=raster_lattice(axes), n=n,
                c=draw(st.integers(1, 3)), normalize=normalize, weights=weights,
                importance=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])),
                batch=draw(st.integers(1, n)), seed=draw(st.integers(0, 2 ** 16)))


def make(case, device="cpu"):
    g = torch.Generator().manual_seed(case["seed"])
    n, c, patch, nd = case["n"], case["c"], case["patch"], case["nd"]
    patches = (torch.rand((n, c, *patch), generator=g) * 2 - 0.5).to(case["dtype"]).to(device)
    weights = None
    if case["weights"] == "patch":
        weights = torch.rand(n, generator=g).to(device)
    elif case["weights"] == "grid":
        weights = torch.rand((n, *[min(2, p) for p in patch]), generator=g).to(device)
    importance = monai_gaussian(patch, 0.3).to(device) if case["importance"] else None
    return patches, weights, importance


def stream_blend(case, patches, weights, importance, device="cpu"):
    b = LatticeBlender(case["out_shape"], case["c"], case["coords"], case["patch"], normalize=case["normalize"],
                       importance=importance, device=device,
                       dtype=torch.float64 if case["dtype"] == torch.float64 else torch.float32)
    for k in range(0, case["n"], case["batch"]):
        b.add(patches[k:k + case["batch"]], None if weights is None else weights[k:k + case["batch"]])
    return b.finalize(case["dtype"])


@settings(max_examples=120, deadline=None)
@given(case=stream_cases())
def test_stream_equals_one_blend_bitwise(case):
    for device in DEVICES:
        patches, weights, importance = make(case, device)
        got = stream_blend(case, patches, weights, importance, device)
        expected = patchblend.calibrated_blend(patches, weights, case["coords"].to(device), case["out_shape"],
                                               normalize=case["normalize"], importance=importance)
        assert torch.equal(got, expected)


@pytest.mark.skipif(not COMPILED, reason="needs the compiled kernel")
@settings(max_examples=40, deadline=None)
@given(case=stream_cases())
def test_compiled_equals_reference_and_voxel_kernel_bitwise(case):
    """The compiled op (row kernel, and the CUDA kernel's per-voxel function run on the CPU) against the
    reference, batch by batch, starting from a buffer of NaN: nothing may be read before it is written."""
    patches, weights, importance = make(case)
    acc = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    nd = case["nd"]
    coords3 = case["coords"] if nd == 3 else torch.nn.functional.pad(case["coords"], (1, 0))
    p3 = patches if nd == 3 else patches.unsqueeze(2)
    out_shape3 = case["out_shape"] if nd == 3 else (1, *case["out_shape"])
    imp3 = None if importance is None else (importance if nd == 3 else importance.unsqueeze(0))
    w3 = None
    if weights is not None:
        w3 = weights.reshape(-1, 1, 1, 1) if weights.dim() == 1 else (weights if nd == 3 else weights.unsqueeze(1))
        w3 = w3.to(acc).contiguous()
    results = []
    for impl in ("reference", "rows", "voxel"):
        out = torch.full((case["c"], *out_shape3), float("nan"), dtype=acc)
        for k in range(0, case["n"], case["batch"]):
            args = (out, p3[k:k + case["batch"]], None if w3 is None else w3[k:k + case["batch"]], coords3, k,
                    None if imp3 is None else imp3.to(acc), case["normalize"])
            if impl == "reference":
                ref.blend_stream_reference(*args)
            elif impl == "rows":
                ops.blend_stream_(*args)
            else:  # PATCHBLEND_CPU_KERNEL is read once: the per-voxel function runs in a second process
                _, (out, *_) = variant("PATCHBLEND_CPU_KERNEL", "voxel").op("blend_stream_", *args)
        results.append(out)
    expected = patchblend.calibrated_blend(patches, weights, case["coords"], case["out_shape"],
                                           normalize=case["normalize"], importance=importance)
    expected = expected if nd == 3 else expected.unsqueeze(1)
    covered = ~torch.isnan(results[0])  # the reference never writes a voxel no window covers
    for got in results:
        # the row kernel may write 0 there (see stream_run); nothing else may differ
        assert bool(((got[~covered] == 0) | torch.isnan(got[~covered])).all())
        assert torch.equal(got.to(case["dtype"])[covered], expected[covered])


def test_hand_worked_two_batches():
    # 1D along the last axis: windows of 2 at starts 0, 1, 2 over 4 voxels; counts 1, 2, 2, 1
    coords = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 2]])
    patches = torch.tensor([[1.0, 2.0], [3.0, 5.0], [7.0, 11.0]]).reshape(3, 1, 1, 1, 2)
    out = torch.full((1, 1, 1, 4), float("nan"))
    ops.blend_stream_(out, patches[:2], None, coords, 0, None, "count")
    # after windows 0, 1: voxel 0 finished (1/1), voxel 1 finished ((2 + 3)/2), voxel 2 running (5)
    assert out[0, 0, 0, :3].tolist() == [1.0, 2.5, 5.0]
    ops.blend_stream_(out, patches[2:], None, coords, 2, None, "count")
    assert out.flatten().tolist() == [1.0, 2.5, (5.0 + 7.0) / 2, 11.0]


@pytest.mark.parametrize("device", DEVICES)
def test_index_reuse_never_goes_stale(device):
    """The op keeps the index of the last coords it saw (by value): coords changed in place, another lattice
    of the same shape in between, other sizes with the same coords all give the right result."""
    a = raster_lattice([[0, 2], [0, 2], [0, 1, 3]])
    b = raster_lattice([[0, 1], [1, 2], [0, 2, 3]])  # same shape, other starts
    p = torch.rand(len(a), 1, 2, 2, 2, generator=torch.Generator().manual_seed(5)).to(device)

    def stream(coords, out_shape, batch=3):
        out = torch.empty(1, *out_shape, device=device).fill_(float("nan"))
        for k in range(0, len(coords), batch):
            ops.blend_stream_(out, p[k:k + batch], None, coords, k, None, "count")
        blend = patchblend.calibrated_blend(p, None, coords, out_shape)
        covered = ~torch.isnan(out)
        assert torch.equal(out[covered], blend[covered]) and bool((blend[~covered] == 0).all())

    coords = a.clone()
    stream(coords, (4, 4, 5))
    coords.copy_(b)  # the same tensor (same address), other values
    stream(coords, (4, 4, 5))
    stream(a, (4, 4, 5))
    stream(b, (4, 4, 5), batch=2)
    stream(a, (3, 4, 4))  # same coords, another output size
    stream(a, (4, 4, 5))


def test_lattice_blender_takes_a_window_grid():
    """A WindowGrid (a lattice by construction) gives the same as its coords; one with a repeated start (nnU-Net
    placement when window * (1 - overlap) < 1) is refused, as its coords are."""
    from patchblend.inference import WindowGrid, sliding_windows

    grid = sliding_windows((11, 9, 10), (4, 5, 3), 0.4)
    p = torch.rand(len(grid), 2, 4, 5, 3, generator=torch.Generator().manual_seed(3))
    results = []
    for coords in (grid, grid.coords()):
        b = LatticeBlender((11, 9, 10), 2, coords, (4, 5, 3), normalize="count")
        for k in range(0, len(grid), 5):
            b.add(p[k:k + 5])
        results.append(b.finalize())
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0], patchblend.calibrated_blend(p, None, grid.coords(), (11, 9, 10)))
    repeated = WindowGrid((4, 4), (2, 2), ((0, 1, 1, 2), (0, 2)))
    for coords in (repeated, repeated.coords()):
        with pytest.raises(ValueError, match="lattice"):
            LatticeBlender((4, 4), 1, coords, (2, 2))


def test_opcheck_blend_stream():
    coords = raster_lattice([[0, 2], [-1, 1], [0, 1, 3]])
    p = torch.rand(len(coords), 2, 3, 3, 2, dtype=torch.float64)
    imp = torch.rand(3, 3, 2, dtype=torch.float64)
    for normalize, w, i in (("count", torch.rand(4, 2, 1, 2, dtype=torch.float64), None),
                            ("weight", None, imp), ("none", None, None)):
        torch.library.opcheck(ops.blend_stream_.default,
                              (torch.zeros(2, 5, 4, 5, dtype=torch.float64), p[4:8], w, coords, 4, i, normalize))


def test_bad_input():
    coords = raster_lattice([[0, 2], [0, 2], [0, 2]])
    p = torch.rand(2, 1, 2, 2, 2)
    out = torch.zeros(1, 4, 4, 4)
    with pytest.raises(RuntimeError, match="raster order"):
        ops.blend_stream_(out, p, None, coords.flip(0), 0, None, "count")
    with pytest.raises(RuntimeError, match="not within"):
        ops.blend_stream_(out, p, None, coords, 7, None, "count")
    with pytest.raises(RuntimeError, match="weight"):
        ops.blend_stream_(out, p, torch.ones(2, 1, 1, 1), coords, 0, None, "weight")
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        ops.blend_stream_(out.double(), p, None, coords, 0, None, "count")
    with pytest.raises(ValueError, match="raster order"):
        LatticeBlender((4, 4, 4), 1, coords.flip(0), (2, 2, 2))
    b = LatticeBlender((4, 4, 4), 1, coords, (2, 2, 2), normalize="weight")
    with pytest.raises(ValueError, match="weights cannot be used"):
        b.add(p, torch.ones(2))
    with pytest.raises(ValueError, match="left"):
        b.add(torch.rand(9, 1, 2, 2, 2))
    b.add(p)
    with pytest.raises(RuntimeError, match="only 2 of 8"):
        b.finalize()
