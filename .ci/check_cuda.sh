#!/usr/bin/env bash
# Compile-checks the CUDA sources on a machine without a GPU (CI): the kernel file with nvcc, and the
# torch binding with the host compiler against the installed torch's stable-ABI headers (a CPU-only torch
# has them all). Skipped when nvcc is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
    echo "check_cuda: nvcc not found, skipped"
    exit 0
fi
# the flags the real build uses: torch's COMMON_NVCC_FLAGS (they switch off half <-> float conversions), then ours
read -r -a torch_flags < <(python3 -c "from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as f; print(*f)")
mapfile -t our_flags < <(grep -v '^#' csrc/cuda/nvcc.flags | sed '/^$/d')
echo "== nvcc -c csrc/cuda/blend_cuda.cu ${torch_flags[*]} ${our_flags[*]}"
nvcc "${torch_flags[@]}" "${our_flags[@]}" -c csrc/cuda/blend_cuda.cu -o /tmp/patchblend_blend_cuda.o \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90

cuda_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
[ -f "$cuda_home/include/cuda_runtime_api.h" ] || cuda_home=/usr/local/cuda
torch_inc=$(python3 -c "import torch.utils.cpp_extension as e; print(e.include_paths()[0])")
target=$(python3 -c "import importlib.util as u; s = u.spec_from_file_location('b', 'patchblend/_build.py'); m = u.module_from_spec(s); s.loader.exec_module(m); print(m.TORCH_TARGET_VERSION)")
# the binding uses only torch's stable ABI headers: with TORCH_TARGET_VERSION set, any other torch header fails
echo "== g++ -fsyntax-only csrc/cuda/blend_cuda_binding.cpp (stable ABI, TORCH_TARGET_VERSION=$target)"
g++ -std=c++20 -fsyntax-only -fvisibility=hidden -DTORCH_TARGET_VERSION="$target" -I"$torch_inc" -I"$cuda_home/include" \
    csrc/cuda/blend_cuda_binding.cpp
echo "check_cuda: ok"
