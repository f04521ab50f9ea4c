// CPU implementation of the combine ops (src/ops/combine.h).
#include <cmath>

#include "cpu/exec.h"
#include "cpu/gemm.h"
#include "ops/combine.h"
#include "ops/row_space.h"

namespace moekit::ops {

using cpu::GemmProblem;

void token_sum(const OpContext& ctx, const RoutingPlan& plan, ConstMatrixView<float> rows, int64_t shared_begin,
               MatrixView<float> out) {
  const int64_t d = out.cols;
  const std::vector<int64_t> row_of = selection_rows(plan);
  cpu::run_blocks(ctx, plan.num_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* o = out.row(t);
      std::fill(o, o + d, 0.0f);
      for (int64_t i = plan.token_offsets[t]; i < plan.token_offsets[t + 1]; ++i) {
        if (row_of[static_cast<size_t>(i)] < 0) continue;
        const float* src = rows.row(row_of[static_cast<size_t>(i)]);
        for (int64_t k = 0; k < d; ++k) o[k] += src[k];
      }
      if (shared_begin >= 0) {
        const float* src = rows.row(shared_begin + t);
        for (int64_t k = 0; k < d; ++k) o[k] += src[k];
      }
    }
  });
}

std::vector<float> d_token_weights(const RoutingPlan& plan, std::span<const float> d_scale) {
  const std::vector<int64_t> row_of = selection_rows(plan);
  std::vector<float> d_w(static_cast<size_t>(plan.num_selections()), 0.0f);
  for (size_t i = 0; i < d_w.size(); ++i)
    if (row_of[i] >= 0) d_w[i] = d_scale[static_cast<size_t>(row_of[i])];
  return d_w;
}

namespace {

// C [m, n] (+)= op(A) · op(B) on one thread, all of it.
void small_gemm(const OpContext& ctx, GemmProblem& q) { cpu::gemm(q, ctx.isa, 0, q.m, 0, q.n); }

void add_rows(ConstMatrixView<float> shared_rows, int64_t t0, int64_t t1, MatrixView<float> dst) {
  if (shared_rows.data == nullptr) return;
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t k = 0; k < dst.cols; ++k) dst(t, k) += shared_rows(t, k);
}

}  // namespace

void soft_dispatch_forward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& s,
                           ConstMatrixView<float> x, MatrixView<float> slot_inputs) {
  const int64_t d = x.cols, L = s.sequence_length, S = s.num_slots(), P = s.slots_per_expert;
  // One GEMM per (sequence, expert): [P, L] (the dispatch block, transposed) · [L, d_model].
  cpu::run_tasks(ctx, s.num_sequences * s.num_experts, [&](int64_t task, int) {
    const int64_t g = task / s.num_experts, e = task % s.num_experts;
    GemmProblem q;
    q.m = P;
    q.n = d;
    q.k = L;
    q.a = {plan.dispatch.data() + g * L * S + e * P, cpu::DType::kF32, 1, S};
    q.b = {x.row(g * L), cpu::DType::kF32, d, 1};
    q.c = slot_inputs.row(s.slot_row(e, g));
    q.ldc = d;
    small_gemm(ctx, q);
  });
}

void soft_dispatch_backward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& s,
                            ConstMatrixView<float> x, ConstMatrixView<float> d_slot_inputs,
                            ConstMatrixView<float> shared_rows, MatrixView<float> d_x, std::span<float> d_dispatch) {
  const int64_t d = x.cols, L = s.sequence_length, S = s.num_slots(), P = s.slots_per_expert;
  cpu::run_tasks(ctx, s.num_sequences, [&](int64_t g, int) {
    for (int64_t e = 0; e < s.num_experts; ++e) {
      const int64_t row = s.slot_row(e, g);
      GemmProblem q;
      q.m = L;
      q.n = d;
      q.k = P;
      q.a = {plan.dispatch.data() + g * L * S + e * P, cpu::DType::kF32, S, 1};
      q.b = {d_slot_inputs.row(row), cpu::DType::kF32, d, 1};
      q.c = d_x.row(g * L);
      q.ldc = d;
      q.accumulate = true;
      small_gemm(ctx, q);
      GemmProblem r;
      r.m = L;
      r.n = P;
      r.k = d;
      r.a = {x.row(g * L), cpu::DType::kF32, d, 1};
      r.b = {d_slot_inputs.row(row), cpu::DType::kF32, 1, d};
      r.c = d_dispatch.data() + g * L * S + e * P;
      r.ldc = S;
      small_gemm(ctx, r);
    }
    add_rows(shared_rows, g * L, (g + 1) * L, d_x);
  });
}

void soft_combine_forward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& s,
                          ConstMatrixView<float> slot_outputs, ConstMatrixView<float> shared_rows,
                          MatrixView<float> out) {
  const int64_t d = out.cols, L = s.sequence_length, S = s.num_slots(), P = s.slots_per_expert;
  // out_g = Σ_e combine[g, e·P:(e+1)·P] · Y[e, g]  ([L, P] · [P, d_model]), experts in order.
  cpu::run_tasks(ctx, s.num_sequences, [&](int64_t g, int) {
    for (int64_t t = g * L; t < (g + 1) * L; ++t) std::fill(out.row(t), out.row(t) + d, 0.0f);
    for (int64_t e = 0; e < s.num_experts; ++e) {
      GemmProblem q;
      q.m = L;
      q.n = d;
      q.k = P;
      q.a = {plan.combine.data() + g * L * S + e * P, cpu::DType::kF32, S, 1};
      q.b = {slot_outputs.row(s.slot_row(e, g)), cpu::DType::kF32, d, 1};
      q.c = out.row(g * L);
      q.ldc = d;
      q.accumulate = true;
      small_gemm(ctx, q);
    }
    add_rows(shared_rows, g * L, (g + 1) * L, out);
  });
}

void soft_combine_backward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& s,
                           ConstMatrixView<float> d_out, ConstMatrixView<float> slot_outputs,
                           MatrixView<float> d_slot_outputs, std::span<float> d_combine) {
  const int64_t d = d_out.cols, L = s.sequence_length, S = s.num_slots(), P = s.slots_per_expert;
  cpu::run_tasks(ctx, s.num_sequences * s.num_experts, [&](int64_t task, int) {
    const int64_t g = task / s.num_experts, e = task % s.num_experts;
    const int64_t row = s.slot_row(e, g);
    GemmProblem q;
    q.m = P;
    q.n = d;
    q.k = L;
    q.a = {plan.combine.data() + g * L * S + e * P, cpu::DType::kF32, 1, S};
    q.b = {d_out.row(g * L), cpu::DType::kF32, d, 1};
    q.c = d_slot_outputs.row(row);
    q.ldc = d;
    small_gemm(ctx, q);
    GemmProblem r;
    r.m = L;
    r.n = P;
    r.k = d;
    r.a = {d_out.row(g * L), cpu::DType::kF32, d, 1};
    r.b = {slot_outputs.row(row), cpu::DType::kF32, 1, d};
    r.c = d_combine.data() + g * L * S + e * P;
    r.ldc = S;
    small_gemm(ctx, r);
  });
}

std::vector<float> shared_gate_forward(ConstMatrixView<float> x, std::span<const float> w_gate) {
  std::vector<float> s(static_cast<size_t>(x.rows));
  for (int64_t t = 0; t < x.rows; ++t) {
    float z = 0;
    for (int64_t k = 0; k < x.cols; ++k) z += x(t, k) * w_gate[static_cast<size_t>(k)];
    s[static_cast<size_t>(t)] = 1.0f / (1.0f + std::exp(-z));
  }
  return s;
}

void shared_gate_backward(const OpContext& ctx, ConstMatrixView<float> x, std::span<const float> w_gate,
                          std::span<const float> gate, std::span<const float> d_gate, MatrixView<float> d_x,
                          std::span<float> d_w_gate) {
  const int64_t num_tokens = x.rows, d = x.cols;
  std::vector<float> dz(static_cast<size_t>(num_tokens));
  for (size_t t = 0; t < dz.size(); ++t) dz[t] = d_gate[t] * gate[t] * (1.0f - gate[t]);
  cpu::run_blocks(ctx, num_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t k = 0; k < d; ++k) d_x(t, k) += dz[static_cast<size_t>(t)] * w_gate[static_cast<size_t>(k)];
  });
  cpu::run_blocks(ctx, d, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = 0; t < num_tokens; ++t)
      for (int64_t k = begin; k < end; ++k) d_w_gate[static_cast<size_t>(k)] += dz[static_cast<size_t>(t)] * x(t, k);
  });
}

}  // namespace moekit::ops
