#include "forward.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace es {
namespace {

void embed_row(const Mat& e, int64_t token, float* out) {
  if (e.dtype == DType::F32) {
    std::memcpy(out, static_cast<const float*>(e.data) + token * e.ld, e.cols * sizeof(float));
    return;
  }
  for (int64_t i = 0; i < e.cols; ++i) out[i] = weight_at(e, token, i);
}

// Runs of equal width from the widths of n rows (rows in step order), widest first.
void make_bands(const int32_t* widths, int32_t n, std::vector<Band>& bands, const char* what) {
  bands.clear();
  for (int32_t r = 0; r < n; ++r) {
    const int32_t w = widths[r];
    if (!bands.empty() && bands.back().width == w) {
      bands.back().row_end = r + 1;
      continue;
    }
    if (!bands.empty() && bands.back().width < w)
      throw std::invalid_argument(std::string("step rows are not sorted by ") + what +
                                  " width: " + std::to_string(bands.back().width) + " then " +
                                  std::to_string(w));
    bands.push_back({r + 1, w});
  }
}

std::string at_row(int64_t r) { return " at row " + std::to_string(r); }

// A layer's rows of one precision: [start, end) of its active rows, with their bands.
struct Run {
  int32_t start, end;
  Precision precision;
  std::vector<Band> qkv, attn, mlp;
};

// Splits a layer's active rows into runs of one precision (each precision once: the rows come
// sorted by it) and makes each run's bands; `runs` keeps its storage from step to step.
void make_runs(const std::vector<Precision>& precision, const std::vector<int32_t>& qkv_w,
               const std::vector<int32_t>& attn_w, const std::vector<int32_t>& mlp_w,
               std::vector<Run>& runs) {
  size_t count = 0;
  for (size_t r = 0; r < precision.size(); ++r) {
    if (count > 0 && runs[count - 1].precision == precision[r]) {
      runs[count - 1].end = int32_t(r + 1);
      continue;
    }
    for (size_t i = 0; i < count; ++i)
      if (runs[i].precision == precision[r])
        throw std::invalid_argument("step rows are not sorted by precision" + at_row(int64_t(r)));
    if (runs.size() <= count) runs.emplace_back();
    Run& run = runs[count++];
    run.start = int32_t(r), run.end = int32_t(r + 1), run.precision = precision[r];
  }
  runs.resize(count);
  for (Run& run : runs) {
    const int32_t n = run.end - run.start;
    make_bands(qkv_w.data() + run.start, n, run.qkv, "head");
    make_bands(attn_w.data() + run.start, n, run.attn, "head");
    make_bands(mlp_w.data() + run.start, n, run.mlp, "MLP");
  }
}

// One linear of a run: the dense kernel or the quantized one on x quantized here (`qx` is
// reused when `quantized` says the run's x is already in it).
void run_linear(const Run& run, const Mat& dense, const QMat& quant, const float* x, int64_t ldx,
                int64_t k, const std::vector<Band>& bands, Flavour flavour, float* y, int64_t ldy,
                bool accumulate, QuantX& qx, bool quantized) {
  const float* xr = x + int64_t(run.start) * ldx;
  float* yr = y + int64_t(run.start) * ldy;
  if (run.precision == Precision::DENSE) {
    const auto kernel = onednn_wins(dense, run.end - run.start) ? linear_onednn : linear;
    return kernel(dense, xr, ldx, bands.data(), int(bands.size()), flavour, yr, ldy, accumulate);
  }
  if (!quantized) quantize_x(xr, ldx, run.end - run.start, k / QGROUP, qx);
  qlinear(quant, run.precision == Precision::Q8, qx, bands.data(), int(bands.size()), flavour, yr,
          ldy, accumulate);
}

}  // namespace

void check_step(const Model& m, const Step& s) {
  if (s.rows < 1) throw std::invalid_argument("a step needs at least one row");
  if (s.num_logits > s.rows) throw std::invalid_argument("more logit rows than rows");
  if (s.block_size < 1 || s.num_slots % s.block_size != 0)
    throw std::invalid_argument("cache slots are not a whole number of blocks");
  const int64_t num_blocks = s.num_slots / s.block_size;
  std::vector<int64_t> last(size_t(s.num_seqs), -1);  // each sequence's furthest position
  std::vector<int32_t> seq_shape(size_t(s.num_seqs), -1);
  for (int64_t r = 0; r < s.rows; ++r) {
    if (s.tokens[r] < 0 || s.tokens[r] >= m.vocab)
      throw std::invalid_argument("token " + std::to_string(s.tokens[r]) + " out of vocab" +
                                  at_row(r));
    if (s.positions[r] < 0 || s.positions[r] >= m.max_pos)
      throw std::invalid_argument("position " + std::to_string(s.positions[r]) +
                                  " past the rotary table" + at_row(r));
    if (s.row_shape[r] < 0 || s.row_shape[r] >= m.shapes.num_shapes)
      throw std::invalid_argument("unknown shape id" + at_row(r));
    const int32_t q = s.row_seq[r];
    if (q < 0 || q >= s.num_seqs) throw std::invalid_argument("unknown sequence" + at_row(r));
    if (seq_shape[q] >= 0 && seq_shape[q] != s.row_shape[r])
      throw std::invalid_argument("one sequence with two shapes" + at_row(r));
    seq_shape[q] = s.row_shape[r];
    last[q] = std::max(last[q], s.positions[r]);
  }
  for (int64_t i = 0; i < s.num_logits; ++i)
    if (s.logit_rows[i] < 0 || s.logit_rows[i] >= s.rows)
      throw std::invalid_argument("logit row out of range");
  const int32_t L = m.num_layers;
  for (int64_t q = 0; q < s.num_seqs; ++q) {
    if (last[q] < 0) continue;
    const int64_t need = last[q] / s.block_size + 1;
    if (need > s.max_blocks)
      throw std::invalid_argument("sequence " + std::to_string(q) + " has too few blocks");
    for (int32_t l = 0; l < L; ++l) {
      if (!m.shapes.kept[int64_t(seq_shape[q]) * L + l]) continue;
      const int32_t* table = s.blocks + (int64_t(l) * s.num_seqs + q) * s.max_blocks;
      for (int64_t b = 0; b < need; ++b)
        if (table[b] < 0 || table[b] >= num_blocks)
          throw std::invalid_argument("block " + std::to_string(table[b]) + " of sequence " +
                                      std::to_string(q) + " in layer " + std::to_string(l) +
                                      " is not in the cache");
    }
  }
}

void Forward::set_lora(Lora lora) {
  std::lock_guard<std::mutex> lock(mutex_);
  model_.lora = std::move(lora);
}

void Forward::run(const Step& s, float* logits, int threads) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (threads > 0) omp_set_num_threads(threads);
  check_step(model_, s);
  const Model& m = model_;
  const int64_t T = s.rows, H = m.hidden, hd = m.head_dim, kv = m.num_kv_heads;
  const int64_t I = m.intermediate, L = m.num_layers;
  const int64_t kv_rows = kv * hd, ldq = 2 * kv_rows + int64_t(m.num_heads) * hd;
  const int64_t lda = int64_t(m.num_heads) * hd, slot_stride = 2 * kv_rows;
  const float scale = 1.0f / std::sqrt(float(hd));
  int64_t max_ctx = 1;
  for (int64_t r = 0; r < T; ++r) max_ctx = std::max(max_ctx, s.positions[r] + 1);
  const int max_ranks = m.num_heads / m.num_kv_heads;
  const bool tiled = hd % 8 == 0 && hd <= 128;  // attend_tile's register tile; else row by row
  constexpr int32_t TILE = 8;  // rows of a tile: keys read once for eight query rows

  x_.resize(T * H);
  xl_.resize(T * H);
  h_.resize(T * H);
  qkv_.resize(T * ldq);
  attn_.resize(T * lda);
  gate_.resize(T * I);
  up_.resize(T * I);
  if (!tiled) scores_.resize(size_t(omp_get_max_threads()) * max_ranks * max_ctx);
  const bool wide = T > 8;  // small ops go parallel only when there are enough rows

#pragma omp parallel for if (wide)
  for (int64_t r = 0; r < T; ++r) embed_row(m.embed, s.tokens[r], x_.data() + r * H);

  std::vector<int32_t> qkv_w, attn_w, mlp_w, bias_row;
  std::vector<Precision> row_precision;
  std::vector<Run> runs;
  const Lora& lora = m.lora;
  for (int64_t l = 0; l < L; ++l) {
    const LayerWeights& w = m.layers[size_t(l)];
    // active row i's LoRA term on one linear (y[0, n) += its adapter of x[0, k)), if its shape
    // has an adapter
    const auto adapt = [&](int64_t i, LoraSite site, int64_t in, int64_t out, const float* xi,
                           int64_t k, float* yi, int64_t n) {
      if (lora.rank == 0) return;
      const int32_t shape = s.row_shape[active_[i]];
      if (lora.route[2 * shape] < 0) return;
      const LoraLinear& ab = lora.linears[size_t(l * LORA_SITES + site)];
      lora_add(ab.a, ab.b, in, out, lora.rank, lora.route + 2 * shape, lora.gain + 2 * shape, xi,
               k, yi, n);
    };
    active_.clear();
    qkv_w.clear(), attn_w.clear(), mlp_w.clear(), bias_row.clear(), row_precision.clear();
    for (int64_t r = 0; r < T; ++r) {
      const int64_t at = int64_t(s.row_shape[r]) * L + l;
      if (!m.shapes.kept[at]) continue;
      active_.push_back(int32_t(r));
      attn_w.push_back(m.shapes.heads[at] * int32_t(hd));
      qkv_w.push_back(int32_t(2 * kv_rows) + attn_w.back());
      mlp_w.push_back(m.shapes.mlp[at]);
      bias_row.push_back(m.shapes.bias[at]);
      row_precision.push_back(Precision(m.shapes.precision[s.row_shape[r]]));
    }
    if (active_.empty()) continue;
    const int64_t n = int64_t(active_.size());
    const bool all = n == T;
    const bool par = n > 8;
    // a LoRA row is worth a thread of its own: its adapters are a few hundred kFLOP a linear
    const bool lpar = par || (lora.rank > 0 && n > 1);
    float* x = all ? x_.data() : xl_.data();
    if (!all)
      for (int64_t i = 0; i < n; ++i)
        std::memcpy(x + i * H, x_.data() + active_[i] * H, H * sizeof(float));
    make_runs(row_precision, qkv_w, attn_w, mlp_w, runs);

#pragma omp parallel for if (par)
    for (int64_t i = 0; i < n; ++i) rms_norm(x + i * H, w.attn_norm, h_.data() + i * H, H, m.eps);
    for (const Run& run : runs)
      run_linear(run, w.qkv, w.qqkv, h_.data(), H, H, run.qkv, Flavour::OUT_PREFIX, qkv_.data(),
                 ldq, false, qx_, false);

#pragma omp parallel for if (lpar)
    for (int64_t i = 0; i < n; ++i) {
      float* row = qkv_.data() + i * ldq;
      if (w.qkv_bias)
        for (int32_t c = 0; c < qkv_w[i]; ++c) row[c] += w.qkv_bias[c];
      adapt(i, LORA_Q, H, lda, h_.data() + i * H, H, row + 2 * kv_rows, attn_w[i]);
      const int64_t r = active_[i], pos = s.positions[r];
      // keys then queries are adjacent: one rotary pass over kv + kept query heads
      rotary(row + kv_rows, int(kv + attn_w[i] / hd), int(hd), m.cos + pos * hd,
             m.sin + pos * hd);
      const int32_t* table = s.blocks + (l * s.num_seqs + s.row_seq[r]) * s.max_blocks;
      const int64_t slot = int64_t(table[pos / s.block_size]) * s.block_size + pos % s.block_size;
      std::memcpy(s.cache + slot * slot_stride, row, slot_stride * sizeof(float));  // v, k
    }

    // every row's new K/V is in the cache before any row attends (a prefill chunk's own keys);
    // a prefill chunk's consecutive rows attend as tiles that read each key once
    tiles_.clear();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = active_[i];
      const size_t last = tiles_.size();
      if (tiled && last > 0 && tiles_[last - 1] < TILE) {
        const int64_t first = tiles_[last - 2], prev = active_[first + tiles_[last - 1] - 1];
        if (s.row_seq[prev] == s.row_seq[r] && s.positions[prev] + 1 == s.positions[r] &&
            attn_w[first] == attn_w[i]) {
          ++tiles_[last - 1];
          continue;
        }
      }
      tiles_.push_back(int32_t(i));
      tiles_.push_back(1);
    }
    const int64_t jobs = int64_t(tiles_.size() / 2) * kv;
#pragma omp parallel for schedule(dynamic) if (jobs > 1)
    for (int64_t job = 0; job < jobs; ++job) {
      const int64_t i = tiles_[2 * (job / kv)], rows = tiles_[2 * (job / kv) + 1];
      const int64_t g = job % kv, r = active_[i];
      const int ranks = int(attn_w[i] / hd / kv);
      const int32_t* table = s.blocks + (l * s.num_seqs + s.row_seq[r]) * s.max_blocks;
      const float* q = qkv_.data() + i * ldq + 2 * kv_rows + g * hd;
      float* o = attn_.data() + i * lda + g * hd;
      if (tiled) {
        attend_tile(q, ldq, kv * hd, int(rows), ranks, s.cache, slot_stride, kv_rows + g * hd,
                    g * hd, table, s.block_size, s.positions[r], int(hd), scale, o, lda,
                    kv * hd);
        continue;
      }
      float* sc = scores_.data() + size_t(omp_get_thread_num()) * max_ranks * max_ctx;
      attend(q, kv * hd, ranks, s.cache, slot_stride, kv_rows + g * hd, g * hd, table,
             s.block_size, s.positions[r] + 1, int(hd), scale, sc, o, kv * hd);
    }
    for (const Run& run : runs)
      run_linear(run, w.o, w.qo, attn_.data(), lda, run.attn[0].width, run.attn,
                 Flavour::IN_PREFIX, x, H, true, qx_, false);
#pragma omp parallel for if (lpar)
    for (int64_t i = 0; i < n; ++i) {
      adapt(i, LORA_O, lda, H, attn_.data() + i * lda, attn_w[i], x + i * H, H);
      if (bias_row[i] >= 0)
        for (int64_t c = 0; c < H; ++c) x[i * H + c] += m.bias_o[bias_row[i] * H + c];
    }

#pragma omp parallel for if (par)
    for (int64_t i = 0; i < n; ++i) rms_norm(x + i * H, w.mlp_norm, h_.data() + i * H, H, m.eps);
    for (const Run& run : runs) {  // gate and up read the same quantized x
      run_linear(run, w.gate, w.qgate, h_.data(), H, H, run.mlp, Flavour::OUT_PREFIX,
                 gate_.data(), I, false, qx_, false);
      run_linear(run, w.up, w.qup, h_.data(), H, H, run.mlp, Flavour::OUT_PREFIX, up_.data(), I,
                 false, qx_, true);
    }
#pragma omp parallel for if (lpar)
    for (int64_t i = 0; i < n; ++i) {
      adapt(i, LORA_GATE, H, I, h_.data() + i * H, H, gate_.data() + i * I, mlp_w[i]);
      adapt(i, LORA_UP, H, I, h_.data() + i * H, H, up_.data() + i * I, mlp_w[i]);
      silu_mul(gate_.data() + i * I, up_.data() + i * I, mlp_w[i]);
    }
    for (const Run& run : runs)
      run_linear(run, w.down, w.qdown, gate_.data(), I, run.mlp[0].width, run.mlp,
                 Flavour::IN_PREFIX, x, H, true, qx_, false);
#pragma omp parallel for if (lpar)
    for (int64_t i = 0; i < n; ++i) {
      adapt(i, LORA_DOWN, I, H, gate_.data() + i * I, mlp_w[i], x + i * H, H);
      if (bias_row[i] >= 0)
        for (int64_t c = 0; c < H; ++c) x[i * H + c] += m.bias_down[bias_row[i] * H + c];
    }

    if (!all)
      for (int64_t i = 0; i < n; ++i)
        std::memcpy(x_.data() + active_[i] * H, x + i * H, H * sizeof(float));
  }

  for (int64_t i = 0; i < s.num_logits; ++i)
    rms_norm(x_.data() + s.logit_rows[i] * H, m.final_norm, h_.data() + i * H, H, m.eps);
  if (s.num_logits == 0) return;
  // the LM head: dense for the rows of dense shapes, q8 for the others (logit rows keep the
  // rows' precision order)
  for (int64_t i0 = 0; i0 < s.num_logits;) {
    const auto p = [&](int64_t i) { return Precision(m.shapes.precision[s.row_shape[s.logit_rows[i]]]); };
    const bool dense = p(i0) == Precision::DENSE;
    int64_t i1 = i0 + 1;
    while (i1 < s.num_logits && (p(i1) == Precision::DENSE) == dense) ++i1;
    const Band rows{int32_t(i1 - i0), int32_t(m.vocab)};
    if (dense) {
      const auto kernel = onednn_wins(m.head, rows.row_end) ? linear_onednn : linear;
      kernel(m.head, h_.data() + i0 * H, H, &rows, 1, Flavour::OUT_PREFIX, logits + i0 * m.vocab,
             m.vocab, false);
    } else {
      quantize_x(h_.data() + i0 * H, H, i1 - i0, H / QGROUP, qx_);
      qlinear(m.qhead, true, qx_, &rows, 1, Flavour::OUT_PREFIX, logits + i0 * m.vocab, m.vocab,
              false);
    }
    i0 = i1;
  }
}

}  // namespace es
