// Band linears: block list and checks (generic code), the AVX2/FMA kernels (target region).
#include "linear.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

namespace es {
namespace {

constexpr int MR = 2;  // x rows per register tile
constexpr int NR = 4;  // weight rows per register tile: MR * NR accumulators, NR weight loads

struct Block {  // weight rows [n0, n0 + nr) against x rows [0, rows)
  int32_t n0, nr, rows;
};

std::vector<Block> make_blocks(const Mat& w, const Band* bands, int nb, Flavour flavour) {
  std::vector<Block> blocks;
  if (flavour == Flavour::IN_PREFIX) {
    const int32_t rows = bands[nb - 1].row_end;
    for (int64_t n0 = 0; n0 < w.rows; n0 += NR)
      blocks.push_back({int32_t(n0), int32_t(std::min<int64_t>(NR, w.rows - n0)), rows});
    return blocks;
  }
  // output n is kept by rows [0, row_end of the narrowest band wider than n)
  int b = nb - 1;
  for (int32_t n0 = 0; n0 < bands[0].width;) {
    while (bands[b].width <= n0) --b;
    const int32_t end = std::min(n0 + NR, bands[b].width);
    blocks.push_back({n0, end - n0, bands[b].row_end});
    n0 = end;
  }
  return blocks;
}

// Per-thread fp32 copy of one bf16 weight panel, reused by every x tile of a block.
float* thread_scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace

void check_bands(const Mat& w, const Band* bands, int nb, Flavour flavour) {
  if (nb < 1) throw std::invalid_argument("bands: at least one band is needed");
  const int64_t limit = flavour == Flavour::OUT_PREFIX ? w.rows : w.cols;
  int32_t prev_end = 0;
  for (int b = 0; b < nb; ++b) {
    const Band& band = bands[b];
    if (band.row_end < prev_end)
      throw std::invalid_argument("bands: row ends must not decrease (band " + std::to_string(b) +
                                  " ends at " + std::to_string(band.row_end) + ")");
    if (band.width < 0 || band.width > limit)
      throw std::invalid_argument("bands: width " + std::to_string(band.width) +
                                  " is outside 0.." + std::to_string(limit));
    if (b > 0 && band.width >= bands[b - 1].width)
      throw std::invalid_argument("bands: widths must strictly decrease (" +
                                  std::to_string(bands[b - 1].width) + " then " +
                                  std::to_string(band.width) + ")");
    prev_end = band.row_end;
  }
}

bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

void linear_scalar(const Mat& w, const float* x, int64_t ldx, const Band* bands, int nb,
                   Flavour flavour, float* y, int64_t ldy, bool accumulate) {
  check_bands(w, bands, nb, flavour);
  auto weight = [&](int64_t n, int64_t k) {
    return w.dtype == DType::F32 ? static_cast<const float*>(w.data)[n * w.ld + k]
                                 : bf16_to_float(static_cast<const uint16_t*>(w.data)[n * w.ld + k]);
  };
  int32_t start = 0;
  for (int b = 0; b < nb; ++b) {
    const int64_t n_out = flavour == Flavour::OUT_PREFIX ? bands[b].width : w.rows;
    const int64_t k_in = flavour == Flavour::OUT_PREFIX ? w.cols : bands[b].width;
    for (int32_t r = start; r < bands[b].row_end; ++r)
      for (int64_t n = 0; n < n_out; ++n) {
        double s = 0;
        for (int64_t k = 0; k < k_in; ++k) s += double(x[r * ldx + k]) * weight(n, k);
        y[r * ldy + n] = float(accumulate ? y[r * ldy + n] + s : s);
      }
    start = bands[b].row_end;
  }
}

void run_blocks(const Mat& w, const float* x, int64_t ldx, const Band* bands, int nb,
                Flavour flavour, float* y, int64_t ldy, bool accumulate, const Block* blocks,
                int64_t nblocks, float* (*scratch)(size_t));

void linear(const Mat& w, const float* x, int64_t ldx, const Band* bands, int nb,
            Flavour flavour, float* y, int64_t ldy, bool accumulate) {
  check_bands(w, bands, nb, flavour);
  const std::vector<Block> blocks = make_blocks(w, bands, nb, flavour);
  const int64_t n = int64_t(blocks.size());
  if (n == 0) return;
  if (omp_in_parallel()) {
    run_blocks(w, x, ldx, bands, nb, flavour, y, ldy, accumulate, blocks.data(), n,
               thread_scratch);
  } else {
#pragma omp parallel
    run_blocks(w, x, ldx, bands, nb, flavour, y, ldy, accumulate, blocks.data(), n,
               thread_scratch);
  }
}

// ---- AVX2 + FMA + F16C from here: nothing above may be instantiated below (no std containers).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // 8 bf16 -> 8 fp32: widen and shift into the high half
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bf16_to_float(*p); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[m][n] += x[m, k0:k1] . w[n, k0:k1] for m < M, n < N
template <int M, int N, typename W>
void tile(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k0, int64_t k1,
          float (*out)[NR]) {
  __m256 acc[M][N];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < N; ++n) acc[m][n] = _mm256_setzero_ps();
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    __m256 wv[N];
#pragma GCC unroll 8
    for (int n = 0; n < N; ++n) wv[n] = load8(w + n * ldw + k);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
#pragma GCC unroll 8
      for (int n = 0; n < N; ++n) acc[m][n] = _mm256_fmadd_ps(xv, wv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float s = hsum(acc[m][n]);
      for (int64_t t = k; t < k1; ++t) s += x[m * ldx + t] * load1(w + n * ldw + t);
      out[m][n] += s;
    }
}

template <typename W>
using TileFn = void (*)(const float*, int64_t, const W*, int64_t, int64_t, int64_t, float (*)[NR]);

template <typename W>
TileFn<W> tile_fn(int m, int n) {
  static const TileFn<W> table[MR][NR] = {
      {tile<1, 1, W>, tile<1, 2, W>, tile<1, 3, W>, tile<1, 4, W>},
      {tile<2, 1, W>, tile<2, 2, W>, tile<2, 3, W>, tile<2, 4, W>},
  };
  return table[m - 1][n - 1];
}

template <typename W>
void block(const W* wp, int64_t ldw, const float* x, int64_t ldx, const Band* bands, int nb,
           Flavour flavour, int64_t k_full, float* y, int64_t ldy, bool accumulate,
           const Block& b) {
  for (int32_t m0 = 0; m0 < b.rows; m0 += MR) {
    const int mr = std::min<int32_t>(MR, b.rows - m0);
    float out[MR][NR] = {};
    const float* xm = x + int64_t(m0) * ldx;
    if (flavour == Flavour::OUT_PREFIX) {
      tile_fn<W>(mr, b.nr)(xm, ldx, wp, ldw, 0, k_full, out);
    } else {  // narrowest K segment first: it spans every row, each wider one fewer rows
      for (int s = nb - 1; s >= 0; --s) {
        const int active = std::min<int32_t>(mr, bands[s].row_end - m0);
        if (active <= 0) continue;
        const int64_t lo = s + 1 < nb ? bands[s + 1].width : 0;
        tile_fn<W>(active, b.nr)(xm, ldx, wp, ldw, lo, bands[s].width, out);
      }
    }
    for (int m = 0; m < mr; ++m) {
      float* yr = y + int64_t(m0 + m) * ldy + b.n0;
      for (int n = 0; n < b.nr; ++n) yr[n] = accumulate ? yr[n] + out[m][n] : out[m][n];
    }
  }
}

}  // namespace

void run_blocks(const Mat& w, const float* x, int64_t ldx, const Band* bands, int nb,
                Flavour flavour, float* y, int64_t ldy, bool accumulate, const Block* blocks,
                int64_t nblocks, float* (*scratch)(size_t)) {
  const int64_t k_full = flavour == Flavour::OUT_PREFIX ? w.cols : bands[0].width;
#pragma omp for schedule(static)
  for (int64_t i = 0; i < nblocks; ++i) {
    const Block& b = blocks[i];
    if (w.dtype == DType::F32) {
      const float* wp = static_cast<const float*>(w.data) + int64_t(b.n0) * w.ld;
      block(wp, w.ld, x, ldx, bands, nb, flavour, k_full, y, ldy, accumulate, b);
      continue;
    }
    const uint16_t* wp = static_cast<const uint16_t*>(w.data) + int64_t(b.n0) * w.ld;
    if (b.rows <= MR) {  // one x tile: convert in registers
      block(wp, w.ld, x, ldx, bands, nb, flavour, k_full, y, ldy, accumulate, b);
      continue;
    }
    // several x tiles: convert the panel once, then every tile reads fp32 from L1
    float* panel = scratch(size_t(b.nr) * size_t(k_full));
    for (int n = 0; n < b.nr; ++n) {
      const uint16_t* src = wp + n * w.ld;
      float* dst = panel + n * k_full;
      int64_t k = 0;
      for (; k + 8 <= k_full; k += 8) _mm256_storeu_ps(dst + k, load8(src + k));
      for (; k < k_full; ++k) dst[k] = bf16_to_float(src[k]);
    }
    block(static_cast<const float*>(panel), k_full, x, ldx, bands, nb, flavour, k_full, y, ldy,
          accumulate, b);
  }
}

#pragma GCC pop_options

}  // namespace es
