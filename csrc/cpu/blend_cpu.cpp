// The CPU binding: argument checks, allocation and the index; the row kernels are in blend_cpu_kernels.inc,
// one copy per instruction set, chosen at run time (blend_cpu_kernels.h).
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "../blend_binding.h"
#include "blend_cpu_kernels.h"
#include "large_alloc.h"

namespace patchblend {

namespace {

// Torch's thread pool for the kernels (cpu_parallel.h).
CpuParallel torch_parallel() {
  CpuParallel parallel;
  parallel.threads = static_cast<int64_t>(torch::stable::get_num_threads());
  parallel.run = [](int64_t workers, void* ctx, void (*worker)(void*)) {
    torch::stable::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(ctx); });
  };
  return parallel;
}

bool cpu_has_avx2_f16c() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// The debug switches of the CPU kernels, read from the environment once, at the first kernel call (or the first
// cpu_kernel_isa): set them before that; later changes are not seen. An unknown value is an error (at every
// call, naming the variable), never silently the default.
// - PATCHBLEND_CPU_ISA: "auto" (default) runs the AVX2 + F16C variant when the CPU has both; "baseline" forces
//   the baseline variant (the tests compare the two bitwise).
// - PATCHBLEND_CPU_KERNEL: "rows" (default) runs the row kernel; "voxel" runs the CUDA kernel's per-voxel
//   function (blend_voxel) on the CPU, so the tests can check it bitwise against the row kernel.
struct CpuSwitches {
  bool force_baseline = false;
  bool per_voxel = false;
};

// The value of `name`, which must be unset, empty, `fallback` or `other`: true for `other`.
bool read_switch(const char* name, const char* fallback, const char* other) {
  const char* flag = std::getenv(name);
  if (flag == nullptr || flag[0] == '\0' || std::strcmp(flag, fallback) == 0) return false;
  PB_CHECK(std::strcmp(flag, other) == 0, name, " must be '", fallback, "' or '", other, "', got '", flag, "'");
  return true;
}

const CpuSwitches& cpu_switches() {
  static const CpuSwitches switches = [] {
    CpuSwitches s;
    s.force_baseline = read_switch("PATCHBLEND_CPU_ISA", "auto", "baseline");
    s.per_voxel = read_switch("PATCHBLEND_CPU_KERNEL", "rows", "voxel");
    return s;
  }();
  return switches;
}

// The kernel variant for this CPU (blend_cpu_kernels.h), chosen once: AVX2 + F16C when the CPU has both, unless
// PATCHBLEND_CPU_ISA=baseline; else the baseline.
const CpuKernels& cpu_kernels() {
  static const CpuKernels& chosen = []() -> const CpuKernels& {
    const CpuKernels* avx2 = cpu_has_avx2_f16c() && !cpu_switches().force_baseline ? cpu_kernels_avx2() : nullptr;
    return avx2 != nullptr ? *avx2 : *cpu_kernels_baseline();
  }();
  return chosen;
}

template <typename scalar_t>
constexpr CpuDtype cpu_dtype() {
  if constexpr (std::is_same_v<scalar_t, float>) return CpuDtype::kFloat;
  else if constexpr (std::is_same_v<scalar_t, double>) return CpuDtype::kDouble;
  else if constexpr (std::is_same_v<scalar_t, torch::headeronly::Half>) return CpuDtype::kHalf;
  else return CpuDtype::kBFloat16;
}

template <typename scalar_t, typename acc_t>
void run_blend_cpu(const BlendProblem<scalar_t, acc_t>& pr) {
  cpu_kernels().run[static_cast<int>(cpu_dtype<scalar_t>())](&pr, torch_parallel(), cpu_switches().per_voxel);
}

Tensor blend_cpu(const Tensor& patches, const OptionalTensor& weights, const Tensor& coords,
                 const OptionalTensor& importance, IntArrayRef out_shape, std::string_view normalize) {
  PB_CHECK(patches.dim() == 5, "patches must be [N, C, P0, P1, P2], got ", Shape{patches.sizes()});
  PB_CHECK(patches.is_cpu(), "blend_cpu: patches must be on the CPU");
  const int mode = parse_normalize(normalize);
  const Tensor p = as_contiguous(patches);
  const auto acc = accumulation_dtype(p.scalar_type());
  BlendInputs in = check_inputs(weights, coords, importance, p.sizes().slice(2), out_shape, acc, p.device());
  PB_CHECK(p.size(0) == in.n, "patches and coords disagree on N");
  const int64_t c = p.size(1);
  Tensor out = empty_large({c, in.O[0], in.O[1], in.O[2]}, p.scalar_type(), "blend: the output [C, *out_shape] =");
  if (out.numel() == 0) return out;
  IndexLayout layout;
  const std::vector<int64_t> index = build_index(in, layout);
  dispatch_floating(p.scalar_type(), "blend", [&](auto type) {
    using scalar_t = decltype(type);
    using acc_t = acc_type<scalar_t>;
    auto pr = make_problem<scalar_t, acc_t>(in, index.data(), layout, p.const_data_ptr<scalar_t>(), c,
                                            out.mutable_data_ptr<scalar_t>(), nullptr, mode);
    run_blend_cpu(pr);
  });
  return out;
}

void blend_add_cpu(Tensor sum, OptionalTensor den, const Tensor& patches, const OptionalTensor& weights,
                   const Tensor& coords, const OptionalTensor& importance, std::string_view normalize) {
  PB_CHECK(patches.dim() == 5, "patches must be [N, C, P0, P1, P2], got ", Shape{patches.sizes()});
  check_accumulators(sum, den, patches);
  const int mode = parse_normalize(normalize);
  const Tensor p = as_contiguous(patches);
  const auto acc = accumulation_dtype(p.scalar_type());
  BlendInputs in = check_inputs(weights, coords, importance, p.sizes().slice(2), sum.sizes().slice(1), acc, p.device());
  PB_CHECK(p.size(0) == in.n, "patches and coords disagree on N");
  if (in.n == 0) return;
  IndexLayout layout;
  const std::vector<int64_t> index = build_index(in, layout);
  dispatch_floating(p.scalar_type(), "blend_add_", [&](auto type) {
    using scalar_t = decltype(type);
    using acc_t = acc_type<scalar_t>;
    auto pr = make_problem<scalar_t, acc_t>(in, index.data(), layout, p.const_data_ptr<scalar_t>(), p.size(1),
                                            nullptr,
                                            den.has_value() && mode != kNone ? den->mutable_data_ptr<acc_t>() : nullptr,
                                            mode);
    pr.sum_out = sum.mutable_data_ptr<acc_t>();
    pr.accumulate = true;
    covered_box(in, pr.lo, pr.hi);
    run_blend_cpu(pr);
  });
}

void blend_stream_cpu(Tensor out, const Tensor& patches, const OptionalTensor& weights, const Tensor& coords,
                      int64_t first, const OptionalTensor& importance, std::string_view normalize) {
  PB_CHECK(patches.is_cpu(), "blend_stream_ (CPU): patches must be on the CPU");
  const Tensor p = as_contiguous(patches);
  StreamInputs s = check_stream_inputs(out, p, weights, coords, first, importance, normalize);
  if (s.end == s.first) return;
  dispatch_floating(p.scalar_type(), "blend_stream_", [&](auto type) {
    using scalar_t = decltype(type);
    using acc_t = acc_type<scalar_t>;
    auto pr = make_problem<scalar_t, acc_t>(s.in, s.index->index.data(), s.index->layout,
                                            p.const_data_ptr<scalar_t>(), p.size(1), nullptr, nullptr, s.mode);
    pr.sum_out = out.mutable_data_ptr<acc_t>();
    pr.stream_first = s.first;
    pr.stream_end = s.end;
    covered_box(s.in, pr.lo, pr.hi, s.first, s.end);
    run_blend_cpu(pr);
  });
}

Tensor coverage_cpu(const OptionalTensor& weights, const Tensor& coords, const OptionalTensor& importance,
                    IntArrayRef patch_shape, IntArrayRef out_shape, std::string_view normalize, ScalarType dtype) {
  PB_CHECK(dtype == ScalarType::Float || dtype == ScalarType::Double, "coverage dtype must be float32 or float64");
  const int mode = parse_normalize(normalize);
  BlendInputs in = check_inputs(weights, coords, importance, patch_shape, out_shape, dtype, coords.device());
  Tensor den = empty_large({in.O[0], in.O[1], in.O[2]}, dtype, "coverage: the output out_shape =");
  if (den.numel() == 0) return den;
  IndexLayout layout;
  const std::vector<int64_t> index = build_index(in, layout);
  dispatch_floating(dtype, "coverage", [&](auto type) {
    using scalar_t = decltype(type);
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      auto pr = make_problem<scalar_t, scalar_t>(in, index.data(), layout, nullptr, 0, nullptr,
                                                 den.mutable_data_ptr<scalar_t>(), mode);
      run_blend_cpu(pr);
    }
  });
  return den;
}

// Row-wise copy (each row is a contiguous run along the last axis, clipped to the volume).
Tensor extract_cpu(const Tensor& volume, const Tensor& coords, IntArrayRef patch_shape) {
  PB_CHECK(volume.dim() == 4, "volume must be [C, O0, O1, O2], got ", Shape{volume.sizes()});
  PB_CHECK(coords.dim() == 2 && coords.size(1) == 3 && coords.scalar_type() == ScalarType::Long,
           "coords must be int64 [N, 3]");
  int64_t P[3], O[3];
  copy3(P, patch_shape, "patch_shape");
  for (int a = 0; a < 3; ++a) O[a] = volume.size(a + 1);
  const Tensor vol = as_contiguous(volume);
  const Tensor cc = as_contiguous(on_cpu(coords));
  const int64_t n = cc.size(0), c = vol.size(0);
  Tensor out = empty_large({n, c, P[0], P[1], P[2]}, vol.scalar_type(), "extract: the windows [N, C, *patch_shape] =");
  if (out.numel() == 0) return out;
  const int64_t* co = cc.const_data_ptr<int64_t>();
  const int64_t item = static_cast<int64_t>(vol.element_size());
  const char* src = static_cast<const char*>(vol.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  // Block r = (channel ch, local l0, window i), window fastest: the P1 x P2 rows of one window plane. Windows
  // next to each other (a batch is usually a row of windows along the last axis) read the same source rows,
  // so taking their planes one after another reads those rows from cache rather than memory.
  auto copy_block = [&](int64_t r) {
    const int64_t i = r % n, l0 = (r / n) % P[0], ch = r / (n * P[0]);
    const int64_t x0 = co[3 * i] + l0;
    char* block = dst + ((i * c + ch) * P[0] + l0) * P[1] * P[2] * item;
    const int64_t x2_lo = std::max<int64_t>(co[3 * i + 2], 0), x2_hi = std::min<int64_t>(co[3 * i + 2] + P[2], O[2]);
    if (x0 < 0 || x0 >= O[0] || x2_lo >= x2_hi) {  // the whole P1 × P2 block lies outside
      std::memset(block, 0, P[1] * P[2] * item);
      return;
    }
    const int64_t head = x2_lo - co[3 * i + 2], body = x2_hi - x2_lo, tail = P[2] - head - body;
    for (int64_t l1 = 0; l1 < P[1]; ++l1) {
      char* to = block + l1 * P[2] * item;
      const int64_t x1 = co[3 * i + 1] + l1;
      if (x1 < 0 || x1 >= O[1]) {
        std::memset(to, 0, P[2] * item);
        continue;
      }
      const int64_t from = ((ch * O[0] + x0) * O[1] + x1) * O[2] + x2_lo;
      if (head > 0) std::memset(to, 0, head * item);
      std::memcpy(to + head * item, src + from * item, body * item);
      if (tail > 0) std::memset(to + (head + body) * item, 0, tail * item);
    }
  };
  parallel_chunks(torch_parallel(), n * c * P[0], 16, [&](ChunkQueue& queue) {
    for (int64_t begin, end; queue.take(begin, end);)
      for (int64_t r = begin; r < end; ++r) copy_block(r);
  });
  return out;
}

Tensor empty_large_op(IntArrayRef size, ScalarType dtype) { return empty_large(size, dtype, "empty_large: size"); }

// The instruction set of the kernels the CPU ops run ("avx2" or "baseline"): the library's own choice, which
// `python -m patchblend info` prints.
std::string cpu_kernel_isa() { return cpu_kernels().isa; }

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(patchblend, CompositeExplicitAutograd, m) {
  m.impl("empty_large", TORCH_BOX(&empty_large_op));
  m.impl("release_cached_output", TORCH_BOX(&release_cached_output));
  m.impl("cpu_kernel_isa", TORCH_BOX(&cpu_kernel_isa));
}

STABLE_TORCH_LIBRARY_IMPL(patchblend, CPU, m) {
  m.impl("blend", TORCH_BOX(&blend_cpu));
  m.impl("blend_add_", TORCH_BOX(&blend_add_cpu));
  m.impl("blend_stream_", TORCH_BOX(&blend_stream_cpu));
  m.impl("coverage", TORCH_BOX(&coverage_cpu));
  m.impl("extract", TORCH_BOX(&extract_cpu));
}

}  // namespace patchblend
