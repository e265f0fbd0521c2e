// Band linears: block list and checks (generic code), the AVX2/FMA kernels (target region).
#include "linear.h"
#include "simd.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace es {
namespace {

constexpr int MR = 2;  // x rows per register tile
constexpr int NR = 4;  // weight rows per register tile: MR * NR accumulators, NR weight loads
// weight rows per tile of a single bf16 row: 2 * NR1 independent FMA chains (even and odd
// halves apart) hide the FMA latency that bounds a one-row dot product
constexpr int NR1 = 6;

}  // namespace

// Per-thread fp32 copy of one bf16 weight panel, reused by every x tile of a block.
float* thread_scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

std::vector<Block> make_blocks(int64_t w_rows, const Band* bands, int nb, Flavour flavour,
                               int32_t nr) {
  std::vector<Block> blocks;
  if (flavour == Flavour::IN_PREFIX) {
    const int32_t rows = bands[nb - 1].row_end;
    for (int64_t n0 = 0; n0 < w_rows; n0 += nr)
      blocks.push_back({int32_t(n0), int32_t(std::min<int64_t>(nr, w_rows - n0)), rows});
    return blocks;
  }
  // output n is kept by rows [0, row_end of the narrowest band wider than n)
  int b = nb - 1;
  for (int32_t n0 = 0; n0 < bands[0].width;) {
    while (bands[b].width <= n0) --b;
    const int32_t end = std::min(n0 + nr, bands[b].width);
    blocks.push_back({n0, end - n0, bands[b].row_end});
    n0 = end;
  }
  return blocks;
}

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
  auto weight = [&](int64_t n, int64_t k) { return weight_at(w, n, k); };
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
                int64_t nblocks, float* (*scratch)(size_t), const float* xp, int64_t ldxp);

// x's rows with every aligned 16 columns split into their even then odd ones: the order in
// which 16 bf16 weights widen to fp32 in two instructions (see tile_eo).
const float* even_odd(const float* x, int64_t ldx, int64_t rows, int64_t k, int64_t& ldxp) {
  thread_local std::vector<float> buf;
  ldxp = (k + 15) / 16 * 16;
  buf.resize(size_t(rows * ldxp));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c + 16 <= k; c += 16)
      for (int i = 0; i < 8; ++i) {
        buf[size_t(r * ldxp + c + i)] = x[r * ldx + c + 2 * i];
        buf[size_t(r * ldxp + c + 8 + i)] = x[r * ldx + c + 2 * i + 1];
      }
  return buf.data();
}

void linear(const Mat& w, const float* x, int64_t ldx, const Band* bands, int nb,
            Flavour flavour, float* y, int64_t ldy, bool accumulate) {
  check_bands(w, bands, nb, flavour);
  if (w.dtype == DType::BF16 && amx_active())
    return linear_amx(w, x, ldx, bands, nb, flavour, y, ldy, accumulate);
  const int32_t rows = bands[nb - 1].row_end;
  const bool one_bf16_row = w.dtype == DType::BF16 && rows == 1;
  const std::vector<Block> blocks = make_blocks(w.rows, bands, nb, flavour, one_bf16_row ? NR1 : NR);
  const int64_t n = int64_t(blocks.size());
  if (n == 0) return;
  const int64_t k_full = flavour == Flavour::OUT_PREFIX ? w.cols : bands[0].width;
  int64_t ldxp = 0;
  const float* xp = nullptr;  // few rows of bf16 weights: widen them in registers, even/odd
  if (w.dtype == DType::BF16 && rows <= MR) xp = even_odd(x, ldx, rows, k_full, ldxp);
  if (omp_in_parallel()) {
    run_blocks(w, x, ldx, bands, nb, flavour, y, ldy, accumulate, blocks.data(), n,
               thread_scratch, xp, ldxp);
  } else {
#pragma omp parallel
    run_blocks(w, x, ldx, bands, nb, flavour, y, ldy, accumulate, blocks.data(), n,
               thread_scratch, xp, ldxp);
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
struct Half {  // an fp16 weight: one F16C instruction widens 8 of them
  uint16_t bits;
};
inline __m256 load8(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float load1(const Half* p) { return _cvtsh_ss(p->bits); }

// out[m][n] += x[m, k0:k1] . w[n, k0:k1] for m < M, n < N
template <int M, int N, typename W>
void tile(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k0, int64_t k1,
          float (*out)[NR1]) {
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

// The bf16 tile of few rows: 16 weights load as 8 pairs; `<< 16` is the even ones as fp32 and
// `& 0xffff0000` the odd ones, matched by x's even/odd copy xp (aligned 16-blocks only; the
// columns before the first and after the last aligned block run scalar on x itself).
template <int M, int N>
void tile_eo(const float* x, int64_t ldx, const float* xp, int64_t ldxp, const uint16_t* w,
             int64_t ldw, int64_t k0, int64_t k1, float (*out)[NR1]) {
  const int64_t a = std::min((k0 + 15) / 16 * 16, k1), b = std::max(k1 / 16 * 16, a);
  constexpr int P = M == 1 ? 2 : 1;  // accumulators per dot: even and odd apart for one row
  __m256 acc[M][N][P];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < N; ++n)
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) acc[m][n][p] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(int32_t(0xffff0000u));
  for (int64_t k = a; k < b; k += 16) {
    __m256 we[N], wo[N];
#pragma GCC unroll 8
    for (int n = 0; n < N; ++n) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * ldw + k));
      we[n] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      wo[n] = _mm256_castsi256_ps(_mm256_and_si256(v, high));
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m256 xe = _mm256_loadu_ps(xp + m * ldxp + k);
      const __m256 xo = _mm256_loadu_ps(xp + m * ldxp + k + 8);
#pragma GCC unroll 8
      for (int n = 0; n < N; ++n) {
        acc[m][n][0] = _mm256_fmadd_ps(xe, we[n], acc[m][n][0]);
        acc[m][n][P - 1] = _mm256_fmadd_ps(xo, wo[n], acc[m][n][P - 1]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float s = hsum(P == 2 ? _mm256_add_ps(acc[m][n][0], acc[m][n][P - 1]) : acc[m][n][0]);
      const uint16_t* wn = w + n * ldw;
      for (int64_t t = k0; t < a; ++t) s += x[m * ldx + t] * bf16_to_float(wn[t]);
      for (int64_t t = b; t < k1; ++t) s += x[m * ldx + t] * bf16_to_float(wn[t]);
      out[m][n] += s;
    }
}

using TileEoFn = void (*)(const float*, int64_t, const float*, int64_t, const uint16_t*, int64_t,
                          int64_t, int64_t, float (*)[NR1]);

TileEoFn tile_eo_fn(int m, int n) {  // n <= NR1 for one row, n <= NR for two
  static const TileEoFn one[NR1] = {tile_eo<1, 1>, tile_eo<1, 2>, tile_eo<1, 3>,
                                    tile_eo<1, 4>, tile_eo<1, 5>, tile_eo<1, 6>};
  static const TileEoFn two[NR] = {tile_eo<2, 1>, tile_eo<2, 2>, tile_eo<2, 3>, tile_eo<2, 4>};
  return m == 1 ? one[n - 1] : two[n - 1];
}

template <typename W>
using TileFn = void (*)(const float*, int64_t, const W*, int64_t, int64_t, int64_t, float (*)[NR1]);

template <typename W>
TileFn<W> tile_fn(int m, int n) {
  static const TileFn<W> table[MR][NR] = {
      {tile<1, 1, W>, tile<1, 2, W>, tile<1, 3, W>, tile<1, 4, W>},
      {tile<2, 1, W>, tile<2, 2, W>, tile<2, 3, W>, tile<2, 4, W>},
  };
  return table[m - 1][n - 1];
}

// out[m][n] += the tile's dot products over [k0, k1): the even/odd bf16 tile where xp is given
template <typename W>
inline void run_tile(int m, int n, const float* x, int64_t ldx, const float* xp, int64_t ldxp,
                     const W* w, int64_t ldw, int64_t k0, int64_t k1, float (*out)[NR1]) {
  if constexpr (std::is_same_v<W, uint16_t>) {
    if (xp != nullptr) return tile_eo_fn(m, n)(x, ldx, xp, ldxp, w, ldw, k0, k1, out);
  }
  tile_fn<W>(m, n)(x, ldx, w, ldw, k0, k1, out);
}

template <typename W>
void block(const W* wp, int64_t ldw, const float* x, int64_t ldx, const float* xp, int64_t ldxp,
           const Band* bands, int nb, Flavour flavour, int64_t k_full, float* y, int64_t ldy,
           bool accumulate, const Block& b) {
  for (int32_t m0 = 0; m0 < b.rows; m0 += MR) {
    const int mr = std::min<int32_t>(MR, b.rows - m0);
    float out[MR][NR1] = {};
    const float* xm = x + int64_t(m0) * ldx;
    const float* xpm = xp == nullptr ? nullptr : xp + int64_t(m0) * ldxp;
    if (flavour == Flavour::OUT_PREFIX) {
      run_tile<W>(mr, b.nr, xm, ldx, xpm, ldxp, wp, ldw, 0, k_full, out);
    } else {  // narrowest K segment first: it spans every row, each wider one fewer rows
      for (int s = nb - 1; s >= 0; --s) {
        const int active = std::min<int32_t>(mr, bands[s].row_end - m0);
        if (active <= 0) continue;
        const int64_t lo = s + 1 < nb ? bands[s + 1].width : 0;
        run_tile<W>(active, b.nr, xm, ldx, xpm, ldxp, wp, ldw, lo, bands[s].width, out);
      }
    }
    for (int m = 0; m < mr; ++m) {
      float* yr = y + int64_t(m0 + m) * ldy + b.n0;
      for (int n = 0; n < b.nr; ++n) yr[n] = accumulate ? yr[n] + out[m][n] : out[m][n];
    }
  }
}

// A block of 16-bit weights: widened in registers for one x tile; for several, widened once
// into a per-thread fp32 panel that every tile then reads from L1.
template <typename W>
void narrow(const W* wp, int64_t ldw, const float* x, int64_t ldx, const float* xp, int64_t ldxp,
            const Band* bands, int nb, Flavour flavour, int64_t k_full, float* y, int64_t ldy,
            bool accumulate, const Block& b, float* (*scratch)(size_t)) {
  if (b.rows <= MR)
    return block(wp, ldw, x, ldx, xp, ldxp, bands, nb, flavour, k_full, y, ldy, accumulate, b);
  float* panel = scratch(size_t(b.nr) * size_t(k_full));
  for (int n = 0; n < b.nr; ++n) {
    const W* src = wp + n * ldw;
    float* dst = panel + n * k_full;
    int64_t k = 0;
    for (; k + 8 <= k_full; k += 8) _mm256_storeu_ps(dst + k, load8(src + k));
    for (; k < k_full; ++k) dst[k] = load1(src + k);
  }
  block(static_cast<const float*>(panel), k_full, x, ldx, nullptr, 0, bands, nb, flavour, k_full,
        y, ldy, accumulate, b);
}

}  // namespace

void run_blocks(const Mat& w, const float* x, int64_t ldx, const Band* bands, int nb,
                Flavour flavour, float* y, int64_t ldy, bool accumulate, const Block* blocks,
                int64_t nblocks, float* (*scratch)(size_t), const float* xp, int64_t ldxp) {
  const int64_t k_full = flavour == Flavour::OUT_PREFIX ? w.cols : bands[0].width;
#pragma omp for schedule(static)
  for (int64_t i = 0; i < nblocks; ++i) {
    const Block& b = blocks[i];
    if (w.dtype == DType::F32) {
      const float* wp = static_cast<const float*>(w.data) + int64_t(b.n0) * w.ld;
      block(wp, w.ld, x, ldx, nullptr, 0, bands, nb, flavour, k_full, y, ldy, accumulate, b);
      continue;
    }
    if (w.dtype == DType::F16) {  // F16C widens in registers at about the cost of a load
      narrow(static_cast<const Half*>(w.data) + int64_t(b.n0) * w.ld, w.ld, x, ldx, nullptr, 0,
             bands, nb, flavour, k_full, y, ldy, accumulate, b, scratch);
    } else {  // one bf16 row (xp given) widens in registers, even/odd
      narrow(static_cast<const uint16_t*>(w.data) + int64_t(b.n0) * w.ld, w.ld, x, ldx, xp, ldxp,
             bands, nb, flavour, k_full, y, ldy, accumulate, b, scratch);
    }
  }
}

#pragma GCC pop_options

}  // namespace es
