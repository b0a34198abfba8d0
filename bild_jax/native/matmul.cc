// float32 products for the few rows of a decode step, streaming the weights once with every core.
//
// XLA:CPU runs a matrix-vector product on one core, which reads memory at about half the machine's
// bandwidth; a decode step is a chain of such products. Both kernels split the weight into chunks that the
// calling thread and XLA's intra-op threads take in turn, so a helper that wakes late costs nothing, and
// each output element is summed in one fixed order whatever the number of rows or threads: a row's result
// never depends on the rows computed with it (a verification block gives the one-token step's logits).
//
//   bild_matmul:            y[M, N] = x[M, K] @ w[K, N]   (Dense kernels)
//   bild_matmul_transposed: y[M, N] = x[M, K] @ w[N, K]^T (tied embedding tables used as the output layer)
// x and y are float32; w is float32 or bfloat16 (widened exactly to float32 as it is read: half the bytes
// of a float32 copy, and the same sums).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "threads.h"
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using bild::ChunkCount;
using bild::InChunks;

constexpr int64_t kRows = 8;    // rows of w per pass over the outputs when streaming, so y is read and written K/8 times
constexpr int64_t kLanes = 16;  // partial sums of a transposed dot product, added in a fixed order

inline float Widen(float w) { return w; }
inline float Widen(uint16_t w) {  // bfloat16 is the top half of a float32
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

template <typename W>
struct Product {
  const float* x;
  const W* w;
  float* y;
  int64_t m, k, n;
};

// Every output of out[M, N] = x[:, k0:k1] @ w[k0:k1, :] is the same sum, out = fma(x_k, w_k, out) for
// k = k0, k0 + 1, ..., k1 - 1 from 0, in the vector loop and the scalar one alike. Explicit AVX-512 or AVX2
// code (GCC's own vectorization of the scalar loop was slower, about 5% per step); the scalar loop computes
// the same fused multiply-adds on other CPUs and for the last columns. (Register tiles of 4 rows x
// 32 columns held over the whole chunk were tried for verification blocks: 1.3x slower at 11 rows.)
#if defined(__AVX512F__)
using Vector = __m512;  // 16 lanes
constexpr int64_t kVector = 16;
inline Vector Load(const float* w) { return _mm512_loadu_ps(w); }
inline Vector Load(const uint16_t* w) {  // bfloat16 widened
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline Vector Broadcast(float x) { return _mm512_set1_ps(x); }
inline Vector Fma(Vector a, Vector b, Vector c) { return _mm512_fmadd_ps(a, b, c); }
inline Vector LoadOutputs(const float* y) { return _mm512_loadu_ps(y); }
inline void Store(float* y, Vector v) { _mm512_storeu_ps(y, v); }
#elif defined(__AVX2__) && defined(__FMA__)
using Vector = __m256;  // 8 lanes
constexpr int64_t kVector = 8;
inline Vector Load(const float* w) { return _mm256_loadu_ps(w); }
inline Vector Load(const uint16_t* w) {  // bfloat16 widened
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline Vector Broadcast(float x) { return _mm256_set1_ps(x); }
inline Vector Fma(Vector a, Vector b, Vector c) { return _mm256_fmadd_ps(a, b, c); }
inline Vector LoadOutputs(const float* y) { return _mm256_loadu_ps(y); }
inline void Store(float* y, Vector v) { _mm256_storeu_ps(y, v); }
#else
constexpr int64_t kVector = 0;  // no vector code: the scalar loop does everything
#endif

// w's rows are streamed in order, 8 at a time, each row of x keeping its outputs in registers over those 8;
// the rows of x after the first find the 8 rows of w in cache.
template <typename W>
void StreamRows(const Product<W>& p, int64_t k0, int64_t k1, float* __restrict out) {
  std::memset(out, 0, p.m * p.n * sizeof(float));
  for (int64_t kk = k0; kk < k1; kk += kRows) {
    const int64_t rows = std::min(kRows, k1 - kk);
    const W* __restrict w = p.w + kk * p.n;
    for (int64_t r = 0; r < p.m; ++r) {
      const float* x = p.x + r * p.k + kk;
      float* __restrict y = out + r * p.n;
      int64_t j = 0;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
      if (rows == kRows) {
        for (; j + kVector <= p.n; j += kVector) {
          Vector sum = LoadOutputs(y + j);
#pragma GCC unroll 8
          for (int64_t i = 0; i < kRows; ++i) sum = Fma(Broadcast(x[i]), Load(w + i * p.n + j), sum);
          Store(y + j, sum);
        }
      }
#endif
      for (; j < p.n; ++j)
        for (int64_t i = 0; i < rows; ++i) y[j] = std::fma(x[i], Widen(w[i * p.n + j]), y[j]);
    }
  }
}

// y[:, n0:n1] = x @ w[n0:n1, :]^T: one dot product of length K per output, w's rows read in order.
template <typename W>
void TransposedProduct(const Product<W>& p, int64_t n0, int64_t n1) {
  for (int64_t col = n0; col < n1; ++col) {
    const W* __restrict w = p.w + col * p.k;
    for (int64_t r = 0; r < p.m; ++r) {
      const float* __restrict x = p.x + r * p.k;
      float lanes[kLanes] = {};
      int64_t d = 0;
      for (; d + kLanes <= p.k; d += kLanes)
        for (int64_t l = 0; l < kLanes; ++l) lanes[l] += x[d + l] * Widen(w[d + l]);
      for (int64_t l = 0; d < p.k; ++d, ++l) lanes[l] += x[d] * Widen(w[d]);
      float sum = 0.0f;
      for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
      p.y[r * p.n + col] = sum;
    }
  }
}

template <ffi::DataType T>
ffi::Error Shapes(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<T>& w, bool transposed,
                  Product<ffi::NativeType<T>>* p) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (wd.size() != 2 || xd.size() < 1 || xd.back() != (transposed ? wd[1] : wd[0]))
    return ffi::Error::InvalidArgument("bild_matmul: x [..., K] and w [K, N] (or [N, K] transposed) expected");
  int64_t m = 1;
  for (size_t i = 0; i + 1 < xd.size(); ++i) m *= xd[i];
  *p = {x.typed_data(), w.typed_data(), nullptr, m, xd.back(), transposed ? wd[0] : wd[1]};
  return ffi::Error::Success();
}

template <ffi::DataType T>
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w, ffi::ResultBuffer<ffi::F32> y) {
  Product<ffi::NativeType<T>> p;
  if (ffi::Error error = Shapes(x, w, false, &p); error.failure()) return error;
  p.y = y->typed_data();
  // Chunks of w's rows, each summed into its own partial (chunk 0 straight into y), then added in order.
  const int64_t chunks = ChunkCount(pool, p.k / (4 * kRows));
  const int64_t rows = ((p.k + chunks - 1) / chunks + kRows - 1) / kRows * kRows;
  const int64_t size = p.m * p.n;
  std::vector<float> partials((chunks - 1) * size);
  InChunks(pool, chunks, [&](int64_t c) {
    const int64_t k0 = std::min(p.k, c * rows);
    StreamRows(p, k0, std::min(p.k, k0 + rows), c == 0 ? p.y : partials.data() + (c - 1) * size);
  });
  for (int64_t c = 1; c < chunks; ++c) {
    const float* __restrict part = partials.data() + (c - 1) * size;
    for (int64_t j = 0; j < size; ++j) p.y[j] += part[j];
  }
  return ffi::Error::Success();
}

template <ffi::DataType T>
ffi::Error MatmulTransposed(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w,
                            ffi::ResultBuffer<ffi::F32> y) {
  Product<ffi::NativeType<T>> p;
  if (ffi::Error error = Shapes(x, w, true, &p); error.failure()) return error;
  p.y = y->typed_data();
  const int64_t chunks = ChunkCount(pool, p.n / 64);
  const int64_t cols = (p.n + chunks - 1) / chunks;
  InChunks(pool, chunks, [&](int64_t c) {
    const int64_t n0 = std::min(p.n, c * cols);
    TransposedProduct(p, n0, std::min(p.n, n0 + cols));
  });
  return ffi::Error::Success();
}

}  // namespace

#define BILD_BINDING(T)                                                                                  \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<T>>().Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(BildMatmul, Matmul<ffi::F32>, BILD_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(BildMatmulBf16, Matmul<ffi::BF16>, BILD_BINDING(ffi::BF16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(BildMatmulTransposed, MatmulTransposed<ffi::F32>, BILD_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(BildMatmulTransposedBf16, MatmulTransposed<ffi::BF16>, BILD_BINDING(ffi::BF16));
