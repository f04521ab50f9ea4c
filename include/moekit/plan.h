// The routing plan: the one contract between routing and expert compute.
//
// Every routing method produces a RoutingPlan. It is CSR-like in both directions:
//   - per token, its selections in choice order (expert id, combine weight, kept flag);
//   - per expert, the tokens it processes (ascending token index) with their combine weights.
// Dropped assignments are listed with the reason they were dropped. No dense
// [tokens × experts × capacity] tensor is ever built. Soft MoE, whose slots mix tokens, carries
// its dense [num_tokens, num_slots] dispatch and combine matrices instead of token lists.
#pragma once

#include <cstdint>
#include <vector>

namespace moekit {

enum class DropReason : uint8_t {
  kCapacity,       // the expert was over capacity
  kRandomRouting,  // GShard random routing did not dispatch the second choice
};

struct DroppedAssignment {
  int64_t token = 0;
  int64_t expert = 0;
  DropReason reason = DropReason::kCapacity;
};

template <typename Real>
struct BasicRoutingPlan {
  int64_t num_tokens = 0;
  int64_t num_experts = 0;

  // Per token, CSR: selections of token t are [token_offsets[t], token_offsets[t+1]), in choice
  // order (best first). A selection that was dropped stays listed with kept = 0 and weight 0.
  std::vector<int64_t> token_offsets;  // [num_tokens + 1]
  std::vector<int32_t> token_experts;  // [num_selections]
  std::vector<Real> token_weights;     // [num_selections] combine weight; 0 when dropped
  std::vector<uint8_t> token_kept;     // [num_selections] 1 kept, 0 dropped

  // Per expert, CSR over kept assignments: tokens of expert e are
  // [expert_offsets[e], expert_offsets[e+1]), ascending token index.
  std::vector<int64_t> expert_offsets;    // [num_experts + 1]
  std::vector<int32_t> expert_tokens;     // [num_kept]
  std::vector<Real> expert_weights;       // [num_kept]
  std::vector<int64_t> expert_selection;  // [num_kept] index into the token_* arrays

  std::vector<DroppedAssignment> dropped;  // in (token, choice) order

  // Per-expert capacity that was applied (the largest over sequences when capacity_scope is
  // sequence). Dropless token choice reports the largest load, the capacity it would need;
  // -1 for methods without capacity (dense, Soft MoE).
  int64_t capacity = -1;

  // Soft MoE only (num_slots = num_experts · slots_per_expert, slot s of expert e is column
  // e · slots_per_expert + s); empty otherwise.
  int64_t num_slots = 0;
  std::vector<Real> dispatch;  // [num_tokens, num_slots] softmax over the tokens of a sequence
  std::vector<Real> combine;   // [num_tokens, num_slots] softmax over slots per token

  int64_t num_selections() const { return static_cast<int64_t>(token_experts.size()); }
  int64_t num_kept() const { return static_cast<int64_t>(expert_tokens.size()); }
  int64_t tokens_for_expert(int64_t e) const { return expert_offsets[e + 1] - expert_offsets[e]; }
};

using RoutingPlan = BasicRoutingPlan<float>;

}  // namespace moekit
