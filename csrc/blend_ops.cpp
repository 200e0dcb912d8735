// Operator schemas of patchblend (one place). Backends register implementations in
// cpu/blend_cpu.cpp and cuda/blend_cuda_binding.cpp; Python adds fake kernels and autograd
// (patchblend/ops.py). (patchblend/_backend.py repeats these schemas for when no library is loaded.)
//
// Built as a Python module (`import patchblend._C`) with the limited C API, so one file serves every Python
// from 3.9 (abi3), and against torch's stable ABI, so it serves every torch from the target version on.
// The first-use build loads the same code as a plain library (torch.ops.load_library); the module init is
// then never called.
#ifdef PATCHBLEND_PYTHON_MODULE
#include <Python.h>

extern "C" {
// Lets `import patchblend._C` load this library (which registers the ops) as a Python module.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(patchblend, m) {
  // Canonical 3D form: patches [N, C, P0, P1, P2]; weights [N, G0, G1, G2] in the accumulation dtype;
  // coords [N, 3] int64; importance [P0, P1, P2] in the accumulation dtype. Returns [C, *out_shape].
  m.def("blend(Tensor patches, Tensor? weights, Tensor coords, Tensor? importance, SymInt[] out_shape, "
        "str normalize) -> Tensor");
  // Accumulate mode (streaming): ADDS the weighted sums of these patches into sum [C, *O] and their
  // denominator (patch count, or weight sum for "weight") into den [*O], both in the accumulation dtype.
  // Only the box the patches cover is touched; nothing is normalised; "none" leaves den alone.
  m.def("blend_add_(Tensor(a!) sum, Tensor(b!)? den, Tensor patches, Tensor? weights, Tensor coords, "
        "Tensor? importance, str normalize) -> ()");
  // Stream mode: `coords` [N, 3] are ALL windows of a lattice in raster order, `patches` [n, C, *P] are
  // windows [first, first + n). `out` [C, *O] (accumulation dtype) is the running output: the batch's
  // weighted terms are added to the running sums of the voxels it covers (a voxel's first window writes,
  // so `out` need not be zeroed), and each voxel whose last covering window is in this batch is divided by
  // its denominator over all windows. After the last batch `out` is the blend of all windows (bitwise).
  // Weights [n, *G] are allowed with "count" and "none".
  m.def("blend_stream_(Tensor(a!) out, Tensor patches, Tensor? weights, Tensor coords, int first, "
        "Tensor? importance, str normalize) -> ()");
  // The blend's denominator [*out_shape]: patch count, weight sum, or ones ("none").
  m.def("coverage(Tensor? weights, Tensor coords, Tensor? importance, SymInt[] patch_shape, SymInt[] out_shape, "
        "str normalize, ScalarType dtype) -> Tensor");
  // Windows of volume [C, O0, O1, O2] at coords [N, 3]: [N, C, *patch_shape], zeros outside.
  m.def("extract(Tensor volume, Tensor coords, SymInt[] patch_shape) -> Tensor");
  // An uninitialised CPU tensor (like torch.empty) whose large buffers are mapped in transparent huge
  // pages, for outputs and running sums (csrc/cpu/large_alloc.h). No tensor arguments: registered under
  // CompositeExplicitAutograd, which the dispatcher uses for such ops.
  m.def("empty_large(SymInt[] size, ScalarType dtype) -> Tensor");
  // Frees the one large block empty_large keeps for reuse; returns its size in bytes.
  m.def("release_cached_output() -> int");
}
