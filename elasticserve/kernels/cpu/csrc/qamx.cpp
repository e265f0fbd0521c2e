// Quantized band linears on AMX int8 tiles (Sapphire Rapids and later), for steps of several rows.
//
// TDPBUSD multiplies u8 by s8 and sums in int32, which is what the q8/q4 group dots are: the
// weight codes (c, or u = 16 c + e at q8) are the u8 A operand, the x planes q and r the s8 B
// operand. Each weight group (32 columns) has its own scale, so a C tile covers one group: per
// group, one A tile (16 weight rows x 32 codes, unpacked from the nibble planes once per block
// into per-thread scratch), two products (q and r) and their scaling into fp32 accumulators held
// in registers (16 weight rows x 16 x rows). x is packed per call: per x tile (16 rows) and group,
// the two B tiles in their 4-byte pair layout and the group's steps and sums across the 16 rows;
// x rows past the bands and groups past a row's IN_PREFIX width are zero. Blocks of fewer than 16
// weight rows run the VNNI (or AVX2) code.
#include "qlinear.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace es {

// qlinear.cpp: the VNNI and AVX2 blocks (orphaned `omp for`)
void run_qblocks(const QMat& w, bool lo, const QuantX& x, const Band* bands, int nb,
                 Flavour flavour, float* y, int64_t ldy, bool accumulate, const Block* blocks,
                 int64_t nblocks);
void run_qblocks_vnni(const QMat& w, bool lo, const QuantX& x, const Band* bands, int nb,
                      Flavour flavour, float* y, int64_t ldy, bool accumulate,
                      const Block* blocks, int64_t nblocks);

namespace {

constexpr int TN = 16;  // weight rows per A tile (C rows)
constexpr int TX = 16;  // x rows per B tile (C columns)
constexpr int32_t REST_ROWS = 4;  // weight rows per VNNI block (qlinear.cpp's QN)
// per x tile and group: Bq and Br (8 rows x 16 columns of 4 bytes each), the steps, the sums
constexpr int64_t B_WORDS = 8 * TX;
constexpr int64_t GROUP_WORDS = 2 * B_WORDS + 2 * TX;
static_assert(XRES == 256, "the tile kernel combines the planes as (q << 8) + r");

int64_t groups_of(const QMat& w, const Band& band, Flavour flavour) {
  return flavour == Flavour::OUT_PREFIX ? w.groups : band.width / QGROUP;
}

// Groups alternate between two tile sets, so one group's products run while the previous one's
// are scaled: tmm0 / tmm3: A (16 weight rows x 32 codes); tmm1, tmm2: B (x codes, x residuals);
// tmm4, tmm5 / tmm6, tmm7: C (codes . q, codes . r)
TileConfig tile_config() {
  TileConfig c;
  for (int t : {0, 3}) c.rows[t] = TN, c.colsb[t] = QGROUP;
  for (int t : {1, 2}) c.rows[t] = QGROUP / 4, c.colsb[t] = 4 * TX;
  for (int t : {4, 5, 6, 7}) c.rows[t] = TN, c.colsb[t] = 4 * TX;
  return c;
}

uint32_t* shared_buffer(size_t words) {  // the caller's: its pointer is shared with the team
  thread_local std::vector<uint32_t> buf;
  if (buf.size() < words + 16) buf.resize(words + 16);
  const auto p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<uint32_t*>((p + 63) / 64 * 64);
}

uint8_t* code_scratch(size_t bytes) {  // each thread's unpacked weight codes
  thread_local std::vector<uint8_t> buf;
  if (buf.size() < bytes + 64) buf.resize(bytes + 64);
  const auto p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<uint8_t*>((p + 63) / 64 * 64);
}

// x tile `tile`: per group, B tiles of q and r (B[i][j] = bytes 4i..4i+3 of row j's group),
// then the 16 rows' steps and sums
void pack_qx(const QuantX& x, const Band* bands, int nb, Flavour flavour, const QMat& w,
             int64_t groups, int64_t tile, uint32_t* xb) {
  uint32_t* out = xb + tile * groups * GROUP_WORDS;
  std::memset(out, 0, size_t(groups * GROUP_WORDS) * sizeof(uint32_t));
  const int32_t rows = bands[nb - 1].row_end;
  int b = 0;
  for (int j = 0; j < TX; ++j) {
    const int32_t r = int32_t(tile * TX + j);
    if (r >= rows) break;
    while (bands[b].row_end <= r) ++b;
    const int64_t used = std::min(groups, groups_of(w, bands[b], flavour));
    for (int64_t g = 0; g < used; ++g) {
      uint32_t* at = out + g * GROUP_WORDS;
      uint32_t q[8], res[8];
      std::memcpy(q, x.q.data() + r * x.ldq + g * QGROUP, sizeof q);
      std::memcpy(res, x.r.data() + r * x.ldq + g * QGROUP, sizeof res);
      for (int i = 0; i < 8; ++i) at[i * TX + j] = q[i], at[B_WORDS + i * TX + j] = res[i];
      float* f = reinterpret_cast<float*>(at + 2 * B_WORDS);
      f[j] = x.d[size_t(r * x.ldg + g)], f[TX + j] = x.s[size_t(r * x.ldg + g)];
    }
  }
}

void run_tiles(const QMat& w, bool lo, float* y, int64_t ldy, bool accumulate,
               const Block* tiles, int64_t ntiles, const uint32_t* xb, int64_t groups);

}  // namespace

void qlinear_amx(const QMat& w, bool lo, const QuantX& x, const Band* bands, int nb,
                 Flavour flavour, float* y, int64_t ldy, bool accumulate) {
  std::vector<Block> tiles, rest;
  for (const Block& b : make_blocks(w.rows, bands, nb, flavour, TN)) {
    if (b.nr == TN) {
      tiles.push_back(b);
      continue;
    }
    for (int32_t n0 = 0; n0 < b.nr; n0 += REST_ROWS)
      rest.push_back({b.n0 + n0, std::min(REST_ROWS, b.nr - n0), b.rows});
  }
  if (tiles.empty() && rest.empty()) return;
  const int32_t rows = bands[nb - 1].row_end;
  const int64_t groups = groups_of(w, bands[0], flavour);  // the widest row's
  const int64_t xtiles = (rows + TX - 1) / TX;
  uint32_t* xb = shared_buffer(size_t(xtiles * groups * GROUP_WORDS));
  const auto others = vnni_supported() ? run_qblocks_vnni : run_qblocks;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < xtiles; ++t) pack_qx(x, bands, nb, flavour, w, groups, t, xb);
    run_tiles(w, lo, y, ldy, accumulate, tiles.data(), int64_t(tiles.size()), xb, groups);
    if (!rest.empty())
      others(w, lo, x, bands, nb, flavour, y, ldy, accumulate, rest.data(), int64_t(rest.size()));
  }
}

// ---- AMX + AVX-512 from here: nothing above may be instantiated below (no std containers).
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

namespace {

// Weight rows [n0, n0 + 16) as u8 codes in K order, `groups` groups (rounded up to a pair)
template <bool LO>
void unpack_codes(const QMat& w, int64_t n0, int64_t groups, uint8_t* codes, int64_t ldc) {
  const __m256i nib = _mm256_set1_epi8(15);
  for (int n = 0; n < TN; ++n)
    for (int64_t p = 0; 2 * p < groups; ++p) {
      const int64_t at = (n0 + n) * w.ld + p * QGROUP;
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.hi + at));
      __m256i a = _mm256_and_si256(h, nib), b = _mm256_and_si256(_mm256_srli_epi16(h, 4), nib);
      if constexpr (LO) {
        const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.lo + at));
        a = _mm256_or_si256(_mm256_slli_epi16(a, 4), _mm256_and_si256(l, nib));
        b = _mm256_or_si256(_mm256_slli_epi16(b, 4), _mm256_and_si256(_mm256_srli_epi16(l, 4), nib));
      }
      uint8_t* out = codes + n * ldc + 2 * p * QGROUP;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), a);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + QGROUP), b);
    }
}

// y rows [0, b.rows) x weight rows [b.n0, b.n0 + 16), x tile by x tile
template <bool LO>
void tile_block(const QMat& w, float* y, int64_t ldy, bool accumulate, const Block& b,
                const uint32_t* xb, int64_t groups) {
  const int64_t ldc = (groups + 1) / 2 * 2 * QGROUP;
  uint8_t* codes = code_scratch(size_t(TN * ldc));
  unpack_codes<LO>(w, b.n0, groups, codes, ldc);
  // the next block's rows are fetched while this one computes, a share of them per group: the
  // unpacking reads a block at once, and a DRAM stall there had been a fifth of the kernel
  const int64_t rows_per_group = (TN + groups - 1) / groups;
  const __m512 step = _mm512_set1_ps(LO ? 1.0f / 16 : 1.0f);
  const __m512 half = _mm512_set1_ps(LO ? 0.5f : 0.0f);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  alignas(64) int32_t cq[2][TN][TX], cr[2][TN][TX];
  alignas(64) float out[TN][TX];
  // group g's two products into tile set g % 2, stored to its buffers
  const auto products = [&](const uint32_t* xt, int64_t g) {
    const uint32_t* at = xt + g * GROUP_WORDS;
    const int64_t set = g % 2;
    if (set == 0) {
      _tile_loadd(0, codes + g * QGROUP, ldc);
      _tile_loadd(1, at, 4 * TX);
      _tile_loadd(2, at + B_WORDS, 4 * TX);
      _tile_zero(4);
      _tile_zero(5);
      _tile_dpbusd(4, 0, 1);
      _tile_dpbusd(5, 0, 2);
      _tile_stored(4, cq[0], 4 * TX);
      _tile_stored(5, cr[0], 4 * TX);
    } else {
      _tile_loadd(3, codes + g * QGROUP, ldc);
      _tile_loadd(1, at, 4 * TX);
      _tile_loadd(2, at + B_WORDS, 4 * TX);
      _tile_zero(6);
      _tile_zero(7);
      _tile_dpbusd(6, 3, 1);
      _tile_dpbusd(7, 3, 2);
      _tile_stored(6, cq[1], 4 * TX);
      _tile_stored(7, cr[1], 4 * TX);
    }
  };
  for (int64_t t = 0; t * TX < b.rows; ++t) {
    __m512 acc[TN];
    for (int n = 0; n < TN; ++n) acc[n] = _mm512_setzero_ps();
    const uint32_t* xt = xb + t * groups * GROUP_WORDS;
    products(xt, 0);
    for (int64_t g = 0; g < groups; ++g) {
      if (g + 1 < groups) products(xt, g + 1);
      for (int64_t r = g * rows_per_group; t == 0 && r < (g + 1) * rows_per_group && r < TN; ++r)
        prefetch_row(w, b.n0 + TN + r, LO);
      const uint32_t* at = xt + g * GROUP_WORDS;
      const int64_t set = g % 2;
      const __m512 dx = _mm512_loadu_ps(reinterpret_cast<const float*>(at + 2 * B_WORDS));
      const __m512 sx = _mm512_loadu_ps(reinterpret_cast<const float*>(at + 2 * B_WORDS) + TX);
      // the 16 rows' scales of group g (a column of the [rows, groups] tables)
      const __m512i idx = _mm512_mullo_epi32(lane, _mm512_set1_epi32(int32_t(w.groups)));
      const int64_t base = int64_t(b.n0) * w.groups + g;
      const __m512 d4 = _mm512_i32gather_ps(idx, w.scale + base, 4);
      const __m512 m4 = _mm512_i32gather_ps(idx, w.minimum + base, 4);
      alignas(64) float dw[TN], mw[TN];
      _mm512_store_ps(dw, _mm512_mul_ps(d4, step));
      _mm512_store_ps(mw, _mm512_fnmadd_ps(half, d4, m4));
#pragma GCC unroll 16
      for (int n = 0; n < TN; ++n) {
        const __m512i dot = _mm512_add_epi32(
            _mm512_slli_epi32(_mm512_load_si512(cq[set][n]), 8), _mm512_load_si512(cr[set][n]));
        acc[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(_mm512_set1_ps(dw[n]), dx),
                                 acc[n]);
        acc[n] = _mm512_fmadd_ps(_mm512_set1_ps(mw[n]), sx, acc[n]);
      }
    }
    for (int n = 0; n < TN; ++n) _mm512_store_ps(out[n], acc[n]);
    const int64_t m = std::min<int64_t>(TX, b.rows - t * TX);
    for (int64_t j = 0; j < m; ++j) {
      float* yr = y + (t * TX + j) * ldy + b.n0;
      for (int n = 0; n < TN; ++n) yr[n] = accumulate ? yr[n] + out[n][j] : out[n][j];
    }
  }
}

void run_tiles(const QMat& w, bool lo, float* y, int64_t ldy, bool accumulate,
               const Block* tiles, int64_t ntiles, const uint32_t* xb, int64_t groups) {
  static const TileConfig config = tile_config();
  _tile_loadconfig(&config);
#pragma omp for schedule(static) nowait
  for (int64_t i = 0; i < ntiles; ++i) {
    if (lo) tile_block<true>(w, y, ldy, accumulate, tiles[i], xb, groups);
    else tile_block<false>(w, y, ldy, accumulate, tiles[i], xb, groups);
  }
  _tile_release();
}

}  // namespace

#pragma GCC pop_options

}  // namespace es
