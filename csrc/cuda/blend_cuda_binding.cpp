// Thin torch binding for the CUDA kernels: checks, allocation, index upload, stream; the arithmetic is in
// blend_cuda.cu (which calls the shared ../blend_voxel.h).
//
// coords may be on the CPU or on the device. The blend ops read them on the host (to build the index), so
// CPU coords cost nothing and device coords cost a copy back, i.e. a device synchronisation; extract reads
// them on the device and uploads CPU coords asynchronously from pinned memory. Pass CPU coords in loops
// (the sliding-window driver does): then no op here synchronises with the device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../blend_binding.h"
#include "blend_cuda.h"

namespace patchblend {
namespace {

DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    default: TORCH_CHECK(false, "patchblend: unsupported dtype ", t);
  }
}

// Host int64 data to the device without a synchronisation: staged in pinned memory (the caching host
// allocator keeps the block alive until the copy has run), then copied asynchronously on the current stream.
at::Tensor upload_async(const int64_t* data, int64_t count, const at::Device& device) {
  at::Tensor host = at::empty({count}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(data, data + count, host.data_ptr<int64_t>());
  return host.to(device, /*non_blocking=*/true);
}

at::Tensor upload_index(const BlendInputs& in, IndexLayout& layout, const at::Device& device) {
  std::vector<int64_t> index = build_index(in, layout);
  return upload_async(index.data(), static_cast<int64_t>(index.size()), device);
}

// The stream index on the device: uploaded once per host index (see stream_index), device and stream, and
// reused by the following batches. (Never destroyed: a CUDA tensor must not be freed by a static destructor
// after the CUDA runtime has shut down.)
at::Tensor stream_index_on(const std::shared_ptr<const StreamIndex>& host, const at::Device& device) {
  struct Entry {
    std::shared_ptr<const StreamIndex> host;
    c10::DeviceIndex device = -1;
    cudaStream_t stream = nullptr;
    at::Tensor index;
  };
  static std::mutex mutex;
  static Entry* last = new Entry();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  std::lock_guard<std::mutex> lock(mutex);
  if (last->host != host || last->device != device.index() || last->stream != stream) {
    last->index = upload_async(host->index.data(), static_cast<int64_t>(host->index.size()), device);
    last->host = host;
    last->device = device.index();
    last->stream = stream;
  }
  return last->index;
}

void check_coords_device(const at::Tensor& coords, const at::Device& device) {
  TORCH_CHECK(coords.is_cpu() || coords.device() == device, "coords must be on the CPU or on ", device, ", got ",
              coords.device());
}

// The device of the op: that of patches, else of weights or importance, else of coords.
at::Device op_device(const c10::optional<at::Tensor>& patches, const c10::optional<at::Tensor>& weights,
                     const at::Tensor& coords, const c10::optional<at::Tensor>& importance) {
  for (const auto* t : {&patches, &weights, &importance})
    if (t->has_value() && (*t)->is_cuda()) return (*t)->device();
  return coords.device();
}

at::Tensor run(const c10::optional<at::Tensor>& patches, const c10::optional<at::Tensor>& weights,
               const at::Tensor& coords, const c10::optional<at::Tensor>& importance, c10::IntArrayRef patch_shape,
               c10::IntArrayRef out_shape, int mode, at::ScalarType out_dtype, bool coverage) {
  const at::Device device = op_device(patches, weights, coords, importance);
  TORCH_CHECK(device.is_cuda(), "patchblend CUDA kernel: no input is on a CUDA device");
  check_coords_device(coords, device);
  const c10::cuda::CUDAGuard guard(device);
  const at::ScalarType acc = at::toOpMathType(out_dtype);
  BlendInputs in = check_inputs(weights, coords, importance, patch_shape, out_shape, acc, device);
  at::Tensor p;
  int64_t c = 0;
  if (!coverage) {
    p = patches->contiguous();
    TORCH_CHECK(p.device() == device, "patches and coords must be on the same device");
    TORCH_CHECK(p.size(0) == in.n, "patches and coords disagree on N");
    c = p.size(1);
  }
  const auto on_device = at::TensorOptions().dtype(acc).device(device);  // (coords may be on the CPU)
  at::Tensor result = coverage ? at::empty({in.O[0], in.O[1], in.O[2]}, on_device)
                               : at::empty({c, in.O[0], in.O[1], in.O[2]}, p.options());
  if (result.numel() == 0) return result;
  CudaBlendArgs a{};
  IndexLayout layout;
  at::Tensor index = upload_index(in, layout, device);
  a.dtype = dtype_code(out_dtype);
  a.patches = coverage ? nullptr : p.data_ptr();
  a.weights = in.weights.defined() ? in.weights.data_ptr() : nullptr;
  a.importance = in.importance.defined() ? in.importance.data_ptr() : nullptr;
  a.out = coverage ? nullptr : result.data_ptr();
  a.sum_out = nullptr;
  a.den_out = coverage ? result.data_ptr() : nullptr;
  a.accumulate = false;
  a.n = in.n;
  a.c = c;
  for (int i = 0; i < 3; ++i) {
    a.P[i] = in.P[i];
    a.G[i] = in.G[i];
    a.O[i] = in.O[i];
    a.lo[i] = 0;
    a.hi[i] = in.O[i];
  }
  a.normalize = mode;
  a.index = index.data_ptr<int64_t>();
  a.layout = layout;
  const cudaError_t err = launch_blend(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "patchblend blend kernel failed: ", cudaGetErrorString(err));
  return result;
}

at::Tensor blend_cuda(const at::Tensor& patches, const c10::optional<at::Tensor>& weights, const at::Tensor& coords,
                      const c10::optional<at::Tensor>& importance, c10::IntArrayRef out_shape,
                      c10::string_view normalize) {
  TORCH_CHECK(patches.dim() == 5, "patches must be [N, C, P0, P1, P2], got ", patches.sizes());
  return run(patches, weights, coords, importance, patches.sizes().slice(2), out_shape,
             parse_normalize(std::string(normalize)), patches.scalar_type(), /*coverage=*/false);
}

void blend_add_cuda(at::Tensor& sum, const c10::optional<at::Tensor>& den, const at::Tensor& patches,
                    const c10::optional<at::Tensor>& weights, const at::Tensor& coords,
                    const c10::optional<at::Tensor>& importance, c10::string_view normalize) {
  TORCH_CHECK(patches.dim() == 5, "patches must be [N, C, P0, P1, P2], got ", patches.sizes());
  TORCH_CHECK(patches.device().is_cuda(), "patches must be on a CUDA device");
  check_coords_device(coords, patches.device());
  check_accumulators(sum, den, patches);
  const c10::cuda::CUDAGuard guard(patches.device());
  const int mode = parse_normalize(std::string(normalize));
  const at::Tensor p = patches.contiguous();
  const at::ScalarType acc = at::toOpMathType(p.scalar_type());
  BlendInputs in = check_inputs(weights, coords, importance, p.sizes().slice(2), sum.sizes().slice(1), acc, p.device());
  TORCH_CHECK(p.size(0) == in.n, "patches and coords disagree on N");
  if (in.n == 0) return;
  IndexLayout layout;
  at::Tensor index = upload_index(in, layout, p.device());
  CudaBlendArgs a{};
  a.dtype = dtype_code(p.scalar_type());
  a.patches = p.data_ptr();
  a.weights = in.weights.defined() ? in.weights.data_ptr() : nullptr;
  a.importance = in.importance.defined() ? in.importance.data_ptr() : nullptr;
  a.out = nullptr;
  a.sum_out = sum.data_ptr();
  a.den_out = den.has_value() && mode != kNone ? den->data_ptr() : nullptr;  // "none" has no denominator
  a.accumulate = true;
  a.n = in.n;
  a.c = p.size(1);
  for (int i = 0; i < 3; ++i) {
    a.P[i] = in.P[i];
    a.G[i] = in.G[i];
    a.O[i] = in.O[i];
  }
  covered_box(in, a.lo, a.hi);
  a.normalize = mode;
  a.index = index.data_ptr<int64_t>();
  a.layout = layout;
  const cudaError_t err = launch_blend(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "patchblend blend kernel failed: ", cudaGetErrorString(err));
}

void blend_stream_cuda(at::Tensor& out, const at::Tensor& patches, const c10::optional<at::Tensor>& weights,
                       const at::Tensor& coords, int64_t first, const c10::optional<at::Tensor>& importance,
                       c10::string_view normalize) {
  TORCH_CHECK(patches.device().is_cuda(), "patches must be on a CUDA device");
  check_coords_device(coords, patches.device());
  const c10::cuda::CUDAGuard guard(patches.device());
  const at::Tensor p = patches.contiguous();
  StreamInputs s = check_stream_inputs(out, p, weights, coords, first, importance, std::string(normalize));
  if (s.end == s.first) return;
  const at::Tensor index = stream_index_on(s.index, p.device());
  CudaBlendArgs a{};
  a.dtype = dtype_code(p.scalar_type());
  a.patches = p.data_ptr();
  a.weights = s.in.weights.defined() ? s.in.weights.data_ptr() : nullptr;
  a.importance = s.in.importance.defined() ? s.in.importance.data_ptr() : nullptr;
  a.out = nullptr;
  a.sum_out = out.data_ptr();
  a.den_out = nullptr;
  a.accumulate = true;
  a.n = s.in.n;
  a.c = p.size(1);
  for (int i = 0; i < 3; ++i) {
    a.P[i] = s.in.P[i];
    a.G[i] = s.in.G[i];
    a.O[i] = s.in.O[i];
  }
  covered_box(s.in, a.lo, a.hi, s.first, s.end);
  a.normalize = s.mode;
  a.index = index.data_ptr<int64_t>();
  a.layout = s.index->layout;
  a.stream_first = s.first;
  a.stream_end = s.end;
  const cudaError_t err = launch_blend(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "patchblend blend_stream_ kernel failed: ", cudaGetErrorString(err));
}

at::Tensor coverage_cuda(const c10::optional<at::Tensor>& weights, const at::Tensor& coords,
                         const c10::optional<at::Tensor>& importance, c10::IntArrayRef patch_shape,
                         c10::IntArrayRef out_shape, c10::string_view normalize, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "coverage dtype must be float32 or float64");
  return run(c10::nullopt, weights, coords, importance, patch_shape, out_shape,
             parse_normalize(std::string(normalize)), dtype, /*coverage=*/true);
}

at::Tensor extract_cuda(const at::Tensor& volume, const at::Tensor& coords, c10::IntArrayRef patch_shape) {
  TORCH_CHECK(volume.dim() == 4, "volume must be [C, O0, O1, O2], got ", volume.sizes());
  TORCH_CHECK(coords.dim() == 2 && coords.size(1) == 3 && coords.scalar_type() == at::kLong,
              "coords must be int64 [N, 3]");
  TORCH_CHECK(volume.is_cuda(), "volume must be on a CUDA device");
  check_coords_device(coords, volume.device());
  const c10::cuda::CUDAGuard guard(volume.device());
  int64_t P[3], O[3];
  copy3(P, patch_shape, "patch_shape");
  for (int a = 0; a < 3; ++a) O[a] = volume.size(a + 1);
  const at::Tensor vol = volume.contiguous();
  at::Tensor cc = coords.contiguous();
  if (cc.is_cpu() && cc.numel() > 0) cc = upload_async(cc.data_ptr<int64_t>(), cc.numel(), volume.device()).view_as(cc);
  at::Tensor out = at::empty({cc.size(0), vol.size(0), P[0], P[1], P[2]}, vol.options());
  const cudaError_t err = launch_extract(dtype_code(vol.scalar_type()), vol.data_ptr(), cc.data_ptr<int64_t>(),
                                         out.data_ptr(), cc.size(0), vol.size(0), P, O,
                                         c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "patchblend extract kernel failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(patchblend, CUDA, m) {
  m.impl("blend", &blend_cuda);
  m.impl("blend_add_", &blend_add_cuda);
  m.impl("blend_stream_", &blend_stream_cuda);
  m.impl("coverage", &coverage_cuda);
  m.impl("extract", &extract_cuda);
}

}  // namespace patchblend
