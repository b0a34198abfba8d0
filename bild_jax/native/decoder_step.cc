// A Llama-family decoder's cached pass (a decode step or a verification block) in one call.
//
// Run as XLA operations, a decode step of the bundled small model is about 70 of them (norms, rotary
// embeddings, residual adds, the gated activation, each product and attention one call): each costs 1-3 us
// of fixed work, and the small model's step takes about 90 us for 1.5M multiply-adds. This kernel runs the
// whole pass, the embedding lookup to the logits, in one call: the caller and XLA's threads form one `Team`
// for its stages, the products and attention are those of `products.h` and `attention.h` (so a token's
// keys, values and logits are bitwise the same in a one-token step and in a verification block, as exact mode
// needs), and the norms, rotations and activation run on the calling thread between them.
//
//   bild_decoder_step: tokens s32[B, K], table [V, D] (float32 or bfloat16), cos and sin f32[B, K, Dh]
//     (rotary embedding at each token's position), mask pred[B, K, S + K] (the cache's slots, then the
//     block), final norm f32[D], output panels [D', V] (panel-major, the weights' dtype), then per layer:
//     input norm f32[D], q, k, v panels, o panels, post-attention norm f32[D], gate, up, down panels (all of
//     one dtype, float32 or bfloat16), cached keys and values f32[B, Hkv, S, Dh]
//   -> logits f32[B, K, V], then per layer the block's keys and values f32[B, K, Hkv, Dh] (keys rotated)
//
// The computation is HF Llama's: h = table[token]; per layer h += o(attention(rope(q(n)), rope(k(n)), v(n)))
// with n = rms_norm(h) * w, then h += down(silu(gate(n)) * up(n)) with n the post-attention norm of h;
// logits = output(rms_norm(h) * w_final). Norms sum their squares in float32 in order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "panels.h"
#include "products.h"
#include "threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using bild::Team;
using bild::products::Product;
using bild::products::ProductGroup;
using bild::products::RowsOf;

constexpr int64_t kPerLayer = 11;  // buffers per layer after the shared ones
// Multiply-adds of an attention below which it runs on the calling thread alone (`attention.cc`'s bound).
constexpr int64_t kThreadedAttention = 100'000;

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, rows of `dim`.
void RmsNorm(const float* x, const float* weight, int64_t rows, int64_t dim, float eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * dim;
    float squares = 0.0f;
    for (int64_t d = 0; d < dim; ++d) squares += row[d] * row[d];
    const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(dim) + eps);
    for (int64_t d = 0; d < dim; ++d) out[r * dim + d] = weight[d] * (row[d] * inverse);
  }
}

// Rotates each head of x[M, heads, Dh] in place by cos and sin [M, Dh] (HF's rotate-half layout).
void Rope(float* x, const float* cos, const float* sin, int64_t rows, int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  std::vector<float> rotated(dim);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (r * heads + h) * dim;
      for (int64_t d = 0; d < half; ++d) rotated[d] = -v[d + half], rotated[d + half] = v[d];
      for (int64_t d = 0; d < dim; ++d) v[d] = v[d] * cos[r * dim + d] + rotated[d] * sin[r * dim + d];
    }
}

// gate[i] = silu(gate[i]) * up[i], silu(g) = g * sigmoid(g), exp taken of -|g| only.
void GatedSilu(float* gate, const float* up, int64_t count) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= count; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 e = bild::attention::Exp(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));  // exp(-|g|)
    const __m512 one = _mm512_set1_ps(1.0f);
    const __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 sigmoid = _mm512_div_ps(_mm512_mask_mov_ps(one, negative, e), _mm512_add_ps(one, e));
    _mm512_storeu_ps(gate + i, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid), _mm512_loadu_ps(up + i)));
  }
#endif
  for (; i < count; ++i) {
    const float g = gate[i], e = std::exp(-std::fabs(g));
    gate[i] = g * ((g < 0.0f ? e : 1.0f) / (1.0f + e)) * up[i];
  }
}

// Rows [M, D] of the table at the tokens, widened to float32; an id in [-V, 0) counts from the end, one
// outside [-V, V) gives a row of NaN (as `bild_lookup`).
template <typename T>
void Lookup(const int32_t* tokens, int64_t count, const T* table, int64_t vocab, int64_t dim, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t row = tokens[i] < 0 ? tokens[i] + vocab : tokens[i];
    float* to = out + i * dim;
    if (row < 0 || row >= vocab) {
      std::fill(to, to + dim, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    for (int64_t d = 0; d < dim; ++d) to[d] = bild::products::Widen(table[row * dim + d]);
  }
}

// The products of rows x [M, K] with a group of panel-major weights [PanelRows(K), N_i] into ys [M, N_i],
// run by the team.
template <typename W>
void Products(Team& team, const float* x, int64_t m, int64_t k, const std::vector<const W*>& weights,
              const std::vector<int64_t>& columns, const std::vector<float*>& ys, bool in_cache) {
  std::vector<Product<W>> products;
  for (size_t i = 0; i < weights.size(); ++i) products.push_back({nullptr, weights[i], ys[i], m, k, columns[i], k});
  std::vector<RowsOf<W>> rows;
  bild::products::ReadRows(x, rows, products);
  const ProductGroup<W> group(std::move(products));
  if (!in_cache) {
    if (group.in_parts()) {
      const int64_t parts = std::min(team.size(), group.tasks());
      team.Stage(parts, [&](int64_t part) { group.RunPart(part, parts); });
    } else {
      team.Stage(group.tasks(), [&](int64_t task) { group.Run(task); });
    }
    return;
  }
  // Weights that stay in the cores' L2 caches: one part per thread, each core mostly taking the same part
  // call after call (`Team::Stage` by core); a task per panel cost the bundled small model's step 1.05x.
  const int64_t tasks = group.tasks(), parts = std::min(team.size(), tasks);
  team.Stage(parts, [&](int64_t part) {
    for (int64_t task = part * tasks / parts; task < (part + 1) * tasks / parts; ++task) group.Run(task);
  }, true);
}

template <typename W>
struct Layer {
  const float* input_norm;
  const W *q, *k, *v, *o;
  const float* post_norm;
  const W *gate, *up, *down;
  const float *cached_keys, *cached_values;  // [B, Hkv, S, Dh]
  float *keys, *values;                      // out: [B, K, Hkv, Dh]
};

struct Dims {
  int64_t batch, width, dim, heads, kv_heads, head_dim, hidden, capacity, vocab;
  int64_t rows() const { return batch * width; }
};

// [B, K, Hkv, Dh] -> [B, Hkv, K, Dh], the layout attention reads a segment in.
void HeadMajor(const float* x, const Dims& d, float* out) {
  for (int64_t b = 0; b < d.batch; ++b)
    for (int64_t i = 0; i < d.width; ++i)
      for (int64_t h = 0; h < d.kv_heads; ++h)
        std::memcpy(out + ((b * d.kv_heads + h) * d.width + i) * d.head_dim,
                    x + ((b * d.width + i) * d.kv_heads + h) * d.head_dim, d.head_dim * sizeof(float));
}

template <typename W>
void Step(Team& team, const Dims& d, const int32_t* tokens, const void* table, bool table_bf16, const float* cos,
          const float* sin, const bool* mask, const std::vector<Layer<W>>& layers, const float* final_norm,
          const W* output, float eps, float scale, bool in_cache, float* logits) {
  const int64_t m = d.rows(), q_width = d.heads * d.head_dim, kv_width = d.kv_heads * d.head_dim;
  std::vector<float> h(m * d.dim), normed(m * d.dim), added(m * d.dim), queries(m * q_width),
      attended(m * q_width), gate(m * d.hidden), up(m * d.hidden), own_keys(m * kv_width), own_values(m * kv_width);
  bild::attention::Visible seen(d.capacity + d.width);  // the calling thread's attention scratch
  if (table_bf16) Lookup(tokens, m, static_cast<const uint16_t*>(table), d.vocab, d.dim, h.data());
  else Lookup(tokens, m, static_cast<const float*>(table), d.vocab, d.dim, h.data());
  auto add = [&](const std::vector<float>& y) {
    for (int64_t i = 0; i < m * d.dim; ++i) h[i] += y[i];
  };
  for (const Layer<W>& layer : layers) {
    RmsNorm(h.data(), layer.input_norm, m, d.dim, eps, normed.data());
    Products<W>(team, normed.data(), m, d.dim, {layer.q, layer.k, layer.v}, {q_width, kv_width, kv_width},
                {queries.data(), layer.keys, layer.values}, in_cache);
    Rope(queries.data(), cos, sin, m, d.heads, d.head_dim);
    Rope(layer.keys, cos, sin, m, d.kv_heads, d.head_dim);
    HeadMajor(layer.keys, d, own_keys.data());
    HeadMajor(layer.values, d, own_values.data());
    bild::attention::Problem attention{queries.data(), mask, nullptr, 0,
                                       {{layer.cached_keys, layer.cached_values, d.capacity},
                                        {own_keys.data(), own_values.data(), d.width}},
                                       d.batch, d.width, d.heads, d.kv_heads, d.head_dim, d.capacity + d.width,
                                       scale, attended.data()};
    if (attention.work() < kThreadedAttention) {
      for (int64_t u = 0; u < attention.units(); ++u) bild::attention::Attend(attention, u, seen);
    } else {
      team.Stage(attention.units(), [&](int64_t u) {
        bild::attention::Visible own(attention.total);
        bild::attention::Attend(attention, u, own);
      });
    }
    Products<W>(team, attended.data(), m, q_width, {layer.o}, {d.dim}, {added.data()}, in_cache);
    add(added);
    RmsNorm(h.data(), layer.post_norm, m, d.dim, eps, normed.data());
    Products<W>(team, normed.data(), m, d.dim, {layer.gate, layer.up}, {d.hidden, d.hidden},
                {gate.data(), up.data()}, in_cache);
    GatedSilu(gate.data(), up.data(), m * d.hidden);
    Products<W>(team, gate.data(), m, d.hidden, {layer.down}, {d.dim}, {added.data()}, in_cache);
    add(added);
  }
  RmsNorm(h.data(), final_norm, m, d.dim, eps, normed.data());
  Products<W>(team, normed.data(), m, d.dim, {output}, {d.vocab}, {logits}, in_cache);
}

template <typename W>
const W* Data(const ffi::AnyBuffer& buffer) {
  return static_cast<const W*>(buffer.untyped_data());
}

ffi::Error DecoderStep(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> tokens, ffi::AnyBuffer table,
                       ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::PRED> mask,
                       ffi::Buffer<ffi::F32> final_norm, ffi::AnyBuffer output, ffi::RemainingArgs layer_args,
                       ffi::Result<ffi::Buffer<ffi::F32>> logits, ffi::RemainingRets block, float eps, float scale,
                       bool in_cache) {
  auto fail = [](const char* what) { return ffi::Error::InvalidArgument(std::string("bild_decoder_step: ") + what); };
  const auto td = tokens.dimensions();
  if (td.size() != 2 || table.dimensions().size() != 2 || layer_args.size() % kPerLayer != 0 ||
      block.size() != 2 * (layer_args.size() / kPerLayer) || layer_args.size() == 0)
    return fail("tokens [B, K], table [V, D], 11 buffers per layer and 2 outputs per layer expected");
  const ffi::DataType dtype = output.element_type();
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16)
    return fail("float32 or bfloat16 weights expected");
  const int64_t element_bytes = dtype == ffi::DataType::BF16 ? 2 : 4;
  auto first_keys = layer_args.get<ffi::Buffer<ffi::F32>>(9);
  auto first_q = layer_args.get<ffi::AnyBuffer>(1), first_k = layer_args.get<ffi::AnyBuffer>(2);
  auto first_gate = layer_args.get<ffi::AnyBuffer>(6);
  if (first_q.has_error() || first_k.has_error() || first_gate.has_error()) return fail("missing layer weights");
  if (first_keys.has_error()) return fail("cached keys must be float32");
  const auto kd = first_keys->dimensions();
  Dims d{td[0], td[1], table.dimensions()[1], 0, 0, 0, 0, 0, table.dimensions()[0]};
  if (kd.size() != 4 || kd[0] != d.batch) return fail("cached keys [B, Hkv, S, Dh] expected");
  d.kv_heads = kd[1], d.capacity = kd[2], d.head_dim = kd[3];
  d.heads = first_q->dimensions()[1] / d.head_dim;
  d.hidden = first_gate->dimensions()[1];
  if (first_k->dimensions()[1] != d.kv_heads * d.head_dim || d.heads % d.kv_heads != 0 || d.head_dim % 2 != 0 ||
      cos.element_count() != d.rows() * d.head_dim || sin.element_count() != d.rows() * d.head_dim ||
      mask.element_count() != d.rows() * (d.capacity + d.width) || final_norm.element_count() != d.dim ||
      output.dimensions()[1] != d.vocab || output.dimensions()[0] != bild::PanelRows(d.dim, element_bytes))
    return fail("shapes do not agree");
  if (logits->element_count() != d.rows() * d.vocab) return fail("logits [B, K, V] expected");
  auto run = [&](auto typed) -> ffi::Error {
    using W = decltype(typed);
    constexpr ffi::DataType T = std::is_same_v<W, float> ? ffi::DataType::F32 : ffi::DataType::BF16;
    std::vector<Layer<W>> layers;
    for (size_t l = 0; l < layer_args.size() / kPerLayer; ++l) {
      const size_t at = l * kPerLayer;
      std::vector<const W*> weights;
      for (size_t i : {1, 2, 3, 4, 6, 7, 8}) {
        auto w = layer_args.get<ffi::AnyBuffer>(at + i);
        if (w.has_error() || w->element_type() != T) return fail("every weight must have the output's dtype");
        weights.push_back(Data<W>(*w));
      }
      auto in_norm = layer_args.get<ffi::Buffer<ffi::F32>>(at);
      auto post_norm = layer_args.get<ffi::Buffer<ffi::F32>>(at + 5);
      auto keys = layer_args.get<ffi::Buffer<ffi::F32>>(at + 9);
      auto values = layer_args.get<ffi::Buffer<ffi::F32>>(at + 10);
      auto out_keys = block.get<ffi::Buffer<ffi::F32>>(2 * l);
      auto out_values = block.get<ffi::Buffer<ffi::F32>>(2 * l + 1);
      if (in_norm.has_error() || post_norm.has_error() || keys.has_error() || values.has_error() ||
          out_keys.has_error() || out_values.has_error())
        return fail("norms, caches and outputs must be float32");
      if (keys->element_count() != d.batch * d.kv_heads * d.capacity * d.head_dim ||
          values->element_count() != keys->element_count() ||
          (*out_keys)->element_count() != d.rows() * d.kv_heads * d.head_dim ||
          (*out_values)->element_count() != (*out_keys)->element_count())
        return fail("every layer's cache and block must have the first layer's shape");
      layers.push_back({in_norm->typed_data(), weights[0], weights[1], weights[2], weights[3], post_norm->typed_data(),
                        weights[4], weights[5], weights[6], keys->typed_data(), values->typed_data(),
                        (*out_keys)->typed_data(), (*out_values)->typed_data()});
    }
    Team team(pool);
    Step<W>(team, d, tokens.typed_data(), table.untyped_data(), table.element_type() == ffi::DataType::BF16,
            cos.typed_data(), sin.typed_data(), mask.typed_data(), layers, final_norm.typed_data(),
            Data<W>(output), eps, scale, in_cache, logits->typed_data());
    return ffi::Error::Success();
  };
  if (table.element_type() != ffi::DataType::F32 && table.element_type() != ffi::DataType::BF16)
    return fail("a float32 or bfloat16 table expected");
  return dtype == ffi::DataType::F32 ? run(float{}) : run(uint16_t{});
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BildDecoderStep, DecoderStep,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .RemainingRets()
                                  .Attr<float>("eps")
                                  .Attr<float>("scale")
                                  .Attr<bool>("in_cache"));
