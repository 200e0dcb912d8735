"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one README `## ` section, or of one docs page, share a namespace and run in order. A block
that cannot run here (a GPU, a trained model, data) is marked by the line right before its fence:
``<!-- not-run: REASON -->`` (the reason is required; docs/design.md#documentation). A block whose
optional dependency (MONAI, Dask, Zarr, ...) is missing is skipped.
"""
import functools
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

# modules of the optional extras: a block that needs one that is not installed is skipped, not failed
OPTIONAL_MODULES = {"monai", "dask", "distributed", "zarr", "nibabel", "nilearn", "scipy", "tqdm", "matplotlib"}

FENCE = re.compile(r"(?:^(?P<marker><!--[^\n]*-->)\n)?^```python\n(?P<code>.*?)^```", flags=re.M | re.S)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>\S.*?)\s*-->")


def blocks(text: str):
    """The python blocks of ``text`` that are to run; a not-run marker without a reason is an error."""
    runnable = []
    for m in FENCE.finditer(text):
        marker = m.group("marker")
        if marker and "not-run" in marker:
            assert NOT_RUN.fullmatch(marker), f"a not-run marker needs a reason: {marker}"
            continue
        runnable.append(m.group("code"))
    return runnable


def units():
    """(name, blocks): one per README `## ` section and one per docs page, those with python blocks."""
    for part in re.split(r"^## ", README.read_text(), flags=re.M)[1:]:
        found = blocks(part)
        if found:
            yield f"README.md: {part.splitlines()[0].strip()}", found
    for page in DOCS:
        found = blocks(page.read_text())
        if found:
            yield f"docs/{page.name}", found


UNITS = dict(units())


@functools.lru_cache(maxsize=None)
def run_unit(name):
    """Run a unit's blocks in one namespace (once per test session) and return the namespace."""
    namespace = {}
    for block in UNITS[name]:
        try:
            exec(compile(block, name, "exec"), namespace)  # noqa: S102 - our own documentation
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in OPTIONAL_MODULES:
                pytest.skip(f"{name} needs {exc.name}")
            raise
    return namespace


def test_docs_have_runnable_examples():
    assert "README.md: A short example" in UNITS
    for page in ("blend.md", "sliding-window.md", "calibration.md", "design.md"):
        assert f"docs/{page}" in UNITS


@pytest.mark.parametrize("name", sorted(UNITS))
def test_code_blocks_run(name):
    run_unit(name)


def test_not_run_marker_needs_a_reason():
    text = "<!-- not-run: needs a CUDA device -->\n```python\nraise SystemExit\n```\n```python\nx = 1\n```\n"
    assert blocks(text) == ["x = 1\n"]
    with pytest.raises(AssertionError, match="needs a reason"):
        blocks("<!-- not-run: -->\n```python\nx = 1\n```\n")


def test_readme_short_example():
    ns = run_unit("README.md: A short example")
    assert ns["out"].shape == (2, 48, 48, 48)
    assert ns["probs"].shape == (1, 2, 96, 112, 96)


def test_calibrated_blend_page():
    ns = run_unit("docs/blend.md")
    assert ns["out"].shape == (2, 48, 48, 48)
    assert ns["mean"].shape == (2, 48, 48, 48)


def test_heads_page():
    pytest.importorskip("monai")
    ns = run_unit("docs/calibration.md")
    assert ns["patch_scores"].shape == (2,)
    assert ns["grid_scores"].shape == (2, 2, 2, 2)


def test_sliding_window_page():
    ns = run_unit("docs/sliding-window.md")
    assert ns["probs"].shape == (2, 96, 112, 96)  # the lattice blender's output (the last `probs`)
    assert ns["labels"].shape == (1, 1, 96, 112, 96) and ns["labels"].dtype == ns["torch"].uint8


def test_monai_page():
    pytest.importorskip("monai")
    ns = run_unit("docs/monai.md")
    assert ns["probs"].shape == (1, 2, 96, 112, 96)  # the MONAI inferer's output
