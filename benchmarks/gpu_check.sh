#!/usr/bin/env bash
# One prepared command for the GPU machine: build the extension with CUDA, run the test suite on CUDA,
# run the GPU benchmarks. Logs and CSVs go under $OUT (default ./gpu_out).
#   bash benchmarks/gpu_check.sh            (from the repository root)
# Wheels for missing test packages (pytest, hypothesis, monai, ...) can be carried in .whl/ (see the
# device tool's README); they are installed to /tmp/site first when present.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

echo "== build (PATCHBLEND_CUDA=1)"
PATCHBLEND_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
python3 -c "import patchblend, json; i = patchblend.backend_info(); print(json.dumps(i)); assert i['cuda'], 'no CUDA kernels'" \
    2>&1 | tee -a "$OUT/env.txt" || exit 1

echo "== tests (CPU and CUDA)"
if python3 -c "import pytest, hypothesis" 2>/dev/null; then
    timeout 300 python3 -m pytest -q -x tests -k "not inductor" 2>&1 | tee "$OUT/tests.log" | tail -15
else
    echo "pytest/hypothesis missing: carry them as wheels in .whl/" | tee "$OUT/tests.log"
fi

echo "== blend benchmark (GPU)"
timeout 240 python3 benchmarks/bench_blend.py --device cuda --repeat 20 --csv "$OUT/bench_blend_cuda.csv" 2>&1 \
    | tee "$OUT/bench_blend_cuda.log"
if [ -f benchmarks/bench_sliding_window.py ]; then
    echo "== sliding-window benchmark (GPU)"
    timeout 180 python3 benchmarks/bench_sliding_window.py --device cuda --out "$OUT/bench_sliding_window_cuda.csv" 2>&1 \
        | tee "$OUT/bench_sliding_window_cuda.log"
fi
echo "done"
