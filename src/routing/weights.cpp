// Combine weights: the weight each kept (token, expert) assignment multiplies its expert's
// output by, and the per-expert token lists.
//
// Token choice, expert choice and dense (see include/moekit/routing.h):
//   w_te = c · q_te / Z_t,
// c = routed_scaling_factor, Z_t = 1 (renormalize none), Σ_{selected} q (before_drop) or
// Σ_{kept} q (after_drop), plus 1e-20 for sigmoid scores (DeepSeek-V3, Megatron). Softmax after
// top-k (Megatron pre_softmax false, gpt-oss) computes the before-drop weight as a softmax over
// the selected logits, which equals q_e / Σ_selected q but rounds as those peers round it.
// Sinkhorn combines with the raw scores of the chosen experts (Megatron). Megatron's sigmoid
// top-1 weight is the raw sigmoid (renormalize_sigmoid_top1 false in its preset).
//
// Soft MoE (Puigcerver et al.), logits [T, E·S] per sequence:
//   dispatch[:, j] = softmax over the sequence's real tokens of logits[:, j] (each slot is a
//                    convex mix of tokens);
//   combine[t, :]  = softmax over all slots of logits[t, :];
// a token's weight for expert e is the sum of its combine weights over e's slots.
#include <algorithm>
#include <cmath>
#include <limits>

#include "router_state.h"

namespace moekit::routing_detail {

template <typename Real>
double Router<Real>::pre_drop_weight(int64_t t, int64_t i) const {
  const BasicRoutingPlan<Real>& p = r_.plan;
  const RoutingSaved<Real>& s = r_.saved;
  double z = 1;
  // Before drops the weight is normalised only by renormalize before_drop (or the softmax
  // over the selected logits); after_drop normalises the survivors, which are not known yet.
  // Sinkhorn combines with raw scores (see finish_weights).
  const bool normalised =
      c_.routing_method == RoutingMethod::kTopK &&
      (applied_renormalize(c_) == Renormalize::kBeforeDrop ||
       (c_.softmax_order == SoftmaxOrder::kAfterTopK && c_.scoring_func == ScoringFunc::kSoftmax &&
        !s.scores_given));
  if (normalised) {
    z = uses_sigmoid(c_) && !s.scores_given ? kSigmoidNormEps : 0.0;
    for (int64_t j = p.token_offsets[t]; j < p.token_offsets[t + 1]; ++j)
      z += double(s.scores(t, p.token_experts[j]));
  }
  return c_.routed_scaling_factor * double(s.scores(t, p.token_experts[i])) / z;
}

template <typename Real>
void Router<Real>::finish_weights() {
  // w = c · q / Z, see routing.h.
  BasicRoutingPlan<Real>& p = r_.plan;
  RoutingSaved<Real>& s = r_.saved;
  const int64_t n = p.num_selections();
  p.token_weights.assign(static_cast<size_t>(n), Real(0));
  s.norm.assign(static_cast<size_t>(n), Real(1));
  s.in_norm.assign(static_cast<size_t>(n), 0);
  const bool token_choice = is_token_choice(c_);
  const bool after_topk = token_choice && !s.scores_given &&
                          c_.scoring_func == ScoringFunc::kSoftmax &&
                          c_.softmax_order == SoftmaxOrder::kAfterTopK &&
                          c_.routing_method == RoutingMethod::kTopK;
  // Sinkhorn combines with the raw scores of the chosen experts (Megatron); see
  // applied_renormalize for the sigmoid top-1 rule.
  const Renormalize renorm = applied_renormalize(c_);
  const Real eps = uses_sigmoid(c_) && !s.scores_given
                       ? Real(kSigmoidNormEps)
                       : Real(0);
  const Real scale = Real(c_.routed_scaling_factor);
  for (int64_t t = 0; t < num_tokens_; ++t) {
    const int64_t begin = p.token_offsets[t], end = p.token_offsets[t + 1];
    if (begin == end) continue;
    Real z = 1;
    if (renorm != Renormalize::kNone) {
      Real sum = 0;
      for (int64_t i = begin; i < end; ++i) {
        const bool counts = renorm == Renormalize::kBeforeDrop || p.token_kept[i];
        if (counts) {
          sum += s.scores(t, p.token_experts[i]);
          s.in_norm[i] = 1;
        }
      }
      z = sum + eps;
    }
    for (int64_t i = begin; i < end; ++i) {
      s.norm[i] = z;
      if (!p.token_kept[i]) continue;
      const int32_t e = p.token_experts[i];
      if (after_topk && renorm == Renormalize::kBeforeDrop) {
        // Softmax over the selected logits (Megatron pre_softmax = False, gpt-oss): the same
        // value as q_e / Σ_selected q, rounded as the peers round it.
        Real max_logit = -std::numeric_limits<Real>::infinity();
        for (int64_t j = begin; j < end; ++j)
          max_logit = std::max(max_logit, s.logits(t, p.token_experts[j]));
        Real sum = 0;
        for (int64_t j = begin; j < end; ++j) sum += std::exp(s.logits(t, p.token_experts[j]) - max_logit);
        p.token_weights[i] = scale * (std::exp(s.logits(t, e) - max_logit) / sum);
      } else if (z > 0) {
        p.token_weights[i] = scale * (s.scores(t, e) / z);
      }
    }
  }
}

template <typename Real>
void Router<Real>::build_expert_lists() {
  BasicRoutingPlan<Real>& p = r_.plan;
  // Counting sort by expert; tokens stay ascending inside each expert.
  p.expert_offsets.assign(static_cast<size_t>(num_experts_ + 1), 0);
  for (int64_t i = 0; i < p.num_selections(); ++i)
    if (p.token_kept[i]) ++p.expert_offsets[p.token_experts[i] + 1];
  for (int64_t e = 0; e < num_experts_; ++e) p.expert_offsets[e + 1] += p.expert_offsets[e];
  const int64_t kept = p.expert_offsets[num_experts_];
  p.expert_tokens.assign(static_cast<size_t>(kept), 0);
  p.expert_weights.assign(static_cast<size_t>(kept), Real(0));
  p.expert_selection.assign(static_cast<size_t>(kept), 0);
  std::vector<int64_t> cursor(p.expert_offsets.begin(), p.expert_offsets.end() - 1);
  for (int64_t t = 0; t < num_tokens_; ++t) {
    for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i) {
      if (!p.token_kept[i]) continue;
      const int64_t slot = cursor[p.token_experts[i]]++;
      p.expert_tokens[slot] = static_cast<int32_t>(t);
      p.expert_weights[slot] = p.token_weights[i];
      p.expert_selection[slot] = i;
    }
  }
}

template <typename Real>
void Router<Real>::soft_moe_dispatch_combine() {
  // combine[t, :] = softmax over all slots; dispatch[:, j] = softmax over the real tokens of a
  // sequence.
  RoutingSaved<Real>& s = r_.saved;
  BasicRoutingPlan<Real>& p = r_.plan;
  const int64_t slots = num_experts_ * c_.slots_per_expert;
  p.num_slots = slots;
  p.dispatch.assign(static_cast<size_t>(num_tokens_ * slots), Real(0));  // [num_tokens, slots]
  p.combine.assign(static_cast<size_t>(num_tokens_ * slots), Real(0));   // [num_tokens, slots]
  for (int64_t t = 0; t < num_tokens_; ++t)
    if (real(t)) softmax_row(s.logits.row(t), p.combine.data() + t * slots, slots);
  for (int64_t g = 0; g < num_groups(); ++g) {
    const int64_t first = g * seq_len();
    for (int64_t j = 0; j < slots; ++j) {
      Real max_value = -std::numeric_limits<Real>::infinity();
      for (int64_t t = first; t < first + seq_len(); ++t)
        if (real(t)) max_value = std::max(max_value, s.logits(t, j));
      Real sum = 0;
      for (int64_t t = first; t < first + seq_len(); ++t) {
        if (!real(t)) continue;
        const Real v = std::exp(s.logits(t, j) - max_value);
        p.dispatch[t * slots + j] = v;
        sum += v;
      }
      if (sum > 0)
        for (int64_t t = first; t < first + seq_len(); ++t) p.dispatch[t * slots + j] /= sum;
    }
  }
}

template <typename Real>
void Router<Real>::soft_moe() {
  RoutingSaved<Real>& s = r_.saved;
  BasicRoutingPlan<Real>& p = r_.plan;
  soft_moe_dispatch_combine();
  const int64_t slots = p.num_slots;
  // Per token: every expert, weight = its slots' combine weights summed.
  s.scores = Matrix<Real>(num_tokens_, num_experts_);
  for (int64_t t = 0; t < num_tokens_; ++t)
    for (int64_t e = 0; e < num_experts_; ++e)
      for (int64_t k = 0; k < c_.slots_per_expert; ++k)
        s.scores(t, e) += p.combine[t * slots + e * c_.slots_per_expert + k];
  select_dense();
  p.token_weights.assign(p.token_experts.size(), Real(0));
  for (int64_t t = 0; t < num_tokens_; ++t)
    for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i)
      p.token_weights[i] = s.scores(t, p.token_experts[i]);
  s.norm.assign(p.token_experts.size(), Real(1));
  s.in_norm.assign(p.token_experts.size(), 0);
  p.expert_offsets.assign(static_cast<size_t>(num_experts_ + 1), 0);
  // Each expert processes slots_per_expert slots per sequence.
  p.capacity = -1;
}

#define MOEKIT_INSTANTIATE(Real)                                       \
  template double Router<Real>::pre_drop_weight(int64_t, int64_t) const; \
  template void Router<Real>::finish_weights();                        \
  template void Router<Real>::build_expert_lists();                    \
  template void Router<Real>::soft_moe_dispatch_combine();             \
  template void Router<Real>::soft_moe();

MOEKIT_INSTANTIATE(float)
MOEKIT_INSTANTIATE(double)
#undef MOEKIT_INSTANTIATE

}  // namespace moekit::routing_detail
