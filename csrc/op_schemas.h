// The operator schemas of patchblend and the blend's normalize modes: the one place they are written.
//
// - blend_ops.cpp defines the ops for the compiled library (STABLE_TORCH_LIBRARY, one m.def per kOpSchemas entry);
//   blend_binding.h parses the ops' `normalize` argument with kNormalizeModes;
// - patchblend/_op_schemas.py reads both arrays from this file (their string literals, in order): the reference
//   backend defines the same schemas when no compiled library is loaded (PATCHBLEND_BACKEND=reference, no
//   compiler), and patchblend/_validate.py takes NORMALIZE_MODES from kNormalizeModes.
// So keep the arrays plain: one entry per op (mode), each entry one or more adjacent string literals (joined as in
// C++), entries separated by commas, comments (// or /* */) anywhere between them. Nothing else goes inside the
// braces.
//
// Backends register implementations in cpu/blend_cpu.cpp and cuda/blend_cuda_binding.cpp (or
// patchblend/_backend.py: the reference); Python adds fake kernels and autograd (patchblend/ops.py).
#pragma once

namespace patchblend {

// The `normalize` modes, in the order of the Normalize enum (blend_voxel.h: kCount, kWeight, kNone; a
// static_assert in blend_binding.h ties the two): "count" divides by the number of covering patches, "weight" by
// their weight sum, "none" returns the weighted sum.
inline constexpr const char* kNormalizeModes[] = {"count", "weight", "none"};

inline constexpr const char* kOpSchemas[] = {
    // Canonical 3D form: patches [N, C, P0, P1, P2]; weights [N, G0, G1, G2] in the accumulation dtype;
    // coords [N, 3] int64; importance [P0, P1, P2] in the accumulation dtype. Returns [C, *out_shape].
    "blend(Tensor patches, Tensor? weights, Tensor coords, Tensor? importance, SymInt[] out_shape, "
    "str normalize) -> Tensor",
    // Accumulate mode (streaming): ADDS the weighted sums of these patches into sum [C, *O] and their
    // denominator (patch count, or weight sum for "weight") into den [*O], both in the accumulation dtype.
    // Only the box the patches cover is touched; nothing is normalised; "none" leaves den alone.
    "blend_add_(Tensor(a!) sum, Tensor(b!)? den, Tensor patches, Tensor? weights, Tensor coords, "
    "Tensor? importance, str normalize) -> ()",
    // Stream mode: `coords` [N, 3] are ALL windows of a lattice in raster order, `patches` [n, C, *P] are
    // windows [first, first + n). `out` [C, *O] (accumulation dtype) is the running output: the batch's
    // weighted terms are added to the running sums of the voxels it covers (a voxel's first window writes,
    // so `out` need not be zeroed), and each voxel whose last covering window is in this batch is divided by
    // its denominator over all windows. After the last batch `out` is the blend of all windows (bitwise).
    // Weights [n, *G] are allowed with "count" and "none".
    "blend_stream_(Tensor(a!) out, Tensor patches, Tensor? weights, Tensor coords, int first, "
    "Tensor? importance, str normalize) -> ()",
    // The blend's denominator [*out_shape]: patch count, weight sum, or ones ("none").
    "coverage(Tensor? weights, Tensor coords, Tensor? importance, SymInt[] patch_shape, SymInt[] out_shape, "
    "str normalize, ScalarType dtype) -> Tensor",
    // Windows of volume [C, O0, O1, O2] at coords [N, 3]: [N, C, *patch_shape], zeros outside.
    "extract(Tensor volume, Tensor coords, SymInt[] patch_shape) -> Tensor",
    // An uninitialised CPU tensor (like torch.empty) whose large buffers are mapped in transparent huge
    // pages, for outputs and running sums (cpu/large_alloc.h). No tensor arguments: registered under
    // CompositeExplicitAutograd, which the dispatcher uses for such ops.
    "empty_large(SymInt[] size, ScalarType dtype) -> Tensor",
    // Frees the one large block empty_large keeps for reuse; returns its size in bytes.
    "release_cached_output() -> int",
    // The instruction set of the CPU row kernels this library runs ("avx2" or "baseline": chosen at the first
    // kernel call from the CPU and PATCHBLEND_CPU_ISA, cpu/blend_cpu.cpp); "none" where no compiled CPU
    // kernel is loaded (the reference serves). CompositeExplicitAutograd, as empty_large.
    "cpu_kernel_isa() -> str",
};

}  // namespace patchblend
