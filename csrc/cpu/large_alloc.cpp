#include "large_alloc.h"

#include <torch/csrc/stable/ops.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

namespace patchblend {

namespace {

#if defined(__linux__)
constexpr size_t kHugePage = size_t(2) << 20;

struct Mapping {
  void* base;
  size_t length;
};

// The most recently freed mapping, kept for the next large output (see large_alloc.h): one block at most.
std::mutex cache_mutex;
Mapping cached{nullptr, 0};

void unmap_now(Mapping m) {
  if (m.base != nullptr) munmap(m.base, m.length);
}

// Blocks larger than this are unmapped when freed, never kept: holding on to several GiB after a huge
// output is gone would surprise more than the zeroing it saves.
constexpr size_t kMaxKeptBytes = size_t(1) << 30;

// The tensor's deleter: keeps the block for the next large output, or unmaps it.
void release(Mapping m) {
  Mapping drop = m;
  if (m.length <= kMaxKeptBytes) {
    std::lock_guard<std::mutex> lock(cache_mutex);
    drop = cached;
    cached = m;
  }
  unmap_now(drop);
}

// A fresh 2 MiB-aligned mapping of `length` bytes advised MADV_HUGEPAGE, or nullptr.
void* map_huge(size_t length) {
  void* raw = mmap(nullptr, length + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  // Keep the aligned [base, base + length) and return the rest.
  const uintptr_t at = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t base = (at + kHugePage - 1) / kHugePage * kHugePage;
  if (base > at) munmap(raw, base - at);
  const uintptr_t tail = base + length, end = at + length + kHugePage;
  if (end > tail) munmap(reinterpret_cast<void*>(tail), end - tail);
  void* data = reinterpret_cast<void*>(base);
  madvise(data, length, MADV_HUGEPAGE);  // advice only: a refusal leaves ordinary pages
  return data;
}

// Whole huge pages, 2 MiB-aligned, for n bytes: the cached block when it fits (at most twice the size asked
// for), else a fresh mapping; {nullptr, 0} if mapping fails.
Mapping take_block(size_t n) {
  const size_t length = (n + kHugePage - 1) / kHugePage * kHugePage;
  Mapping reuse{nullptr, 0}, drop{nullptr, 0};
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    if (cached.base != nullptr && cached.length >= length && cached.length <= 2 * length) reuse = cached;
    else drop = cached;  // a new block is coming: do not hold on to one that does not fit
    cached = Mapping{nullptr, 0};
  }
  unmap_now(drop);
  if (reuse.base == nullptr) {
    void* data = map_huge(length);
    if (data != nullptr) reuse = Mapping{data, length};
  }
  return reuse;
}
#endif

size_t element_size(torch::headeronly::ScalarType dtype) {
  using torch::headeronly::ScalarType;
  switch (dtype) {
    case ScalarType::Double:
    case ScalarType::Long: return 8;
    case ScalarType::Float:
    case ScalarType::Int: return 4;
    case ScalarType::Half:
    case ScalarType::BFloat16:
    case ScalarType::Short: return 2;
    default: return 1;  // (only the sizes above reach kLargeAllocBytes in patchblend; others go to torch)
  }
}

}  // namespace

torch::stable::Tensor empty_large(torch::headeronly::IntHeaderOnlyArrayRef sizes, torch::headeronly::ScalarType dtype) {
  const torch::stable::Device cpu(torch::headeronly::DeviceType::CPU);
#if defined(__linux__)
  int64_t numel = 1;
  bool valid = true;
  for (const int64_t s : sizes) {
    valid = valid && s >= 0;
    numel *= s;
  }
  const int64_t bytes = numel * static_cast<int64_t>(element_size(dtype));
  if (valid && bytes >= kLargeAllocBytes) {
    const Mapping block = take_block(static_cast<size_t>(bytes));
    if (block.base != nullptr) {
      std::vector<int64_t> strides(sizes.size());
      int64_t stride = 1;
      for (size_t a = sizes.size(); a-- > 0;) {
        strides[a] = stride;
        stride *= sizes[a];
      }
      return torch::stable::from_blob(block.base, sizes, strides, cpu, dtype, [block](void*) { release(block); });
    }
  }
#endif
  return torch::stable::empty(sizes, dtype, std::nullopt, cpu);
}

int64_t release_cached_output() {
#if defined(__linux__)
  Mapping m{nullptr, 0};
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    m = cached;
    cached = Mapping{nullptr, 0};
  }
  unmap_now(m);
  return static_cast<int64_t>(m.length);
#else
  return 0;
#endif
}

}  // namespace patchblend
