// CPU implementation of the grouped expert FFN (src/ops/expert_ffn.h), fp32 and bf16 weights.
//
// Weights are packed into the micro-kernels' layout lazily, per expert, when tokens first reach
// it after an update (a decode step touches a fraction of the experts), and kept until
// invalidate(): the forward's packs (W_gate_up paired for the fused SwiGLU epilogue in
// inference, plain in training where the raw pre-activations are kept; W_down) and the
// backward's (W_down and W_gate_up as the backward's B). Every pack lives at a fixed offset of
// an arena kept by the object. Training groups with at most kWeightRowsInPlace rows read their
// weights in place instead (they change every step: packing would cost more than the GEMM).
#include <algorithm>
#include <cmath>

#include "cpu/activation.h"
#include "cpu/backend.h"
#include "cpu/exec.h"
#include "cpu/gemm.h"
#include "cpu/gemm_kernels.h"
#include "ops/expert_ffn.h"

namespace moekit::cpu {
namespace {

using ops::ExpertGrads;
using ops::Group;
using ops::OpContext;
using ops::RowSpace;

// Training forward: groups with at most this many rows read their weights in place
// (gemm_weight_rows) instead of packing them after every weight update.
constexpr int64_t kWeightRowsInPlace = 4;

size_t round64(size_t bytes) { return (bytes + 63) / 64 * 64; }

// Row blocks of every group, one column each: for the per-row passes (activation backward,
// transposes) that touch all of a row's columns at once.
std::vector<Tile> row_tiles(const OpContext& ctx, const RowSpace& rs) {
  return make_tiles(
      static_cast<int64_t>(rs.groups.size()), [&](int64_t g) { return rs.groups[g].num_rows; },
      [](int64_t) { return int64_t{1}; }, ctx.num_threads);
}

// One expert's W [n, k] (element (r, c) at r·row_step + c·col_step) as the logical B [k, n] of
// C = A·Wᵀ: W's rows are B's columns, so an up half elsewhere is a split of B's columns.
Operand weight_as_b(const WeightView& w) {
  Operand b{w.data, w.dtype, w.col_step(), w.row_step()};
  b.split_data = w.up_data;
  b.split_at = w.up_data != nullptr ? w.up_row() : 0;
  return b;
}
// W [k, n] used as it is, the logical B of C = A·W (the backward's d_y · W_down, d_pre · W_gate_up):
// an up half elsewhere is a split of B's rows.
Operand weight_as_is(const WeightView& w) {
  Operand b{w.data, w.dtype, w.row_step(), w.col_step()};
  b.split_data = w.up_data;
  b.split_at = w.up_data != nullptr ? w.up_row() : 0;
  b.split_rows = true;
  return b;
}

// Packed B operands per group, kept until invalidated (weights) or rebuilt per call.
struct PackSet {
  Workspace ws;
  std::vector<PackedWeight> packs;
  std::vector<uint8_t> valid;
  void resize(size_t groups) {
    if (valid.size() != groups) {
      valid.assign(groups, 0);
      packs.assign(groups, PackedWeight());
    }
  }
  void invalidate() {
    std::fill(valid.begin(), valid.end(), 0);
    std::fill(packs.begin(), packs.end(), PackedWeight());  // a stale pack is never used
  }
};

class CpuExpertFfn final : public ops::ExpertFfn {
 public:
  explicit CpuExpertFfn(const ops::ExpertFfnConfig& config) : c_(config), weight_dtype_(config.weight_format) {
    detail_gemm::check_dtype("CpuExpertFfn: weight_format", weight_dtype_);  // quantized: quant_ffn.cpp
  }

  void invalidate() override {
    gate_up_.invalidate();
    down_.invalidate();
    down_t_.invalidate();
    gate_up_t_.invalidate();
  }

  ConstMatrixView<float> forward(const OpContext& ctx, const RowSpace& rs, ops::ExpertFfnSaved* saved) override;
  ops::ExpertFfnBackwardResult backward(const OpContext& ctx, const RowSpace& rs, ops::ExpertFfnSaved& saved,
                                        std::span<const ExpertGrads> grads) override;

 private:
  bool bf16() const { return weight_dtype_ == DType::kBF16; }
  void pack_forward_weights(const OpContext& ctx, const RowSpace& rs, bool paired, int64_t unpacked_rows);
  void gemm1(const OpContext& ctx, const RowSpace& rs, bool training, int64_t unpacked_rows, float* pre,
             float* h32, uint16_t* h16);
  void gemm2(const OpContext& ctx, const RowSpace& rs, bool training, int64_t unpacked_rows, const float* pre,
             const float* h32, const uint16_t* h16, MatrixView<float> y);

  // Backward steps (see the header for the math).
  template <typename OperandOf>
  const std::vector<PackedWeight>& pack_weights_cached(const OpContext& ctx, const RowSpace& rs, PackSet& cache,
                                                       OperandOf operand_of);
  template <typename OperandOf>
  std::vector<PackedWeight> pack_activations(const OpContext& ctx, const RowSpace& rs, DType dtype,
                                             OperandOf operand_of);
  template <typename KOf, typename NOf, typename WeightOf, typename AOf, typename COf>
  void rows_times_weight(const OpContext& ctx, const RowSpace& rs, PackSet& cache, const char* pack_phase, KOf k_of,
                         NOf n_of, WeightOf weight_of, AOf a_of, COf c_of);
  void d_hidden(const OpContext& ctx, const RowSpace& rs, float* g_buf);
  void activation_backward_rows(const OpContext& ctx, const RowSpace& rs, float* pre, const float* g_buf,
                                float* h_buf, float* rows_buf, std::vector<float>& d_scale);
  void d_w_down(const OpContext& ctx, const RowSpace& rs, const float* h_buf, const float* rows_buf,
                std::span<const ExpertGrads> grads);
  void d_w_gate_up(const OpContext& ctx, const RowSpace& rs, const float* pre, float* pre_t, float* rows_buf,
                   std::span<const ExpertGrads> grads);
  void d_x_rows(const OpContext& ctx, const RowSpace& rs, const float* pre, float* rows_buf);

  ops::ExpertFfnConfig c_;
  DType weight_dtype_;
  // Forward packs, per group; paired_: W_gate_up is packed paired (fused SwiGLU, inference).
  PackSet gate_up_, down_;
  bool paired_ = false;
  // Backward packs of the weights (W_down, W_gate_up as B), kept until invalidate(), so that
  // gradient accumulation over several backward passes per optimizer step packs them once.
  PackSet down_t_, gate_up_t_;
  Workspace grad_pack_ws_;  // backward: h and X packed as B of the weight gradients
  Workspace hidden_ws_;     // forward h; backward G, h and the transposed d_pre
  Workspace rows_ws_;       // forward y; backward the [rows, d_model] intermediates and d_X
  std::vector<std::vector<float>> scratch_;  // per thread: h of one row block (training)
};

// ---------------------------------------------------------------------------------------------
// Forward.

void CpuExpertFfn::pack_forward_weights(const OpContext& ctx, const RowSpace& rs, bool paired,
                                        int64_t unpacked_rows) {
  const int64_t d = c_.d_model;
  const size_t groups = rs.groups.size();
  gate_up_.resize(groups);
  down_.resize(groups);
  const bool want_paired = paired && is_gated(c_.activation);
  if (want_paired != paired_) {
    gate_up_.invalidate();
    paired_ = want_paired;
  }
  std::vector<size_t> gu_off(groups + 1, 0), dn_off(groups + 1, 0);
  for (size_t gi = 0; gi < groups; ++gi) {
    const Group& g = rs.groups[gi];
    gu_off[gi + 1] = gu_off[gi] + round64(PackedWeight::packed_bytes(d, g.gu_cols, weight_dtype_, isa_of(ctx), paired_));
    dn_off[gi + 1] = dn_off[gi] + round64(PackedWeight::packed_bytes(g.d_ff, d, weight_dtype_, isa_of(ctx), false));
  }
  // An arena that has to grow moves: then nothing in it is valid any more.
  if (gu_off[groups] > gate_up_.ws.capacity()) gate_up_.invalidate();
  if (dn_off[groups] > down_.ws.capacity()) down_.invalidate();
  std::vector<size_t> todo;
  for (size_t gi = 0; gi < groups; ++gi)
    if (rs.groups[gi].num_rows > unpacked_rows && (!gate_up_.valid[gi] || !down_.valid[gi])) todo.push_back(gi);
  if (todo.empty()) return;
  uint8_t* gu_mem = gate_up_.ws.get<uint8_t>(static_cast<int64_t>(gu_off[groups]));
  uint8_t* dn_mem = down_.ws.get<uint8_t>(static_cast<int64_t>(dn_off[groups]));
  run_tasks(ctx, static_cast<int64_t>(todo.size()), [&](int64_t i, int) {
    const size_t gi = todo[static_cast<size_t>(i)];
    const Group& g = rs.groups[gi];
    if (!gate_up_.valid[gi]) {
      gate_up_.packs[gi] = PackedWeight::pack_operand(weight_as_b(g.w_gate_up), d, g.gu_cols, weight_dtype_, isa_of(ctx),
                                                      paired_, gu_mem + gu_off[gi]);
      gate_up_.valid[gi] = 1;
    }
    if (!down_.valid[gi]) {
      down_.packs[gi] = PackedWeight::pack_operand(weight_as_b(g.w_down), g.d_ff, d, weight_dtype_, isa_of(ctx), false,
                                                   dn_mem + dn_off[gi]);
      down_.valid[gi] = 1;
    }
  });
}

// GEMM 1. Inference: h = act(X · W_gate_upᵀ + b) straight from the epilogue (bf16 when the
// weights are: it is the next GEMM's input). Training: the raw pre-activations, kept for
// backward; h is recomputed from them tile by tile in GEMM 2.
void CpuExpertFfn::gemm1(const OpContext& ctx, const RowSpace& rs, bool training, int64_t unpacked_rows, float* pre,
                         float* h32, uint16_t* h16) {
  const int64_t d = c_.d_model;
  const Activation act = epilogue_activation(c_.activation);
  const auto tiles = make_tiles(
      static_cast<int64_t>(rs.groups.size()), [&](int64_t g) { return rs.groups[g].num_rows; },
      [&](int64_t g) { return training ? rs.groups[g].gu_cols : rs.groups[g].d_ff; }, ctx.num_threads);
  run_tiles(ctx, tiles, [&](const Tile& tile, int) {
    const Group& g = rs.groups[tile.group];
    GemmProblem q;
    q.m = g.num_rows;
    q.k = d;
    q.a = {g.a, DType::kF32, d, 1, g.a_rows};
    q.epilogue.bias = g.b_gate_up;
    if (training) {
      q.n = g.gu_cols;
      q.c = pre + g.gu_offset;
    } else {
      q.n = g.d_ff;
      q.epilogue.activation = act;
      q.epilogue.clamp_limit = float(c_.activation_constants.clamp_limit);
      q.epilogue.clamp_alpha = float(c_.activation_constants.clamp_alpha);
      q.c = bf16() ? static_cast<void*>(h16 + g.h_offset) : static_cast<void*>(h32 + g.h_offset);
      q.c_dtype = weight_dtype_;
    }
    q.ldc = q.n;
    if (g.num_rows <= unpacked_rows) {
      gemm_weight_rows(q, g.w_gate_up.data, g.w_gate_up.dtype, g.w_gate_up.row_step(), isa_of(ctx), tile.m0, tile.m1,
                       tile.n0, tile.n1, bf16());
    } else {
      gemm_packed(q, gate_up_.packs[static_cast<size_t>(tile.group)], tile.m0, tile.m1, tile.n0, tile.n1);
    }
  });
}

// GEMM 2: y = scale ⊙ (h · W_downᵀ + b_down), per row.
void CpuExpertFfn::gemm2(const OpContext& ctx, const RowSpace& rs, bool training, int64_t unpacked_rows,
                         const float* pre, const float* h32, const uint16_t* h16, MatrixView<float> y) {
  const int64_t d = c_.d_model;
  // Training recomputes h per tile, so its tiles span every column unless that leaves too few.
  const auto tiles = make_tiles(
      static_cast<int64_t>(rs.groups.size()), [&](int64_t g) { return rs.groups[g].num_rows; },
      [&](int64_t) { return d; }, ctx.num_threads, kRowBlock, training ? std::max(d, kMaxColBlock) : kMaxColBlock);
  scratch_.resize(static_cast<size_t>(ctx.num_threads));
  run_tiles(ctx, tiles, [&](const Tile& tile, int thread) {
    const Group& g = rs.groups[tile.group];
    GemmProblem q;
    q.n = d;
    q.k = g.d_ff;
    q.ldc = d;
    q.epilogue.bias = g.b_down;
    if (training) {
      // h for this row block, from the saved pre-activations.
      const int64_t rows = tile.m1 - tile.m0, f = g.d_ff;
      std::vector<float>& hs = scratch_[static_cast<size_t>(thread)];
      hs.resize(static_cast<size_t>(rows * f));
      const bool gated = is_gated(c_.activation);
      for (int64_t i = 0; i < rows; ++i) {
        const float* a = pre + g.gu_offset + (tile.m0 + i) * g.gu_cols;
        if (c_.activation == ExpertActivation::kSwiGlu) {
          swiglu_forward_row(isa_of(ctx), a, a + f, f, false, hs.data() + i * f);
          continue;
        }
        for (int64_t j = 0; j < f; ++j)
          hs[i * f + j] = activation_forward(c_.activation, a[j], gated ? a[f + j] : 0.0f, c_.activation_constants);
      }
      q.m = rows;
      q.a = {hs.data(), DType::kF32, f, 1};
      q.epilogue.row_scale = g.scale ? g.scale + tile.m0 : nullptr;
      q.c = y.row(g.row_begin + tile.m0);
      if (g.num_rows <= unpacked_rows) {
        gemm_weight_rows(q, g.w_down.data, g.w_down.dtype, g.w_down.row_step(), isa_of(ctx), 0, rows, tile.n0, tile.n1,
                         bf16());
      } else {
        gemm_packed(q, down_.packs[static_cast<size_t>(tile.group)], 0, rows, tile.n0, tile.n1);
      }
    } else {
      q.m = g.num_rows;
      q.a = bf16() ? Operand{h16 + g.h_offset, DType::kBF16, g.d_ff, 1} : Operand{h32 + g.h_offset, DType::kF32, g.d_ff, 1};
      q.epilogue.row_scale = g.scale;
      q.c = y.row(g.row_begin);
      gemm_packed(q, down_.packs[static_cast<size_t>(tile.group)], tile.m0, tile.m1, tile.n0, tile.n1);
    }
  });
}

ConstMatrixView<float> CpuExpertFfn::forward(const OpContext& ctx, const RowSpace& rs, ops::ExpertFfnSaved* saved) {
  const bool training = saved != nullptr;
  // Weights read in place must have contiguous rows (gemm_weight_rows); others are packed.
  int64_t unpacked_rows = training ? kWeightRowsInPlace : 0;
  for (const Group& g : rs.groups)
    if (!g.w_gate_up.rows_contiguous() || !g.w_down.rows_contiguous()) unpacked_rows = 0;
  pack_forward_weights(ctx, rs, /*paired=*/!training, unpacked_rows);
  ctx.phase("pack_experts");
  float* pre = nullptr;
  float* h32 = nullptr;
  uint16_t* h16 = nullptr;
  if (training) {
    saved->pre_activations.resize(static_cast<size_t>(rs.gu_size));
    pre = saved->pre_activations.data();
  } else if (bf16()) {
    h16 = hidden_ws_.get<uint16_t>(rs.h_size);
  } else {
    h32 = hidden_ws_.get<float>(rs.h_size);
  }
  gemm1(ctx, rs, training, unpacked_rows, pre, h32, h16);
  ctx.phase("gemm1");
  MatrixView<float> y{rows_ws_.get<float>(rs.total_rows * c_.d_model), rs.total_rows, c_.d_model};
  gemm2(ctx, rs, training, unpacked_rows, pre, h32, h16, y);
  ctx.phase("gemm2");
  return {y.data, y.rows, y.cols};
}

// ---------------------------------------------------------------------------------------------
// Backward.

// The weights as the backward's B, in the weight format, kept in `cache` at fixed offsets per
// group and packed only when stale. A group with few rows and an fp32 weight is not packed:
// gemm() reads such a B in place (the same kernel and bits), so a decode-sized backward
// streams each weight once instead of reading it, writing a packed copy and reading that; its
// entry stays empty.
template <typename OperandOf>
const std::vector<PackedWeight>& CpuExpertFfn::pack_weights_cached(const OpContext& ctx, const RowSpace& rs,
                                                                   PackSet& cache, OperandOf operand_of) {
  const size_t groups = rs.groups.size();
  cache.resize(groups);
  auto in_place = [&](const Group& g, const Operand& b) {
    return !bf16() && b.dtype == DType::kF32 && b.split_data == nullptr &&
           g.num_rows <= detail_gemm::tuning().b_in_place_rows;
  };
  std::vector<size_t> offset(groups + 1, 0);
  for (size_t gi = 0; gi < groups; ++gi) {
    int64_t k = 0, n = 0;
    operand_of(rs.groups[gi], &k, &n);
    offset[gi + 1] = offset[gi] + round64(PackedWeight::packed_bytes(k, n, weight_dtype_, isa_of(ctx)));
  }
  if (offset[groups] > cache.ws.capacity()) cache.invalidate();  // the arena moves
  uint8_t* mem = cache.ws.get<uint8_t>(static_cast<int64_t>(offset[groups]));
  std::vector<size_t> todo;
  for (size_t gi = 0; gi < groups; ++gi) {
    const Group& g = rs.groups[gi];
    int64_t k = 0, n = 0;
    if (g.num_rows > 0 && !in_place(g, operand_of(g, &k, &n)) && !cache.valid[gi]) todo.push_back(gi);
  }
  run_tasks(ctx, static_cast<int64_t>(todo.size()), [&](int64_t i, int) {
    const size_t gi = todo[static_cast<size_t>(i)];
    int64_t k = 0, n = 0;
    const Operand b = operand_of(rs.groups[gi], &k, &n);
    cache.packs[gi] = PackedWeight::pack_operand(b, k, n, weight_dtype_, isa_of(ctx), false, mem + offset[gi]);
    cache.valid[gi] = 1;
  });
  return cache.packs;
}

// Activations as the B of the weight-gradient GEMMs, packed once per group per call (in the
// weight format, exactly as gemm() would pack them per call: the same kernel, the same bits).
template <typename OperandOf>
std::vector<PackedWeight> CpuExpertFfn::pack_activations(const OpContext& ctx, const RowSpace& rs, DType dtype,
                                                         OperandOf operand_of) {
  const size_t groups = rs.groups.size();
  std::vector<PackedWeight> packed(groups);
  std::vector<size_t> offset(groups + 1, 0);
  for (size_t gi = 0; gi < groups; ++gi) {
    const Group& g = rs.groups[gi];
    int64_t k = 0, n = 0;
    operand_of(g, &k, &n);
    offset[gi + 1] = offset[gi] + (g.num_rows > 0 ? round64(PackedWeight::packed_bytes(k, n, dtype, isa_of(ctx))) : 0);
  }
  uint8_t* mem = grad_pack_ws_.get<uint8_t>(static_cast<int64_t>(offset[groups]));
  run_tasks(ctx, static_cast<int64_t>(groups), [&](int64_t gi, int) {
    const Group& g = rs.groups[static_cast<size_t>(gi)];
    int64_t k = 0, n = 0;
    const Operand b = operand_of(g, &k, &n);
    if (g.num_rows <= 0) return;
    packed[static_cast<size_t>(gi)] = PackedWeight::pack_operand(b, k, n, dtype, isa_of(ctx), false, mem + offset[gi]);
  });
  return packed;
}

// A bias gradient: db[k] += Σ_i M[k][i] over a group's transposed block M [cols, num_rows]
// (rows summed in row order, so the result does not depend on the thread count).
template <typename BlockOf, typename ColsOf, typename BiasOf>
void add_row_sums(const OpContext& ctx, const RowSpace& rs, BlockOf block_of, ColsOf cols_of, BiasOf bias_of) {
  run_tasks(ctx, static_cast<int64_t>(rs.groups.size()), [&](int64_t gi, int) {
    const Group& g = rs.groups[static_cast<size_t>(gi)];
    float* db = bias_of(static_cast<size_t>(gi));
    if (!db) return;
    const float* m = block_of(g);
    for (int64_t k = 0; k < cols_of(g); ++k)
      for (int64_t i = 0; i < g.num_rows; ++i) db[k] += m[k * g.num_rows + i];
  });
}

// C = A · W per group, W a weight as it is stored (the logical B [k, n]), packed once per update
// into `cache` (or read in place, see pack_weights_cached): the backward's products with the
// weights. a_of(g) is the group's A (rows gathered or not), c_of(g) its C rows [num_rows, n].
template <typename KOf, typename NOf, typename WeightOf, typename AOf, typename COf>
void CpuExpertFfn::rows_times_weight(const OpContext& ctx, const RowSpace& rs, PackSet& cache, const char* pack_phase,
                                     KOf k_of, NOf n_of, WeightOf weight_of, AOf a_of, COf c_of) {
  const std::vector<PackedWeight>& packs = pack_weights_cached(ctx, rs, cache, [&](const Group& g, int64_t* k, int64_t* n) {
    *k = k_of(g);
    *n = n_of(g);
    return weight_as_is(weight_of(g));
  });
  ctx.phase(pack_phase);
  const auto tiles = make_tiles(
      static_cast<int64_t>(rs.groups.size()), [&](int64_t g) { return rs.groups[g].num_rows; },
      [&](int64_t g) { return n_of(rs.groups[g]); }, ctx.num_threads);
  run_tiles(ctx, tiles, [&](const Tile& tile, int) {
    const Group& g = rs.groups[tile.group];
    GemmProblem q;
    q.m = g.num_rows;
    q.n = n_of(g);
    q.k = k_of(g);
    q.a = a_of(g);
    q.c = c_of(g);
    q.ldc = q.n;
    const PackedWeight& b = packs[static_cast<size_t>(tile.group)];
    if (b.data() != nullptr) {
      gemm_packed(q, b, tile.m0, tile.m1, tile.n0, tile.n1);
    } else {
      q.b = weight_as_is(weight_of(g));
      gemm(q, isa_of(ctx), tile.m0, tile.m1, tile.n0, tile.n1);
    }
  });
}

// 1. G = d_y · W_down  ([rows, d_model] · [d_model, d_ff]).
void CpuExpertFfn::d_hidden(const OpContext& ctx, const RowSpace& rs, float* g_buf) {
  const int64_t d = c_.d_model;
  rows_times_weight(
      ctx, rs, down_t_, "pack_down_t", [&](const Group&) { return d; }, [](const Group& g) { return g.d_ff; },
      [](const Group& g) { return g.w_down; }, [&](const Group& g) { return Operand{g.dy, DType::kF32, d, 1, g.dy_rows}; },
      [&](const Group& g) { return g_buf + g.h_offset; });
  ctx.phase("d_h");
}

// 2. Per row: h from the pre-activations (rounded as GEMM 2 saw it), d_w = ⟨G, h⟩ + ⟨d_y, b⟩,
//    (w ⊙ d_y)ᵀ into rows_buf ([d_model, num_rows] per group), and d_pre = act'(pre) ⊙ (w · G)
//    in place of pre.
void CpuExpertFfn::activation_backward_rows(const OpContext& ctx, const RowSpace& rs, float* pre, const float* g_buf,
                                            float* h_buf, float* rows_buf, std::vector<float>& d_scale) {
  const int64_t d = c_.d_model;
  const auto tiles = row_tiles(ctx, rs);
  run_tiles(ctx, tiles, [&](const Tile& tile, int) {
    const Group& g = rs.groups[tile.group];
    const int64_t f = g.d_ff;
    const bool gated = is_gated(c_.activation);
    float* scaled_t = rows_buf + g.row_begin * d;  // [d_model, num_rows]
    for (int64_t i = tile.m0; i < tile.m1; ++i) {
      float* a = pre + g.gu_offset + i * g.gu_cols;
      float* h = h_buf + g.h_offset + i * f;
      const float* gr = g_buf + g.h_offset + i * f;
      const float* dy = g.dy + g.dy_src(i) * d;
      const float w = g.scale ? g.scale[i] : 1.0f;
      double dot = 0;
      if (c_.activation == ExpertActivation::kSwiGlu) {
        dot = swiglu_backward_row(isa_of(ctx), a, a + f, gr, w, f, bf16(), h);
      } else {
        for (int64_t j = 0; j < f; ++j) {
          const float v = activation_forward(c_.activation, a[j], gated ? a[f + j] : 0.0f, c_.activation_constants);
          h[j] = bf16() ? bf16_round(v) : v;
          dot += double(gr[j]) * h[j];
        }
        for (int64_t j = 0; j < f; ++j) {
          float d_g = 0, d_u = 0;
          moekit::activation_backward(c_.activation, a[j], gated ? a[f + j] : 0.0f, w * gr[j], c_.activation_constants,
                                      &d_g, &d_u);
          a[j] = d_g;
          if (gated) a[f + j] = d_u;
        }
      }
      if (g.scale) {
        if (g.b_down)
          for (int64_t k = 0; k < d; ++k) dot += double(dy[k]) * g.b_down[k];
        d_scale[static_cast<size_t>(g.row_begin + i)] = float(dot);
      }
    }
    // (w ⊙ d_y)ᵀ for this tile's rows: columns [m0, m1) of [d_model, num_rows].
    std::vector<const float*> dy_rows(static_cast<size_t>(tile.m1 - tile.m0));
    for (int64_t i = tile.m0; i < tile.m1; ++i) dy_rows[i - tile.m0] = g.dy + g.dy_src(i) * d;
    transpose_rows(isa_of(ctx), dy_rows.data(), g.scale ? g.scale + tile.m0 : nullptr, tile.m1 - tile.m0, d,
                   scaled_t + tile.m0, g.num_rows);
  });
  ctx.phase("activation");
}

// The weight-gradient GEMMs tile their rows only (column blocks shrink only when there are
// too few tiles): each tile then converts its A rows once for all columns (bf16 dW_gate_up:
// 24 → 22 ms on the coarse shape). B (h, X) is packed once per group in the weight format:
// bf16 weight gradients come from bf16 operands (both rounded, as PyTorch's autocast runs its
// backward matmuls) with fp32 accumulation.
//
// 3. dW_down += (w ⊙ d_y)ᵀ · h  ([d_model, rows] · [rows, d_ff], the token sum inside one
//    tile); db_down += Σ_rows w ⊙ d_y, in row order.
void CpuExpertFfn::d_w_down(const OpContext& ctx, const RowSpace& rs, const float* h_buf, const float* rows_buf,
                            std::span<const ExpertGrads> grads) {
  const int64_t d = c_.d_model;
  const std::vector<PackedWeight> h_b = pack_activations(ctx, rs, weight_dtype_, [&](const Group& g, int64_t* k, int64_t* n) {
    *k = g.num_rows;
    *n = g.d_ff;
    return Operand{h_buf + g.h_offset, DType::kF32, g.d_ff, 1};
  });
  ctx.phase("pack_h");
  const auto tiles = make_tiles(
      static_cast<int64_t>(rs.groups.size()), [&](int64_t g) { return rs.groups[g].num_rows > 0 ? d : int64_t{0}; },
      [&](int64_t g) { return rs.groups[g].d_ff; }, ctx.num_threads, kRowBlock, std::max(rs.max_d_ff, kMaxColBlock));
  run_tiles(ctx, tiles, [&](const Tile& tile, int) {
    const Group& g = rs.groups[tile.group];
    GemmProblem q;
    q.m = d;
    q.n = g.d_ff;
    q.k = g.num_rows;
    q.a = {rows_buf + g.row_begin * d, DType::kF32, g.num_rows, 1};
    q.c = grads[static_cast<size_t>(tile.group)].d_down;
    q.ldc = g.d_ff;
    q.accumulate = grads[static_cast<size_t>(tile.group)].accumulate;
    gemm_packed(q, h_b[static_cast<size_t>(tile.group)], tile.m0, tile.m1, tile.n0, tile.n1);
  });
  add_row_sums(ctx, rs, [&](const Group& g) { return rows_buf + g.row_begin * d; }, [&](const Group&) { return d; },
               [&](size_t gi) { return grads[gi].d_down_bias; });
  ctx.phase("d_w_down");
}

// 4. dW_gate_up += d_preᵀ · X  ([gu_cols, rows] · [rows, d_model]). d_pre is transposed into
//    pre_t and X gathered into rows_buf (rounded to bf16 as GEMM 1 saw it when packed), so that
//    both operands are read along their rows; db_gate_up += Σ_rows d_pre.
void CpuExpertFfn::d_w_gate_up(const OpContext& ctx, const RowSpace& rs, const float* pre, float* pre_t,
                               float* rows_buf, std::span<const ExpertGrads> grads) {
  const int64_t d = c_.d_model;
  {
    const auto tiles = row_tiles(ctx, rs);
    run_tiles(ctx, tiles, [&](const Tile& tile, int) {
      const Group& g = rs.groups[tile.group];
      std::vector<const float*> pre_rows(static_cast<size_t>(tile.m1 - tile.m0));
      for (int64_t i = tile.m0; i < tile.m1; ++i) pre_rows[i - tile.m0] = pre + g.gu_offset + i * g.gu_cols;
      transpose_rows(isa_of(ctx), pre_rows.data(), nullptr, tile.m1 - tile.m0, g.gu_cols, pre_t + g.gu_offset + tile.m0,
                     g.num_rows);
      for (int64_t i = tile.m0; i < tile.m1; ++i) {
        const float* src = g.a + g.src(i) * d;
        std::copy(src, src + d, rows_buf + (g.row_begin + i) * d);
      }
    });
  }
  ctx.phase("transpose");
  const std::vector<PackedWeight> x_b = pack_activations(ctx, rs, weight_dtype_, [&](const Group& g, int64_t* k, int64_t* n) {
    *k = g.num_rows;
    *n = d;
    return Operand{rows_buf + g.row_begin * d, DType::kF32, d, 1};
  });
  ctx.phase("pack_x");
  const auto tiles = make_tiles(
      static_cast<int64_t>(rs.groups.size()),
      [&](int64_t g) { return rs.groups[g].num_rows > 0 ? rs.groups[g].gu_cols : int64_t{0}; },
      [&](int64_t) { return d; }, ctx.num_threads, kRowBlock, std::max(d, kMaxColBlock));
  run_tiles(ctx, tiles, [&](const Tile& tile, int) {
    const Group& g = rs.groups[tile.group];
    GemmProblem q;
    q.m = g.gu_cols;
    q.n = d;
    q.k = g.num_rows;
    q.a = {pre_t + g.gu_offset, DType::kF32, g.num_rows, 1};
    q.c = grads[static_cast<size_t>(tile.group)].d_gate_up;
    q.ldc = d;
    q.accumulate = grads[static_cast<size_t>(tile.group)].accumulate;
    gemm_packed(q, x_b[static_cast<size_t>(tile.group)], tile.m0, tile.m1, tile.n0, tile.n1);
  });
  add_row_sums(ctx, rs, [&](const Group& g) { return pre_t + g.gu_offset; }, [&](const Group& g) { return g.gu_cols; },
               [&](size_t gi) { return grads[gi].d_gate_up_bias; });
  ctx.phase("d_w_gate_up");
}

// 5. d_X = d_pre · W_gate_up  ([rows, gu_cols] · [gu_cols, d_model]).
void CpuExpertFfn::d_x_rows(const OpContext& ctx, const RowSpace& rs, const float* pre, float* rows_buf) {
  const int64_t d = c_.d_model;
  rows_times_weight(
      ctx, rs, gate_up_t_, "pack_gate_up_t", [](const Group& g) { return g.gu_cols; }, [&](const Group&) { return d; },
      [](const Group& g) { return g.w_gate_up; },
      [&](const Group& g) { return Operand{pre + g.gu_offset, DType::kF32, g.gu_cols, 1}; },
      [&](const Group& g) { return rows_buf + g.row_begin * d; });
  ctx.phase("d_x_rows");
}

ops::ExpertFfnBackwardResult CpuExpertFfn::backward(const OpContext& ctx, const RowSpace& rs,
                                                    ops::ExpertFfnSaved& saved, std::span<const ExpertGrads> grads) {
  const int64_t d = c_.d_model;
  // hg: G = d_y · W_down and the recomputed h, [rows, d_ff] blocks each; later the transposed
  // d_pre [gu_cols, rows] blocks (gu_size ≤ 2·h_size since gu_cols ≤ 2·d_ff).
  float* hg = hidden_ws_.get<float>(std::max(2 * rs.h_size, rs.gu_size));
  float* g_buf = hg;
  float* h_buf = hg + rs.h_size;
  // rows_buf: [d_model, rows] blocks of (w ⊙ d_y)ᵀ, then X gathered, then d_X [rows, d_model].
  float* rows_buf = rows_ws_.get<float>(rs.total_rows * d);
  float* pre = saved.pre_activations.data();  // becomes d_pre in place
  ops::ExpertFfnBackwardResult result;
  result.d_scale.assign(static_cast<size_t>(rs.total_rows), 0.0f);
  d_hidden(ctx, rs, g_buf);
  activation_backward_rows(ctx, rs, pre, g_buf, h_buf, rows_buf, result.d_scale);
  d_w_down(ctx, rs, h_buf, rows_buf, grads);
  // G and h are no longer needed: hg holds d_preᵀ from here on.
  d_w_gate_up(ctx, rs, pre, hg, rows_buf, grads);
  d_x_rows(ctx, rs, pre, rows_buf);
  result.d_rows = {rows_buf, rs.total_rows, d};
  return result;
}

}  // namespace

std::unique_ptr<ops::ExpertFfn> make_cpu_expert_ffn(const ops::ExpertFfnConfig& config) {
  return std::make_unique<CpuExpertFfn>(config);
}

}  // namespace moekit::cpu
