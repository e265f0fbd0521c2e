// A decoder layer's small ops, fp32, AVX2 + FMA (callers check es::cpu_supported()).
#pragma once

#include <cstdint>

namespace es {

// out[i] = x[i] / rms(x) * w[i] for one row of n
void rms_norm(const float* x, const float* w, float* out, int64_t n, float eps);

// HF rotate_half rotary on `heads` consecutive vectors of hd at x, cos/sin rows of hd
void rotary(float* x, int heads, int hd, const float* cos, const float* sin);

// out[i] = silu(gate[i]) * up[i]
void silu_mul(float* gate, const float* up, int64_t n);

// Causal attention of one row's query heads of one KV group over the paged cache.
// q: the group's first head, rank j at q + j * q_stride (out likewise, out_stride);
// the context is positions [0, ctx), position t at slot blocks[t / bs] * bs + t % bs, its key at
// cache + slot * slot_stride + k_off and value at + v_off; scores: ranks * ctx floats.
void attend(const float* q, int64_t q_stride, int ranks, const float* cache, int64_t slot_stride,
            int64_t k_off, int64_t v_off, const int32_t* blocks, int32_t bs, int64_t ctx, int hd,
            float scale, float* scores, float* out, int64_t out_stride);

// The same for `rows` consecutive rows of one sequence at positions pos0 .. pos0 + rows - 1 (a
// prefill chunk's, or one decode row): row i's rank j at q + i * q_row_stride + j * q_stride (out
// likewise), over its positions [0, pos0 + i]. Each key and value is read once for the whole
// tile, in passes of 64 keys with an online softmax. Needs hd a multiple of 8, at most 128.
void attend_tile(const float* q, int64_t q_row_stride, int64_t q_stride, int rows, int ranks,
                 const float* cache, int64_t slot_stride, int64_t k_off, int64_t v_off,
                 const int32_t* blocks, int32_t bs, int64_t pos0, int hd, float scale,
                 float* out, int64_t out_row_stride, int64_t out_stride);

// attend_tile's AVX-512 variant (hd a multiple of 16), which attend_tile runs where the CPU has
// AVX-512 and use_avx512_attention allows it (tests compare both; that toggle returns the old
// permission).
void attend_tile_avx512(const float* q, int64_t q_row_stride, int64_t q_stride, int rows,
                        int ranks, const float* cache, int64_t slot_stride, int64_t k_off,
                        int64_t v_off, const int32_t* blocks, int32_t bs, int64_t pos0, int hd,
                        float scale, float* out, int64_t out_row_stride, int64_t out_stride);
bool use_avx512_attention(bool allow);
bool avx512_attention_active();

// One row's shape-aware LoRA term on one linear, added in place: for each of the row's two
// experts e, y[0, n) += gain[e] * (x[0, k) . a_e[0, k)) b_e[:, 0, n), where a holds the experts'
// [in, rank] down-projections and b their [rank, out] up-projections (experts[e] indexes them).
// k < in is an input prefix (o, down), n < out an output prefix (q, gate, up). rank <= 64.
void lora_add(const float* a, const float* b, int64_t in, int64_t out, int rank,
              const int32_t* experts, const float* gain, const float* x, int64_t k, float* y,
              int64_t n);

// The sum of n floats on the OpenMP team: a read of memory at the rate the kernels can reach.
double read_sum(const float* x, int64_t n);

}  // namespace es
