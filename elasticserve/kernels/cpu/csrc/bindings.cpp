// Python bindings: the band linear (for tests and benchmarks) and the native decoder.
#include <omp.h>
#include <torch/extension.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "forward.h"
#include "linear.h"
#include "ops.h"
#include "qlinear.h"

namespace {

using es::DType;
using es::Mat;

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

// A 2-D row-major CPU weight (fp32 or bf16), rows contiguous.
Mat as_mat(const at::Tensor& t, const std::string& name) {
  require(t.device().is_cpu(), name + ": must be on the CPU");
  require(t.dim() == 2, name + ": must be 2-D");
  require(t.stride(1) == 1, name + ": rows must be contiguous");
  const auto type = t.scalar_type();
  require(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf,
          name + ": must be float32, bfloat16 or float16");
  const DType dtype = type == at::kFloat      ? DType::F32
                      : type == at::kBFloat16 ? DType::BF16
                                              : DType::F16;
  return Mat{t.data_ptr(), dtype, t.size(0), t.size(1), t.stride(0)};
}

const float* f32(const at::Tensor& t, int64_t numel, const std::string& name) {
  require(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
          name + ": must be a contiguous float32 CPU tensor");
  require(t.numel() == numel, name + ": expected " + std::to_string(numel) + " elements, got " +
                                  std::to_string(t.numel()));
  return t.data_ptr<float>();
}

template <typename T>
const T* ints(const at::Tensor& t, at::ScalarType type, int64_t numel, const std::string& name) {
  require(t.device().is_cpu() && t.scalar_type() == type && t.is_contiguous(),
          name + ": must be a contiguous " + std::string(c10::toString(type)) + " CPU tensor");
  require(numel < 0 || t.numel() == numel,
          name + ": expected " + std::to_string(numel) + " elements");
  return t.data_ptr<T>();
}

std::vector<es::Band> as_bands(const at::Tensor& bands) {
  const int32_t* p = ints<int32_t>(bands, at::kInt, -1, "bands");
  require(bands.dim() == 2 && bands.size(1) == 2, "bands: must be [S, 2] (row_end, width)");
  std::vector<es::Band> out;
  for (int64_t i = 0; i < bands.size(0); ++i) out.push_back({p[2 * i], p[2 * i + 1]});
  return out;
}

// y [M, N] (=|+=) x [M, K] against w's prefix bands; the same check as the Python reference.
void linear(const at::Tensor& w, const at::Tensor& x, const at::Tensor& bands, int64_t flavour,
            at::Tensor& y, bool accumulate, bool simd, int64_t threads) {
  const Mat m = as_mat(w, "w");
  require(flavour == 0 || flavour == 1, "flavour: 0 (output prefix) or 1 (input prefix)");
  const auto fl = static_cast<es::Flavour>(flavour);
  const std::vector<es::Band> b = as_bands(bands);
  require(!b.empty(), "bands: at least one band is needed");
  es::check_bands(m, b.data(), int(b.size()), fl);
  require(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1, "x: [M, K] fp32");
  require(y.scalar_type() == at::kFloat && y.dim() == 2 && y.stride(1) == 1, "y: [M, N] fp32");
  const int64_t rows = b.back().row_end;
  require(x.size(0) >= rows && y.size(0) >= rows, "x and y need the bands' rows");
  const int64_t k_need = fl == es::Flavour::OUT_PREFIX ? m.cols : b.front().width;
  const int64_t n_need = fl == es::Flavour::OUT_PREFIX ? b.front().width : m.rows;
  require(x.size(1) >= k_need, "x: too few columns for the bands");
  require(y.size(1) >= n_need, "y: too few columns for the bands");
  require(!simd || es::cpu_supported(), "this CPU lacks AVX2/FMA/F16C");
  pybind11::gil_scoped_release release;
  if (threads > 0) omp_set_num_threads(int(threads));
  (simd ? es::linear : es::linear_scalar)(m, x.data_ptr<float>(), x.stride(0), b.data(),
                                          int(b.size()), fl, y.data_ptr<float>(), y.stride(0),
                                          accumulate);
}

// A quantized weight from its planes (model/quant.py's QuantWeight): hi, lo (or None), scale,
// minimum; [rows, cols] with cols = 32 * scale's columns.
es::QMat as_qmat(const at::Tensor& hi, const std::optional<at::Tensor>& lo, const at::Tensor& scale,
                 const at::Tensor& minimum, bool q4_reads_lo, const std::string& name) {
  require(scale.dim() == 2, name + ": scale must be [rows, groups]");
  const int64_t rows = scale.size(0), groups = scale.size(1);
  const int64_t ld = (groups + 1) / 2 * es::QGROUP;
  auto plane = [&](const at::Tensor& t, const std::string& what) {
    require(t.device().is_cpu() && t.scalar_type() == at::kByte && t.is_contiguous() &&
                t.dim() == 2 && t.size(0) == rows && t.size(1) == ld,
            name + ": " + what + " must be a contiguous uint8 [" + std::to_string(rows) + ", " +
                std::to_string(ld) + "] plane");
    return t.data_ptr<uint8_t>();
  };
  es::QMat q;
  q.rows = rows, q.groups = groups, q.cols = groups * es::QGROUP, q.ld = ld;
  q.hi = plane(hi, "hi");
  q.lo = lo.has_value() ? plane(*lo, "lo") : nullptr;
  q.scale = f32(scale, rows * groups, name + ": scale");
  q.minimum = f32(minimum, rows * groups, name + ": minimum");
  q.q4_reads_lo = q4_reads_lo && q.lo != nullptr;
  return q;
}

// y [M, N] (=|+=) x [M, K] (fp32, quantized here per group of 32) against a q8/q4 weight.
void qlinear(const at::Tensor& hi, const std::optional<at::Tensor>& lo, const at::Tensor& scale,
             const at::Tensor& minimum, const at::Tensor& x, const at::Tensor& bands,
             int64_t flavour, at::Tensor& y, bool q8, bool accumulate, bool simd, int64_t threads,
             bool q4_reads_lo) {
  const es::QMat w = as_qmat(hi, lo, scale, minimum, q4_reads_lo, "w");
  require(flavour == 0 || flavour == 1, "flavour: 0 (output prefix) or 1 (input prefix)");
  const auto fl = static_cast<es::Flavour>(flavour);
  const std::vector<es::Band> b = as_bands(bands);
  require(!b.empty(), "bands: at least one band is needed");
  require(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1, "x: [M, K] fp32");
  require(y.scalar_type() == at::kFloat && y.dim() == 2 && y.stride(1) == 1, "y: [M, N] fp32");
  const int64_t rows = b.back().row_end;
  const int64_t k_need = fl == es::Flavour::OUT_PREFIX ? w.cols : b.front().width;
  const int64_t n_need = fl == es::Flavour::OUT_PREFIX ? b.front().width : w.rows;
  require(x.size(0) >= rows && y.size(0) >= rows, "x and y need the bands' rows");
  require(x.size(1) >= k_need, "x: too few columns for the bands");
  require(y.size(1) >= n_need, "y: too few columns for the bands");
  require(k_need % es::QGROUP == 0, "the bands' input width must be whole groups of 32");
  require(!simd || es::cpu_supported(), "this CPU lacks AVX2/FMA/F16C");
  pybind11::gil_scoped_release release;
  if (threads > 0) omp_set_num_threads(int(threads));
  es::QuantX qx;
  es::quantize_x(x.data_ptr<float>(), x.stride(0), rows, k_need / es::QGROUP, qx);
  (simd ? es::qlinear : es::qlinear_scalar)(w, q8, qx, b.data(), int(b.size()), fl,
                                            y.data_ptr<float>(), y.stride(0), accumulate);
}

// Sum of a float32 tensor on `threads` threads: the read-bandwidth probe of the benchmarks.
double read_probe(const at::Tensor& x, int64_t threads) {
  const float* p = f32(x, x.numel(), "x");
  require(es::cpu_supported(), "this CPU lacks AVX2/FMA/F16C");
  pybind11::gil_scoped_release release;
  if (threads > 0) omp_set_num_threads(int(threads));
  return es::read_sum(p, x.numel());
}

class NativeModel {
 public:
  NativeModel(std::vector<int64_t> dims, double eps, std::vector<std::vector<at::Tensor>> layers,
              at::Tensor final_norm, at::Tensor embed, at::Tensor head, at::Tensor cos,
              at::Tensor sin, std::vector<at::Tensor> shape_tables, at::Tensor bias_o,
              at::Tensor bias_down, std::vector<std::vector<pybind11::object>> quant_layers,
              pybind11::object quant_head) {
    require(es::cpu_supported(), "the native decoder needs AVX2, FMA and F16C");
    require(dims.size() == 7, "dims: hidden, heads, kv_heads, head_dim, intermediate, vocab, layers");
    es::Model& m = model_;
    m.hidden = int32_t(dims[0]), m.num_heads = int32_t(dims[1]), m.num_kv_heads = int32_t(dims[2]);
    m.head_dim = int32_t(dims[3]), m.intermediate = int32_t(dims[4]), m.vocab = int32_t(dims[5]);
    m.num_layers = int32_t(dims[6]);
    m.eps = float(eps);
    require(m.num_kv_heads > 0 && m.num_heads % m.num_kv_heads == 0, "heads: not whole groups");
    require(int64_t(layers.size()) == m.num_layers, "layers: one entry per layer");
    const int64_t H = m.hidden, I = m.intermediate, hd = m.head_dim;
    const int64_t qkv_rows = 2 * m.num_kv_heads * hd + m.num_heads * hd;
    auto keep = [&](const at::Tensor& t) -> const at::Tensor& { return held_.emplace_back(t); };
    auto mat = [&](const at::Tensor& t, int64_t rows, int64_t cols, const std::string& name) {
      const Mat w = as_mat(keep(t), name);
      require(w.rows == rows && w.cols == cols, name + ": expected [" + std::to_string(rows) +
                                                    ", " + std::to_string(cols) + "]");
      return w;
    };
    for (int64_t l = 0; l < m.num_layers; ++l) {
      const auto& t = layers[size_t(l)];
      const std::string p = "layer " + std::to_string(l) + " ";
      require(t.size() == 8, p + "needs attn_norm, qkv, qkv_bias, o, mlp_norm, gate, up, down");
      es::LayerWeights w{};
      w.attn_norm = f32(keep(t[0]), H, p + "attn_norm");
      w.qkv = mat(t[1], qkv_rows, H, p + "qkv");
      w.qkv_bias = t[2].numel() ? f32(keep(t[2]), qkv_rows, p + "qkv_bias") : nullptr;
      w.o = mat(t[3], H, m.num_heads * hd, p + "o");
      w.mlp_norm = f32(keep(t[4]), H, p + "mlp_norm");
      w.gate = mat(t[5], I, H, p + "gate");
      w.up = mat(t[6], I, H, p + "up");
      w.down = mat(t[7], H, I, p + "down");
      m.layers.push_back(w);
    }
    m.final_norm = f32(keep(final_norm), H, "final_norm");
    m.embed = mat(embed, m.vocab, H, "embed");
    m.head = mat(head, m.vocab, H, "head");
    require(cos.dim() == 2 && cos.size(1) == hd && sin.sizes() == cos.sizes(), "cos/sin: [P, hd]");
    m.max_pos = cos.size(0);
    m.cos = f32(keep(cos), cos.numel(), "cos");
    m.sin = f32(keep(sin), sin.numel(), "sin");
    require(shape_tables.size() == 5, "shape_tables: kept, heads, mlp, bias, precision");
    const int64_t S = shape_tables[0].numel() / m.num_layers;
    require(S > 0 && S * m.num_layers == shape_tables[0].numel(), "shape tables: [S, layers]");
    m.shapes.num_shapes = int32_t(S);
    const int32_t* tab[4];
    for (int i = 0; i < 4; ++i)
      tab[i] = ints<int32_t>(keep(shape_tables[i]), at::kInt, S * m.num_layers, "shape table");
    m.shapes.kept = tab[0], m.shapes.heads = tab[1], m.shapes.mlp = tab[2], m.shapes.bias = tab[3];
    m.shapes.precision = ints<int32_t>(keep(shape_tables[4]), at::kInt, S, "precision table");
    m.num_bias = int32_t(bias_o.numel() / std::max<int64_t>(H, 1));
    m.bias_o = m.num_bias ? f32(keep(bias_o), int64_t(m.num_bias) * H, "bias_o") : nullptr;
    m.bias_down = m.num_bias ? f32(keep(bias_down), int64_t(m.num_bias) * H, "bias_down") : nullptr;
    for (int64_t i = 0; i < S * m.num_layers; ++i) {
      require(tab[1][i] >= 0 && tab[1][i] <= m.num_heads && tab[1][i] % m.num_kv_heads == 0,
              "shape tables: heads must be whole KV groups within the layer");
      require(tab[2][i] >= 0 && tab[2][i] <= m.intermediate, "shape tables: MLP width too large");
      require(tab[3][i] >= -1 && tab[3][i] < m.num_bias, "shape tables: bias row out of range");
    }
    bool quantized = false;
    for (int64_t i = 0; i < S; ++i) {
      const int32_t p = m.shapes.precision[i];
      require(p >= 0 && p <= 2, "precision table: 0 (dense), 1 (q8) or 2 (q4)");
      if (p == 0) continue;
      quantized = true;
      for (int64_t l = 0; l < m.num_layers; ++l) {
        const int64_t at = i * m.num_layers + l;
        require(tab[1][at] * hd % es::QGROUP == 0 && tab[2][at] % es::QGROUP == 0,
                "shape tables: a quantized shape's kept heads and channels must be whole "
                "groups of 32 input features");
      }
    }
    require(!quantized || H % es::QGROUP == 0, "quantized shapes need a hidden size that is a "
                                                "multiple of 32");
    if (quantized) {
      require(int64_t(quant_layers.size()) == m.num_layers, "quant_layers: one entry per layer");
      for (int64_t l = 0; l < m.num_layers; ++l) {
        const auto& q = quant_layers[size_t(l)];
        const std::string p = "layer " + std::to_string(l) + " ";
        require(q.size() == 5, p + "needs quantized qkv, o, gate, up, down");
        es::LayerWeights& w = m.layers[size_t(l)];
        w.qqkv = qmat(q[0], qkv_rows, H, p + "qkv");
        w.qo = qmat(q[1], H, m.num_heads * hd, p + "o");
        w.qgate = qmat(q[2], I, H, p + "gate");
        w.qup = qmat(q[3], I, H, p + "up");
        w.qdown = qmat(q[4], H, I, p + "down");
      }
      m.qhead = qmat(quant_head, m.vocab, H, "head");
    }
    forward_ = std::make_unique<es::Forward>(model_);
  }

  // (hi, lo or None, scale, minimum, q4_reads_lo) -> QMat of the given dimensions
  es::QMat qmat(const pybind11::object& t, int64_t rows, int64_t cols, const std::string& name) {
    const auto parts = t.cast<pybind11::tuple>();
    require(parts.size() == 5, name + ": (hi, lo, scale, minimum, q4_reads_lo)");
    std::optional<at::Tensor> lo;
    if (!parts[1].is_none()) lo = parts[1].cast<at::Tensor>();
    const at::Tensor hi = parts[0].cast<at::Tensor>(), scale = parts[2].cast<at::Tensor>();
    const at::Tensor minimum = parts[3].cast<at::Tensor>();
    for (const at::Tensor& t : {hi, scale, minimum}) held_.push_back(t);  // kept alive
    if (lo) held_.push_back(*lo);
    const es::QMat q = as_qmat(hi, lo, scale, minimum, parts[4].cast<bool>(), name);
    require(q.rows == rows && q.cols == cols, name + ": expected [" + std::to_string(rows) + ", " +
                                                  std::to_string(cols) + "] quantized");
    return q;
  }

  // The shape-aware LoRA experts: a[l] and b[l] hold layer l's (q, o, gate, up, down) experts,
  // a [E, in, r] and b [E, r, out] fp32; route [S, 2] each shape's two experts (-1: none), gain
  // [S, 2] their weights times alpha / r. Empty lists: no adapters.
  void set_lora(const std::vector<std::vector<at::Tensor>>& a,
                const std::vector<std::vector<at::Tensor>>& b, const at::Tensor& route,
                const at::Tensor& gain) {
    const es::Model& m = model_;
    es::Lora lora;
    std::vector<at::Tensor> held;
    if (!a.empty()) {
      require(int64_t(a.size()) == m.num_layers && b.size() == a.size(),
              "lora: one (q, o, gate, up, down) list of experts per layer");
      const int64_t H = m.hidden, I = m.intermediate, Q = int64_t(m.num_heads) * m.head_dim;
      const int64_t dims[es::LORA_SITES][2] = {{H, Q}, {Q, H}, {H, I}, {H, I}, {I, H}};
      require(!a[0].empty() && a[0][0].dim() == 3, "lora: a must be [E, in, r]");
      lora.experts = int32_t(a[0].at(0).size(0));
      lora.rank = int32_t(a[0].at(0).size(2));
      require(lora.experts > 0 && lora.rank > 0 && lora.rank <= 64, "lora: 1 to 64 ranks");
      for (int64_t l = 0; l < m.num_layers; ++l) {
        require(a[size_t(l)].size() == es::LORA_SITES && b[size_t(l)].size() == es::LORA_SITES,
                "lora: q, o, gate, up and down experts in every layer");
        for (int site = 0; site < es::LORA_SITES; ++site) {
          const at::Tensor ta = a[size_t(l)][size_t(site)], tb = b[size_t(l)][size_t(site)];
          held.push_back(ta), held.push_back(tb);  // handles: the data stays where it is
          const int64_t in = dims[site][0], out = dims[site][1];
          const std::string p = "lora layer " + std::to_string(l) + " linear " +
                                std::to_string(site);
          require(ta.dim() == 3 && ta.size(0) == lora.experts && ta.size(1) == in &&
                      ta.size(2) == lora.rank,
                  p + ": a must be [E, in, r]");
          require(tb.dim() == 3 && tb.size(0) == lora.experts && tb.size(1) == lora.rank &&
                      tb.size(2) == out,
                  p + ": b must be [E, r, out]");
          lora.linears.push_back({f32(ta, ta.numel(), p + " a"), f32(tb, tb.numel(), p + " b")});
        }
      }
      const int64_t S = m.shapes.num_shapes;
      held.push_back(route), held.push_back(gain);
      lora.route = ints<int32_t>(route, at::kInt, 2 * S, "lora route");
      lora.gain = f32(gain, 2 * S, "lora gain");
      for (int64_t i = 0; i < 2 * S; ++i)
        require(lora.route[i] >= -1 && lora.route[i] < lora.experts &&
                    (lora.route[i] < 0) == (lora.route[i - i % 2] < 0),
                "lora route: two experts per adapted shape, -1 -1 for the others");
    }
    forward_->set_lora(std::move(lora));
    lora_held_ = std::move(held);  // after the swap: no step reads the old tensors now
  }

  at::Tensor forward(const at::Tensor& tokens, const at::Tensor& positions,
                     const at::Tensor& row_shape, const at::Tensor& row_seq,
                     const at::Tensor& blocks, const at::Tensor& logit_rows, at::Tensor& cache,
                     int64_t block_size, int64_t threads) {
    const es::Model& m = model_;
    es::Step s{};
    s.rows = tokens.numel();
    s.tokens = ints<int64_t>(tokens, at::kLong, -1, "tokens");
    s.positions = ints<int64_t>(positions, at::kLong, s.rows, "positions");
    s.row_shape = ints<int32_t>(row_shape, at::kInt, s.rows, "row_shape");
    s.row_seq = ints<int32_t>(row_seq, at::kInt, s.rows, "row_seq");
    require(blocks.dim() == 3 && blocks.size(0) == m.num_layers, "blocks: [layers, seqs, blocks]");
    s.num_seqs = blocks.size(1), s.max_blocks = blocks.size(2);
    s.blocks = ints<int32_t>(blocks, at::kInt, -1, "blocks");
    s.logit_rows = ints<int64_t>(logit_rows, at::kLong, -1, "logit_rows");
    s.num_logits = logit_rows.numel();
    require(cache.dim() == 4 && cache.size(1) == 2 && cache.size(2) == m.num_kv_heads &&
                cache.size(3) == m.head_dim,
            "cache: [slots, 2, kv_heads, head_dim]");
    s.cache = const_cast<float*>(f32(cache, cache.numel(), "cache"));
    s.num_slots = cache.size(0);
    s.block_size = int32_t(block_size);
    at::Tensor logits = at::empty({s.num_logits, m.vocab}, at::kFloat);
    {
      pybind11::gil_scoped_release release;
      forward_->run(s, logits.data_ptr<float>(), int(threads));
    }
    return logits;
  }

 private:
  es::Model model_{};
  std::vector<at::Tensor> held_;  // the tensors model_ points into, kept alive
  std::vector<at::Tensor> lora_held_;  // the adapters' tensors, likewise
  std::unique_ptr<es::Forward> forward_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "elasticserve's native CPU kernels";
  mod.def("cpu_supported", &es::cpu_supported, "AVX2, FMA and F16C present");
  mod.def("linear", &linear, "band linear", pybind11::arg("w"), pybind11::arg("x"),
          pybind11::arg("bands"), pybind11::arg("flavour"), pybind11::arg("y"),
          pybind11::arg("accumulate") = false, pybind11::arg("simd") = true,
          pybind11::arg("threads") = 0);
  mod.def("qlinear", &qlinear, "band linear on a q8/q4 weight", pybind11::arg("hi"),
          pybind11::arg("lo"), pybind11::arg("scale"), pybind11::arg("minimum"), pybind11::arg("x"),
          pybind11::arg("bands"), pybind11::arg("flavour"), pybind11::arg("y"),
          pybind11::arg("q8"), pybind11::arg("accumulate") = false, pybind11::arg("simd") = true,
          pybind11::arg("threads") = 0, pybind11::arg("q4_reads_lo") = false);
  mod.def("vnni_supported", &es::vnni_supported, "AVX-512 VNNI present (the q8/q4 kernels use it)");
  mod.def("use_vnni", &es::use_vnni, "allow the VNNI q8/q4 kernels (tests); returns the old value",
          pybind11::arg("allow"));
  mod.def("amx_supported", &es::amx_supported,
          "AMX-BF16 present and granted (the bf16 linears use it)");
  mod.def("amx_int8_supported", &es::amx_int8_supported,
          "AMX-INT8 present and granted (the q8/q4 linears of several rows use it)");
  mod.attr("qamx_min_rows") = es::QAMX_MIN_ROWS;  // steps of this many rows run the int8 tiles
  mod.def("use_amx", &es::use_amx, "allow the AMX kernels (tests); returns the old value",
          pybind11::arg("allow"));
  mod.def("avx512_attention_active", &es::avx512_attention_active,
          "the tiled attention runs at 16 lanes (AVX-512 present and allowed)");
  mod.def("use_avx512_attention", &es::use_avx512_attention,
          "allow the AVX-512 tiled attention (tests, benchmarks); returns the old value",
          pybind11::arg("allow"));
  mod.def("use_onednn", &es::use_onednn,
          "allow oneDNN for the dense linears of prefill-sized steps (tests, benchmarks); returns "
          "the old value",
          pybind11::arg("allow"));
  mod.def("read", &read_probe, "sum of a float32 tensor (read-bandwidth probe)", pybind11::arg("x"),
          pybind11::arg("threads") = 0);
  pybind11::class_<NativeModel>(mod, "NativeModel")
      .def(pybind11::init<std::vector<int64_t>, double, std::vector<std::vector<at::Tensor>>,
                          at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                          std::vector<at::Tensor>, at::Tensor, at::Tensor,
                          std::vector<std::vector<pybind11::object>>, pybind11::object>())
      .def("set_lora", &NativeModel::set_lora, "bind the shape-aware LoRA experts",
           pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("route"), pybind11::arg("gain"))
      .def("forward", &NativeModel::forward, "one decoder step", pybind11::arg("tokens"),
           pybind11::arg("positions"), pybind11::arg("row_shape"), pybind11::arg("row_seq"),
           pybind11::arg("blocks"), pybind11::arg("logit_rows"), pybind11::arg("cache"),
           pybind11::arg("block_size"), pybind11::arg("threads") = 0);
}
