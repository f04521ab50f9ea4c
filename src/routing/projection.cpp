// The routing core's router projection, on the router op (src/ops/router.h): logits = x · Wᵀ + b
// per token (fp32 on the GEMM kernels, fp64 accumulated in double), and its backward
//   dx = d_logits · W (+ d_noise · W_noise for noisy gating), × jitter when the input was
//        jittered (x' = x ⊙ u);
//   dW = d_logitsᵀ · x', summed over tokens in token order;  db = Σ_t d_logits.
// Noisy gating (Shazeer et al.): H = l + n·softplus(a), a = x·W_noiseᵀ, so dH/da = n·sigmoid(a).
#include <cmath>

#include "ops/router.h"
#include "router_state.h"

namespace moekit {

using routing_detail::check_matrix;
using routing_detail::sigmoid;

template <typename Real>
Matrix<Real> router_logits(const RoutingConfig& config, ConstMatrixView<Real> hidden_states,
                           const RouterParams<Real>& params, int num_threads) {
  const int64_t d_model = hidden_states.cols;
  check_matrix(params.weight, "router_weight", d_model, "d_model of hidden_states");
  if (params.weight.rows != config.num_experts && config.routing_method != RoutingMethod::kSoftMoe) {
    throw_input_error("router_weight rows", detail::concat(config.num_experts, " (num_experts)"),
                      params.weight.rows);
  }
  if (config.routing_method == RoutingMethod::kSoftMoe &&
      params.weight.rows != config.num_experts * config.slots_per_expert) {
    throw_input_error("router_weight rows",
                      detail::concat(config.num_experts * config.slots_per_expert,
                                     " (num_experts · slots_per_expert)"),
                      params.weight.rows);
  }
  if (!params.bias.empty() && static_cast<int64_t>(params.bias.size()) != params.weight.rows) {
    throw_input_error("router_bias length", params.weight.rows, params.bias.size());
  }
  for (size_t i = 0; i < params.bias.size(); ++i)
    if (!std::isfinite(double(params.bias[i])))
      throw_input_error(detail::concat("router_bias[", i, "]"), "a finite number", params.bias[i]);
  Matrix<Real> logits(hidden_states.rows, params.weight.rows);
  ops::router_forward<Real>(ops::default_context(num_threads), hidden_states, params.weight, params.bias, logits.view());
  return logits;
}

template <typename Real>
RouterGrads<Real> router_backward(const RoutingConfig& config, const RoutingResult<Real>& result,
                                  ConstMatrixView<Real> hidden_states,
                                  const RouterParams<Real>& params, ConstMatrixView<Real> d_logits,
                                  int num_threads, ConstMatrixView<Real> d_noisy_logits) {
  const int64_t num_tokens = hidden_states.rows, d_model = hidden_states.cols;
  const int64_t n_out = params.weight.rows;
  if (d_logits.rows != num_tokens || d_logits.cols != n_out) {
    throw_input_error("d_logits shape", detail::concat("[", num_tokens, ", ", n_out, "]"),
                      detail::concat("[", d_logits.rows, ", ", d_logits.cols, "]"));
  }
  const Matrix<Real>& jitter = result.saved.jitter;
  const bool jittered = jitter.rows == num_tokens;
  auto x_at = [&](int64_t t, int64_t d) {
    return jittered ? hidden_states(t, d) * jitter(t, d) : hidden_states(t, d);
  };
  RouterGrads<Real> g;
  g.d_hidden_states = Matrix<Real>(num_tokens, d_model);
  g.d_weight = Matrix<Real>(n_out, d_model);
  if (!params.bias.empty()) g.d_bias.assign(static_cast<size_t>(n_out), Real(0));

  // Noisy gating: H = l + n·softplus(a), a = x·W_noiseᵀ; dH/dl = 1, dH/da = n·sigmoid(a).
  Matrix<Real> d_noise;
  const bool noisy = config.noisy_gating && result.saved.noise_logits.rows == num_tokens;
  if (noisy) {
    if (d_noisy_logits.rows != num_tokens || d_noisy_logits.cols != n_out) {
      throw_input_error("d_noisy_logits shape (noisy gating)",
                        detail::concat("[", num_tokens, ", ", n_out, "] from route_backward"),
                        detail::concat("[", d_noisy_logits.rows, ", ", d_noisy_logits.cols, "]"));
    }
    d_noise = Matrix<Real>(num_tokens, n_out);
    for (int64_t t = 0; t < num_tokens; ++t)
      for (int64_t e = 0; e < n_out; ++e)
        d_noise(t, e) = d_noisy_logits(t, e) * result.saved.noise_draws(t, e) *
                        sigmoid(result.saved.noise_logits(t, e));
    g.d_noise_weight = Matrix<Real>(n_out, d_model);
  }
  // The projections' backward on the input the forward projected (x' = x ⊙ u when jittered):
  //   dx' = d_logits · W (+ d_noise · W_noise),  dW = d_logitsᵀ · x',  dW_noise = d_noiseᵀ · x';
  // then dx = dx' ⊙ u.
  Matrix<Real> x_jittered;
  ConstMatrixView<Real> x_in = hidden_states;
  if (jittered) {
    x_jittered = Matrix<Real>(num_tokens, d_model);
    for (int64_t t = 0; t < num_tokens; ++t)
      for (int64_t d = 0; d < d_model; ++d) x_jittered(t, d) = x_at(t, d);
    x_in = x_jittered.cview();
  }
  const ops::OpContext ctx = ops::default_context(num_threads);
  ops::router_backward<Real>(ctx, x_in, params.weight, d_logits, g.d_hidden_states.view(), g.d_weight.view(),
                             std::span<Real>(g.d_bias));
  if (noisy)
    ops::router_backward<Real>(ctx, x_in, params.noise_weight, d_noise.cview(), g.d_hidden_states.view(),
                               g.d_noise_weight.view(), {});
  if (jittered)
    for (int64_t t = 0; t < num_tokens; ++t)
      for (int64_t d = 0; d < d_model; ++d) g.d_hidden_states(t, d) *= jitter(t, d);
  return g;
}

template Matrix<float> router_logits<float>(const RoutingConfig&, ConstMatrixView<float>,
                                            const RouterParams<float>&, int);
template Matrix<double> router_logits<double>(const RoutingConfig&, ConstMatrixView<double>,
                                              const RouterParams<double>&, int);
template RouterGrads<float> router_backward<float>(const RoutingConfig&, const RoutingResult<float>&,
                                                   ConstMatrixView<float>, const RouterParams<float>&,
                                                   ConstMatrixView<float>, int, ConstMatrixView<float>);
template RouterGrads<double> router_backward<double>(const RoutingConfig&,
                                                     const RoutingResult<double>&,
                                                     ConstMatrixView<double>,
                                                     const RouterParams<double>&,
                                                     ConstMatrixView<double>, int,
                                                     ConstMatrixView<double>);

}  // namespace moekit
