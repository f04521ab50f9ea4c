// Selection: which experts each token uses, before any capacity drop.
//
// Scores q per token: softmax over the experts of the logits, sigmoid(l) (DeepSeek-V3,
// Megatron sigmoid), or the given probabilities (route_probs).
//
// Token choice (top-k, Switch is k = 1): the k largest selection keys per token, ties to the
// lower expert. The key is q, or the logit l for softmax after top-k (Megatron, gpt-oss), plus
// the per-expert selection bias b (RoutingOptions::selection_bias, else the config's
// e_score_correction_bias: DeepSeek-V3, Megatron expert_bias) when given; the bias
// changes the choice only, never the combine weight. Group-limited selection (DeepSeek) scores
// each of n_group groups, keeps the topk_group best and masks the other groups' experts before
// the top-k. Gumbel noise gives argmax(l + G), a sample from softmax(l) (DeepSpeed 'RSample'),
// for every choice or for the second only (DeepSpeed top2).
//
// Sinkhorn (Megatron, training): top-k of the balanced matrix diag(d0) · exp(l) · diag(d1),
// with d0, d1 alternately rescaled so rows sum to 1/T and columns to 1/E.
//
// Expert choice (Zhou et al.; flaxformer, V-MoE): each expert takes its top-C real tokens of
// each sequence by q, ties to the lower token.
//
// Dense: every real token uses every expert. Random routing (GShard): the second of two choices
// is dispatched only when 2·g2/(g1 + g2) > U(0, 1).
#include <algorithm>
#include <cmath>
#include <limits>

#include "internal/parallel.h"
#include "internal/random.h"
#include "router_state.h"

namespace moekit::routing_detail {

using detail::RandomStream;

// One pass keeping the best k sorted (insertion; no allocation once `out` has grown): a key
// enters only if strictly greater than the k-th kept, and goes after every kept key it does
// not exceed, so equal keys keep index order.
void top_k_indices(const double* keys, int64_t n, int64_t k, std::vector<int32_t>& out) {
  out.clear();
  k = std::min(k, n);
  if (k <= 0) return;
  out.reserve(static_cast<size_t>(k));
  for (int64_t i = 0; i < n; ++i) {
    const double v = keys[i];
    const int64_t size = static_cast<int64_t>(out.size());
    if (size == k && !(v > keys[out[size - 1]])) continue;
    int64_t pos = size == k ? k - 1 : size;  // the slot freed (the last) or appended
    if (size < k) out.push_back(0);
    while (pos > 0 && v > keys[out[pos - 1]]) {
      out[pos] = out[pos - 1];
      --pos;
    }
    out[pos] = static_cast<int32_t>(i);
  }
}

template <typename Real>
void Router<Real>::compute_scores() {
  RoutingSaved<Real>& s = r_.saved;
  s.scores = Matrix<Real>(num_tokens_, num_experts_);
  if (s.scores_given) {
    s.scores = s.logits;
    return;
  }
  detail::parallel_for(num_tokens_, opt_.num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (uses_sigmoid(c_)) {
        for (int64_t e = 0; e < num_experts_; ++e) s.scores(t, e) = sigmoid(s.logits(t, e));
      } else {
        softmax_row(s.logits.row(t), s.scores.row(t), num_experts_);
      }
    }
  });
}

template <typename Real>
void Router<Real>::compute_top1_scores() {
  top1_score_.assign(static_cast<size_t>(num_tokens_), 0.0);
  for (int64_t t = 0; t < num_tokens_; ++t) {
    double top = -std::numeric_limits<double>::infinity();
    for (int64_t e = 0; e < num_experts_; ++e) top = std::max(top, double(r_.saved.scores(t, e)));
    top1_score_[t] = top;
  }
}

template <typename Real>
void Router<Real>::selection_keys(int64_t t, std::vector<double>& keys) const {
  const RoutingSaved<Real>& s = r_.saved;
  keys.resize(static_cast<size_t>(num_experts_));
  // Softmax after top-k selects on the logits (Megatron, gpt-oss); otherwise on the scores.
  const bool on_logits = !s.scores_given && c_.scoring_func == ScoringFunc::kSoftmax &&
                         c_.softmax_order == SoftmaxOrder::kAfterTopK;
  // The selection bias: the caller's tensor when given, else the config's value.
  const bool tensor_bias = !opt_.selection_bias.empty();
  const bool config_bias = !c_.e_score_correction_bias.empty();
  for (int64_t e = 0; e < num_experts_; ++e) {
    keys[e] = on_logits ? double(s.logits(t, e)) : double(s.scores(t, e));
    if (tensor_bias) {
      keys[e] += double(opt_.selection_bias[e]);
    } else if (config_bias) {
      keys[e] += c_.e_score_correction_bias[e];
    }
  }
  if (c_.gumbel_noise == GumbelNoise::kAll && noise_active(c_) && !s.scores_given) {
    // DeepSpeed 'RSample': argmax(logits + Gumbel), a sample from softmax(logits).
    for (int64_t e = 0; e < num_experts_; ++e) {
      keys[e] = double(s.logits(t, e)) +
                detail::random_gumbel(c_.seed, RandomStream::kGumbel, uint64_t(t), uint64_t(e));
    }
  }
}

template <typename Real>
void Router<Real>::replay_choices(std::vector<std::vector<int32_t>>& chosen) const {
  const RoutingRecord& rec = *opt_.replay;
  for (int64_t t = 0; t < num_tokens_; ++t) {
    if (!real(t)) continue;
    chosen[t].assign(rec.token_experts.begin() + rec.token_offsets[t],
                     rec.token_experts.begin() + rec.token_offsets[t + 1]);
  }
}

template <typename Real>
void Router<Real>::select_sinkhorn(std::vector<std::vector<int32_t>>& chosen) const {
  // Sinkhorn balancing is a training-time device; evaluation takes the plain top-k of the
  // scores (Megatron sinkhorn_load_balancing).
  // Megatron sinkhorn: cost = exp(logits); alternate row/column scaling until the mean
  // change of the column scales is below tolerance; top-k of the balanced matrix. The cost is
  // shifted by the global max logit first, which leaves the balanced matrix unchanged.
  const RoutingSaved<Real>& s = r_.saved;
  std::vector<int64_t> rows;
  for (int64_t t = 0; t < num_tokens_; ++t)
    if (real(t)) rows.push_back(t);
  const int64_t n = static_cast<int64_t>(rows.size());
  double max_logit = -std::numeric_limits<double>::infinity();
  for (int64_t t : rows)
    for (int64_t e = 0; e < num_experts_; ++e) max_logit = std::max(max_logit, double(s.logits(t, e)));
  std::vector<double> cost(static_cast<size_t>(n * num_experts_));  // [n, num_experts]
  for (int64_t i = 0; i < n; ++i)
    for (int64_t e = 0; e < num_experts_; ++e)
      cost[i * num_experts_ + e] = std::exp(double(s.logits(rows[i], e)) - max_logit);
  std::vector<double> d0(static_cast<size_t>(n), 1.0), d1(static_cast<size_t>(num_experts_), 1.0);
  constexpr double kEps = 1e-8;
  for (int64_t it = 0; it < c_.sinkhorn_max_iterations && n > 0; ++it) {
    // d0_i = (1/n) / (Σ_e d1_e · cost_ie + ε);  d1_e = (1/E) / (Σ_i d0_i · cost_ie + ε).
    for (int64_t i = 0; i < n; ++i) {
      double sum = 0;
      for (int64_t e = 0; e < num_experts_; ++e) sum += d1[e] * cost[i * num_experts_ + e];
      d0[i] = (1.0 / double(n)) / (sum + kEps);
    }
    double error = 0;
    for (int64_t e = 0; e < num_experts_; ++e) {
      double sum = 0;
      for (int64_t i = 0; i < n; ++i) sum += d0[i] * cost[i * num_experts_ + e];
      const double next = (1.0 / double(num_experts_)) / (sum + kEps);
      error += std::abs(next - d1[e]);
      d1[e] = next;
    }
    if (error / double(num_experts_) <= c_.sinkhorn_tolerance) break;
  }
  std::vector<double> keys(static_cast<size_t>(num_experts_));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t e = 0; e < num_experts_; ++e) keys[e] = d1[e] * cost[i * num_experts_ + e] * d0[i];
    top_k_indices(keys.data(), num_experts_, c_.num_experts_per_tok, chosen[rows[i]]);
  }
}

template <typename Real>
void Router<Real>::limit_groups(std::vector<double>& keys, std::vector<double>& group_keys,
                                std::vector<int32_t>& picked) const {
  // Group-limited selection: score each group, keep the topk_group best groups, mask the
  // experts of the others. Group score: sum of the top-2 keys (DeepSeek-V3), sum of the
  // top-⌊k / topk_group⌋ keys (Megatron, floor division for any k), or the largest key
  // (DeepSeek-V2).
  const int64_t k = c_.num_experts_per_tok;
  const int64_t group_size = num_experts_ / c_.n_group;
  group_keys.assign(static_cast<size_t>(c_.n_group), 0.0);
  const int64_t per_group =
      c_.group_score == GroupScore::kSumTop2 ? 2
                                             : (c_.group_score == GroupScore::kMax ? 1 : k / c_.topk_group);
  for (int64_t g = 0; g < c_.n_group; ++g) {
    top_k_indices(keys.data() + g * group_size, group_size, std::min(per_group, group_size),
                  picked);
    double sum = 0;
    for (int32_t i : picked) sum += keys[g * group_size + i];
    group_keys[g] = sum;
  }
  top_k_indices(group_keys.data(), c_.n_group, c_.topk_group, picked);
  std::vector<uint8_t> keep_group(static_cast<size_t>(c_.n_group), 0);
  for (int32_t g : picked) keep_group[g] = 1;
  const double fill = c_.masked_group_fill == MaskedGroupFill::kZero
                          ? 0.0
                          : -std::numeric_limits<double>::infinity();
  for (int64_t e = 0; e < num_experts_; ++e)
    if (!keep_group[e / group_size]) keys[e] = fill;
}

template <typename Real>
void Router<Real>::select_top_k(int64_t t, std::vector<double>& keys,
                                std::vector<double>& group_keys, std::vector<int32_t>& picked,
                                std::vector<int32_t>& chosen) const {
  const int64_t k = c_.num_experts_per_tok;
  selection_keys(t, keys);
  if (c_.n_group > 0) limit_groups(keys, group_keys, picked);
  if (c_.gumbel_noise == GumbelNoise::kSecond && noise_active(c_) && !r_.saved.scores_given) {
    // DeepSpeed top2: the first expert is the argmax; the second is the argmax of
    // logits + Gumbel with the first masked out.
    top_k_indices(keys.data(), num_experts_, 1, chosen);
    for (int64_t e = 0; e < num_experts_; ++e) {
      keys[e] = e == chosen[0] ? -std::numeric_limits<double>::infinity()
                               : double(r_.saved.logits(t, e)) +
                                     detail::random_gumbel(c_.seed, RandomStream::kGumbel,
                                                           uint64_t(t), uint64_t(e));
    }
    top_k_indices(keys.data(), num_experts_, k - 1, picked);
    chosen.insert(chosen.end(), picked.begin(), picked.end());
  } else {
    top_k_indices(keys.data(), num_experts_, k, chosen);
  }
}

template <typename Real>
void Router<Real>::set_token_lists(const std::vector<std::vector<int32_t>>& chosen) {
  BasicRoutingPlan<Real>& p = r_.plan;
  p.token_offsets.assign(static_cast<size_t>(num_tokens_ + 1), 0);
  for (int64_t t = 0; t < num_tokens_; ++t) {
    p.token_offsets[t + 1] = p.token_offsets[t] + static_cast<int64_t>(chosen[t].size());
    p.token_experts.insert(p.token_experts.end(), chosen[t].begin(), chosen[t].end());
  }
  p.token_kept.assign(p.token_experts.size(), 1);
}

template <typename Real>
void Router<Real>::select_token_choice() {
  std::vector<std::vector<int32_t>> chosen(static_cast<size_t>(num_tokens_));  // [num_tokens][k]
  if (opt_.replay != nullptr) {
    replay_choices(chosen);
  } else if (c_.routing_method == RoutingMethod::kSinkhorn && c_.training) {
    select_sinkhorn(chosen);
  } else {
    detail::parallel_for(num_tokens_, opt_.num_threads, [&](int64_t begin, int64_t end) {
      std::vector<double> keys;
      std::vector<double> group_keys;
      std::vector<int32_t> picked;
      for (int64_t t = begin; t < end; ++t)
        if (real(t)) select_top_k(t, keys, group_keys, picked, chosen[t]);
    });
  }
  set_token_lists(chosen);
}

template <typename Real>
void Router<Real>::select_expert_choice() {
  // Each expert takes its top-C real tokens of each sequence by score (ties: lower token).
  RoutingSaved<Real>& s = r_.saved;
  BasicRoutingPlan<Real>& p = r_.plan;
  std::vector<std::vector<int32_t>> chosen(static_cast<size_t>(num_tokens_));  // [num_tokens][*]
  if (opt_.replay != nullptr) {
    replay_choices(chosen);
  } else {
    std::vector<double> keys;
    std::vector<int32_t> picked;
    int64_t reported = 0;
    for (int64_t g = 0; g < num_groups(); ++g) {
      const int64_t first = g * seq_len();
      int64_t n_real = 0;
      for (int64_t t = first; t < first + seq_len(); ++t) n_real += real(t);
      const int64_t capacity = compute_capacity(c_, n_real);
      reported = std::max(reported, capacity);
      for (int64_t e = 0; e < num_experts_; ++e) {
        keys.assign(static_cast<size_t>(seq_len()), -std::numeric_limits<double>::infinity());
        for (int64_t i = 0; i < seq_len(); ++i)
          if (real(first + i)) keys[i] = double(s.scores(first + i, e));
        top_k_indices(keys.data(), seq_len(), std::min(capacity, n_real), picked);
        for (int32_t i : picked) chosen[first + i].push_back(static_cast<int32_t>(e));
      }
    }
    p.capacity = reported;
  }
  // Choice order per token: by score, best first (ties: lower expert).
  for (int64_t t = 0; t < num_tokens_; ++t) {
    std::stable_sort(chosen[t].begin(), chosen[t].end(), [&](int32_t a, int32_t b) {
      return s.scores(t, a) > s.scores(t, b);
    });
  }
  set_token_lists(chosen);
}

template <typename Real>
void Router<Real>::select_dense() {
  BasicRoutingPlan<Real>& p = r_.plan;
  p.token_offsets.assign(static_cast<size_t>(num_tokens_ + 1), 0);
  for (int64_t t = 0; t < num_tokens_; ++t) {
    const int64_t n = real(t) ? num_experts_ : 0;
    p.token_offsets[t + 1] = p.token_offsets[t] + n;
    for (int64_t e = 0; e < n; ++e) p.token_experts.push_back(static_cast<int32_t>(e));
  }
  p.token_kept.assign(p.token_experts.size(), 1);
}

template <typename Real>
void Router<Real>::apply_random_routing() {
  // GShard: the second choice is dispatched only when 2·g2 > U(0,1), with g normalised over
  // the two choices, so its expected share follows its gate.
  if (!c_.random_routing || !noise_active(c_)) return;
  BasicRoutingPlan<Real>& p = r_.plan;
  for (int64_t t = 0; t < num_tokens_; ++t) {
    const int64_t begin = p.token_offsets[t];
    if (p.token_offsets[t + 1] - begin < 2) continue;
    const double g1 = double(r_.saved.scores(t, p.token_experts[begin]));
    const double g2 = double(r_.saved.scores(t, p.token_experts[begin + 1]));
    const double u = detail::random_uniform(c_.seed, RandomStream::kRandomRouting, uint64_t(t), 0);
    if (!(2.0 * g2 / (g1 + g2) > u)) {
      p.token_kept[begin + 1] = 0;
      p.dropped.push_back({t, p.token_experts[begin + 1], DropReason::kRandomRouting});
    }
  }
}

#define MOEKIT_INSTANTIATE(Real)                                                              \
  template void Router<Real>::compute_scores();                                               \
  template void Router<Real>::compute_top1_scores();                                          \
  template void Router<Real>::selection_keys(int64_t, std::vector<double>&) const;            \
  template void Router<Real>::replay_choices(std::vector<std::vector<int32_t>>&) const;       \
  template void Router<Real>::select_sinkhorn(std::vector<std::vector<int32_t>>&) const;      \
  template void Router<Real>::limit_groups(std::vector<double>&, std::vector<double>&,        \
                                           std::vector<int32_t>&) const;                      \
  template void Router<Real>::select_top_k(int64_t, std::vector<double>&,                     \
                                           std::vector<double>&, std::vector<int32_t>&,       \
                                           std::vector<int32_t>&) const;                      \
  template void Router<Real>::set_token_lists(const std::vector<std::vector<int32_t>>&);      \
  template void Router<Real>::select_token_choice();                                          \
  template void Router<Real>::select_expert_choice();                                         \
  template void Router<Real>::select_dense();                                                 \
  template void Router<Real>::apply_random_routing();

MOEKIT_INSTANTIATE(float)
MOEKIT_INSTANTIATE(double)
#undef MOEKIT_INSTANTIATE

}  // namespace moekit::routing_detail
