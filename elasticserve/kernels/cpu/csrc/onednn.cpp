// Dense linears of many rows (prefill chunks) on oneDNN through ATen, band by band.
//
// The native kernels are built for decode: few rows, each weight byte read once. A prefill step
// of hundreds of rows is compute-bound instead, and there oneDNN's blocked GEMM wins by 4-5x on
// an AMX CPU (the whole prefill: bench/bench_decode.py --kernels native,native-nodnn). Each band
// is one `at::linear` on views of the same weight (output prefix: its first rows; input prefix:
// its first columns), so the single copy of the weights stays as it is. bf16 weights take bf16
// activations, as the torch path does; they go to oneDNN only where the CPU computes bf16
// natively (AVX512-BF16), else the native kernels keep them.
#include <ATen/ATen.h>

#include <atomic>

#include "linear.h"

namespace es {
namespace {

std::atomic<bool> onednn_allowed{true};

}  // namespace

bool use_onednn(bool allow) { return onednn_allowed.exchange(allow); }

bool onednn_wins(const Mat& w, int32_t rows) {
  if (!onednn_allowed || rows < ONEDNN_MIN_ROWS) return false;
  static const bool native_bf16 = cpu_has_avx512_bf16();
  return w.dtype == DType::F32 || (w.dtype == DType::BF16 && native_bf16);
}

void linear_onednn(const Mat& w, const float* x, int64_t ldx, const Band* bands, int nb,
                   Flavour flavour, float* y, int64_t ldy, bool accumulate) {
  const auto dtype = w.dtype == DType::BF16 ? at::kBFloat16 : at::kFloat;
  const at::Tensor weight = at::from_blob(const_cast<void*>(w.data), {w.rows, w.cols},
                                          {w.ld, 1}, at::TensorOptions().dtype(dtype));
  const bool out_prefix = flavour == Flavour::OUT_PREFIX;
  int32_t r0 = 0;
  for (int b = 0; b < nb; ++b) {
    const int32_t r1 = bands[b].row_end;
    const int64_t rows = r1 - r0, width = bands[b].width;
    if (rows == 0) continue;
    const int64_t n = out_prefix ? width : w.rows, k = out_prefix ? w.cols : width;
    const at::Tensor xb = at::from_blob(const_cast<float*>(x + r0 * ldx), {rows, k}, {ldx, 1},
                                        at::TensorOptions().dtype(at::kFloat));
    at::Tensor yb = at::from_blob(y + r0 * ldy, {rows, n}, {ldy, 1},
                                  at::TensorOptions().dtype(at::kFloat));
    const at::Tensor wb = out_prefix ? weight.narrow(0, 0, n) : weight.narrow(1, 0, k);
    const at::Tensor out = at::linear(xb.to(dtype), wb);
    if (accumulate)
      yb.add_(out);
    else
      yb.copy_(out);
    r0 = r1;
  }
}

}  // namespace es
