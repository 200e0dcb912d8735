// Large CPU outputs in transparent huge pages.
//
// A fresh CPU tensor is mapped lazily: its first write faults in one 4 KiB page at a time. On this
// project's machines that first touch costs about 4x a plain write of the buffer (a 450 MiB output:
// 131 ms to fault in, 31 ms to fill once mapped), which dominates a blend that runs near memory
// bandwidth. Asking for transparent huge pages (2 MiB) on the mapping cuts the faults 512-fold
// (the same buffer: 52 ms). Only from 32 MiB: below that glibc's malloc recycles freed blocks, which
// costs no fault at all (32 MiB is its largest dynamic mmap threshold; above it every block is a fresh
// mapping anyway). Measured on the CPU machine, allocate + fill, median: 8 MiB 0.3 ms (malloc) vs 6.1 ms
// (huge pages); 33 MiB 9.0 vs 3.5 ms; 64 MiB 17.1 vs 7.1 ms.
#pragma once

#include <cstdint>

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/HeaderOnlyArrayRef.h>

namespace patchblend {

// Bytes from which empty_large maps its own huge-page-aligned memory (below it: torch's empty).
constexpr int64_t kLargeAllocBytes = int64_t(32) << 20;

// An uninitialised contiguous CPU tensor like torch.empty(sizes, dtype=dtype); large ones (see above) live in
// their own 2 MiB-aligned mapping advised MADV_HUGEPAGE (Linux; elsewhere, or if mapping fails, torch's
// empty), handed to torch with a deleter (torch::stable::from_blob, stable ABI from torch 2.11).
//
// Freed large blocks: even in huge pages, faulting in a fresh block still makes the kernel zero it (a
// 453 MiB output: about 50 ms of a 150 ms blend). So the most recently freed block is kept, ONE block at
// most, and handed to the next large request it fits (at least its size, at most twice it); any other
// request unmaps it; blocks over 1 GiB are never kept. Like torch's CUDA caching allocator, but holding one
// block; release_cached_output() (patchblend.empty_cache()) unmaps it now.
torch::stable::Tensor empty_large(torch::headeronly::IntHeaderOnlyArrayRef sizes, torch::headeronly::ScalarType dtype);

// Unmaps the kept block, if any; returns its size in bytes (0 if none).
int64_t release_cached_output();

}  // namespace patchblend
