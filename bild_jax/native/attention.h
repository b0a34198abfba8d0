// The attention of one query over its cache and block, shared by the native kernels that run it
// (`attention.cc`, `decoder_step.cc`): see `attention.cc` for the order of its sums and why.
#ifndef BILD_JAX_NATIVE_ATTENTION_H_
#define BILD_JAX_NATIVE_ATTENTION_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "transpose.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace bild::attention {

constexpr int64_t kLanes = 16;  // partial sums of a dot product over D, added in a fixed order
constexpr int64_t kKeys = 16;   // keys whose scores (and weights) are computed at once

struct Segment {
  const float* keys;
  const float* values;
  int64_t length;  // S_i
};

// Every score is the same sum whichever keys share its computation: lane l takes fma(q_d, k_d, lane) over
// d = l, l + 16, ... from 0, and the lanes are added in order from 0. With AVX-512 the 16 keys' lanes are
// transposed into vectors and added together (one horizontal sum per key cost more than the rest of a decode
// step's attention); elsewhere one key at a time.
#if defined(__AVX512F__)
// out[k] = q . keys[k] for k < 16; keys[k] [D] each.
inline void Dots(const float* q, const float* const keys[kKeys], int64_t dim, float out[kKeys]) {
  __m512 lanes[kKeys];
  for (int64_t k = 0; k < kKeys; ++k) lanes[k] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += kLanes) {
    const __mmask16 valid = dim - d >= kLanes ? __mmask16(0xffff) : __mmask16((1u << (dim - d)) - 1);
    const __m512 query = _mm512_maskz_loadu_ps(valid, q + d);
    for (int64_t k = 0; k < kKeys; ++k)
      lanes[k] = _mm512_mask3_fmadd_ps(query, _mm512_maskz_loadu_ps(valid, keys[k] + d), lanes[k], valid);
  }
  bild::Transpose16(lanes);
  __m512 total = _mm512_setzero_ps();
  for (int64_t l = 0; l < kLanes; ++l) total = _mm512_add_ps(total, lanes[l]);
  _mm512_storeu_ps(out, total);
}

// exp(x) for 16 values x <= 0 (a score minus the largest one; 0 below -87, where float32 underflows):
// Cephes' expf, exp(r) * 2^n for x = n ln 2 + r, |r| <= ln 2 / 2, a degree-7 polynomial, about 1 ulp.
inline __m512 Exp(__m512 x) {
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);  // a NaN stays one
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(~underflow, y, _mm512_castsi512_ps(scale));
}
#else
inline float Dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  float lanes[kLanes] = {};
  for (int64_t i = 0; i < d; ++i) lanes[i % kLanes] = std::fma(a[i], b[i], lanes[i % kLanes]);
  float sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}
#endif

// The rows of the keys and values one query sees, in segment order, their indices among the S' keys, and
// its scores and weights.
struct Visible {
  std::vector<const float*> keys, values;
  std::vector<int64_t> indices;
  std::vector<float> scores, weights;  // padded to whole blocks of 16
  int64_t count = 0;
  explicit Visible(int64_t total)
      : keys(total), values(total), indices(total), scores(total + kKeys), weights(total + kKeys) {}
};

// scores[n] = scale * q . keys[n] + bias[indices[n]] for the n < count visible keys; bias [S'] or null.
inline void Scores(const float* q, const float* bias, Visible& seen, int64_t dim, float scale) {
#if defined(__AVX512F__)
  for (int64_t n = 0; n < seen.count; n += kKeys) {
    const float* rows[kKeys];  // past the last key, the last key again (computed and not used)
    for (int64_t k = 0; k < kKeys; ++k) rows[k] = seen.keys[std::min(n + k, seen.count - 1)];
    Dots(q, rows, dim, &seen.scores[n]);
    _mm512_storeu_ps(&seen.scores[n], _mm512_mul_ps(_mm512_loadu_ps(&seen.scores[n]), _mm512_set1_ps(scale)));
  }
#else
  for (int64_t n = 0; n < seen.count; ++n) seen.scores[n] = Dot(q, seen.keys[n], dim) * scale;
#endif
  if (bias != nullptr)
    for (int64_t n = 0; n < seen.count; ++n) seen.scores[n] += bias[seen.indices[n]];
}

// weights[n] = exp(scores[n] - top) for the visible keys.
inline void Weights(Visible& seen, float top) {
#if defined(__AVX512F__)
  for (int64_t n = 0; n < seen.count; n += kKeys)
    _mm512_storeu_ps(&seen.weights[n], Exp(_mm512_sub_ps(_mm512_loadu_ps(&seen.scores[n]), _mm512_set1_ps(top))));
#else
  for (int64_t n = 0; n < seen.count; ++n) seen.weights[n] = std::exp(seen.scores[n] - top);
#endif
}

// result[D] = sum of weights[n] * values[n] over the visible keys in order, fused multiply-adds from 0. With
// AVX-512 the sums of 64 dimensions stay in registers over all keys (a store and load of them per key took
// most of a decode step's attention).
inline void WeightedSum(const Visible& seen, int64_t dim, float* result) {
#if defined(__AVX512F__)
  constexpr int64_t kVectors = 4;
  for (int64_t d0 = 0; d0 < dim; d0 += kVectors * kLanes) {
    __mmask16 valid[kVectors];
    __m512 sum[kVectors];
    for (int64_t c = 0; c < kVectors; ++c) {
      const int64_t left = std::clamp<int64_t>(dim - d0 - c * kLanes, 0, kLanes);
      valid[c] = __mmask16((1u << left) - 1);
      sum[c] = _mm512_setzero_ps();
    }
    for (int64_t n = 0; n < seen.count; ++n) {
      const __m512 weight = _mm512_set1_ps(seen.weights[n]);
      for (int64_t c = 0; c < kVectors; ++c)
        sum[c] = _mm512_fmadd_ps(weight, _mm512_maskz_loadu_ps(valid[c], seen.values[n] + d0 + c * kLanes), sum[c]);
    }
    for (int64_t c = 0; c < kVectors; ++c) _mm512_mask_storeu_ps(result + d0 + c * kLanes, valid[c], sum[c]);
  }
#else
  std::fill(result, result + dim, 0.0f);
  for (int64_t n = 0; n < seen.count; ++n)
    for (int64_t d = 0; d < dim; ++d) result[d] = std::fma(seen.weights[n], seen.values[n][d], result[d]);
#endif
}

// One attention: queries q [B, K, H, D], mask [B, K, S'], bias [B or 1, H, K, S'] or none, the (keys,
// values) segments [B, Hkv, S_i, D] with S' = sum S_i, out [B, K, H, D].
struct Problem {
  const float* q;
  const bool* mask;
  const float* bias;  // null for none
  int64_t bias_rows;  // 1 or B
  std::vector<Segment> segments;
  int64_t batch, width, heads, kv_heads, dim, total;  // total: S'
  float scale;
  float* out;

  // Units of work: the `groups` heads of one query of one (row, kv head).
  int64_t units() const { return batch * kv_heads * width; }
  // Multiply-adds of the whole attention.
  int64_t work() const { return units() * (heads / kv_heads) * total * dim * 2; }
};

// The outputs of unit u of `problem`, `seen` its scratch.
inline void Attend(const Problem& problem, int64_t u, Visible& seen) {
  const int64_t width = problem.width, kv_heads = problem.kv_heads, heads = problem.heads, dim = problem.dim;
  const int64_t total = problem.total, groups = heads / kv_heads;
  const int64_t b = u / (kv_heads * width), kvh = u / width % kv_heads, i = u % width;
  const bool* visible = problem.mask + (b * width + i) * total;
  seen.count = 0;
  int64_t offset = 0;  // index among the S' keys of the segment's first
  for (const Segment& part : problem.segments) {
    const int64_t start = (b * kv_heads + kvh) * part.length * dim;
    for (int64_t j = 0; j < part.length; ++j)
      if (visible[j]) {
        seen.keys[seen.count] = part.keys + start + j * dim;
        seen.values[seen.count] = part.values + start + j * dim;
        seen.indices[seen.count++] = offset + j;
      }
    visible += part.length;
    offset += part.length;
  }
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t h = kvh * groups + g;
    float* result = problem.out + ((b * width + i) * heads + h) * dim;
    if (seen.count == 0) {  // a query that sees no key (a padding row) gets zeros
      std::fill(result, result + dim, 0.0f);
      continue;
    }
    const float* bias_row = problem.bias == nullptr ? nullptr
        : problem.bias + (((problem.bias_rows == 1 ? 0 : b) * heads + h) * width + i) * total;  // [S']
    Scores(problem.q + ((b * width + i) * heads + h) * dim, bias_row, seen, dim, problem.scale);
    const float top = *std::max_element(seen.scores.begin(), seen.scores.begin() + seen.count);
    Weights(seen, top);
    WeightedSum(seen, dim, result);
    float denominator = 0.0f;
    for (int64_t n = 0; n < seen.count; ++n) denominator += seen.weights[n];
    const float inverse = 1.0f / denominator;
    for (int64_t d = 0; d < dim; ++d) result[d] *= inverse;
  }
}

}  // namespace bild::attention

#endif  // BILD_JAX_NATIVE_ATTENTION_H_
