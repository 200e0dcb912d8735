// Host-side construction of the packed spatial index described in blend_index.h.
// Plain C++ (no torch, no CUDA): used by the CPU binding and by the CUDA binding before upload.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "blend_index.h"

namespace patchblend {

// Builds the index for N patches of size P at `coords` ([N, 3], host memory) into an output of size O,
// with grid G (for the cell tables). Returns the packed buffer; fills `layout`.
inline std::vector<int64_t> build_blend_index(const int64_t* coords, int64_t n, const int64_t P[3],
                                              const int64_t G[3], const int64_t O[3], IndexLayout& layout) {
  layout = IndexLayout();
  std::vector<int64_t> buf(coords, coords + 3 * n);
  layout.off_coords = 0;

  auto append = [&buf](const std::vector<int64_t>& part) {
    const int64_t at = static_cast<int64_t>(buf.size());
    buf.insert(buf.end(), part.begin(), part.end());
    return at;
  };

  for (int a = 0; a < 3; ++a) {
    std::vector<int64_t> cell(static_cast<size_t>(P[a]));
    for (int64_t k = 0; k < P[a]; ++k) cell[k] = k * G[a] / P[a];
    layout.off_cell[a] = append(cell);
    if (a == 2) {
      std::vector<int64_t> cell_end(static_cast<size_t>(P[2]));
      for (int64_t k = P[2] - 1; k >= 0; --k) cell_end[k] = (k + 1 < P[2] && cell[k + 1] == cell[k]) ? cell_end[k + 1] : k + 1;
      layout.off_cell_end = append(cell_end);
    }
  }

  // Lattice test: distinct starts per axis whose product is N, each position taken exactly once.
  std::vector<int64_t> starts[3];
  for (int a = 0; a < 3; ++a) {
    starts[a].reserve(n);
    for (int64_t i = 0; i < n; ++i) starts[a].push_back(coords[3 * i + a]);
    std::sort(starts[a].begin(), starts[a].end());
    starts[a].erase(std::unique(starts[a].begin(), starts[a].end()), starts[a].end());
  }
  const int64_t cells = static_cast<int64_t>(starts[0].size() * starts[1].size() * starts[2].size());
  bool lattice = n > 0 && cells == n;
  std::vector<int64_t> patch_of;
  if (lattice) {
    patch_of.assign(static_cast<size_t>(n), -1);
    for (int64_t i = 0; i < n && lattice; ++i) {
      int64_t pos[3];
      for (int a = 0; a < 3; ++a) {
        pos[a] = std::lower_bound(starts[a].begin(), starts[a].end(), coords[3 * i + a]) - starts[a].begin();
      }
      int64_t& slot = patch_of[(pos[0] * starts[1].size() + pos[1]) * starts[2].size() + pos[2]];
      if (slot >= 0) lattice = false;  // two patches at one position
      slot = i;
    }
  }

  if (lattice) {
    layout.is_lattice = true;
    for (int a = 0; a < 3; ++a) {
      layout.lattice[a] = static_cast<int64_t>(starts[a].size());
      layout.off_starts[a] = append(starts[a]);
      std::vector<int64_t> first(static_cast<size_t>(O[a])), last(static_cast<size_t>(O[a]));
      for (int64_t x = 0; x < O[a]; ++x) {
        // windows with x - P < s <= x cover x
        first[x] = std::upper_bound(starts[a].begin(), starts[a].end(), x - P[a]) - starts[a].begin();
        last[x] = std::upper_bound(starts[a].begin(), starts[a].end(), x) - starts[a].begin();
      }
      layout.off_first[a] = append(first);
      layout.off_last[a] = append(last);
    }
    layout.off_patch_of = append(patch_of);
  } else {
    // Tiles of the patch size, enlarged (doubling the axis with the most tiles) until there are at most
    // max(4096, 8 N) of them: the index then costs O(patches), not O(output) (a few small patches in a large
    // output would otherwise need one offset per output voxel). Enlarged tiles only arise when the patches
    // cover little of the output, so each tile still lists few patches (every voxel tests containment).
    const int64_t budget = std::max<int64_t>(4096, 8 * n);
    for (int a = 0; a < 3; ++a) {
      layout.tile[a] = std::max<int64_t>(P[a], 1);
      layout.tiles[a] = std::max<int64_t>((O[a] + layout.tile[a] - 1) / layout.tile[a], 1);
    }
    auto tile_count = [&layout]() {  // (in double: the int64 product of three large counts could overflow)
      return double(layout.tiles[0]) * double(layout.tiles[1]) * double(layout.tiles[2]);
    };
    while (tile_count() > double(budget)) {
      int a = 0;
      for (int b = 1; b < 3; ++b)
        if (layout.tiles[b] > layout.tiles[a]) a = b;
      layout.tile[a] *= 2;
      layout.tiles[a] = std::max<int64_t>((O[a] + layout.tile[a] - 1) / layout.tile[a], 1);
    }
    const int64_t total_tiles = layout.tiles[0] * layout.tiles[1] * layout.tiles[2];
    // Two passes (count, fill) over patches in ascending order keep each tile's list sorted.
    std::vector<int64_t> offsets(static_cast<size_t>(total_tiles + 1), 0);
    std::vector<int64_t> ids;
    for (int pass = 0; pass < 2; ++pass) {
      std::vector<int64_t> cursor;
      if (pass == 1) {
        for (int64_t t = 0; t < total_tiles; ++t) offsets[t + 1] += offsets[t];
        ids.assign(static_cast<size_t>(offsets[total_tiles]), 0);
        cursor.assign(offsets.begin(), offsets.end() - 1);
      }
      for (int64_t i = 0; i < n; ++i) {
        int64_t lo[3], hi[3];
        bool empty = false;
        for (int a = 0; a < 3; ++a) {
          const int64_t b = std::max<int64_t>(coords[3 * i + a], 0);
          const int64_t e = std::min<int64_t>(coords[3 * i + a] + P[a], O[a]);
          if (b >= e) empty = true;
          lo[a] = b / layout.tile[a];
          hi[a] = (e - 1) / layout.tile[a];
        }
        if (empty) continue;
        for (int64_t t0 = lo[0]; t0 <= hi[0]; ++t0)
          for (int64_t t1 = lo[1]; t1 <= hi[1]; ++t1)
            for (int64_t t2 = lo[2]; t2 <= hi[2]; ++t2) {
              const int64_t t = (t0 * layout.tiles[1] + t1) * layout.tiles[2] + t2;
              if (pass == 0) ++offsets[t + 1];
              else ids[cursor[t]++] = i;
            }
      }
    }
    layout.off_tile_offsets = append(offsets);
    layout.off_tile_patches = append(ids);
  }
  // The CPU kernel's runs along the last axis: whole rows (lattice) or the part inside one tile; and, on a
  // lattice, the coverage segments: runs with one covering set.
  std::vector<int64_t> segment_end(static_cast<size_t>(O[2])), coverage_end(static_cast<size_t>(O[2]));
  for (int64_t x = O[2] - 1; x >= 0; --x) {
    if (layout.is_lattice) {
      segment_end[x] = O[2];
      const int64_t* first = buf.data() + layout.off_first[2];
      const int64_t* last = buf.data() + layout.off_last[2];
      const bool same = x + 1 < O[2] && first[x + 1] == first[x] && last[x + 1] == last[x];
      coverage_end[x] = same ? coverage_end[x + 1] : x + 1;
    } else {
      segment_end[x] = std::min<int64_t>((x / layout.tile[2] + 1) * layout.tile[2], O[2]);
      coverage_end[x] = segment_end[x];
    }
  }
  layout.off_segment_end = append(segment_end);
  layout.off_coverage_end = append(coverage_end);
  layout.total = static_cast<int64_t>(buf.size());
  return buf;
}

}  // namespace patchblend
