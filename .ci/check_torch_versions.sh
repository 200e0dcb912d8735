#!/usr/bin/env bash
# The one-binary claim: loads the SAME compiled library (patchblend/_C.abi3.so, built against the main
# environment's torch; built here first if absent) under another torch release, in a separate venv, and runs
# the CPU tests there. Usage: .ci/check_torch_versions.sh [torch version, default 2.14.1]. Not part of
# .ci/run (it installs a second torch): run it by hand or in a separate CI job. Arguments after the version go
# to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-2.14.1}
shift || true
venv=${PATCHBLEND_VENV:-/tmp/patchblend-torch-$version}
build_torch=$(python -c "import torch; print(torch.__version__)")
if [ ! -f patchblend/_C.abi3.so ]; then
    echo "== building patchblend/_C.abi3.so against torch $build_torch"
    python setup.py -q build_ext --inplace
fi
echo "== library: $(sha256sum patchblend/_C.abi3.so | cut -c1-16)  (built against torch $build_torch)"
echo "== libtorch/c10 C++ symbols it imports (nm -D --undefined-only, demangled, std:: and the C++ runtime left out):"
nm -D --undefined-only --demangle patchblend/_C.abi3.so | grep -E "(c10|at|torch)::" || echo "   none"
[ -x "$venv/bin/python" ] || python -m venv "$venv"
"$venv/bin/pip" install -q "torch==$version" numpy pytest hypothesis
echo "== under torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'):"
"$venv/bin/python" - <<'PY'
import patchblend
info = patchblend.backend_info()
print("  ", info["kernels"]["CPU"], "| ISA:", info["cpu_isa"])
assert info["compiled"] and info["kernels"]["CPU"].endswith("_C.abi3.so)"), info
PY
# the CPU tests that need no extra package (monai, scipy, ...)
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_blend.py tests/test_stream.py tests/test_backend.py \
    tests/test_build.py tests/test_windows.py tests/test_devices.py "$@"
