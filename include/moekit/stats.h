// Routing statistics computed on every routing call.
//
// Collapse rule: with kept loads n_e and shares s_e = n_e / Σ n, the effective number of experts
// is exp(H(s)) (the perplexity of the load distribution: E at perfect balance, 1 when a single
// expert takes everything). The routing is flagged `collapsed` when
//     exp(H(s)) < collapse_threshold · num_experts          (default threshold 0.5).
#pragma once

#include <concepts>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace moekit {

// Statistics of the tokens that carry one caller-given label (for example a domain).
struct LabelStats {
  int32_t label = 0;
  int64_t num_tokens = 0;
  std::vector<int64_t> tokens_per_expert;  // [num_experts] kept assignments of these tokens
  double mean_entropy = 0.0;               // mean routing entropy of these tokens (nats)
  double load_entropy_normalized = 0.0;    // H(load share over experts) / log E
  int64_t top_expert = 0;                  // expert with the most of these tokens (lowest on ties)
  double top_expert_share = 0.0;           // its share of these tokens' assignments
};

struct RoutingStats {
  int64_t num_tokens = 0;       // real (unmasked) tokens
  int64_t num_selections = 0;   // selected assignments before drops
  int64_t num_kept = 0;
  int64_t num_dropped = 0;
  double dropped_fraction = 0.0;  // num_dropped / num_selections
  std::vector<int64_t> tokens_per_expert;    // [num_experts] kept
  std::vector<int64_t> selected_per_expert;  // [num_experts] before drops
  double mean_entropy = 0.0;             // mean over tokens of H(p_t) in nats
  double mean_entropy_normalized = 0.0;  // the same divided by log(num_experts)
  double max_load = 0.0;                 // max_e tokens_per_expert
  double mean_load = 0.0;                // mean_e tokens_per_expert
  double max_over_mean_load = 0.0;
  double load_cv = 0.0;                  // std / mean of tokens_per_expert (population std)
  double router_confidence = 0.0;        // mean over tokens of the largest score
  double mean_combine_weight = 0.0;      // mean over tokens of the sum of kept weights
  int64_t dead_experts = 0;              // experts with no kept token
  double effective_experts = 0.0;        // exp(H(load shares))
  bool collapsed = false;                // effective_experts < collapse_threshold · E
  std::vector<LabelStats> by_label;      // ascending label, when labels were given
  // Mutual information I(label; expert) over kept assignments divided by H(label); 1 when the
  // expert determines the label, 0 when routing ignores it.
  double label_expert_mutual_information = 0.0;
};

// The statistics as serialised, field by field: v(name, field) for every field under its one
// name, in document order. The JSON text below and the Python extension's dict are both built
// from these lists, so they name every field alike. Fields are int64_t, int32_t (label), double,
// bool, std::vector<int64_t> and, for "by_label", std::vector<LabelStats> (whose elements the
// visitor serialises with visit_label_stats). Stats may be const, or not for a visitor that
// moves the vectors out.
template <typename Stats, typename Visitor>
  requires std::same_as<std::remove_const_t<Stats>, LabelStats>
void visit_label_stats(Stats& l, Visitor&& v) {
  v("label", l.label);
  v("num_tokens", l.num_tokens);
  v("tokens_per_expert", l.tokens_per_expert);
  v("mean_entropy", l.mean_entropy);
  v("load_entropy_normalized", l.load_entropy_normalized);
  v("top_expert", l.top_expert);
  v("top_expert_share", l.top_expert_share);
}

template <typename Stats, typename Visitor>
  requires std::same_as<std::remove_const_t<Stats>, RoutingStats>
void visit_routing_stats(Stats& s, Visitor&& v) {
  v("num_tokens", s.num_tokens);
  v("num_selections", s.num_selections);
  v("num_kept", s.num_kept);
  v("num_dropped", s.num_dropped);
  v("dropped_fraction", s.dropped_fraction);
  v("tokens_per_expert", s.tokens_per_expert);
  v("selected_per_expert", s.selected_per_expert);
  v("mean_entropy", s.mean_entropy);
  v("mean_entropy_normalized", s.mean_entropy_normalized);
  v("max_load", s.max_load);
  v("mean_load", s.mean_load);
  v("max_over_mean_load", s.max_over_mean_load);
  v("load_cv", s.load_cv);
  v("router_confidence", s.router_confidence);
  v("mean_combine_weight", s.mean_combine_weight);
  v("dead_experts", s.dead_experts);
  v("effective_experts", s.effective_experts);
  v("collapsed", s.collapsed);
  v("by_label", s.by_label);
  v("label_expert_mutual_information", s.label_expert_mutual_information);
}

// The statistics as one JSON object (compact text), the fields of visit_routing_stats: the
// "stats" of `moekit route`'s OUT document and of `moekit forward`'s metadata.
std::string routing_stats_to_json(const RoutingStats& stats);

}  // namespace moekit
