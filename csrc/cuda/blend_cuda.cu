// CUDA kernels: one thread per output voxel, gathering the covering patches in a fixed order with the
// shared per-voxel arithmetic (../blend_voxel.h). No atomics, so results are bitwise reproducible.
// No torch headers here (see blend_cuda.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../blend_voxel.h"
#include "blend_cuda.h"

namespace patchblend {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void blend_kernel(BlendProblem<scalar_t, acc_t> pr, int64_t voxels) {
  // Consecutive threads take consecutive voxels along the last (fastest) axis: coalesced reads.
  const int64_t w2 = pr.hi[2] - pr.lo[2], w1 = pr.hi[1] - pr.lo[1];
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < voxels;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t v[3];
    v[2] = pr.lo[2] + k % w2;
    v[1] = pr.lo[1] + (k / w2) % w1;
    v[0] = pr.lo[0] + k / (w2 * w1);
    if (pr.stream_first >= 0) stream_voxel(pr, v);
    else blend_voxel(pr, v);
  }
}

template <typename scalar_t>
__global__ void extract_kernel(const scalar_t* volume, const int64_t* coords, scalar_t* out, int64_t total, int64_t c,
                               int64_t P0, int64_t P1, int64_t P2, int64_t O0, int64_t O1, int64_t O2) {
  const int64_t P[3] = {P0, P1, P2}, O[3] = {O0, O1, O2};
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[e] = extract_element(volume, coords, P, O, c, e);
  }
}

int blocks_for(int64_t work) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 32 ? (b > 0 ? b : 1) : 65535 * 32);
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_typed(const CudaBlendArgs& a, cudaStream_t stream) {
  BlendProblem<scalar_t, acc_t> pr;
  pr.patches = static_cast<const scalar_t*>(a.patches);
  pr.weights = static_cast<const acc_t*>(a.weights);
  pr.importance = static_cast<const acc_t*>(a.importance);
  pr.out = static_cast<scalar_t*>(a.out);
  pr.sum_out = static_cast<acc_t*>(a.sum_out);
  pr.den_out = static_cast<acc_t*>(a.den_out);
  pr.accumulate = a.accumulate;
  pr.n = a.n;
  pr.c = a.c;
  pr.window_stride = a.c * a.P[0] * a.P[1] * a.P[2];
  for (int i = 0; i < 3; ++i) {
    pr.P[i] = a.P[i];
    pr.G[i] = a.G[i];
    pr.O[i] = a.O[i];
    pr.lo[i] = a.lo[i];
    pr.hi[i] = a.hi[i];
    if (a.hi[i] <= a.lo[i]) return cudaSuccess;  // empty box
  }
  pr.normalize = a.normalize;
  pr.index = make_index_view(a.index, a.layout);
  pr.stream_first = a.stream_first;
  pr.stream_end = a.stream_end;
  const int64_t voxels = (a.hi[0] - a.lo[0]) * (a.hi[1] - a.lo[1]) * (a.hi[2] - a.lo[2]);
  blend_kernel<scalar_t, acc_t><<<blocks_for(voxels), kThreads, 0, stream>>>(pr, voxels);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_blend(const CudaBlendArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kHalf: return launch_typed<__half, float>(a, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16, float>(a, stream);
    case DType::kFloat: return launch_typed<float, float>(a, stream);
    case DType::kDouble: return launch_typed<double, double>(a, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename scalar_t>
static cudaError_t launch_extract_typed(const void* volume, const int64_t* coords, void* out, int64_t n, int64_t c,
                                        const int64_t P[3], const int64_t O[3], cudaStream_t stream) {
  const int64_t total = n * c * P[0] * P[1] * P[2];
  if (total == 0) return cudaSuccess;
  extract_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(volume), coords, static_cast<scalar_t*>(out), total, c, P[0], P[1], P[2], O[0], O[1],
      O[2]);
  return cudaGetLastError();
}

cudaError_t launch_extract(DType dtype, const void* volume, const int64_t* coords, void* out, int64_t n, int64_t c,
                           const int64_t P[3], const int64_t O[3], cudaStream_t stream) {
  switch (dtype) {
    case DType::kHalf: return launch_extract_typed<__half>(volume, coords, out, n, c, P, O, stream);
    case DType::kBFloat16: return launch_extract_typed<__nv_bfloat16>(volume, coords, out, n, c, P, O, stream);
    case DType::kFloat: return launch_extract_typed<float>(volume, coords, out, n, c, P, O, stream);
    case DType::kDouble: return launch_extract_typed<double>(volume, coords, out, n, c, P, O, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace patchblend
