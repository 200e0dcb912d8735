#include "large_alloc.h"

#include <torch/csrc/stable/ops.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
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

// The bytes per element of dtype, 0 for a dtype not listed (which then always goes to torch's empty).
size_t element_size(torch::headeronly::ScalarType dtype) {
  using torch::headeronly::ScalarType;
  switch (dtype) {
    case ScalarType::ComplexDouble: return 16;
    case ScalarType::Double:
    case ScalarType::Long:
    case ScalarType::ComplexFloat: return 8;
    case ScalarType::Float:
    case ScalarType::Int: return 4;
    case ScalarType::Half:
    case ScalarType::BFloat16:
    case ScalarType::Short: return 2;
    case ScalarType::Byte:
    case ScalarType::Char:
    case ScalarType::Bool: return 1;
    default: return 0;
  }
}

// "<what> [a, b, c] of <dtype>", for error messages.
std::string describe(const char* what, torch::headeronly::IntHeaderOnlyArrayRef sizes,
                     torch::headeronly::ScalarType dtype) {
  std::ostringstream out;
  out << what << " [";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << "] of " << dtype;
  return out.str();
}

[[noreturn]] void cannot_allocate(const char* what, torch::headeronly::IntHeaderOnlyArrayRef sizes,
                                  torch::headeronly::ScalarType dtype, int64_t bytes, const char* cause) {
  std::ostringstream out;
  out << "patchblend: could not allocate " << bytes << " bytes (" << std::fixed << std::setprecision(1)
      << static_cast<double>(bytes) / double(int64_t(1) << 30) << " GiB) for " << describe(what, sizes, dtype)
      << ": " << cause;
  throw std::runtime_error(out.str());
}

// The byte count of a contiguous tensor of `sizes` and `dtype`; throws (std::runtime_error, a RuntimeError in
// Python) for a negative size or when the element or byte count overflows int64 (torch's own limit: a wrapped
// count would reach torch::stable::from_blob, whose storage check then aborts the process).
int64_t checked_bytes(const char* what, torch::headeronly::IntHeaderOnlyArrayRef sizes,
                      torch::headeronly::ScalarType dtype) {
  bool empty = false;
  for (const int64_t s : sizes) {
    if (s < 0) throw std::runtime_error("patchblend: " + describe(what, sizes, dtype) + ": sizes must be >= 0");
    empty = empty || s == 0;
  }
  if (empty) return 0;
  int64_t bytes = static_cast<int64_t>(std::max<size_t>(element_size(dtype), 1));  // (unlisted: elements)
  for (const int64_t s : sizes) {
    if (__builtin_mul_overflow(bytes, s, &bytes))
      throw std::runtime_error("patchblend: " + describe(what, sizes, dtype) +
                               " would need more than 2^63 - 1 bytes (its byte count overflows int64)");
  }
  return bytes;
}

// Own-memory blocks in glibc's malloc, 64-byte aligned like torch's (see large_alloc.h): malloc(n + 72), the
// pointer malloc returned stored just before the aligned data; the deleter frees it.
constexpr size_t kAlignment = 64;

void free_aligned(void* data) { std::free(static_cast<void**>(data)[-1]); }

void* malloc_aligned(size_t n) {
  void* raw = std::malloc(n + kAlignment + sizeof(void*));
  if (raw == nullptr) return nullptr;
  const uintptr_t data = (reinterpret_cast<uintptr_t>(raw) + sizeof(void*) + kAlignment - 1) / kAlignment * kAlignment;
  reinterpret_cast<void**>(data)[-1] = raw;
  return reinterpret_cast<void*>(data);
}

std::vector<int64_t> contiguous_strides(torch::headeronly::IntHeaderOnlyArrayRef sizes) {
  std::vector<int64_t> strides(sizes.size());
  int64_t stride = 1;
  for (size_t a = sizes.size(); a-- > 0;) {
    strides[a] = stride;
    stride *= sizes[a];  // (cannot overflow: checked_bytes bounded the product)
  }
  return strides;
}

// PATCHBLEND_POISON_EMPTY=1 (read once, at the first allocation): every buffer from empty_large is filled
// with all-ones bytes (NaN in every float dtype) before it is handed out, so that a read of memory not yet
// written shows up as NaN in the result. For tests; costs a write of every buffer.
bool poison_empty() {
  static const bool poison = [] {
    const char* flag = std::getenv("PATCHBLEND_POISON_EMPTY");
    return flag != nullptr && flag[0] != '\0' && std::strcmp(flag, "0") != 0;
  }();
  return poison;
}

torch::stable::Tensor poisoned(torch::stable::Tensor t, int64_t bytes) {
  if (poison_empty() && bytes > 0) std::memset(t.mutable_data_ptr(), 0xFF, static_cast<size_t>(bytes));
  return t;
}

}  // namespace

torch::stable::Tensor empty_large(torch::headeronly::IntHeaderOnlyArrayRef sizes, torch::headeronly::ScalarType dtype,
                                  const char* what) {
  const torch::stable::Device cpu(torch::headeronly::DeviceType::CPU);
  const int64_t bytes = checked_bytes(what, sizes, dtype);
  const bool own = element_size(dtype) > 0;
#if defined(__linux__)
  if (own && bytes >= kLargeAllocBytes) {
    const Mapping block = take_block(static_cast<size_t>(bytes));
    if (block.base != nullptr) {
      return poisoned(torch::stable::from_blob(block.base, sizes, contiguous_strides(sizes), cpu, dtype,
                                               [block](void*) { release(block); }),
                      bytes);
    }
  }
#endif
  if (own && bytes >= kOwnMallocBytes) {
    void* data = malloc_aligned(static_cast<size_t>(bytes));
    if (data == nullptr) cannot_allocate(what, sizes, dtype, bytes, "out of memory");
    return poisoned(torch::stable::from_blob(data, sizes, contiguous_strides(sizes), cpu, dtype, &free_aligned), bytes);
  }
  try {
    return poisoned(torch::stable::empty(sizes, dtype, std::nullopt, cpu), bytes);
  } catch (const std::exception& exc) {
    cannot_allocate(what, sizes, dtype, bytes, exc.what());
  }
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
