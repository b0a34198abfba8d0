// The panel-major layout of a Dense kernel that the native products read (`bild_panels` packs it).
//
// A kernel w[K, N] is cut into panels of kPanelColumns columns (the last one narrower, N % kPanelColumns
// columns), each stored as its own block, one after the other: panel p (columns 64p .. 64p + width) starts
// at element 64p * PanelRows(K). A product reads each panel in order from start to end, so the whole weight
// is one sequential read that the hardware prefetcher follows, and the outputs of a panel stay in registers
// over all of its rows.
//
// A float32 panel is [K, width] row-major. A bfloat16 panel holds K + K % 2 rows (a zero row after an odd
// last one) in pairs: rows 2i and 2i + 1 as one [width, 2] block, column j's two values side by side, the
// operand layout of AVX512-BF16's pair dot products (vdpbf16ps; CPUs without them widen each pair).
#ifndef BILD_JAX_NATIVE_PANELS_H_
#define BILD_JAX_NATIVE_PANELS_H_

#include <algorithm>
#include <cstdint>

namespace bild {

constexpr int64_t kPanelColumns = 64;

// Rows of a packed kernel of K rows with elements of `element_bytes`: bfloat16 rows come in pairs.
inline int64_t PanelRows(int64_t k, int64_t element_bytes) { return element_bytes == 2 ? k + k % 2 : k; }
inline int64_t PanelCount(int64_t n) { return (n + kPanelColumns - 1) / kPanelColumns; }
inline int64_t PanelWidth(int64_t n, int64_t panel) { return std::min(kPanelColumns, n - panel * kPanelColumns); }
// Start of panel `panel` in a packed kernel of `rows` (PanelRows) rows.
inline int64_t PanelOffset(int64_t rows, int64_t panel) { return panel * kPanelColumns * rows; }
// Index of w[i, j] (j counted from the panel's first column) in a panel of `width` columns.
inline int64_t PanelIndex(int64_t i, int64_t j, int64_t width, bool pairs) {
  return pairs ? (i & ~int64_t{1}) * width + 2 * j + (i & 1) : i * width + j;
}

}  // namespace bild

#endif  // BILD_JAX_NATIVE_PANELS_H_
