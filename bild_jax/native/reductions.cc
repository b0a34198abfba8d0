// Each row's largest logit and log-sum-exp, on the calling thread: the small model's fallback test in every
// iteration of the BiLD loop, and the rollback rule's probabilities.
//
// XLA:CPU runs the sum of exp(x - max) over a 4096-token row as a fusion split across its threads, and the
// calling thread then waits for the other one: 50-100 us in about half of the small model's steps (about 60
// us each) in a profile of exact mode, and 50-55 us in three of four once the thread lingered in a native
// kernel's team instead of sleeping (`threads.h`). Here a row takes about 2 us.
//
//   bild_log_normalizer: logits f32[..., V] -> (max f32[...], log-sum-exp f32[...]), both NaN for a row that
//   holds a NaN; as in XLA, a row whose max is infinite gives a NaN log-sum-exp
#include <cmath>
#include <cstdint>
#include <limits>

#include "attention.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// (max, log-sum-exp) of one row of `vocab` logits.
void Normalize(const float* x, int64_t vocab, float* peak_out, float* lse_out) {
  float peak = -std::numeric_limits<float>::infinity();
  bool nan = false;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 peaks = _mm512_set1_ps(peak);
  __mmask16 unordered = 0;
  for (; i + 16 <= vocab; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    peaks = _mm512_max_ps(peaks, v);
  }
  peak = _mm512_reduce_max_ps(peaks);
  nan = unordered != 0;
#endif
  for (; i < vocab; ++i) {
    nan |= std::isnan(x[i]);
    peak = std::max(peak, x[i]);
  }
  if (nan) {
    *peak_out = *lse_out = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  float sum = 0.0f;
  i = 0;
#if defined(__AVX512F__)
  const __m512 shift = _mm512_set1_ps(peak);
  __m512 sums = _mm512_setzero_ps();
  for (; i + 16 <= vocab; i += 16)
    sums = _mm512_add_ps(sums, bild::attention::Exp(_mm512_sub_ps(_mm512_loadu_ps(x + i), shift)));
  sum = _mm512_reduce_add_ps(sums);
#endif
  for (; i < vocab; ++i) sum += std::exp(x[i] - peak);
  *peak_out = peak;
  *lse_out = peak + std::log(sum);
}

ffi::Error LogNormalizer(ffi::Buffer<ffi::F32> logits, ffi::ResultBuffer<ffi::F32> peaks,
                         ffi::ResultBuffer<ffi::F32> lses) {
  const auto dims = logits.dimensions();
  const int64_t vocab = dims.size() == 0 ? 0 : dims[dims.size() - 1];
  const int64_t rows = vocab > 0 ? static_cast<int64_t>(logits.element_count()) / vocab : 0;
  if (vocab <= 0 || peaks->element_count() != rows || lses->element_count() != rows)
    return ffi::Error::InvalidArgument("bild_log_normalizer: logits [..., V] and two [...] outputs expected");
  for (int64_t row = 0; row < rows; ++row)
    Normalize(logits.typed_data() + row * vocab, vocab, peaks->typed_data() + row, lses->typed_data() + row);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BildLogNormalizer, LogNormalizer,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
