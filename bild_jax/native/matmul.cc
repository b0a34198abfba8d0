// Products for the rows of decode steps, verification blocks and short prompt passes, reading the weights
// once with every core.
//
// XLA:CPU runs a matrix-vector product on one core, which reads memory at about half the machine's
// bandwidth; a decode step is a chain of such products. Both kernels split the work into tasks that the
// calling thread and XLA's intra-op threads take in turn, so a helper that wakes late costs nothing, and
// each output element is summed in one fixed order whatever the number of rows (`products.h`).
//
//   bild_matmul:            y[M, N] = x[M, K] @ w[K, N]   (Dense kernels, panel-major: `panels.h`)
//   bild_matmul_transposed: y[M, N] = x[M, K] @ w[N, K]^T (tied embedding tables used as the output layer)
// x and y are float32; w is float32 or bfloat16 (its rows rounded to bfloat16, `products.h`).
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "panels.h"
#include "products.h"
#include "threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using bild::ChunkCount;
using bild::InChunks;
using namespace bild::products;

template <ffi::DataType T>
ffi::Error Shapes(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<T>& w, bool transposed,
                  Product<ffi::NativeType<T>>* p) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  using W = ffi::NativeType<T>;
  if (wd.size() != 2 || xd.size() < 1
      || (transposed ? wd[1] : wd[0]) != (transposed ? xd.back() : bild::PanelRows(xd.back(), sizeof(W))))
    return ffi::Error::InvalidArgument(
        "bild_matmul: x [..., K] and w [PanelRows(K), N] panel-major (or [N, K] transposed) expected");
  int64_t m = 1;
  for (size_t i = 0; i + 1 < xd.size(); ++i) m *= xd[i];
  const int64_t n = transposed ? wd[0] : wd[1];
  *p = {nullptr, w.typed_data(), nullptr, m, xd.back(), n, xd.back()};
  if constexpr (std::is_same_v<W, float>) p->x = x.typed_data();
  return ffi::Error::Success();
}

// ys[i][..., N_i] = x[..., K] @ ws[i][K, N_i] for a group of weights of one dtype, float32 or bfloat16.
// `in_cache`: the weights' model fits in the cores' L2 caches, so the threads split the panels from both
// ends (`InChunks`). The bundled small model packed both ways in one process, taking turns over 64 prompts, two
// runs: its greedy decoding 0.93x / 0.95x the time, BiLD exact 0.97x / 0.985x, aligned 0.98x / 0.985x. A model
// streamed from memory keeps the threads on consecutive panels: from both ends, the bundled large model's greedy
// decoding took 1.03-1.05x the time (`bild-jax demo`, two runs each way).
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs weights,
                  ffi::RemainingRets outputs, bool in_cache) {
  if (weights.size() == 0 || weights.size() != outputs.size())
    return ffi::Error::InvalidArgument("bild_matmul: one output per weight expected");
  auto first = weights.get<ffi::AnyBuffer>(0);
  if (first.has_error()) return first.error();
  const ffi::DataType dtype = first->element_type();
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("bild_matmul: float32 or bfloat16 weights expected");
  auto run = [&](auto typed) -> ffi::Error {
    using W = decltype(typed);
    constexpr ffi::DataType T = std::is_same_v<W, float> ? ffi::DataType::F32 : ffi::DataType::BF16;
    std::vector<Product<W>> products(weights.size());
    for (size_t i = 0; i < weights.size(); ++i) {
      auto w = weights.get<ffi::Buffer<T>>(i);
      auto y = outputs.get<ffi::Buffer<ffi::F32>>(i);
      if (w.has_error()) return ffi::Error::InvalidArgument("bild_matmul: the weights of a group share one dtype");
      if (y.has_error()) return y.error();
      if (ffi::Error error = Shapes(x, *w, false, &products[i]); error.failure()) return error;
      products[i].y = (*y)->typed_data();
    }
    std::vector<RowsOf<W>> rows;
    ReadRows(x.typed_data(), rows, products);
    const ProductGroup<W> group(std::move(products));
    if (!in_cache && group.in_parts()) {
      const int64_t parts = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), group.tasks());
      InChunks(pool, parts, [&](int64_t part) { group.RunPart(part, parts); });
    } else {
      InChunks(pool, group.tasks(), [&](int64_t task) { group.Run(task); }, in_cache);
    }
    return ffi::Error::Success();
  };
  return dtype == ffi::DataType::F32 ? run(float{}) : run(uint16_t{});
}

template <ffi::DataType T>
ffi::Error MatmulTransposed(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w,
                            ffi::ResultBuffer<ffi::F32> y) {
  using W = ffi::NativeType<T>;
  std::vector<Product<W>> products(1);
  if (ffi::Error error = Shapes(x, w, true, &products[0]); error.failure()) return error;
  std::vector<RowsOf<W>> rows;
  ReadRows(x.typed_data(), rows, products);
  Product<W>& p = products[0];
  p.y = y->typed_data();
  const int64_t chunks = ChunkCount(pool, p.n / 64);
  const int64_t cols = ChunkSize(p.n, chunks, 1);
  InChunks(pool, chunks, [&](int64_t c) {
    const int64_t n0 = std::min(p.n, c * cols);
    TransposedProduct(p, n0, std::min(p.n, n0 + cols));
  });
  return ffi::Error::Success();
}

}  // namespace

#define BILD_BINDING(T)                                                                                  \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<T>>().Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(BildMatmul, Matmul,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().RemainingArgs()
                                  .RemainingRets().Attr<bool>("in_cache"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(BildMatmulTransposed, MatmulTransposed<ffi::F32>, BILD_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(BildMatmulTransposedBf16, MatmulTransposed<ffi::BF16>, BILD_BINDING(ffi::BF16));
