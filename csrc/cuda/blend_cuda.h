// The CUDA launchers' interface: raw pointers and a stream, no torch types, so that the .cu file
// compiles with plain nvcc (CI checks it) and the torch binding stays a thin C++ file.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../blend_index.h"

namespace patchblend {

enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

struct CudaBlendArgs {
  DType dtype;                 // of patches and out; weights/importance/den use float (double for kDouble)
  const void* patches;         // [N, C, P0, P1, P2] or nullptr (coverage only)
  const void* weights;         // [N, G0, G1, G2] or nullptr
  const void* importance;      // [P0, P1, P2] or nullptr
  void* out;                   // [C, O0, O1, O2] or nullptr
  void* sum_out;               // [C, O0, O1, O2] accumulation-dtype sums to add into (accumulate mode) or nullptr
  void* den_out;               // [O0, O1, O2] or nullptr
  bool accumulate;             // add into sum_out / den_out instead of writing
  int64_t n, c;
  int64_t P[3], G[3], O[3];
  int64_t lo[3], hi[3];        // box of output voxels to compute
  int normalize;
  const int64_t* index;        // packed index, device memory
  IndexLayout layout;
  int64_t stream_first = -1;   // stream mode (blend_stream_): patches are windows [stream_first, stream_end)
  int64_t stream_end = 0;      //   of the index's lattice, sum_out is the running output
};

// Blend (or, with out == sum_out == nullptr, the denominator only). Returns the launch's cudaError_t.
cudaError_t launch_blend(const CudaBlendArgs& args, cudaStream_t stream);

// out [N, C, P0, P1, P2] = windows of volume [C, O0, O1, O2] at coords [N, 3] (zeros outside).
cudaError_t launch_extract(DType dtype, const void* volume, const int64_t* coords, void* out, int64_t n, int64_t c,
                           const int64_t P[3], const int64_t O[3], cudaStream_t stream);

}  // namespace patchblend
