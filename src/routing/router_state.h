// Internal to the routing sources: the `Router<Real>` working class that turns logits (or given
// scores) into a RoutingResult, and the helpers its files share.
//
// One forward runs, in order (see Router::run in route.cpp):
//   prepare_logits   l = input / τ (+ logit noise, + noisy-gating noise)        route.cpp
//   compute_scores   q = softmax(l) or sigmoid(l) (or the given probs)          selection.cpp
//   select_*         token choice top-k / expert choice / dense / Soft MoE      selection.cpp
//   apply_capacity   per-expert capacity C and the drop order                   capacity.cpp
//   finish_weights   w = c · q / Z and the per-expert lists                     weights.cpp
//   compute_losses   balance, importance/load CV², z-loss                       losses.cpp
//   compute_stats    loads, entropies, label statistics                         stats.cpp
// Every member function is explicitly instantiated for float and double in the file that
// defines it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <vector>

#include "moekit/config.h"
#include "moekit/error.h"
#include "moekit/math.h"
#include "moekit/plan.h"
#include "moekit/routing.h"
#include "moekit/tensor.h"

namespace moekit::routing_detail {

// Epsilon DeepSeek-V3 and Megatron add to the sigmoid normaliser: w = s / (Σ s + 1e-20).
inline constexpr double kSigmoidNormEps = 1e-20;

inline bool is_token_choice(const RoutingConfig& c) {
  return c.routing_method == RoutingMethod::kTopK || c.routing_method == RoutingMethod::kSinkhorn;
}

inline bool noise_active(const RoutingConfig& c) { return c.training || c.noise_in_eval; }

// Megatron's Sinkhorn router combines with sigmoid(logits) for k = 1 and the softmax for k > 1.
inline bool uses_sigmoid(const RoutingConfig& c) {
  return c.scoring_func == ScoringFunc::kSigmoid ||
         (c.routing_method == RoutingMethod::kSinkhorn && c.num_experts_per_tok == 1);
}

// The renormalisation that applies: none for methods other than top-k (Sinkhorn combines with
// the raw scores of the chosen experts), and none for a single sigmoid choice unless
// renormalize_sigmoid_top1 (Megatron normalises sigmoid weights only when k > 1).
inline Renormalize applied_renormalize(const RoutingConfig& c) {
  if (c.routing_method != RoutingMethod::kTopK) return Renormalize::kNone;
  if (c.scoring_func == ScoringFunc::kSigmoid && c.num_experts_per_tok == 1 &&
      !c.renormalize_sigmoid_top1) {
    return Renormalize::kNone;
  }
  return c.renormalize;
}

// Columns of the logits: num_experts, or num_experts · slots_per_expert for Soft MoE.
inline int64_t logit_columns(const RoutingConfig& c) {
  return c.routing_method == RoutingMethod::kSoftMoe ? c.num_experts * c.slots_per_expert
                                                     : c.num_experts;
}

// ---------------------------------------------------------------------------------------------
// Input checks at the boundary.

template <typename Real>
void check_finite(ConstMatrixView<Real> m,  // [rows, cols]
                  const char* name) {
  for (int64_t i = 0; i < m.size(); ++i) {
    if (!std::isfinite(static_cast<double>(m.data[i]))) {
      throw_input_error(detail::concat(name, "[", i / m.cols, "][", i % m.cols, "]"), "a finite number", m.data[i]);
    }
  }
}

template <typename Real>
void check_matrix(ConstMatrixView<Real> m,  // [rows ≥ 1, expected_cols]
                  const char* name, int64_t expected_cols, const char* cols_name) {
  if (m.data == nullptr || m.rows <= 0) throw_input_error(name, "at least one row", "0 rows");
  if (m.cols != expected_cols) {
    throw_input_error(detail::concat(name, " columns"),
                      detail::concat(expected_cols, " (", cols_name, ")"), m.cols);
  }
  check_finite(m, name);
}

// Logits computed from finite inputs can still overflow: the router projection, the temperature
// and added noise. Routing them would give NaN weights and losses, so they are rejected with the
// (token, expert) position, e.g. "logits[3][1]: expected a finite number, got inf".
template <typename Real>
void check_finite_logits(const Matrix<Real>& logits) {  // [num_tokens, cols]
  for (int64_t t = 0; t < logits.rows; ++t) {
    for (int64_t e = 0; e < logits.cols; ++e) {
      if (!std::isfinite(static_cast<double>(logits(t, e)))) {
        throw_input_error(detail::concat("logits[", t, "][", e, "]"), "a finite number",
                          logits(t, e));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Row-wise score functions.

// out = softmax(in) = exp(in − max) / Σ exp(in − max), in Real.
template <typename Real>
void softmax_row(const Real* in,  // [n]
                 Real* out,       // [n]
                 int64_t n) {
  Real max_value = in[0];
  for (int64_t i = 1; i < n; ++i) max_value = std::max(max_value, in[i]);
  Real sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = std::exp(in[i] - max_value);
    sum += out[i];
  }
  for (int64_t i = 0; i < n; ++i) out[i] /= sum;
}

// log Σ exp(in), in double: max + log Σ exp(in − max).
template <typename Real>
double logsumexp_row(const Real* in,  // [n]
                     int64_t n) {
  double max_value = in[0];
  for (int64_t i = 1; i < n; ++i) max_value = std::max(max_value, double(in[i]));
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(double(in[i]) - max_value);
  return max_value + std::log(sum);
}

using detail::sigmoid;  // σ(x) = 1 / (1 + e^(−x)), moekit/math.h

// Indices of the k largest keys, best first; ties go to the lower index (selection.cpp).
void top_k_indices(const double* keys,  // [n]
                   int64_t n, int64_t k,
                   std::vector<int32_t>& out);  // [min(k, n)]

// ---------------------------------------------------------------------------------------------
// Loss helpers shared by the forward (losses.cpp) and the backward (backward.cpp).

// Probabilities P of token t used by the balance losses (softmax of the clean logits, sigmoid
// normalised per token, or the given scores).
template <typename Real>
void balance_probs(const RoutingConfig& c, const RoutingSaved<Real>& s, int64_t t,
                   std::vector<double>& out);  // [num_experts]

// Standard normal Φ and φ.
inline double normal_cdf(double x) { return 0.5 * std::erfc(-x / std::numbers::sqrt2); }
inline double normal_pdf(double x) { return std::exp(-0.5 * x * x) / std::sqrt(2.0 * std::numbers::pi); }

// CV² = var / mean² (population variance); 0 when the mean is not positive.
double cv_squared(const std::vector<double>& v);  // [n]
// d CV²(v) / d v.
std::vector<double> cv_squared_grad(const std::vector<double>& v);  // [n]

// V-MoE smooth load estimate per expert (see losses.cpp); threshold_expert[t] receives the
// expert whose noisy logit is token t's threshold.
template <typename Real>
std::vector<double> smooth_load(const RoutingConfig& c, const RoutingSaved<Real>& s,
                                std::vector<int32_t>& threshold_expert);  // [num_tokens]

// The load CV² needs logit noise on token-choice routing from logits.
bool smooth_load_active(const RoutingConfig& c, bool scores_given);

// Divisor that makes the load-balancing loss 1 at balance (aux_loss_scale one, all choices): k.
inline double aux_k_divisor(const RoutingConfig& c) {
  return c.aux_loss_scale == AuxLossScale::kOne && c.aux_loss_counts == AuxLossCounts::kAllChoices
             ? double(c.num_experts_per_tok)
             : 1.0;
}

// ---------------------------------------------------------------------------------------------
// The forward.

template <typename Real>
class Router {
 public:
  Router(const RoutingConfig& config, const RoutingOptions& options, int64_t num_tokens)
      : c_(config), opt_(options), num_tokens_(num_tokens), num_experts_(config.num_experts) {}

  // input: logits [num_tokens, cols] or, when scores_given, probs [num_tokens, num_experts].
  RoutingResult<Real> run(ConstMatrixView<Real> input, bool scores_given,
                          const Matrix<Real>* noise_logits);  // [num_tokens, num_experts]

 private:
  bool real(int64_t t) const { return r_.saved.token_mask[t] != 0; }
  int64_t seq_len() const { return r_.saved.sequence_length; }
  int64_t num_groups() const { return num_tokens_ / seq_len(); }

  // route.cpp
  void prepare_logits(ConstMatrixView<Real> input, bool scores_given,
                      const Matrix<Real>* noise_logits);
  void add_logit_noise();
  void add_noisy_gating(const Matrix<Real>& noise_logits);  // [num_tokens, num_experts]

  // selection.cpp
  void compute_scores();
  void compute_top1_scores();
  void select_token_choice();
  void select_sinkhorn(std::vector<std::vector<int32_t>>& chosen) const;  // [num_tokens][k]
  // Token t's top-k into `chosen`; keys, group_keys and picked are scratch.
  void select_top_k(int64_t t,
                    std::vector<double>& keys,        // [num_experts]
                    std::vector<double>& group_keys,  // [n_group]
                    std::vector<int32_t>& picked,     // [≤ num_experts]
                    std::vector<int32_t>& chosen) const;  // [k]
  // Masks the keys of the experts outside the topk_group best groups.
  void limit_groups(std::vector<double>& keys,        // [num_experts]
                    std::vector<double>& group_keys,  // [n_group]
                    std::vector<int32_t>& picked) const;  // scratch
  void replay_choices(std::vector<std::vector<int32_t>>& chosen) const;  // [num_tokens][*]
  void set_token_lists(const std::vector<std::vector<int32_t>>& chosen);  // [num_tokens][*]
  void select_expert_choice();
  void select_dense();
  void apply_random_routing();

  // capacity.cpp
  void apply_capacity();
  // Marks in `keep` the selections of tokens [first, last) that fit, offered in `tokens` order.
  void drop_by_position(int64_t first, int64_t last,
                        const std::vector<int64_t>& tokens,  // [last − first] priority order
                        int64_t capacity,
                        std::vector<uint8_t>& keep) const;  // [num_selections]
  // Marks in `keep` the C best selections per expert by the drop key.
  void drop_by_key(const std::vector<int64_t>& tokens,  // [group tokens] priority order
                   int64_t capacity,
                   std::vector<uint8_t>& keep) const;  // [num_selections]

  // weights.cpp
  void finish_weights();
  void build_expert_lists();
  void soft_moe();
  void soft_moe_dispatch_combine();

  // losses.cpp
  void compute_losses();
  void compute_z_loss(int64_t n_real);
  void compute_load_balancing(const std::vector<double>& balance_p);  // [num_tokens · E]

  // stats.cpp
  void compute_stats();
  void compute_label_stats();

  // Combine weight of selection i (of token t) as if nothing were dropped (weights.cpp).
  double pre_drop_weight(int64_t t, int64_t i) const;

  // Selection key of token t for top-k and group choice (selection.cpp).
  void selection_keys(int64_t t, std::vector<double>& keys) const;  // [num_experts]

  const RoutingConfig& c_;
  const RoutingOptions& opt_;
  int64_t num_tokens_;
  int64_t num_experts_;
  RoutingResult<Real> r_;
  // Largest score per token: the batch prioritised routing key.
  std::vector<double> top1_score_;  // [num_tokens]
};

}  // namespace moekit::routing_detail
