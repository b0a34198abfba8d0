// Rows of a bfloat16 embedding table, widened to float32: the token lookup of the CPU decode loop.
//
// The loop keeps a tied bfloat16 table for the output layer and computes in float32. XLA:CPU gathers
// bfloat16 rows in float32 (its bfloat16 support converts the operand), and the loop's invariant code motion
// hoists that conversion of the whole table out of the loop: a float32 copy of the table made on every call
// (the bundled large model: 6 MB, about 1 ms). This gathers the rows themselves.
//
//   bild_lookup: (ids s32[...], table bf16[V, D]) -> f32[..., D]: row ids[i] of table, widened; as in
//   jnp.take, an id in [-V, 0) counts from the end and one outside [-V, V) gives a row of NaN
#include <cstdint>
#include <cstring>
#include <limits>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error Lookup(ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::BF16> table, ffi::ResultBuffer<ffi::F32> out) {
  if (table.dimensions().size() != 2) return ffi::Error::InvalidArgument("bild_lookup: a table [V, D] expected");
  const int64_t vocab = table.dimensions()[0], width = table.dimensions()[1];
  const uint16_t* rows = reinterpret_cast<const uint16_t*>(table.typed_data());
  uint32_t* bits = reinterpret_cast<uint32_t*>(out->typed_data());
  const int32_t* id = ids.typed_data();
  for (int64_t i = 0; i < static_cast<int64_t>(ids.element_count()); ++i) {
    uint32_t* to = bits + i * width;
    const int64_t row = id[i] < 0 ? id[i] + vocab : id[i];
    if (row < 0 || row >= vocab) {
      const float nan = std::numeric_limits<float>::quiet_NaN();
      for (int64_t d = 0; d < width; ++d) std::memcpy(to + d, &nan, sizeof nan);
      continue;
    }
    const uint16_t* from = rows + row * width;
    for (int64_t d = 0; d < width; ++d) to[d] = static_cast<uint32_t>(from[d]) << 16;  // bfloat16: a float32's top half
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BildLookup, Lookup,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
