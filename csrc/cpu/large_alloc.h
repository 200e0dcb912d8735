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

// Bytes from which empty_large maps its own huge-page-aligned memory.
constexpr int64_t kLargeAllocBytes = int64_t(32) << 20;

// Bytes from which empty_large takes its memory from glibc's malloc itself (below it: torch's empty).
//
// Torch's CPU allocator asks for 64-byte aligned blocks (posix_memalign). glibc (before 2.38) serves such a
// request of n bytes from a free chunk of at least n + 64 + 32 bytes and returns only the n-byte middle when it
// is freed: the slivers cut off on either side stay in its per-thread cache, so the freed chunk cannot merge
// with them and is too small for the next request of the same size. A loop that allocates and frees the same
// large buffers (the driver's window chunks and outputs, a blend's output) then takes a fresh chunk from the
// top of the heap every call: the heap grew by 1 MiB per driver call and by 29 MiB per 29 MiB blend in about
// half of the runs (the in-use bytes constant, malloc_trim gave it all back). A plain malloc of n + 72 bytes,
// aligned by hand, is freed whole, and the next request of the same size reuses it. From 64 KiB: below it the
// many small allocations in between take up such slivers, and handing memory to torch (from_blob) costs a
// little more than torch's empty on tiny tensors.
constexpr int64_t kOwnMallocBytes = int64_t(64) << 10;

// An uninitialised contiguous CPU tensor like torch.empty(sizes, dtype=dtype); large ones (see above) live in
// their own 2 MiB-aligned mapping advised MADV_HUGEPAGE (Linux; elsewhere, or if mapping fails, the next
// path), those from kOwnMallocBytes in a block of glibc's malloc, both handed to torch with a deleter
// (torch::stable::from_blob, stable ABI from torch 2.11); smaller ones come from torch's empty. Every size is
// checked first: a negative size or a byte count beyond int64 throws std::runtime_error naming `what`, the
// shape and the dtype (unchecked, a wrapped count reached from_blob, whose check then aborted the process), and
// so does an allocation that fails, with the bytes asked for. PATCHBLEND_POISON_EMPTY=1 (read once) fills every
// buffer with NaN bytes (0xFF) first, so that tests see a read of memory not yet written.
//
// Freed large blocks: even in huge pages, faulting in a fresh block still makes the kernel zero it (a
// 453 MiB output: about 50 ms of a 150 ms blend). So the most recently freed block is kept, ONE block at
// most, and handed to the next large request it fits (at least its size, at most twice it); any other
// request unmaps it; blocks over 1 GiB are never kept. Like torch's CUDA caching allocator, but holding one
// block; release_cached_output() (patchblend.empty_cache()) unmaps it now.
torch::stable::Tensor empty_large(torch::headeronly::IntHeaderOnlyArrayRef sizes, torch::headeronly::ScalarType dtype,
                                  const char* what = "a tensor");

// Unmaps the kept block, if any; returns its size in bytes (0 if none).
int64_t release_cached_output();

}  // namespace patchblend
