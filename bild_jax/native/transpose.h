// A 16 x 16 float32 transpose in AVX-512 registers, shared by the kernels that finish 16 dot products at once
// (each dot product's 16 lane sums transposed into vectors, then added lane by lane in order).
#ifndef BILD_JAX_NATIVE_TRANSPOSE_H_
#define BILD_JAX_NATIVE_TRANSPOSE_H_

#if defined(__AVX512F__)
#include <immintrin.h>

namespace bild {

// v[i] lane j -> v[j] lane i: a 16 x 16 float32 transpose in registers.
inline void Transpose16(__m512 v[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2])));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2])));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i + 1]), _mm512_castps_pd(t[4 * i + 3])));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i + 1]), _mm512_castps_pd(t[4 * i + 3])));
  }
  // u[4i + j], 128-bit lane k: rows 4i..4i+3 of column 4k + j.
  for (int j = 0; j < 4; ++j) {
    const __m512 even01 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);       // (u_j.0, u_j.2, u_4+j.0, u_4+j.2)
    const __m512 odd01 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);        // (.1, .3, .1, .3)
    const __m512 even23 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 odd23 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
    v[0 + j] = _mm512_shuffle_f32x4(even01, even23, 0x88);   // lane 0 of all
    v[8 + j] = _mm512_shuffle_f32x4(even01, even23, 0xDD);   // lane 2
    v[4 + j] = _mm512_shuffle_f32x4(odd01, odd23, 0x88);     // lane 1
    v[12 + j] = _mm512_shuffle_f32x4(odd01, odd23, 0xDD);    // lane 3
  }
}

}  // namespace bild

#endif
#endif  // BILD_JAX_NATIVE_TRANSPOSE_H_
