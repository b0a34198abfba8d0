// bfloat16 -> float32 copy of a weight, ordered after an operand it does not read.
//
// XLA:CPU has no mixed-precision dot: a bfloat16 weight meeting float32 rows (a prompt pass, whose products
// are too wide for the decode-step kernel) is converted to float32 first. As a plain convert, which depends
// on a parameter only, XLA's scheduler runs every layer's conversion at the start of the program, and a
// bfloat16 model's prompt pass holds float32 copies of all its weights at once: fresh memory that is
// page-faulted in on every call (the bundled large model: 44 MB, about as long as the pass itself). Taking
// the rows as an operand orders the conversion after them, so that one layer's copy is live at a time and
// its memory is reused.
//
//   bild_widen_after: (rows, any dtype and shape, unread; w bf16[...]) -> f32[...] the same values
#include <algorithm>
#include <cstdint>

#include "threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error WidenAfter(ffi::ThreadPool pool, ffi::AnyBuffer rows, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> out) {
  const uint16_t* __restrict in = reinterpret_cast<const uint16_t*>(w.typed_data());
  uint32_t* __restrict bits = reinterpret_cast<uint32_t*>(out->typed_data());
  const int64_t size = w.element_count();
  constexpr int64_t kChunk = 64 * 1024;  // elements per task: 128 KB read, 256 KB written
  const int64_t chunks = (size + kChunk - 1) / kChunk;
  bild::InChunks(pool, chunks, [&](int64_t c) {
    const int64_t end = std::min(size, (c + 1) * kChunk);
    // bfloat16 is the top half of a float32
    for (int64_t i = c * kChunk; i < end; ++i) bits[i] = static_cast<uint32_t>(in[i]) << 16;
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BildWidenAfter, WidenAfter,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
