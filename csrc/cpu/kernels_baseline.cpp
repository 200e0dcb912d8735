// The CPU kernels for the baseline instruction set (see blend_cpu_kernels.h).
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#define PB_KERNEL_NS patchblend_baseline
#define PB_KERNEL_ISA "baseline"
#include "blend_cpu_kernels.inc"

const patchblend::CpuKernels* patchblend::cpu_kernels_baseline() { return &patchblend_baseline::kKernels; }
