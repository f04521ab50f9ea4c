// The scalar reference MoE: plain loops over tokens and their kept experts, in Real precision.
// It is the oracle of the layer's tests and the function their finite differences run on, so it
// is written for clarity only: no grouping, no GEMM, no threads.
#include "reference_moe.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "moekit/error.h"
#include "moekit/experts.h"

namespace moekit {
namespace {

// One expert MLP as pointers into the parameter tensors (biases may be null).
template <typename Real>
struct ExpertPtrs {
  const Real* gate_up = nullptr;       // [gate_up_rows, d_model]
  const Real* down = nullptr;          // [d_model, d_ff]
  const Real* gate_up_bias = nullptr;  // [gate_up_rows]
  const Real* down_bias = nullptr;     // [d_model]
  int64_t d_ff = 0;
};

template <typename Real>
struct ExpertGradPtrs {
  Real* gate_up = nullptr;
  Real* down = nullptr;
  Real* gate_up_bias = nullptr;
  Real* down_bias = nullptr;
};

template <typename V>
auto data_or_null(V& v, int64_t offset) {
  return v.empty() ? nullptr : v.data() + offset;
}

template <typename Tensors, typename Ptrs>
Ptrs routed_expert(const MoeLayerConfig& c, Tensors& p, int64_t e) {
  const int64_t rows = c.gate_up_rows();
  return {data_or_null(p.gate_up, e * rows * c.d_model), data_or_null(p.down, e * c.d_model * c.d_ff),
          data_or_null(p.gate_up_bias, e * rows), data_or_null(p.down_bias, e * c.d_model)};
}

template <typename Tensors, typename Ptrs>
Ptrs shared_expert(Tensors& p) {
  return {data_or_null(p.shared_gate_up, 0), data_or_null(p.shared_down, 0),
          data_or_null(p.shared_gate_up_bias, 0), data_or_null(p.shared_down_bias, 0)};
}

template <typename Real>
ExpertPtrs<Real> expert_params(const MoeLayerConfig& c, const BasicMoeTensors<Real>& p,
                               int64_t e) {  // e = num_experts: the shared expert
  ExpertPtrs<Real> x = e < c.num_experts()
                           ? routed_expert<const BasicMoeTensors<Real>, ExpertPtrs<Real>>(c, p, e)
                           : shared_expert<const BasicMoeTensors<Real>, ExpertPtrs<Real>>(p);
  x.d_ff = e < c.num_experts() ? c.d_ff : c.effective_shared_d_ff();
  return x;
}

template <typename Real>
ExpertGradPtrs<Real> expert_grads(const MoeLayerConfig& c, BasicMoeTensors<Real>& g, int64_t e) {
  return e < c.num_experts() ? routed_expert<BasicMoeTensors<Real>, ExpertGradPtrs<Real>>(c, g, e)
                             : shared_expert<BasicMoeTensors<Real>, ExpertGradPtrs<Real>>(g);
}

// y = W_down · act(W_gate_up · x + b_gate_up) + b_down; keeps the pre-activations a.
template <typename Real>
void expert_forward(const MoeLayerConfig& c, const ExpertPtrs<Real>& p,
                    const Real* x,  // [d_model]
                    Real* y,        // [d_model]
                    std::vector<Real>& a, std::vector<Real>& h) {
  const int64_t d = c.d_model, f = p.d_ff;
  const bool gated = is_gated(c.activation);
  const int64_t rows = gated ? 2 * f : f;
  a.assign(static_cast<size_t>(rows), Real(0));
  h.assign(static_cast<size_t>(f), Real(0));
  for (int64_t r = 0; r < rows; ++r) {
    Real acc = p.gate_up_bias ? p.gate_up_bias[r] : Real(0);
    for (int64_t k = 0; k < d; ++k) acc += p.gate_up[r * d + k] * x[k];
    a[r] = acc;
  }
  for (int64_t j = 0; j < f; ++j)
    h[j] = activation_forward(c.activation, a[j], gated ? a[f + j] : Real(0), c.activation_constants);
  for (int64_t r = 0; r < d; ++r) {
    Real acc = p.down_bias ? p.down_bias[r] : Real(0);
    for (int64_t j = 0; j < f; ++j) acc += p.down[r * f + j] * h[j];
    y[r] = acc;
  }
}

// Given d_y, adds the expert's parameter gradients into g and d_x (+=).
template <typename Real>
void expert_backward(const MoeLayerConfig& c, const ExpertPtrs<Real>& p, const ExpertGradPtrs<Real>& g,
                     const Real* x,    // [d_model]
                     const Real* d_y,  // [d_model]
                     Real* d_x) {      // [d_model]
  std::vector<Real> a, h, y(static_cast<size_t>(c.d_model));
  expert_forward(c, p, x, y.data(), a, h);
  const int64_t d = c.d_model, f = p.d_ff;
  const bool gated = is_gated(c.activation);
  const int64_t rows = gated ? 2 * f : f;
  // y = W_down h + b:  dW_down += d_y hᵀ,  db_down += d_y,  d_h = W_downᵀ d_y.
  std::vector<Real> d_h(static_cast<size_t>(f), Real(0)), d_a(static_cast<size_t>(rows), Real(0));
  for (int64_t r = 0; r < d; ++r) {
    for (int64_t j = 0; j < f; ++j) {
      g.down[r * f + j] += d_y[r] * h[j];
      d_h[j] += p.down[r * f + j] * d_y[r];
    }
    if (g.down_bias) g.down_bias[r] += d_y[r];
  }
  for (int64_t j = 0; j < f; ++j) {
    Real d_u = 0;
    activation_backward(c.activation, a[j], gated ? a[f + j] : Real(0), d_h[j],
                        c.activation_constants, &d_a[j], &d_u);
    if (gated) d_a[f + j] = d_u;
  }
  // a = W_gate_up x + b:  dW += d_a xᵀ,  db += d_a,  d_x += W_gate_upᵀ d_a.
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < d; ++k) {
      g.gate_up[r * d + k] += d_a[r] * x[k];
      d_x[k] += p.gate_up[r * d + k] * d_a[r];
    }
    if (g.gate_up_bias) g.gate_up_bias[r] += d_a[r];
  }
}

template <typename Real>
Real dot(const Real* a, const Real* b, int64_t n) {
  Real acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename Real>
RouterParams<Real> router_params(const MoeLayerConfig& c, const BasicMoeTensors<Real>& p) {
  RouterParams<Real> r;
  r.weight = {p.router_weight.data(), c.router_rows(), c.d_model};
  r.bias = p.router_bias;
  if (!p.router_noise_weight.empty()) r.noise_weight = {p.router_noise_weight.data(), c.num_experts(), c.d_model};
  return r;
}

// Soft MoE slot inputs X̃[g, j] = Σ_{t in sequence g} dispatch[t, j] · x_t.
template <typename Real>
Matrix<Real> slot_inputs(const BasicRoutingPlan<Real>& plan, int64_t seq_len,
                         ConstMatrixView<Real> x) {  // [num_tokens, d_model]
  const int64_t slots = plan.num_slots, num_seq = plan.num_tokens / seq_len;
  Matrix<Real> xs(num_seq * slots, x.cols);
  for (int64_t g = 0; g < num_seq; ++g)
    for (int64_t j = 0; j < slots; ++j)
      for (int64_t t = g * seq_len; t < (g + 1) * seq_len; ++t) {
        const Real p = plan.dispatch[t * slots + j];
        for (int64_t k = 0; k < x.cols; ++k) xs(g * slots + j, k) += p * x(t, k);
      }
  return xs;
}

}  // namespace

template <typename Real>
ReferenceMoeForward<Real> reference_moe_forward(const MoeLayerConfig& config,
                                                const BasicMoeTensors<Real>& params,
                                                ConstMatrixView<Real> hidden_states,
                                                const RoutingOptions& options) {
  config.validate();
  const MoeLayerConfig& c = config;
  const int64_t num_tokens = hidden_states.rows, d = c.d_model, num_experts = c.num_experts();
  ReferenceMoeForward<Real> r;
  r.routing = route_hidden(c.routing, hidden_states, router_params(c, params), options);
  r.output = Matrix<Real>(num_tokens, d);
  std::vector<Real> a, h, y(static_cast<size_t>(d));
  const BasicRoutingPlan<Real>& plan = r.routing.plan;
  if (c.routing.routing_method == RoutingMethod::kSoftMoe) {
    const int64_t len = r.routing.saved.sequence_length, slots = plan.num_slots;
    const int64_t per_expert = c.routing.slots_per_expert;
    Matrix<Real> xs = slot_inputs(plan, len, hidden_states);
    for (int64_t row = 0; row < xs.rows; ++row) {
      const int64_t g = row / slots, j = row % slots;
      expert_forward(c, expert_params(c, params, j / per_expert), xs.row(row), y.data(), a, h);
      for (int64_t t = g * len; t < (g + 1) * len; ++t)
        for (int64_t k = 0; k < d; ++k) r.output(t, k) += plan.combine[t * slots + j] * y[k];
    }
  } else {
    for (int64_t t = 0; t < num_tokens; ++t) {
      for (int64_t i = plan.token_offsets[t]; i < plan.token_offsets[t + 1]; ++i) {
        if (!plan.token_kept[i]) continue;
        expert_forward(c, expert_params(c, params, plan.token_experts[i]), hidden_states.row(t),
                       y.data(), a, h);
        for (int64_t k = 0; k < d; ++k) r.output(t, k) += plan.token_weights[i] * y[k];
      }
    }
  }
  if (c.has_shared()) {
    for (int64_t t = 0; t < num_tokens; ++t) {
      expert_forward(c, expert_params(c, params, num_experts), hidden_states.row(t), y.data(), a, h);
      const Real s = c.shared_expert_gate
                         ? detail::sigmoid(dot(hidden_states.row(t), params.shared_gate.data(), d))
                         : Real(1);
      for (int64_t k = 0; k < d; ++k) r.output(t, k) += s * y[k];
    }
  }
  return r;
}

template <typename Real>
ReferenceMoeGrads<Real> reference_moe_backward(const MoeLayerConfig& config,
                                               const BasicMoeTensors<Real>& params,
                                               ConstMatrixView<Real> hidden_states,
                                               const ReferenceMoeForward<Real>& forward,
                                               ConstMatrixView<Real> d_output) {
  const MoeLayerConfig& c = config;
  const int64_t num_tokens = hidden_states.rows, d = c.d_model, num_experts = c.num_experts();
  const BasicRoutingPlan<Real>& plan = forward.routing.plan;
  ReferenceMoeGrads<Real> r;
  r.d_hidden_states = Matrix<Real>(num_tokens, d);
  r.d_params = make_moe_tensors<Real>(c);
  BasicMoeTensors<Real>& g = r.d_params;
  std::vector<Real> a, h, y(static_cast<size_t>(d)), d_y(static_cast<size_t>(d));
  RoutingGradOutput<Real> rg;
  rg.d_aux_loss = c.routing.router_aux_loss_coef;
  rg.d_z_loss = c.routing.router_z_loss_coef;

  if (c.routing.routing_method == RoutingMethod::kSoftMoe) {
    const int64_t len = forward.routing.saved.sequence_length, slots = plan.num_slots;
    const int64_t per_expert = c.routing.slots_per_expert;
    Matrix<Real> xs = slot_inputs(plan, len, hidden_states);
    rg.d_dispatch.assign(static_cast<size_t>(num_tokens * slots), Real(0));
    rg.d_combine.assign(static_cast<size_t>(num_tokens * slots), Real(0));
    std::vector<Real> d_xs(static_cast<size_t>(d));
    for (int64_t row = 0; row < xs.rows; ++row) {
      const int64_t grp = row / slots, j = row % slots, e = j / per_expert;
      const ExpertPtrs<Real> p = expert_params(c, params, e);
      expert_forward(c, p, xs.row(row), y.data(), a, h);
      // out_t += combine_tj · y_j:  d_combine_tj = ⟨d_out_t, y_j⟩,  d_y_j = Σ_t combine_tj d_out_t.
      std::fill(d_y.begin(), d_y.end(), Real(0));
      for (int64_t t = grp * len; t < (grp + 1) * len; ++t) {
        rg.d_combine[t * slots + j] = dot(d_output.row(t), y.data(), d);
        for (int64_t k = 0; k < d; ++k) d_y[k] += plan.combine[t * slots + j] * d_output(t, k);
      }
      std::fill(d_xs.begin(), d_xs.end(), Real(0));
      expert_backward(c, p, expert_grads(c, g, e), xs.row(row), d_y.data(), d_xs.data());
      // X̃_j = Σ_t dispatch_tj x_t:  d_dispatch_tj = ⟨x_t, d_X̃_j⟩,  d_x_t += dispatch_tj d_X̃_j.
      for (int64_t t = grp * len; t < (grp + 1) * len; ++t) {
        rg.d_dispatch[t * slots + j] = dot(hidden_states.row(t), d_xs.data(), d);
        for (int64_t k = 0; k < d; ++k) r.d_hidden_states(t, k) += plan.dispatch[t * slots + j] * d_xs[k];
      }
    }
  } else {
    rg.d_token_weights.assign(static_cast<size_t>(plan.num_selections()), Real(0));
    for (int64_t t = 0; t < num_tokens; ++t) {
      for (int64_t i = plan.token_offsets[t]; i < plan.token_offsets[t + 1]; ++i) {
        if (!plan.token_kept[i]) continue;
        const int64_t e = plan.token_experts[i];
        const ExpertPtrs<Real> p = expert_params(c, params, e);
        // out_t += w · E(x_t):  d_w = ⟨d_out_t, E(x_t)⟩,  d_y = w · d_out_t.
        expert_forward(c, p, hidden_states.row(t), y.data(), a, h);
        rg.d_token_weights[i] = dot(d_output.row(t), y.data(), d);
        for (int64_t k = 0; k < d; ++k) d_y[k] = plan.token_weights[i] * d_output(t, k);
        expert_backward(c, p, expert_grads(c, g, e), hidden_states.row(t), d_y.data(),
                        r.d_hidden_states.row(t));
      }
    }
  }

  if (c.has_shared()) {
    const ExpertPtrs<Real> p = expert_params(c, params, num_experts);
    for (int64_t t = 0; t < num_tokens; ++t) {
      const Real* x = hidden_states.row(t);
      Real s = 1;
      if (c.shared_expert_gate) {
        // out_t += σ(z) · S(x_t), z = ⟨x_t, w_gate⟩:  dz = ⟨d_out_t, S(x_t)⟩ · σ(z)(1 − σ(z)).
        s = detail::sigmoid(dot(x, params.shared_gate.data(), d));
        expert_forward(c, p, x, y.data(), a, h);
        const Real dz = dot(d_output.row(t), y.data(), d) * s * (Real(1) - s);
        for (int64_t k = 0; k < d; ++k) {
          g.shared_gate[k] += dz * x[k];
          r.d_hidden_states(t, k) += dz * params.shared_gate[k];
        }
      }
      for (int64_t k = 0; k < d; ++k) d_y[k] = s * d_output(t, k);
      expert_backward(c, p, expert_grads(c, g, num_experts), x, d_y.data(), r.d_hidden_states.row(t));
    }
  }

  // Router: combine weights (or dispatch/combine) and losses → logits → router parameters.
  Matrix<Real> d_noisy;
  const Matrix<Real> d_logits = route_backward(c.routing, forward.routing, rg, &d_noisy);
  const RouterGrads<Real> router = router_backward(c.routing, forward.routing, hidden_states,
                                                   router_params(c, params), d_logits.cview(), 1,
                                                   d_noisy.cview());
  for (int64_t i = 0; i < int64_t(r.d_hidden_states.values.size()); ++i) r.d_hidden_states.values[i] += router.d_hidden_states.values[i];
  g.router_weight = router.d_weight.values;
  if (!g.router_bias.empty()) g.router_bias = router.d_bias;
  if (!g.router_noise_weight.empty()) g.router_noise_weight = router.d_noise_weight.values;
  return r;
}

#define MOEKIT_INSTANTIATE_REFERENCE(Real)                                                       \
  template ReferenceMoeForward<Real> reference_moe_forward<Real>(                                \
      const MoeLayerConfig&, const BasicMoeTensors<Real>&, ConstMatrixView<Real>,                \
      const RoutingOptions&);                                                                    \
  template ReferenceMoeGrads<Real> reference_moe_backward<Real>(                                 \
      const MoeLayerConfig&, const BasicMoeTensors<Real>&, ConstMatrixView<Real>,                \
      const ReferenceMoeForward<Real>&, ConstMatrixView<Real>);

MOEKIT_INSTANTIATE_REFERENCE(float)
MOEKIT_INSTANTIATE_REFERENCE(double)

}  // namespace moekit
