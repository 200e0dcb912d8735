"""The op schemas have one source, csrc/op_schemas.h: the compiled library defines its ops from it (blend_ops.cpp)
and the pure-PyTorch reference reads it (patchblend/_op_schemas.py). Both backends must register exactly those
schemas, op for op, or torch.compile / opcheck would see a different op per backend."""
import json
import os
import subprocess
import sys

import pytest
import torch

import patchblend
from patchblend import _op_schemas


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


def source_schemas() -> dict:
    """The schemas of csrc/op_schemas.h as torch prints them (``patchblend::name(...) -> ...``), by op name."""
    parsed = [torch._C.parse_schema(f"patchblend::{text}") for text in _op_schemas.op_schemas()]
    return {schema.name.split("::")[1]: str(schema) for schema in parsed}


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_each_backend_registers_exactly_the_single_source(backend):
    if backend == "compiled" and not patchblend.backend_info()["compiled"]:
        pytest.skip("needs the compiled kernels")
    expected, registered = source_schemas(), schemas(backend)
    assert {"blend", "blend_add_", "blend_stream_", "coverage", "extract", "cpu_kernel_isa"} <= set(expected)
    assert sorted(registered) == sorted(expected), "ops defined outside csrc/op_schemas.h, or missing"
    for name in expected:
        assert registered[name] == expected[name], name


def test_schema_source_is_parsed_as_cpp_reads_it():
    """Adjacent literals join, comments (with quotes and commas in them) are skipped, entries split at commas."""
    header = """
    // before the array: "not a schema",
    inline constexpr const char* kOpSchemas[] = {
        // a comment with "quotes", commas, and } a brace
        "a(Tensor x, "
        "int n) -> Tensor",  /* "b(int y) -> ()", */
        "c() -> str"
        ,
        "d(str s=\\"x\\") -> ()",
    };
    const char* other[] = {"e() -> ()"};
    """
    assert _op_schemas.parse_schemas(header) == ["a(Tensor x, int n) -> Tensor", "c() -> str", 'd(str s="x") -> ()']


@pytest.mark.parametrize("body, message", [
    ('"a() -> ()", kExtra', "unexpected 'k'"),
    ('"a() -> ()",, "b() -> ()"', "empty entry"),
    ('"a() -> ()"', "no closing brace"),
    ('"a() -> (', "unterminated string"),
])
def test_a_malformed_schema_source_is_an_error_naming_the_cause(body, message):
    with pytest.raises(ValueError, match=message):
        _op_schemas.parse_schemas("kOpSchemas[] = {" + body)


def test_a_missing_schema_source_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(RuntimeError, match=r"op_schemas\.h\) are not in this installation"):
        _op_schemas.op_schemas(tmp_path)
    with pytest.raises(RuntimeError, match=r"normalize modes \(op_schemas\.h\) are not in this installation"):
        _op_schemas.normalize_modes(tmp_path)


def test_a_named_array_is_read_alone():
    """Each array by its own name: the other arrays of the header, and names that merely end alike, are skipped."""
    header = """
    inline constexpr const char* xkNormalizeModes[] = {"not", "this"};
    inline constexpr const char* kNormalizeModes[] = {"count", /* "mean", */ "weight", "none"};
    inline constexpr const char* kOpSchemas[] = {"a() -> ()"};
    """
    assert _op_schemas.parse_string_array(header, "kNormalizeModes") == ["count", "weight", "none"]
    assert _op_schemas.parse_schemas(header) == ["a() -> ()"]
    with pytest.raises(ValueError, match=r"no `kOther\[\] = \{` array"):
        _op_schemas.parse_string_array(header, "kOther")
    with pytest.raises(ValueError, match="empty entry in kNormalizeModes"):
        _op_schemas.parse_string_array("kNormalizeModes[] = {,}", "kNormalizeModes")


def test_the_normalize_modes_have_one_source_in_the_order_of_the_kernels_enum():
    """``NORMALIZE_MODES`` is ``kNormalizeModes`` of csrc/op_schemas.h, entry i the mode of the value i of the
    kernels' ``Normalize`` enum (csrc/blend_voxel.h: ``kCount`` is "count", ...); blend_binding.h's static_assert
    checks the same when the kernels compile, this test also where none compile."""
    import re

    from patchblend._validate import NORMALIZE_MODES

    assert NORMALIZE_MODES == _op_schemas.normalize_modes() == ("count", "weight", "none")
    enum = re.search(r"enum Normalize\b[^{]*\{([^}]*)\}", (_op_schemas.header_path().parent / "blend_voxel.h")
                     .read_text()).group(1)
    values = {int(v): name for name, v in re.findall(r"k(\w+)\s*=\s*(\d+)", enum)}
    assert [values[i].lower() for i in range(len(values))] == list(NORMALIZE_MODES)


def test_the_ops_the_python_code_calls_exist_with_their_schema():
    """Every op patchblend's Python calls is registered in this process (whichever backend), with a schema."""
    for name in ("blend", "blend_add_", "blend_stream_", "coverage", "extract", "empty_large", "release_cached_output",
                 "cpu_kernel_isa"):
        assert str(getattr(torch.ops.patchblend, name).default._schema).startswith(f"patchblend::{name}(")


def test_every_op_has_a_fake_kernel():
    """torch.compile runs every op on fake tensors first: an op without a fake kernel (empty_large had none) made
    it fail on the driver, the blenders and zeros_output."""
    from torch._library.simple_registry import singleton

    names = sorted({n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                    if n.startswith("patchblend::")})
    assert "empty_large" in names and "release_cached_output" in names
    for name in names:
        assert singleton.find(f"patchblend::{name}").fake_impl.kernel is not None, name
    torch.library.opcheck(torch.ops.patchblend.empty_large.default, ([3, 4], torch.float32),
                          test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        assert torch.ops.patchblend.cpu_kernel_isa() == patchblend.backend_info()["cpu_isa"]


def test_torch_compile_runs_the_driver_the_blenders_and_zeros_output():
    """Not fullgraph (the driver's Python loop breaks the graph): each compiles and equals eager."""
    from patchblend import sliding_window_inference
    from patchblend.ops import zeros_output
    from patchblend.inference import Blender, LatticeBlender, SlabBlender, sliding_windows

    torch._dynamo.reset()
    compile_ = lambda f: torch.compile(f, backend="aot_eager")  # noqa: E731 (fake tensors, no C++ compiler)
    x = torch.rand(1, 1, 12, 10, 12)
    with torch.no_grad():
        drive = lambda v: sliding_window_inference(v, 8, 4, lambda t: t * 2, 0.5)  # noqa: E731
        torch.testing.assert_close(compile_(drive)(x), drive(x))
    grid = sliding_windows((12, 10, 12), (8, 8, 8), 0.5, "monai")
    coords = grid.coords()
    patches = torch.rand(len(coords), 1, 8, 8, 8)
    expected = patchblend.calibrated_blend(patches, None, coords, (12, 10, 12))

    def blender():
        b = Blender((12, 10, 12), 1)
        b.add(patches, coords)
        return b.finalize()

    def lattice():
        b = LatticeBlender((12, 10, 12), 1, grid, (8, 8, 8))
        b.add(patches)
        return b.finalize()

    def slab():
        b = SlabBlender((12, 10, 12), 1, window_shape=(8, 8, 8), window_coords=coords)
        b.add(patches, coords)
        return b.finish()

    for fn in (blender, lattice, slab):
        torch.testing.assert_close(compile_(fn)(), expected)
    assert torch.equal(compile_(lambda: zeros_output((3, 4), torch.float32, "cpu"))(), torch.zeros(3, 4))
