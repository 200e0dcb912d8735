// Defines patchblend's operators from their schemas in op_schemas.h (the one list, which
// patchblend/_op_schemas.py also reads for the pure-PyTorch reference). Backends register implementations in
// cpu/blend_cpu.cpp and cuda/blend_cuda_binding.cpp; Python adds fake kernels and autograd
// (patchblend/ops.py).
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

#include "op_schemas.h"

STABLE_TORCH_LIBRARY(patchblend, m) {
  for (const char* schema : patchblend::kOpSchemas) m.def(schema);
}
