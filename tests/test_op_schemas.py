"""The op schemas are written twice (C++ TORCH_LIBRARY in csrc, and _backend.py for the pure-PyTorch reference):
they must be the same, op for op, or torch.compile / opcheck would see a different op per backend."""
import json
import os
import subprocess
import sys

import pytest
import torch

import patchblend

def schemas(backend: str) -> dict:
    """Every ``patchblend::`` op's schema, as a fresh process with ``PATCHBLEND_BACKEND=backend`` registers it."""
    code = (
        "import json, torch, patchblend\n"
        "names = sorted({n.split('.')[0].split('::')[1] for n in torch._C._dispatch_get_all_op_names()\n"
        "                if n.startswith('patchblend::')})\n"
        "print(json.dumps({n: str(getattr(torch.ops.patchblend, n).default._schema) for n in names}))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PATCHBLEND_BACKEND=backend, PYTHONPATH=root)
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not patchblend.backend_info()["compiled"], reason="needs the compiled kernels")
def test_compiled_and_reference_schemas_are_the_same():
    compiled, reference = schemas("compiled"), schemas("reference")
    assert {"blend", "blend_add_", "blend_stream_", "coverage", "extract"} <= set(compiled)
    assert sorted(compiled) == sorted(reference), "ops defined by one backend only"
    for name in compiled:
        assert compiled[name] == reference[name], name


def test_the_ops_the_python_code_calls_exist_with_their_schema():
    """Every op patchblend's Python calls is registered in this process (whichever backend), with a schema."""
    for name in ("blend", "blend_add_", "blend_stream_", "coverage", "extract", "empty_large", "release_cached_output"):
        assert str(getattr(torch.ops.patchblend, name).default._schema).startswith(f"patchblend::{name}(")
