// CPU kernels: a parallel loop over output rows calling the shared per-voxel gather (blend_voxel.h).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../blend_binding.h"
#include "large_alloc.h"

namespace patchblend {

// Vectorised half <-> float row conversions (F16C), exactly the values of c10::Half's scalar conversion
// (which is _cvtsh_ss / _cvtss_sh, round to nearest even, when F16C is on).
#if defined(__F16C__) && defined(__AVX__)
template <>
struct RowAccumulate<c10::Half, float> {
  static inline void run(float* __restrict__ acc, float s, const float* __restrict__ w, const c10::Half* __restrict__ p,
                         int64_t m) {
    auto load8 = [p](int64_t j) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j))); };
    const __m256 s8 = _mm256_set1_ps(s);
    int64_t j = 0;
    // mul then add, not FMA: the same rounding as the generic version
    if (w == nullptr) {
      for (; j + 8 <= m; j += 8)
        _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), _mm256_mul_ps(s8, load8(j))));
      for (; j < m; ++j) acc[j] += s * static_cast<float>(p[j]);
    } else {
      for (; j + 8 <= m; j += 8)
        _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j),
                                                _mm256_mul_ps(_mm256_mul_ps(s8, _mm256_loadu_ps(w + j)), load8(j))));
      for (; j < m; ++j) acc[j] += (s * w[j]) * static_cast<float>(p[j]);
    }
  }
};
template <>
struct RowStore<c10::Half, float> {
  static inline void run(const float* __restrict__ from, int64_t m, c10::Half* __restrict__ to) {
    int64_t j = 0;
    for (; j + 8 <= m; j += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(to + j),
                       _mm256_cvtps_ph(_mm256_loadu_ps(from + j), _MM_FROUND_TO_NEAREST_INT));
    for (; j < m; ++j) to[j] = static_cast<c10::Half>(from[j]);
  }
};
#endif

namespace {

// PATCHBLEND_CPU_KERNEL=voxel runs the CUDA kernel's per-voxel function (blend_voxel) on the CPU, so
// the tests can check it bitwise against the default row kernel (blend_run).
bool use_voxel_kernel() {
  const char* flag = std::getenv("PATCHBLEND_CPU_KERNEL");
  return flag != nullptr && std::strcmp(flag, "voxel") == 0;
}

// Work sharing for a shared machine: [0, total) is handed out in chunks of `grain` on demand (an atomic
// counter) rather than as one fixed share per thread, so that a thread the machine stalls does not hold
// the others up. per_thread(queue) runs once on each thread: it sets up its scratch, then takes chunks.
class ChunkQueue {
 public:
  ChunkQueue(int64_t total, int64_t grain) : total_(total), grain_(std::max<int64_t>(grain, 1)) {}
  bool take(int64_t& begin, int64_t& end) {  // the next chunk; false when none is left
    begin = next_.fetch_add(1) * grain_;
    end = std::min(total_, begin + grain_);
    return begin < total_;
  }
  int64_t chunks() const { return (total_ + grain_ - 1) / grain_; }

 private:
  const int64_t total_, grain_;
  std::atomic<int64_t> next_{0};
};

template <typename PerThread>
void parallel_chunks(int64_t total, int64_t grain, const PerThread& per_thread) {
  ChunkQueue queue(total, grain);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), queue.chunks()));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { per_thread(queue); });
}

template <typename scalar_t, typename acc_t>
void run_rows(const BlendProblem<scalar_t, acc_t>& pr) {
  const int64_t rows0 = pr.hi[0] - pr.lo[0], rows1 = pr.hi[1] - pr.lo[1];
  if (rows0 <= 0 || rows1 <= 0 || pr.hi[2] <= pr.lo[2]) return;
  const int64_t rows = rows0 * rows1;
  const int64_t width = pr.hi[2] - pr.lo[2];
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width * std::max<int64_t>(pr.c, 1), 1));
  const bool per_voxel = use_voxel_kernel();
  const bool stream = pr.stream_first >= 0;
  // Values do not depend on which thread does a row.
  // Rows blended together where blend_run allows it (see blocks_of_rows): up to kBlockRows consecutive rows
  // of one plane with the same covering windows.
  constexpr int64_t kBlockRows = 8;
  const bool blocks = !per_voxel && blocks_of_rows(pr);
  const int64_t block_rows = blocks ? kBlockRows : 1;
  const int64_t* first1 = pr.index.first[1];
  const int64_t* last1 = pr.index.last[1];
  parallel_chunks(rows, grain, [&](ChunkQueue& queue) {
    const int64_t channels = (pr.out != nullptr || pr.sum_out != nullptr) ? pr.c : 0;
    std::vector<acc_t> scratch(static_cast<size_t>((block_rows * channels + 2) * width));  // num, den, w
    acc_t* num = scratch.data();
    acc_t* den = num + block_rows * channels * width;
    acc_t* w = den + width;
    const size_t segments = stream ? static_cast<size_t>(width + 1) : 0;
    std::vector<int64_t> segment_start(segments);
    std::unique_ptr<bool[]> segment_flags(new bool[2 * segments]);
    std::vector<acc_t> segment_divisor(segments);
    StreamSegments<acc_t> sg;
    sg.start = segment_start.data();
    sg.seen = segment_flags.get();
    sg.finishes = sg.seen + segments;
    sg.divisor = segment_divisor.data();
    for (int64_t begin, end; queue.take(begin, end);) {
      for (int64_t r = begin; r < end;) {
        const int64_t v0 = pr.lo[0] + r / rows1, v1 = pr.lo[1] + r % rows1;
        if (per_voxel) {
          for (int64_t x = pr.lo[2]; x < pr.hi[2]; ++x) {
            const int64_t v[3] = {v0, v1, x};
            if (stream) stream_voxel(pr, v);
            else blend_voxel(pr, v);
          }
          ++r;
          continue;
        }
        int64_t k = 1;  // rows in this block: same plane, same covering windows along axis 1
        if (blocks) {
          const int64_t limit = std::min({end - r, block_rows, pr.hi[1] - v1});
          while (k < limit && first1[v1 + k] == first1[v1] && last1[v1 + k] == last1[v1]) ++k;
        }
        for (int64_t xa = pr.lo[2]; xa < pr.hi[2];) {
          const int64_t xb = std::min(segment_end(pr.index, xa), pr.hi[2]);
          if (stream) stream_run(pr, v0, v1, xa, xb, den, w, sg);
          else blend_run(pr, v0, v1, k, xa, xb, num, den, w);
          xa = xb;
        }
        r += k;
      }
    }
  });
}

// Several channels: when the denominator costs next to nothing per row (a lattice's "count", or "none"),
// one channel after the other. A row then reads one channel of each covering patch instead of all of them:
// C times fewer concurrent memory streams, which the hardware prefetchers can follow (16 channels on 2
// threads: 1.6x faster). Channels do not interact, so the values are the same.
template <typename scalar_t, typename acc_t>
void run_blend_cpu(const BlendProblem<scalar_t, acc_t>& pr) {
  if (pr.c <= 1 || !denominator_without_visits(pr) || (pr.out == nullptr && pr.sum_out == nullptr)) {
    run_rows(pr);
    return;
  }
  const int64_t out_volume = pr.O[0] * pr.O[1] * pr.O[2];
  const int64_t patch_volume = pr.P[0] * pr.P[1] * pr.P[2];
  for (int64_t ch = 0; ch < pr.c; ++ch) {
    BlendProblem<scalar_t, acc_t> one = pr;
    one.c = 1;
    one.patches = pr.patches + ch * patch_volume;  // window_stride stays C * patch_volume
    if (pr.out != nullptr) one.out = pr.out + ch * out_volume;
    if (pr.sum_out != nullptr) one.sum_out = pr.sum_out + ch * out_volume;
    if (ch > 0) one.den_out = nullptr;  // written (or added) once
    run_rows(one);
  }
}

at::Tensor blend_cpu(const at::Tensor& patches, const c10::optional<at::Tensor>& weights, const at::Tensor& coords,
                     const c10::optional<at::Tensor>& importance, c10::IntArrayRef out_shape,
                     c10::string_view normalize) {
  TORCH_CHECK(patches.dim() == 5, "patches must be [N, C, P0, P1, P2], got ", patches.sizes());
  TORCH_CHECK(patches.device().is_cpu(), "blend_cpu: patches must be on the CPU");
  const int mode = parse_normalize(std::string(normalize));
  const at::Tensor p = patches.contiguous();
  const auto acc = at::toOpMathType(p.scalar_type());
  BlendInputs in = check_inputs(weights, coords, importance, p.sizes().slice(2), out_shape, acc, p.device());
  TORCH_CHECK(p.size(0) == in.n, "patches and coords disagree on N");
  const int64_t c = p.size(1);
  at::Tensor out = empty_large({c, in.O[0], in.O[1], in.O[2]}, p.options());
  if (out.numel() == 0) return out;
  IndexLayout layout;
  const std::vector<int64_t> index = build_index(in, layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "patchblend_blend_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto pr = make_problem<scalar_t, acc_t>(in, index.data(), layout, p.data_ptr<scalar_t>(), c,
                                            out.data_ptr<scalar_t>(), nullptr, mode);
    run_blend_cpu(pr);
  });
  return out;
}

void blend_add_cpu(at::Tensor& sum, const c10::optional<at::Tensor>& den, const at::Tensor& patches,
                   const c10::optional<at::Tensor>& weights, const at::Tensor& coords,
                   const c10::optional<at::Tensor>& importance, c10::string_view normalize) {
  TORCH_CHECK(patches.dim() == 5, "patches must be [N, C, P0, P1, P2], got ", patches.sizes());
  check_accumulators(sum, den, patches);
  const int mode = parse_normalize(std::string(normalize));
  const at::Tensor p = patches.contiguous();
  const auto acc = at::toOpMathType(p.scalar_type());
  BlendInputs in = check_inputs(weights, coords, importance, p.sizes().slice(2), sum.sizes().slice(1), acc, p.device());
  TORCH_CHECK(p.size(0) == in.n, "patches and coords disagree on N");
  if (in.n == 0) return;
  IndexLayout layout;
  const std::vector<int64_t> index = build_index(in, layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "patchblend_blend_add_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto pr = make_problem<scalar_t, acc_t>(in, index.data(), layout, p.data_ptr<scalar_t>(), p.size(1), nullptr,
                                            den.has_value() && mode != kNone ? den->data_ptr<acc_t>() : nullptr, mode);
    pr.sum_out = sum.data_ptr<acc_t>();
    pr.accumulate = true;
    covered_box(in, pr.lo, pr.hi);
    run_blend_cpu(pr);
  });
}

void blend_stream_cpu(at::Tensor& out, const at::Tensor& patches, const c10::optional<at::Tensor>& weights,
                      const at::Tensor& coords, int64_t first, const c10::optional<at::Tensor>& importance,
                      c10::string_view normalize) {
  TORCH_CHECK(patches.device().is_cpu(), "blend_stream_ (CPU): patches must be on the CPU");
  const at::Tensor p = patches.contiguous();
  StreamInputs s = check_stream_inputs(out, p, weights, coords, first, importance, std::string(normalize));
  if (s.end == s.first) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "patchblend_blend_stream_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto pr = make_problem<scalar_t, acc_t>(s.in, s.index->index.data(), s.index->layout, p.data_ptr<scalar_t>(),
                                            p.size(1), nullptr, nullptr, s.mode);
    pr.sum_out = out.data_ptr<acc_t>();
    pr.stream_first = s.first;
    pr.stream_end = s.end;
    covered_box(s.in, pr.lo, pr.hi, s.first, s.end);
    run_blend_cpu(pr);
  });
}

at::Tensor coverage_cpu(const c10::optional<at::Tensor>& weights, const at::Tensor& coords,
                        const c10::optional<at::Tensor>& importance, c10::IntArrayRef patch_shape,
                        c10::IntArrayRef out_shape, c10::string_view normalize, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "coverage dtype must be float32 or float64");
  const int mode = parse_normalize(std::string(normalize));
  BlendInputs in = check_inputs(weights, coords, importance, patch_shape, out_shape, dtype, coords.device());
  at::Tensor den = empty_large({in.O[0], in.O[1], in.O[2]}, coords.options().dtype(dtype));
  if (den.numel() == 0) return den;
  IndexLayout layout;
  const std::vector<int64_t> index = build_index(in, layout);
  AT_DISPATCH_FLOATING_TYPES(dtype, "patchblend_coverage_cpu", [&] {
    auto pr = make_problem<scalar_t, scalar_t>(in, index.data(), layout, nullptr, 0, nullptr,
                                               den.data_ptr<scalar_t>(), mode);
    run_blend_cpu(pr);
  });
  return den;
}

// Row-wise copy (each row is a contiguous run along the last axis, clipped to the volume).
at::Tensor extract_cpu(const at::Tensor& volume, const at::Tensor& coords, c10::IntArrayRef patch_shape) {
  TORCH_CHECK(volume.dim() == 4, "volume must be [C, O0, O1, O2], got ", volume.sizes());
  TORCH_CHECK(coords.dim() == 2 && coords.size(1) == 3 && coords.scalar_type() == at::kLong,
              "coords must be int64 [N, 3]");
  int64_t P[3], O[3];
  copy3(P, patch_shape, "patch_shape");
  for (int a = 0; a < 3; ++a) O[a] = volume.size(a + 1);
  const at::Tensor vol = volume.contiguous();
  const at::Tensor cc = coords.to(at::kCPU).contiguous();
  const int64_t n = cc.size(0), c = vol.size(0);
  at::Tensor out = at::empty({n, c, P[0], P[1], P[2]}, vol.options());
  if (out.numel() == 0) return out;
  const int64_t* co = cc.data_ptr<int64_t>();
  const int64_t item = vol.element_size();
  const char* src = static_cast<const char*>(vol.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
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
  parallel_chunks(n * c * P[0], 16, [&](ChunkQueue& queue) {
    for (int64_t begin, end; queue.take(begin, end);)
      for (int64_t r = begin; r < end; ++r) copy_block(r);
  });
  return out;
}

at::Tensor empty_large_op(c10::IntArrayRef size, at::ScalarType dtype) {
  return empty_large(size, at::TensorOptions().dtype(dtype));
}

}  // namespace

TORCH_LIBRARY_IMPL(patchblend, CompositeExplicitAutograd, m) {
  m.impl("empty_large", &empty_large_op);
  m.impl("release_cached_output", &release_cached_output);
}

TORCH_LIBRARY_IMPL(patchblend, CPU, m) {
  m.impl("blend", &blend_cpu);
  m.impl("blend_add_", &blend_add_cpu);
  m.impl("blend_stream_", &blend_stream_cpu);
  m.impl("coverage", &coverage_cpu);
  m.impl("extract", &extract_cpu);
}

}  // namespace patchblend
