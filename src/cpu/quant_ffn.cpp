// CPU implementation of the grouped expert FFN (src/ops/expert_ffn.h) for quantized weights
// (int8, int4, mxfp4), inference only.
//
// Weights: a group whose views are already in the layer's format (a quantized checkpoint
// layer, borrowed) is read where it lies; fp32 or bf16 views are quantized per expert when
// tokens first reach it (quantize_row, the rules of quant.h), kept until invalidate(), like the
// fp32/bf16 path's packing.
// Forward, per group e with rows R_e:
//   q(x)  = the token rows rounded to int8 (once per token, not per assignment)
//   pre   = q(X[R_e]) · W_gate_upᵀ + b_gate_up          quant_dot, fp32 out
//   h     = act(pre)                                    fp32
//   y     = w ⊙ (q(h) · W_downᵀ + b_down)               quant_dot, the combine weight as a row scale
// Experts with at least kPanelRows rows (prefill) take the panel path instead (quant_kernels.h):
// per block of weight rows, the codes are dequantized into an fp32 scratch, packed as the fp32
// GEMM's B and multiplied with the fp32 rows in place (GEMM 1 fuses the activation; GEMM 2 takes
// h unrounded), so the whole weight is never held in fp32.
// Work is cut into (group, row block, weight-row block) tiles of equal weight-row counts, pulled
// from one queue: the weight bytes a tile streams are the same for every expert, so an expert
// with one token and one with nine keep both cores busy. Every output element is written by one
// tile with a fixed summation order: bitwise the same for any thread count.
#include <algorithm>
#include <cstring>
#include <map>
#include <string>

#include "cpu/activation.h"
#include "cpu/backend.h"
#include "cpu/exec.h"
#include "cpu/gemm.h"
#include "cpu/quant_kernels.h"
#include "moekit/error.h"
#include "moekit/quant.h"
#include "ops/expert_ffn.h"

namespace moekit::cpu {
namespace {

using ops::Group;
using ops::OpContext;
using ops::RowSpace;

// The weights of one expert matrix [rows, cols] in the layer's format: borrowed or owned here.
// Not just a WeightView: when the layer's weights are fp32 or bf16 it owns the codes and
// scales quantized here, which its view points at.
struct QuantWeight {
  WeightView view;                     // one expert, quantized (quant_kernels.h)
  std::vector<uint8_t> codes, scales;  // owned when quantized here
};

// Element (r, c) of a one-expert fp32/bf16 weight (strides, up half elsewhere) as float.
float element(const WeightView& w, int64_t r, int64_t c) {
  const WeightView::Element at = w.element(0, r, c);
  const auto* base = static_cast<const uint8_t*>(at.base);
  if (w.dtype == moekit::DType::kBF16) {
    uint16_t b;
    std::memcpy(&b, base + 2 * at.offset, 2);
    return bf16_to_float(b);
  }
  float f;
  std::memcpy(&f, base + 4 * at.offset, 4);
  return f;
}

class CpuQuantExpertFfn final : public ops::ExpertFfn {
 public:
  explicit CpuQuantExpertFfn(const ops::ExpertFfnConfig& c) : c_(c) {}

  void invalidate() override {
    std::fill(valid_.begin(), valid_.end(), 0);
    for (auto& w : gate_up_) w = QuantWeight{};
    for (auto& w : down_) w = QuantWeight{};
  }

  ConstMatrixView<float> forward(const OpContext& ctx, const RowSpace& rs, ops::ExpertFfnSaved* saved) override;

  ops::ExpertFfnBackwardResult backward(const OpContext&, const RowSpace&, ops::ExpertFfnSaved&,
                                        std::span<const ops::ExpertGrads>) override {
    throw_config_error("dtype", "fp32 or bf16 for a backward (quantized experts run inference only)",
                       dtype_name(c_.weight_format));
  }

 private:
  void prepare_weights(const OpContext& ctx, const RowSpace& rs);
  QuantWeight make_weight(const WeightView& w, int64_t rows, int64_t cols, const char* name) const;
  // Quantized rows of every distinct A source (hidden_states, slot inputs), once per row.
  void quantize_inputs(const OpContext& ctx, const RowSpace& rs);

  ops::ExpertFfnConfig c_;
  std::vector<uint8_t> valid_;
  std::vector<QuantWeight> gate_up_, down_;
  // Quantized A rows: per distinct source pointer its first row in a_q_ / a_d_.
  std::vector<int8_t> a_q_, h_q_;
  std::vector<float> a_d_, h_d_;
  std::map<const float*, int64_t> a_first_;
  Workspace h_ws_, y_ws_;
  std::vector<std::vector<float>> scratch_;  // per thread: the gate and up dots of one tile
  // Panel path, per thread: a dequantized weight block, its pack, its bias block.
  std::vector<std::vector<float>> panel_w_, panel_bias_;
  std::vector<Workspace> panel_pack_;
  PackedWeight pack_panel(const OpContext& ctx, const float* w, int64_t rows, int64_t cols, bool paired, int thread);
  void panel_gemm1(const OpContext& ctx, const Group& g, const WeightView& w, int64_t n0, int64_t n1, float* h, int thread);
  void panel_gemm2(const OpContext& ctx, const Group& g, const WeightView& w, int64_t n0, int64_t n1, const float* h,
                   MatrixView<float> y, int thread);
};

// Width of a panel tile in output columns (h columns in GEMM 1, d_model columns in GEMM 2).
constexpr int64_t kPanelCols = 128;

// The panels' type: bf16 where the CPU multiplies bf16 natively (vdpbf16ps: twice the fp32
// FMA rate; the activations and the dequantized weights are then rounded to bf16, as a bf16
// layer's are: exact for mxfp4's values, one rounding of 2⁻⁹ for int8's and int4's), else fp32.
DType panel_dtype(Isa isa) { return isa == Isa::kAvx512Bf16 ? DType::kBF16 : DType::kF32; }


// A dequantized weight block W [rows, cols] (row-major) as the GEMM's B [cols, rows], packed
// into this thread's panel memory.
PackedWeight CpuQuantExpertFfn::pack_panel(const OpContext& ctx, const float* w, int64_t rows, int64_t cols, bool paired,
                                           int thread) {
  const DType pd = panel_dtype(isa_of(ctx));
  const size_t bytes = PackedWeight::packed_bytes(cols, rows, pd, isa_of(ctx), paired);
  return PackedWeight::pack_operand(Operand{w, DType::kF32, 1, cols}, cols, rows, pd, isa_of(ctx), paired,
                                    panel_pack_[static_cast<size_t>(thread)].get<uint8_t>(static_cast<int64_t>(bytes)));
}

// h[:, n0:n1] = act(X[R] · W_gate_upᵀ + b) for the gate rows [n0, n1) (and up rows d_ff + [n0, n1)).
void CpuQuantExpertFfn::panel_gemm1(const OpContext& ctx, const Group& g, const WeightView& w, int64_t n0,
                                    int64_t n1, float* h, int thread) {
  const int64_t d = c_.d_model, nb = n1 - n0;
  const bool gated = is_gated(c_.activation);
  const int64_t rows = gated ? 2 * nb : nb;
  std::vector<float>& wb = panel_w_[static_cast<size_t>(thread)];
  wb.resize(static_cast<size_t>(rows * d));
  for (int64_t r = 0; r < nb; ++r) {
    dequantize_weight_row(isa_of(ctx), w, n0 + r, wb.data() + r * d);
    if (gated) dequantize_weight_row(isa_of(ctx), w, g.d_ff + n0 + r, wb.data() + (nb + r) * d);
  }
  std::vector<float>& bias = panel_bias_[static_cast<size_t>(thread)];
  if (g.b_gate_up) {
    bias.resize(static_cast<size_t>(rows));
    for (int64_t r = 0; r < nb; ++r) {
      bias[static_cast<size_t>(r)] = g.b_gate_up[n0 + r];
      if (gated) bias[static_cast<size_t>(nb + r)] = g.b_gate_up[g.d_ff + n0 + r];
    }
  }
  const PackedWeight pack = pack_panel(ctx, wb.data(), rows, d, gated, thread);
  GemmProblem q;
  q.m = g.num_rows;
  q.n = nb;
  q.k = d;
  q.a = {g.a, DType::kF32, d, 1, g.a_rows};
  q.c = h + g.h_offset + n0;
  q.ldc = g.d_ff;
  q.epilogue.activation = epilogue_activation(c_.activation);
  q.epilogue.bias = g.b_gate_up ? bias.data() : nullptr;
  q.epilogue.clamp_limit = float(c_.activation_constants.clamp_limit);
  q.epilogue.clamp_alpha = float(c_.activation_constants.clamp_alpha);
  gemm_packed(q, pack, 0, g.num_rows, 0, nb);
}

// y[:, n0:n1] = scale ⊙ (h · W_downᵀ + b) for the down rows [n0, n1).
void CpuQuantExpertFfn::panel_gemm2(const OpContext& ctx, const Group& g, const WeightView& w, int64_t n0,
                                    int64_t n1, const float* h, MatrixView<float> y, int thread) {
  const int64_t f = g.d_ff, nb = n1 - n0;
  std::vector<float>& wb = panel_w_[static_cast<size_t>(thread)];
  wb.resize(static_cast<size_t>(nb * f));
  for (int64_t r = 0; r < nb; ++r) dequantize_weight_row(isa_of(ctx), w, n0 + r, wb.data() + r * f);
  const PackedWeight pack = pack_panel(ctx, wb.data(), nb, f, false, thread);
  GemmProblem q;
  q.m = g.num_rows;
  q.n = nb;
  q.k = f;
  q.a = {h + g.h_offset, DType::kF32, f, 1};
  q.c = y.row(g.row_begin) + n0;
  q.ldc = c_.d_model;
  q.epilogue.bias = g.b_down ? g.b_down + n0 : nullptr;
  q.epilogue.row_scale = g.scale;
  gemm_packed(q, pack, 0, g.num_rows, 0, nb);
}

QuantWeight CpuQuantExpertFfn::make_weight(const WeightView& w, int64_t rows, int64_t cols,
                                           const char* name) const {
  const moekit::DType f = c_.weight_format;
  QuantWeight q;
  q.view.dtype = f;
  q.view.rows = rows;
  q.view.cols = cols;
  if (w.dtype == f) {  // borrowed where it lies
    q.view.data = w.data;
    q.view.scales = w.scales;
    return q;
  }
  const int64_t code_bytes = quantized_code_bytes(f, cols), scale_bytes = quantized_scale_bytes(f, cols);
  q.codes.resize(static_cast<size_t>(rows * code_bytes));
  q.scales.resize(static_cast<size_t>(rows * scale_bytes));
  std::vector<float> row(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) row[static_cast<size_t>(c)] = element(w, r, c);
    quantize_row(f, row.data(), cols, q.codes.data() + r * code_bytes, q.scales.data() + r * scale_bytes, name, r);
  }
  q.view.data = q.codes.data();
  q.view.scales = q.scales.data();
  return q;
}

void CpuQuantExpertFfn::prepare_weights(const OpContext& ctx, const RowSpace& rs) {
  const size_t groups = rs.groups.size();
  if (valid_.size() != groups) {
    valid_.assign(groups, 0);
    gate_up_.assign(groups, QuantWeight{});
    down_.assign(groups, QuantWeight{});
  }
  std::vector<size_t> todo;
  for (size_t gi = 0; gi < groups; ++gi)
    if (rs.groups[gi].num_rows > 0 && !valid_[gi]) todo.push_back(gi);
  run_tasks(ctx, static_cast<int64_t>(todo.size()), [&](int64_t i, int) {
    const size_t gi = todo[static_cast<size_t>(i)];
    const Group& g = rs.groups[gi];
    const bool shared = g.expert == c_.num_groups - 1 && rs.routed_rows < rs.total_rows;
    const std::string at = shared ? std::string("[shared]") : detail::concat("[expert ", g.expert, "]");
    gate_up_[gi] = make_weight(g.w_gate_up, g.gu_cols, c_.d_model, ((shared ? "shared_gate_up" : "gate_up") + at).c_str());
    down_[gi] = make_weight(g.w_down, c_.d_model, g.d_ff, ((shared ? "shared_down" : "down") + at).c_str());
    valid_[gi] = 1;
  });
}

void CpuQuantExpertFfn::quantize_inputs(const OpContext& ctx, const RowSpace& rs) {
  const int64_t d = c_.d_model, spr = activation_scales_per_row(c_.weight_format, d);
  // Rows each source needs: the largest token index read from it, plus one.
  std::map<const float*, int64_t> rows_of;
  for (const Group& g : rs.groups) {
    if (g.num_rows == 0) continue;
    int64_t need = g.num_rows;
    if (g.a_rows) need = *std::max_element(g.a_rows, g.a_rows + g.num_rows) + 1;
    int64_t& r = rows_of[g.a];
    r = std::max(r, need);
  }
  a_first_.clear();
  int64_t total = 0;
  std::vector<std::pair<const float*, int64_t>> rows;  // (row pointer, destination row)
  for (const auto& [src, n] : rows_of) {
    a_first_[src] = total;
    for (int64_t r = 0; r < n; ++r) rows.emplace_back(src + r * d, total + r);
    total += n;
  }
  a_q_.resize(static_cast<size_t>(total * d));
  a_d_.resize(static_cast<size_t>(total * spr));
  run_blocks(ctx, static_cast<int64_t>(rows.size()), 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const auto& [x, dst] = rows[static_cast<size_t>(i)];
      quantize_activation_row(isa_of(ctx), c_.weight_format, x, d, a_q_.data() + dst * d, a_d_.data() + dst * spr);
    }
  });
}

ConstMatrixView<float> CpuQuantExpertFfn::forward(const OpContext& ctx, const RowSpace& rs, ops::ExpertFfnSaved* saved) {
  if (saved != nullptr) {
    throw_config_error("dtype", "fp32 or bf16 for a training forward (quantized experts run inference only)",
                       dtype_name(c_.weight_format));
  }
  const moekit::DType f = c_.weight_format;
  const int64_t d = c_.d_model;
  prepare_weights(ctx, rs);
  ctx.phase("pack_experts");
  quantize_inputs(ctx, rs);
  ctx.phase("quantize_x");

  // GEMM 1 and the activation: h [rows, d_ff] per group at h_offset.
  float* h = h_ws_.get<float>(rs.h_size);
  const bool gated = is_gated(c_.activation);
  auto panel = [&](int64_t g) { return rs.groups[static_cast<size_t>(g)].num_rows >= kPanelRows; };
  auto dot_rows = [&](int64_t g) { return panel(g) ? int64_t{0} : rs.groups[static_cast<size_t>(g)].num_rows; };
  const auto tiles1 = make_tiles(
      static_cast<int64_t>(rs.groups.size()), dot_rows, [&](int64_t g) { return rs.groups[g].d_ff; }, ctx.num_threads);
  // Panel tiles: (group, column block), every row of the group.
  auto panel_tiles = [&](auto cols_of) {
    std::vector<Tile> t;
    for (size_t gi = 0; gi < rs.groups.size(); ++gi) {
      if (!panel(static_cast<int64_t>(gi))) continue;
      const int64_t n = cols_of(rs.groups[gi]);
      for (int64_t n0 = 0; n0 < n; n0 += kPanelCols)
        t.push_back({static_cast<int32_t>(gi), 0, rs.groups[gi].num_rows, n0, std::min(n, n0 + kPanelCols)});
    }
    return t;
  };
  scratch_.resize(static_cast<size_t>(ctx.num_threads));
  panel_w_.resize(static_cast<size_t>(ctx.num_threads));
  panel_bias_.resize(static_cast<size_t>(ctx.num_threads));
  panel_pack_.resize(static_cast<size_t>(ctx.num_threads));
  const std::vector<Tile> panel1 = panel_tiles([](const Group& g) { return g.d_ff; });
  run_tiles(ctx, panel1, [&](const Tile& t, int thread) {
    panel_gemm1(ctx, rs.groups[static_cast<size_t>(t.group)], gate_up_[static_cast<size_t>(t.group)].view, t.n0, t.n1, h,
                thread);
  });
  const int64_t spr_x = activation_scales_per_row(f, d);
  run_tiles(ctx, tiles1, [&](const Tile& t, int thread) {
    const Group& g = rs.groups[static_cast<size_t>(t.group)];
    const int64_t rows = t.m1 - t.m0, cols = t.n1 - t.n0;
    std::vector<const int8_t*> q(static_cast<size_t>(rows));
    std::vector<const float*> dq(static_cast<size_t>(rows));
    const int64_t first = a_first_.at(g.a);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = first + g.src(t.m0 + i);
      q[static_cast<size_t>(i)] = a_q_.data() + r * d;
      dq[static_cast<size_t>(i)] = a_d_.data() + r * spr_x;
    }
    std::vector<float>& s = scratch_[static_cast<size_t>(thread)];
    s.resize(static_cast<size_t>(2 * rows * cols));
    float* gate = s.data();
    float* up = s.data() + rows * cols;
    const WeightView& w = gate_up_[static_cast<size_t>(t.group)].view;
    quant_dot(isa_of(ctx), w, t.n0, t.n1, q.data(), dq.data(), rows, gate, cols);
    if (gated) quant_dot(isa_of(ctx), w, g.d_ff + t.n0, g.d_ff + t.n1, q.data(), dq.data(), rows, up, cols);
    for (int64_t i = 0; i < rows; ++i) {
      float* gi = gate + i * cols;
      float* ui = up + i * cols;
      if (g.b_gate_up) {
        for (int64_t j = 0; j < cols; ++j) {
          gi[j] += g.b_gate_up[t.n0 + j];
          if (gated) ui[j] += g.b_gate_up[g.d_ff + t.n0 + j];
        }
      }
      float* hi = h + g.h_offset + (t.m0 + i) * g.d_ff + t.n0;
      if (c_.activation == ExpertActivation::kSwiGlu) {
        swiglu_forward_row(isa_of(ctx), gi, ui, cols, false, hi);
      } else {
        for (int64_t j = 0; j < cols; ++j)
          hi[j] = activation_forward(c_.activation, gi[j], gated ? ui[j] : 0.0f, c_.activation_constants);
      }
    }
  });
  ctx.phase("gemm1");

  // h rounded to int8 per row, then GEMM 2: y = scale ⊙ (q(h) · W_downᵀ + b_down).
  int64_t h_scales = 0;
  std::vector<int64_t> h_scale_offset(rs.groups.size());
  for (size_t gi = 0; gi < rs.groups.size(); ++gi) {
    h_scale_offset[gi] = h_scales;
    h_scales += rs.groups[gi].num_rows * activation_scales_per_row(f, rs.groups[gi].d_ff);
  }
  h_q_.resize(static_cast<size_t>(rs.h_size));
  h_d_.resize(static_cast<size_t>(std::max<int64_t>(h_scales, 1)));
  run_tasks(ctx, static_cast<int64_t>(rs.groups.size()), [&](int64_t gi, int) {
    const Group& g = rs.groups[static_cast<size_t>(gi)];
    if (panel(gi)) return;  // the panel path reads h in fp32
    const int64_t spr = activation_scales_per_row(f, g.d_ff);
    for (int64_t i = 0; i < g.num_rows; ++i)
      quantize_activation_row(isa_of(ctx), f, h + g.h_offset + i * g.d_ff, g.d_ff, h_q_.data() + g.h_offset + i * g.d_ff,
                              h_d_.data() + h_scale_offset[static_cast<size_t>(gi)] + i * spr);
  });
  ctx.phase("quantize_h");

  MatrixView<float> y{y_ws_.get<float>(rs.total_rows * d), rs.total_rows, d};
  const std::vector<Tile> panel2 = panel_tiles([&](const Group&) { return d; });
  run_tiles(ctx, panel2, [&](const Tile& t, int thread) {
    panel_gemm2(ctx, rs.groups[static_cast<size_t>(t.group)], down_[static_cast<size_t>(t.group)].view, t.n0, t.n1, h, y,
                thread);
  });
  const auto tiles2 = make_tiles(
      static_cast<int64_t>(rs.groups.size()), dot_rows, [&](int64_t) { return d; }, ctx.num_threads);
  run_tiles(ctx, tiles2, [&](const Tile& t, int) {
    const Group& g = rs.groups[static_cast<size_t>(t.group)];
    const int64_t rows = t.m1 - t.m0, cols = t.n1 - t.n0;
    const int64_t spr = activation_scales_per_row(f, g.d_ff);
    std::vector<const int8_t*> q(static_cast<size_t>(rows));
    std::vector<const float*> dq(static_cast<size_t>(rows));
    for (int64_t i = 0; i < rows; ++i) {
      q[static_cast<size_t>(i)] = h_q_.data() + g.h_offset + (t.m0 + i) * g.d_ff;
      dq[static_cast<size_t>(i)] = h_d_.data() + h_scale_offset[static_cast<size_t>(t.group)] + (t.m0 + i) * spr;
    }
    float* out = y.row(g.row_begin + t.m0) + t.n0;
    quant_dot(isa_of(ctx), down_[static_cast<size_t>(t.group)].view, t.n0, t.n1, q.data(), dq.data(), rows, out, d);
    for (int64_t i = 0; i < rows; ++i) {
      float* yi = out + i * d;
      const float sc = g.scale ? g.scale[t.m0 + i] : 1.0f;
      for (int64_t j = 0; j < cols; ++j) yi[j] = sc * (yi[j] + (g.b_down ? g.b_down[t.n0 + j] : 0.0f));
    }
  });
  ctx.phase("gemm2");
  return {y.data, y.rows, y.cols};
}

}  // namespace

std::unique_ptr<ops::ExpertFfn> make_cpu_quant_expert_ffn(const ops::ExpertFfnConfig& config) {
  return std::make_unique<CpuQuantExpertFfn>(config);
}

}  // namespace moekit::cpu
