// Work sharing for the CPU kernels, free of torch (the kernel files are compiled once per instruction set and
// must not see torch's inline functions; see blend_cpu_kernels.h).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace patchblend {

// Runs worker(ctx) on `workers` threads of torch's pool at once (each call takes work from a shared queue);
// implemented by the binding (blend_cpu.cpp) with torch's parallel_for.
struct CpuParallel {
  int64_t threads;  // the pool's size
  void (*run)(int64_t workers, void* ctx, void (*worker)(void* ctx));
};

// [0, total) handed out in chunks of `grain` on demand (an atomic counter) rather than as one fixed share per
// thread, so that a thread the shared machine stalls does not hold the others up.
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

// per_thread(queue) runs once on each of up to `parallel.threads` threads: it sets up its scratch, then takes
// chunks of [0, total) until none is left.
template <typename PerThread>
void parallel_chunks(const CpuParallel& parallel, int64_t total, int64_t grain, const PerThread& per_thread) {
  ChunkQueue queue(total, grain);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(parallel.threads, queue.chunks()));
  struct Context {
    const PerThread* per_thread;
    ChunkQueue* queue;
  } ctx{&per_thread, &queue};
  parallel.run(workers, &ctx, [](void* c) {
    auto* context = static_cast<Context*>(c);
    (*context->per_thread)(*context->queue);
  });
}

}  // namespace patchblend
