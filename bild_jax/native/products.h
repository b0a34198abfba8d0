// Products of float32 rows with a Dense kernel (panel-major, `panels.h`) or a transposed table, shared by
// the native kernels that run them (`matmul.cc`, `decoder_step.cc`).
//
// Every output is summed in one fixed order whatever the number of rows: a row's result never depends on the
// rows computed with it (a verification block gives the one-token step's logits). A bfloat16 weight takes its
// rows rounded to bfloat16 (to nearest even, as `jnp.astype` rounds): the products of llama.cpp's and HF's
// bfloat16 models, every product of two bfloat16 values exact in float32 and summed in float32. Where the CPU
// has AVX512-BF16 one vdpbf16ps then does 32 multiply-adds, twice a float32 FMA's 16 (and reads no float32
// copy of the weights); elsewhere the rounded rows are widened back and multiplied as float32.
#ifndef BILD_JAX_NATIVE_PRODUCTS_H_
#define BILD_JAX_NATIVE_PRODUCTS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "panels.h"
#include "transpose.h"
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace bild::products {

constexpr int64_t kChunkUnit = 8;  // row chunks of w are multiples of this many rows (so of whole pairs)
constexpr int64_t kTransposedRows = 4, kTransposedColumns = 4;  // output tile of a transposed product
#if defined(__AVX512BF16__)
constexpr bool kDotBf16 = true;  // bfloat16 weights meet bfloat16 rows in vdpbf16ps
#else
constexpr bool kDotBf16 = false;
#endif

inline float Widen(float w) { return w; }
inline float Widen(uint16_t w) {  // bfloat16 is the top half of a float32
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
// float32 -> bfloat16, to nearest even (NaN stays a NaN).
inline uint16_t RoundToBf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
}

// The rows a product with weights of type W reads: x itself for float32 weights; for bfloat16 ones x rounded
// to bfloat16 (`RoundedRows`), kept so for vdpbf16ps, else widened back to float32.
template <typename W>
using RowsOf = std::conditional_t<std::is_same_v<W, uint16_t> && kDotBf16, uint16_t, float>;

template <typename W>
struct Product {
  const RowsOf<W>* x;
  const W* w;
  float* y;
  int64_t m, k, n;
  int64_t ldx;  // row stride of x: K, or K + K % 2 for rounded rows (a zero after an odd last value)
};

inline float RowValue(float x) { return x; }
inline float RowValue(uint16_t x) { return Widen(x); }

// x[M, K] rounded to bfloat16 for a bfloat16 weight, as RowsOf<uint16_t>, rows of K + K % 2 (zero padded).
template <typename R>
std::vector<R> RoundedRows(const float* x, int64_t m, int64_t k) {
  const int64_t ld = k + k % 2;
  std::vector<R> rows(m * ld, R{0});
  for (int64_t r = 0; r < m; ++r) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= k; i += 16) {  // RoundToBf16, 16 at a time
      const __m512i bits = _mm512_loadu_si512(x + r * k + i);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
      const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                    _mm512_set1_epi32(0x7f800000));
      rounded = _mm512_srli_epi32(_mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000))), 16);
      if constexpr (std::is_same_v<R, uint16_t>) _mm256_storeu_si256(reinterpret_cast<__m256i*>(&rows[r * ld + i]), _mm512_cvtepi32_epi16(rounded));
      else _mm512_storeu_si512(&rows[r * ld + i], _mm512_slli_epi32(rounded, 16));
    }
#endif
    for (; i < k; ++i) {
      const uint16_t rounded = RoundToBf16(x[r * k + i]);
      if constexpr (std::is_same_v<R, uint16_t>) rows[r * ld + i] = rounded;
      else rows[r * ld + i] = Widen(rounded);
    }
  }
  return rows;
}

// Every output of out[M, N] = x[:, k0:k1] @ w[k0:k1, :] is the same sum, out = fma(x_k, w_k, out) for
// k = k0, k0 + 1, ..., k1 - 1 from 0 (bfloat16 pairs with vdpbf16ps: one step per pair), in the vector loop
// and the scalar one alike. Explicit AVX-512 or AVX2 code (GCC's own vectorization of the scalar loop was
// slower, about 5% per step); the scalar loop computes the same fused multiply-adds on other CPUs and for the
// last columns.
#if defined(__AVX512F__)
using Vector = __m512;  // 16 lanes
using Integers = __m512i;
constexpr int64_t kVector = 16;
constexpr int64_t kTileRows = 6, kTileVectors = 4;  // 24 of the 32 vector registers hold outputs
constexpr int64_t kLanes = kVector;  // partial sums of a transposed dot product, added in a fixed order
inline Vector Load(const float* w) { return _mm512_loadu_ps(w); }
inline Vector Load(const uint16_t* w) {  // bfloat16 widened
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline Integers LoadPairs(const uint16_t* w) { return _mm512_loadu_si512(w); }  // kVector columns' pairs
inline Vector Even(Integers pairs) { return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)); }
inline Vector Odd(Integers pairs) { return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(-65536))); }
inline Vector Broadcast(float x) { return _mm512_set1_ps(x); }
inline Vector Fma(Vector a, Vector b, Vector c) { return _mm512_fmadd_ps(a, b, c); }
inline Vector Add(Vector a, Vector b) { return _mm512_add_ps(a, b); }
inline Vector LoadOutputs(const float* y) { return _mm512_loadu_ps(y); }
inline void Store(float* y, Vector v) { _mm512_storeu_ps(y, v); }
#elif defined(__AVX2__) && defined(__FMA__)
using Vector = __m256;  // 8 lanes
using Integers = __m256i;
constexpr int64_t kVector = 8;
constexpr int64_t kTileRows = 4, kTileVectors = 2;  // 8 of the 16 vector registers hold outputs
constexpr int64_t kLanes = kVector;  // partial sums of a transposed dot product, added in a fixed order
inline Vector Load(const float* w) { return _mm256_loadu_ps(w); }
inline Vector Load(const uint16_t* w) {  // bfloat16 widened
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline Integers LoadPairs(const uint16_t* w) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)); }
inline Vector Even(Integers pairs) { return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)); }
inline Vector Odd(Integers pairs) { return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(-65536))); }
inline Vector Broadcast(float x) { return _mm256_set1_ps(x); }
inline Vector Fma(Vector a, Vector b, Vector c) { return _mm256_fmadd_ps(a, b, c); }
inline Vector Add(Vector a, Vector b) { return _mm256_add_ps(a, b); }
inline Vector LoadOutputs(const float* y) { return _mm256_loadu_ps(y); }
inline void Store(float* y, Vector v) { _mm256_storeu_ps(y, v); }
#else
constexpr int64_t kVector = 0;  // no vector code: the scalar loop does everything
constexpr int64_t kTileRows = 6, kTileVectors = 1;
constexpr int64_t kLanes = 16;
#endif

// Every product's sums: w's rows are split into `count` chunks of `rows` (a multiple of kChunkUnit), set by
// K alone (not by the rows of x, nor the threads); each output is fma(x_k, w_k, sum) over k in order from 0
// within a chunk, and the chunks' sums are added in chunk order. So a row's result never depends on the rows
// computed with it. A chunk of a panel is at most kChunkRows rows (128 KB of bfloat16, 256 KB of float32:
// the row tiles after the first read it from L2); the bundled models' kernels are one chunk each. (A fixed
// 8 chunks, the earlier split, stored and reloaded every output 8 times and cost the 64-row tiles up to a
// third of their speed.)
struct RowChunks {
  int64_t count, rows;
};
constexpr int64_t kChunkRows = 1024;
// The size of each of `count` chunks covering `total`, rounded up to a multiple of `unit`.
inline int64_t ChunkSize(int64_t total, int64_t count, int64_t unit) {
  return ((total + count - 1) / count + unit - 1) / unit * unit;
}
inline RowChunks SplitRows(int64_t k) {
  const int64_t count = std::max<int64_t>(1, (k + kChunkRows - 1) / kChunkRows);
  return {count, ChunkSize(k, count, kChunkUnit)};
}

// Lines of the weight read next, prefetched into L2 a few per step of a row tile, so that the weight stream
// from memory runs on while the tiles compute (`ProductGroup::Run`).
struct Ahead {
  const char* start = nullptr;  // the next panel's first byte, null for none
  int64_t lines = 0;            // its 64-byte lines
  int64_t per_step = 0;         // lines prefetched per step (row of the panel) of each row tile
  int64_t from = 0;             // the first line this tile prefetches
  void Fetch(int64_t step) const {
    for (int64_t l = 0; l < per_step; ++l) {
      const int64_t line = from + step * per_step + l;
      if (line < lines) __builtin_prefetch(start + 64 * line, 0, 2);
    }
  }
};

// The rows of x in tiles of up to MR rows x V vectors of a panel's columns: a tile stays in registers over
// a whole row chunk of the panel, so that each vector of w read feeds MR multiply-adds, and each output is
// stored once per chunk, the chunk's sum added to it there. A panel's chunk is one contiguous block of
// memory: the hardware prefetcher streams it (the same weights as [K, N] rows, walked a window of columns at
// a time, read from memory at about half the speed: `experiments/weight_walk.cc`), and the row tiles after
// the first find it in L1. One row of x is the same code at MR = 1: its outputs stay in registers too, where
// streaming [K, N] rows loaded and stored them for every row of w (one core, bfloat16, in cache: 0.65-0.7x
// the time). A bfloat16 panel goes a pair of rows per step: one vdpbf16ps per vector (bundled large model's
// shapes, one core: 1.5x the widening tiles' speed for one row, 2x for 4 to 64), or each pair widened.
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
template <int64_t MR, int64_t V, typename W>
void TileChunk(const Product<W>& p, const W* __restrict panel, int64_t width, int64_t r0, int64_t k0,
               int64_t rows, int64_t j, bool first, const Ahead& ahead) {
  constexpr bool pairs = std::is_same_v<W, uint16_t>;
  const W* __restrict w = panel + bild::PanelIndex(k0, j, width, pairs);
  const RowsOf<W>* x = p.x + r0 * p.ldx + k0;
  float* __restrict y = p.y + r0 * p.n + j;
  Vector sum[MR][V];
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t v = 0; v < V; ++v) sum[r][v] = Broadcast(0.0f);
  if constexpr (!pairs) {
#pragma GCC unroll 4
    for (int64_t i = 0; i < rows; ++i) {
      if (ahead.start) ahead.Fetch(i);
      Vector wv[V];
      for (int64_t v = 0; v < V; ++v) wv[v] = Load(w + i * width + v * kVector);
      for (int64_t r = 0; r < MR; ++r) {
        const Vector xr = Broadcast(x[r * p.ldx + i]);
        for (int64_t v = 0; v < V; ++v) sum[r][v] = Fma(xr, wv[v], sum[r][v]);
      }
    }
  } else {
#pragma GCC unroll 2
    for (int64_t i = 0; i < rows; i += 2) {  // an odd last row pairs with the zero row after it
      if (ahead.start) ahead.Fetch(i), ahead.Fetch(i + 1);
      Integers wv[V];
      for (int64_t v = 0; v < V; ++v) wv[v] = LoadPairs(w + i * width + 2 * v * kVector);
      for (int64_t r = 0; r < MR; ++r) {
#if defined(__AVX512BF16__)
        int32_t pair;
        std::memcpy(&pair, x + r * p.ldx + i, sizeof pair);
        const __m512bh xr = (__m512bh)_mm512_set1_epi32(pair);
        for (int64_t v = 0; v < V; ++v) sum[r][v] = _mm512_dpbf16_ps(sum[r][v], xr, (__m512bh)wv[v]);
#else
        const Vector even = Broadcast(x[r * p.ldx + i]), odd = Broadcast(x[r * p.ldx + i + 1]);
        for (int64_t v = 0; v < V; ++v) sum[r][v] = Fma(odd, Odd(wv[v]), Fma(even, Even(wv[v]), sum[r][v]));
#endif
      }
    }
  }
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t v = 0; v < V; ++v) {
      float* out = y + r * p.n + v * kVector;
      Store(out, first ? sum[r][v] : Add(LoadOutputs(out), sum[r][v]));
    }
}

// Columns j .. j + V vectors of a panel (y's columns from `column` on), every row tile in turn.
template <int64_t V, typename W>
void TileRows(const Product<W>& p, const W* panel, int64_t width, int64_t column, int64_t k0, int64_t rows,
              int64_t j, bool first, Ahead ahead) {
  Product<W> at = p;
  at.y += column;
  for (int64_t r0 = 0; r0 < p.m; r0 += kTileRows, ahead.from += rows * ahead.per_step) {
    switch (std::min(kTileRows, p.m - r0)) {
      case 1: TileChunk<1, V>(at, panel, width, r0, k0, rows, j, first, ahead); break;
      case 2: TileChunk<2, V>(at, panel, width, r0, k0, rows, j, first, ahead); break;
      case 3: TileChunk<3, V>(at, panel, width, r0, k0, rows, j, first, ahead); break;
      case 4: TileChunk<4, V>(at, panel, width, r0, k0, rows, j, first, ahead); break;
      case 5: TileChunk<5, V>(at, panel, width, r0, k0, rows, j, first, ahead); break;
      default: TileChunk<kTileRows, V>(at, panel, width, r0, k0, rows, j, first, ahead); break;
    }
  }
}
#endif

// y[:, the panel's columns] for panel `panel` of w, summed as `SplitRows` says: chunk by chunk, each
// chunk's sum stored (the first) or added to y.
template <typename W>
void PanelProduct(const Product<W>& p, RowChunks split, int64_t panel, Ahead ahead = {}) {
  constexpr bool pairs = std::is_same_v<W, uint16_t>;
  const int64_t width = bild::PanelWidth(p.n, panel), column = panel * bild::kPanelColumns;
  const W* w = p.w + bild::PanelOffset(bild::PanelRows(p.k, sizeof(W)), panel);
  for (int64_t c = 0; c < split.count; ++c) {
    const int64_t k0 = std::min(p.k, c * split.rows), rows = std::min(p.k, k0 + split.rows) - k0;
    const bool first = c == 0;
    int64_t j = 0;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    Ahead chunk_ahead = ahead;  // the chunk's share of the next panel's lines: its steps' of all steps
    chunk_ahead.from += k0 * ((p.m + kTileRows - 1) / kTileRows) * ahead.per_step;
    for (; j + kTileVectors * kVector <= width; j += kTileVectors * kVector, chunk_ahead = {})
      TileRows<kTileVectors>(p, w, width, column, k0, rows, j, first, chunk_ahead);
    for (; j + kVector <= width; j += kVector) TileRows<1>(p, w, width, column, k0, rows, j, first, Ahead{});
#endif
    for (; j < width; ++j)
      for (int64_t r = 0; r < p.m; ++r) {
        float sum = 0.0f;
        for (int64_t i = k0; i < k0 + rows; ++i)
          sum = std::fma(RowValue(p.x[r * p.ldx + i]), Widen(w[bild::PanelIndex(i, j, width, pairs)]), sum);
        float* out = p.y + r * p.n + column + j;
        *out = first ? sum : *out + sum;
      }
  }
}

// y[r0:r0 + RR, c0:c0 + CR] of y = x @ w^T: each output a dot product of length K in kLanes partial sums
// (lane l takes d = l, l + kLanes, ...; multiply-adds fused; with vdpbf16ps the pairs d = 2l, 2l + 1,
// 2l + 2 kLanes, ...), added in lane order. A tile of RR rows x CR
// columns of outputs loads each vector of w once for RR rows and each vector of x once for CR columns, so
// that a verification block is not bound by loads; every tile shape gives an output the same sum.
template <int64_t RR, int64_t CR, typename W>
void TransposedTile(const Product<W>& p, int64_t r0, int64_t c0) {
  constexpr int64_t per_lane = std::is_same_v<RowsOf<W>, uint16_t> ? 2 : 1;  // values a lane takes per step
  float lanes[RR][CR][kLanes];
  int64_t d = 0;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  static_assert(kLanes == kVector, "one vector of partial sums per output");
  Vector sum[RR][CR];
  for (int64_t r = 0; r < RR; ++r)
    for (int64_t c = 0; c < CR; ++c) sum[r][c] = Broadcast(0.0f);
  // The next tile's rows of w, prefetched alongside into L2: short rows read CR at a time defeat the
  // hardware prefetcher (bundled large model's bfloat16 table, in L3: the output layer 2.3-2.5x faster), and
  // into L2 more of them are under way at once than into L1 (float32 table from memory: 0.6-0.7x the time
  // of prefetching into L1; in cache, 1.1x).
  const bool ahead = r0 == 0 && c0 + 2 * CR <= p.n;  // the first row tile brings them in for the others
  for (; d + per_lane * kLanes <= p.k; d += per_lane * kLanes) {
    if (ahead)
      for (int64_t c = 0; c < CR; ++c) __builtin_prefetch(p.w + (c0 + CR + c) * p.k + d, 0, 2);
#if defined(__AVX512BF16__)
    if constexpr (per_lane == 2) {
      __m512bh wv[CR];
      for (int64_t c = 0; c < CR; ++c) wv[c] = (__m512bh)LoadPairs(p.w + (c0 + c) * p.k + d);
      for (int64_t r = 0; r < RR; ++r) {
        const __m512bh xv = (__m512bh)LoadPairs(p.x + (r0 + r) * p.ldx + d);
        for (int64_t c = 0; c < CR; ++c) sum[r][c] = _mm512_dpbf16_ps(sum[r][c], xv, wv[c]);
      }
      continue;
    }
#endif
    if constexpr (per_lane == 1) {
      Vector wv[CR];
      for (int64_t c = 0; c < CR; ++c) wv[c] = Load(p.w + (c0 + c) * p.k + d);
      for (int64_t r = 0; r < RR; ++r) {
        const Vector xv = LoadOutputs(p.x + (r0 + r) * p.ldx + d);
        for (int64_t c = 0; c < CR; ++c) sum[r][c] = Fma(xv, wv[c], sum[r][c]);
      }
    }
  }
#if defined(__AVX512F__)
  // Two or more rows: the lanes of up to 16 outputs transposed into vectors and added in lane order, all
  // outputs at once (the same sums as one by one; the bundled table, 4-11 rows: 0.87-0.93x the time).
  if (RR * CR <= 16 && RR * CR >= 8 && d == p.k) {
    Vector outputs[16];
    for (int64_t o = 0; o < 16; ++o) outputs[o] = o < RR * CR ? sum[o / CR][o % CR] : Broadcast(0.0f);
    bild::Transpose16(outputs);
    Vector total = Broadcast(0.0f);
    for (int64_t l = 0; l < kLanes; ++l) total = _mm512_add_ps(total, outputs[l]);
    float totals[16];
    Store(totals, total);
    for (int64_t r = 0; r < RR; ++r)
      for (int64_t c = 0; c < CR; ++c) p.y[(r0 + r) * p.n + c0 + c] = totals[r * CR + c];
    return;
  }
#endif
  for (int64_t r = 0; r < RR; ++r)
    for (int64_t c = 0; c < CR; ++c) Store(lanes[r][c], sum[r][c]);
#else
  for (int64_t r = 0; r < RR; ++r)
    for (int64_t c = 0; c < CR; ++c) std::fill(lanes[r][c], lanes[r][c] + kLanes, 0.0f);
  for (; d + kLanes <= p.k; d += kLanes)
    for (int64_t r = 0; r < RR; ++r)
      for (int64_t c = 0; c < CR; ++c)
        for (int64_t l = 0; l < kLanes; ++l)
          lanes[r][c][l] = std::fma(p.x[(r0 + r) * p.ldx + d + l], Widen(p.w[(c0 + c) * p.k + d + l]), lanes[r][c][l]);
#endif
  for (int64_t r = 0; r < RR; ++r)
    for (int64_t c = 0; c < CR; ++c) {
      for (int64_t t = 0; d + t < p.k; ++t)
        lanes[r][c][t / per_lane] = std::fma(RowValue(p.x[(r0 + r) * p.ldx + d + t]), Widen(p.w[(c0 + c) * p.k + d + t]),
                                             lanes[r][c][t / per_lane]);
      float total = 0.0f;
      for (int64_t l = 0; l < kLanes; ++l) total += lanes[r][c][l];
      p.y[(r0 + r) * p.n + c0 + c] = total;
    }
}

// y[r0:r0 + rows, c0:c0 + CR] of y = x @ w^T, rows <= kTransposedRows.
template <int64_t CR, typename W>
void TransposedColumns(const Product<W>& p, int64_t r0, int64_t rows, int64_t c0) {
  switch (rows) {
    case 1: TransposedTile<1, CR>(p, r0, c0); break;
    case 2: TransposedTile<2, CR>(p, r0, c0); break;
    case 3: TransposedTile<3, CR>(p, r0, c0); break;
    default: TransposedTile<kTransposedRows, CR>(p, r0, c0); break;
  }
}

// y[:, n0:n1] = x @ w[n0:n1, :]^T in tiles of up to kTransposedRows rows x kTransposedColumns columns, every
// row tile of a column tile in turn, so that its rows of w are read from memory once (the row tiles
// outside, 11 rows read the table three times: 1.15-1.2x slower).
template <typename W>
void TransposedProduct(const Product<W>& p, int64_t n0, int64_t n1) {
  int64_t c0 = n0;
  for (; c0 + kTransposedColumns <= n1; c0 += kTransposedColumns)
    for (int64_t r0 = 0; r0 < p.m; r0 += kTransposedRows)
      TransposedColumns<kTransposedColumns>(p, r0, std::min(kTransposedRows, p.m - r0), c0);
  for (; c0 < n1; ++c0)
    for (int64_t r0 = 0; r0 < p.m; r0 += kTransposedRows)
      TransposedColumns<1>(p, r0, std::min(kTransposedRows, p.m - r0), c0);
}

// Points the products at the rows they read: x [M, K] itself for float32 weights, else x rounded (kept in
// `rows`).
template <typename W>
void ReadRows(const float* x, std::vector<RowsOf<W>>& rows, std::vector<Product<W>>& products) {
  Product<W>& first = products.front();
  if constexpr (std::is_same_v<W, uint16_t>) {
    rows = RoundedRows<RowsOf<W>>(x, first.m, first.k);
    for (Product<W>& q : products) q.x = rows.data(), q.ldx = first.k + first.k % 2;
  } else {
    for (Product<W>& q : products) q.x = x, q.ldx = first.k;
  }
}

// The products of one row block with every weight of a group as one list of tasks, one per panel: a decode
// step's query/key/value (or gate/up) projections are one pass of the threads over all of their panels, and a
// thread that finishes one weight's panels goes on with the next weight's. Each weight is summed as
// `SplitRows` says, as if it were alone, so a product's sums do not depend on the group it is computed in.
template <typename W>
struct ProductGroup {
  std::vector<Product<W>> products;
  std::vector<int64_t> first_task;  // [products + 1]: task of each product's first panel, then the total
  std::vector<RowChunks> splits;

  explicit ProductGroup(std::vector<Product<W>> group) : products(std::move(group)), first_task(1, 0) {
    for (const Product<W>& p : products) {
      first_task.push_back(first_task.back() + bild::PanelCount(p.n));
      splits.push_back(SplitRows(p.k));
    }
  }
  int64_t tasks() const { return first_task.back(); }
  // Whether threads should take `RunPart`s: products of several rows, whose tiles compute while the next
  // panel streams in. One row streams at memory speed as it is, and is balanced best panel by panel (`Run`).
  bool in_parts() const { return products.front().m >= 2; }
  // Runs task `task`; with `next` (the task this thread runs after it), prefetching that task's panel into L2
  // as it goes, so that the weight stream from memory runs on while the row tiles compute (the bundled large
  // model's 11-token verification block 0.84-0.86x the time, 4-8 tokens 0.89-0.93x, 2 tokens 0.96x; the two
  // alternating in one process). The sums are the same: a prefetch moves no value.
  void Run(int64_t task, int64_t next = -1) const {
    const size_t i = ProductOf(task);
    Ahead ahead;
    const Product<W>& p = products[i];
    if (next >= 0 && next < tasks()) {
      const size_t n = ProductOf(next);
      const Product<W>& q = products[n];
      const int64_t panel = next - first_task[n], rows = bild::PanelRows(q.k, sizeof(W));
      ahead.start = reinterpret_cast<const char*>(q.w + bild::PanelOffset(rows, panel));
      ahead.lines = (rows * bild::PanelWidth(q.n, panel) * static_cast<int64_t>(sizeof(W)) + 63) / 64;
      const int64_t steps = (p.m + kTileRows - 1) / kTileRows * p.k;
      ahead.per_step = (ahead.lines + steps - 1) / steps;
    }
    PanelProduct(p, splits[i], task - first_task[i], ahead);
  }
  // Part `part` of `parts`: a contiguous run of tasks, each prefetching the next.
  void RunPart(int64_t part, int64_t parts) const {
    const int64_t end = (part + 1) * tasks() / parts;
    for (int64_t task = part * tasks() / parts; task < end; ++task) Run(task, task + 1 < end ? task + 1 : -1);
  }
  size_t ProductOf(int64_t task) const {
    size_t i = 0;
    while (task >= first_task[i + 1]) ++i;
    return i;
  }
};

}  // namespace bild::products

#endif  // BILD_JAX_NATIVE_PRODUCTS_H_
