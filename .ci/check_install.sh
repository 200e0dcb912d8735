#!/usr/bin/env bash
# Installs patchblend as a user does, with pip's defaults (build isolation), and checks what the user gets:
#  1. `python -m build` makes the sdist and the wheel in an isolated environment that has no torch: the wheel
#     must be pure Python (it carries the sources; the kernels compile on first use);
#  2. each is installed with plain `pip install` into a fresh venv that holds torch 2.13.0; pip must not fetch
#     a second torch; the first import compiles the CPU kernels into the cache, and the compiled backend gives
#     the reference's result;
#  3. one more install where no C++ compiler is on PATH: the reference serves, with exactly one warning (its op
#     schemas read from the wheel's copy of csrc/op_schemas.h).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python -m pip install -q build
python -m build --sdist --wheel --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/*.whl)
sdist=$(ls "$work"/dist/*.tar.gz)
echo "== built $(basename "$sdist") $(basename "$wheel")"
case "$wheel" in *-py3-none-any.whl) ;; *) echo "FAIL: the isolated build made a binary wheel"; exit 1 ;; esac
# (listings kept in variables: `grep -q` in a pipe can stop its writer early, which pipefail reads as a failure)
wheel_files=$(python -m zipfile -l "$wheel")
sdist_files=$(tar -tzf "$sdist")
grep -q "patchblend/_csrc/blend_ops.cpp" <<< "$wheel_files" || { echo "FAIL: no sources in the wheel"; exit 1; }
# the op schemas' one source: the compiled library defines its ops from it, the reference backend reads it
grep -q "patchblend/_csrc/op_schemas.h" <<< "$wheel_files" || { echo "FAIL: no op_schemas.h in the wheel"; exit 1; }
grep -q "/csrc/op_schemas.h$" <<< "$sdist_files" || { echo "FAIL: no csrc/op_schemas.h in the sdist"; exit 1; }

smoke='
import sys, warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import patchblend
from patchblend import _reference as ref
info = patchblend.backend_info()
print("backend:", info["backend"], "| CPU kernels:", info["kernels"]["CPU"], "| ISA:", info["cpu_isa"])
g = torch.Generator().manual_seed(0)
p = torch.rand(6, 2, 8, 8, 8, generator=g)
w = torch.rand(6, generator=g) + 0.5
coords = torch.randint(-2, 10, (6, 3), generator=g)
out = patchblend.calibrated_blend(p, w, coords, out_shape=(14, 14, 14))
expected = ref.blend_reference(p, w.view(6, 1, 1, 1), coords, None, (14, 14, 14), "count")
torch.testing.assert_close(out, expected)
ours = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning) and "patchblend" in str(c.message)]
if sys.argv[1] == "compiled":
    assert info["backend"] == "compiled" and "patchblend_cpu" in info["kernels"]["CPU"], info  # the cache build
    assert not ours, ours
else:
    assert info["backend"] == "reference", info
    assert len(ours) == 1 and "no C++ compiler" in ours[0], ours
    print("warning:", ours[0])
print("smoke: ok")
'

fresh_venv() {  # a venv holding torch 2.13.0 (CPU)
    python -m venv "$1"
    "$1/bin/pip" install -q torch==2.13.0
}

install_and_smoke() {  # name, artifact, expected backend, [PATH for install and import]
    local venv="$work/venv-$1" path="${4:-$PATH}"
    fresh_venv "$venv"
    echo "== plain pip install $(basename "$2") (torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null))"
    PATH="$path" "$venv/bin/pip" install "$2" > "$work/pip-$1.log" 2>&1 || { cat "$work/pip-$1.log"; exit 1; }
    if grep -Ei "(Collecting|Downloading|Using cached) torch" "$work/pip-$1.log"; then
        echo "FAIL: pip fetched a second torch"; exit 1
    fi
    local start=$SECONDS
    (cd "$work" && PATH="$path" PATCHBLEND_CACHE_DIR="$work/cache-$1" "$venv/bin/python" -c "$smoke" "$3")
    echo "   first import + smoke: $((SECONDS - start)) s"
}

install_and_smoke wheel "$wheel" compiled
install_and_smoke sdist "$sdist" compiled
# no compiler on PATH: only the venv's own scripts (python, pip, ninja)
install_and_smoke nocompiler "$wheel" reference "$work/venv-nocompiler/bin"
echo "check_install: ok"
