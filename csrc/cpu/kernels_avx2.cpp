// The CPU kernels for x86-64 with AVX2 and F16C (see blend_cpu_kernels.h): this file only is compiled for
// them (a pragma, not a compiler flag), and the binding calls it only on a CPU that has both.
#include "blend_cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// Everything shared with the other files first, compiled for the baseline.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include <immintrin.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

// Then AVX2 + F16C for every function defined below. Not FMA: a fused multiply-add rounds once, the
// baseline and the CUDA kernel (--fmad=false) twice.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#endif

#define PB_KERNEL_NS patchblend_avx2
#define PB_KERNEL_ISA "avx2"
#define PB_KERNEL_AVX2 1
#include "blend_cpu_kernels.inc"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

const patchblend::CpuKernels* patchblend::cpu_kernels_avx2() { return &patchblend_avx2::kKernels; }
#else
const patchblend::CpuKernels* patchblend::cpu_kernels_avx2() { return nullptr; }
#endif
