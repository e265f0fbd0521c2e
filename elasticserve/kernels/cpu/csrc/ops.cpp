#include "ops.h"
#include "simd.h"

#include <immintrin.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace es {
namespace {

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 2^f for |f| <= 0.5, degree 6, highest power first (relative error ~2e-7).
constexpr float EXP2_POLY[7] = {1.5403530393381608e-4f, 1.3333558146428443e-3f,
                                9.6181291076284772e-3f, 5.5504108664821580e-2f,
                                2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.0f};

// e^x for x <= 0 (softmax after the max is taken): 2^(x log2 e) split into 2^n * 2^f,
// |f| <= 0.5, 2^f by a degree-6 polynomial (relative error ~2e-7); below -87 it is 0.
inline __m256 exp_neg(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 y = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(y, n);
  __m256 p = _mm256_set1_ps(EXP2_POLY[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_POLY[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  const __m256 r = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  return _mm256_andnot_ps(under, r);
}

float exp_neg1(float x) {
  float in[8] = {x}, out[8];
  _mm256_storeu_ps(out, exp_neg(_mm256_loadu_ps(in)));
  return out[0];
}

// p[0, n) <- e^(p - m), returning their sum (m is at least every p, so each exponent is <= 0).
float exp_sub_sum(float* p, int64_t n, float m) {
  const __m256 mm = _mm256_set1_ps(m);
  __m256 sv = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(p + t), mm));
    _mm256_storeu_ps(p + t, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = hsum(sv);
  for (; t < n; ++t) {
    p[t] = exp_neg1(p[t] - m);
    sum += p[t];
  }
  return sum;
}

}  // namespace

void lora_add(const float* a, const float* b, int64_t in, int64_t out, int rank,
              const int32_t* experts, const float* gain, const float* x, int64_t k, float* y,
              int64_t n) {
  float t[2 * 64];  // the rank-r projection of x by each expert, scaled by its gain
  const bool vec = rank % 8 == 0 && rank <= 32;
  for (int e = 0; e < 2; ++e) {
    const float* ae = a + int64_t(experts[e]) * in * rank;
    float* te = t + e * rank;
    if (vec) {
      // four inputs in flight: four independent FMA chains per output vector, not one
      constexpr int U = 4;
      __m256 acc[U][4];
      for (int u = 0; u < U; ++u)
        for (int v = 0; v < 4; ++v) acc[u][v] = _mm256_setzero_ps();
      const int nv = rank / 8;
      int64_t i = 0;
      for (; i + U <= k; i += U)
        for (int u = 0; u < U; ++u) {
          const __m256 xv = _mm256_set1_ps(x[i + u]);
          const float* row = ae + (i + u) * rank;
          for (int v = 0; v < nv; ++v)
            acc[u][v] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(row + 8 * v), acc[u][v]);
        }
      for (; i < k; ++i) {
        const __m256 xv = _mm256_set1_ps(x[i]);
        for (int v = 0; v < nv; ++v)
          acc[0][v] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(ae + i * rank + 8 * v), acc[0][v]);
      }
      const __m256 g = _mm256_set1_ps(gain[e]);
      for (int v = 0; v < nv; ++v) {
        const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0][v], acc[1][v]),
                                         _mm256_add_ps(acc[2][v], acc[3][v]));
        _mm256_storeu_ps(te + 8 * v, _mm256_mul_ps(sum, g));
      }
    } else {
      for (int j = 0; j < rank; ++j) te[j] = 0.0f;
      for (int64_t i = 0; i < k; ++i)
        for (int j = 0; j < rank; ++j) te[j] += x[i] * ae[i * rank + j];
      for (int j = 0; j < rank; ++j) te[j] *= gain[e];
    }
  }
  for (int e = 0; e < 2; ++e) {
    const float* be = b + int64_t(experts[e]) * rank * out;
    for (int j = 0; j < rank; ++j) {
      const float* row = be + int64_t(j) * out;
      const __m256 c = _mm256_set1_ps(t[e * rank + j]);
      int64_t i = 0;
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(c, _mm256_loadu_ps(row + i), _mm256_loadu_ps(y + i)));
      for (; i < n; ++i) y[i] += t[e * rank + j] * row[i];
    }
  }
}

double read_sum(const float* x, int64_t n) {
  double total = 0;
#pragma omp parallel for reduction(+ : total) schedule(static)
  for (int64_t c = 0; c < n; c += 4096) {
    const int64_t end = c + 4096 < n ? c + 4096 : n;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = c;
    for (; i + 32 <= end; i += 32) {
      a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + i));
      a1 = _mm256_add_ps(a1, _mm256_loadu_ps(x + i + 8));
      a2 = _mm256_add_ps(a2, _mm256_loadu_ps(x + i + 16));
      a3 = _mm256_add_ps(a3, _mm256_loadu_ps(x + i + 24));
    }
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < end; ++i) s += x[i];
    total += s;
  }
  return total;
}

void rms_norm(const float* x, const float* w, float* out, int64_t n, float eps) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float ss = hsum(acc);
  for (; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / float(n) + eps);
  const __m256 s = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i,
                     _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), s), _mm256_loadu_ps(w + i)));
  for (; i < n; ++i) out[i] = x[i] * inv * w[i];
}

void rotary(float* x, int heads, int hd, const float* cos, const float* sin) {
  const int half = hd / 2;
  for (int h = 0; h < heads; ++h) {
    float* v = x + int64_t(h) * hd;
    int i = 0;
    for (; i + 8 <= half; i += 8) {
      const __m256 a = _mm256_loadu_ps(v + i), b = _mm256_loadu_ps(v + half + i);
      const __m256 ra = _mm256_fnmadd_ps(b, _mm256_loadu_ps(sin + i),
                                         _mm256_mul_ps(a, _mm256_loadu_ps(cos + i)));
      const __m256 rb = _mm256_fmadd_ps(a, _mm256_loadu_ps(sin + half + i),
                                        _mm256_mul_ps(b, _mm256_loadu_ps(cos + half + i)));
      _mm256_storeu_ps(v + i, ra);
      _mm256_storeu_ps(v + half + i, rb);
    }
    for (; i < half; ++i) {
      const float a = v[i], b = v[half + i];
      v[i] = a * cos[i] - b * sin[i];
      v[half + i] = b * cos[half + i] + a * sin[half + i];
    }
  }
}

void silu_mul(float* gate, const float* up, int64_t n) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    // silu(g) = g / (1 + e^-g); e^-|g| keeps the exponent <= 0
    const __m256 neg_abs = _mm256_or_ps(g, _mm256_set1_ps(-0.0f));
    const __m256 e = exp_neg(neg_abs);  // e^-|g|
    const __m256 pos = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_GE_OQ);
    // g >= 0: sigmoid = 1 / (1 + e); g < 0: sigmoid = e / (1 + e)
    const __m256 sig = _mm256_div_ps(_mm256_blendv_ps(e, one, pos), _mm256_add_ps(one, e));
    _mm256_storeu_ps(gate + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

namespace {

// Eight dot products of q with keys k[0..7], hd a multiple of 8: eight independent FMA chains
// (one chain per score is latency-bound), reduced together by a horizontal-add tree.
inline __m256 dot8(const float* q, const float* const* k, int hd) {
  __m256 a[8];
  for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
  for (int i = 0; i < hd; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    for (int u = 0; u < 8; ++u) a[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[u] + i), a[u]);
  }
  // [a0 a1 a2 a3 (low halves) | the same, high halves], then the same for a4..a7
  const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

}  // namespace

void attend(const float* q, int64_t q_stride, int ranks, const float* cache, int64_t slot_stride,
            int64_t k_off, int64_t v_off, const int32_t* blocks, int32_t bs, int64_t ctx, int hd,
            float scale, float* scores, float* out, int64_t out_stride) {
  const bool vec = hd % 8 == 0;
  // each position's offset in the cache, walked block by block (a division per key costs as much
  // as its dot product)
  thread_local std::vector<int64_t> offsets;
  offsets.resize(size_t(ctx));
  for (int64_t t = 0; t < ctx; t += bs) {
    const int64_t base = int64_t(blocks[t / bs]) * bs * slot_stride;
    for (int64_t u = t; u < t + bs && u < ctx; ++u) offsets[u] = base + (u - t) * slot_stride;
  }
  const auto key = [&](int64_t t) { return cache + offsets[t] + k_off; };
  int64_t t = 0;
  if (vec) {
    const __m256 sv = _mm256_set1_ps(scale);
    for (; t + 8 <= ctx; t += 8) {
      const float* k[8];
      for (int u = 0; u < 8; ++u) k[u] = key(t + u);
      for (int j = 0; j < ranks; ++j)
        _mm256_storeu_ps(scores + j * ctx + t, _mm256_mul_ps(dot8(q + j * q_stride, k, hd), sv));
    }
  }
  for (; t < ctx; ++t) {
    const float* k = key(t);
    for (int j = 0; j < ranks; ++j) {
      const float* qj = q + j * q_stride;
      float s = 0;
      if (vec) {
        __m256 acc = _mm256_setzero_ps();
        for (int i = 0; i < hd; i += 8)
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(qj + i), _mm256_loadu_ps(k + i), acc);
        s = hsum(acc);
      } else {
        for (int i = 0; i < hd; ++i) s += qj[i] * k[i];
      }
      scores[j * ctx + t] = s * scale;
    }
  }
  for (int j = 0; j < ranks; ++j) {
    float* p = scores + j * ctx;
    __m256 mv = _mm256_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 8 <= ctx; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(p + t));
    float m = hmax(mv);
    for (; t < ctx; ++t) m = p[t] > m ? p[t] : m;
    const float inv = 1.0f / exp_sub_sum(p, ctx, m);
    for (t = 0; t < ctx; ++t) p[t] *= inv;
  }
  for (int j = 0; j < ranks; ++j) {
    float* o = out + j * out_stride;
    const float* p = scores + j * ctx;
    if (vec && hd <= 128) {
      __m256 acc[16];
      const int nv = hd / 8;
      for (int i = 0; i < nv; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t t = 0; t < ctx; ++t) {
        const float* v = cache + offsets[t] + v_off;
        const __m256 pt = _mm256_set1_ps(p[t]);
        for (int i = 0; i < nv; ++i)
          acc[i] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + 8 * i), acc[i]);
      }
      for (int i = 0; i < nv; ++i) _mm256_storeu_ps(o + 8 * i, acc[i]);
    } else {
      for (int i = 0; i < hd; ++i) o[i] = 0;
      for (int64_t t = 0; t < ctx; ++t) {
        const float* v = cache + offsets[t] + v_off;
        for (int i = 0; i < hd; ++i) o[i] += p[t] * v[i];
      }
    }
  }
}


namespace {

// A tile's per-thread scratch: each context position's cache offset (walked block by block), a
// pass's scores, the output accumulators and the online softmax's running max and sum.
struct TileScratch {
  std::vector<int64_t> offsets;
  std::vector<float> sc, acc, mx, sum;
};

TileScratch& tile_scratch(const int32_t* blocks, int32_t bs, int64_t slot_stride, int64_t ctx,
                          int nq, int hd, int keys_per_pass) {
  thread_local TileScratch s;
  s.offsets.resize(size_t(ctx));
  for (int64_t t = 0; t < ctx; t += bs) {
    const int64_t base = int64_t(blocks[t / bs]) * bs * slot_stride;
    for (int64_t u = t; u < t + bs && u < ctx; ++u) s.offsets[u] = base + (u - t) * slot_stride;
  }
  s.sc.resize(size_t(nq) * keys_per_pass);
  s.acc.assign(size_t(nq) * hd, 0.0f);
  s.mx.assign(size_t(nq), -INFINITY);
  s.sum.assign(size_t(nq), 0.0f);
  return s;
}

void attend_tile_avx2(const float* q, int64_t q_row_stride, int64_t q_stride, int rows,
                      int ranks, const float* cache, int64_t slot_stride, int64_t k_off,
                      int64_t v_off, const int32_t* blocks, int32_t bs, int64_t pos0, int hd,
                      float scale, float* out, int64_t out_row_stride, int64_t out_stride) {
  constexpr int CH = 64;  // keys a pass: their K and V (32 KB at hd 64) stay in L1 for the tile
  const int nq = rows * ranks;  // query q = i * ranks + j: row i, rank j
  const int64_t ctx = pos0 + rows;  // the last row's context
  const int nv = hd / 8;
  TileScratch& scratch = tile_scratch(blocks, bs, slot_stride, ctx, nq, hd, CH);
  const std::vector<int64_t>& offsets = scratch.offsets;
  std::vector<float>&sc = scratch.sc, &acc = scratch.acc, &mx = scratch.mx, &sum = scratch.sum;
  const auto query = [&](int qi) { return q + (qi / ranks) * q_row_stride + (qi % ranks) * q_stride; };
  const __m256 sv = _mm256_set1_ps(scale);
  for (int64_t t0 = 0; t0 < ctx; t0 += CH) {
    const int n = int(std::min<int64_t>(CH, ctx - t0));
    // scores of every query against this pass's keys (row i only sees keys <= pos0 + i, so its
    // valid count is cut below; the extra scores are computed and ignored)
    int u0 = 0;
    for (; u0 + 8 <= n; u0 += 8) {
      const float* k[8];
      for (int u = 0; u < 8; ++u) k[u] = cache + offsets[t0 + u0 + u] + k_off;
      for (int qi = 0; qi < nq; ++qi)
        _mm256_storeu_ps(&sc[size_t(qi) * CH + u0], _mm256_mul_ps(dot8(query(qi), k, hd), sv));
    }
    for (; u0 < n; ++u0) {
      const float* k = cache + offsets[t0 + u0] + k_off;
      for (int qi = 0; qi < nq; ++qi) {
        const float* qv = query(qi);
        __m256 a = _mm256_setzero_ps();
        for (int i = 0; i < hd; i += 8)
          a = _mm256_fmadd_ps(_mm256_loadu_ps(qv + i), _mm256_loadu_ps(k + i), a);
        sc[size_t(qi) * CH + u0] = hsum(a) * scale;
      }
    }
    // online softmax: rescale what the earlier passes summed to this pass's running maximum
    for (int qi = 0; qi < nq; ++qi) {
      const int valid = int(std::min<int64_t>(n, pos0 + qi / ranks + 1 - t0));
      if (valid <= 0) continue;
      float* p = &sc[size_t(qi) * CH];
      float m = mx[qi];
      for (int u = 0; u < valid; ++u) m = p[u] > m ? p[u] : m;
      const float corr = exp_neg1(mx[qi] - m);  // 0 on the first pass (-inf)
      mx[qi] = m;
      sum[qi] = sum[qi] * corr + exp_sub_sum(p, valid, m);
      float* o = &acc[size_t(qi) * hd];
      __m256 a[16];
      const __m256 cv = _mm256_set1_ps(corr);
      for (int i = 0; i < nv; ++i) a[i] = _mm256_mul_ps(_mm256_loadu_ps(o + 8 * i), cv);
      for (int w = 0; w < valid; ++w) {
        const float* v = cache + offsets[t0 + w] + v_off;
        const __m256 pw = _mm256_set1_ps(p[w]);
        for (int i = 0; i < nv; ++i) a[i] = _mm256_fmadd_ps(pw, _mm256_loadu_ps(v + 8 * i), a[i]);
      }
      for (int i = 0; i < nv; ++i) _mm256_storeu_ps(o + 8 * i, a[i]);
    }
  }
  for (int qi = 0; qi < nq; ++qi) {
    float* o = out + (qi / ranks) * out_row_stride + (qi % ranks) * out_stride;
    const float inv = 1.0f / sum[qi];
    for (int i = 0; i < hd; ++i) o[i] = acc[size_t(qi) * hd + i] * inv;
  }
}

}  // namespace

void attend_tile(const float* q, int64_t q_row_stride, int64_t q_stride, int rows, int ranks,
                 const float* cache, int64_t slot_stride, int64_t k_off, int64_t v_off,
                 const int32_t* blocks, int32_t bs, int64_t pos0, int hd, float scale,
                 float* out, int64_t out_row_stride, int64_t out_stride) {
  if (hd % 16 == 0 && avx512_attention_active()) {
    attend_tile_avx512(q, q_row_stride, q_stride, rows, ranks, cache, slot_stride, k_off, v_off,
                       blocks, bs, pos0, hd, scale, out, out_row_stride, out_stride);
    return;
  }
  attend_tile_avx2(q, q_row_stride, q_stride, rows, ranks, cache, slot_stride, k_off, v_off,
                   blocks, bs, pos0, hd, scale, out, out_row_stride, out_stride);
}

}  // namespace es

#pragma GCC pop_options

// ---- AVX-512: the same tile at 16 lanes, two queries per pass over a key or a value ----------

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx2,fma,f16c")

namespace es {
namespace {

std::atomic<bool> avx512_attention_allowed{true};

// e^x for x <= 0, as exp_neg at 16 lanes.
inline __m512 exp_neg16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(EXP2_POLY[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[i]));
  const __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
  const __m512 r = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), r);
}

// Q queries' scores against eight keys, hd a multiple of 16: Q x 8 accumulators, each key
// vector loaded once for the Q queries (one query a load per FMA is load-bound).
template <int Q>
inline void dots8(const float* const* q, const float* const* k, int hd, __m256* out) {
  __m512 a[Q][8];
  for (int j = 0; j < Q; ++j)
    for (int u = 0; u < 8; ++u) a[j][u] = _mm512_setzero_ps();
  for (int i = 0; i < hd; i += 16) {
    __m512 qv[Q];
    for (int j = 0; j < Q; ++j) qv[j] = _mm512_loadu_ps(q[j] + i);
    for (int u = 0; u < 8; ++u) {
      const __m512 kv = _mm512_loadu_ps(k[u] + i);
      for (int j = 0; j < Q; ++j) a[j][u] = _mm512_fmadd_ps(qv[j], kv, a[j][u]);
    }
  }
  for (int j = 0; j < Q; ++j) {
    __m256 h[8];
    for (int u = 0; u < 8; ++u)
      h[u] = _mm256_add_ps(_mm512_castps512_ps256(a[j][u]), _mm512_extractf32x8_ps(a[j][u], 1));
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
    const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(h[4], h[5]), _mm256_hadd_ps(h[6], h[7]));
    out[j] = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20),
                           _mm256_permute2f128_ps(h0, h1, 0x31));
  }
}

// acc[j] += sum over w < n of p[j][w] * v(w) for Q queries, hd = 16 * NV: each value vector is
// loaded once for the Q queries.
template <int Q, int NV>
inline void weigh(float* const* acc, const float* const* p, const float* cache,
                  const int64_t* offsets, int n) {
  __m512 a[Q][NV];
  for (int j = 0; j < Q; ++j)
    for (int i = 0; i < NV; ++i) a[j][i] = _mm512_loadu_ps(acc[j] + 16 * i);
  for (int w = 0; w < n; ++w) {
    const float* v = cache + offsets[w];
    __m512 pw[Q];
    for (int j = 0; j < Q; ++j) pw[j] = _mm512_set1_ps(p[j][w]);
    for (int i = 0; i < NV; ++i) {
      const __m512 vv = _mm512_loadu_ps(v + 16 * i);
      for (int j = 0; j < Q; ++j) a[j][i] = _mm512_fmadd_ps(pw[j], vv, a[j][i]);
    }
  }
  for (int j = 0; j < Q; ++j)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(acc[j] + 16 * i, a[j][i]);
}

template <int Q>
void weigh_any(int nv, float* const* acc, const float* const* p, const float* cache,
               const int64_t* offsets, int n) {
  switch (nv) {
    case 1: return weigh<Q, 1>(acc, p, cache, offsets, n);
    case 2: return weigh<Q, 2>(acc, p, cache, offsets, n);
    case 3: return weigh<Q, 3>(acc, p, cache, offsets, n);
    case 4: return weigh<Q, 4>(acc, p, cache, offsets, n);
    case 5: return weigh<Q, 5>(acc, p, cache, offsets, n);
    case 6: return weigh<Q, 6>(acc, p, cache, offsets, n);
    case 7: return weigh<Q, 7>(acc, p, cache, offsets, n);
    default: return weigh<Q, 8>(acc, p, cache, offsets, n);
  }
}

}  // namespace

bool use_avx512_attention(bool allow) { return avx512_attention_allowed.exchange(allow); }

bool avx512_attention_active() {
  static const bool supported = __builtin_cpu_supports("avx512f") &&
                                __builtin_cpu_supports("avx512dq") &&
                                __builtin_cpu_supports("avx512vl");
  return supported && avx512_attention_allowed;
}

void attend_tile_avx512(const float* q, int64_t q_row_stride, int64_t q_stride, int rows,
                        int ranks, const float* cache, int64_t slot_stride, int64_t k_off,
                        int64_t v_off, const int32_t* blocks, int32_t bs, int64_t pos0, int hd,
                        float scale, float* out, int64_t out_row_stride, int64_t out_stride) {
  constexpr int CH = 64;  // keys a pass, as the AVX2 tile
  const int nq = rows * ranks;  // query q = i * ranks + j: row i, rank j
  const int64_t ctx = pos0 + rows;
  const int nv = hd / 16;
  TileScratch& scratch = tile_scratch(blocks, bs, slot_stride, ctx, nq, hd, CH);
  const std::vector<int64_t>& offsets = scratch.offsets;
  std::vector<float>&sc = scratch.sc, &acc = scratch.acc, &mx = scratch.mx, &sum = scratch.sum;
  const auto query = [&](int qi) {
    return q + (qi / ranks) * q_row_stride + (qi % ranks) * q_stride;
  };
  const __m256 sv = _mm256_set1_ps(scale);
  thread_local std::vector<int64_t> voff;
  voff.resize(CH);
  for (int64_t t0 = 0; t0 < ctx; t0 += CH) {
    const int n = int(std::min<int64_t>(CH, ctx - t0));
    // eight keys a group; a last group past the pass's n keys repeats its last key (the extra
    // scores land in the pass's 64 slots and are never read)
    for (int u0 = 0; u0 < n; u0 += 8) {
      const float* k[8];
      for (int u = 0; u < 8; ++u) k[u] = cache + offsets[t0 + std::min(u0 + u, n - 1)] + k_off;
      int qi = 0;
      for (; qi + 2 <= nq; qi += 2) {
        const float* qs[2] = {query(qi), query(qi + 1)};
        __m256 d[2];
        dots8<2>(qs, k, hd, d);
        for (int j = 0; j < 2; ++j)
          _mm256_storeu_ps(&sc[size_t(qi + j) * CH + u0], _mm256_mul_ps(d[j], sv));
      }
      if (qi < nq) {
        const float* qs[1] = {query(qi)};
        __m256 d[1];
        dots8<1>(qs, k, hd, d);
        _mm256_storeu_ps(&sc[size_t(qi) * CH + u0], _mm256_mul_ps(d[0], sv));
      }
    }
    // online softmax per query; a query's scores past its row's last key become 0, so the
    // weighted sums below run over the pass's n keys for every query alike
    for (int qi = 0; qi < nq; ++qi) {
      const int64_t last = pos0 + qi / ranks + 1 - t0;  // keys of this pass the row sees
      const int valid = int(std::clamp<int64_t>(last, 0, n));
      float* p = &sc[size_t(qi) * CH];
      float* o = &acc[size_t(qi) * hd];
      if (valid == 0) {
        std::fill(p, p + n, 0.0f);
        continue;
      }
      __m512 mv = _mm512_set1_ps(mx[qi]);
      for (int u = 0; u < valid; u += 16) {
        const __mmask16 live = static_cast<__mmask16>((1u << std::min(16, valid - u)) - 1);
        mv = _mm512_mask_max_ps(mv, live, mv, _mm512_maskz_loadu_ps(live, p + u));
      }
      const float m = _mm512_reduce_max_ps(mv);
      const float corr = mx[qi] == -INFINITY ? 0.0f : std::exp(mx[qi] - m);
      mx[qi] = m;
      const __m512 mm = _mm512_set1_ps(m);
      __m512 total = _mm512_setzero_ps();
      for (int u = 0; u < n; u += 16) {
        const int left = std::min(16, n - u), live_n = std::clamp(valid - u, 0, left);
        const __mmask16 all = static_cast<__mmask16>((1u << left) - 1);
        const __mmask16 live = static_cast<__mmask16>((1u << live_n) - 1);
        const __m512 e = _mm512_maskz_mov_ps(
            live, exp_neg16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, p + u), mm)));
        _mm512_mask_storeu_ps(p + u, all, e);
        total = _mm512_add_ps(total, e);
      }
      sum[qi] = sum[qi] * corr + _mm512_reduce_add_ps(total);
      const __m512 cv = _mm512_set1_ps(corr);
      for (int i = 0; i < hd; i += 16)
        _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_loadu_ps(o + i), cv));
    }
    for (int w = 0; w < n; ++w) voff[w] = offsets[t0 + w] + v_off;
    int qi = 0;
    for (; qi + 2 <= nq; qi += 2) {
      float* accs[2] = {&acc[size_t(qi) * hd], &acc[size_t(qi + 1) * hd]};
      const float* ps[2] = {&sc[size_t(qi) * CH], &sc[size_t(qi + 1) * CH]};
      weigh_any<2>(nv, accs, ps, cache, voff.data(), n);
    }
    if (qi < nq) {
      float* accs[1] = {&acc[size_t(qi) * hd]};
      const float* ps[1] = {&sc[size_t(qi) * CH]};
      weigh_any<1>(nv, accs, ps, cache, voff.data(), n);
    }
  }
  for (int qi = 0; qi < nq; ++qi) {
    float* o = out + (qi / ranks) * out_row_stride + (qi % ranks) * out_stride;
    const __m512 inv = _mm512_set1_ps(1.0f / sum[qi]);
    for (int i = 0; i < hd; i += 16)
      _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_loadu_ps(&acc[size_t(qi) * hd + i]), inv));
  }
}

}  // namespace es

#pragma GCC pop_options
