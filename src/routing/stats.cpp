// Routing statistics of one call, over real tokens (see include/moekit/stats.h).
//
// Per token: entropy H_t = −Σ_e q̂_te log q̂_te of the scores normalised to sum 1, and the top
// score (router confidence). Per expert: kept assignments (load) and selections. From the
// loads n_e: mean, max, max/mean, CV = std/mean, dead experts (n_e = 0), effective experts
// exp(H(n / Σn)), collapsed when effective experts < collapse_threshold · E. With labels: loads
// and mean entropy per label, and the normalised mutual information I(label; expert) / H(label)
// over kept assignments.
#include <algorithm>
#include <cmath>

#include "internal/parallel.h"
#include "router_state.h"

namespace moekit::routing_detail {
namespace {

// H(n / Σn) = −Σ_e (n_e/N) log(n_e/N), in nats; 0 for no counts.
double entropy_of_counts(const std::vector<int64_t>& counts) {  // [num_experts]
  double total = 0;
  for (int64_t c : counts) total += double(c);
  if (total <= 0) return 0.0;
  double h = 0;
  for (int64_t c : counts)
    if (c > 0) h -= (double(c) / total) * std::log(double(c) / total);
  return h;
}

}  // namespace

template <typename Real>
void Router<Real>::compute_stats() {
  RoutingStats& st = r_.stats;
  const BasicRoutingPlan<Real>& p = r_.plan;
  const RoutingSaved<Real>& s = r_.saved;
  const int64_t n_experts = num_experts_;
  st.tokens_per_expert.assign(static_cast<size_t>(n_experts), 0);
  st.selected_per_expert.assign(static_cast<size_t>(n_experts), 0);
  double entropy_sum = 0, confidence_sum = 0, weight_sum = 0;
  // Per-token entropy and top score, rows in parallel; summed below in token order.
  std::vector<double> entropy(static_cast<size_t>(num_tokens_), 0.0), top_score(entropy.size(), 0.0);
  detail::parallel_for(num_tokens_, opt_.num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (!real(t)) continue;
      double h = 0, top = 0, norm = 0;
      for (int64_t e = 0; e < n_experts; ++e) norm += double(s.scores(t, e));
      for (int64_t e = 0; e < n_experts; ++e) {
        const double q = norm > 0 ? double(s.scores(t, e)) / norm : 0.0;
        if (q > 0) h -= q * std::log(q);
        top = std::max(top, double(s.scores(t, e)));
      }
      entropy[t] = h;
      top_score[t] = top;
    }
  });
  for (int64_t t = 0; t < num_tokens_; ++t) {
    if (!real(t)) continue;
    ++st.num_tokens;
    entropy_sum += entropy[t];
    confidence_sum += top_score[t];
    for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i) {
      ++st.selected_per_expert[p.token_experts[i]];
      ++st.num_selections;
      if (p.token_kept[i]) {
        ++st.tokens_per_expert[p.token_experts[i]];
        ++st.num_kept;
        weight_sum += double(p.token_weights[i]);
      }
    }
  }
  st.num_dropped = st.num_selections - st.num_kept;
  st.dropped_fraction = st.num_selections > 0 ? double(st.num_dropped) / double(st.num_selections) : 0;
  if (st.num_tokens > 0) {
    st.mean_entropy = entropy_sum / double(st.num_tokens);
    st.mean_entropy_normalized = n_experts > 1 ? st.mean_entropy / std::log(double(n_experts)) : 0;
    st.router_confidence = confidence_sum / double(st.num_tokens);
    st.mean_combine_weight = weight_sum / double(st.num_tokens);
  }
  double sum = 0, max_load = 0;
  for (int64_t c : st.tokens_per_expert) {
    sum += double(c);
    max_load = std::max(max_load, double(c));
    st.dead_experts += c == 0;
  }
  st.mean_load = sum / double(n_experts);
  st.max_load = max_load;
  st.max_over_mean_load = st.mean_load > 0 ? max_load / st.mean_load : 0;
  double var = 0;
  for (int64_t c : st.tokens_per_expert) var += (double(c) - st.mean_load) * (double(c) - st.mean_load);
  var /= double(n_experts);
  st.load_cv = st.mean_load > 0 ? std::sqrt(var) / st.mean_load : 0;
  st.effective_experts = st.num_kept > 0 ? std::exp(entropy_of_counts(st.tokens_per_expert)) : 0;
  st.collapsed = st.num_kept > 0 && st.effective_experts < c_.collapse_threshold * double(n_experts);

  compute_label_stats();
}

template <typename Real>
void Router<Real>::compute_label_stats() {
  // Aggregation by the caller's label, and I(label; expert) over kept assignments, normalised
  // by H(label): (H(label) − H(label | expert)) / H(label).
  if (opt_.labels.empty()) return;
  RoutingStats& st = r_.stats;
  const BasicRoutingPlan<Real>& p = r_.plan;
  const RoutingSaved<Real>& s = r_.saved;
  const int64_t n_experts = num_experts_;
  std::vector<int32_t> labels;
  for (int64_t t = 0; t < num_tokens_; ++t)
    if (real(t)) labels.push_back(opt_.labels[t]);
  std::sort(labels.begin(), labels.end());
  labels.erase(std::unique(labels.begin(), labels.end()), labels.end());
  st.by_label.resize(labels.size());
  std::vector<double> label_entropy(labels.size(), 0.0);
  for (size_t i = 0; i < labels.size(); ++i) {
    st.by_label[i].label = labels[i];
    st.by_label[i].tokens_per_expert.assign(static_cast<size_t>(n_experts), 0);
  }
  for (int64_t t = 0; t < num_tokens_; ++t) {
    if (!real(t)) continue;
    const size_t li = std::lower_bound(labels.begin(), labels.end(), opt_.labels[t]) - labels.begin();
    LabelStats& ls = st.by_label[li];
    ++ls.num_tokens;
    double norm = 0, h = 0;
    for (int64_t e = 0; e < n_experts; ++e) norm += double(s.scores(t, e));
    for (int64_t e = 0; e < n_experts; ++e) {
      const double q = norm > 0 ? double(s.scores(t, e)) / norm : 0.0;
      if (q > 0) h -= q * std::log(q);
    }
    label_entropy[li] += h;
    for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i)
      if (p.token_kept[i]) ++ls.tokens_per_expert[p.token_experts[i]];
  }
  double total = double(st.num_kept);
  double h_label = 0, h_label_given_expert = 0;
  std::vector<double> expert_totals(static_cast<size_t>(n_experts), 0.0);
  for (size_t i = 0; i < labels.size(); ++i) {
    LabelStats& ls = st.by_label[i];
    ls.mean_entropy = ls.num_tokens > 0 ? label_entropy[i] / double(ls.num_tokens) : 0;
    ls.load_entropy_normalized =
        n_experts > 1 ? entropy_of_counts(ls.tokens_per_expert) / std::log(double(n_experts)) : 0;
    int64_t label_total = 0;
    for (int64_t e = 0; e < n_experts; ++e) {
      label_total += ls.tokens_per_expert[e];
      expert_totals[e] += double(ls.tokens_per_expert[e]);
      if (ls.tokens_per_expert[e] > ls.tokens_per_expert[ls.top_expert]) ls.top_expert = e;
    }
    ls.top_expert_share = label_total > 0 ? double(ls.tokens_per_expert[ls.top_expert]) / double(label_total) : 0;
    if (total > 0 && label_total > 0) {
      const double pl = double(label_total) / total;
      h_label -= pl * std::log(pl);
    }
  }
  for (int64_t e = 0; e < n_experts; ++e) {
    if (expert_totals[e] <= 0) continue;
    for (size_t i = 0; i < labels.size(); ++i) {
      const double joint = double(st.by_label[i].tokens_per_expert[e]);
      if (joint > 0) h_label_given_expert -= (joint / total) * std::log(joint / expert_totals[e]);
    }
  }
  st.label_expert_mutual_information = h_label > 0 ? (h_label - h_label_given_expert) / h_label : 0;
}
#define MOEKIT_INSTANTIATE(Real)                 \
  template void Router<Real>::compute_stats();   \
  template void Router<Real>::compute_label_stats();

MOEKIT_INSTANTIATE(float)
MOEKIT_INSTANTIATE(double)
#undef MOEKIT_INSTANTIATE

}  // namespace moekit::routing_detail
