#!/usr/bin/env bash
# Compile-checks the CUDA sources on a machine without a GPU (CI): the kernel file with nvcc, and the
# torch binding with the host compiler against the installed torch's headers. A CPU-only torch lacks a
# few CUDA-library headers the binding never uses (cuda_cmake_macros.h, cusparse.h, ...): empty stand-ins
# for those go in a temporary folder. Skipped when nvcc is absent.
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

stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
echo '#pragma once' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
echo 'typedef void* cusparseHandle_t;' > "$stub/cusparse.h"
echo 'typedef void* cublasHandle_t;' > "$stub/cublas_v2.h"
echo 'typedef void* cublasLtHandle_t;' > "$stub/cublasLt.h"
echo 'typedef void* cusolverDnHandle_t;' > "$stub/cusolverDn.h"
echo 'typedef int cusolverStatus_t; typedef int cublasStatus_t;' > "$stub/cusolver_common.h"
cuda_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
[ -f "$cuda_home/include/cuda_runtime_api.h" ] || cuda_home=/usr/local/cuda
read -r torch_inc py_inc < <(python3 -c "import sysconfig, torch.utils.cpp_extension as e; print(e.include_paths()[0], sysconfig.get_paths()['include'])")
echo "== g++ -fsyntax-only csrc/cuda/blend_cuda_binding.cpp"
g++ -std=c++20 -fsyntax-only -I"$stub" -I"$torch_inc" -I"$torch_inc/torch/csrc/api/include" -I"$cuda_home/include" \
    -I"$py_inc" csrc/cuda/blend_cuda_binding.cpp
echo "check_cuda: ok"
