// Capacity and drops: how many assignments each expert keeps, and which ones.
//
// Capacity per expert for T real tokens (per batch, or per sequence with capacity_scope
// sequence), E experts, top-k and capacity factor cf:
//   standard: C = rounding(cf · T · k / E)   (k = 1 without capacity_times_k, and for expert
//             choice), rounding = ceil (Megatron, DeepSpeed, V-MoE), half-to-even (flaxformer)
//             or floor (Megablocks);
//   tutel:    C = k · floor(cf · ceil(T / E)).
// then C = max(C, min_capacity) and rounded up to a multiple of capacity_multiple. An explicit
// expert_capacity is used as given, with neither minimum nor multiple (V-MoE's dispatcher and HF
// Switch take a given capacity as it is). No factor and no expert_capacity means dropless: the
// plan reports the largest load instead.
//
// Drop order when an expert holds more than C assignments:
//   position, choice-major: every first choice before any second choice, tokens in order
//     (flaxformer, V-MoE, Tutel, DeepSpeed top2); token-major: one joint order over
//     (token, choice) pairs (DeepSpeed topk 'position', Megablocks bins);
//   batch prioritised routing: tokens by descending top-1 score (stable) instead of in order;
//   probs: per expert, the C largest keys (score q, logit, or pre-drop combine weight);
//   random: per expert, the C largest seeded uniform priorities (DeepSpeed RTS).
#include <algorithm>
#include <cmath>
#include <utility>

#include "internal/random.h"
#include "router_state.h"

namespace moekit {
namespace {

double effective_capacity_factor(const RoutingConfig& c) {
  if (!c.training && c.eval_capacity_factor) return *c.eval_capacity_factor;
  return c.capacity_factor.value_or(0.0);
}

int64_t round_capacity(double x, CapacityRounding rounding) {
  switch (rounding) {
    case CapacityRounding::kCeil: return static_cast<int64_t>(std::ceil(x));
    case CapacityRounding::kFloor: return static_cast<int64_t>(std::floor(x));
    case CapacityRounding::kRoundHalfEven: return static_cast<int64_t>(std::nearbyint(x));
  }
  return 0;
}

}  // namespace

int64_t compute_capacity(const RoutingConfig& c, int64_t num_tokens) {
  if (c.routing_method == RoutingMethod::kDense || c.routing_method == RoutingMethod::kSoftMoe) {
    return -1;
  }
  // An explicit capacity is the capacity (V-MoE's dispatcher `capacity=`, HF Switch's
  // expert_capacity); the minimum and the multiple apply only to a capacity computed from a
  // factor (DeepSpeed's min_capacity, V-MoE's capacity_multiple_of, Tutel's alignment).
  if (c.expert_capacity) return *c.expert_capacity;
  const bool has_factor = c.capacity_factor.has_value() ||
                          (!c.training && c.eval_capacity_factor.has_value());
  if (!has_factor || !c.drop_tokens) {
    if (c.routing_method != RoutingMethod::kExpertChoice) return -1;
  }
  const double cf = has_factor ? effective_capacity_factor(c) : 1.0;
  const int64_t k = c.routing_method == RoutingMethod::kExpertChoice || !c.capacity_times_k
                        ? 1
                        : c.num_experts_per_tok;
  int64_t capacity = 0;
  if (c.capacity_formula == CapacityFormula::kTutel) {
    // Tutel: k · int(cf · ceil(T / E)).
    const double per_expert = std::ceil(double(num_tokens) / double(c.num_experts));
    capacity = c.num_experts_per_tok * static_cast<int64_t>(std::floor(cf * per_expert));
  } else {
    capacity = round_capacity(double(num_tokens) * double(k) / double(c.num_experts) * cf,
                              c.capacity_rounding);
  }
  capacity = std::max(capacity, c.min_capacity);
  if (c.capacity_multiple > 1) {
    capacity = (capacity + c.capacity_multiple - 1) / c.capacity_multiple * c.capacity_multiple;
  }
  return capacity;
}

namespace routing_detail {

using detail::RandomStream;

template <typename Real>
void Router<Real>::drop_by_position(int64_t first, int64_t last,
                                    const std::vector<int64_t>& tokens,  // [last − first]
                                    int64_t capacity,
                                    std::vector<uint8_t>& keep) const {  // [num_selections]
  // Offer the live selections in priority order; an expert accepts while its load is below C.
  const BasicRoutingPlan<Real>& p = r_.plan;
  std::vector<int64_t> load(static_cast<size_t>(num_experts_), 0);
  auto offer = [&](int64_t i) {
    if (!p.token_kept[i]) return;
    const int32_t e = p.token_experts[i];
    if (load[e] < capacity) {
      ++load[e];
      keep[i] = 1;
    }
  };
  if (c_.position_order == PositionOrder::kChoiceMajor) {
    int64_t max_choices = 0;
    for (int64_t t = first; t < last; ++t)
      max_choices = std::max(max_choices, p.token_offsets[t + 1] - p.token_offsets[t]);
    for (int64_t j = 0; j < max_choices; ++j)
      for (int64_t t : tokens)
        if (p.token_offsets[t] + j < p.token_offsets[t + 1]) offer(p.token_offsets[t] + j);
  } else {
    for (int64_t t : tokens)
      for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i) offer(i);
  }
}

template <typename Real>
void Router<Real>::drop_by_key(const std::vector<int64_t>& tokens, int64_t capacity,
                               std::vector<uint8_t>& keep) const {  // [num_selections]
  // Per expert, the best C by key: score, logit, pre-drop weight or a seeded uniform priority.
  // The sort is stable, so equal keys keep the order of `tokens`.
  const BasicRoutingPlan<Real>& p = r_.plan;
  const RoutingSaved<Real>& s = r_.saved;
  std::vector<std::vector<std::pair<double, int64_t>>> per_expert(
      static_cast<size_t>(num_experts_));  // [num_experts][(key, selection)]
  for (int64_t t : tokens) {
    for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i) {
      if (!p.token_kept[i]) continue;
      const int32_t e = p.token_experts[i];
      double key;
      if (c_.drop_policy == DropPolicy::kRandom) {
        key = detail::random_uniform(c_.seed, RandomStream::kRandomDrop, uint64_t(t), uint64_t(e));
      } else if (c_.drop_score == DropScore::kLogits && !s.scores_given) {
        key = double(s.logits(t, e));
      } else if (c_.drop_score == DropScore::kWeights) {
        key = pre_drop_weight(t, i);
      } else {
        key = double(s.scores(t, e));
      }
      per_expert[e].push_back({key, i});
    }
  }
  for (auto& list : per_expert) {
    std::stable_sort(list.begin(), list.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
    for (size_t j = 0; j < list.size() && int64_t(j) < capacity; ++j) keep[list[j].second] = 1;
  }
}

template <typename Real>
void Router<Real>::apply_capacity() {
  BasicRoutingPlan<Real>& p = r_.plan;
  const bool per_sequence = c_.capacity_scope == Scope::kSequence;
  const int64_t group_len = per_sequence ? seq_len() : num_tokens_;
  const int64_t groups = num_tokens_ / group_len;
  int64_t reported = -1;
  std::vector<int64_t> load(static_cast<size_t>(num_experts_));  // [num_experts]
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t first = g * group_len, last = first + group_len;
    int64_t n_real = 0;
    for (int64_t t = first; t < last; ++t) n_real += real(t);
    const int64_t capacity = compute_capacity(c_, n_real);
    if (capacity < 0) {
      // Dropless: report the capacity it would need, the largest load.
      std::fill(load.begin(), load.end(), 0);
      for (int64_t t = first; t < last; ++t)
        for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i)
          if (p.token_kept[i]) ++load[p.token_experts[i]];
      reported = std::max(reported, *std::max_element(load.begin(), load.end()));
      continue;
    }
    reported = std::max(reported, capacity);

    // Tokens of this group in priority order.
    std::vector<int64_t> tokens;
    for (int64_t t = first; t < last; ++t) tokens.push_back(t);
    if (c_.batch_prioritized_routing) {
      // Batch prioritised routing: tokens by descending top-1 score, stable.
      std::stable_sort(tokens.begin(), tokens.end(), [&](int64_t a, int64_t b) {
        return top1_score_[a] > top1_score_[b];
      });
    }
    std::vector<uint8_t> keep(p.token_kept.size(), 0);  // [num_selections]
    if (c_.drop_policy == DropPolicy::kPosition) {
      drop_by_position(first, last, tokens, capacity, keep);
    } else {
      drop_by_key(tokens, capacity, keep);
    }
    for (int64_t t = first; t < last; ++t) {
      for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i) {
        if (p.token_kept[i] && !keep[i]) {
          p.token_kept[i] = 0;
          p.dropped.push_back({t, p.token_experts[i], DropReason::kCapacity});
        }
      }
    }
  }
  p.capacity = reported;
  std::stable_sort(p.dropped.begin(), p.dropped.end(), [&](const auto& a, const auto& b) {
    return a.token < b.token;
  });
}

#define MOEKIT_INSTANTIATE(Real)                                                              \
  template void Router<Real>::drop_by_position(int64_t, int64_t, const std::vector<int64_t>&, \
                                               int64_t, std::vector<uint8_t>&) const;         \
  template void Router<Real>::drop_by_key(const std::vector<int64_t>&, int64_t,               \
                                          std::vector<uint8_t>&) const;                       \
  template void Router<Real>::apply_capacity();

MOEKIT_INSTANTIATE(float)
MOEKIT_INSTANTIATE(double)
#undef MOEKIT_INSTANTIATE

}  // namespace routing_detail
}  // namespace moekit
