"""The sliding-window driver's accumulators: the per-image split of a batch, each accumulator on batches that span
images (against the same images run one by one), and the N-D path against the pure-PyTorch reference."""
import gc

import pytest
import torch

from patchblend import CalibratedOutput
from patchblend._reference import blend_reference
from patchblend.inference import SlabBlender, sliding_window_inference, sliding_windows
from patchblend.inference._accumulators import ImagePart, split_by_image


def rand(*shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# ---- split_by_image ------------------------------------------------------------------------------------------

def test_split_by_image_hand_worked():
    # a batch of 5 windows: the last 2 of image 0 (windows 6, 7 of 8), then the first 3 of image 1
    seg = torch.arange(5.0).reshape(5, 1, 1)
    weights = torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0])
    parts = split_by_image(seg, weights, [(0, 6, 8), (1, 0, 3)])
    assert [(p.image, p.first, p.end) for p in parts] == [(0, 6, 8), (1, 0, 3)]
    assert parts[0].seg.flatten().tolist() == [0.0, 1.0] and parts[1].seg.flatten().tolist() == [2.0, 3.0, 4.0]
    assert parts[0].weights.tolist() == [10.0, 11.0] and parts[1].weights.tolist() == [12.0, 13.0, 14.0]


def test_split_by_image_three_images_and_missing_tensors():
    # one window of image 2, all 2 of image 3, the first of image 4; no weights; no predictions (the coverage
    # confidence map takes the weights alone)
    seg = torch.arange(4.0)
    parts = split_by_image(seg, None, [(2, 1, 2), (3, 0, 2), (4, 0, 1)])
    assert [p.seg.tolist() for p in parts] == [[0.0], [1.0, 2.0], [3.0]]
    assert all(p.weights is None for p in parts)
    parts = split_by_image(None, torch.tensor([[1.0], [2.0], [3.0]]), [(0, 4, 5), (1, 0, 2)])
    assert [p.seg for p in parts] == [None, None]
    assert [p.weights.flatten().tolist() for p in parts] == [[1.0], [2.0, 3.0]]


def test_split_by_image_one_image():
    seg, weights = torch.rand(3, 2, 4), torch.rand(3)
    (part,) = split_by_image(seg, weights, [(1, 4, 7)])
    assert isinstance(part, ImagePart) and (part.image, part.first, part.end) == (1, 4, 7)
    assert torch.equal(part.seg, seg) and torch.equal(part.weights, weights)


# ---- every accumulator on batches that span images ----------------------------------------------------------

def scored(win):
    """Two channels plus patch and grid scores computed from the window (any number of spatial axes)."""
    seg = torch.cat([win.sin(), (win * 3).tanh()], dim=1)
    nd = win.dim() - 2
    patch = win.mean(dim=tuple(range(1, win.dim())))
    grid = win.mean(1)
    for axis in range(nd):  # 2 cells per axis: the mean of each half
        grid = torch.stack([h.mean(axis + 1) for h in grid.chunk(2, dim=axis + 1)], dim=axis + 1)
    return CalibratedOutput(seg, patch, grid)


# (accumulator, input shape, roi, driver keywords, bitwise): the batch size 3 makes batches span images
CASES = [
    ("lattice", (3, 1, 11, 9, 8), (5, 4, 6), dict(mode="gaussian"), True),
    ("lattice 2D", (2, 1, 13, 11), (6, 5), dict(), True),
    # accumulate mode: per batch sums, so another batching rounds differently
    ("blender", (3, 1, 11, 9, 8), (5, 4, 6), dict(weighting="patch*grid", normalize="weight"), False),
    ("slab stream", (3, 1, 11, 9, 8), (5, 4, 6), dict(slab_axis=0, mode="gaussian"), True),
    ("slab accumulated", (3, 1, 11, 9, 8), (5, 4, 6), dict(slab_axis=1, weighting="patch", normalize="weight"),
     False),
    ("slab argmax", (2, 1, 11, 9, 8), (5, 4, 6), dict(slab_axis=0, reduce="argmax"), True),
    ("torch 1D", (3, 1, 17), (6,), dict(mode="gaussian", weighting="patch", normalize="weight"), True),
    ("torch 4D", (2, 1, 7, 6, 5, 6), (4, 4, 3, 4), dict(weighting="patch*grid"), True),
    ("confidence", (3, 1, 11, 9, 8), (5, 4, 6), dict(weighting="patch", confidence=True), True),
]


@pytest.mark.parametrize("kind, shape, roi, kwargs, bitwise", CASES, ids=[c[0] for c in CASES])
def test_batches_spanning_images_equal_images_one_by_one(kind, shape, roi, kwargs, bitwise):
    x = rand(*shape)
    with torch.no_grad():
        whole = sliding_window_inference(x, roi, 3, scored, 0.5, **kwargs)
        alone = [sliding_window_inference(x[b:b + 1], roi, 3, scored, 0.5, **kwargs) for b in range(shape[0])]
    if kwargs.get("confidence"):
        pairs = [(whole.prediction, torch.cat([a.prediction for a in alone])),
                 (whole.confidence, torch.cat([a.confidence for a in alone]))]
    else:
        pairs = [(whole, torch.cat(alone))]
    for got, expected in pairs:
        assert got.dtype == expected.dtype and got.shape == expected.shape
        if bitwise:
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_batches_spanning_images_with_autograd():
    # the autograd path keeps every window and blends each image once at the end
    x = rand(3, 1, 11, 9, 8).requires_grad_()
    whole = sliding_window_inference(x, (5, 4, 6), 3, scored, 0.5, weighting="patch*grid")
    alone = torch.cat([sliding_window_inference(x[b:b + 1], (5, 4, 6), 3, scored, 0.5, weighting="patch*grid")
                       for b in range(3)])
    assert whole.requires_grad and torch.equal(whole.detach(), alone.detach())
    (grad_whole,) = torch.autograd.grad(whole.sum(), x)
    (grad_alone,) = torch.autograd.grad(alone.sum(), x)
    # (backward sums each voxel's gradient over the windows in an order that follows the batching)
    torch.testing.assert_close(grad_whole, grad_alone, rtol=1e-6, atol=1e-6)


# ---- the N-D path is the reference ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape, roi", [((2, 1, 17), (6,)), ((1, 2, 9, 7, 8, 6), (4, 4, 3, 4))])
@pytest.mark.parametrize("weighting, normalize", [(None, "count"), ("patch", "count"), ("grid", "weight"),
                                                  ("patch", "none")])
def test_nd_path_is_the_reference_blend(shape, roi, weighting, normalize):
    # 1D and 4D inputs (TorchAccumulator): bitwise the pure-PyTorch reference blend of the predictor's outputs,
    # image by image, windows in visit order
    seen = []

    def predictor(win):
        seen.append(scored(win))
        return seen[-1]

    x = rand(*shape, seed=3)
    got = sliding_window_inference(x, roi, 3, predictor, 0.5, weighting=weighting, normalize=normalize)
    segs = torch.cat([s.seg for s in seen])
    weights = {None: None, "patch": torch.cat([s.patch for s in seen]).reshape(-1, *(1,) * len(roi)),
               "grid": torch.cat([s.grid for s in seen])}[weighting]
    coords = sliding_windows(shape[2:], roi, 0.5).coords()
    n = coords.shape[0]
    expected = torch.stack([
        blend_reference(segs[b * n:(b + 1) * n], None if weights is None else weights[b * n:(b + 1) * n], coords,
                        None, shape[2:], normalize) for b in range(shape[0])])
    assert got.dtype == expected.dtype and torch.equal(got, expected)


# ---- no reference cycles -------------------------------------------------------------------------------------

def test_accumulators_and_blenders_are_freed_without_the_garbage_collector():
    # the driver frees each accumulator's buffers (whole outputs) as it finishes it: that needs no reference cycle
    # among accumulators, blenders and their strategies (a cycle keeps the buffers until the collector runs)
    x = torch.rand(2, 1, 11, 9, 8)
    configs = [dict(), dict(weighting="grid", normalize="weight"), dict(slab_axis=0),
               dict(slab_axis=1, weighting="grid", normalize="weight"), dict(weighting="patch", confidence=True),
               dict(slab_axis=0, confidence=True, weighting="grid")]

    def run():
        with torch.no_grad():
            for kw in configs:
                sliding_window_inference(x, (5, 4, 6), 3, scored, 0.5, **kw)
            sliding_window_inference(torch.rand(1, 1, 7, 6, 5, 6), 4, 3, scored, 0.5)
        slab = SlabBlender((12, 8, 8), 1, window_shape=(4, 4, 4), window_lattice=[[0, 4, 8], [0, 4], [0, 4]],
                           confidence=True)
        slab.add(torch.rand(12, 1, 4, 4, 4), slab_coords(), torch.rand(12))
        slab.finish()

    run()  # (caches filled)
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        run()
        gc.collect()
        ours = sorted({type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("patchblend")})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()
    assert ours == []


def slab_coords():
    return torch.cartesian_prod(torch.tensor([0, 4, 8]), torch.tensor([0, 4]), torch.tensor([0, 4]))
