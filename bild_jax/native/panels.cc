// Packs a Dense kernel into the panel-major layout the native products read (`panels.h`).
//
//   bild_panels: w[K, N] (float32 or bfloat16) -> [K, N] of the same dtype, panel-major
#include <cstdint>
#include <cstring>

#include "panels.h"
#include "threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error Panels(ffi::ThreadPool pool, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> out) {
  auto dims = w.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("bild_panels: a kernel [K, N] expected");
  const int64_t k = dims[0], n = dims[1];
  const int64_t element = ffi::ByteWidth(w.element_type());
  const char* in = static_cast<const char*>(w.untyped_data());
  char* packed = static_cast<char*>(out->untyped_data());
  bild::InChunks(pool, bild::PanelCount(n), [&](int64_t panel) {
    const int64_t width = bild::PanelWidth(n, panel) * element;
    char* to = packed + bild::PanelOffset(k, panel) * element;
    const char* from = in + panel * bild::kPanelColumns * element;
    for (int64_t row = 0; row < k; ++row) std::memcpy(to + row * width, from + row * n * element, width);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BildPanels, Panels,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
