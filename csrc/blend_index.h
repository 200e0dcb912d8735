// Which patches cover which output voxel: the spatial index both blend kernels read.
//
// Two layouts, chosen on the host from the coords:
// - lattice (the fast path): the starts form a separable grid (sliding windows). Per axis, the
//   windows covering coordinate x are a contiguous range [first[x], last[x]) of the sorted starts;
//   patch_of maps a lattice position to its patch index. No per-voxel test is needed.
// - tiles (arbitrary coords): the output is cut into tiles of the patch size; each tile lists
//   (CSR, ascending patch index) the patches that touch it, and each voxel tests those few.
// Both live in one packed int64 buffer (uploaded once for CUDA), described by an IndexLayout.
#pragma once

#include <cstdint>

namespace patchblend {

// Offsets (in int64 elements) of each table in the packed buffer, plus the small scalars.
struct IndexLayout {
  bool is_lattice = false;
  int64_t lattice[3] = {0, 0, 0};  // number of distinct starts per axis (lattice path)
  int64_t tile[3] = {1, 1, 1};     // tile size per axis (tile path)
  int64_t tiles[3] = {1, 1, 1};    // number of tiles per axis (tile path)
  int64_t off_coords = 0;
  int64_t off_starts[3] = {0, 0, 0};
  int64_t off_first[3] = {0, 0, 0};
  int64_t off_last[3] = {0, 0, 0};
  int64_t off_patch_of = 0;
  int64_t off_tile_offsets = 0;
  int64_t off_tile_patches = 0;
  int64_t off_cell[3] = {0, 0, 0};
  int64_t off_cell_end = 0;     // [P2]: end of the grid-cell run that local coordinate l lies in
  int64_t off_segment_end = 0;  // [O2]: end of the CPU kernel's run along the last axis (a whole row on a lattice)
  int64_t off_coverage_end = 0;  // [O2]: end of the run along the last axis with one covering set (lattice)
  int64_t total = 0;  // buffer length
};

// Pointers into the packed buffer (host or device memory, as the buffer is).
struct IndexView {
  const int64_t* coords;  // [N, 3]
  bool is_lattice;
  int64_t lattice[3];
  const int64_t* starts[3];
  const int64_t* first[3];
  const int64_t* last[3];
  const int64_t* patch_of;
  int64_t tile[3];
  int64_t tiles[3];
  const int64_t* tile_offsets;
  const int64_t* tile_patches;
  const int64_t* cell[3];  // grid cell of each local coordinate, k * g / P
  const int64_t* cell_end;     // [P2]
  const int64_t* segment_end;  // [O2]
  const int64_t* coverage_end;  // [O2]
};

inline IndexView make_index_view(const int64_t* base, const IndexLayout& L) {
  IndexView v;
  v.coords = base + L.off_coords;
  v.is_lattice = L.is_lattice;
  for (int a = 0; a < 3; ++a) {
    v.lattice[a] = L.lattice[a];
    v.starts[a] = base + L.off_starts[a];
    v.first[a] = base + L.off_first[a];
    v.last[a] = base + L.off_last[a];
    v.tile[a] = L.tile[a];
    v.tiles[a] = L.tiles[a];
    v.cell[a] = base + L.off_cell[a];
  }
  v.patch_of = base + L.off_patch_of;
  v.tile_offsets = base + L.off_tile_offsets;
  v.tile_patches = base + L.off_tile_patches;
  v.cell_end = base + L.off_cell_end;
  v.segment_end = base + L.off_segment_end;
  v.coverage_end = base + L.off_coverage_end;
  return v;
}

}  // namespace patchblend
