"""No private attribute of one class used from another module in ``patchblend/inference`` (issue 21's rule): a
static check of the source. ``obj._name`` is allowed on ``self``/``cls``, on imported modules, and where the
module itself defines ``_name`` (a method, a class attribute or an attribute it sets); a private name imported from
a sibling module is reported too."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
INFERENCE = ROOT / "patchblend" / "inference"

# public API spelled with an underscore: NamedTuple's methods, and PyTorch's version counter of a tensor
PUBLIC_UNDERSCORED = {"_replace", "_fields", "_asdict", "_make", "_field_defaults", "_version"}


def private_uses(source: str):
    """``[(line, text)]``: private attributes used on objects the module does not own, and private names imported
    from sibling modules."""
    tree = ast.parse(source)
    defined, modules = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Import):
            modules.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.update(a.asname or a.name for a in node.names)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level and node.module:  # (`from .. import _m`: a module)
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.startswith("_")
                      and not a.name.startswith("__")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and (owner.id in ("self", "cls") or owner.id in modules):
                continue
            if node.attr not in defined and node.attr not in PUBLIC_UNDERSCORED:
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_check_finds_what_it_looks_for():
    source = ("from .blender import _make_safe_, Blender\n"
              "def f(bl, settings):\n"
              "    bl._add(1)\n"
              "    settings._replace(a=1)\n"
              "    return bl.check_values\n")
    assert private_uses(source) == [(1, "import _make_safe_"), (3, "bl._add")]
    own = "class A:\n    def _g(self):\n        pass\ndef f(a):\n    a._g()\n    a._h = 1\n    return a._h\n"
    assert private_uses(own) == []


def test_no_private_attribute_used_from_another_module():
    found = {path.name: private_uses(path.read_text()) for path in sorted(INFERENCE.glob("*.py"))}
    assert {name: uses for name, uses in found.items() if uses} == {}
