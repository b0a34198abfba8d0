// How fast this machine reads a weight from memory in the order a tiled product walks it, against in order.
//
//   g++ -O3 -march=native -std=c++17 experiments/weight_walk.cc -o /tmp/weight_walk -lpthread && /tmp/weight_walk
//
// 16 weights of 384 x 2048 float32 (48 MB, past the L3 cache), read by 2 threads: "in order" splits each
// weight's bytes in two halves read front to back; "tiled walk" gives each thread column windows of 256
// columns and walks a window as `TileWindow` in native/matmul.cc does (chunks of 48 rows, tiles of 64
// columns down the chunk), with or without prefetching the next chunk's same columns into L2. Best of 20.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

constexpr long kRows = 384, kColumns = 2048, kWeights = 16, kWindow = 256, kChunk = 48, kTile = 64;
constexpr int kThreads = 2;

float InOrder(const float* w, int thread) {
  const long half = kRows * kColumns / kThreads;
  __m512 sum = _mm512_setzero_ps();
  for (long i = thread * half; i < (thread + 1) * half; i += 16) sum = _mm512_add_ps(sum, _mm512_loadu_ps(w + i));
  return _mm512_reduce_add_ps(sum);
}

float TiledWalk(const float* w, int thread, bool prefetch) {
  __m512 sum = _mm512_setzero_ps();
  for (long n0 = thread * kWindow; n0 < kColumns; n0 += kThreads * kWindow)
    for (long k0 = 0; k0 < kRows; k0 += kChunk)
      for (long j = n0; j < n0 + kWindow; j += kTile)
        for (long k = k0; k < k0 + kChunk; ++k) {
          const float* row = w + k * kColumns + j;
          if (prefetch && k + kChunk < kRows)
            for (int v = 0; v < kTile; v += 16) __builtin_prefetch(row + kChunk * kColumns + v, 0, 2);
          for (int v = 0; v < kTile; v += 16) sum = _mm512_add_ps(sum, _mm512_loadu_ps(row + v));
        }
  return _mm512_reduce_add_ps(sum);
}

int main() {
  std::vector<std::vector<float>> weights(kWeights, std::vector<float>(kRows * kColumns, 1.0f));
  const char* names[] = {"in order", "tiled walk", "tiled walk + L2 prefetch"};
  for (int mode = 0; mode < 3; ++mode) {
    double best = 1e9;
    float sink = 0;
    for (int repeat = 0; repeat < 20; ++repeat) {
      const auto start = std::chrono::steady_clock::now();
      std::vector<std::thread> threads;
      std::vector<float> sums(kThreads);
      for (int t = 0; t < kThreads; ++t)
        threads.emplace_back([&, t] {
          for (const auto& w : weights) sums[t] += mode == 0 ? InOrder(w.data(), t) : TiledWalk(w.data(), t, mode == 2);
        });
      for (auto& thread : threads) thread.join();
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      sink += sums[0] + sums[1];
    }
    std::printf("%-26s %5.1f GB/s  (%.0f us per weight)\n", names[mode], kWeights * kRows * kColumns * 4.0 / best / 1e9,
                best / kWeights * 1e6 + 0 * sink);
  }
}
