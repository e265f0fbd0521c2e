// Elastic linears on prefix-sliceable weights: any mix of widths in one pass over the weights.
//
// Rows of a step come sorted widest first and grouped in bands: rows [prev_end, row_end) keep
// `width` output features (OUT_PREFIX: q/k/v, gate, up, the LM head) or input features
// (IN_PREFIX: o, down). Weights are row-major [N, K] in fp32 or bf16; math is fp32. Each weight
// row is read once per call whatever the mix: the rows that keep it share the read.
#pragma once

#include <cstdint>
#include <vector>

namespace es {

enum class DType : int32_t { F32 = 0, BF16 = 1, F16 = 2 };

struct Mat {  // a row-major weight [rows, cols] with leading dimension ld (elements)
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0, ld = 0;
};

struct Band {  // rows [previous row_end, row_end) keep `width` features; widths strictly decrease
  int32_t row_end;
  int32_t width;
};

enum class Flavour : int32_t { OUT_PREFIX = 0, IN_PREFIX = 1 };

struct Block {  // weight rows [n0, n0 + nr) against x rows [0, rows)
  int32_t n0, nr, rows;
};

// The work items of one call: blocks of `nr` weight rows, each with the x rows that keep them.
std::vector<Block> make_blocks(int64_t w_rows, const Band* bands, int nbands, Flavour flavour,
                               int32_t nr);

// y[r, n] (=|+=) sum_k x[r, k] * w[n, k] over the prefix each band keeps.
// OUT_PREFIX: n < width(r), k < w.cols; columns of y past a row's width are left untouched.
// IN_PREFIX:  n < w.rows,   k < width(r).
// Runs on the calling thread's OpenMP team when called inside a parallel region (orphaned
// `omp for`), else opens its own.
void linear(const Mat& w, const float* x, int64_t ldx, const Band* bands, int nbands,
            Flavour flavour, float* y, int64_t ldy, bool accumulate);

// The same with no vector instructions: the check of the SIMD kernel in tests.
void linear_scalar(const Mat& w, const float* x, int64_t ldx, const Band* bands, int nbands,
                   Flavour flavour, float* y, int64_t ldy, bool accumulate);

// Validates bands against the weight (throws std::invalid_argument naming the bad value).
void check_bands(const Mat& w, const Band* bands, int nbands, Flavour flavour);

// True when the CPU runs the kernels' instructions (AVX2, FMA, F16C).
bool cpu_supported();

// True when the CPU computes bf16 natively: AVX-512F with AVX512-BF16 (CPUID, amx.cpp).
bool cpu_has_avx512_bf16();

// True when the CPU has AMX-BF16 (with AVX-512 BF16) and the OS grants this process the tile
// registers: bf16 weights then run on AMX tiles (amx.cpp).
bool amx_supported();

// Allows (or, for tests of the AVX2 kernels on an AMX machine, forbids) the AMX kernels;
// returns the previous setting.
bool use_amx(bool allow);

// amx_supported() and allowed.
bool amx_active();

// True when the CPU has AMX int8 tiles (and the kernel grants them): the q8/q4 linears of
// several rows then run tiles; amx_int8_active() adds use_amx's permission.
bool amx_int8_supported();
bool amx_int8_active();

// Steps of this many rows or more (prefill chunks) run their dense linears on oneDNN
// (onednn.cpp): compute-bound there, its blocked GEMM beats the decode kernels.
constexpr int32_t ONEDNN_MIN_ROWS = 48;

// True when a step of `rows` rows should run `w` on oneDNN: enough rows, fp32 weights or bf16
// ones on a CPU with native bf16, and allowed (use_onednn; tests and benchmarks turn it off).
bool onednn_wins(const Mat& w, int32_t rows);
bool use_onednn(bool allow);  // returns the previous setting

// `linear` on oneDNN (at::linear per band, on views of the one weight); bf16 weights take bf16
// activations there, as the torch path.
void linear_onednn(const Mat& w, const float* x, int64_t ldx, const Band* bands, int nbands,
                   Flavour flavour, float* y, int64_t ldy, bool accumulate);

// The AMX tile configuration (palette 1) the tile kernels load.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// `linear` for bf16 weights on AMX tiles (callers check amx_active() and the bands).
void linear_amx(const Mat& w, const float* x, int64_t ldx, const Band* bands, int nbands,
                Flavour flavour, float* y, int64_t ldy, bool accumulate);

inline float bf16_to_float(uint16_t v) {
  union {
    uint32_t u;
    float f;
  } c{uint32_t(v) << 16};
  return c.f;
}

inline float f16_to_float(uint16_t h) {  // IEEE half -> float, subnormals included
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(mant & 0x400)) mant <<= 1, --exp;
    bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
  }
  union {
    uint32_t u;
    float f;
  } c{bits};
  return c.f;
}

inline float weight_at(const Mat& w, int64_t n, int64_t k) {
  const int64_t at = n * w.ld + k;
  switch (w.dtype) {
    case DType::F32:
      return static_cast<const float*>(w.data)[at];
    case DType::BF16:
      return bf16_to_float(static_cast<const uint16_t*>(w.data)[at]);
    default:
      return f16_to_float(static_cast<const uint16_t*>(w.data)[at]);
  }
}

}  // namespace es
