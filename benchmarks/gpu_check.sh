#!/usr/bin/env bash
# One prepared command for the GPU machine: the CPU-built library plus the CUDA kernels compiled on first use, the tests that have CUDA cases
# (the rest run in CI), run the GPU benchmarks. Logs and CSVs go under $OUT (default ./gpu_out). At most about 8 minutes
# (each step has its own timeout; the most important come first).
#
# Before, here:  bash benchmarks/fetch_gpu_wheels.sh     (MONAI as a wheel in .whl/; the image lacks it)
#                python setup.py build_ext --inplace   (patchblend/_C.abi3.so, the CPU library, with this torch)
# Device tool:   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", "patchblend/_C.abi3.so"], timeout_s=560)
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    python3 -c "import monai; print('monai', monai.__version__)" || echo "monai missing: MONAI tests skip, no MONAI baseline"
} 2>&1 | tee "$OUT/env.txt"

echo "== kernels: the CPU library built elsewhere + CUDA kernels compiled here on first use"
# patchblend/_C.abi3.so is carried from the CPU machine (built there against another torch: the stable ABI);
# the CUDA kernels are what `python -m patchblend build` compiles into the cache, as a user's first import would.
export PATCHBLEND_CACHE_DIR=/tmp/patchblend_cache TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=8
[ -d /tmp/site/ninja ] && export PATH=/tmp/site/bin:/tmp/site/ninja/data/bin:$PATH
if [ ! -f patchblend/_C.abi3.so ]; then
    echo "   no carried patchblend/_C.abi3.so: building the CPU library here"
    timeout 200 env PATCHBLEND_CUDA=0 python3 setup.py build_ext --inplace > "$OUT/build_cpu.log" 2>&1 \
        || { tail -40 "$OUT/build_cpu.log"; echo "BUILD FAILED"; exit 1; }
fi
timeout 300 python3 -m patchblend build > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
cat "$OUT/build.log"
python3 -m patchblend info 2>&1 | tee -a "$OUT/env.txt"
python3 -c "import patchblend, json; i = patchblend.backend_info(); print(json.dumps(i)); assert i['cuda'], 'no CUDA kernels'" \
    2>&1 | tee -a "$OUT/env.txt" || exit 1
echo "   kernels ready in $(( $(date +%s) - start )) s"

echo "== device tests (CUDA ops with CPU coords, the driver on the GPU, synchronisations per batch)"
timeout 90 python3 -m pytest -q -rs -p no:cacheprovider tests/test_devices.py 2>&1 | tee "$OUT/tests_devices.log" | tail -15

echo "== sliding-window benchmark (GPU, with the CT-size case)"
timeout 170 python3 benchmarks/bench_sliding_window.py --device cuda --ct --repeats 10 --case-timeout 60 \
    --out "$OUT/bench_sliding_window_cuda.csv" 2>&1 | tee "$OUT/bench_sliding_window_cuda.log" | tail -25
echo "== blend benchmark (GPU)"
timeout 60 python3 benchmarks/bench_blend.py --device cuda --repeat 10 --csv "$OUT/bench_blend_cuda.csv" 2>&1 \
    | tee "$OUT/bench_blend_cuda.log" | tail -30
echo "   benchmarks done at $(( $(date +%s) - start )) s"

echo "== nnU-Net v2 predictor vs PatchblendPredictor (GPU: time and device memory, with the 105-class case)"
# needs nnunetv2 + dynamic-network-architectures on the machine (not in .whl/: their import closure has ~25 packages,
# several compiled); skipped with a line when absent
if python3 -c "import nnunetv2, dynamic_network_architectures" 2>/dev/null; then
    timeout 150 python3 benchmarks/bench_nnunet.py --device cuda --repeats 5 --many 2>&1 \
        | tee "$OUT/bench_nnunet_cuda.log" | tail -15
else
    echo "   nnunetv2 missing: nnU-Net benchmark skipped" | tee "$OUT/bench_nnunet_cuda.log"
fi

echo "== the tests with CUDA cases (the rest run in CI)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_blend.py tests/test_stream.py \
    -k "not inductor" 2>&1 | tee "$OUT/tests_cuda.log" | tail -20
echo "done in $(( $(date +%s) - start )) s"
