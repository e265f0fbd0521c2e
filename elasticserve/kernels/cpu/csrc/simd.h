// Small helpers the kernels share (AVX2; callers inside any AVX2-or-wider target region).
#pragma once

#include <immintrin.h>

namespace es {

// The sum of a vector's eight lanes.
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Fetches the cache line of p into L1. An asm statement, not __builtin_prefetch: GCC 12 at -O1
// and above deletes loops whose only work is __builtin_prefetch calls (their dead-code pass
// counts the builtin as free of side effects), which had silently removed every software
// prefetch of the quantized kernels.
inline void prefetch_l1(const void* p) {
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
}

}  // namespace es
