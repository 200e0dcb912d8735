// Thin torch binding for the CUDA kernels: checks, allocation, index upload, stream; the arithmetic is in
// blend_cuda.cu (which calls the shared ../blend_voxel.h).
//
// coords may be on the CPU or on the device. The blend ops read them on the host (to build the index), so
// CPU coords cost nothing and device coords cost a copy back, i.e. a device synchronisation; extract reads
// them on the device and uploads CPU coords asynchronously from pinned memory. Pass CPU coords in loops
// (the sliding-window driver does): then no op here synchronises with the device.
//
// Stable ABI (see ../blend_binding.h): the device guard is torch::stable::accelerator::DeviceGuard, the
// current stream comes from the C shim (aoti_torch_get_current_cuda_stream; the stable Stream's native handle
// needs torch 2.13).
#include <algorithm>

#include <torch/csrc/stable/accelerator.h>

#include "../blend_binding.h"
#include "blend_cuda.h"

// From torch's C shim (torch/csrc/inductor/aoti_torch/c/shim.h, declared there only under USE_CUDA): the
// current CUDA stream of a device, as a cudaStream_t.
extern "C" AOTITorchError aoti_torch_get_current_cuda_stream(int32_t device_index, void** ret_stream);

namespace patchblend {
namespace {

DType dtype_code(ScalarType t) {
  switch (t) {
    case ScalarType::Half: return DType::kHalf;
    case ScalarType::BFloat16: return DType::kBFloat16;
    case ScalarType::Float: return DType::kFloat;
    case ScalarType::Double: return DType::kDouble;
    default: fail("patchblend: unsupported dtype ", t);
  }
}

cudaStream_t current_stream(const Device& device) {
  void* stream = nullptr;
  PB_CHECK(aoti_torch_get_current_cuda_stream(device.index(), &stream) == AOTI_TORCH_SUCCESS,
           "patchblend: cannot get the current CUDA stream of ", device_name(device));
  return static_cast<cudaStream_t>(stream);
}

using DeviceGuard = torch::stable::accelerator::DeviceGuard;

// Host int64 data to the device without a synchronisation: staged in pinned memory (the caching host
// allocator keeps the block alive until the copy has run), then copied asynchronously on the current stream.
Tensor upload_async(const int64_t* data, int64_t count, const Device& device) {
  Tensor host = torch::stable::empty({count}, ScalarType::Long, std::nullopt, Device(DeviceType::CPU),
                                     /*pin_memory=*/true);
  std::copy(data, data + count, host.mutable_data_ptr<int64_t>());
  return torch::stable::to(host, device, /*non_blocking=*/true);
}

Tensor upload_index(const BlendInputs& in, IndexLayout& layout, const Device& device) {
  std::vector<int64_t> index = build_index(in, layout);
  return upload_async(index.data(), static_cast<int64_t>(index.size()), device);
}

// The stream index on the device: uploaded once per host index (see stream_index), device and stream, and
// reused by the following batches. (Never destroyed: a CUDA tensor must not be freed by a static destructor
// after the CUDA runtime has shut down.)
Tensor stream_index_on(const std::shared_ptr<const StreamIndex>& host, const Device& device) {
  struct Entry {
    std::shared_ptr<const StreamIndex> host;
    int64_t device = -1;
    cudaStream_t stream = nullptr;
    Tensor index;
  };
  static std::mutex mutex;
  static Entry* last = new Entry();
  const cudaStream_t stream = current_stream(device);
  std::lock_guard<std::mutex> lock(mutex);
  if (last->host != host || last->device != device.index() || last->stream != stream) {
    last->index = upload_async(host->index.data(), static_cast<int64_t>(host->index.size()), device);
    last->host = host;
    last->device = device.index();
    last->stream = stream;
  }
  return last->index;
}

void check_coords_device(const Tensor& coords, const Device& device) {
  PB_CHECK(coords.is_cpu() || coords.device() == device, "coords must be on the CPU or on ", device_name(device),
           ", got ", device_name(coords.device()));
}

// The device of the op: that of patches, else of weights or importance, else of coords.
Device op_device(const OptionalTensor& patches, const OptionalTensor& weights, const Tensor& coords,
                 const OptionalTensor& importance) {
  for (const auto* t : {&patches, &weights, &importance})
    if (t->has_value() && (*t)->is_cuda()) return (*t)->device();
  return coords.device();
}

Tensor run(const OptionalTensor& patches, const OptionalTensor& weights, const Tensor& coords,
           const OptionalTensor& importance, IntArrayRef patch_shape, IntArrayRef out_shape, int mode,
           ScalarType out_dtype, bool coverage) {
  const Device device = op_device(patches, weights, coords, importance);
  PB_CHECK(device.is_cuda(), "patchblend CUDA kernel: no input is on a CUDA device");
  check_coords_device(coords, device);
  const DeviceGuard guard(device.index());
  const ScalarType acc = accumulation_dtype(out_dtype);
  BlendInputs in = check_inputs(weights, coords, importance, patch_shape, out_shape, acc, device);
  Tensor p;
  int64_t c = 0;
  if (!coverage) {
    p = as_contiguous(*patches);
    PB_CHECK(p.device() == device, "patches and coords must be on the same device");
    PB_CHECK(p.size(0) == in.n, "patches and coords disagree on N");
    c = p.size(1);
  }
  // (coords may be on the CPU)
  Tensor result = coverage ? empty({in.O[0], in.O[1], in.O[2]}, acc, device)
                           : empty({c, in.O[0], in.O[1], in.O[2]}, p.scalar_type(), device);
  if (result.numel() == 0) return result;
  CudaBlendArgs a{};
  IndexLayout layout;
  Tensor index = upload_index(in, layout, device);
  a.dtype = dtype_code(out_dtype);
  a.patches = coverage ? nullptr : p.const_data_ptr();
  a.weights = in.weights.defined() ? in.weights.const_data_ptr() : nullptr;
  a.importance = in.importance.defined() ? in.importance.const_data_ptr() : nullptr;
  a.out = coverage ? nullptr : result.mutable_data_ptr();
  a.sum_out = nullptr;
  a.den_out = coverage ? result.mutable_data_ptr() : nullptr;
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
  a.index = index.const_data_ptr<int64_t>();
  a.layout = layout;
  const cudaError_t err = launch_blend(a, current_stream(device));
  PB_CHECK(err == cudaSuccess, "patchblend blend kernel failed: ", cudaGetErrorString(err));
  return result;
}

Tensor blend_cuda(const Tensor& patches, const OptionalTensor& weights, const Tensor& coords,
                  const OptionalTensor& importance, IntArrayRef out_shape, std::string_view normalize) {
  PB_CHECK(patches.dim() == 5, "patches must be [N, C, P0, P1, P2], got ", Shape{patches.sizes()});
  return run(patches, weights, coords, importance, patches.sizes().slice(2), out_shape, parse_normalize(normalize),
             patches.scalar_type(), /*coverage=*/false);
}

void blend_add_cuda(Tensor sum, OptionalTensor den, const Tensor& patches, const OptionalTensor& weights,
                    const Tensor& coords, const OptionalTensor& importance, std::string_view normalize) {
  PB_CHECK(patches.dim() == 5, "patches must be [N, C, P0, P1, P2], got ", Shape{patches.sizes()});
  PB_CHECK(patches.is_cuda(), "patches must be on a CUDA device");
  check_coords_device(coords, patches.device());
  check_accumulators(sum, den, patches);
  const DeviceGuard guard(patches.device().index());
  const int mode = parse_normalize(normalize);
  const Tensor p = as_contiguous(patches);
  const ScalarType acc = accumulation_dtype(p.scalar_type());
  BlendInputs in = check_inputs(weights, coords, importance, p.sizes().slice(2), sum.sizes().slice(1), acc, p.device());
  PB_CHECK(p.size(0) == in.n, "patches and coords disagree on N");
  if (in.n == 0) return;
  IndexLayout layout;
  Tensor index = upload_index(in, layout, p.device());
  CudaBlendArgs a{};
  a.dtype = dtype_code(p.scalar_type());
  a.patches = p.const_data_ptr();
  a.weights = in.weights.defined() ? in.weights.const_data_ptr() : nullptr;
  a.importance = in.importance.defined() ? in.importance.const_data_ptr() : nullptr;
  a.out = nullptr;
  a.sum_out = sum.mutable_data_ptr();
  a.den_out = den.has_value() && mode != kNone ? den->mutable_data_ptr() : nullptr;  // "none" has no denominator
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
  a.index = index.const_data_ptr<int64_t>();
  a.layout = layout;
  const cudaError_t err = launch_blend(a, current_stream(p.device()));
  PB_CHECK(err == cudaSuccess, "patchblend blend kernel failed: ", cudaGetErrorString(err));
}

void blend_stream_cuda(Tensor out, const Tensor& patches, const OptionalTensor& weights, const Tensor& coords,
                       int64_t first, const OptionalTensor& importance, std::string_view normalize) {
  PB_CHECK(patches.is_cuda(), "patches must be on a CUDA device");
  check_coords_device(coords, patches.device());
  const DeviceGuard guard(patches.device().index());
  const Tensor p = as_contiguous(patches);
  StreamInputs s = check_stream_inputs(out, p, weights, coords, first, importance, normalize);
  if (s.end == s.first) return;
  const Tensor index = stream_index_on(s.index, p.device());
  CudaBlendArgs a{};
  a.dtype = dtype_code(p.scalar_type());
  a.patches = p.const_data_ptr();
  a.weights = s.in.weights.defined() ? s.in.weights.const_data_ptr() : nullptr;
  a.importance = s.in.importance.defined() ? s.in.importance.const_data_ptr() : nullptr;
  a.out = nullptr;
  a.sum_out = out.mutable_data_ptr();
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
  a.index = index.const_data_ptr<int64_t>();
  a.layout = s.index->layout;
  a.stream_first = s.first;
  a.stream_end = s.end;
  const cudaError_t err = launch_blend(a, current_stream(p.device()));
  PB_CHECK(err == cudaSuccess, "patchblend blend_stream_ kernel failed: ", cudaGetErrorString(err));
}

Tensor coverage_cuda(const OptionalTensor& weights, const Tensor& coords, const OptionalTensor& importance,
                     IntArrayRef patch_shape, IntArrayRef out_shape, std::string_view normalize, ScalarType dtype) {
  PB_CHECK(dtype == ScalarType::Float || dtype == ScalarType::Double, "coverage dtype must be float32 or float64");
  return run(std::nullopt, weights, coords, importance, patch_shape, out_shape, parse_normalize(normalize), dtype,
             /*coverage=*/true);
}

Tensor extract_cuda(const Tensor& volume, const Tensor& coords, IntArrayRef patch_shape) {
  PB_CHECK(volume.dim() == 4, "volume must be [C, O0, O1, O2], got ", Shape{volume.sizes()});
  PB_CHECK(coords.dim() == 2 && coords.size(1) == 3 && coords.scalar_type() == ScalarType::Long,
           "coords must be int64 [N, 3]");
  PB_CHECK(volume.is_cuda(), "volume must be on a CUDA device");
  check_coords_device(coords, volume.device());
  const DeviceGuard guard(volume.device().index());
  int64_t P[3], O[3];
  copy3(P, patch_shape, "patch_shape");
  for (int a = 0; a < 3; ++a) O[a] = volume.size(a + 1);
  const Tensor vol = as_contiguous(volume);
  Tensor cc = as_contiguous(coords);
  if (cc.is_cpu() && cc.numel() > 0)
    cc = torch::stable::view(upload_async(cc.const_data_ptr<int64_t>(), cc.numel(), volume.device()), cc.sizes());
  Tensor out = empty({cc.size(0), vol.size(0), P[0], P[1], P[2]}, vol.scalar_type(), vol.device());
  const cudaError_t err = launch_extract(dtype_code(vol.scalar_type()), vol.const_data_ptr(),
                                         cc.const_data_ptr<int64_t>(), out.mutable_data_ptr(), cc.size(0),
                                         vol.size(0), P, O, current_stream(volume.device()));
  PB_CHECK(err == cudaSuccess, "patchblend extract kernel failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(patchblend, CUDA, m) {
  m.impl("blend", TORCH_BOX(&blend_cuda));
  m.impl("blend_add_", TORCH_BOX(&blend_add_cuda));
  m.impl("blend_stream_", TORCH_BOX(&blend_stream_cuda));
  m.impl("coverage", TORCH_BOX(&coverage_cuda));
  m.impl("extract", TORCH_BOX(&extract_cuda));
}

}  // namespace patchblend
