"""Every ```python block of README.md runs as written (blocks of one `## ` section share a namespace)."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def sections():
    text = README.read_text()
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        title = part.splitlines()[0].strip()
        blocks = re.findall(r"```python\n(.*?)```", part, flags=re.S)
        if blocks:
            yield title, blocks


SECTIONS = dict(sections())


def run_section(title):
    namespace = {}
    for block in SECTIONS[title]:
        exec(compile(block, f"README.md: {title}", "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


def test_readme_has_runnable_examples():
    assert "`calibrated_blend`" in SECTIONS


def test_calibrated_blend_section():
    ns = run_section("`calibrated_blend`")
    assert ns["out"].shape == (2, 48, 48, 48)
    assert ns["mean"].shape == (2, 48, 48, 48)


def test_heads_section():
    pytest.importorskip("monai")
    title = next(t for t in SECTIONS if t.startswith("Calibration heads"))
    ns = run_section(title)
    assert ns["patch_scores"].shape == (2,)
    assert ns["grid_scores"].shape == (2, 2, 2, 2)
