// Combining expert outputs into token outputs, and Soft MoE's slot dispatch and combine, each
// with its backward. These functions check shapes and dispatch to ctx.backend (ops/backend.h).
//
// Token choice (every method but Soft MoE): the combine is the fixed-order sum
//   out_t = Σ_{kept choices i of t, in choice order} w_i · y[row(i)]  (+ y[shared row t])
// where the combine weight w_te is applied either by the expert FFN as a row scale (expert_ffn.h;
// token_sum is then given no weights) or here. With the weight in the FFN the backward is a
// gather (d_y[row] = d_out[token(row)], read in place through the row space) and d_w for a
// selection is the expert FFN's d_scale of its row; with the weight here it is
//   d_y[row(i)] = w_i · d_out_t (gather_rows),   d_w_i = ⟨d_out_t, y[row(i)]⟩ (row_dots).
// The same sum brings d_X rows back to tokens (d_x_t = Σ d_X[row(i)]). The sum runs per token in
// choice order, so the output is bitwise identical for any thread count; and since the FFN's
// epilogue computes w · (acc + b), both placements of the weight give the same bits.
//
// Soft MoE (per sequence g of L tokens, S = num_slots = num_experts · slots_per_expert):
//   dispatch:  X̃[e, g] = D_gᵀ[e-slots] · X_g       D = plan.dispatch [L, S] block of sequence g
//   combine:   out_g  = Σ_e C_g[:, e-slots] · Y[e, g]           C = plan.combine
//   backward:  d_Y[e, g] = C_gᵀ[e-slots] · d_out_g,   d_C[t, j] = ⟨d_out_t, Y_j⟩
//              d_X_g += Σ_e D_g[:, e-slots] · d_X̃[e, g],   d_D[t, j] = ⟨x_t, d_X̃_j⟩
// Slot rows are expert-major: row (e, g, s) = (e·num_sequences + g)·slots_per_expert + s.
//
// The shared expert gate (Qwen2-MoE): s_t = σ(⟨x_t, w_gate⟩) scales the shared expert's rows;
// its backward takes d_s_t (the expert FFN's d_scale of the shared row t).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "moekit/plan.h"
#include "moekit/tensor.h"
#include "ops/backend.h"
#include "ops/context.h"

namespace moekit::ops {

// out = the fixed-order token sum of `rows` (written, not accumulated), each routed row times its
// weight when `weights` is given. shared_begin: the row of token 0's shared-expert row (token t's
// is shared_begin + t), or −1 without a shared expert.
void token_sum(const OpContext& ctx, const RoutingPlan& plan,
               ConstMatrixView<float> rows,     // [total_rows, d_model]
               std::span<const float> weights,  // [num_kept] (the plan's expert_weights) or empty
               int64_t shared_begin,
               MatrixView<float> out);          // [num_tokens, d_model]

// out_i = scale_i · source[source_rows_i] (source_rows empty: row i; scale empty: 1), written.
void gather_rows(const OpContext& ctx,
                 ConstMatrixView<float> source,          // [num_source_rows, d_model]
                 std::span<const int32_t> source_rows,   // [num_rows] or empty
                 std::span<const float> scale,           // [num_rows] or empty
                 MatrixView<float> out);                 // [num_rows, d_model]

// out_i = ⟨a[a_rows_i], b_i⟩, summed in index order (a_rows empty: row i of a), written.
void row_dots(const OpContext& ctx,
              ConstMatrixView<float> a,           // [num_a_rows, d_model]
              std::span<const int32_t> a_rows,    // [num_rows] or empty
              ConstMatrixView<float> b,           // [num_rows, d_model]
              std::span<float> out);              // [num_rows]

// dL/d plan.token_weights from the expert FFN's d_scale: [num_selections], 0 for dropped ones.
std::vector<float> d_token_weights(const RoutingPlan& plan, std::span<const float> d_scale);  // [total_rows]

struct SoftMoeShape {
  int64_t num_sequences = 0;
  int64_t sequence_length = 0;
  int64_t num_experts = 0;
  int64_t slots_per_expert = 0;
  int64_t num_slots() const { return num_experts * slots_per_expert; }
  int64_t slot_row(int64_t e, int64_t g) const { return (e * num_sequences + g) * slots_per_expert; }
};

void soft_dispatch_forward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& shape,
                           ConstMatrixView<float> x,          // [num_tokens, d_model]
                           MatrixView<float> slot_inputs);    // [num_experts·num_sequences·slots, d_model]

// d_x += the dispatch backward (then the shared rows, when shared_rows.data is set);
// d_dispatch [num_tokens, num_slots] written.
void soft_dispatch_backward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& shape,
                            ConstMatrixView<float> x,             // [num_tokens, d_model]
                            ConstMatrixView<float> d_slot_inputs, // [slot rows, d_model]
                            ConstMatrixView<float> shared_rows,   // [num_tokens, d_model] or empty
                            MatrixView<float> d_x,                // [num_tokens, d_model]
                            std::span<float> d_dispatch);         // [num_tokens · num_slots]

// out = the slot combine (+ shared rows), written.
void soft_combine_forward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& shape,
                          ConstMatrixView<float> slot_outputs,  // [slot rows, d_model]
                          ConstMatrixView<float> shared_rows,   // [num_tokens, d_model] or empty
                          MatrixView<float> out);               // [num_tokens, d_model]

void soft_combine_backward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& shape,
                           ConstMatrixView<float> d_out,         // [num_tokens, d_model]
                           ConstMatrixView<float> slot_outputs,  // [slot rows, d_model]
                           MatrixView<float> d_slot_outputs,     // [slot rows, d_model], written
                           std::span<float> d_combine);          // [num_tokens · num_slots], written

// s_t = σ(⟨x_t, w_gate⟩), accumulated in fp32 in index order.
std::vector<float> shared_gate_forward(const OpContext& ctx,
                                       ConstMatrixView<float> x,          // [num_tokens, d_model]
                                       std::span<const float> w_gate);    // [d_model]

// dz_t = d_s_t · s_t(1 − s_t);  d_x += dz ⊗ w_gate,  d_w_gate += Σ_t dz_t x_t (token order).
void shared_gate_backward(const OpContext& ctx, ConstMatrixView<float> x,  // [num_tokens, d_model]
                          std::span<const float> w_gate,                   // [d_model]
                          std::span<const float> gate,                     // [num_tokens] s
                          std::span<const float> d_gate,                   // [num_tokens] d_s
                          MatrixView<float> d_x,                           // [num_tokens, d_model]
                          std::span<float> d_w_gate);                      // [d_model]

}  // namespace moekit::ops
