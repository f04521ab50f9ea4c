// The combine ops' checks and dispatch (combine.h); the implementations are the backends'
// (src/cpu/combine.cpp).
#include "ops/combine.h"

#include "moekit/error.h"
#include "ops/row_space.h"

namespace moekit::ops {

namespace {

// A count (rows, columns, a length) that must equal what the other arguments imply.
void check_count(int64_t actual, int64_t expected, const char* name) {
  if (actual != expected) throw_input_error(name, expected, actual);
}

}  // namespace

void token_sum(const OpContext& ctx, const RoutingPlan& plan, ConstMatrixView<float> rows,
               std::span<const float> weights, int64_t shared_begin, MatrixView<float> out) {
  check_count(out.rows, plan.num_tokens, "token_sum output rows");
  check_count(rows.cols, out.cols, "token_sum rows columns");
  if (rows.rows < plan.num_kept() + (shared_begin >= 0 ? plan.num_tokens : 0) ||
      (shared_begin >= 0 && shared_begin + plan.num_tokens > rows.rows)) {
    throw_input_error("token_sum rows", "a row per kept assignment (and per token for the shared expert)", rows.rows);
  }
  if (!weights.empty()) check_count(static_cast<int64_t>(weights.size()), plan.num_kept(), "token_sum weights length");
  ctx.backend->token_sum(ctx, plan, rows, weights, shared_begin, out);
}

void gather_rows(const OpContext& ctx, ConstMatrixView<float> source, std::span<const int32_t> source_rows,
                 std::span<const float> scale, MatrixView<float> out) {
  check_count(out.cols, source.cols, "gather_rows output columns");
  if (!source_rows.empty()) check_count(static_cast<int64_t>(source_rows.size()), out.rows, "gather_rows indices");
  else if (source.rows < out.rows) check_count(source.rows, out.rows, "gather_rows source rows");
  if (!scale.empty()) check_count(static_cast<int64_t>(scale.size()), out.rows, "gather_rows scale length");
  ctx.backend->gather_rows(ctx, source, source_rows, scale, out);
}

void row_dots(const OpContext& ctx, ConstMatrixView<float> a, std::span<const int32_t> a_rows,
              ConstMatrixView<float> b, std::span<float> out) {
  check_count(b.cols, a.cols, "row_dots columns");
  check_count(static_cast<int64_t>(out.size()), b.rows, "row_dots output length");
  if (!a_rows.empty()) check_count(static_cast<int64_t>(a_rows.size()), b.rows, "row_dots indices");
  ctx.backend->row_dots(ctx, a, a_rows, b, out);
}

std::vector<float> d_token_weights(const RoutingPlan& plan, std::span<const float> d_scale) {
  const std::vector<int64_t> row_of = selection_rows(plan);
  std::vector<float> d_w(static_cast<size_t>(plan.num_selections()), 0.0f);
  for (size_t i = 0; i < d_w.size(); ++i)
    if (row_of[i] >= 0) d_w[i] = d_scale[static_cast<size_t>(row_of[i])];
  return d_w;
}

void soft_dispatch_forward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& shape,
                           ConstMatrixView<float> x, MatrixView<float> slot_inputs) {
  check_count(x.rows, shape.num_sequences * shape.sequence_length, "soft dispatch input rows");
  check_count(slot_inputs.rows, shape.num_slots() * shape.num_sequences, "soft dispatch slot rows");
  ctx.backend->soft_dispatch_forward(ctx, plan, shape, x, slot_inputs);
}

void soft_dispatch_backward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& shape,
                            ConstMatrixView<float> x, ConstMatrixView<float> d_slot_inputs,
                            ConstMatrixView<float> shared_rows, MatrixView<float> d_x, std::span<float> d_dispatch) {
  check_count(d_x.rows, x.rows, "soft dispatch d_x rows");
  check_count(static_cast<int64_t>(d_dispatch.size()), x.rows * shape.num_slots(), "soft d_dispatch length");
  ctx.backend->soft_dispatch_backward(ctx, plan, shape, x, d_slot_inputs, shared_rows, d_x, d_dispatch);
}

void soft_combine_forward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& shape,
                          ConstMatrixView<float> slot_outputs, ConstMatrixView<float> shared_rows,
                          MatrixView<float> out) {
  check_count(slot_outputs.rows, shape.num_slots() * shape.num_sequences, "soft combine slot rows");
  check_count(out.rows, shape.num_sequences * shape.sequence_length, "soft combine output rows");
  ctx.backend->soft_combine_forward(ctx, plan, shape, slot_outputs, shared_rows, out);
}

void soft_combine_backward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& shape,
                           ConstMatrixView<float> d_out, ConstMatrixView<float> slot_outputs,
                           MatrixView<float> d_slot_outputs, std::span<float> d_combine) {
  check_count(d_slot_outputs.rows, slot_outputs.rows, "soft combine d_slot_outputs rows");
  check_count(static_cast<int64_t>(d_combine.size()), d_out.rows * shape.num_slots(), "soft d_combine length");
  ctx.backend->soft_combine_backward(ctx, plan, shape, d_out, slot_outputs, d_slot_outputs, d_combine);
}

std::vector<float> shared_gate_forward(const OpContext& ctx, ConstMatrixView<float> x,
                                       std::span<const float> w_gate) {
  check_count(static_cast<int64_t>(w_gate.size()), x.cols, "shared gate weight length");
  return ctx.backend->shared_gate_forward(ctx, x, w_gate);
}

void shared_gate_backward(const OpContext& ctx, ConstMatrixView<float> x, std::span<const float> w_gate,
                          std::span<const float> gate, std::span<const float> d_gate, MatrixView<float> d_x,
                          std::span<float> d_w_gate) {
  check_count(static_cast<int64_t>(gate.size()), x.rows, "shared gate length");
  check_count(static_cast<int64_t>(d_gate.size()), x.rows, "shared gate gradient length");
  check_count(static_cast<int64_t>(d_w_gate.size()), x.cols, "shared gate d_weight length");
  ctx.backend->shared_gate_backward(ctx, x, w_gate, gate, d_gate, d_x, d_w_gate);
}

}  // namespace moekit::ops
