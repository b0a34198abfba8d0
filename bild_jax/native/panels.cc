// Packs a Dense kernel into the panel-major layout the native products read (`panels.h`).
//
//   bild_panels: w[K, N] (float32 or bfloat16) -> [PanelRows(K), N] of the same dtype, panel-major
#include <cstdint>
#include <cstring>

#include "panels.h"
#include "threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error Panels(ffi::ThreadPool pool, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> out) {
  auto dims = w.dimensions();
  const int64_t element = ffi::ByteWidth(w.element_type());
  if (dims.size() != 2 || (element != 2 && element != 4))
    return ffi::Error::InvalidArgument("bild_panels: a float32 or bfloat16 kernel [K, N] expected");
  const int64_t k = dims[0], n = dims[1], rows = bild::PanelRows(k, element);
  if (out->dimensions().size() != 2 || out->dimensions()[0] != rows || out->dimensions()[1] != n)
    return ffi::Error::InvalidArgument("bild_panels: the packed kernel is [PanelRows(K), N]");
  const char* in = static_cast<const char*>(w.untyped_data());
  char* packed = static_cast<char*>(out->untyped_data());
  bild::InChunks(pool, bild::PanelCount(n), [&](int64_t panel) {
    const int64_t width = bild::PanelWidth(n, panel);
    char* to = packed + bild::PanelOffset(rows, panel) * element;
    const char* from = in + panel * bild::kPanelColumns * element;
    if (element == 4) {
      for (int64_t i = 0; i < k; ++i) std::memcpy(to + i * width * 4, from + i * n * 4, width * 4);
      return;
    }
    uint16_t* pairs = reinterpret_cast<uint16_t*>(to);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < width; ++j) {
        uint16_t value = 0;
        if (i < k) std::memcpy(&value, from + (i * n + j) * 2, 2);
        pairs[bild::PanelIndex(i, j, width, true)] = value;
      }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BildPanels, Panels,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
