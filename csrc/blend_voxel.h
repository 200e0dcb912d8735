// The per-voxel blend arithmetic of patchblend, stated once.
//
// Both backends call these inline functions: the CPU kernel (csrc/cpu/blend_cpu.cpp, a parallel loop
// over output voxels) and the CUDA kernel (csrc/cuda/blend_cuda.cu, one thread per output voxel).
// This header includes no torch header so that nvcc can compile the CUDA file on a machine whose
// torch has no CUDA headers.
//
// Semantics (docs/design.md#blend-semantics), for output voxel v and the patches i that cover it, in ascending patch order:
//   w_i(v)  = weights[i, cell(v - s_i)] * importance[v - s_i],   cell(k) = k * g / P  per axis
//   num(v)  = sum_i w_i(v) * p_i[:, v - s_i]
//   count:  out = num / max(1, #covering)     weight: out = num / sum_i w_i (0 if 0)     none: out = num
#pragma once

#include <cstdint>
#include <type_traits>

#include "blend_index.h"

#if defined(__CUDACC__)
#define PB_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PB_HOST_DEVICE inline
#endif

namespace patchblend {

enum Normalize : int { kCount = 0, kWeight = 1, kNone = 2 };

// Everything one blend call reads and writes. Pointers are device pointers for CUDA.
template <typename scalar_t, typename acc_t>
struct BlendProblem {
  const scalar_t* patches;   // [N, C, P0, P1, P2]
  const acc_t* weights;      // [N, G0, G1, G2] or nullptr (all ones)
  const acc_t* importance;   // [P0, P1, P2] or nullptr (all ones)
  scalar_t* out;             // [C, O0, O1, O2]: normalised result, or nullptr
  acc_t* sum_out;            // [C, O0, O1, O2]: weighted sums are ADDED here (accumulate mode), or nullptr
  acc_t* den_out;            // [O0, O1, O2] or nullptr: denominator, written (or added, in accumulate mode)
  bool accumulate;           // add into sum_out / den_out instead of writing
  int64_t n, c;
  int64_t window_stride;     // elements from one patch to the next in `patches`: C * P0 * P1 * P2 (a problem
                             // restricted to one channel keeps it while c = 1)
  int64_t P[3], G[3], O[3];
  int64_t lo[3], hi[3];      // the box of output voxels to compute (the whole output unless accumulating)
  int normalize;
  IndexView index;           // which patches cover which voxel
  // Stream mode (blend_stream_): the index holds ALL windows of a lattice in raster order and `patches`
  // only windows [stream_first, stream_end); sum_out is the running output (see stream_voxel).
  int64_t stream_first = -1, stream_end = 0;
};

// Grid-cell weights of patch n along its local row (l0, l1, l2_lo + j), j < m: calls
// visit(j_lo, j_hi, weight) for each run of one grid cell, in order (cells are runs along the last axis;
// cell_end is the end of a local run). Without weights: one run of weight 1.
template <typename scalar_t, typename acc_t, typename Visit>
PB_HOST_DEVICE void for_each_cell_run(const BlendProblem<scalar_t, acc_t>& pr, int64_t n, int64_t l0, int64_t l1,
                                      int64_t l2_lo, int64_t m, Visit&& visit) {
  if (pr.weights == nullptr) {
    visit(int64_t(0), m, acc_t(1));
    return;
  }
  const int64_t slot = pr.stream_first > 0 ? n - pr.stream_first : n;  // stream mode: weights of the batch
  const acc_t* cells = pr.weights + slot * pr.G[0] * pr.G[1] * pr.G[2] +
                       (pr.index.cell[0][l0] * pr.G[1] + pr.index.cell[1][l1]) * pr.G[2];
  for (int64_t j = 0; j < m;) {
    const int64_t l2 = l2_lo + j;
    const int64_t run_end = pr.index.cell_end[l2] - l2_lo;
    const int64_t stop = run_end < m ? run_end : m;
    visit(j, stop, cells[pr.index.cell[2][l2]]);
    j = stop;
  }
}

// The importance row of patch n at (l0, l1, l2_lo), or nullptr (all ones).
template <typename scalar_t, typename acc_t>
PB_HOST_DEVICE const acc_t* importance_row(const BlendProblem<scalar_t, acc_t>& pr, int64_t l0, int64_t l1,
                                           int64_t l2_lo) {
  return pr.importance == nullptr ? nullptr : pr.importance + (l0 * pr.P[1] + l1) * pr.P[2] + l2_lo;
}

// Weights of patch n along its local row (l0, l1, l2_lo + j), j < m: the grid-cell weight times the
// importance, w[j] = cell_weight * importance[l0, l1, l2_lo + j] (the one statement of the weight; a
// factor that is absent is 1, and 1 * x = x exactly). m = 1 gives a single voxel. Returns the row: `w`
// filled in, or, with importance alone, the importance row itself.
template <typename scalar_t, typename acc_t>
PB_HOST_DEVICE const acc_t* patch_row_weights(const BlendProblem<scalar_t, acc_t>& pr, int64_t n, int64_t l0,
                                              int64_t l1, int64_t l2_lo, int64_t m, acc_t* w) {
  const acc_t* imp = importance_row(pr, l0, l1, l2_lo);
  if (pr.weights == nullptr && imp != nullptr) return imp;
  for_each_cell_run(pr, n, l0, l1, l2_lo, m, [&](int64_t lo, int64_t hi, acc_t v) {
    if (imp == nullptr) for (int64_t j = lo; j < hi; ++j) w[j] = v;
    else for (int64_t j = lo; j < hi; ++j) w[j] = v * imp[j];
  });
  return w;
}

template <typename scalar_t, typename acc_t>
PB_HOST_DEVICE acc_t patch_voxel_weight(const BlendProblem<scalar_t, acc_t>& pr, int64_t n, int64_t l0, int64_t l1,
                                        int64_t l2) {
  acc_t w;
  return *patch_row_weights(pr, n, l0, l1, l2, 1, &w);
}

// The one statement of which patches cover which voxels, and in which order.
//
// For output row (v0, v1) and a run [xa, xb) along the last axis (lattice path: any run; tile path: a run
// inside one tile), calls visit(n, l0, l1, x_lo, x_hi, l2_lo) for every patch n that covers part of the
// run, in a fixed order (lattice order on the lattice path, which is patch order for raster-ordered
// windows; ascending patch index on the tile path). Patch n covers exactly [x_lo, x_hi) of the run, at
// local coordinates (l0, l1, l2_lo + x - x_lo). A single voxel [x, x + 1) is always a valid run.
// With a window range [n_lo, n_hi) (stream mode, raster-ordered lattice only), only patches n in it.
template <typename Visit>
PB_HOST_DEVICE void for_each_covering_run(const IndexView& ix, const int64_t P[3], int64_t v0, int64_t v1,
                                          int64_t xa, int64_t xb, Visit&& visit, int64_t n_lo = -1,
                                          int64_t n_hi = -1) {
  if (ix.is_lattice) {
    for (int64_t i0 = ix.first[0][v0]; i0 < ix.last[0][v0]; ++i0) {
      const int64_t l0 = v0 - ix.starts[0][i0];
      for (int64_t i1 = ix.first[1][v1]; i1 < ix.last[1][v1]; ++i1) {
        const int64_t l1 = v1 - ix.starts[1][i1];
        const int64_t row = (i0 * ix.lattice[1] + i1) * ix.lattice[2];
        int64_t i2_lo = ix.first[2][xa], i2_hi = ix.last[2][xb - 1];
        if (n_lo >= 0) {  // raster order: patch row + i2 is window row + i2
          i2_lo = i2_lo > n_lo - row ? i2_lo : n_lo - row;
          i2_hi = i2_hi < n_hi - row ? i2_hi : n_hi - row;
        }
        for (int64_t i2 = i2_lo; i2 < i2_hi; ++i2) {
          const int64_t s2 = ix.starts[2][i2];
          const int64_t x_lo = xa > s2 ? xa : s2;
          const int64_t x_hi = xb < s2 + P[2] ? xb : s2 + P[2];
          visit(ix.patch_of[row + i2], l0, l1, x_lo, x_hi, x_lo - s2);
        }
      }
    }
  } else {
    const int64_t tile = ((v0 / ix.tile[0]) * ix.tiles[1] + v1 / ix.tile[1]) * ix.tiles[2] + xa / ix.tile[2];
    for (int64_t k = ix.tile_offsets[tile]; k < ix.tile_offsets[tile + 1]; ++k) {
      const int64_t n = ix.tile_patches[k];
      if (n_lo >= 0 && (n < n_lo || n >= n_hi)) continue;
      const int64_t* s = ix.coords + 3 * n;
      const int64_t l0 = v0 - s[0], l1 = v1 - s[1];
      if (l0 < 0 || l0 >= P[0] || l1 < 0 || l1 >= P[1]) continue;
      const int64_t x_lo = xa > s[2] ? xa : s[2];
      const int64_t x_hi = xb < s[2] + P[2] ? xb : s[2] + P[2];
      if (x_lo < x_hi) visit(n, l0, l1, x_lo, x_hi, x_lo - s[2]);
    }
  }
}

// End of the segment (see for_each_covering_run) that starts at x along the last axis.
PB_HOST_DEVICE int64_t segment_end(const IndexView& ix, int64_t x) { return ix.segment_end[x]; }

template <typename acc_t>
PB_HOST_DEVICE acc_t finalize_voxel(acc_t num, acc_t den, int normalize) {
  if (normalize == kCount) return num / (den > acc_t(1) ? den : acc_t(1));
  if (normalize == kWeight) return den > acc_t(0) ? num / den : acc_t(0);
  return num;
}

// What one covering patch adds to the denominator: 1 ("count"), its weight ("weight"), nothing ("none",
// whose denominator is 1).
template <typename acc_t>
PB_HOST_DEVICE acc_t denominator_term(acc_t w, int normalize) {
  return normalize == kCount ? acc_t(1) : (normalize == kWeight ? w : acc_t(0));
}

// Blend one output voxel v (all channels): the CUDA kernel's unit of work. Sums over the covering
// patches in the fixed order above, writes out[:, v] (and den_out[v] when asked).
template <typename scalar_t, typename acc_t>
PB_HOST_DEVICE void blend_voxel(const BlendProblem<scalar_t, acc_t>& pr, const int64_t v[3]) {
  const int64_t out_volume = pr.O[0] * pr.O[1] * pr.O[2];
  const int64_t vox = (v[0] * pr.O[1] + v[1]) * pr.O[2] + v[2];
  const int64_t patch_volume = pr.P[0] * pr.P[1] * pr.P[2];

  acc_t den = pr.normalize == kNone ? acc_t(1) : acc_t(0);
  if (pr.normalize != kNone) {
    for_each_covering_run(pr.index, pr.P, v[0], v[1], v[2], v[2] + 1,
                          [&](int64_t n, int64_t l0, int64_t l1, int64_t, int64_t, int64_t l2) {
                            den += denominator_term(patch_voxel_weight(pr, n, l0, l1, l2), pr.normalize);
                          });
  }
  if (pr.den_out != nullptr) {
    if (pr.accumulate) pr.den_out[vox] += den;
    else pr.den_out[vox] = den;
  }
  if (pr.out == nullptr && pr.sum_out == nullptr) return;

  for (int64_t ch = 0; ch < pr.c; ++ch) {
    acc_t num = acc_t(0);
    for_each_covering_run(pr.index, pr.P, v[0], v[1], v[2], v[2] + 1,
                          [&](int64_t n, int64_t l0, int64_t l1, int64_t, int64_t, int64_t l2) {
                            const int64_t at = n * pr.window_stride + ch * patch_volume + (l0 * pr.P[1] + l1) * pr.P[2] + l2;
                            num += patch_voxel_weight(pr, n, l0, l1, l2) * static_cast<acc_t>(pr.patches[at]);
                          });
    if (pr.sum_out != nullptr) pr.sum_out[ch * out_volume + vox] += num;
    else pr.out[ch * out_volume + vox] = static_cast<scalar_t>(finalize_voxel(num, den, pr.normalize));
  }
}

// Row primitives of the CPU row kernels, m contiguous values. RowAccumulate adds one weighted patch row to
// the sums, acc[j] += (s * w[j]) * p[j] (s * p[j] when w is null), p converted to acc_t by static_cast:
// s is a grid-cell weight (or 1) and w an importance row, so s * w[j] is patch_row_weights' value, bitwise.
// RowStore converts the normalised row back to the patch dtype. The generic versions below are the
// definition; a backend may specialise them for speed (the CPU kernel does for half with F16C) provided
// the values stay exactly the same, so that the row kernels stay bitwise equal to the per-voxel ones.
template <typename scalar_t, typename acc_t>
struct RowAccumulate {
  static inline void run(acc_t* __restrict__ acc, acc_t s, const acc_t* __restrict__ w,
                         const scalar_t* __restrict__ p, int64_t m) {
    if (w == nullptr) for (int64_t j = 0; j < m; ++j) acc[j] += s * static_cast<acc_t>(p[j]);
    else for (int64_t j = 0; j < m; ++j) acc[j] += (s * w[j]) * static_cast<acc_t>(p[j]);
  }
};
template <typename scalar_t, typename acc_t>
struct RowStore {
  static inline void run(const acc_t* __restrict__ from, int64_t m, scalar_t* __restrict__ to) {
    for (int64_t j = 0; j < m; ++j) to[j] = static_cast<scalar_t>(from[j]);
  }
};

// num[ch * stride + j] += w_n(l0, l1, l2_lo + j) * p[ch * patch_volume + j] for j < m and every channel,
// where p is channel 0's row of patch n at (l0, l1, l2_lo): one RowAccumulate per grid-cell run and channel,
// so that no weight row is written.
template <typename scalar_t, typename acc_t>
PB_HOST_DEVICE void accumulate_patch_row(const BlendProblem<scalar_t, acc_t>& pr, int64_t n, int64_t l0, int64_t l1,
                                         int64_t l2_lo, int64_t m, const scalar_t* p, acc_t* num, int64_t stride) {
  const acc_t* imp = importance_row(pr, l0, l1, l2_lo);
  const int64_t patch_volume = pr.P[0] * pr.P[1] * pr.P[2];
  for_each_cell_run(pr, n, l0, l1, l2_lo, m, [&](int64_t lo, int64_t hi, acc_t v) {
    for (int64_t ch = 0; ch < pr.c; ++ch)
      RowAccumulate<scalar_t, acc_t>::run(num + ch * stride + lo, v, imp == nullptr ? nullptr : imp + lo,
                                          p + ch * patch_volume + lo, hi - lo);
  });
}

// Lattice index of the first / one past the last window covering output row (v0, v1) along axes 0, 1, and
// window index at lattice position (i0, i1, i2) (raster order: the position itself).
struct LatticeRow {
  int64_t f0, e0, f1, e1;
  bool covered;
};
PB_HOST_DEVICE LatticeRow lattice_row(const IndexView& ix, int64_t v0, int64_t v1) {
  LatticeRow r{ix.first[0][v0], ix.last[0][v0], ix.first[1][v1], ix.last[1][v1], false};
  r.covered = r.f0 < r.e0 && r.f1 < r.e1;
  return r;
}
PB_HOST_DEVICE int64_t lattice_window(const IndexView& ix, int64_t i0, int64_t i1, int64_t i2) {
  return (i0 * ix.lattice[1] + i1) * ix.lattice[2] + i2;
}

// The number of windows covering a voxel of row r whose windows along the last axis are [f2, e2): on a
// lattice, the product of the per-axis counts.
PB_HOST_DEVICE int64_t lattice_count(const LatticeRow& r, int64_t f2, int64_t e2) {
  return (r.e0 - r.f0) * (r.e1 - r.f1) * (e2 - f2);
}

// "count" denominators of the run [xa, xb) of output row (v0, v1) on a lattice: the covering-window count,
// constant along each coverage segment (integers, so the same values as counting the visits).
template <typename acc_t>
PB_HOST_DEVICE void lattice_counts(const IndexView& ix, int64_t v0, int64_t v1, int64_t xa, int64_t xb, acc_t* den) {
  const LatticeRow r = lattice_row(ix, v0, v1);
  for (int64_t x = xa; x < xb;) {  // one coverage segment at a time
    const int64_t end = ix.coverage_end[x] < xb ? ix.coverage_end[x] : xb;
    const acc_t count = acc_t(lattice_count(r, ix.first[2][x], ix.last[2][x]));  // 0 where uncovered
    for (int64_t j = x - xa; j < end - xa; ++j) den[j] = count;
    x = end;
  }
}

// Whether the denominator comes without visiting the patches: "none" (1), or "count" on a lattice (the
// window counts, lattice_counts).
template <typename scalar_t, typename acc_t>
PB_HOST_DEVICE bool denominator_without_visits(const BlendProblem<scalar_t, acc_t>& pr) {
  return pr.normalize == kNone || (pr.normalize == kCount && pr.index.is_lattice);
}

// Whether blend_run may take several rows at once: a lattice (not in stream mode) whose denominator comes
// without visits.
template <typename scalar_t, typename acc_t>
PB_HOST_DEVICE bool blocks_of_rows(const BlendProblem<scalar_t, acc_t>& pr) {
  return pr.index.is_lattice && pr.stream_first < 0 && denominator_without_visits(pr);
}

// "weight" denominators: d[j] += w_n(l0, l1, l2_lo + j) for j < m (1 when every weight is 1). Scratch: w [m].
template <typename scalar_t, typename acc_t>
PB_HOST_DEVICE void add_weight_sums(const BlendProblem<scalar_t, acc_t>& pr, int64_t n, int64_t l0, int64_t l1,
                                    int64_t l2_lo, int64_t m, acc_t* __restrict__ d, acc_t* w) {
  if (pr.weights == nullptr && pr.importance == nullptr) {
    for (int64_t j = 0; j < m; ++j) d[j] += acc_t(1);
  } else {
    const acc_t* __restrict__ ww = patch_row_weights(pr, n, l0, l1, l2_lo, m, w);
    for (int64_t j = 0; j < m; ++j) d[j] += ww[j];
  }
}

// finalize_voxel's "weight" case for m values, without branches on the data so that the loop vectorises:
// o[j] = acc[j] / den[j], 0 where den[j] is 0 (o may be acc).
template <typename acc_t>
PB_HOST_DEVICE void weight_normalize_row(acc_t* o, const acc_t* acc, const acc_t* __restrict__ den, int64_t m) {
  for (int64_t j = 0; j < m; ++j) {
    const acc_t q = acc[j] / (den[j] + acc_t(den[j] == acc_t(0)));
    o[j] = den[j] > acc_t(0) ? q : acc_t(0);
  }
}

// Blend the run [xa, xb) of the `rows` output rows (v0, v1 + k), k < rows, one segment each (see
// for_each_covering_run): the CPU kernel's unit of work. Several rows only where blocks_of_rows holds
// and the rows have the same covering windows (on a lattice: the same first/last window along axis 1);
// each patch then adds its `rows` consecutive local rows, which lie one after the other in memory, in
// one go, a sequential read that the hardware prefetchers follow. Same terms, same order per voxel as
// blend_voxel, so the result is bitwise the same; the loop order (patch outside, contiguous x inside)
// lets the compiler vectorise.
// Scratch: num [rows * C * (xb - xa)], den and w [xb - xa] each.
template <typename scalar_t, typename acc_t>
PB_HOST_DEVICE void blend_run(const BlendProblem<scalar_t, acc_t>& pr, int64_t v0, int64_t v1, int64_t rows,
                              int64_t xa, int64_t xb, acc_t* num, acc_t* den, acc_t* w) {
  const IndexView& ix = pr.index;
  const int64_t len = xb - xa;
  const int64_t out_volume = pr.O[0] * pr.O[1] * pr.O[2];
  const int64_t channels = (pr.out != nullptr || pr.sum_out != nullptr) ? pr.c : 0;
  // "count" on a lattice: the denominators come from the window counts, not from the visits.
  const bool counted = pr.normalize == kCount && ix.is_lattice;
  for (int64_t j = 0; j < len; ++j) den[j] = acc_t(0);
  bool partial = false;  // some patch covered only part of the run
  for (int64_t j = 0; j < rows * channels * len; ++j) num[j] = acc_t(0);

  // Patches covering the whole run in "count" mode add 1 to every voxel: counted once in `whole`
  // (integer-valued, so the sum is exact and the result equals the per-voxel one bitwise).
  acc_t whole = acc_t(0);
  for_each_covering_run(ix, pr.P, v0, v1, xa, xb,
                        [&](int64_t n, int64_t l0, int64_t l1, int64_t x_lo, int64_t x_hi, int64_t l2_lo) {
                          const int64_t m = x_hi - x_lo, off = x_lo - xa;
                          acc_t* __restrict__ d = den + off;
                          partial = partial || m != len;
                          // The branches below hoist loop-invariant cases out of the loops so that they
                          // vectorise; every value is the one patch_row_weights/denominator_term give.
                          if (pr.normalize == kCount && !counted) {
                            if (m == len) whole += acc_t(1);
                            else for (int64_t j = 0; j < m; ++j) d[j] += acc_t(1);
                          } else if (pr.normalize == kWeight) {
                            add_weight_sums(pr, n, l0, l1, l2_lo, m, d, w);
                          }
                          if (channels > 0) {
                            const scalar_t* p = pr.patches + n * pr.window_stride + (l0 * pr.P[1] + l1) * pr.P[2] + l2_lo;
                            for (int64_t k = 0; k < rows; ++k)
                              accumulate_patch_row(pr, n, l0, l1 + k, l2_lo, m, p + k * pr.P[2],
                                                   num + k * channels * len + off, len);
                          }
                        });
  if (counted) {
    lattice_counts(ix, v0, v1, xa, xb, den);
    partial = true;
  } else if (pr.normalize == kNone) {
    for (int64_t j = 0; j < len; ++j) den[j] = acc_t(1);
  } else if (partial || pr.normalize == kWeight) {
    for (int64_t j = 0; j < len; ++j) den[j] += whole;
  }

  const bool den_per_voxel = partial || pr.normalize != kCount;
  for (int64_t k = 0; k < rows; ++k) {
    const int64_t row = (v0 * pr.O[1] + v1 + k) * pr.O[2] + xa;
    acc_t* const num_k = num + k * channels * len;
    if (pr.den_out != nullptr && pr.accumulate) {
      for (int64_t j = 0; j < len; ++j) pr.den_out[row + j] += den_per_voxel ? den[j] : whole;
    } else if (pr.den_out != nullptr) {
      for (int64_t j = 0; j < len; ++j) pr.den_out[row + j] = den_per_voxel ? den[j] : whole;
    }
    if (pr.sum_out != nullptr) {  // accumulate mode: add the weighted sums, no normalisation
      for (int64_t ch = 0; ch < channels; ++ch) {
        acc_t* __restrict__ o = pr.sum_out + ch * out_volume + row;
        const acc_t* __restrict__ acc = num_k + ch * len;
        for (int64_t j = 0; j < len; ++j) o[j] += acc[j];
      }
      continue;
    }
    // finalize_voxel, written without branches on the data so that the loops vectorise; the values are
    // the same: a zero denominator is replaced by 1 before dividing (its numerator is 0 in "count" mode),
    // and "weight" mode selects 0 where the weight sum is 0.
    // The normalised values go straight to the output when it is acc_t, else back into the scratch row
    // and then through RowStore (the same static_cast, vectorised where a backend specialises it).
    for (int64_t ch = 0; ch < channels; ++ch) {
      acc_t* acc = num_k + ch * len;
      acc_t* o;
      if constexpr (std::is_same_v<scalar_t, acc_t>) o = pr.out + ch * out_volume + row;
      else o = acc;
      if (pr.normalize == kNone) {
        for (int64_t j = 0; j < len; ++j) o[j] = acc[j];
      } else if (pr.normalize == kCount && !partial) {
        const acc_t d = whole > acc_t(1) ? whole : acc_t(1);
        for (int64_t j = 0; j < len; ++j) o[j] = acc[j] / d;
      } else if (pr.normalize == kCount) {
        for (int64_t j = 0; j < len; ++j) o[j] = acc[j] / (den[j] + acc_t(den[j] == acc_t(0)));
      } else {
        weight_normalize_row(o, acc, den, len);
      }
      if constexpr (!std::is_same_v<scalar_t, acc_t>) RowStore<scalar_t, acc_t>::run(acc, len, pr.out + ch * out_volume + row);
    }
  }
}

// ---- Stream mode: windows of a raster-ordered lattice arrive in consecutive batches -----------------------
//
// The running buffer R = pr.sum_out [C, *O] holds, for every voxel, the weighted sum of the windows seen so
// far that cover it, and the finished value once its last covering window has been added. A batch holds
// windows [first, end) (patch n of the index is patches[n - first]). For voxel v with covering windows
// F(v) = min index ... L(v) = max index (a lattice in raster order: the windows at the lowest / highest
// lattice position):
//   if no window of the batch covers v: R[v] is left alone;
//   acc = (F(v) < first ? R[v] : 0), then acc += w_i(v) p_i(v) for the batch's covering windows in order;
//   R[v] = L(v) < end ? finalize_voxel(acc, den(v)) : acc,   den over ALL covering windows.
// So the sum runs in the same order as one blend of all windows, and the result is bitwise the same as
// blend_voxel's, without a zero-filled buffer, a denominator volume or a division pass. Needs a
// denominator that does not depend on predicted weights: "count", "none", or "weight" without weights.

// The denominator of voxel v over all its covering windows, given the weight sum `weight_sum` where
// "weight" needs it.
template <typename acc_t>
PB_HOST_DEVICE acc_t stream_denominator(const IndexView& ix, const LatticeRow& r, int64_t x, int normalize,
                                        acc_t weight_sum) {
  if (normalize == kCount) return acc_t(lattice_count(r, ix.first[2][x], ix.last[2][x]));
  if (normalize == kWeight) return weight_sum;
  return acc_t(1);
}

// Stream mode for one voxel (the CUDA kernel's unit of work).
template <typename scalar_t, typename acc_t>
PB_HOST_DEVICE void stream_voxel(const BlendProblem<scalar_t, acc_t>& pr, const int64_t v[3]) {
  const IndexView& ix = pr.index;
  const LatticeRow r = lattice_row(ix, v[0], v[1]);
  const int64_t x = v[2];
  if (!r.covered || ix.first[2][x] >= ix.last[2][x]) return;
  const int64_t first_window = lattice_window(ix, r.f0, r.f1, ix.first[2][x]);
  const int64_t last_window = lattice_window(ix, r.e0 - 1, r.e1 - 1, ix.last[2][x] - 1);
  if (last_window < pr.stream_first || first_window >= pr.stream_end) return;  // quick reject
  const bool finishes = last_window < pr.stream_end;
  const int64_t out_volume = pr.O[0] * pr.O[1] * pr.O[2];
  const int64_t vox = (v[0] * pr.O[1] + v[1]) * pr.O[2] + x;
  const int64_t patch_volume = pr.P[0] * pr.P[1] * pr.P[2];

  bool hit = false;
  acc_t weight_sum = acc_t(0);
  for_each_covering_run(ix, pr.P, v[0], v[1], x, x + 1,
                        [&](int64_t n, int64_t l0, int64_t l1, int64_t, int64_t, int64_t l2) {
                          hit = hit || (n >= pr.stream_first && n < pr.stream_end);
                          if (finishes && pr.normalize == kWeight) weight_sum += patch_voxel_weight(pr, n, l0, l1, l2);
                        });
  if (!hit) return;
  const acc_t den = stream_denominator(ix, r, x, pr.normalize, weight_sum);
  for (int64_t ch = 0; ch < pr.c; ++ch) {
    acc_t* at_out = pr.sum_out + ch * out_volume + vox;
    acc_t acc = first_window < pr.stream_first ? *at_out : acc_t(0);
    for_each_covering_run(ix, pr.P, v[0], v[1], x, x + 1,
                          [&](int64_t n, int64_t l0, int64_t l1, int64_t, int64_t, int64_t l2) {
                            if (n < pr.stream_first || n >= pr.stream_end) return;
                            const int64_t at = (n - pr.stream_first) * pr.window_stride + ch * patch_volume +
                                               (l0 * pr.P[1] + l1) * pr.P[2] + l2;
                            acc += patch_voxel_weight(pr, n, l0, l1, l2) * static_cast<acc_t>(pr.patches[at]);
                          });
    *at_out = finishes ? finalize_voxel(acc, den, pr.normalize) : acc;
  }
}

// The coverage segments of one row run in stream mode: segment k is [xa + start[k], xa + start[k + 1]) and
// has one set of covering windows, so one value of: seen (an earlier batch has written the running sum),
// finishes (a window of the batch covers it and none after it does) and divisor (the window count where it
// finishes in "count" mode, else 1). They depend on the row only through (f0, e0, f1, e1), which consecutive
// rows share, so the CPU kernel keeps them between rows (`key`). Memory (xb - xa + 1 entries each) is the
// caller's.
template <typename acc_t>
struct StreamSegments {
  int64_t key[6] = {-1, -1, -1, -1, -1, -1};
  int64_t count = 0;
  int64_t* start;
  bool* seen;
  bool* finishes;
  acc_t* divisor;
};

template <typename scalar_t, typename acc_t>
PB_HOST_DEVICE void stream_segments(const BlendProblem<scalar_t, acc_t>& pr, const LatticeRow& r, int64_t xa,
                                    int64_t xb, StreamSegments<acc_t>& sg) {
  const int64_t key[6] = {r.f0, r.e0, r.f1, r.e1, xa, xb};
  bool same = true;
  for (int k = 0; k < 6; ++k) same = same && sg.key[k] == key[k];
  if (same) return;
  const IndexView& ix = pr.index;
  sg.count = 0;
  for (int64_t x = xa; x < xb;) {
    const int64_t end = ix.coverage_end[x] < xb ? ix.coverage_end[x] : xb;
    const int64_t f2 = ix.first[2][x], e2 = ix.last[2][x];
    bool touched = false, seen = false, finishes = false;
    acc_t divisor = acc_t(1);
    if (f2 < e2) {
      // For fixed (i0, i1) the covering windows are the index range [w(i0, i1, f2), w(i0, i1, e2)): does one
      // of these ranges meet the batch's [stream_first, stream_end)?
      for (int64_t i0 = r.f0; i0 < r.e0; ++i0)
        for (int64_t i1 = r.f1; i1 < r.e1; ++i1)
          touched = touched || (lattice_window(ix, i0, i1, f2) < pr.stream_end &&
                                lattice_window(ix, i0, i1, e2) > pr.stream_first);
      seen = lattice_window(ix, r.f0, r.f1, f2) < pr.stream_first;
      finishes = touched && lattice_window(ix, r.e0 - 1, r.e1 - 1, e2 - 1) < pr.stream_end;
      if (finishes && pr.normalize == kCount) divisor = acc_t(lattice_count(r, f2, e2));  // >= 1
    }
    sg.start[sg.count] = x - xa;
    sg.seen[sg.count] = seen;
    sg.finishes[sg.count] = finishes;
    sg.divisor[sg.count] = divisor;
    ++sg.count;
    x = end;
  }
  sg.start[sg.count] = xb - xa;
  for (int k = 0; k < 6; ++k) sg.key[k] = key[k];
}

// Stream mode for the run [xa, xb) of output row (v0, v1) (the CPU kernel's unit of work), in place in the
// running buffer: the same terms in the same order per voxel as stream_voxel, so bitwise the same.
//   1. a voxel no earlier batch wrote starts from 0 (written; for one the batch does not touch that is also
//      right: no window covers it, or its first window is in a later batch, which starts from 0 unread);
//   2. the batch's terms are added to the running sums;
//   3. where the voxel finishes: divided by its count ("count"), or finalize_voxel with its weight sum
//      ("weight"); x / 1 being exact, segments with divisor 1 are left as they are.
// Scratch: den and w [xb - xa] each ("weight"), and the segments (see StreamSegments).
template <typename scalar_t, typename acc_t>
PB_HOST_DEVICE void stream_run(const BlendProblem<scalar_t, acc_t>& pr, int64_t v0, int64_t v1, int64_t xa,
                               int64_t xb, acc_t* den, acc_t* w, StreamSegments<acc_t>& sg) {
  const IndexView& ix = pr.index;
  const LatticeRow r = lattice_row(ix, v0, v1);
  if (!r.covered) return;
  const int64_t len = xb - xa;
  const int64_t out_volume = pr.O[0] * pr.O[1] * pr.O[2];
  acc_t* const row = pr.sum_out + (v0 * pr.O[1] + v1) * pr.O[2] + xa;  // channel 0; channels out_volume apart
  stream_segments(pr, r, xa, xb, sg);

  // Weight sums are needed only if some voxel of the run finishes in this batch. L(x) does not decrease
  // with x, so test x = xa (an uncovered xa gives a lower bound, which only makes the test conservative).
  const bool weight_den = pr.normalize == kWeight &&
                          lattice_window(ix, r.e0 - 1, r.e1 - 1, ix.last[2][xa] - 1) < pr.stream_end;
  if (weight_den) for (int64_t j = 0; j < len; ++j) den[j] = acc_t(0);
  for (int64_t k = 0; k < sg.count; ++k) {
    if (sg.seen[k]) continue;
    for (int64_t ch = 0; ch < pr.c; ++ch) {
      acc_t* __restrict__ o = row + ch * out_volume;
      for (int64_t j = sg.start[k]; j < sg.start[k + 1]; ++j) o[j] = acc_t(0);
    }
  }
  for_each_covering_run(ix, pr.P, v0, v1, xa, xb,
                        [&](int64_t n, int64_t l0, int64_t l1, int64_t x_lo, int64_t x_hi, int64_t l2_lo) {
                          const bool in_batch = n >= pr.stream_first && n < pr.stream_end;
                          const int64_t m = x_hi - x_lo, off = x_lo - xa;
                          if (weight_den) add_weight_sums(pr, n, l0, l1, l2_lo, m, den + off, w);
                          if (!in_batch) return;
                          const scalar_t* p = pr.patches + (n - pr.stream_first) * pr.window_stride +
                                              (l0 * pr.P[1] + l1) * pr.P[2] + l2_lo;
                          accumulate_patch_row(pr, n, l0, l1, l2_lo, m, p, row + off, out_volume);
                        },
                        weight_den ? -1 : pr.stream_first, weight_den ? -1 : pr.stream_end);
  for (int64_t k = 0; k < sg.count; ++k) {
    if (!sg.finishes[k]) continue;
    const int64_t lo = sg.start[k], hi = sg.start[k + 1];
    for (int64_t ch = 0; ch < pr.c; ++ch) {
      acc_t* __restrict__ o = row + ch * out_volume;
      if (pr.normalize == kWeight) {  // finishes implies weight_den (see above)
        weight_normalize_row(o + lo, o + lo, den + lo, hi - lo);
      } else if (sg.divisor[k] != acc_t(1)) {
        const acc_t d = sg.divisor[k];
        for (int64_t j = lo; j < hi; ++j) o[j] = o[j] / d;
      }
    }
  }
}

// One element of patch extraction (the blend's adjoint): out[n, c, local] = volume[c, s_n + local],
// or 0 outside the volume. `e` is the flat index into out [N, C, P0, P1, P2].
template <typename scalar_t>
PB_HOST_DEVICE scalar_t extract_element(const scalar_t* volume, const int64_t* coords, const int64_t P[3],
                                        const int64_t O[3], int64_t c, int64_t e) {
  int64_t rest = e;
  const int64_t l2 = rest % P[2]; rest /= P[2];
  const int64_t l1 = rest % P[1]; rest /= P[1];
  const int64_t l0 = rest % P[0]; rest /= P[0];
  const int64_t ch = rest % c;
  const int64_t n = rest / c;
  const int64_t x0 = coords[3 * n] + l0, x1 = coords[3 * n + 1] + l1, x2 = coords[3 * n + 2] + l2;
  if (x0 < 0 || x1 < 0 || x2 < 0 || x0 >= O[0] || x1 >= O[1] || x2 >= O[2]) return scalar_t(0.0f);
  return volume[((ch * O[0] + x0) * O[1] + x1) * O[2] + x2];
}

}  // namespace patchblend
