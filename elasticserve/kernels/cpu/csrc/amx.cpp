// Band linears on bf16 weights with AMX tiles (Sapphire Rapids and later), chosen at run time.
//
// The weights stay in their row-major [N, K] layout: an A tile is 16 weight rows x 32 columns,
// loaded with the matrix's own stride, so both prefix flavours slice it as they slice the AVX2
// kernels' input. x is the B operand, packed per call in the pair layout TDPBF16PS reads and split
// in two bf16 halves, x = hi + lo (lo = bf16(x - hi)): columns 0..7 of a B tile are eight x rows'
// high halves, columns 8..15 their low halves, so one tile product gives every row ~16 bits of
// activation mantissa (fp32-grade sums, as the AVX2 kernels' fp32 math) at no extra tile work.
// IN_PREFIX rows are zeroed past their width, so every row runs over the widest K and the bands
// need no segments. Blocks of fewer than 16 weight rows, and the columns past the last whole
// 32-column step, run on the AVX2 code.
#include "linear.h"

#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

namespace es {

// linear.cpp: the AVX2 blocks (orphaned `omp for`) and their even/odd copy of x
void run_blocks(const Mat& w, const float* x, int64_t ldx, const Band* bands, int nb,
                Flavour flavour, float* y, int64_t ldy, bool accumulate, const Block* blocks,
                int64_t nblocks, float* (*scratch)(size_t), const float* xp, int64_t ldxp);
float* thread_scratch(size_t n);
const float* even_odd(const float* x, int64_t ldx, int64_t rows, int64_t k, int64_t& ldxp);

namespace {

constexpr int TN = 16;     // weight rows per A tile
constexpr int TK = 32;     // bf16 columns per tile step (16 pairs)
constexpr int XROWS = 8;   // x rows per B tile (their hi and lo halves fill its 16 columns)
constexpr int TILE_WORDS = 16 * 16;  // one B tile: 16 pair rows x 16 columns of bf16 pairs
constexpr int PREFETCH_STEPS = 8;    // tile steps ahead the weight rows are fetched
constexpr int32_t REST_ROWS = 4;     // weight rows per AVX2 block (linear.cpp's NR)

std::atomic<bool> amx_allowed{true};

// tmm0: A (16 weight rows x 32 bf16); tmm1, tmm2: B (two x tiles); tmm4, tmm5: C (fp32)
TileConfig tile_config() {
  TileConfig c;
  for (int t : {0, 1, 2, 4, 5}) c.rows[t] = 16, c.colsb[t] = 64;
  return c;
}

bool cpu_has_amx_bf16() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tiles = (d >> 24) & 1, bf16_tiles = (d >> 22) & 1;
  return tiles && bf16_tiles && cpu_has_avx512_bf16();
}

bool cpu_has_amx_int8() {  // with the AVX-512 VNNI the quantized kernels' other code uses
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tiles = (d >> 24) & 1, int8_tiles = (d >> 25) & 1, avx512f = (b >> 16) & 1;
  const bool avx512bw = (b >> 30) & 1, avx512vl = (b >> 31) & 1, vnni = (c >> 11) & 1;
  return tiles && int8_tiles && avx512f && avx512bw && avx512vl && vnni;
}

bool request_tile_state() {  // Linux gives a process the tile registers on request only
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

// Per-thread scratch of x packed for the tiles: [tiles][steps][16 pairs][16 columns] words.
uint32_t* pack_buffer(size_t words) {
  thread_local std::vector<uint32_t, std::allocator<uint32_t>> buf;
  if (buf.size() < words + 16) buf.resize(words + 16);
  const auto p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<uint32_t*>((p + 63) / 64 * 64);
}

void run_amx(const Mat& w, const float* x, int64_t ldx, const Band* bands, int nb,
             Flavour flavour, float* y, int64_t ldy, bool accumulate, const Block* tiles,
             int64_t ntiles, const Block* rest, int64_t nrest, const uint32_t* xb,
             int64_t steps, const float* xp, int64_t ldxp);
void pack_x(const float* x, int64_t ldx, const Band* bands, int nb, Flavour flavour, int64_t k,
            int64_t steps, int64_t tile, uint32_t* xb);

}  // namespace

bool cpu_has_avx512_bf16() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((b >> 16) & 1)) return false;  // AVX-512F
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return (a >> 5) & 1;
}

bool amx_supported() {
  static const bool yes = cpu_has_amx_bf16() && request_tile_state();
  return yes;
}

bool use_amx(bool allow) { return amx_allowed.exchange(allow); }

bool amx_active() { return amx_allowed && amx_supported(); }

bool amx_int8_supported() {
  static const bool yes = cpu_has_amx_int8() && request_tile_state();
  return yes;
}

bool amx_int8_active() { return amx_allowed && amx_int8_supported(); }

void linear_amx(const Mat& w, const float* x, int64_t ldx, const Band* bands, int nb,
                Flavour flavour, float* y, int64_t ldy, bool accumulate) {
  const int32_t rows = bands[nb - 1].row_end;
  std::vector<Block> tiles, rest;
  for (const Block& b : make_blocks(w.rows, bands, nb, flavour, TN)) {
    if (b.nr == TN) {
      tiles.push_back(b);
      continue;
    }
    for (int32_t n0 = 0; n0 < b.nr; n0 += REST_ROWS)  // the AVX2 tiles' block size
      rest.push_back({b.n0 + n0, std::min(REST_ROWS, b.nr - n0), b.rows});
  }
  if (tiles.empty() && rest.empty()) return;
  const int64_t k_full = flavour == Flavour::OUT_PREFIX ? w.cols : bands[0].width;
  const int64_t steps = k_full / TK, xtiles = (rows + XROWS - 1) / XROWS;
  uint32_t* xb = pack_buffer(size_t(xtiles * steps * TILE_WORDS));
  int64_t ldxp = 0;
  const float* xp = nullptr;  // the AVX2 blocks' even/odd copy for one or two rows
  if (!rest.empty() && rows <= 2) xp = even_odd(x, ldx, rows, k_full, ldxp);
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < xtiles; ++t) pack_x(x, ldx, bands, nb, flavour, k_full, steps, t, xb);
    run_amx(w, x, ldx, bands, nb, flavour, y, ldy, accumulate, tiles.data(),
            int64_t(tiles.size()), rest.data(), int64_t(rest.size()), xb, steps, xp, ldxp);
  }
}

// ---- AMX + AVX-512 from here: nothing above may be instantiated below (no std containers).
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")

namespace {

// 16 fp32 -> 16 bf16 (round to nearest even), and back
inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
inline __m512 from_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// x tile `tile` (rows 8 tile ..): per step, the 32 columns of each row as 16 bf16 pairs, high
// halves in columns 0..7, low halves in 8..15; rows past the bands' rows and columns past a
// row's width are zero.
void pack_x(const float* x, int64_t ldx, const Band* bands, int nb, Flavour flavour, int64_t k,
            int64_t steps, int64_t tile, uint32_t* xb) {
  uint32_t* out = xb + tile * steps * TILE_WORDS;
  std::memset(out, 0, size_t(steps) * TILE_WORDS * sizeof(uint32_t));
  const int32_t rows = bands[nb - 1].row_end;
  const __m512i stride = _mm512_mullo_epi32(_mm512_set1_epi32(16), _mm512_set_epi32(
      15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
  int b = 0;
  for (int j = 0; j < XROWS; ++j) {
    const int32_t r = int32_t(tile * XROWS + j);
    if (r >= rows) break;
    while (bands[b].row_end <= r) ++b;
    const int64_t width = flavour == Flavour::IN_PREFIX ? bands[b].width : k;
    const int64_t used = std::min(width, steps * TK);
    for (int64_t s = 0; s * TK < used; ++s) {
      const int64_t k0 = s * TK;
      const int64_t n = std::min<int64_t>(TK, used - k0);
      const __mmask16 m0 = n >= 16 ? 0xffff : __mmask16((1u << n) - 1);
      const __mmask16 m1 = n <= 16 ? 0 : n >= 32 ? 0xffff : __mmask16((1u << (n - 16)) - 1);
      const __m512 v0 = _mm512_maskz_loadu_ps(m0, x + r * ldx + k0);
      const __m512 v1 = _mm512_maskz_loadu_ps(m1, x + r * ldx + k0 + 16);
      const __m256i h0 = to_bf16(v0), h1 = to_bf16(v1);
      const __m256i l0 = to_bf16(_mm512_sub_ps(v0, from_bf16(h0)));
      const __m256i l1 = to_bf16(_mm512_sub_ps(v1, from_bf16(h1)));
      // 32 bf16 in column order are 16 pairs: word p holds columns 2p, 2p + 1
      const __m512i hi = _mm512_inserti64x4(_mm512_castsi256_si512(h0), h1, 1);
      const __m512i lo = _mm512_inserti64x4(_mm512_castsi256_si512(l0), l1, 1);
      uint32_t* at = out + s * TILE_WORDS;
      _mm512_i32scatter_epi32(at + j, stride, hi, 4);
      _mm512_i32scatter_epi32(at + XROWS + j, stride, lo, 4);
    }
  }
}

inline float bf16_dot(const float* x, const uint16_t* w, int64_t k0, int64_t k1) {
  float s = 0;
  for (int64_t k = k0; k < k1; ++k) s += x[k] * bf16_to_float(w[k]);
  return s;
}

// y rows [0, b.rows) x weight rows [b.n0, b.n0 + 16): the tiles over whole steps, the rest of
// each row's K in scalar code
void tile_block(const Mat& w, const float* x, int64_t ldx, const Band* bands, Flavour flavour,
                float* y, int64_t ldy, bool accumulate, const Block& b, const uint32_t* xb,
                int64_t steps) {
  const uint16_t* wp = static_cast<const uint16_t*>(w.data) + int64_t(b.n0) * w.ld;
  const int64_t ldw = w.ld * int64_t(sizeof(uint16_t));
  const int64_t xtiles = (b.rows + XROWS - 1) / XROWS;
  const int64_t k_full = flavour == Flavour::OUT_PREFIX ? w.cols : bands[0].width;
  alignas(64) float c[2][TN][16];
  int band = 0;
  for (int64_t t0 = 0; t0 < xtiles; t0 += 2) {
    const bool two = t0 + 1 < xtiles;
    const uint32_t* b0 = xb + t0 * steps * TILE_WORDS;
    const uint32_t* b1 = b0 + steps * TILE_WORDS;
    _tile_zero(4);
    _tile_zero(5);
    for (int64_t s = 0; s < steps; ++s) {
      if (s + PREFETCH_STEPS < steps)
        for (int n = 0; n < TN; ++n)
          _mm_prefetch(reinterpret_cast<const char*>(wp + n * w.ld + (s + PREFETCH_STEPS) * TK),
                       _MM_HINT_T0);
      _tile_loadd(0, wp + s * TK, ldw);
      _tile_loadd(1, b0 + s * TILE_WORDS, 64);
      _tile_dpbf16ps(4, 0, 1);
      if (two) {
        _tile_loadd(2, b1 + s * TILE_WORDS, 64);
        _tile_dpbf16ps(5, 0, 2);
      }
    }
    _tile_stored(4, c[0], 64);
    _tile_stored(5, c[1], 64);
    for (int tt = 0; tt < (two ? 2 : 1); ++tt)
      for (int j = 0; j < XROWS; ++j) {
        const int32_t r = int32_t((t0 + tt) * XROWS + j);
        if (r >= b.rows) break;
        while (bands[band].row_end <= r) ++band;
        const int64_t width = flavour == Flavour::IN_PREFIX ? bands[band].width : k_full;
        const float* xr = x + r * ldx;
        float* yr = y + r * ldy + b.n0;
        for (int n = 0; n < TN; ++n) {
          float v = c[tt][n][j] + c[tt][n][XROWS + j];
          if (width > steps * TK) v += bf16_dot(xr, wp + n * w.ld, steps * TK, width);
          yr[n] = accumulate ? yr[n] + v : v;
        }
      }
  }
}

void run_amx(const Mat& w, const float* x, int64_t ldx, const Band* bands, int nb,
             Flavour flavour, float* y, int64_t ldy, bool accumulate, const Block* tiles,
             int64_t ntiles, const Block* rest, int64_t nrest, const uint32_t* xb,
             int64_t steps, const float* xp, int64_t ldxp) {
  static const TileConfig config = tile_config();
  _tile_loadconfig(&config);
#pragma omp for schedule(static) nowait
  for (int64_t i = 0; i < ntiles; ++i)
    tile_block(w, x, ldx, bands, flavour, y, ldy, accumulate, tiles[i], xb, steps);
  _tile_release();
  if (nrest > 0)
    run_blocks(w, x, ldx, bands, nb, flavour, y, ldy, accumulate, rest, nrest, thread_scratch,
               xp, ldxp);
}

}  // namespace

#pragma GCC pop_options

}  // namespace es
