// Work split between the calling thread and XLA's intra-op threads, shared by the native kernels.
#ifndef BILD_JAX_NATIVE_THREADS_H_
#define BILD_JAX_NATIVE_THREADS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace bild {

// Runs run(chunk) for chunk in [0, chunks) on the calling thread and up to threads - 1 pool threads, and
// returns once every chunk is done. A helper that wakes after the chunks are all taken only touches the
// shared queue, so the caller never waits for a helper the OS has not scheduled yet (a busy machine).
// The threads take chunks in order from the front, so that together they read consecutive memory; with
// `both_ends` the helpers take them from the back instead, so that from call to call each thread mostly gets
// the same chunks: for data that stays in the cores' L2 caches between calls, each finds its own there.
template <typename Run>
void InChunks(xla::ffi::ThreadPool& pool, int64_t chunks, Run run, bool both_ends = false) {
  struct Queue {
    std::atomic<uint64_t> ends;  // low 32 bits: the next chunk from the front; high 32: one past the last left
    std::atomic<int64_t> done{0};
    Run* run;
  };
  auto queue = std::make_shared<Queue>();
  queue->ends.store(static_cast<uint64_t>(chunks) << 32, std::memory_order_relaxed);
  queue->run = &run;  // valid until done == chunks: no chunk is taken after that
  auto work = [](Queue& q, bool front) {
    for (;;) {
      uint64_t ends = q.ends.load(std::memory_order_relaxed);
      int64_t chunk;
      do {
        const uint64_t next = ends & 0xffffffffu, end = ends >> 32;
        if (next >= end) return;
        chunk = static_cast<int64_t>(front ? next : end - 1);
      } while (!q.ends.compare_exchange_weak(ends, front ? ends + 1 : ends - (uint64_t{1} << 32),
                                             std::memory_order_relaxed));
      (*q.run)(chunk);
      q.done.fetch_add(1, std::memory_order_acq_rel);
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([queue, work, both_ends] { work(*queue, !both_ends); });
  work(*queue, true);
  while (queue->done.load(std::memory_order_acquire) != chunks) std::this_thread::yield();
}

inline int64_t ChunkCount(xla::ffi::ThreadPool& pool, int64_t units) {
  return std::max<int64_t>(1, std::min<int64_t>(4 * std::max<int64_t>(pool.num_threads(), 1), units));
}

}  // namespace bild

#endif  // BILD_JAX_NATIVE_THREADS_H_
