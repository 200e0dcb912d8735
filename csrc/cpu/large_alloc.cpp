#include "large_alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>
#include <cstring>
#include <mutex>

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

void release(void* ctx) {
  auto* m = static_cast<Mapping*>(ctx);
  Mapping drop = *m;
  if (m->length <= kMaxKeptBytes) {
    std::lock_guard<std::mutex> lock(cache_mutex);
    drop = cached;
    cached = *m;
  }
  unmap_now(drop);
  delete m;
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

// Whole huge pages, 2 MiB-aligned: the cached block when it fits (at most twice the size asked for), else a
// fresh mapping; small requests and failures go to the default CPU allocator.
struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n < static_cast<size_t>(kLargeAllocBytes)) return c10::GetDefaultCPUAllocator()->allocate(n);
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
      if (data == nullptr) return c10::GetDefaultCPUAllocator()->allocate(n);
      reuse = Mapping{data, length};
    }
    return {reuse.base, new Mapping(reuse), &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

HugePageAllocator huge_page_allocator;
#endif

}  // namespace

at::Tensor empty_large(c10::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType()));
  if (options.device().is_cpu() && bytes >= kLargeAllocBytes)
    return at::detail::empty_generic(sizes, &huge_page_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     options.dtype().toScalarType(), c10::nullopt);
#endif
  return at::empty(sizes, options);
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
