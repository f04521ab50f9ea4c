// Public routing entry points: route_logits, route_probs and route_hidden (input checks, input
// jitter, the router projection), record/replay of expert choices, the aux-loss-free expert
// bias update, and Router::run, which sequences one forward.
//
// Logits entering the routing: l = input / τ (temperature), plus Gaussian logit noise
// N(0, (noise_std / E)²) (V-MoE, Tutel) or noisy-gating noise N(0,1)·softplus(x·W_noiseᵀ)
// (Shazeer et al.) when training (or noise_in_eval). Input jitter (Switch, Mixtral) multiplies
// the hidden states by U(1 − ε, 1 + ε) before the projection. Finite inputs whose logits
// overflow (projection, temperature, noise) are rejected naming the token and the expert.
//
// Expert bias update (DeepSeek-V3 aux-loss-free balancing, Megatron expert bias):
//   b_e += rate · sign(mean_e' load_e' − load_e).
#include <algorithm>
#include <cmath>
#include <vector>

#include "internal/random.h"
#include "router_state.h"

namespace moekit {
namespace routing_detail {
namespace {

void check_replay(const RoutingConfig& config, const RoutingRecord& r, int64_t num_tokens) {
  if (r.num_tokens != num_tokens) {
    throw_input_error("replay num_tokens", num_tokens, r.num_tokens);
  }
  if (r.num_experts != config.num_experts) {
    throw_input_error("replay num_experts", config.num_experts, r.num_experts);
  }
  if (static_cast<int64_t>(r.token_offsets.size()) != num_tokens + 1 ||
      r.token_offsets.back() != static_cast<int64_t>(r.token_experts.size())) {
    throw_input_error("replay token_offsets", "num_tokens + 1 offsets ending at the selections",
                      r.token_offsets.size());
  }
  for (int32_t e : r.token_experts) {
    if (e < 0 || e >= config.num_experts) {
      throw_input_error("replay expert", detail::concat("in [0, ", config.num_experts, ")"), e);
    }
  }
}

void check_logit_noise(const RoutingConfig& config,
                       std::span<const double> logit_noise,  // [num_tokens · cols]
                       int64_t num_tokens) {
  const int64_t cols = logit_columns(config);
  if (static_cast<int64_t>(logit_noise.size()) != num_tokens * cols) {
    throw_input_error("logit_noise size", detail::concat(num_tokens * cols, " (num_tokens · num_experts)"),
                      logit_noise.size());
  }
  if (!(config.noise_std > 0) || !noise_active(config)) {
    throw_input_error("logit_noise", "noise_std > 0 and training (or noise_in_eval)",
                      detail::concat("noise_std ", config.noise_std, ", training ", config.training));
  }
  for (size_t i = 0; i < logit_noise.size(); ++i)
    if (!std::isfinite(logit_noise[i]))
      throw_input_error(detail::concat("logit_noise[", i, "]"), "a finite number", logit_noise[i]);
}

void check_selection_bias(const RoutingConfig& config,
                          std::span<const float> bias) {  // [num_experts]
  if (static_cast<int64_t>(bias.size()) != config.num_experts) {
    throw_input_error("selection_bias length", detail::concat(config.num_experts, " (num_experts)"),
                      bias.size());
  }
  for (size_t e = 0; e < bias.size(); ++e)
    if (!std::isfinite(bias[e]))
      throw_input_error(detail::concat("selection_bias[", e, "]"), "a finite number", bias[e]);
}

void check_options(const RoutingConfig& config, const RoutingOptions& options,
                   int64_t num_tokens) {
  if (!options.token_mask.empty()) {
    if (static_cast<int64_t>(options.token_mask.size()) != num_tokens) {
      throw_input_error("token_mask length", detail::concat(num_tokens, " (num_tokens)"),
                        options.token_mask.size());
    }
    for (size_t i = 0; i < options.token_mask.size(); ++i) {
      if (options.token_mask[i] > 1) {
        throw_input_error("token_mask", "0 or 1",
                          detail::concat(int(options.token_mask[i]), " at [", i, "]"));
      }
    }
  }
  if (options.sequence_length < 0) {
    throw_input_error("sequence_length", ">= 0", options.sequence_length);
  }
  if (options.sequence_length > 0 && num_tokens % options.sequence_length != 0) {
    throw_input_error("sequence_length",
                      detail::concat("a divisor of num_tokens = ", num_tokens),
                      options.sequence_length);
  }
  if (!options.labels.empty() && static_cast<int64_t>(options.labels.size()) != num_tokens) {
    throw_input_error("labels length", detail::concat(num_tokens, " (num_tokens)"),
                      options.labels.size());
  }
  if (!options.global_counts.empty() &&
      static_cast<int64_t>(options.global_counts.size()) != config.num_experts) {
    throw_input_error("global_counts length", detail::concat(config.num_experts, " (num_experts)"),
                      options.global_counts.size());
  }
  if (options.replay != nullptr) check_replay(config, *options.replay, num_tokens);
  if (!options.logit_noise.empty()) check_logit_noise(config, options.logit_noise, num_tokens);
  if (!options.selection_bias.empty()) check_selection_bias(config, options.selection_bias);
  if (options.replay != nullptr && config.routing_method == RoutingMethod::kSoftMoe) {
    throw_input_error("replay", "a token-choice, dense or expert-choice method", "soft_moe");
  }
}

}  // namespace

using detail::RandomStream;

template <typename Real>
void Router<Real>::prepare_logits(ConstMatrixView<Real> input, bool scores_given,
                                  const Matrix<Real>* noise_logits) {
  RoutingSaved<Real>& s = r_.saved;
  s.scores_given = scores_given;
  s.sequence_length = opt_.sequence_length > 0 ? opt_.sequence_length : num_tokens_;
  s.token_mask.assign(static_cast<size_t>(num_tokens_), 1);
  if (!opt_.token_mask.empty()) {
    std::copy(opt_.token_mask.begin(), opt_.token_mask.end(), s.token_mask.begin());
  }
  const int64_t cols = input.cols;
  s.clean_logits = Matrix<Real>(num_tokens_, cols);
  const Real inv_temperature = Real(1.0 / c_.temperature);
  for (int64_t i = 0; i < input.size(); ++i) {
    s.clean_logits.values[i] = scores_given ? input.data[i] : input.data[i] * inv_temperature;
  }
  if (!scores_given) check_finite_logits(s.clean_logits);  // projection and temperature
  s.logits = s.clean_logits;
  if (scores_given || !noise_active(c_)) return;

  if (c_.noise_std > 0) add_logit_noise();
  if (c_.noisy_gating && noise_logits != nullptr) add_noisy_gating(*noise_logits);
  if (c_.noise_std > 0 || (c_.noisy_gating && noise_logits != nullptr)) check_finite_logits(s.logits);
}

template <typename Real>
void Router<Real>::add_logit_noise() {
  RoutingSaved<Real>& s = r_.saved;
  // Gaussian logit noise N(0, (noise_std / E)²) (V-MoE, Tutel), drawn from the seed or given.
  const int64_t cols = s.logits.cols;
  const double std_dev = c_.noise_std / double(num_experts_);
  for (int64_t t = 0; t < num_tokens_; ++t) {
    for (int64_t e = 0; e < cols; ++e) {
      s.logits(t, e) += Real(opt_.logit_noise.empty()
                                 ? std_dev * detail::random_normal(c_.seed, RandomStream::kLogitNoise,
                                                                   uint64_t(t), uint64_t(e))
                                 : opt_.logit_noise[t * cols + e]);
    }
  }
}

template <typename Real>
void Router<Real>::add_noisy_gating(const Matrix<Real>& noise_logits) {
  RoutingSaved<Real>& s = r_.saved;
  // Noisy top-k gating (Shazeer et al. 2017): H = x·W_g + N(0,1)·softplus(x·W_noise).
  const int64_t cols = s.logits.cols;
  s.noise_logits = noise_logits;
  s.noise_draws = Matrix<Real>(num_tokens_, cols);
  for (int64_t t = 0; t < num_tokens_; ++t) {
    for (int64_t e = 0; e < cols; ++e) {
      const Real n = Real(detail::random_normal(c_.seed, RandomStream::kNoisyGating,
                                                uint64_t(t), uint64_t(e)));
      const Real a = s.noise_logits(t, e);
      const Real softplus = a > 20 ? a : std::log1p(std::exp(a));
      s.noise_draws(t, e) = n;
      s.logits(t, e) += n * softplus;
    }
  }
}

template <typename Real>
RoutingResult<Real> Router<Real>::run(ConstMatrixView<Real> input, bool scores_given,
                                      const Matrix<Real>* noise_logits) {
  r_.plan.num_tokens = num_tokens_;
  r_.plan.num_experts = num_experts_;
  prepare_logits(input, scores_given, noise_logits);
  if (c_.routing_method == RoutingMethod::kSoftMoe) {
    soft_moe();
    compute_losses();
    compute_stats();
    return std::move(r_);
  }
  compute_scores();
  compute_top1_scores();
  switch (c_.routing_method) {
    case RoutingMethod::kDense: select_dense(); break;
    case RoutingMethod::kExpertChoice: select_expert_choice(); break;
    default:
      select_token_choice();
      apply_random_routing();
      apply_capacity();
      break;
  }
  finish_weights();
  build_expert_lists();
  compute_losses();
  compute_stats();
  return std::move(r_);
}

#define MOEKIT_INSTANTIATE(Real)                                                              \
  template RoutingResult<Real> Router<Real>::run(ConstMatrixView<Real>, bool,                 \
                                                 const Matrix<Real>*);                        \
  template void Router<Real>::prepare_logits(ConstMatrixView<Real>, bool, const Matrix<Real>*); \
  template void Router<Real>::add_logit_noise();                                              \
  template void Router<Real>::add_noisy_gating(const Matrix<Real>&);

MOEKIT_INSTANTIATE(float)
MOEKIT_INSTANTIATE(double)
#undef MOEKIT_INSTANTIATE

}  // namespace routing_detail

using detail::RandomStream;
using routing_detail::check_finite;
using routing_detail::check_matrix;
using routing_detail::check_options;
using routing_detail::noise_active;
using routing_detail::Router;

template <typename Real>
RoutingResult<Real> route_logits(const RoutingConfig& config, ConstMatrixView<Real> logits,
                                 const RoutingOptions& options) {
  config.validate();
  check_matrix(logits, "logits", routing_detail::logit_columns(config),
               config.routing_method == RoutingMethod::kSoftMoe ? "num_experts · slots_per_expert"
                                                                : "num_experts");
  check_options(config, options, logits.rows);
  Router<Real> router(config, options, logits.rows);
  return router.run(logits, false, nullptr);
}

template <typename Real>
RoutingResult<Real> route_probs(const RoutingConfig& config, ConstMatrixView<Real> probs,
                                const RoutingOptions& options) {
  config.validate();
  if (config.routing_method == RoutingMethod::kSoftMoe) {
    throw_input_error("probs", "logits for soft_moe routing", "probs");
  }
  check_matrix(probs, "probs", config.num_experts, "num_experts");
  for (int64_t i = 0; i < probs.size(); ++i)
    if (probs.data[i] < 0)
      throw_input_error("probs", "non-negative values",
                        detail::concat(probs.data[i], " at [", i / probs.cols, "][", i % probs.cols, "]"));
  check_options(config, options, probs.rows);
  Router<Real> router(config, options, probs.rows);
  return router.run(probs, true, nullptr);
}

template <typename Real>
RoutingResult<Real> route_hidden(const RoutingConfig& config, ConstMatrixView<Real> hidden_states,
                                 const RouterParams<Real>& params, const RoutingOptions& options) {
  config.validate();
  if (hidden_states.data == nullptr || hidden_states.rows <= 0 || hidden_states.cols <= 0) {
    throw_input_error("hidden_states", "a non-empty [num_tokens, d_model] matrix",
                      detail::concat("[", hidden_states.rows, ", ", hidden_states.cols, "]"));
  }
  check_finite(hidden_states, "hidden_states");
  // Input jitter (Switch, Mixtral): x ×= U(1 − ε, 1 + ε), elementwise, before the router.
  Matrix<Real> jitter;
  Matrix<Real> jittered;
  ConstMatrixView<Real> x = hidden_states;
  if (config.router_jitter_noise > 0 && noise_active(config)) {
    jitter = Matrix<Real>(hidden_states.rows, hidden_states.cols);
    jittered = Matrix<Real>(hidden_states.rows, hidden_states.cols);
    const double eps = config.router_jitter_noise;
    for (int64_t t = 0; t < hidden_states.rows; ++t) {
      for (int64_t d = 0; d < hidden_states.cols; ++d) {
        const double u = detail::random_uniform(config.seed, RandomStream::kJitter, uint64_t(t), uint64_t(d));
        jitter(t, d) = Real(1.0 - eps + 2.0 * eps * u);
        jittered(t, d) = hidden_states(t, d) * jitter(t, d);
      }
    }
    x = jittered.cview();
  }
  Matrix<Real> logits = router_logits(config, x, params, options.num_threads);
  Matrix<Real> noise_logits;
  if (config.noisy_gating) {
    if (params.noise_weight.data == nullptr) {
      throw_input_error("noise_weight", "a [num_experts, d_model] matrix for noisy_gating", "none");
    }
    check_matrix(params.noise_weight, "noise_weight", hidden_states.cols, "d_model");
    if (params.noise_weight.rows != config.num_experts)
      throw_input_error("noise_weight rows", config.num_experts, params.noise_weight.rows);
    RouterParams<Real> noise_params{params.noise_weight, {}, {}};
    noise_logits = router_logits(config, x, noise_params, options.num_threads);
  }
  check_options(config, options, logits.rows);
  Router<Real> router(config, options, logits.rows);
  RoutingResult<Real> result =
      router.run(logits.cview(), false, config.noisy_gating ? &noise_logits : nullptr);
  result.saved.jitter = std::move(jitter);
  return result;
}

template <typename Real>
RoutingRecord record_routing(const BasicRoutingPlan<Real>& plan) {
  RoutingRecord record;
  record.num_tokens = plan.num_tokens;
  record.num_experts = plan.num_experts;
  record.token_offsets = plan.token_offsets;
  record.token_experts = plan.token_experts;
  return record;
}

namespace {

// sign(mean_e' n_e' − n_e) per expert, after the shape and rate checks.
std::vector<int> bias_update_signs(size_t bias_size, std::span<const int64_t> tokens_per_expert,
                                   double rate) {
  if (bias_size != tokens_per_expert.size()) {
    throw_input_error("bias length", tokens_per_expert.size(), bias_size);
  }
  if (!(rate >= 0) || !std::isfinite(rate)) throw_input_error("rate", "a finite value >= 0", rate);
  std::vector<int> signs(bias_size, 0);
  if (bias_size == 0) return signs;
  double mean = 0;
  for (int64_t n : tokens_per_expert) mean += double(n);
  mean /= double(tokens_per_expert.size());
  for (size_t e = 0; e < bias_size; ++e) {
    const double diff = mean - double(tokens_per_expert[e]);
    signs[e] = (diff > 0) - (diff < 0);
  }
  return signs;
}

}  // namespace

void update_expert_bias(std::span<double> bias, std::span<const int64_t> tokens_per_expert,
                        double rate) {
  const std::vector<int> signs = bias_update_signs(bias.size(), tokens_per_expert, rate);
  for (size_t e = 0; e < bias.size(); ++e) bias[e] += rate * double(signs[e]);
}

void update_expert_bias(std::span<float> bias, std::span<const int64_t> tokens_per_expert,
                        double rate) {
  const std::vector<int> signs = bias_update_signs(bias.size(), tokens_per_expert, rate);
  const float rate_f = static_cast<float>(rate);
  for (size_t e = 0; e < bias.size(); ++e) bias[e] += rate_f * float(signs[e]);
}

#define MOEKIT_INSTANTIATE(Real)                                                              \
  template RoutingResult<Real> route_logits<Real>(const RoutingConfig&, ConstMatrixView<Real>, \
                                                  const RoutingOptions&);                     \
  template RoutingResult<Real> route_probs<Real>(const RoutingConfig&, ConstMatrixView<Real>,  \
                                                 const RoutingOptions&);                      \
  template RoutingResult<Real> route_hidden<Real>(const RoutingConfig&, ConstMatrixView<Real>, \
                                                  const RouterParams<Real>&,                  \
                                                  const RoutingOptions&);                     \
  template RoutingRecord record_routing<Real>(const BasicRoutingPlan<Real>&);

MOEKIT_INSTANTIATE(float)
MOEKIT_INSTANTIATE(double)
#undef MOEKIT_INSTANTIATE

}  // namespace moekit
