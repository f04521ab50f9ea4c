// Router losses, raw (before coefficients).
//
// Balance probabilities P_te: the softmax of the clean logits, the sigmoid normalised per token
// σ_te / (Σ_e σ_te + 1e-20) (Megatron), or the given scores.
//
// Load balancing (Switch/GShard): aux = E · Σ_e f_e · P̄_e / k_div, with f_e = count_e / T (the
// selections of expert e: all choices or first choices only; with aux_loss_recompute_topk the
// top-k of P, Megatron), P̄_e = mean_t P_te and k_div = k for aux_loss_scale one (1 at balance),
// else 1 (k at balance). Per batch, per sequence (then averaged), or global (counts of earlier
// calls added).
//
// Importance CV² (V-MoE): CV²(Σ_t P_te), population variance.
// Load CV² (V-MoE): CV²(Σ_t 1 − Φ((thr_t − l_te) / σ)), thr_t the k-th largest noisy logit,
// σ = noise_std / E: the probability that expert e stays in token t's top-k under a fresh draw.
//
// z-loss (ST-MoE): mean over real tokens of logsumexp(clean logits)².
#include <algorithm>
#include <cmath>
#include <utility>

#include "internal/parallel.h"
#include "router_state.h"

namespace moekit::routing_detail {

template <typename Real>
void balance_probs(const RoutingConfig& c, const RoutingSaved<Real>& s, int64_t t,
                   std::vector<double>& out) {
  const int64_t n = c.num_experts;
  out.resize(static_cast<size_t>(n));
  if (s.scores_given) {
    for (int64_t e = 0; e < n; ++e) out[e] = double(s.scores(t, e));
  } else if (uses_sigmoid(c)) {
    double sum = 0;
    for (int64_t e = 0; e < n; ++e) sum += out[e] = sigmoid(double(s.clean_logits(t, e)));
    for (int64_t e = 0; e < n; ++e) out[e] /= (sum + kSigmoidNormEps);
  } else {  // softmax in double, one exp per expert
    const Real* x = s.clean_logits.row(t);
    double max_value = x[0];
    for (int64_t e = 1; e < n; ++e) max_value = std::max(max_value, double(x[e]));
    double sum = 0;
    for (int64_t e = 0; e < n; ++e) sum += out[e] = std::exp(double(x[e]) - max_value);
    for (int64_t e = 0; e < n; ++e) out[e] /= sum;
  }
}

// Mean and population variance of v, summed in index order.
std::pair<double, double> mean_and_variance(const std::vector<double>& v) {
  const double n = double(v.size());
  double mean = 0;
  for (double x : v) mean += x;
  mean /= n;
  double var = 0;
  for (double x : v) var += (x - mean) * (x - mean);
  return {mean, var / n};
}

double cv_squared(const std::vector<double>& v) {
  const auto [mean, var] = mean_and_variance(v);
  return mean > 0 ? var / (mean * mean) : 0.0;
}

// d CV²(v) / d v_e = 2(v_e − m)/(n m²) − 2 var/(n m³).
std::vector<double> cv_squared_grad(const std::vector<double>& v) {
  const double n = double(v.size());
  const auto [mean, var] = mean_and_variance(v);
  std::vector<double> g(v.size(), 0.0);
  if (mean <= 0) return g;
  for (size_t e = 0; e < v.size(); ++e)
    g[e] = 2.0 * (v[e] - mean) / (n * mean * mean) - 2.0 * var / (n * mean * mean * mean);
  return g;
}

// Smooth load estimate of V-MoE: load_e = Σ_t P(e stays in the top-k under a fresh noise draw)
//   = Σ_t 1 − Φ((threshold_t − clean_logit_te) / σ),  threshold_t = the k-th largest noisy logit.
// threshold_expert[t] receives the expert whose noisy logit is the threshold.
template <typename Real>
std::vector<double> smooth_load(const RoutingConfig& c, const RoutingSaved<Real>& s,
                                std::vector<int32_t>& threshold_expert) {
  const int64_t num_tokens = s.logits.rows, num_experts = c.num_experts;
  const double sigma = c.noise_std / double(num_experts);
  std::vector<double> load(static_cast<size_t>(num_experts), 0.0), keys(static_cast<size_t>(num_experts));
  std::vector<int32_t> picked;
  threshold_expert.assign(static_cast<size_t>(num_tokens), 0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (!s.token_mask[t]) continue;
    for (int64_t e = 0; e < num_experts; ++e) keys[e] = double(s.logits(t, e));
    top_k_indices(keys.data(), num_experts, c.num_experts_per_tok, picked);
    threshold_expert[t] = picked.back();
    const double threshold = keys[picked.back()];
    for (int64_t e = 0; e < num_experts; ++e)
      load[e] += 1.0 - normal_cdf((threshold - double(s.clean_logits(t, e))) / sigma);
  }
  return load;
}

bool smooth_load_active(const RoutingConfig& c, bool scores_given) {
  return !scores_given && c.noise_std > 0 && noise_active(c) && is_token_choice(c);
}

namespace {

// Per-expert counts f numerators of the load-balancing loss for tokens [first, last).
template <typename Real>
void balance_counts(const RoutingConfig& c, const BasicRoutingPlan<Real>& p,
                    const RoutingSaved<Real>& s, int64_t first, int64_t last,
                    std::vector<double>& counts) {  // [num_experts]
  counts.assign(static_cast<size_t>(c.num_experts), 0.0);
  std::vector<double> probs;
  std::vector<int32_t> top;
  for (int64_t t = first; t < last; ++t) {
    if (!s.token_mask[t]) continue;
    if (c.aux_loss_recompute_topk) {
      balance_probs(c, s, t, probs);
      const int64_t k = c.aux_loss_counts == AuxLossCounts::kFirstChoice ? 1 : c.num_experts_per_tok;
      top_k_indices(probs.data(), c.num_experts, k, top);
      for (int32_t e : top) counts[e] += 1.0;
      continue;
    }
    const int64_t begin = p.token_offsets[t], end = p.token_offsets[t + 1];
    if (c.aux_loss_dropped_to_expert0) {
      // HF Switch: the expert index is the argmax of the capacity-masked one-hot, so a
      // dropped token counts as expert 0.
      for (int64_t i = begin; i < end && (c.aux_loss_counts == AuxLossCounts::kAllChoices || i == begin); ++i)
        counts[p.token_kept[i] ? p.token_experts[i] : 0] += 1.0;
      continue;
    }
    for (int64_t i = begin; i < end; ++i) {
      if (c.aux_loss_counts == AuxLossCounts::kFirstChoice && i > begin) break;
      counts[p.token_experts[i]] += 1.0;
    }
  }
}

}  // namespace

template <typename Real>
void Router<Real>::compute_z_loss(int64_t n_real) {
  // z-loss: mean over real tokens of logsumexp(logits)² (ST-MoE), on the clean logits. With
  // padding_in_loss_means, padding rows count with zero logits: lse = log(cols) each.
  const RoutingSaved<Real>& s = r_.saved;
  // lse per token in parallel (rows are independent), summed in token order.
  std::vector<double> lse(static_cast<size_t>(num_tokens_), 0.0);  // [num_tokens]
  detail::parallel_for(num_tokens_, opt_.num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      if (real(t)) lse[t] = logsumexp_row(s.clean_logits.row(t), s.clean_logits.cols);
  });
  double sum = 0;
  for (int64_t t = 0; t < num_tokens_; ++t)
    if (real(t)) sum += lse[t] * lse[t];
  if (c_.padding_in_loss_means) {
    const double pad_lse = std::log(double(s.clean_logits.cols));
    sum += double(num_tokens_ - n_real) * pad_lse * pad_lse;
  }
  r_.losses.z_loss = sum / double(c_.padding_in_loss_means ? num_tokens_ : n_real);
}

template <typename Real>
void Router<Real>::compute_load_balancing(const std::vector<double>& balance_p) {
  // Load balancing: E · Σ_e f_e · P_e, f_e = count_e / T, P_e = mean_t p_te, per aux group
  // (batch or sequence), averaged over the groups that hold real tokens.
  RoutingSaved<Real>& s = r_.saved;
  const BasicRoutingPlan<Real>& p = r_.plan;
  const int64_t n_experts = num_experts_;
  const double k_div = aux_k_divisor(c_);
  const bool per_seq = c_.aux_loss_scope == AuxLossScope::kSequence;
  const int64_t group_len = per_seq ? seq_len() : num_tokens_;
  const int64_t groups = num_tokens_ / group_len;
  s.aux_counts.assign(static_cast<size_t>(groups * n_experts), 0.0);
  s.aux_token_counts.assign(static_cast<size_t>(groups), 0.0);
  double total = 0;
  int64_t used_groups = 0;
  std::vector<double> counts, mean_p(static_cast<size_t>(n_experts));  // [num_experts]
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t first = g * group_len, last = first + group_len;
    balance_counts(c_, p, s, first, last, counts);
    int64_t tokens = 0;
    std::fill(mean_p.begin(), mean_p.end(), 0.0);
    for (int64_t t = first; t < last; ++t) {
      if (!real(t)) continue;
      ++tokens;
      const double* probs = balance_p.data() + t * n_experts;
      for (int64_t e = 0; e < n_experts; ++e) mean_p[e] += probs[e];
    }
    if (tokens == 0) continue;
    if (c_.padding_in_loss_means) tokens = last - first;  // padding rows count as zeros
    double count_tokens = double(tokens);
    if (c_.aux_loss_scope == AuxLossScope::kGlobal && !opt_.global_counts.empty()) {
      for (int64_t e = 0; e < n_experts; ++e) counts[e] += opt_.global_counts[e];
      count_tokens += double(opt_.global_tokens);
    }
    double value = 0;
    for (int64_t e = 0; e < n_experts; ++e) {
      s.aux_counts[g * n_experts + e] = counts[e] / count_tokens;
      value += (counts[e] / count_tokens) * (mean_p[e] / double(tokens));
    }
    s.aux_token_counts[g] = double(tokens);
    total += double(n_experts) * value / k_div;
    ++used_groups;
  }
  r_.losses.load_balancing = used_groups > 0 ? total / double(used_groups) : 0.0;
  // Mark the groups that count, for the backward.
  for (int64_t g = 0; g < groups; ++g)
    if (s.aux_token_counts[g] > 0) s.aux_token_counts[g] *= double(used_groups);
}

template <typename Real>
void Router<Real>::compute_losses() {
  RoutingLosses& l = r_.losses;
  RoutingSaved<Real>& s = r_.saved;
  const int64_t n_experts = num_experts_;
  int64_t n_real = 0;
  for (int64_t t = 0; t < num_tokens_; ++t) n_real += real(t);

  if (!s.scores_given && n_real > 0) compute_z_loss(n_real);
  if (c_.routing_method == RoutingMethod::kSoftMoe || n_real == 0) {
    l.total = c_.router_z_loss_coef * l.z_loss;
    return;
  }

  // P of every real token, computed once, rows in parallel; the sums below read it in token
  // order, as they would compute it.
  std::vector<double> balance_p(static_cast<size_t>(num_tokens_ * n_experts), 0.0);  // [T, E]
  detail::parallel_for(num_tokens_, opt_.num_threads, [&](int64_t begin, int64_t end) {
    std::vector<double> row;
    for (int64_t t = begin; t < end; ++t) {
      if (!real(t)) continue;
      balance_probs(c_, s, t, row);
      std::copy(row.begin(), row.end(), balance_p.begin() + t * n_experts);
    }
  });
  // Importance CV² over Σ_t P_te.
  std::vector<double> importance(static_cast<size_t>(n_experts), 0.0);  // [num_experts]
  for (int64_t t = 0; t < num_tokens_; ++t) {
    if (!real(t)) continue;
    const double* probs = balance_p.data() + t * n_experts;
    for (int64_t e = 0; e < n_experts; ++e) importance[e] += probs[e];
  }
  l.importance_cv2 = cv_squared(importance);

  // Load CV² (V-MoE), see smooth_load.
  if (smooth_load_active(c_, s.scores_given)) {
    std::vector<int32_t> threshold_expert;
    l.load_cv2 = cv_squared(smooth_load(c_, s, threshold_expert));
  }

  if (is_token_choice(c_)) compute_load_balancing(balance_p);

  switch (c_.aux_loss_type) {
    case AuxLossType::kNone: l.aux_loss = 0; break;
    case AuxLossType::kLoadBalancing: l.aux_loss = l.load_balancing; break;
    case AuxLossType::kImportanceLoad:
      l.aux_loss = c_.importance_loss_weight * l.importance_cv2 + c_.load_loss_weight * l.load_cv2;
      break;
  }
  l.total = c_.router_aux_loss_coef * l.aux_loss + c_.router_z_loss_coef * l.z_loss;
}

#define MOEKIT_INSTANTIATE(Real)                                                              \
  template void balance_probs<Real>(const RoutingConfig&, const RoutingSaved<Real>&, int64_t,  \
                                    std::vector<double>&);                                    \
  template std::vector<double> smooth_load<Real>(const RoutingConfig&,                        \
                                                 const RoutingSaved<Real>&,                   \
                                                 std::vector<int32_t>&);                      \
  template void Router<Real>::compute_z_loss(int64_t);                                        \
  template void Router<Real>::compute_load_balancing(const std::vector<double>&);             \
  template void Router<Real>::compute_losses();

MOEKIT_INSTANTIATE(float)
MOEKIT_INSTANTIATE(double)
#undef MOEKIT_INSTANTIATE

}  // namespace moekit::routing_detail
