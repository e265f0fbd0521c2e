// Quantized band linears: checks, x quantization, scalar reference (generic code), then the
// AVX2 kernels (target region).
#include "qlinear.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace es {
namespace {

constexpr int QN = 2;  // weight rows per block

bool reads_lo(const QMat& w, bool q8) { return w.lo != nullptr && (q8 || w.q4_reads_lo); }

// The groups a row of band b reads: all of K (OUT_PREFIX) or its prefix (IN_PREFIX).
int64_t band_groups(const QMat& w, const Band& band, Flavour flavour) {
  return flavour == Flavour::OUT_PREFIX ? w.groups : band.width / QGROUP;
}

}  // namespace

void quantize_x(const float* x, int64_t ldx, int64_t rows, int64_t groups, QuantX& out) {
  out.rows = rows, out.groups = groups;
  out.ldg = (groups + 7) / 8 * 8;
  out.ldq = out.ldg * QGROUP;
  out.q.assign(size_t(rows * out.ldq), 0);
  out.d.assign(size_t(rows * out.ldg), 0.0f);
  out.s.assign(size_t(rows * out.ldg), 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const float* v = x + r * ldx + g * QGROUP;
      float amax = 0.0f, sum = 0.0f;
      for (int i = 0; i < QGROUP; ++i) amax = std::max(amax, std::fabs(v[i])), sum += v[i];
      const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
      int8_t* q = out.q.data() + r * out.ldq + g * QGROUP;
      for (int i = 0; i < QGROUP; ++i) q[i] = int8_t(std::lrintf(v[i] * inv));
      out.d[size_t(r * out.ldg + g)] = d;
      out.s[size_t(r * out.ldg + g)] = sum;
    }
}

void check_qbands(const QMat& w, const QuantX& x, const Band* bands, int nb, Flavour flavour) {
  Mat shape;  // the band rules of the dense kernels, on the same dimensions
  shape.rows = w.rows, shape.cols = w.cols;
  check_bands(shape, bands, nb, flavour);
  if (bands[nb - 1].row_end > x.rows)
    throw std::invalid_argument("bands: more rows than the quantized x has");
  for (int b = 0; b < nb; ++b) {
    if (flavour == Flavour::IN_PREFIX && bands[b].width % QGROUP != 0)
      throw std::invalid_argument("bands: a quantized input prefix must be whole groups of 32, got " +
                                  std::to_string(bands[b].width));
    if (band_groups(w, bands[b], flavour) > x.groups)
      throw std::invalid_argument("bands: the quantized x has too few groups");
  }
}

void qlinear_scalar(const QMat& w, bool q8, const QuantX& x, const Band* bands, int nb,
                    Flavour flavour, float* y, int64_t ldy, bool accumulate) {
  check_qbands(w, x, bands, nb, flavour);
  const bool lo = reads_lo(w, q8);
  int32_t start = 0;
  for (int b = 0; b < nb; ++b) {
    const int64_t n_out = flavour == Flavour::OUT_PREFIX ? bands[b].width : w.rows;
    const int64_t groups = band_groups(w, bands[b], flavour);
    for (int32_t r = start; r < bands[b].row_end; ++r)
      for (int64_t n = 0; n < n_out; ++n) {
        double sum = 0;
        for (int64_t g = 0; g < groups; ++g) {
          int32_t dot = 0;
          for (int i = 0; i < QGROUP; ++i) {
            const int64_t at = n * w.ld + (g / 2) * QGROUP + i;
            const int shift = (g % 2) * 4;
            const int32_t c = (w.hi[at] >> shift) & 15;
            const int32_t u = lo ? 16 * c + ((w.lo[at] >> shift) & 15) : c;
            dot += u * x.q[size_t(r * x.ldq + g * QGROUP + i)];
          }
          const double d4 = w.scale[n * w.groups + g], m4 = w.minimum[n * w.groups + g];
          const double dx = x.d[size_t(r * x.ldg + g)], sx = x.s[size_t(r * x.ldg + g)];
          sum += lo ? d4 / 16 * dx * dot + (m4 - d4 / 2) * sx : d4 * dx * dot + m4 * sx;
        }
        y[r * ldy + n] = float(accumulate ? y[r * ldy + n] + sum : sum);
      }
    start = bands[b].row_end;
  }
}

void run_qblocks(const QMat& w, bool lo, const QuantX& x, const Band* bands, int nb,
                 Flavour flavour, float* y, int64_t ldy, bool accumulate, const Block* blocks,
                 int64_t nblocks);

void qlinear(const QMat& w, bool q8, const QuantX& x, const Band* bands, int nb, Flavour flavour,
             float* y, int64_t ldy, bool accumulate) {
  check_qbands(w, x, bands, nb, flavour);
  const std::vector<Block> blocks = make_blocks(w.rows, bands, nb, flavour, QN);
  const int64_t n = int64_t(blocks.size());
  if (n == 0) return;
  const bool lo = reads_lo(w, q8);
  if (omp_in_parallel()) {
    run_qblocks(w, lo, x, bands, nb, flavour, y, ldy, accumulate, blocks.data(), n);
  } else {
#pragma omp parallel
    run_qblocks(w, lo, x, bands, nb, flavour, y, ldy, accumulate, blocks.data(), n);
  }
}

// ---- AVX2 + FMA from here: nothing above may be instantiated below (no std containers).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256i load32(const void* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// The int32 partial sums (8 lanes) of one group's dot: codes c (and residuals e) against q.
template <bool LO>
inline __m256i group_dot(__m256i c, __m256i e, __m256i q) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (LO) {
    const __m256i hi = _mm256_madd_epi16(_mm256_maddubs_epi16(c, q), _mm256_set1_epi16(16));
    return _mm256_add_epi32(hi, _mm256_madd_epi16(_mm256_maddubs_epi16(e, q), ones));
  } else {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(c, q), ones);
  }
}

// out[m][n] = the dot of x row m0 + m with weight row n0 + n over groups [0, groups).
// Eight groups at a time: four pairs of group dots, reduced by a tree of horizontal adds into
// one vector of eight group sums, which one FMA scales by the weight and x group scales.
template <int M, int N, bool LO>
void qtile(const QMat& w, int64_t n0, const QuantX& x, int64_t m0, int64_t groups,
           float (*out)[QN]) {
  const __m256i nib = _mm256_set1_epi8(15);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 half = _mm256_set1_ps(LO ? 0.5f : 0.0f);
  const __m256 step = _mm256_set1_ps(LO ? 1.0f / 16 : 1.0f);
  __m256 acc[M][N];
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < N; ++n) acc[m][n] = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < groups; c0 += 8) {
    const int64_t cnt = std::min<int64_t>(8, groups - c0);
    // pair dots are reduced as they come: two live vectors per (m, n), not four
    __m256i held[M][N], s01[M][N], s23[M][N];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const int64_t g = c0 + 2 * j;
      const bool first = g < c0 + cnt, second = g + 1 < c0 + cnt;
      __m256i ca[N], cb[N], ea[N], eb[N];
#pragma GCC unroll 4
      for (int n = 0; n < N; ++n) {
        ca[n] = cb[n] = ea[n] = eb[n] = _mm256_setzero_si256();
        if (!first) continue;
        const int64_t at = (n0 + n) * w.ld + (g / 2) * QGROUP;
        const __m256i h = load32(w.hi + at);
        ca[n] = _mm256_and_si256(h, nib);
        cb[n] = _mm256_and_si256(_mm256_srli_epi16(h, 4), nib);
        if constexpr (LO) {
          const __m256i l = load32(w.lo + at);
          ea[n] = _mm256_and_si256(l, nib);
          eb[n] = _mm256_and_si256(_mm256_srli_epi16(l, 4), nib);
        }
      }
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const int8_t* q = x.q.data() + (m0 + m) * x.ldq + g * QGROUP;
#pragma GCC unroll 4
        for (int n = 0; n < N; ++n) {
          __m256i pair = _mm256_setzero_si256();
          if (first) {
            const __m256i va = group_dot<LO>(ca[n], ea[n], load32(q));
            const __m256i vb =
                second ? group_dot<LO>(cb[n], eb[n], load32(q + QGROUP)) : _mm256_setzero_si256();
            pair = _mm256_hadd_epi32(va, vb);
          }
          if (j % 2 == 0) held[m][n] = pair;
          else if (j == 1) s01[m][n] = _mm256_hadd_epi32(held[m][n], pair);
          else s23[m][n] = _mm256_hadd_epi32(held[m][n], pair);
        }
      }
    }
    const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(cnt)), lane);
#pragma GCC unroll 4
    for (int n = 0; n < N; ++n) {
      const int64_t at = (n0 + n) * w.groups + c0;
      const __m256 d4 = _mm256_maskload_ps(w.scale + at, in);
      const __m256 m4 = _mm256_maskload_ps(w.minimum + at, in);
      const __m256 d = _mm256_mul_ps(d4, step);              // the step of the codes read
      const __m256 mn = _mm256_fnmadd_ps(half, d4, m4);      // their offset
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const __m256i a = s01[m][n], b = s23[m][n];
        const __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20),
                                              _mm256_permute2x128_si256(a, b, 0x31));
        const int64_t xg = (m0 + m) * x.ldg + c0;
        const __m256 dx = _mm256_loadu_ps(x.d.data() + xg);
        const __m256 sx = _mm256_loadu_ps(x.s.data() + xg);
        acc[m][n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(d, dx), acc[m][n]);
        acc[m][n] = _mm256_fmadd_ps(mn, sx, acc[m][n]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) out[m][n] = hsum(acc[m][n]);
}

template <bool LO>
void qtile_any(int m, int n, const QMat& w, int64_t n0, const QuantX& x, int64_t m0,
               int64_t groups, float (*out)[QN]) {
  if (m == 2) return n == 2 ? qtile<2, 2, LO>(w, n0, x, m0, groups, out)
                            : qtile<2, 1, LO>(w, n0, x, m0, groups, out);
  return n == 2 ? qtile<1, 2, LO>(w, n0, x, m0, groups, out)
                : qtile<1, 1, LO>(w, n0, x, m0, groups, out);
}

template <bool LO>
void qblock(const QMat& w, const QuantX& x, const Band* bands, int nb, Flavour flavour, float* y,
            int64_t ldy, bool accumulate, const Block& b) {
  int band = 0;
  for (int32_t m0 = 0; m0 < b.rows;) {
    while (bands[band].row_end <= m0) ++band;
    // OUT_PREFIX: every row reads all of K, two at a time; IN_PREFIX: a row reads its prefix
    int mr = 1;
    if (flavour == Flavour::OUT_PREFIX) mr = std::min<int32_t>(2, b.rows - m0);
    else if (m0 + 1 < b.rows && m0 + 1 < bands[band].row_end) mr = 2;
    float out[2][QN] = {};
    qtile_any<LO>(mr, b.nr, w, b.n0, x, m0, band_groups(w, bands[band], flavour), out);
    for (int m = 0; m < mr; ++m) {
      float* yr = y + int64_t(m0 + m) * ldy + b.n0;
      for (int n = 0; n < b.nr; ++n) yr[n] = accumulate ? yr[n] + out[m][n] : out[m][n];
    }
    m0 += mr;
  }
}

}  // namespace

void run_qblocks(const QMat& w, bool lo, const QuantX& x, const Band* bands, int nb,
                 Flavour flavour, float* y, int64_t ldy, bool accumulate, const Block* blocks,
                 int64_t nblocks) {
#pragma omp for schedule(static)
  for (int64_t i = 0; i < nblocks; ++i) {
    if (lo) qblock<true>(w, x, bands, nb, flavour, y, ldy, accumulate, blocks[i]);
    else qblock<false>(w, x, bands, nb, flavour, y, ldy, accumulate, blocks[i]);
  }
}

#pragma GCC pop_options

}  // namespace es
