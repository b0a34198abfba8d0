// Attention of a decode step, verification block or short prompt pass over its cache, in float32.
//
// XLA:CPU runs the two small batched products of a decode step's attention (scores, then the weighted sum of
// values) as separate library calls whose fixed cost is most of their time: together about a sixth of a
// step of the bundled large model. This kernel does the whole attention of one query in one pass.
//
//   bild_attention: out[B, K, H, D] = softmax(scale * q . keys, masked) . values
//     q [B, K, H, D]; mask [B, K, S'] bool; then one or more (keys, values) segments, each [B, Hkv, S_i, D]
//     head-major, attended as one sequence of S' = sum S_i keys (a cache, then the block's own keys).
//
// A query's keys are visited in segment order, masked ones skipped, and every sum runs over them in that
// order. For a decode mask (a row's valid cache slots, then the block's tokens up to the query) that order
// is the keys' positions, so a token gets bitwise the same output whether its predecessors sit in the cache
// (one-token steps) or in the same block (a verification pass), as exact mode needs.
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;  // partial sums of a dot product over D, added in a fixed order
// Multiply-adds per thread below which waking XLA's threads costs more than it saves.
constexpr int64_t kWorkPerThread = 1 << 18;

struct Segment {
  const float* keys;
  const float* values;
  int64_t length;  // S_i
};

float Dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  for (int64_t l = 0; i < d; ++i, ++l) lanes[l] += a[i] * b[i];
  float sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::PRED> mask,
                     ffi::RemainingArgs segment_args, ffi::ResultBuffer<ffi::F32> out, float scale) {
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
  const int64_t groups = heads / kv_heads;
  const float* qs = q.typed_data();
  const bool* masks = mask.typed_data();
  float* outs = out->typed_data();

  // One unit: every query of one (row, kv head).
  auto unit = [&](int64_t u) {
    const int64_t b = u / kv_heads, kvh = u % kv_heads;
    std::vector<float> scores(total);
    for (int64_t i = 0; i < width; ++i) {
      const bool* visible = masks + (b * width + i) * total;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t h = kvh * groups + g;
        const float* query = qs + ((b * width + i) * heads + h) * dim;
        float* result = outs + ((b * width + i) * heads + h) * dim;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0, seg = 0; seg < static_cast<int64_t>(segments.size()); ++seg) {
          const Segment& part = segments[seg];
          const float* keys = part.keys + (b * kv_heads + kvh) * part.length * dim;
          for (int64_t j = 0; j < part.length; ++j, ++s)
            if (visible[s]) {
              scores[s] = Dot(query, keys + j * dim, dim) * scale;
              top = std::max(top, scores[s]);
            }
        }
        for (int64_t d = 0; d < dim; ++d) result[d] = 0.0f;
        float denominator = 0.0f;
        for (int64_t s = 0, seg = 0; seg < static_cast<int64_t>(segments.size()); ++seg) {
          const Segment& part = segments[seg];
          const float* values = part.values + (b * kv_heads + kvh) * part.length * dim;
          for (int64_t j = 0; j < part.length; ++j, ++s)
            if (visible[s]) {
              const float weight = std::exp(scores[s] - top);
              denominator += weight;
              const float* __restrict value = values + j * dim;
              for (int64_t d = 0; d < dim; ++d) result[d] += weight * value[d];
            }
        }
        // A query that sees no key (a padding row) gets zeros rather than a division by zero.
        const float inverse = denominator > 0.0f ? 1.0f / denominator : 0.0f;
        for (int64_t d = 0; d < dim; ++d) result[d] *= inverse;
      }
    }
  };
  const int64_t units = batch * kv_heads;
  const int64_t work = units * groups * width * total * dim * 2;
  const bool threaded = work >= 2 * kWorkPerThread;
  const int64_t chunks = threaded ? bild::ChunkCount(pool, units) : 1;
  bild::InChunks(pool, chunks, [&](int64_t chunk) {
    for (int64_t u = chunk * units / chunks; u < (chunk + 1) * units / chunks; ++u) unit(u);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BildAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
