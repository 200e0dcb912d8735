// Torch-side helpers shared by the CPU and CUDA bindings: argument checks and problem set-up, written against
// the LibTorch stable ABI (torch/csrc/stable, torch/headeronly) so that one built library serves every torch
// from TORCH_TARGET_VERSION on (set by the build: patchblend/_build.py). (Not seen by nvcc: the .cu file only
// gets raw pointers.)
#pragma once

#include <cstring>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include "blend_index_build.h"
#include "blend_voxel.h"
#include "op_schemas.h"

namespace patchblend {

using Tensor = torch::stable::Tensor;
using OptionalTensor = std::optional<torch::stable::Tensor>;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;
using ScalarType = torch::headeronly::ScalarType;
using DeviceType = torch::headeronly::DeviceType;
using torch::stable::Device;

// Error messages: a shape as [a, b, c], a device as cpu / cuda:0.
struct Shape {
  IntArrayRef values;
};
inline std::ostream& operator<<(std::ostream& out, const Shape& shape) {
  out << "[";
  for (size_t i = 0; i < shape.values.size(); ++i) out << (i ? ", " : "") << shape.values[i];
  return out << "]";
}
inline std::string device_name(const Device& device) {
  std::string name = device.is_cpu() ? "cpu" : device.is_cuda() ? "cuda" : "device";
  return device.has_index() ? name + ":" + std::to_string(device.index()) : name;
}

// Throws std::runtime_error (a RuntimeError in Python) with the arguments written one after the other.
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream message;
  (message << ... << args);
  throw std::runtime_error(message.str());
}
#define PB_CHECK(cond, ...)                          \
  do {                                               \
    if (!(cond)) ::patchblend::fail(__VA_ARGS__);    \
  } while (0)

// The accumulation dtype of a patch dtype (at::opmath_type): float for half and bfloat16.
inline ScalarType accumulation_dtype(ScalarType t) {
  return t == ScalarType::Half || t == ScalarType::BFloat16 ? ScalarType::Float : t;
}
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Calls fn(scalar_t{}) with the C++ type of a floating dtype (float, double, half, bfloat16).
template <typename Fn>
void dispatch_floating(ScalarType t, const char* what, const Fn& fn) {
  switch (t) {
    case ScalarType::Float: return fn(float{});
    case ScalarType::Double: return fn(double{});
    case ScalarType::Half: return fn(torch::headeronly::Half{});
    case ScalarType::BFloat16: return fn(torch::headeronly::BFloat16{});
    default: fail(what, ": unsupported dtype ", t);
  }
}

inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

inline Tensor on_cpu(const Tensor& t) {
  return t.is_cpu() ? t : torch::stable::to(t, Device(DeviceType::CPU));
}

// An uninitialised contiguous tensor like torch.empty.
inline Tensor empty(std::vector<int64_t> sizes, ScalarType dtype, const Device& device) {
  return torch::stable::empty(sizes, dtype, std::nullopt, device);
}

// kNormalizeModes (op_schemas.h) lists the modes in the order of the Normalize enum.
static_assert(std::size(kNormalizeModes) == 3 && std::string_view(kNormalizeModes[kCount]) == "count" &&
                  std::string_view(kNormalizeModes[kWeight]) == "weight" &&
                  std::string_view(kNormalizeModes[kNone]) == "none",
              "kNormalizeModes must list the Normalize enum's modes in its order");

// The Normalize value of a mode of kNormalizeModes; anything else fails with
// "normalize must be 'count', 'weight' or 'none', got '<mode>'" (the list read from kNormalizeModes).
inline int parse_normalize(std::string_view normalize) {
  constexpr int count = static_cast<int>(std::size(kNormalizeModes));
  for (int mode = 0; mode < count; ++mode) {
    if (normalize == kNormalizeModes[mode]) return mode;
  }
  std::string accepted;
  for (int mode = 0; mode < count; ++mode) {
    accepted += std::string(mode == 0 ? "" : mode == count - 1 ? " or " : ", ") + "'" + kNormalizeModes[mode] + "'";
  }
  fail("normalize must be ", accepted, ", got '", normalize, "'");
}

inline void copy3(int64_t dst[3], IntArrayRef src, const char* name) {
  PB_CHECK(src.size() == 3, name, " must have 3 entries, got ", src.size());
  for (int a = 0; a < 3; ++a) {
    PB_CHECK(src[a] >= 0, name, " must be non-negative, got ", Shape{src});
    dst[a] = src[a];
  }
}

// Checks the canonical 3D arguments (the Python wrapper has already produced them) and returns
// contiguous copies: weights/importance in the accumulation dtype `acc`.
struct BlendInputs {
  Tensor weights, coords_cpu, importance;
  int64_t n = 0, c = 0;
  int64_t P[3] = {1, 1, 1}, G[3] = {1, 1, 1}, O[3] = {0, 0, 0};
};

// Weights have one row per patch: N rows, or `weight_rows` (stream mode: the batch's patches).
inline BlendInputs check_inputs(const OptionalTensor& weights, const Tensor& coords, const OptionalTensor& importance,
                                IntArrayRef patch_shape, IntArrayRef out_shape, ScalarType acc, const Device& device,
                                int64_t weight_rows = -1) {
  BlendInputs in;
  copy3(in.P, patch_shape, "patch_shape");
  copy3(in.O, out_shape, "out_shape");
  PB_CHECK(coords.dim() == 2 && coords.size(1) == 3, "coords must be [N, 3], got ", Shape{coords.sizes()});
  PB_CHECK(coords.scalar_type() == ScalarType::Long, "coords must be int64, got ", coords.scalar_type());
  in.n = coords.size(0);
  in.coords_cpu = as_contiguous(on_cpu(coords));
  if (weights.has_value()) {
    const auto& w = *weights;
    const int64_t rows = weight_rows < 0 ? in.n : weight_rows;
    PB_CHECK(w.dim() == 4 && w.size(0) == rows, "weights must be [", rows, ", G0, G1, G2] (one row per patch), got ",
             Shape{w.sizes()});
    PB_CHECK(w.scalar_type() == acc, "weights must have the accumulation dtype ", acc, ", got ", w.scalar_type());
    PB_CHECK(w.device() == device, "weights must be on ", device_name(device));
    for (int a = 0; a < 3; ++a) {
      in.G[a] = w.size(a + 1);
      PB_CHECK(in.G[a] >= 1 && in.G[a] <= in.P[a], "weights grid must satisfy 1 <= g <= P");
    }
    in.weights = as_contiguous(w);
  }
  if (importance.has_value()) {
    const auto& imp = *importance;
    PB_CHECK(imp.dim() == 3 && imp.size(0) == in.P[0] && imp.size(1) == in.P[1] && imp.size(2) == in.P[2],
             "importance must be [P0, P1, P2], got ", Shape{imp.sizes()});
    PB_CHECK(imp.scalar_type() == acc, "importance must have the accumulation dtype ", acc);
    PB_CHECK(imp.device() == device, "importance must be on ", device_name(device));
    in.importance = as_contiguous(imp);
  }
  return in;
}

// The box of output voxels that patches [first, end) touch (default: all), clipped to the output: lo/hi
// per axis (empty if lo >= hi).
inline void covered_box(const BlendInputs& in, int64_t lo[3], int64_t hi[3], int64_t first = 0, int64_t end = -1) {
  const int64_t* c = in.coords_cpu.const_data_ptr<int64_t>();
  for (int a = 0; a < 3; ++a) {
    lo[a] = in.O[a];
    hi[a] = 0;
  }
  for (int64_t i = first; i < (end < 0 ? in.n : end); ++i) {
    for (int a = 0; a < 3; ++a) {
      lo[a] = std::min(lo[a], std::max<int64_t>(c[3 * i + a], 0));
      hi[a] = std::max(hi[a], std::min(c[3 * i + a] + in.P[a], in.O[a]));
    }
  }
}

// Checks for blend_add_: float sum [C, *O] and optional den [*O] in the accumulation dtype.
inline void check_accumulators(const Tensor& sum, const OptionalTensor& den, const Tensor& patches) {
  const auto acc = accumulation_dtype(patches.scalar_type());
  PB_CHECK(sum.dim() == 4 && sum.size(0) == patches.size(1), "sum must be [C, O0, O1, O2] with C = ",
           patches.size(1), ", got ", Shape{sum.sizes()});
  PB_CHECK(sum.scalar_type() == acc, "sum must have the accumulation dtype ", acc, ", got ", sum.scalar_type());
  PB_CHECK(sum.is_contiguous(), "sum must be contiguous");
  PB_CHECK(sum.device() == patches.device(), "sum and patches must be on the same device");
  if (den.has_value()) {
    PB_CHECK(den->dim() == 3 && den->sizes().equals(sum.sizes().slice(1)), "den must be [O0, O1, O2] = ",
             Shape{sum.sizes().slice(1)}, ", got ", Shape{den->sizes()});
    PB_CHECK(den->scalar_type() == acc, "den must have the accumulation dtype ", acc);
    PB_CHECK(den->is_contiguous(), "den must be contiguous");
    PB_CHECK(den->device() == patches.device(), "den and patches must be on the same device");
  }
}

inline std::vector<int64_t> build_index(const BlendInputs& in, IndexLayout& layout) {
  return build_blend_index(in.coords_cpu.const_data_ptr<int64_t>(), in.n, in.P, in.G, in.O, layout);
}

// The index of all N windows in stream mode, with whether they form a lattice in raster order.
struct StreamIndex {
  std::vector<int64_t> index;
  IndexLayout layout;
  bool raster = false;
};

// blend_stream_ is called once per batch with the same coords of all N windows; building their index costs
// O(N) per call (O(N^2) per sliding-window run). The index of the last coords seen is kept and reused when
// the next call's coords, patch, grid and output sizes are equal to it by value (an exact comparison of the
// N x 3 starts, far cheaper than the build).
inline std::shared_ptr<const StreamIndex> stream_index(const BlendInputs& in) {
  struct Entry {
    std::vector<int64_t> key;  // P, G, O, then the coords
    std::shared_ptr<const StreamIndex> value;
  };
  static std::mutex mutex;
  static Entry last;
  std::vector<int64_t> key(in.P, in.P + 3);
  key.insert(key.end(), in.G, in.G + 3);
  key.insert(key.end(), in.O, in.O + 3);
  const int64_t* c = in.coords_cpu.const_data_ptr<int64_t>();
  key.insert(key.end(), c, c + 3 * in.n);
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (last.value && last.key == key) return last.value;
  }
  auto built = std::make_shared<StreamIndex>();
  built->index = build_blend_index(c, in.n, in.P, in.G, in.O, built->layout);
  built->raster = built->layout.is_lattice;
  for (int64_t k = 0; built->raster && k < in.n; ++k) built->raster = built->index[built->layout.off_patch_of + k] == k;
  std::lock_guard<std::mutex> lock(mutex);
  last.key = std::move(key);
  last.value = built;
  return built;
}

// blend_stream_: checks its arguments (running buffer `out` [C, *O] in the accumulation dtype; `patches`
// [n, C, *P] = windows [first, first + n) of `coords` [N, 3]; weights [n, *G] for the batch), gets the
// index of all N windows and checks that they form a lattice in raster order.
struct StreamInputs {
  BlendInputs in;
  std::shared_ptr<const StreamIndex> index;
  int64_t first = 0, end = 0;
  int mode = kCount;
};

inline StreamInputs check_stream_inputs(const Tensor& out, const Tensor& patches, const OptionalTensor& weights,
                                        const Tensor& coords, int64_t first, const OptionalTensor& importance,
                                        std::string_view normalize) {
  PB_CHECK(patches.dim() == 5, "patches must be [n, C, P0, P1, P2], got ", Shape{patches.sizes()});
  check_accumulators(out, std::nullopt, patches);
  StreamInputs s;
  s.mode = parse_normalize(normalize);
  const auto acc = accumulation_dtype(patches.scalar_type());
  const int64_t n = patches.size(0);
  PB_CHECK(!weights.has_value() || s.mode != kWeight, "blend_stream_: normalize='weight' cannot take weights (the "
              "weight sum of a voxel depends on windows of later batches); use blend_add_ with a denominator");
  s.in = check_inputs(weights, coords, importance, patches.sizes().slice(2), out.sizes().slice(1), acc,
                      patches.device(), /*weight_rows=*/n);
  // (first <= N - n, not first + n <= N: first may be as large as int64 allows)
  PB_CHECK(first >= 0 && first <= s.in.n - n, "blend_stream_: first = ", first, " with ", n,
              " patches: windows [first, first + n) are not within the ", s.in.n, " windows of coords");
  s.first = first;
  s.end = first + n;
  // "weight" without weights or importance divides by the window count, exactly as "count" does (the
  // count of a covered voxel is >= 1, and an uncovered voxel is 0 either way), and "count" needs no sums.
  if (s.mode == kWeight && !s.in.importance.defined()) s.mode = kCount;
  s.index = stream_index(s.in);
  PB_CHECK(s.index->raster, "blend_stream_: coords must be the windows of a lattice (every combination of per-axis "
              "starts, each once) in raster order");
  return s;
}

template <typename scalar_t, typename acc_t>
BlendProblem<scalar_t, acc_t> make_problem(const BlendInputs& in, const int64_t* index_base, const IndexLayout& layout,
                                           const scalar_t* patches, int64_t c, scalar_t* out, acc_t* den_out,
                                           int normalize) {
  BlendProblem<scalar_t, acc_t> pr;
  pr.patches = patches;
  pr.weights = in.weights.defined() ? in.weights.const_data_ptr<acc_t>() : nullptr;
  pr.importance = in.importance.defined() ? in.importance.const_data_ptr<acc_t>() : nullptr;
  pr.out = out;
  pr.sum_out = nullptr;
  pr.den_out = den_out;
  pr.accumulate = false;
  pr.n = in.n;
  pr.c = c;
  pr.window_stride = c * in.P[0] * in.P[1] * in.P[2];
  for (int a = 0; a < 3; ++a) {
    pr.P[a] = in.P[a];
    pr.G[a] = in.G[a];
    pr.O[a] = in.O[a];
    pr.lo[a] = 0;
    pr.hi[a] = in.O[a];
  }
  pr.normalize = normalize;
  pr.index = make_index_view(index_base, layout);
  return pr;
}

}  // namespace patchblend
