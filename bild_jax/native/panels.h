// The panel-major layout of a Dense kernel that the native products read (`bild_panels` packs it).
//
// A kernel w[K, N] is cut into panels of kPanelColumns columns (the last one narrower, N % kPanelColumns
// columns), each stored as its own [K, width] row-major block, one after the other: panel p (columns
// 64p .. 64p + width) starts at element 64p * K. A product reads each panel in order from start to end, so
// the whole weight is one sequential read that the hardware prefetcher follows, and the outputs of a panel
// stay in registers over all of its rows.
#ifndef BILD_JAX_NATIVE_PANELS_H_
#define BILD_JAX_NATIVE_PANELS_H_

#include <algorithm>
#include <cstdint>

namespace bild {

constexpr int64_t kPanelColumns = 64;

inline int64_t PanelCount(int64_t n) { return (n + kPanelColumns - 1) / kPanelColumns; }
inline int64_t PanelWidth(int64_t n, int64_t panel) { return std::min(kPanelColumns, n - panel * kPanelColumns); }
inline int64_t PanelOffset(int64_t k, int64_t panel) { return panel * kPanelColumns * k; }

}  // namespace bild

#endif  // BILD_JAX_NATIVE_PANELS_H_
