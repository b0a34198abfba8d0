// Attention of a decode step, verification block or short prompt pass over its cache, in float32.
//
// XLA:CPU runs the two small batched products of a decode step's attention (scores, then the weighted sum of
// values) as separate library calls whose fixed cost is most of their time: together about a sixth of a
// step of the bundled large model. This kernel does the whole attention of one query in one pass.
//
//   bild_attention: out[B, K, H, D] = softmax(scale * q . keys + bias, masked) . values
//     q [B, K, H, D]; mask [B, K, S'] bool; bias [B or 1, H, K, S'] float32, or no elements for none (T5's
//     relative position bias); then one or more (keys, values) segments, each [B, Hkv, S_i, D] head-major,
//     attended as one sequence of S' = sum S_i keys (a cache, then the block's own keys).
//
// A query's keys are visited in segment order, masked ones skipped, and every sum runs over them in that
// order. For a decode mask (a row's valid cache slots, then the block's tokens up to the query) that order
// is the keys' positions, so a token gets bitwise the same output whether its predecessors sit in the cache
// (one-token steps) or in the same block (a verification pass), as exact mode needs; a bias adds to a score
// after its dot product, so it keeps that property wherever it depends only on the query's and key's
// positions (T5's relative bias; in XLA it cost T5's layers as much as the rest of their attention). A query
// first lists the
// rows of the keys it sees (the mask scanned once for all heads of a key/value head); with AVX-512 their
// scores are computed 16 at a time, their weights exponentiated 16 at a time, and the weighted sum of values
// kept in registers (against one key at a time: the bundled large model's attention 0.48x the time for a
// decode step, 0.46x for a 64-token prompt pass, in-process A/B).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "threads.h"
#include "transpose.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;  // partial sums of a dot product over D, added in a fixed order
constexpr int64_t kKeys = 16;   // keys whose scores (and weights) are computed at once
// Multiply-adds per thread below which waking XLA's threads costs more than it saves. Measured on 2 cores
// (the kernel alone, one thread against all): 0.80x the time for an 11-token block of the bundled T5 large
// model's self- and cross-attention (338k-360k), 0.84x for T5 small's (127k), 1.01x at 109k, 1.1-1.4x below
// 66k; the previous bound (2^19 in all) kept the T5 blocks on one core: their large model's 11-token block
// took 1.15x the time (`bild-jax bench`'s block over a 64-token input).
constexpr int64_t kWorkPerThread = 50'000;

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
void Dots(const float* q, const float* const keys[kKeys], int64_t dim, float out[kKeys]) {
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
__m512 Exp(__m512 x) {
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
float Dot(const float* __restrict a, const float* __restrict b, int64_t d) {
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
void Scores(const float* q, const float* bias, Visible& seen, int64_t dim, float scale) {
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
void Weights(Visible& seen, float top) {
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
void WeightedSum(const Visible& seen, int64_t dim, float* result) {
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

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::PRED> mask,
                     ffi::Buffer<ffi::F32> bias, ffi::RemainingArgs segment_args, ffi::ResultBuffer<ffi::F32> out,
                     float scale) {
  auto qd = q.dimensions();
  auto md = mask.dimensions();
  if (qd.size() != 4 || md.size() != 3 || md[0] != qd[0] || md[1] != qd[1] || segment_args.size() < 2 ||
      segment_args.size() % 2 != 0)
    return ffi::Error::InvalidArgument("bild_attention: q [B, K, H, D], mask [B, K, S'], then (keys, values) pairs");
  const int64_t batch = qd[0], width = qd[1], heads = qd[2], dim = qd[3];
  std::vector<Segment> segments;
  int64_t kv_heads = 0, total = 0;
  for (size_t i = 0; i < segment_args.size(); i += 2) {
    auto keys = segment_args.get<ffi::Buffer<ffi::F32>>(i);
    auto values = segment_args.get<ffi::Buffer<ffi::F32>>(i + 1);
    if (!keys.has_value() || !values.has_value())
      return ffi::Error::InvalidArgument("bild_attention: keys and values must be float32");
    auto kd = keys->dimensions();
    auto vd = values->dimensions();
    if (kd.size() != 4 || vd.size() != 4 || kd[0] != batch || kd[3] != dim || vd[0] != kd[0] || vd[1] != kd[1] ||
        vd[2] != kd[2] || vd[3] != kd[3] ||
        (kv_heads != 0 && kd[1] != kv_heads) || kd[1] == 0 || heads % kd[1] != 0)
      return ffi::Error::InvalidArgument("bild_attention: segments must be [B, Hkv, S_i, D] with H % Hkv == 0");
    kv_heads = kd[1];
    segments.push_back({keys->typed_data(), values->typed_data(), kd[2]});
    total += kd[2];
  }
  if (md[2] != total) return ffi::Error::InvalidArgument("bild_attention: the mask must cover every key");
  auto bd = bias.dimensions();
  const bool biased = bias.element_count() != 0;
  if (biased && (bd.size() != 4 || (bd[0] != 1 && bd[0] != batch) || bd[1] != heads || bd[2] != width ||
                 bd[3] != total))
    return ffi::Error::InvalidArgument("bild_attention: the bias must be [B or 1, H, K, S'] or empty");
  const int64_t bias_rows = biased ? bd[0] : 0;
  const float* biases = bias.typed_data();
  const int64_t groups = heads / kv_heads;
  const float* qs = q.typed_data();
  const bool* masks = mask.typed_data();
  float* outs = out->typed_data();

  // One unit: the `groups` heads of one query of one (row, kv head).
  auto unit = [&](int64_t u, Visible& seen) {
    const int64_t b = u / (kv_heads * width), kvh = u / width % kv_heads, i = u % width;
    const bool* visible = masks + (b * width + i) * total;
    seen.count = 0;
    int64_t offset = 0;  // index among the S' keys of the segment's first
    for (const Segment& part : segments) {
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
      float* result = outs + ((b * width + i) * heads + h) * dim;
      if (seen.count == 0) {  // a query that sees no key (a padding row) gets zeros
        std::fill(result, result + dim, 0.0f);
        continue;
      }
      const float* bias_row = biased ? biases + (((bias_rows == 1 ? 0 : b) * heads + h) * width + i) * total
                                     : nullptr;  // [S']
      Scores(qs + ((b * width + i) * heads + h) * dim, bias_row, seen, dim, scale);
      const float top = *std::max_element(seen.scores.begin(), seen.scores.begin() + seen.count);
      Weights(seen, top);
      WeightedSum(seen, dim, result);
      float denominator = 0.0f;
      for (int64_t n = 0; n < seen.count; ++n) denominator += seen.weights[n];
      const float inverse = 1.0f / denominator;
      for (int64_t d = 0; d < dim; ++d) result[d] *= inverse;
    }
  };
  const int64_t units = batch * kv_heads * width;
  const int64_t work = units * groups * total * dim * 2;
  const bool threaded = work >= 2 * kWorkPerThread;
  const int64_t chunks = threaded ? bild::ChunkCount(pool, units) : 1;
  bild::InChunks(pool, chunks, [&](int64_t chunk) {
    Visible seen(total);
    for (int64_t u = chunk * units / chunks; u < (chunk + 1) * units / chunks; ++u) unit(u, seen);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BildAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
