#include "ops/row_space.h"

#include <algorithm>

#include "moekit/error.h"
#include "moekit/quant.h"
#include "ops/backend.h"

namespace moekit::ops {

namespace {
size_t dtype_bytes(DType d) { return d == DType::kBF16 ? 2 : 4; }
}  // namespace

WeightView expert_weight(const WeightView& w, int64_t e) {
  WeightView x;
  x.dtype = w.dtype;
  x.rows = w.rows;
  x.cols = w.cols;
  if (is_quantized(w.dtype)) {
    x.data = static_cast<const uint8_t*>(w.data) + e * w.rows * quantized_code_bytes(w.dtype, w.cols);
    x.scales = static_cast<const uint8_t*>(w.scales) + e * w.rows * quantized_scale_bytes(w.dtype, w.cols);
    return x;
  }
  // The first element of the expert's matrix (and of its up half), in bytes.
  const auto at = [&](int64_t r) -> const void* {
    const WeightView::Element first = w.element(e, r, 0);
    return static_cast<const uint8_t*>(first.base) + first.offset * static_cast<int64_t>(dtype_bytes(w.dtype));
  };
  x.data = at(0);
  x.row_stride = w.row_step();
  x.col_stride = w.col_step();
  if (w.up_data != nullptr) x.up_data = at(w.up_row());
  return x;
}

void permute_rows(const OpContext& ctx, const MoeLayerConfig& config, const RoutingPlan& plan,
                  const float* hidden_states, ExpertRows& rows) {
  if (rows.weights != CombineWeights::kInExperts && rows.weights != CombineWeights::kInCombine) {
    throw_input_error("permute combine weights", "kInExperts or kInCombine", static_cast<int>(rows.weights));
  }
  ctx.backend->permute_rows(ctx, config, plan, hidden_states, rows);
}

void index_permute_rows(const MoeLayerConfig& c, const RoutingPlan& plan, const float* hidden_states,
                        ExpertRows& rows) {
  const int64_t num_experts = c.num_experts(), d = c.d_model;
  const bool soft = c.routing.routing_method == RoutingMethod::kSoftMoe;
  const int64_t slot_rows = rows.num_sequences * c.routing.slots_per_expert;
  const bool weights_here = rows.weights == CombineWeights::kInExperts;
  rows.segments.clear();
  rows.segments.reserve(static_cast<size_t>(num_experts + (c.has_shared() ? 1 : 0)));
  for (int64_t e = 0; e < num_experts; ++e) {
    ExpertSegment g;
    g.expert = e;
    if (soft) {
      g.row_begin = e * slot_rows;
      g.num_rows = slot_rows;
      g.input.data = rows.slot_inputs.values.data() + g.row_begin * d;
    } else {
      g.row_begin = plan.expert_offsets[e];
      g.num_rows = plan.expert_offsets[e + 1] - plan.expert_offsets[e];
      g.input = {hidden_states, plan.expert_tokens.data() + g.row_begin};
      if (weights_here) g.scale = plan.expert_weights.data() + g.row_begin;
    }
    rows.segments.push_back(g);
  }
  rows.routed_rows = soft ? num_experts * slot_rows : plan.num_kept();
  rows.total_rows = rows.routed_rows;
  if (c.has_shared()) {
    ExpertSegment g;
    g.expert = num_experts;
    g.row_begin = rows.routed_rows;
    g.num_rows = plan.num_tokens;
    g.input = {hidden_states, nullptr};
    g.scale = rows.shared_gate.empty() ? nullptr : rows.shared_gate.data();
    rows.segments.push_back(g);
    rows.total_rows += plan.num_tokens;
  }
}

RowSpace build_row_space(const MoeLayerConfig& c, const MoeParams& p, const ExpertRows& rows,
                         const ExpertRowGrads* d_y) {
  RowSpace rs;
  const int64_t num_experts = c.num_experts(), d = c.d_model;
  rs.groups.reserve(rows.segments.size());
  for (size_t i = 0; i < rows.segments.size(); ++i) {
    const ExpertSegment& s = rows.segments[i];
    const bool shared = s.expert == num_experts;
    Group g;
    g.expert = s.expert;
    g.d_ff = shared ? c.effective_shared_d_ff() : c.d_ff;
    g.gu_cols = shared ? c.shared_gate_up_rows() : c.gate_up_rows();
    g.row_begin = s.row_begin;
    g.num_rows = s.num_rows;
    g.a = s.input.data;
    g.a_rows = s.input.rows;
    g.scale = s.scale;
    if (d_y != nullptr) {
      g.dy = d_y->d_output[i].data;
      g.dy_rows = d_y->d_output[i].rows;
    }
    g.w_gate_up = shared ? expert_weight(p.shared_gate_up, 0) : expert_weight(p.gate_up, s.expert);
    g.w_down = shared ? expert_weight(p.shared_down, 0) : expert_weight(p.down, s.expert);
    const std::span<const float> b_gu = shared ? p.shared_gate_up_bias : p.gate_up_bias;
    const std::span<const float> b_dn = shared ? p.shared_down_bias : p.down_bias;
    const int64_t bias_expert = shared ? 0 : s.expert;
    if (!b_gu.empty()) g.b_gate_up = b_gu.data() + bias_expert * g.gu_cols;
    if (!b_dn.empty()) g.b_down = b_dn.data() + bias_expert * d;
    rs.groups.push_back(g);
  }
  rs.routed_rows = rows.routed_rows;
  rs.total_rows = rows.total_rows;
  for (Group& g : rs.groups) {
    g.h_offset = rs.h_size;
    g.gu_offset = rs.gu_size;
    rs.h_size += g.num_rows * g.d_ff;
    rs.gu_size += g.num_rows * g.gu_cols;
    rs.max_d_ff = std::max(rs.max_d_ff, g.d_ff);
  }
  return rs;
}

std::vector<int64_t> selection_rows(const RoutingPlan& plan) {
  std::vector<int64_t> row_of(static_cast<size_t>(plan.num_selections()), -1);
  for (int64_t j = 0; j < plan.num_kept(); ++j) row_of[static_cast<size_t>(plan.expert_selection[j])] = j;
  return row_of;
}

}  // namespace moekit::ops
