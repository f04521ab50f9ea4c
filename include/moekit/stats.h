// Routing statistics computed on every routing call.
//
// Collapse rule: with kept loads n_e and shares s_e = n_e / Σ n, the effective number of experts
// is exp(H(s)) (the perplexity of the load distribution: E at perfect balance, 1 when a single
// expert takes everything). The routing is flagged `collapsed` when
//     exp(H(s)) < collapse_threshold · num_experts          (default threshold 0.5).
#pragma once

#include <cstdint>
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

}  // namespace moekit
