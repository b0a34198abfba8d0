// Work split between the calling thread and XLA's intra-op threads, shared by the native kernels.
#ifndef BILD_JAX_NATIVE_THREADS_H_
#define BILD_JAX_NATIVE_THREADS_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#if defined(__linux__)
#include <sched.h>
#endif

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

// The calling thread and up to `pool.num_threads() - 1` pool threads running one kernel's stages together:
// the helpers are scheduled once, at the start, and then take tasks of each stage as the caller opens it, so
// that a kernel of many short stages (a decoder step: a product, then attention, then the next product)
// wakes the pool once rather than once per stage. Threads take tasks from the front; with `by_core`, those
// on odd CPUs take them from the back, so that from call to call each core mostly gets the same tasks
// whichever thread runs there (for data that stays in the cores' L2 caches; see `InChunks`). As in
// `InChunks` the caller never waits for a helper that has not started: it only waits for tasks that a helper
// has taken, and with no helper awake it runs every task itself. Between stages the helpers spin; the
// destructor ends their work for this team.
//
// A helper then lingers for `kLingerMicros`, and a team started meanwhile takes it rather than scheduling a
// pool task: the BiLD loop calls its kernels every 15-40 us, and a pool thread that went to sleep in between
// took 20-50 us to wake on a 2-core VM (in a quarter of the small model's steps and nearly every one-token large
// pass after a small step, the calling thread ran alone for those microseconds). A helper lingers at most that
// long, so XLA's own use of the thread waits no longer than a sleeping thread takes to wake.
class Team {
 public:
  explicit Team(xla::ffi::ThreadPool& pool)
      : shared_(std::make_shared<Shared>()), size_(std::max<int64_t>(pool.num_threads(), 1)) {
    if (size_ < 2) return;
    Lounge& lounge = TheLounge();
    {
      std::lock_guard<std::mutex> lock(lounge.mutex);
      lounge.latest = shared_;
    }
    lounge.started.fetch_add(1, std::memory_order_acq_rel);
    // A lingering helper may leave just as this team counts it: the caller then does that helper's share.
    const int64_t lingering = std::min(lounge.lingering.load(std::memory_order_acquire), size_ - 1);
    for (int64_t i = 1 + lingering; i < size_; ++i) pool.Schedule([shared = shared_] {
      Help(*shared);
      Linger();
    });
  }
  ~Team() { shared_->claim.store(Pack(kStop, 0, 0), std::memory_order_release); }
  Team(const Team&) = delete;
  Team& operator=(const Team&) = delete;
  // Threads in the team, the caller included (some helpers may start late or not at all).
  int64_t size() const { return size_; }

  // Runs run(task) for task in [0, tasks) on this team, returning once all are done.
  template <typename Run>
  void Stage(int64_t tasks, Run run, bool by_core = false) {
    if (tasks <= 0) return;
    Shared& shared = *shared_;
    stage_ = stage_ % (kStop - 1) + 1;  // 1 .. kStop - 1; a helper tells stages apart by it
    Slot& slot = shared.slots[stage_ & 1];
    slot.invoke.store([](void* context, int64_t task) { (*static_cast<Run*>(context))(task); },
                      std::memory_order_relaxed);
    slot.context.store(&run, std::memory_order_relaxed);
    slot.by_core.store(by_core, std::memory_order_relaxed);
    shared.done.store(0, std::memory_order_relaxed);
    shared.claim.store(Pack(stage_, 0, tasks), std::memory_order_release);
    Take(shared, stage_, !by_core || FromFront(), [&](int64_t task) { run(task); });
    for (int64_t spins = 0; shared.done.load(std::memory_order_acquire) != tasks; ++spins) Idle(spins);
  }

 private:
  static constexpr uint64_t kStop = 0xffff;  // the stage value that sends the helpers home
  static constexpr int64_t kSpins = 1000;     // pauses (about 40 ns each) before a waiting thread yields
  static constexpr double kLingerMicros = 50.0;  // how long a helper waits for the next team
  struct Slot {  // a stage's work; two, so that a late helper never reads one being rewritten for its stage
    std::atomic<void (*)(void*, int64_t)> invoke{nullptr};
    std::atomic<void*> context{nullptr};
    std::atomic<bool> by_core{false};
  };
  struct Shared {
    std::atomic<uint64_t> claim{0};  // stage (16 bits), next task from the front (24), one past the last (24)
    std::atomic<int64_t> done{0};    // tasks of the current stage finished
    Slot slots[2];
  };
  static uint64_t Pack(uint64_t stage, uint64_t front, uint64_t back) { return stage << 48 | front << 24 | back; }
  static uint64_t StageOf(uint64_t claim) { return claim >> 48; }
  // Whether a thread taking a stage's tasks by core takes them from the front: on even CPUs. So from call
  // to call each core mostly gets the same tasks, whichever thread runs there.
  static bool FromFront() {
#if defined(__linux__)
    return sched_getcpu() % 2 == 0;
#else
    return true;
#endif
  }
  // One wait of a thread that has waited `spins` times: a pause instruction at first (the next stage is
  // usually a microsecond away), then the core given up at every turn, so that a busy machine (other
  // processes, a test runner's workers) runs its other threads rather than this one's spinning.
  static void Idle(int64_t spins) {
#if defined(__x86_64__) || defined(__i386__)
    if (spins < kSpins) {
      __builtin_ia32_pause();
      return;
    }
#endif
    std::this_thread::yield();
  }

  // Takes and runs tasks of `stage` until none is left (or the stage is over).
  template <typename Run>
  static void Take(Shared& shared, uint64_t stage, bool front, Run run) {
    uint64_t claim = shared.claim.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t next = claim >> 24 & 0xffffff, end = claim & 0xffffff;
      if (StageOf(claim) != stage || next >= end) return;
      const uint64_t taken = front ? Pack(stage, next + 1, end) : Pack(stage, next, end - 1);
      if (!shared.claim.compare_exchange_weak(claim, taken, std::memory_order_acq_rel,
                                              std::memory_order_acquire))
        continue;
      run(static_cast<int64_t>(front ? next : end - 1));
      shared.done.fetch_add(1, std::memory_order_acq_rel);
      claim = shared.claim.load(std::memory_order_acquire);
    }
  }

  // Where helpers between teams find the next one.
  struct Lounge {
    std::mutex mutex;
    std::shared_ptr<Shared> latest;    // the work of the team started last
    std::atomic<uint64_t> started{0};  // teams started so far
    std::atomic<int64_t> lingering{0};  // helpers waiting here now
  };
  static Lounge& TheLounge() {
    static Lounge* lounge = new Lounge();  // never destroyed: a helper may still linger as the process exits
    return *lounge;
  }

  // Waits up to kLingerMicros for a team to start, helps it, and waits again; returns once none started in time.
  static void Linger() {
    Lounge& lounge = TheLounge();
    uint64_t seen = lounge.started.load(std::memory_order_acquire);
    lounge.lingering.fetch_add(1, std::memory_order_acq_rel);
    for (auto since = std::chrono::steady_clock::now();;) {
      const uint64_t started = lounge.started.load(std::memory_order_acquire);
      if (started != seen) {
        seen = started;
        std::shared_ptr<Shared> next;
        {
          std::lock_guard<std::mutex> lock(lounge.mutex);
          next = lounge.latest;
        }
        lounge.lingering.fetch_sub(1, std::memory_order_acq_rel);
        Help(*next);  // returns at once if that team has already ended
        lounge.lingering.fetch_add(1, std::memory_order_acq_rel);
        since = std::chrono::steady_clock::now();
        continue;
      }
      if (std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - since).count() > kLingerMicros)
        break;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    lounge.lingering.fetch_sub(1, std::memory_order_acq_rel);
  }

  static void Help(Shared& shared) {
    uint64_t finished = 0;  // the last stage this helper found nothing left in
    for (int64_t spins = 0;; ++spins) {
      const uint64_t claim = shared.claim.load(std::memory_order_acquire);
      const uint64_t stage = StageOf(claim);
      if (stage == kStop) return;
      if (stage == 0 || stage == finished) {
        Idle(spins);
        continue;
      }
      spins = 0;
      // The slot was written before the claim that named its stage, so it holds that stage's work; if the
      // stage has moved on, Take finds a different stage in the claim and takes nothing.
      const Slot& slot = shared.slots[stage & 1];
      auto invoke = slot.invoke.load(std::memory_order_relaxed);
      void* context = slot.context.load(std::memory_order_relaxed);
      Take(shared, stage, !slot.by_core.load(std::memory_order_relaxed) || FromFront(),
           [&](int64_t task) { invoke(context, task); });
      finished = stage;
    }
  }

  std::shared_ptr<Shared> shared_;
  int64_t size_;
  uint64_t stage_ = 0;
};

}  // namespace bild

#endif  // BILD_JAX_NATIVE_THREADS_H_
