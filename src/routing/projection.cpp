// Router projection: logits = (x · Wᵀ + b) per token, accumulated in Real (fp32 or fp64), and
// its backward
//   dx = d_logits · W (+ d_noise · W_noise for noisy gating), × jitter when the input was
//        jittered (x' = x ⊙ u);
//   dW = d_logitsᵀ · x', summed over tokens in token order;  db = Σ_t d_logits.
// Noisy gating (Shazeer et al.): H = l + n·softplus(a), a = x·W_noiseᵀ, so dH/da = n·sigmoid(a).
#include <cmath>

#include "internal/parallel.h"
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
      throw_input_error("router_bias", "finite values", detail::concat(params.bias[i], " at [", i, "]"));
  const int64_t n_out = params.weight.rows;
  Matrix<Real> logits(hidden_states.rows, n_out);
  detail::parallel_for(hidden_states.rows, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Real* x = hidden_states.row(t);
      for (int64_t e = 0; e < n_out; ++e) {
        const Real* w = params.weight.row(e);
        Real acc = 0;
        for (int64_t d = 0; d < d_model; ++d) acc += x[d] * w[d];
        logits(t, e) = acc + (params.bias.empty() ? Real(0) : params.bias[e]);
      }
    }
  });
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
  // dx = d_logits · W (+ d_noise · W_noise), then × jitter.
  detail::parallel_for(num_tokens, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      Real* dx = g.d_hidden_states.row(t);
      for (int64_t e = 0; e < n_out; ++e) {
        const Real dl = d_logits(t, e);
        const Real* w = params.weight.row(e);
        for (int64_t d = 0; d < d_model; ++d) dx[d] += dl * w[d];
        if (noisy) {
          const Real dn = d_noise(t, e);
          const Real* wn = params.noise_weight.row(e);
          for (int64_t d = 0; d < d_model; ++d) dx[d] += dn * wn[d];
        }
      }
      if (jittered)
        for (int64_t d = 0; d < d_model; ++d) dx[d] *= jitter(t, d);
    }
  });
  // dW = d_logitsᵀ · x, summed over tokens in token order (fixed order: deterministic).
  detail::parallel_for(n_out, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      Real* dw = g.d_weight.row(e);
      Real* dwn = noisy ? g.d_noise_weight.row(e) : nullptr;
      for (int64_t t = 0; t < num_tokens; ++t) {
        const Real dl = d_logits(t, e);
        for (int64_t d = 0; d < d_model; ++d) dw[d] += dl * x_at(t, d);
        if (noisy)
          for (int64_t d = 0; d < d_model; ++d) dwn[d] += d_noise(t, e) * x_at(t, d);
        if (!g.d_bias.empty()) g.d_bias[e] += dl;
      }
    }
  });
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
