// One decoder step for any mix of shapes, natively: embedding -> every layer -> LM head.
//
// The step's rows come sorted by precision (dense, q8, q4) and, within one, so that in every
// layer the rows that run it keep non-increasing head and MLP widths (model/step_plan.py's
// step_order). Each precision's rows read their own copy of the weights once. Each
// layer gathers the rows whose shape keeps it, runs the elastic linears on prefix bands, writes
// the rows' new V/K into the paged cache, then attends over it.
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

#include "linear.h"
#include "qlinear.h"

namespace es {

struct LayerWeights {
  const float* attn_norm;  // [H]
  Mat qkv;                 // [2 kv hd + heads hd, H]: v rows, k rows, q rows (rank-major heads)
  const float* qkv_bias;   // [same rows] or null
  Mat o;                   // [H, heads hd]
  const float* mlp_norm;   // [H]
  Mat gate, up;            // [I, H]
  Mat down;                // [H, I]
  // the same linears quantized (model/quant.py), or hi == null where the model has no q8/q4
  QMat qqkv, qo, qgate, qup, qdown;
};

struct ShapeTables {  // [num_shapes * num_layers] each, row-major by shape
  int32_t num_shapes = 0;
  const int32_t* kept = nullptr;   // 1 where the shape runs the layer
  const int32_t* heads = nullptr;  // query heads kept
  const int32_t* mlp = nullptr;    // MLP channels kept
  const int32_t* bias = nullptr;   // row of the bias-compensation tables, or -1
  const int32_t* precision = nullptr;  // [num_shapes] Precision of each shape's linears
};

// The shape-aware LoRA experts (model/adapters.py) of one linear: a [E, in, r], b [E, r, out].
struct LoraLinear {
  const float* a = nullptr;
  const float* b = nullptr;
};

enum LoraSite { LORA_Q = 0, LORA_O, LORA_GATE, LORA_UP, LORA_DOWN, LORA_SITES };

struct Lora {
  int32_t experts = 0, rank = 0;  // rank 0: no adapters
  std::vector<LoraLinear> linears;  // [num_layers * LORA_SITES]
  const int32_t* route = nullptr;   // [num_shapes, 2] each shape's two experts; -1: no adapter
  const float* gain = nullptr;      // [num_shapes, 2] their gate weights times alpha / r
};

struct Model {
  int32_t hidden, num_heads, num_kv_heads, head_dim, intermediate, vocab, num_layers;
  float eps;
  std::vector<LayerWeights> layers;
  const float* final_norm;    // [H]
  Mat embed, head;            // [V, H]
  QMat qhead;                 // the LM head in q8 for the rows of quantized shapes
  const float *cos, *sin;     // [max_pos, hd] fp32
  int64_t max_pos;
  ShapeTables shapes;
  const float* bias_o = nullptr;     // [num_bias, H] added after o for the rows of a shape
  const float* bias_down = nullptr;  // [num_bias, H] added after down
  int32_t num_bias = 0;
  Lora lora;
};

struct Step {
  int64_t rows;
  const int64_t* tokens;     // [rows]
  const int64_t* positions;  // [rows]
  const int32_t* row_shape;  // [rows] shape id
  const int32_t* row_seq;    // [rows] sequence index into blocks
  const int32_t* blocks;     // [num_layers, num_seqs, max_blocks] block tables, -1 past the end
  int64_t num_seqs, max_blocks;
  float* cache;              // [num_slots, 2 (v, k), kv, hd] fp32
  int64_t num_slots;
  int32_t block_size;
  const int64_t* logit_rows;  // [num_logits]
  int64_t num_logits;
};

// Checks every index the step carries against the model and the cache (std::invalid_argument).
void check_step(const Model& model, const Step& step);

class Forward {
 public:
  explicit Forward(Model& model) : model_(model) {}
  // logits [num_logits, V], on `threads` OpenMP threads (0: the runtime's default)
  void run(const Step& step, float* logits, int threads);
  // Replaces the model's adapters between steps (none runs meanwhile).
  void set_lora(Lora lora);

 private:
  Model& model_;
  std::mutex mutex_;  // one step at a time: the work buffers below are shared
  std::vector<float> x_, xl_, h_, qkv_, attn_, gate_, up_, scores_;
  std::vector<int32_t> active_;
  std::vector<int32_t> tiles_;  // attention tiles: first local row, row count
  QuantX qx_;
};

}  // namespace es
