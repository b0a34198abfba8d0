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
#include <cstdint>

#include "attention.h"
#include "threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace bild::attention;

// Multiply-adds per thread below which waking XLA's threads costs more than it saves. Measured on 2 cores
// (the kernel alone, one thread against all): 0.80x the time for an 11-token block of the bundled T5 large
// model's self- and cross-attention (338k-360k), 0.84x for T5 small's (127k), 1.01x at 109k, 1.1-1.4x below
// 66k; the previous bound (2^19 in all) kept the T5 blocks on one core: their large model's 11-token block
// took 1.15x the time (`bild-jax bench`'s block over a 64-token input).
constexpr int64_t kWorkPerThread = 50'000;

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::PRED> mask,
                     ffi::Buffer<ffi::F32> bias, ffi::RemainingArgs segment_args, ffi::ResultBuffer<ffi::F32> out,
                     float scale) {
  auto qd = q.dimensions();
  auto md = mask.dimensions();
  if (qd.size() != 4 || md.size() != 3 || md[0] != qd[0] || md[1] != qd[1] || segment_args.size() < 2 ||
      segment_args.size() % 2 != 0)
    return ffi::Error::InvalidArgument("bild_attention: q [B, K, H, D], mask [B, K, S'], then (keys, values) pairs");
  const int64_t batch = qd[0], width = qd[1], heads = qd[2], dim = qd[3];
  Problem problem{};
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
    problem.segments.push_back({keys->typed_data(), values->typed_data(), kd[2]});
    total += kd[2];
  }
  if (md[2] != total) return ffi::Error::InvalidArgument("bild_attention: the mask must cover every key");
  auto bd = bias.dimensions();
  const bool biased = bias.element_count() != 0;
  if (biased && (bd.size() != 4 || (bd[0] != 1 && bd[0] != batch) || bd[1] != heads || bd[2] != width ||
                 bd[3] != total))
    return ffi::Error::InvalidArgument("bild_attention: the bias must be [B or 1, H, K, S'] or empty");
  problem.q = q.typed_data();
  problem.mask = mask.typed_data();
  problem.bias = biased ? bias.typed_data() : nullptr;
  problem.bias_rows = biased ? bd[0] : 0;
  problem.batch = batch, problem.width = width, problem.heads = heads, problem.kv_heads = kv_heads;
  problem.dim = dim, problem.total = total, problem.scale = scale, problem.out = out->typed_data();
  const int64_t units = problem.units();
  const int64_t chunks = problem.work() >= 2 * kWorkPerThread ? bild::ChunkCount(pool, units) : 1;
  bild::InChunks(pool, chunks, [&](int64_t chunk) {
    Visible seen(total);
    for (int64_t u = chunk * units / chunks; u < (chunk + 1) * units / chunks; ++u) Attend(problem, u, seen);
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
