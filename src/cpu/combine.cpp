// CPU implementation of the combine ops (src/ops/combine.h): the token sum, row gathers and
// dots, Soft MoE's slot dispatch and combine, the shared expert gate.
#include <cmath>

#include "cpu/backend.h"
#include "cpu/exec.h"
#include "cpu/gemm.h"
#include "moekit/math.h"
#include "ops/combine.h"
#include "ops/row_space.h"

namespace moekit::cpu {

using ops::OpContext;
using ops::SoftMoeShape;

void CpuBackend::token_sum(const OpContext& ctx, const RoutingPlan& plan, ConstMatrixView<float> rows,
                           std::span<const float> weights, int64_t shared_begin, MatrixView<float> out) const {
  const int64_t d = out.cols;
  const std::vector<int64_t> row_of = ops::selection_rows(plan);
  run_blocks(ctx, plan.num_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* o = out.row(t);
      std::fill(o, o + d, 0.0f);
      for (int64_t i = plan.token_offsets[t]; i < plan.token_offsets[t + 1]; ++i) {
        const int64_t row = row_of[static_cast<size_t>(i)];
        if (row < 0) continue;
        const float* src = rows.row(row);
        if (weights.empty()) {
          for (int64_t k = 0; k < d; ++k) o[k] += src[k];
        } else {
          // w · y rounded before the sum, as the FFN's row scale rounds it: the same bits.
          const float w = weights[static_cast<size_t>(row)];
          for (int64_t k = 0; k < d; ++k) o[k] += w * src[k];
        }
      }
      if (shared_begin >= 0) {
        const float* src = rows.row(shared_begin + t);
        for (int64_t k = 0; k < d; ++k) o[k] += src[k];
      }
    }
  });
}

void CpuBackend::gather_rows(const OpContext& ctx, ConstMatrixView<float> source, std::span<const int32_t> source_rows,
                             std::span<const float> scale, MatrixView<float> out) const {
  const int64_t d = out.cols;
  run_blocks(ctx, out.rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* src = source.row(source_rows.empty() ? i : source_rows[static_cast<size_t>(i)]);
      float* o = out.row(i);
      if (scale.empty()) {
        std::copy(src, src + d, o);
      } else {
        const float w = scale[static_cast<size_t>(i)];
        for (int64_t k = 0; k < d; ++k) o[k] = w * src[k];
      }
    }
  });
}

void CpuBackend::row_dots(const OpContext& ctx, ConstMatrixView<float> a, std::span<const int32_t> a_rows,
                          ConstMatrixView<float> b, std::span<float> out) const {
  const int64_t d = b.cols;
  run_blocks(ctx, b.rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* x = a.row(a_rows.empty() ? i : a_rows[static_cast<size_t>(i)]);
      const float* y = b.row(i);
      double dot = 0;  // as the FFN's d_scale: accumulated in double, in index order
      for (int64_t k = 0; k < d; ++k) dot += double(x[k]) * y[k];
      out[static_cast<size_t>(i)] = float(dot);
    }
  });
}

namespace {

// C [m, n] (+)= op(A) · op(B) on one thread, all of it.
void small_gemm(const OpContext& ctx, GemmProblem& q) { gemm(q, isa_of(ctx), 0, q.m, 0, q.n); }

void add_rows(ConstMatrixView<float> shared_rows, int64_t t0, int64_t t1, MatrixView<float> dst) {
  if (shared_rows.data == nullptr) return;
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t k = 0; k < dst.cols; ++k) dst(t, k) += shared_rows(t, k);
}

}  // namespace

void CpuBackend::soft_dispatch_forward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& s,
                           ConstMatrixView<float> x, MatrixView<float> slot_inputs) const {
  const int64_t d = x.cols, L = s.sequence_length, S = s.num_slots(), P = s.slots_per_expert;
  // One GEMM per (sequence, expert): [P, L] (the dispatch block, transposed) · [L, d_model].
  run_tasks(ctx, s.num_sequences * s.num_experts, [&](int64_t task, int) {
    const int64_t g = task / s.num_experts, e = task % s.num_experts;
    GemmProblem q;
    q.m = P;
    q.n = d;
    q.k = L;
    q.a = {plan.dispatch.data() + g * L * S + e * P, DType::kF32, 1, S};
    q.b = {x.row(g * L), DType::kF32, d, 1};
    q.c = slot_inputs.row(s.slot_row(e, g));
    q.ldc = d;
    small_gemm(ctx, q);
  });
}

void CpuBackend::soft_dispatch_backward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& s,
                            ConstMatrixView<float> x, ConstMatrixView<float> d_slot_inputs,
                            ConstMatrixView<float> shared_rows, MatrixView<float> d_x, std::span<float> d_dispatch) const {
  const int64_t d = x.cols, L = s.sequence_length, S = s.num_slots(), P = s.slots_per_expert;
  run_tasks(ctx, s.num_sequences, [&](int64_t g, int) {
    for (int64_t e = 0; e < s.num_experts; ++e) {
      const int64_t row = s.slot_row(e, g);
      GemmProblem q;
      q.m = L;
      q.n = d;
      q.k = P;
      q.a = {plan.dispatch.data() + g * L * S + e * P, DType::kF32, S, 1};
      q.b = {d_slot_inputs.row(row), DType::kF32, d, 1};
      q.c = d_x.row(g * L);
      q.ldc = d;
      q.accumulate = true;
      small_gemm(ctx, q);
      GemmProblem r;
      r.m = L;
      r.n = P;
      r.k = d;
      r.a = {x.row(g * L), DType::kF32, d, 1};
      r.b = {d_slot_inputs.row(row), DType::kF32, 1, d};
      r.c = d_dispatch.data() + g * L * S + e * P;
      r.ldc = S;
      small_gemm(ctx, r);
    }
    add_rows(shared_rows, g * L, (g + 1) * L, d_x);
  });
}

void CpuBackend::soft_combine_forward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& s,
                          ConstMatrixView<float> slot_outputs, ConstMatrixView<float> shared_rows,
                          MatrixView<float> out) const {
  const int64_t d = out.cols, L = s.sequence_length, S = s.num_slots(), P = s.slots_per_expert;
  // out_g = Σ_e combine[g, e·P:(e+1)·P] · Y[e, g]  ([L, P] · [P, d_model]), experts in order.
  run_tasks(ctx, s.num_sequences, [&](int64_t g, int) {
    for (int64_t t = g * L; t < (g + 1) * L; ++t) std::fill(out.row(t), out.row(t) + d, 0.0f);
    for (int64_t e = 0; e < s.num_experts; ++e) {
      GemmProblem q;
      q.m = L;
      q.n = d;
      q.k = P;
      q.a = {plan.combine.data() + g * L * S + e * P, DType::kF32, S, 1};
      q.b = {slot_outputs.row(s.slot_row(e, g)), DType::kF32, d, 1};
      q.c = out.row(g * L);
      q.ldc = d;
      q.accumulate = true;
      small_gemm(ctx, q);
    }
    add_rows(shared_rows, g * L, (g + 1) * L, out);
  });
}

void CpuBackend::soft_combine_backward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& s,
                           ConstMatrixView<float> d_out, ConstMatrixView<float> slot_outputs,
                           MatrixView<float> d_slot_outputs, std::span<float> d_combine) const {
  const int64_t d = d_out.cols, L = s.sequence_length, S = s.num_slots(), P = s.slots_per_expert;
  run_tasks(ctx, s.num_sequences * s.num_experts, [&](int64_t task, int) {
    const int64_t g = task / s.num_experts, e = task % s.num_experts;
    const int64_t row = s.slot_row(e, g);
    GemmProblem q;
    q.m = P;
    q.n = d;
    q.k = L;
    q.a = {plan.combine.data() + g * L * S + e * P, DType::kF32, 1, S};
    q.b = {d_out.row(g * L), DType::kF32, d, 1};
    q.c = d_slot_outputs.row(row);
    q.ldc = d;
    small_gemm(ctx, q);
    GemmProblem r;
    r.m = L;
    r.n = P;
    r.k = d;
    r.a = {d_out.row(g * L), DType::kF32, d, 1};
    r.b = {slot_outputs.row(row), DType::kF32, 1, d};
    r.c = d_combine.data() + g * L * S + e * P;
    r.ldc = S;
    small_gemm(ctx, r);
  });
}

std::vector<float> CpuBackend::shared_gate_forward(const OpContext&, ConstMatrixView<float> x,
                                                   std::span<const float> w_gate) const {
  std::vector<float> s(static_cast<size_t>(x.rows));
  for (int64_t t = 0; t < x.rows; ++t) {
    float z = 0;
    for (int64_t k = 0; k < x.cols; ++k) z += x(t, k) * w_gate[static_cast<size_t>(k)];
    s[static_cast<size_t>(t)] = detail::sigmoid(z);
  }
  return s;
}

void CpuBackend::shared_gate_backward(const OpContext& ctx, ConstMatrixView<float> x, std::span<const float> w_gate,
                          std::span<const float> gate, std::span<const float> d_gate, MatrixView<float> d_x,
                          std::span<float> d_w_gate) const {
  const int64_t num_tokens = x.rows, d = x.cols;
  std::vector<float> dz(static_cast<size_t>(num_tokens));
  for (size_t t = 0; t < dz.size(); ++t) dz[t] = d_gate[t] * gate[t] * (1.0f - gate[t]);
  run_blocks(ctx, num_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t k = 0; k < d; ++k) d_x(t, k) += dz[static_cast<size_t>(t)] * w_gate[static_cast<size_t>(k)];
  });
  run_blocks(ctx, d, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = 0; t < num_tokens; ++t)
      for (int64_t k = begin; k < end; ++k) d_w_gate[static_cast<size_t>(k)] += dz[static_cast<size_t>(t)] * x(t, k);
  });
}

}  // namespace moekit::cpu
