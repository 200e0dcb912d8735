"""Tiny predictors for tests/test_distributed.py. The test module registers this module with cloudpickle to be
pickled by value, so Dask's worker processes need not import it. Per-process facts (how many predictor objects a
worker held, how often a factory ran) are kept in ``os.environ``, which every process has once."""
import os
import time

import torch
import torch.nn.functional as F

import patchblend


def _note(name: str, value: str) -> None:
    seen = set(filter(None, os.environ.get(name, "").split(",")))
    seen.add(value)
    os.environ[name] = ",".join(sorted(seen))


def process_notes(name: str) -> set:
    """What ``_note(name, ...)`` recorded in this process."""
    return set(filter(None, os.environ.get(name, "").split(",")))


def clear_notes(*names: str) -> None:
    for name in names:
        os.environ.pop(name, None)


def two_class(x: torch.Tensor) -> torch.Tensor:
    """A per-window-independent, position-sensitive nonlinear predictor: [n, C, *P] -> [n, 2, *P]."""
    m = x.mean(1, keepdim=True)
    return torch.cat([torch.sin(3.1 * m) + m, torch.cos(m) * 0.7 + 0.01 * m * m], 1)


class Calibrated:
    """CIB-style scores from the window's content: patch [n], grid [n, 2, 2, 2] (or [n, 2, 2] in 2D)."""

    def __call__(self, x):
        seg = two_class(x)
        patch = x.flatten(1).abs().mean(1) + 0.1
        pool = F.adaptive_avg_pool3d if x.dim() == 5 else F.adaptive_avg_pool2d
        grid = pool(x[:, :1].abs(), 2)[:, 0] + 0.05
        return patchblend.CalibratedOutput(seg, patch, grid)


class Conv(torch.nn.Module):
    """A small conv net (one object per worker is what the test counts)."""

    def __init__(self, in_channels: int = 1, note: str = "PB_TEST_MODEL_IDS"):
        super().__init__()
        self.note = note
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv3d(in_channels, 3, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(3, generator=g) * 0.1)

    def forward(self, x):
        _note(self.note, str(id(self)))
        # one window at a time: a batched convolution's rounding depends on the batch size and on which windows
        # share it (oneDNN), and the drivers batch windows differently (per block on Dask)
        return torch.softmax(torch.cat([self.conv(w) for w in x.split(1)]), 1)


def make_conv():
    _note("PB_TEST_FACTORY_CALLS", f"{os.getpid()}-{time.monotonic_ns()}")
    return Conv(note="PB_TEST_BUILT_IDS")


class Slow:
    """two_class, slowed down, touching ``marker`` on its first call (so a test knows the run has started)."""

    def __init__(self, marker: str, delay: float = 0.02):
        self.marker, self.delay = marker, delay

    def __call__(self, x):
        if not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
        time.sleep(self.delay)
        return two_class(x)


def exploding(x):
    raise RuntimeError("predictor exploded on purpose")


def returns_tuple(x):
    return two_class(x), two_class(x)


def float_two_class(x, scale=1.0):
    """For integer inputs: the windows cast to float first; ``scale`` is a predictor keyword."""
    return two_class(x.float() * scale)


class CoordAware:
    """with_coord=True: adds each window's start (from MONAI-style slices) to its prediction."""

    def __call__(self, x, slices):
        starts = torch.tensor([[s.start for s in sl[2:]] for sl in slices], dtype=x.dtype)
        return two_class(x) + starts.sum(1).reshape(-1, 1, *([1] * (x.dim() - 2))) * 0.01
