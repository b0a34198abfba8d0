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
template <typename Run>
void InChunks(xla::ffi::ThreadPool& pool, int64_t chunks, Run run) {
  struct Queue {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t chunks;
    Run* run;
  };
  auto queue = std::make_shared<Queue>();
  queue->chunks = chunks;
  queue->run = &run;  // valid until done == chunks: no chunk is taken after that
  auto work = [](Queue& q) {
    for (int64_t c; (c = q.next.fetch_add(1, std::memory_order_relaxed)) < q.chunks;) {
      (*q.run)(c);
      q.done.fetch_add(1, std::memory_order_acq_rel);
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([queue, work] { work(*queue); });
  work(*queue);
  while (queue->done.load(std::memory_order_acquire) != chunks) std::this_thread::yield();
}

inline int64_t ChunkCount(xla::ffi::ThreadPool& pool, int64_t units) {
  return std::max<int64_t>(1, std::min<int64_t>(4 * std::max<int64_t>(pool.num_threads(), 1), units));
}

}  // namespace bild

#endif  // BILD_JAX_NATIVE_THREADS_H_
