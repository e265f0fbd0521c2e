// Quantized band linears: checks, x quantization, scalar reference (generic code), then the
// AVX2 code (target region): each group's x quantization and the kernels.
#include "qlinear.h"
#include "simd.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>

namespace es {
namespace {

constexpr int QN = 4;  // weight rows per block: one x row's tile (two x rows take two each)

bool reads_lo(const QMat& w, bool q8) { return w.lo != nullptr && (q8 || w.q4_reads_lo); }

// Weight rows this far ahead of a tile are fetched while it computes: a q4 row is a few cache
// lines, too little for the hardware prefetchers to run far enough ahead of a DRAM stream.
constexpr int64_t PREFETCH_ROWS = 16;

// The groups a row of band b reads: all of K (OUT_PREFIX) or its prefix (IN_PREFIX).
int64_t band_groups(const QMat& w, const Band& band, Flavour flavour) {
  return flavour == Flavour::OUT_PREFIX ? w.groups : band.width / QGROUP;
}

}  // namespace

// qlinear.cpp's AVX2 region: one group of 32 floats quantized as the comment of quantize_x says
void quantize_group(const float* v, int8_t* q, int8_t* res, float& step, float& sum);

void quantize_x(const float* x, int64_t ldx, int64_t rows, int64_t groups, QuantX& out) {
  out.rows = rows, out.groups = groups;
  out.ldg = (groups + 7) / 8 * 8;
  out.ldq = out.ldg * QGROUP;
  out.q.assign(size_t(rows * out.ldq), 0);
  out.r.assign(size_t(rows * out.ldq), 0);
  out.d.assign(size_t(rows * out.ldg), 0.0f);
  out.s.assign(size_t(rows * out.ldg), 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g)
      quantize_group(x + r * ldx + g * QGROUP, out.q.data() + r * out.ldq + g * QGROUP,
                     out.r.data() + r * out.ldq + g * QGROUP, out.d[size_t(r * out.ldg + g)],
                     out.s[size_t(r * out.ldg + g)]);
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
            const size_t xi = size_t(r * x.ldq + g * QGROUP + i);
            dot += u * (int32_t(XRES) * x.q[xi] + x.r[xi]);
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
void run_qblocks_vnni(const QMat& w, bool lo, const QuantX& x, const Band* bands, int nb,
                      Flavour flavour, float* y, int64_t ldy, bool accumulate,
                      const Block* blocks, int64_t nblocks);

namespace {
std::atomic<bool> vnni_allowed{true};
}  // namespace

bool vnni_supported() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }();
  return yes;
}

bool use_vnni(bool allow) { return vnni_allowed.exchange(allow); }

void qlinear(const QMat& w, bool q8, const QuantX& x, const Band* bands, int nb, Flavour flavour,
             float* y, int64_t ldy, bool accumulate) {
  check_qbands(w, x, bands, nb, flavour);
  const bool lo = reads_lo(w, q8);
  if (bands[nb - 1].row_end >= QAMX_MIN_ROWS && amx_int8_active() && !omp_in_parallel())
    return qlinear_amx(w, lo, x, bands, nb, flavour, y, ldy, accumulate);
  const std::vector<Block> blocks = make_blocks(w.rows, bands, nb, flavour, QN);
  const int64_t n = int64_t(blocks.size());
  if (n == 0) return;
  const auto run = vnni_supported() && vnni_allowed ? run_qblocks_vnni : run_qblocks;
  if (omp_in_parallel()) {
    run(w, lo, x, bands, nb, flavour, y, ldy, accumulate, blocks.data(), n);
  } else {
#pragma omp parallel
    run(w, lo, x, bands, nb, flavour, y, ldy, accumulate, blocks.data(), n);
  }
}

// ---- AVX2 + FMA from here: nothing above may be instantiated below (no std containers).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

// Per group: d = max |x| / 127, q = round(x / d), r = clamp(round((x / d - q) XRES), +-127)
// (round to nearest even, as lrintf), step d / XRES and the float sum of the group.
void quantize_group(const float* v, int8_t* q, int8_t* res, float& step, float& sum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 x[4], amax = _mm256_setzero_ps(), total = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    x[i] = _mm256_loadu_ps(v + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, x[i]));
    total = _mm256_add_ps(total, x[i]);
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  t = _mm_add_ss(t, _mm_movehdup_ps(t));
  const float d = _mm_cvtss_f32(m) / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
  step = d / XRES, sum = _mm_cvtss_f32(t);
  const __m256 scale = _mm256_set1_ps(inv), xres = _mm256_set1_ps(float(XRES));
  const __m256i lim = _mm256_set1_epi32(127), neg = _mm256_set1_epi32(-127);
  __m256i qi[4], ri[4];
  for (int i = 0; i < 4; ++i) {
    const __m256 u = _mm256_mul_ps(x[i], scale);
    qi[i] = _mm256_cvtps_epi32(u);  // the current rounding mode: nearest even, as lrintf
    const __m256 rest = _mm256_mul_ps(_mm256_sub_ps(u, _mm256_cvtepi32_ps(qi[i])), xres);
    ri[i] = _mm256_max_epi32(neg, _mm256_min_epi32(lim, _mm256_cvtps_epi32(rest)));
  }
  // int32 -> int8 in order: the packs interleave 128-bit lanes, the permute undoes it
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const auto pack = [&](const __m256i* a) {
    const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(a[0], a[1]),
                                         _mm256_packs_epi32(a[2], a[3]));
    return _mm256_permutevar8x32_epi32(w, order);
  };
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), pack(qi));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(res), pack(ri));
}

namespace {

inline __m256i load32(const void* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// The int32 partial sums (8 lanes) of one group's dot: codes c (and residuals e) against q.
// (u . (XRES q + r)) for one group, u = c (q4) or 16 c + e (q8): each product pair is exact
// in int16 (vpmaddubsw), the weighting by 16 and XRES is in vpmaddwd's int16 factors.
template <bool LO>
inline __m256i group_dot(__m256i c, __m256i e, __m256i q, __m256i r) {
  const auto dot = [](__m256i codes, __m256i xs, int16_t times) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xs), _mm256_set1_epi16(times));
  };
  __m256i v = _mm256_add_epi32(dot(c, q, int16_t(XRES * (LO ? 16 : 1))), dot(c, r, LO ? 16 : 1));
  if constexpr (LO)
    v = _mm256_add_epi32(v, _mm256_add_epi32(dot(e, q, int16_t(XRES)), dot(e, r, 1)));
  return v;
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
        const int8_t* r = x.r.data() + (m0 + m) * x.ldq + g * QGROUP;
#pragma GCC unroll 4
        for (int n = 0; n < N; ++n) {
          __m256i pair = _mm256_setzero_si256();
          if (first) {
            const __m256i va = group_dot<LO>(ca[n], ea[n], load32(q), load32(r));
            const __m256i vb =
                second ? group_dot<LO>(cb[n], eb[n], load32(q + QGROUP), load32(r + QGROUP))
                       : _mm256_setzero_si256();
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
      const bool whole = cnt == 8;  // a masked load stalls far longer on a cache miss
      const __m256 d4 = whole ? _mm256_loadu_ps(w.scale + at) : _mm256_maskload_ps(w.scale + at, in);
      const __m256 m4 =
          whole ? _mm256_loadu_ps(w.minimum + at) : _mm256_maskload_ps(w.minimum + at, in);
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

struct Avx2 {
  template <int M, int N, bool LO>
  static void tile(const QMat& w, int64_t n0, const QuantX& x, int64_t m0, int64_t groups,
                   float (*out)[QN]) {
    qtile<M, N, LO>(w, n0, x, m0, groups, out);
  }
};

}  // namespace

// The blocks of one call, each in tiles of up to 2 x rows by QN weight rows (any ISA's tiles).
template <typename Isa, bool LO>
void qblock(const QMat& w, const QuantX& x, const Band* bands, int nb, Flavour flavour, float* y,
            int64_t ldy, bool accumulate, const Block& b) {
  for (int32_t n = 0; n < b.nr; ++n) prefetch_row(w, b.n0 + n + PREFETCH_ROWS, LO);
  int band = 0;
  for (int32_t m0 = 0; m0 < b.rows;) {
    while (bands[band].row_end <= m0) ++band;
    // OUT_PREFIX: every row reads all of K, two at a time; IN_PREFIX: a row reads its prefix
    int mr = 1;
    if (flavour == Flavour::OUT_PREFIX) mr = std::min<int32_t>(2, b.rows - m0);
    else if (m0 + 1 < b.rows && m0 + 1 < bands[band].row_end) mr = 2;
    float out[2][QN] = {};
    const int64_t groups = band_groups(w, bands[band], flavour);
    if (mr == 2) {
      for (int32_t n = 0; n < b.nr; n += 2) {
        float part[2][QN] = {};
        if (n + 1 < b.nr) Isa::template tile<2, 2, LO>(w, b.n0 + n, x, m0, groups, part);
        else Isa::template tile<2, 1, LO>(w, b.n0 + n, x, m0, groups, part);
        for (int m = 0; m < 2; ++m) out[m][n] = part[m][0], out[m][n + 1] = part[m][1];
      }
    } else {
      switch (b.nr) {
        case 4: Isa::template tile<1, 4, LO>(w, b.n0, x, m0, groups, out); break;
        case 3: Isa::template tile<1, 3, LO>(w, b.n0, x, m0, groups, out); break;
        case 2: Isa::template tile<1, 2, LO>(w, b.n0, x, m0, groups, out); break;
        default: Isa::template tile<1, 1, LO>(w, b.n0, x, m0, groups, out);
      }
    }
    for (int m = 0; m < mr; ++m) {
      float* yr = y + int64_t(m0 + m) * ldy + b.n0;
      for (int n = 0; n < b.nr; ++n) yr[n] = accumulate ? yr[n] + out[m][n] : out[m][n];
    }
    m0 += mr;
  }
}

// The call's blocks shared out on the OpenMP team, in one ISA's tiles.
template <typename Isa>
void run_blocks_with(const QMat& w, bool lo, const QuantX& x, const Band* bands, int nb,
                     Flavour flavour, float* y, int64_t ldy, bool accumulate,
                     const Block* blocks, int64_t nblocks) {
#pragma omp for schedule(static)
  for (int64_t i = 0; i < nblocks; ++i) {
    if (lo) qblock<Isa, true>(w, x, bands, nb, flavour, y, ldy, accumulate, blocks[i]);
    else qblock<Isa, false>(w, x, bands, nb, flavour, y, ldy, accumulate, blocks[i]);
  }
}

void run_qblocks(const QMat& w, bool lo, const QuantX& x, const Band* bands, int nb,
                 Flavour flavour, float* y, int64_t ldy, bool accumulate, const Block* blocks,
                 int64_t nblocks) {
  run_blocks_with<Avx2>(w, lo, x, bands, nb, flavour, y, ldy, accumulate, blocks, nblocks);
}

#pragma GCC pop_options

// ---- AVX-512 VNNI from here: vpdpbusd sums four u8 x s8 products into int32 without
// saturation, so a pair of groups (64 codes, one zmm) costs one instruction per x row, and a q8
// code (16 c + e, up to 255) goes in whole.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")

namespace {

// 64 codes of one pair from its 32 packed bytes: group 2p's (low nibbles) in the low half.
inline __m512i pair_codes(const uint8_t* p, __m512i shift, __m512i nib) {
  const __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_and_si512(_mm512_srlv_epi16(both, shift), nib);
}

template <int M, int N, bool LO>
void qtile512(const QMat& w, int64_t n0, const QuantX& x, int64_t m0, int64_t groups,
              float (*out)[QN]) {
  const __m512i nib = _mm512_set1_epi8(15);
  const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 half = _mm256_set1_ps(LO ? 0.5f : 0.0f);
  const __m256 step = _mm256_set1_ps(LO ? 1.0f / 16 : 1.0f);
  __m512i pick[4];  // lanes 0-7: group 2j's scale, lanes 8-15: group 2j + 1's
  for (int j = 0; j < 4; ++j)
    pick[j] = _mm512_inserti64x4(_mm512_set1_epi32(2 * j), _mm256_set1_epi32(2 * j + 1), 1);
  __m512 acc[M][N];
  __m256 mins[M][N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) acc[m][n] = _mm512_setzero_ps(), mins[m][n] = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < groups; c0 += 8) {
    const int64_t cnt = std::min<int64_t>(8, groups - c0);
    const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(cnt)), lane);
    __m512 scale[M][N];  // step x x scale of each group, as a zmm whose low 8 lanes hold them
    for (int n = 0; n < N; ++n) {
      const int64_t at = (n0 + n) * w.groups + c0;
      // whole chunks load plainly: a masked load stalls far longer on a cache miss here
      const bool whole = cnt == 8;
      const __m256 d4 = whole ? _mm256_loadu_ps(w.scale + at) : _mm256_maskload_ps(w.scale + at, in);
      const __m256 m4 =
          whole ? _mm256_loadu_ps(w.minimum + at) : _mm256_maskload_ps(w.minimum + at, in);
      const __m256 d = _mm256_mul_ps(d4, step);
      const __m256 mn = _mm256_fnmadd_ps(half, d4, m4);
      for (int m = 0; m < M; ++m) {
        const int64_t xg = (m0 + m) * x.ldg + c0;
        scale[m][n] = _mm512_castps256_ps512(_mm256_mul_ps(d, _mm256_loadu_ps(x.d.data() + xg)));
        mins[m][n] = _mm256_fmadd_ps(mn, _mm256_loadu_ps(x.s.data() + xg), mins[m][n]);
      }
    }
    for (int j = 0; j < 4 && 2 * j < cnt; ++j) {  // groups past cnt have scale 0
      const int64_t g = c0 + 2 * j;
      __m512i codes[N];
      for (int n = 0; n < N; ++n) {
        const int64_t at = (n0 + n) * w.ld + (g / 2) * QGROUP;
        codes[n] = pair_codes(w.hi + at, shift, nib);
        if constexpr (LO)
          codes[n] = _mm512_or_si512(_mm512_slli_epi16(codes[n], 4), pair_codes(w.lo + at, shift, nib));
      }
      for (int m = 0; m < M; ++m) {
        const int64_t xq = (m0 + m) * x.ldq + g * QGROUP;
        const __m512i q = _mm512_loadu_si512(x.q.data() + xq);
        const __m512i r = _mm512_loadu_si512(x.r.data() + xq);
        for (int n = 0; n < N; ++n) {  // u . (XRES q + r), XRES = 256: a shift
          const __m512i zero = _mm512_setzero_si512();
          const __m512i dot = _mm512_add_epi32(
              _mm512_slli_epi32(_mm512_dpbusd_epi32(zero, codes[n], q), 8),
              _mm512_dpbusd_epi32(zero, codes[n], r));
          const __m512 s = _mm512_permutexvar_ps(pick[j], scale[m][n]);
          acc[m][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[m][n]);
        }
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) out[m][n] = _mm512_reduce_add_ps(acc[m][n]) + hsum(mins[m][n]);
}

struct Vnni {
  template <int M, int N, bool LO>
  static void tile(const QMat& w, int64_t n0, const QuantX& x, int64_t m0, int64_t groups,
                   float (*out)[QN]) {
    qtile512<M, N, LO>(w, n0, x, m0, groups, out);
  }
};

}  // namespace

void run_qblocks_vnni(const QMat& w, bool lo, const QuantX& x, const Band* bands, int nb,
                      Flavour flavour, float* y, int64_t ldy, bool accumulate,
                      const Block* blocks, int64_t nblocks) {
  run_blocks_with<Vnni>(w, lo, x, bands, nb, flavour, y, ldy, accumulate, blocks, nblocks);
}

#pragma GCC pop_options

}  // namespace es
