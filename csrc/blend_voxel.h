// The per-voxel blend arithmetic of patchblend, stated once.
//
// Both backends call these inline functions: the CPU kernel (csrc/cpu/blend_cpu.cpp, a parallel loop
// over output voxels) and the CUDA kernel (csrc/cuda/blend_cuda.cu, one thread per output voxel).
// This header includes no torch header so that nvcc can compile the CUDA file on a machine whose
// torch has no CUDA headers.
//
// Semantics (DESIGN §2), for output voxel v and the patches i that cover it, in ascending patch order:
//   w_i(v)  = weights[i, cell(v - s_i)] * importance[v - s_i],   cell(k) = k * g / P  per axis
//   num(v)  = sum_i w_i(v) * p_i[:, v - s_i]
//   count:  out = num / max(1, #covering)     weight: out = num / sum_i w_i (0 if 0)     none: out = num
#pragma once

#include <cstdint>

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
  scalar_t* out;             // [C, O0, O1, O2] or nullptr (denominator only)
  acc_t* den_out;            // [O0, O1, O2] or nullptr
  int64_t n, c;
  int64_t P[3], G[3], O[3];
  int normalize;
  IndexView index;           // which patches cover which voxel
};

// Weight of patch n at its local voxel `local`: grid-cell weight times importance.
template <typename scalar_t, typename acc_t>
PB_HOST_DEVICE acc_t patch_voxel_weight(const BlendProblem<scalar_t, acc_t>& pr, int64_t n, const int64_t local[3]) {
  acc_t w = acc_t(1);
  if (pr.weights != nullptr) {
    const int64_t cell = (pr.index.cell[0][local[0]] * pr.G[1] + pr.index.cell[1][local[1]]) * pr.G[2] +
                         pr.index.cell[2][local[2]];
    w = pr.weights[n * pr.G[0] * pr.G[1] * pr.G[2] + cell];
  }
  if (pr.importance != nullptr) {
    w *= pr.importance[(local[0] * pr.P[1] + local[1]) * pr.P[2] + local[2]];
  }
  return w;
}

// Calls visit(n, local) for every patch n covering output voxel v, in a fixed order
// (lattice order on the lattice path, which is patch order for raster-ordered windows;
// ascending patch index on the tile path).
template <typename Visit>
PB_HOST_DEVICE void for_each_covering_patch(const IndexView& ix, const int64_t* coords, const int64_t P[3],
                                            const int64_t v[3], Visit&& visit) {
  int64_t local[3];
  if (ix.is_lattice) {
    for (int64_t i0 = ix.first[0][v[0]]; i0 < ix.last[0][v[0]]; ++i0) {
      local[0] = v[0] - ix.starts[0][i0];
      for (int64_t i1 = ix.first[1][v[1]]; i1 < ix.last[1][v[1]]; ++i1) {
        local[1] = v[1] - ix.starts[1][i1];
        const int64_t row = (i0 * ix.lattice[1] + i1) * ix.lattice[2];
        for (int64_t i2 = ix.first[2][v[2]]; i2 < ix.last[2][v[2]]; ++i2) {
          local[2] = v[2] - ix.starts[2][i2];
          visit(ix.patch_of[row + i2], local);
        }
      }
    }
  } else {
    const int64_t tile = ((v[0] / ix.tile[0]) * ix.tiles[1] + v[1] / ix.tile[1]) * ix.tiles[2] + v[2] / ix.tile[2];
    for (int64_t k = ix.tile_offsets[tile]; k < ix.tile_offsets[tile + 1]; ++k) {
      const int64_t n = ix.tile_patches[k];
      bool inside = true;
      for (int a = 0; a < 3; ++a) {
        local[a] = v[a] - coords[3 * n + a];
        inside = inside && local[a] >= 0 && local[a] < P[a];
      }
      if (inside) visit(n, local);
    }
  }
}

template <typename acc_t>
PB_HOST_DEVICE acc_t finalize_voxel(acc_t num, acc_t den, int normalize) {
  if (normalize == kCount) return num / (den > acc_t(1) ? den : acc_t(1));
  if (normalize == kWeight) return den > acc_t(0) ? num / den : acc_t(0);
  return num;
}

// Blend one output voxel v (all channels): reads each covering patch element once per channel,
// writes out[:, v] (and den_out[v] when asked). The denominator is the patch count ("count"),
// the weight sum ("weight") or 1 ("none").
template <typename scalar_t, typename acc_t>
PB_HOST_DEVICE void blend_voxel(const BlendProblem<scalar_t, acc_t>& pr, const int64_t v[3]) {
  const int64_t out_volume = pr.O[0] * pr.O[1] * pr.O[2];
  const int64_t vox = (v[0] * pr.O[1] + v[1]) * pr.O[2] + v[2];
  const int64_t patch_volume = pr.P[0] * pr.P[1] * pr.P[2];
  const int64_t* coords = pr.index.coords;

  acc_t den = acc_t(1);
  if (pr.normalize != kNone) {
    den = acc_t(0);
    for_each_covering_patch(pr.index, coords, pr.P, v, [&](int64_t n, const int64_t* local) {
      den += pr.normalize == kCount ? acc_t(1) : patch_voxel_weight(pr, n, local);
    });
  }
  if (pr.den_out != nullptr) pr.den_out[vox] = den;
  if (pr.out == nullptr) return;

  for (int64_t ch = 0; ch < pr.c; ++ch) {
    acc_t num = acc_t(0);
    for_each_covering_patch(pr.index, coords, pr.P, v, [&](int64_t n, const int64_t* local) {
      const int64_t at = (n * pr.c + ch) * patch_volume + (local[0] * pr.P[1] + local[1]) * pr.P[2] + local[2];
      num += patch_voxel_weight(pr, n, local) * static_cast<acc_t>(pr.patches[at]);
    });
    pr.out[ch * out_volume + vox] = static_cast<scalar_t>(finalize_voxel(num, den, pr.normalize));
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
