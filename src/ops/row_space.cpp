#include "ops/row_space.h"

#include <algorithm>

#include "moekit/quant.h"

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

RowSpace build_row_space(const MoeLayerConfig& c, const MoeParams& p, const RoutingPlan& plan,
                         int64_t num_sequences, const float* hidden_states, const float* slot_inputs,
                         const float* shared_scale) {
  RowSpace rs;
  const int64_t num_experts = c.num_experts(), d = c.d_model;
  const bool soft = c.routing.routing_method == RoutingMethod::kSoftMoe;
  const int64_t slot_rows = num_sequences * c.routing.slots_per_expert;
  for (int64_t e = 0; e < num_experts; ++e) {
    Group g;
    g.expert = e;
    g.d_ff = c.d_ff;
    g.gu_cols = c.gate_up_rows();
    if (soft) {
      g.row_begin = e * slot_rows;
      g.num_rows = slot_rows;
      g.a = slot_inputs + g.row_begin * d;
    } else {
      g.row_begin = plan.expert_offsets[e];
      g.num_rows = plan.expert_offsets[e + 1] - plan.expert_offsets[e];
      g.a = hidden_states;
      g.a_rows = plan.expert_tokens.data() + g.row_begin;
      g.scale = plan.expert_weights.data() + g.row_begin;
    }
    g.w_gate_up = expert_weight(p.gate_up, e);
    g.w_down = expert_weight(p.down, e);
    if (!p.gate_up_bias.empty()) g.b_gate_up = p.gate_up_bias.data() + e * g.gu_cols;
    if (!p.down_bias.empty()) g.b_down = p.down_bias.data() + e * d;
    rs.groups.push_back(g);
  }
  rs.routed_rows = soft ? num_experts * slot_rows : plan.num_kept();
  rs.total_rows = rs.routed_rows;
  if (c.has_shared()) {
    Group g;
    g.expert = num_experts;
    g.d_ff = c.effective_shared_d_ff();
    g.gu_cols = c.shared_gate_up_rows();
    g.row_begin = rs.routed_rows;
    g.num_rows = plan.num_tokens;
    g.a = hidden_states;
    g.scale = shared_scale;
    g.w_gate_up = expert_weight(p.shared_gate_up, 0);
    g.w_down = expert_weight(p.shared_down, 0);
    if (!p.shared_gate_up_bias.empty()) g.b_gate_up = p.shared_gate_up_bias.data();
    if (!p.shared_down_bias.empty()) g.b_down = p.shared_down_bias.data();
    rs.groups.push_back(g);
    rs.total_rows += plan.num_tokens;
  }
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
