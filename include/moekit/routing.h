// Routing ops: router projection, every routing method, losses, backward, record/replay.
//
// All ops are templated on the real type (float for use, double for gradient checks) and are
// pure functions over views with explicit shapes. The forward returns everything the backward
// needs (RoutingResult::saved), so no hidden state lives anywhere.
//
// Combine weight model. For every method except Soft MoE, the combine weight of a kept
// selection (t, e) is
//     w_te = c · q_te / Z_t
// where q = score (softmax over all experts of the logits, or sigmoid), c the routed scaling
// factor, and Z_t = 1 (no renormalisation), Σ_{selected} q (renormalised before drops; equal to
// a softmax over the selected logits) or Σ_{kept} q (after drops), plus 1e-20 for sigmoid scores
// (DeepSeek-V3, Megatron; Megatron's sigmoid top-1 keeps Z_t = 1). Selection (top-k, groups, bias, Gumbel, capacity) is piecewise
// constant, so the gradient flows through q and Z only:
//     dq_te = c·dw_te/Z_t − [e ∈ norm set] · Σ_j c·dw_tj·q_tj/Z_t²
// then through the softmax (dl = q ⊙ (dq − ⟨q, dq⟩)) or the sigmoid (dl = q(1 − q) dq).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "moekit/config.h"
#include "moekit/plan.h"
#include "moekit/stats.h"
#include "moekit/tensor.h"

namespace moekit {

// Loss values, raw (before coefficients) except `total`.
struct RoutingLosses {
  double aux_loss = 0.0;        // the loss chosen by aux_loss_type
  double z_loss = 0.0;          // mean over real tokens of logsumexp(logits)²
  double load_balancing = 0.0;  // E·Σ f·P variant selected by the config (always computed)
  double importance_cv2 = 0.0;  // CV² of Σ_t p_te (population std)
  double load_cv2 = 0.0;        // CV² of the smooth load estimate (needs logit noise), else 0
  double total = 0.0;           // router_aux_loss_coef·aux_loss + router_z_loss_coef·z_loss
};

// The expert choices of an earlier forward, to be replayed by a later one.
struct RoutingRecord {
  int64_t num_tokens = 0;
  int64_t num_experts = 0;
  std::vector<int64_t> token_offsets;  // [num_tokens + 1]
  std::vector<int32_t> token_experts;  // [num_selections], choice order
};

struct RoutingOptions {
  std::span<const uint8_t> token_mask;  // [num_tokens] 1 = real token, 0 = padding; empty: all real
  int64_t sequence_length = 0;          // tokens form consecutive sequences; 0: one sequence
  std::span<const int32_t> labels;      // [num_tokens] caller's label per token (stats only)
  const RoutingRecord* replay = nullptr;  // use these choices instead of selecting
  // Counts per expert accumulated over earlier micro-batches, for aux_loss_scope = global
  // (Megatron global_aux); empty: this call only.
  std::span<const double> global_counts;  // [num_experts]
  int64_t global_tokens = 0;              // tokens behind global_counts
  // Gaussian logit noise to add instead of seeded draws (already scaled; used where noise_std
  // noise would be drawn, e.g. to reproduce a peer's noise exactly).
  std::span<const double> logit_noise;  // [num_tokens · num_experts]
  // Per-expert selection bias as a parameter tensor the caller owns (DeepSeek-V3
  // e_score_correction_bias, Megatron expert_bias): when non-empty it is used instead of
  // RoutingConfig::e_score_correction_bias. Added to the selection keys only, never to the
  // combine weights.
  std::span<const float> selection_bias;  // [num_experts] or empty
  int num_threads = 1;                    // results are bitwise identical for any value
};

// What the backward needs, produced by the forward.
template <typename Real>
struct RoutingSaved {
  Matrix<Real> logits;      // [num_tokens, num_experts · slots] after temperature and noise
  Matrix<Real> clean_logits;  // [num_tokens, num_experts] before logit noise (losses use these)
  Matrix<Real> scores;      // [num_tokens, num_experts] q: softmax/sigmoid of logits, or probs
  std::vector<Real> norm;   // [num_selections] Z_t of the selection's token
  std::vector<uint8_t> in_norm;  // [num_selections] 1 when the selection is part of Z_t's sum
  Matrix<Real> noise_logits;     // [num_tokens, num_experts] noisy gating x·W_noiseᵀ, or empty
  Matrix<Real> noise_draws;      // [num_tokens, num_experts] N(0,1) draws of noisy gating
  Matrix<Real> jitter;           // [num_tokens, d_model] input jitter factors, or empty
  std::vector<uint8_t> token_mask;  // [num_tokens]
  int64_t sequence_length = 0;
  bool scores_given = false;  // route_probs: q are inputs, the score function is skipped
  std::vector<double> aux_counts;   // [num_experts] or [num_seq·num_experts] f numerators
  std::vector<double> aux_token_counts;  // tokens per aux group
};

template <typename Real>
struct RoutingResult {
  BasicRoutingPlan<Real> plan;
  RoutingLosses losses;
  RoutingStats stats;
  RoutingSaved<Real> saved;
};

// Router parameters, as views of memory the caller owns.
template <typename Real>
struct RouterParams {
  ConstMatrixView<Real> weight;        // [num_experts, d_model] (Hugging Face layout)
  std::span<const Real> bias;          // [num_experts] or empty
  ConstMatrixView<Real> noise_weight;  // [num_experts, d_model] noisy gating only, else empty
};

template <typename Real>
struct RouterGrads {
  Matrix<Real> d_hidden_states;   // [num_tokens, d_model]
  Matrix<Real> d_weight;          // [num_experts, d_model]
  std::vector<Real> d_bias;       // [num_experts] (empty when no bias)
  Matrix<Real> d_noise_weight;    // [num_experts, d_model] (empty unless noisy gating)
};

// Gradients flowing into the routing result.
template <typename Real>
struct RoutingGradOutput {
  std::vector<Real> d_token_weights;  // [num_selections] dL/d plan.token_weights (dropped: ignored)
  std::vector<Real> d_dispatch;       // [num_tokens, num_slots] Soft MoE only
  std::vector<Real> d_combine;        // [num_tokens, num_slots] Soft MoE only
  double d_aux_loss = 0.0;  // dL/d aux_loss (usually router_aux_loss_coef)
  double d_z_loss = 0.0;    // dL/d z_loss (usually router_z_loss_coef)
};

// logits = (hidden_states · weightᵀ + bias) / temperature, accumulated in Real (fp32 or fp64).
template <typename Real>
Matrix<Real> router_logits(const RoutingConfig& config,
                           ConstMatrixView<Real> hidden_states,  // [num_tokens, d_model]
                           const RouterParams<Real>& params, int num_threads = 1);

// Routes from logits [num_tokens, num_experts] (Soft MoE: [num_tokens, num_experts·slots]).
template <typename Real>
RoutingResult<Real> route_logits(const RoutingConfig& config,
                                 ConstMatrixView<Real> logits,  // [num_tokens, num_experts]
                                 const RoutingOptions& options = {});

// Routes from scores used as given (no score function): q = probs. Not for Soft MoE.
template <typename Real>
RoutingResult<Real> route_probs(const RoutingConfig& config,
                                ConstMatrixView<Real> probs,  // [num_tokens, num_experts]
                                const RoutingOptions& options = {});

// Router projection (with input jitter and noisy gating when configured) followed by routing.
template <typename Real>
RoutingResult<Real> route_hidden(const RoutingConfig& config,
                                 ConstMatrixView<Real> hidden_states,  // [num_tokens, d_model]
                                 const RouterParams<Real>& params,
                                 const RoutingOptions& options = {});

// d_logits [num_tokens, num_experts(·slots)] of L, given dL/d(combine weights, losses).
// For route_probs results this is dL/d probs.
// With noisy gating, `d_noisy_logits` (when given) receives the part of d_logits that flowed
// through the noisy logits H = logits + noise (the losses use the clean logits); pass it on to
// router_backward.
template <typename Real>
Matrix<Real> route_backward(const RoutingConfig& config, const RoutingResult<Real>& result,
                            const RoutingGradOutput<Real>& grad,
                            Matrix<Real>* d_noisy_logits = nullptr);

// Gradients of the router projection from d_logits (as returned by route_backward).
template <typename Real>
RouterGrads<Real> router_backward(const RoutingConfig& config, const RoutingResult<Real>& result,
                                  ConstMatrixView<Real> hidden_states,  // [num_tokens, d_model]
                                  const RouterParams<Real>& params,
                                  ConstMatrixView<Real> d_logits,  // [num_tokens, num_experts]
                                  int num_threads = 1,
                                  // [num_tokens, num_experts], noisy gating only
                                  ConstMatrixView<Real> d_noisy_logits = {});

// The capacity the config gives for `num_tokens` real tokens (per sequence or batch), or -1
// when the config is dropless (the plan then reports the largest load).
int64_t compute_capacity(const RoutingConfig& config, int64_t num_tokens);

template <typename Real>
RoutingRecord record_routing(const BasicRoutingPlan<Real>& plan);

// Aux-loss-free balancing (DeepSeek-V3, Megatron expert bias):
//   bias_e += rate · sign(mean_e' load_e' − load_e).
void update_expert_bias(std::span<double> bias,                     // [num_experts]
                        std::span<const int64_t> tokens_per_expert,  // [num_experts]
                        double rate);

// The same update of a float parameter tensor (RoutingOptions::selection_bias), in float
// arithmetic as Megatron updates its fp32 expert_bias: bias_e += float(rate) · sign(…).
void update_expert_bias(std::span<float> bias,                      // [num_experts]
                        std::span<const int64_t> tokens_per_expert,  // [num_experts]
                        double rate);

}  // namespace moekit
