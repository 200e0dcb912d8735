// The CPU row kernels behind the binding (blend_cpu.cpp), compiled once per instruction set and chosen at run
// time from what the CPU supports: baseline x86-64 (or the native baseline elsewhere) and, on x86-64, AVX2 +
// F16C (8-wide loops and hardware half <-> float conversion). Never chosen from the building machine.
//
// Each variant is blend_cpu_kernels.inc compiled in its own namespace (so that the two copies of the shared
// templates in blend_voxel.h never merge at link time), with the instruction set switched on by a pragma for
// that file only; the standard and torch headers are included before the pragma, so every inline function
// the two files share is compiled for the baseline. The variants give bitwise equal results (mul then add,
// no FMA; see RowAccumulate in blend_voxel.h); the tests compare them (PATCHBLEND_CPU_ISA=baseline, read once
// by the binding: blend_cpu.cpp).
#pragma once

#include <cstdint>

#include "cpu_parallel.h"

namespace patchblend {

enum class CpuDtype : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

// Runs one blend problem: `problem` points to a BlendProblem<scalar_t, acc_t> (blend_voxel.h) of the dtype
// the function was looked up for (float/float, double/double, Half/float, BFloat16/float). `per_voxel` runs the
// CUDA kernel's per-voxel function (blend_voxel) instead of the row kernel (PATCHBLEND_CPU_KERNEL=voxel, read by
// the binding), so the tests can compare the two bitwise.
using CpuKernelFn = void (*)(const void* problem, const CpuParallel& parallel, bool per_voxel);

struct CpuKernels {
  const char* isa;      // "baseline" or "avx2"
  CpuKernelFn run[4];   // by CpuDtype
};

// The variants compiled into this library (avx2: nullptr where not built, i.e. not x86-64).
const CpuKernels* cpu_kernels_baseline();
const CpuKernels* cpu_kernels_avx2();

}  // namespace patchblend
