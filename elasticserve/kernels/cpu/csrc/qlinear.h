// Elastic linears on q8 / q4 weights: nested nibble planes read in registers, int8 activations.
//
// A weight [N, K] is stored group-wise along K (groups of 32 columns) as an 8-bit code
// u = 16 c + e split into two planes (model/quant.py): q4 reads the high codes c only
// (value scale * c + minimum), q8 reads both (value scale / 16 * u + minimum - scale / 2).
// A plane row packs the groups in pairs: byte i of pair p holds column i of group 2p in its low
// nibble and column i of group 2p + 1 in its high one, so a K prefix of whole groups is a row
// prefix. The x rows are quantized per group (scale = max |x| / 127) in two int8 planes, the
// codes and their rounding residual (see XRES), plus the group's exact float sum for the
// minimum term; the dot of a group is exact in int32, eight groups are scaled at once in fp32.
#pragma once

#include <cstdint>
#include <vector>

#include "linear.h"
#include "simd.h"

namespace es {

constexpr int64_t QGROUP = 32;
// x is quantized in two int8 planes, q = round(x / step) and r = round((x / step - q) * XRES):
// 15 bits of activation for one more integer dot per group (int8 alone cost the default model
// 2 % perplexity at q4)
constexpr int32_t XRES = 256;

// the indices of model/shapes.py PRECISION_ORDER
enum class Precision : int32_t { DENSE = 0, Q8 = 1, Q4 = 2 };

struct QMat {
  const uint8_t* hi = nullptr;     // [rows, ld] high codes c
  const uint8_t* lo = nullptr;     // [rows, ld] residual codes e, or null: q8 reads as q4
  const float* scale = nullptr;    // [rows, groups] q4 step
  const float* minimum = nullptr;  // [rows, groups] q4 offset
  int64_t rows = 0, cols = 0, groups = 0, ld = 0;
  bool q4_reads_lo = false;  // a q4 row reads this weight at q8 (a re-quantized weight)
};

// Fetches weight row n (its code planes, both where `lo`, and its scales and minima) into L1;
// rows past the weight are skipped.
inline void prefetch_row(const QMat& w, int64_t n, bool lo) {
  if (n >= w.rows) return;
  const int64_t line = 64;
  for (int64_t b = 0; b < w.ld; b += line) {
    prefetch_l1(w.hi + n * w.ld + b);
    if (lo) prefetch_l1(w.lo + n * w.ld + b);
  }
  for (int64_t b = 0; b < w.groups * 4; b += line) {
    prefetch_l1(reinterpret_cast<const char*>(w.scale + n * w.groups) + b);
    prefetch_l1(reinterpret_cast<const char*>(w.minimum + n * w.groups) + b);
  }
}

// x rows as int8 per group: q and its residual r [rows, ldq], d (the step of XRES q + r) and s
// (the group's float sum) [rows, ldg] (ldg a multiple of 8, zero-padded)
struct QuantX {
  std::vector<int8_t> q, r;
  std::vector<float> d, s;
  int64_t rows = 0, groups = 0, ldq = 0, ldg = 0;
};

// Quantizes the first `groups` groups of `rows` rows of x (fp32, leading dimension ldx).
void quantize_x(const float* x, int64_t ldx, int64_t rows, int64_t groups, QuantX& out);

// y[r, n] (=|+=) sum_k x[r, k] * w[n, k] at q8 (`q8`) or q4, bands and flavours as `linear`;
// IN_PREFIX widths must be whole groups. x comes quantized (its groups cover the bands' K).
void qlinear(const QMat& w, bool q8, const QuantX& x, const Band* bands, int nbands,
             Flavour flavour, float* y, int64_t ldy, bool accumulate);

// The same product in scalar code (the tests' check of the SIMD kernel).
void qlinear_scalar(const QMat& w, bool q8, const QuantX& x, const Band* bands, int nbands,
                    Flavour flavour, float* y, int64_t ldy, bool accumulate);

// True when the CPU has AVX-512 VNNI: the quantized linears then run its kernels.
bool vnni_supported();

// Allows (or, for tests of the AVX2 kernels on a VNNI machine, forbids) the VNNI kernels;
// returns the previous setting.
bool use_vnni(bool allow);

// Steps of at least this many rows run the q8/q4 linears on AMX int8 tiles where present.
constexpr int32_t QAMX_MIN_ROWS = 4;

// `qlinear` on AMX int8 tiles (callers check amx_int8_active() and the bands); `lo`: the rows
// read both planes.
void qlinear_amx(const QMat& w, bool lo, const QuantX& x, const Band* bands, int nbands,
                 Flavour flavour, float* y, int64_t ldy, bool accumulate);

// Validates bands against a quantized weight and its quantized x (std::invalid_argument).
void check_qbands(const QMat& w, const QuantX& x, const Band* bands, int nbands, Flavour flavour);

}  // namespace es
