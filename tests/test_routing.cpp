// Routing semantics, invariants, determinism and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <set>

#include "moekit/config.h"
#include "moekit/error.h"
#include "moekit/routing.h"

namespace moekit {
namespace {

Matrix<float> random_logits(int64_t tokens, int64_t experts, uint32_t seed, float scale = 2.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  Matrix<float> m(tokens, experts);
  for (auto& v : m.values) v = dist(gen);
  return m;
}

RoutingConfig topk_config(int64_t experts, int64_t k) {
  RoutingConfig c;
  c.num_experts = experts;
  c.num_experts_per_tok = k;
  return c;
}

template <typename Real>
std::vector<int32_t> kept_experts(const BasicRoutingPlan<Real>& p, int64_t t) {
  std::vector<int32_t> out;
  for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i)
    if (p.token_kept[i]) out.push_back(p.token_experts[i]);
  return out;
}

template <typename Real>
std::vector<Real> kept_weights(const BasicRoutingPlan<Real>& p, int64_t t) {
  std::vector<Real> out;
  for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i)
    if (p.token_kept[i]) out.push_back(p.token_weights[i]);
  return out;
}

// Structural invariants every plan must satisfy.
template <typename Real>
void expect_consistent_plan(const BasicRoutingPlan<Real>& p) {
  ASSERT_EQ(static_cast<int64_t>(p.token_offsets.size()), p.num_tokens + 1);
  ASSERT_EQ(static_cast<int64_t>(p.expert_offsets.size()), p.num_experts + 1);
  // Every selection is kept xor reported dropped.
  std::set<std::pair<int64_t, int64_t>> dropped;
  for (const auto& d : p.dropped) EXPECT_TRUE(dropped.insert({d.token, d.expert}).second);
  int64_t kept = 0;
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    std::set<int32_t> seen;
    for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i) {
      EXPECT_TRUE(seen.insert(p.token_experts[i]).second) << "expert selected twice by token " << t;
      const bool is_dropped = dropped.count({t, p.token_experts[i]}) > 0;
      EXPECT_NE(bool(p.token_kept[i]), is_dropped);
      if (!p.token_kept[i]) EXPECT_EQ(p.token_weights[i], Real(0));
      kept += p.token_kept[i];
    }
  }
  EXPECT_EQ(kept, p.num_kept());
  EXPECT_EQ(kept + static_cast<int64_t>(p.dropped.size()), p.num_selections());
  // Expert lists: ascending tokens, pointing back at kept selections.
  for (int64_t e = 0; e < p.num_experts; ++e) {
    for (int64_t j = p.expert_offsets[e]; j < p.expert_offsets[e + 1]; ++j) {
      const int64_t i = p.expert_selection[j];
      EXPECT_EQ(p.token_experts[i], e);
      EXPECT_TRUE(p.token_kept[i]);
      EXPECT_EQ(p.expert_weights[j], p.token_weights[i]);
      EXPECT_GE(i, p.token_offsets[p.expert_tokens[j]]);
      EXPECT_LT(i, p.token_offsets[p.expert_tokens[j] + 1]);
      if (j > p.expert_offsets[e]) EXPECT_LT(p.expert_tokens[j - 1], p.expert_tokens[j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------

TEST(RoutingTopK, SeedsWorkedExample) {
  // logits [2.1, -0.5, 3.7, 0.8], k = 2: experts [2, 0], softmax([3.7, 2.1]) = [0.832, 0.168].
  Matrix<float> logits(1, 4);
  logits.values = {2.1f, -0.5f, 3.7f, 0.8f};
  for (SoftmaxOrder order : {SoftmaxOrder::kBeforeTopK, SoftmaxOrder::kAfterTopK}) {
    RoutingConfig c = topk_config(4, 2);
    c.softmax_order = order;
    c.renormalize = Renormalize::kBeforeDrop;
    const auto r = route_logits<float>(c, logits.cview());
    EXPECT_EQ(kept_experts(r.plan, 0), (std::vector<int32_t>{2, 0}));
    const auto w = kept_weights(r.plan, 0);
    EXPECT_NEAR(w[0], 0.832, 5e-4);
    EXPECT_NEAR(w[1], 0.168, 5e-4);
    EXPECT_NEAR(w[0], 1.0 / (1.0 + std::exp(-1.6)), 1e-6);
  }
}

TEST(RoutingTopK, RawSoftmaxWeightsWithoutRenormalisation) {
  Matrix<float> logits(1, 4);
  logits.values = {2.1f, -0.5f, 3.7f, 0.8f};
  RoutingConfig c = topk_config(4, 2);
  c.renormalize = Renormalize::kNone;
  const auto r = route_logits<float>(c, logits.cview());
  const double z = std::exp(2.1) + std::exp(-0.5) + std::exp(3.7) + std::exp(0.8);
  const auto w = kept_weights(r.plan, 0);
  EXPECT_NEAR(w[0], std::exp(3.7) / z, 1e-6);
  EXPECT_NEAR(w[1], std::exp(2.1) / z, 1e-6);
}

TEST(RoutingTopK, TiesGoToLowerExpertIndex) {
  Matrix<float> logits(2, 6);
  logits.values = {1, 3, 3, 0, 3, 1,  //
                   5, 5, 5, 5, 5, 5};
  RoutingConfig c = topk_config(6, 2);
  const auto r = route_logits<float>(c, logits.cview());
  EXPECT_EQ(kept_experts(r.plan, 0), (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(kept_experts(r.plan, 1), (std::vector<int32_t>{0, 1}));
  c.scoring_func = ScoringFunc::kSigmoid;
  const auto s = route_logits<float>(c, logits.cview());
  EXPECT_EQ(kept_experts(s.plan, 0), (std::vector<int32_t>{1, 2}));
}

TEST(RoutingTopK, RenormalisedWeightsSumToOneAndPlanIsConsistent) {
  for (uint32_t seed = 0; seed < 20; ++seed) {
    const int64_t experts = 4 + seed % 13, k = 1 + seed % 4;
    const auto logits = random_logits(37, experts, seed);
    RoutingConfig c = topk_config(experts, k);
    c.renormalize = Renormalize::kBeforeDrop;
    c.routed_scaling_factor = 1.0;
    const auto r = route_logits<float>(c, logits.cview());
    expect_consistent_plan(r.plan);
    for (int64_t t = 0; t < 37; ++t) {
      double sum = 0;
      for (float w : kept_weights(r.plan, t)) sum += w;
      EXPECT_NEAR(sum, 1.0, 1e-6);
      EXPECT_EQ(static_cast<int64_t>(kept_experts(r.plan, t).size()), k);
    }
  }
}

TEST(RoutingTopK, SigmoidGroupLimitedWithBiasAndScaling) {
  // 8 experts in 4 groups of 2; the bias steers selection but not the weights.
  Matrix<float> logits(1, 8);
  logits.values = {0.1f, 0.2f, 2.0f, -1.0f, 1.5f, 1.4f, -0.3f, 0.0f};
  RoutingConfig c = topk_config(8, 2);
  c.scoring_func = ScoringFunc::kSigmoid;
  c.n_group = 4;
  c.topk_group = 2;
  c.renormalize = Renormalize::kBeforeDrop;
  c.routed_scaling_factor = 2.5;
  // Group scores (sum of top-2 sigmoid): g0 = σ(.1)+σ(.2), g1 = σ(2)+σ(−1), g2 = σ(1.5)+σ(1.4),
  // g3 = σ(−.3)+σ(0). Kept groups: g2 and g1 → candidates {2, 3, 4, 5}; top-2: 2 and 4.
  auto r = route_logits<float>(c, logits.cview());
  EXPECT_EQ(kept_experts(r.plan, 0), (std::vector<int32_t>{2, 4}));
  const double s2 = 1 / (1 + std::exp(-2.0)), s4 = 1 / (1 + std::exp(-1.5));
  auto w = kept_weights(r.plan, 0);
  EXPECT_NEAR(w[0], 2.5 * s2 / (s2 + s4), 1e-6);
  EXPECT_NEAR(w[1], 2.5 * s4 / (s2 + s4), 1e-6);
  // A bias on expert 5 moves the choice to it; the weights stay the unbiased sigmoid.
  c.e_score_correction_bias = {0, 0, 0, 0, 0, 0.5, 0, 0};
  r = route_logits<float>(c, logits.cview());
  EXPECT_EQ(kept_experts(r.plan, 0), (std::vector<int32_t>{5, 2}));
  const double s5 = 1 / (1 + std::exp(-1.4));
  w = kept_weights(r.plan, 0);
  EXPECT_NEAR(w[0], 2.5 * s5 / (s2 + s5), 1e-6);
}

TEST(RoutingTopK, MegatronSigmoidTopOneWeightIsTheRawSigmoid) {
  // Megatron normalises sigmoid weights s / (Σ s + 1e-20) only when k > 1; with top-1 the
  // weight is the raw sigmoid, times the scaling factor.
  Matrix<float> logits(2, 4);
  logits.values = {0.5f, -1.0f, 2.0f, 0.0f,  //
                   -0.5f, 1.0f, 0.25f, -2.0f};
  RoutingConfig c = routing_config_from_json(
      R"({"preset": "megatron", "num_experts": 4, "num_experts_per_tok": 1,
          "scoring_func": "sigmoid", "routed_scaling_factor": 2.5})");
  const auto r = route_logits<float>(c, logits.cview());
  EXPECT_EQ(kept_experts(r.plan, 0), (std::vector<int32_t>{2}));
  EXPECT_EQ(kept_experts(r.plan, 1), (std::vector<int32_t>{1}));
  EXPECT_EQ(kept_weights(r.plan, 0)[0], 2.5f * (1.0f / (1.0f + std::exp(-2.0f))));
  EXPECT_EQ(kept_weights(r.plan, 1)[0], 2.5f * (1.0f / (1.0f + std::exp(-1.0f))));
  // k = 2 is normalised over the two choices.
  c.num_experts_per_tok = 2;
  const auto r2 = route_logits<float>(c, logits.cview());
  const auto w = kept_weights(r2.plan, 0);
  EXPECT_NEAR(double(w[0]) + double(w[1]), 2.5, 1e-6);
  // HF DeepSeek-V3 divides by the sum for any k (norm_topk_prob): top-1 weighs the scale.
  const RoutingConfig hf = routing_config_from_json(
      R"({"preset": "hf-deepseek-v3", "num_experts": 4, "num_experts_per_tok": 1, "n_group": 0,
          "topk_group": 0})");
  EXPECT_EQ(kept_weights(route_logits<float>(hf, logits.cview()).plan, 0)[0], 2.5f);
}

TEST(RoutingTopK, MaskedGroupFillDecidesWhenKeptScoresAreNegative) {
  // With a strongly negative bias on the kept group's experts, a 0.0 fill lets a masked expert
  // win (the HF snapshot); -inf never does.
  Matrix<float> logits(1, 4);
  logits.values = {3.0f, 2.9f, -3.0f, -3.1f};
  RoutingConfig c = topk_config(4, 1);
  c.scoring_func = ScoringFunc::kSigmoid;
  c.n_group = 2;
  c.topk_group = 1;
  c.e_score_correction_bias = {-2.0, -2.0, 0.0, 0.0};
  // Keys: [σ(3)−2, σ(2.9)−2, σ(−3), σ(−3.1)] ≈ [−1.05, −1.05, 0.047, 0.043]; group 1 wins.
  c.masked_group_fill = MaskedGroupFill::kNegInf;
  EXPECT_EQ(kept_experts(route_logits<float>(c, logits.cview()).plan, 0), (std::vector<int32_t>{2}));
  // Make group 0 win the group vote but every key negative: bias the other group down more.
  c.e_score_correction_bias = {-1.5, -1.5, -1.2, -1.2};
  // Keys ≈ [−0.547, −0.552, −1.153, −1.157]: group 0 kept; with 0.0 fill expert 2 (masked) wins.
  c.masked_group_fill = MaskedGroupFill::kZero;
  EXPECT_EQ(kept_experts(route_logits<float>(c, logits.cview()).plan, 0), (std::vector<int32_t>{2}));
  c.masked_group_fill = MaskedGroupFill::kNegInf;
  EXPECT_EQ(kept_experts(route_logits<float>(c, logits.cview()).plan, 0), (std::vector<int32_t>{0}));
}

TEST(RoutingTopK, MegatronGroupScoreSumsTopKFloorDivTopkGroupScores) {
  // Megatron group_limited_topk: each group scores the sum of its top-(k // topk_group) keys,
  // for any k; here k = 7, topk_group = 2, so the top-3 of each group of 4. Sums of top-3:
  // g0 0.90, g1 1.05, g2 0.96, g3 0.30 → groups 1 and 2 (a sum of top-2 would keep g0 and g1).
  // Top-7 of the kept experts 4..11: 4, 5, 6 (0.35), 8, 9, 10 (0.32), then 7 and 11 tie at 0
  // and the lower index wins.
  RoutingConfig c = routing_config_from_json(
      R"({"preset": "megatron", "num_experts": 16, "num_experts_per_tok": 7, "n_group": 4,
          "topk_group": 2, "group_score": "sum_topk_per_group", "renormalize": "none"})");
  Matrix<float> probs(1, 16);
  probs.values = {0.50f, 0.40f, 0.00f, 0.00f,  0.35f, 0.35f, 0.35f, 0.00f,
                  0.32f, 0.32f, 0.32f, 0.00f,  0.10f, 0.10f, 0.10f, 0.10f};
  const auto r = route_probs<float>(c, probs.cview());
  EXPECT_EQ(kept_experts(r.plan, 0), (std::vector<int32_t>{4, 5, 6, 8, 9, 10, 7}));
  // The same selection from logits (softmax after top-k selects on the logits).
  const auto from_logits = route_logits<float>(c, probs.cview());
  EXPECT_EQ(kept_experts(from_logits.plan, 0), (std::vector<int32_t>{4, 5, 6, 8, 9, 10, 7}));
}

// ---------------------------------------------------------------------------------------------
// Capacity and drops.

TEST(RoutingCapacity, RoundingRules) {
  RoutingConfig c = topk_config(4, 2);
  c.capacity_factor = 1.25;
  c.capacity_times_k = false;
  c.capacity_rounding = CapacityRounding::kRoundHalfEven;
  EXPECT_EQ(compute_capacity(c, 10), 3);  // 3.125
  c.capacity_factor = 1.0;
  EXPECT_EQ(compute_capacity(c, 10), 2);  // 2.5 → 2 (half to even)
  EXPECT_EQ(compute_capacity(c, 14), 4);  // 3.5 → 4
  c.capacity_rounding = CapacityRounding::kCeil;
  EXPECT_EQ(compute_capacity(c, 10), 3);
  c.capacity_times_k = true;
  EXPECT_EQ(compute_capacity(c, 10), 5);
  c.capacity_rounding = CapacityRounding::kFloor;
  c.capacity_factor = 1.1;
  EXPECT_EQ(compute_capacity(c, 10), 5);  // 5.5 → 5
  c.min_capacity = 8;
  EXPECT_EQ(compute_capacity(c, 10), 8);
  c.min_capacity = 0;
  c.capacity_multiple = 4;
  EXPECT_EQ(compute_capacity(c, 10), 8);
  c.capacity_multiple = 1;
  c.capacity_formula = CapacityFormula::kTutel;  // k · int(cf · ceil(T/E)) = 2 · int(1.1 · 3)
  EXPECT_EQ(compute_capacity(c, 10), 6);
  c.capacity_formula = CapacityFormula::kStandard;
  c.expert_capacity = 7;
  EXPECT_EQ(compute_capacity(c, 10), 7);
  c.expert_capacity.reset();
  c.capacity_factor.reset();
  EXPECT_EQ(compute_capacity(c, 10), -1);  // dropless
  c.capacity_factor = 2.0;
  c.eval_capacity_factor = 1.0;
  c.capacity_rounding = CapacityRounding::kCeil;
  c.training = true;
  EXPECT_EQ(compute_capacity(c, 10), 10);
  c.training = false;
  EXPECT_EQ(compute_capacity(c, 10), 5);
  c.drop_tokens = false;
  EXPECT_EQ(compute_capacity(c, 10), -1);
}

// Probability table where every token prefers expert 0 then expert 1 (4 experts, capacity 2).
Matrix<float> crowded_probs() {
  Matrix<float> p(4, 4);
  p.values = {0.50f, 0.30f, 0.10f, 0.10f,   //
              0.60f, 0.20f, 0.10f, 0.10f,   //
              0.70f, 0.25f, 0.03f, 0.02f,   //
              0.40f, 0.35f, 0.15f, 0.10f};
  return p;
}

RoutingConfig crowded_config() {
  RoutingConfig c = topk_config(4, 2);
  c.expert_capacity = 2;
  c.renormalize = Renormalize::kNone;
  return c;
}

TEST(RoutingCapacity, ChoiceMajorPositionKeepsFirstChoicesFirst) {
  RoutingConfig c = crowded_config();
  const auto r = route_probs<float>(c, crowded_probs().cview());
  expect_consistent_plan(r.plan);
  // Expert 0: tokens 0, 1 (first choices, by position); tokens 2, 3 dropped. Expert 1: second
  // choices of tokens 0, 1 come after all first choices and fit (capacity 2).
  EXPECT_EQ(kept_experts(r.plan, 0), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(kept_experts(r.plan, 1), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(kept_experts(r.plan, 2), (std::vector<int32_t>{}));
  EXPECT_EQ(kept_experts(r.plan, 3), (std::vector<int32_t>{}));
  EXPECT_EQ(r.plan.capacity, 2);
  EXPECT_EQ(r.plan.dropped.size(), 4u);
  EXPECT_DOUBLE_EQ(r.stats.dropped_fraction, 0.5);
}

// V-MoE vmoe/moe_test.py (DispatcherTest.test_top_experts_per_item_einsum_{vanilla,bpr},
// GetTopItemsPerExpertTest.test_top_items_per_expert_einsum): a capacity given to the
// dispatcher is used as is; capacity_multiple and min_capacity apply only to a capacity
// computed from a capacity factor.
Matrix<float> vmoe_dispatcher_gates() {
  Matrix<float> gates(3, 3);
  gates.values = {0.4f, 0.0f, 0.2f,  //
                  0.5f, 0.1f, 0.4f,  //
                  0.3f, 0.2f, 0.6f};
  return gates;
}

TEST(RoutingCapacity, ExplicitExpertCapacityIsUsedAsGivenVmoeTopExpertsPerItem) {
  RoutingConfig c = routing_config_from_json(
      R"({"preset": "vmoe", "num_experts": 3, "num_experts_per_tok": 2, "expert_capacity": 2})");
  EXPECT_EQ(compute_capacity(c, 3), 2);
  auto r = route_probs<float>(c, vmoe_dispatcher_gates().cview());
  expect_consistent_plan(r.plan);
  EXPECT_EQ(r.plan.capacity, 2);
  // Vanilla: expected combine weights [[.4, 0, .2], [.5, 0, 0], [0, 0, .6]].
  EXPECT_EQ(kept_experts(r.plan, 0), (std::vector<int32_t>{0, 2}));
  EXPECT_EQ(kept_experts(r.plan, 1), (std::vector<int32_t>{0}));
  EXPECT_EQ(kept_experts(r.plan, 2), (std::vector<int32_t>{2}));
  EXPECT_EQ(kept_weights(r.plan, 0), (std::vector<float>{0.4f, 0.2f}));
  EXPECT_EQ(r.plan.dropped.size(), 2u);
  // BPR: expected combine weights [[.4, 0, 0], [.5, 0, .4], [0, 0, .6]].
  c.batch_prioritized_routing = true;
  r = route_probs<float>(c, vmoe_dispatcher_gates().cview());
  EXPECT_EQ(kept_experts(r.plan, 0), (std::vector<int32_t>{0}));
  EXPECT_EQ(kept_experts(r.plan, 1), (std::vector<int32_t>{0, 2}));
  EXPECT_EQ(kept_experts(r.plan, 2), (std::vector<int32_t>{2}));
}

TEST(RoutingCapacity, ExplicitExpertCapacityIsUsedAsGivenVmoeTopItemsPerExpert) {
  const RoutingConfig c = routing_config_from_json(
      R"({"preset": "vmoe-experts-choose", "num_experts": 3, "expert_capacity": 2})");
  EXPECT_EQ(compute_capacity(c, 3), 2);
  const auto r = route_probs<float>(c, vmoe_dispatcher_gates().cview());
  expect_consistent_plan(r.plan);
  EXPECT_EQ(r.plan.capacity, 2);
  // Expected dispatch [[[0,1],[0,0],[0,0]], [[1,0],[0,1],[0,1]], [[0,0],[1,0],[1,0]]].
  EXPECT_EQ(kept_experts(r.plan, 0), (std::vector<int32_t>{0}));
  EXPECT_EQ(kept_experts(r.plan, 1), (std::vector<int32_t>{0, 2, 1}));
  EXPECT_EQ(kept_experts(r.plan, 2), (std::vector<int32_t>{2, 1}));
}

TEST(RoutingCapacity, MinimumAndMultipleApplyOnlyToAComputedCapacity) {
  RoutingConfig c = topk_config(4, 2);
  c.min_capacity = 8;
  c.capacity_multiple = 4;
  c.expert_capacity = 3;
  EXPECT_EQ(compute_capacity(c, 10), 3);
  c.expert_capacity.reset();
  c.capacity_factor = 1.0;  // ceil(10 · 2 / 4) = 5 → at least 8 → multiple of 4: 8
  EXPECT_EQ(compute_capacity(c, 10), 8);
  c.min_capacity = 0;  // 5 → 8
  EXPECT_EQ(compute_capacity(c, 10), 8);
  // DeepSpeed's minimum of 8 is for its computed capacity only.
  EXPECT_EQ(compute_capacity(
                routing_config_from_json(R"({"preset": "deepspeed-top1", "expert_capacity": 2})"), 64),
            2);
}

TEST(RoutingCapacity, BatchPrioritisedRoutingOrdersByTopScore) {
  RoutingConfig c = crowded_config();
  c.batch_prioritized_routing = true;
  const auto r = route_probs<float>(c, crowded_probs().cview());
  // Top-1 scores 0.5, 0.6, 0.7, 0.4 → order 2, 1, 0, 3.
  EXPECT_EQ(kept_experts(r.plan, 2), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(kept_experts(r.plan, 1), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(kept_experts(r.plan, 0), (std::vector<int32_t>{}));
}

TEST(RoutingCapacity, TokenMajorPositionIsOneJointOrder) {
  RoutingConfig c = crowded_config();
  c.position_order = PositionOrder::kTokenMajor;
  const auto r = route_probs<float>(c, crowded_probs().cview());
  EXPECT_EQ(kept_experts(r.plan, 0), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(kept_experts(r.plan, 1), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(kept_experts(r.plan, 2), (std::vector<int32_t>{}));
}

TEST(RoutingCapacity, ProbsPolicyKeepsHighestScoresPerExpert) {
  RoutingConfig c = crowded_config();
  c.drop_policy = DropPolicy::kProbs;
  const auto r = route_probs<float>(c, crowded_probs().cview());
  // Expert 0 keeps tokens 2 (0.7) and 1 (0.6); expert 1 keeps tokens 3 (0.35) and 0 (0.3).
  EXPECT_EQ(kept_experts(r.plan, 0), (std::vector<int32_t>{1}));
  EXPECT_EQ(kept_experts(r.plan, 1), (std::vector<int32_t>{0}));
  EXPECT_EQ(kept_experts(r.plan, 2), (std::vector<int32_t>{0}));
  EXPECT_EQ(kept_experts(r.plan, 3), (std::vector<int32_t>{1}));
}

TEST(RoutingCapacity, RenormaliseAfterDropGivesSurvivorAllWeight) {
  RoutingConfig c = crowded_config();
  c.drop_policy = DropPolicy::kProbs;
  c.renormalize = Renormalize::kAfterDrop;
  const auto r = route_probs<float>(c, crowded_probs().cview());
  EXPECT_FLOAT_EQ(kept_weights(r.plan, 0)[0], 1.0f);
  c.renormalize = Renormalize::kBeforeDrop;
  const auto b = route_probs<float>(c, crowded_probs().cview());
  EXPECT_NEAR(kept_weights(b.plan, 0)[0], 0.3 / 0.8, 1e-6);
}

TEST(RoutingCapacity, RandomPolicyIsSeededAndRespectsCapacity) {
  RoutingConfig c = topk_config(4, 2);
  c.capacity_factor = 0.5;
  c.drop_policy = DropPolicy::kRandom;
  c.seed = 7;
  const auto logits = random_logits(64, 4, 3);
  const auto a = route_logits<float>(c, logits.cview());
  const auto b = route_logits<float>(c, logits.cview());
  EXPECT_EQ(a.plan.token_kept, b.plan.token_kept);
  c.seed = 8;
  const auto d = route_logits<float>(c, logits.cview());
  EXPECT_NE(a.plan.token_kept, d.plan.token_kept);
  for (int64_t e = 0; e < 4; ++e) EXPECT_LE(a.plan.tokens_for_expert(e), a.plan.capacity);
}

TEST(RoutingCapacity, NoExpertExceedsCapacityPerSequence) {
  for (uint32_t seed = 0; seed < 12; ++seed) {
    RoutingConfig c = topk_config(6, 2);
    c.capacity_factor = 0.75 + 0.25 * (seed % 3);
    c.capacity_scope = seed % 2 ? Scope::kSequence : Scope::kBatch;
    c.drop_policy = static_cast<DropPolicy>(seed % 3);
    c.position_order = static_cast<PositionOrder>(seed / 3 % 2);
    c.seed = seed;
    RoutingOptions o;
    o.sequence_length = 8;
    const auto logits = random_logits(32, 6, seed);
    const auto r = route_logits<float>(c, logits.cview(), o);
    expect_consistent_plan(r.plan);
    const int64_t group = c.capacity_scope == Scope::kSequence ? 8 : 32;
    for (int64_t first = 0; first < 32; first += group) {
      std::vector<int64_t> load(6, 0);
      for (int64_t t = first; t < first + group; ++t)
        for (int32_t e : kept_experts(r.plan, t)) ++load[e];
      for (int64_t l : load) EXPECT_LE(l, compute_capacity(c, group));
    }
  }
}

TEST(RoutingCapacity, DroplessReportsLargestLoad) {
  RoutingConfig c = topk_config(4, 2);
  const auto r = route_probs<float>(c, crowded_probs().cview());
  EXPECT_TRUE(r.plan.dropped.empty());
  EXPECT_EQ(r.plan.capacity, 4);
}

// ---------------------------------------------------------------------------------------------
// Other methods.

TEST(RoutingDense, EveryTokenUsesEveryExpertWithSoftmaxWeights) {
  RoutingConfig c = topk_config(5, 1);
  c.routing_method = RoutingMethod::kDense;
  const auto logits = random_logits(7, 5, 1);
  const auto r = route_logits<float>(c, logits.cview());
  expect_consistent_plan(r.plan);
  for (int64_t t = 0; t < 7; ++t) {
    const auto w = kept_weights(r.plan, t);
    ASSERT_EQ(w.size(), 5u);
    double z = 0;
    for (int64_t e = 0; e < 5; ++e) z += std::exp(double(logits(t, e)));
    for (int64_t e = 0; e < 5; ++e) EXPECT_NEAR(w[e], std::exp(double(logits(t, e))) / z, 1e-6);
  }
}

TEST(RoutingExpertChoice, EachExpertTakesItsTopTokens) {
  RoutingConfig c = topk_config(4, 1);
  c.routing_method = RoutingMethod::kExpertChoice;
  c.capacity_factor = 1.0;
  c.capacity_times_k = false;
  const auto logits = random_logits(12, 4, 5);
  const auto r = route_logits<float>(c, logits.cview());
  expect_consistent_plan(r.plan);
  EXPECT_EQ(r.plan.capacity, 3);
  for (int64_t e = 0; e < 4; ++e) {
    ASSERT_EQ(r.plan.tokens_for_expert(e), 3);
    // Every chosen token's score is at least every unchosen token's score for this expert.
    double min_chosen = 1e9, max_other = -1e9;
    std::set<int32_t> chosen(r.plan.expert_tokens.begin() + r.plan.expert_offsets[e],
                             r.plan.expert_tokens.begin() + r.plan.expert_offsets[e + 1]);
    for (int64_t t = 0; t < 12; ++t) {
      const double q = r.saved.scores(t, e);
      if (chosen.count(int32_t(t))) min_chosen = std::min(min_chosen, q);
      else max_other = std::max(max_other, q);
    }
    EXPECT_GE(min_chosen, max_other);
  }
}

TEST(RoutingSoftMoe, DispatchAndCombineAreSoftmaxes) {
  RoutingConfig c = topk_config(3, 1);
  c.routing_method = RoutingMethod::kSoftMoe;
  c.slots_per_expert = 2;
  RoutingOptions o;
  o.sequence_length = 4;
  std::vector<uint8_t> mask = {1, 1, 0, 1, 1, 1, 1, 1};
  o.token_mask = mask;
  const auto logits = random_logits(8, 6, 9);
  const auto r = route_logits<float>(c, logits.cview(), o);
  ASSERT_EQ(r.plan.num_slots, 6);
  for (int64_t t = 0; t < 8; ++t) {
    double sum = 0;
    for (int64_t j = 0; j < 6; ++j) sum += r.plan.combine[t * 6 + j];
    EXPECT_NEAR(sum, mask[t] ? 1.0 : 0.0, 1e-6);
  }
  for (int64_t s = 0; s < 2; ++s) {
    for (int64_t j = 0; j < 6; ++j) {
      double sum = 0;
      for (int64_t t = s * 4; t < s * 4 + 4; ++t) sum += r.plan.dispatch[t * 6 + j];
      EXPECT_NEAR(sum, 1.0, 1e-6);
    }
  }
  EXPECT_EQ(r.plan.dispatch[2 * 6 + 0], 0.0f);  // padding is never mixed into a slot
}

TEST(RoutingSinkhorn, BalancesACrowdedRouter) {
  // Every token prefers expert 0 a little: plain top-1 collapses, Sinkhorn spreads.
  Matrix<float> logits(16, 4);
  std::mt19937 gen(2);
  std::normal_distribution<float> noise(0.0f, 0.3f);
  for (int64_t t = 0; t < 16; ++t)
    for (int64_t e = 0; e < 4; ++e) logits(t, e) = (e == 0 ? 2.0f : 0.0f) + noise(gen);
  RoutingConfig c = topk_config(4, 1);
  const auto plain = route_logits<float>(c, logits.cview());
  EXPECT_EQ(plain.stats.tokens_per_expert[0], 16);
  c.routing_method = RoutingMethod::kSinkhorn;
  // In evaluation Sinkhorn is not applied: the plain top-k (Megatron).
  EXPECT_EQ(route_logits<float>(c, logits.cview()).plan.token_experts, plain.plan.token_experts);
  c.training = true;
  const auto r = route_logits<float>(c, logits.cview());
  expect_consistent_plan(r.plan);
  for (int64_t n : r.stats.tokens_per_expert) {
    EXPECT_GE(n, 2);
    EXPECT_LE(n, 6);
  }
  // k = 1 combine weight is the sigmoid of the chosen logit (Megatron).
  for (int64_t t = 0; t < 16; ++t) {
    const int32_t e = kept_experts(r.plan, t)[0];
    EXPECT_NEAR(kept_weights(r.plan, t)[0], 1 / (1 + std::exp(-double(logits(t, e)))), 1e-6);
  }
}

// ---------------------------------------------------------------------------------------------
// Noise, random routing, replay, bias update.

TEST(RoutingNoise, SeededTrainingOnly) {
  const auto logits = random_logits(64, 8, 11, 0.5f);
  RoutingConfig c = topk_config(8, 2);
  c.noise_std = 4.0;  // N(0, 0.5²) per logit
  c.seed = 1;
  const auto eval = route_logits<float>(c, logits.cview());
  c.training = true;
  const auto a = route_logits<float>(c, logits.cview());
  const auto b = route_logits<float>(c, logits.cview());
  EXPECT_EQ(a.plan.token_experts, b.plan.token_experts);
  EXPECT_EQ(a.plan.token_weights, b.plan.token_weights);
  EXPECT_NE(a.plan.token_experts, eval.plan.token_experts);
  c.seed = 2;
  EXPECT_NE(route_logits<float>(c, logits.cview()).plan.token_experts, a.plan.token_experts);
  c.gumbel_noise = GumbelNoise::kAll;
  c.noise_std = 0;
  const auto g = route_logits<float>(c, logits.cview());
  EXPECT_NE(g.plan.token_experts, eval.plan.token_experts);
}

TEST(RoutingNoise, GshardRandomRoutingDropsSecondChoicesByTheirGate) {
  const auto logits = random_logits(400, 8, 4, 1.0f);
  RoutingConfig c = topk_config(8, 2);
  c.random_routing = true;
  c.training = true;
  c.renormalize = Renormalize::kNone;
  const auto r = route_logits<float>(c, logits.cview());
  expect_consistent_plan(r.plan);
  // Expected number of dispatched second choices: Σ_t min(1, 2·g2/(g1+g2)).
  double expected = 0;
  int64_t kept_second = 0;
  for (int64_t t = 0; t < 400; ++t) {
    const int64_t i = r.plan.token_offsets[t];
    const double g1 = r.saved.scores(t, r.plan.token_experts[i]);
    const double g2 = r.saved.scores(t, r.plan.token_experts[i + 1]);
    expected += std::min(1.0, 2 * g2 / (g1 + g2));
    kept_second += r.plan.token_kept[i + 1];
    EXPECT_TRUE(r.plan.token_kept[i]);
  }
  EXPECT_NEAR(double(kept_second), expected, 4 * std::sqrt(expected));
  for (const auto& d : r.plan.dropped) EXPECT_EQ(d.reason, DropReason::kRandomRouting);
}

TEST(RoutingReplay, ReplaysEarlierChoicesWithCurrentWeights) {
  RoutingConfig c = topk_config(6, 2);
  const auto first = random_logits(10, 6, 1);
  const auto later = random_logits(10, 6, 2);
  const auto a = route_logits<float>(c, first.cview());
  const RoutingRecord record = record_routing(a.plan);
  RoutingOptions o;
  o.replay = &record;
  const auto b = route_logits<float>(c, later.cview(), o);
  EXPECT_EQ(a.plan.token_experts, b.plan.token_experts);
  const auto fresh = route_logits<float>(c, later.cview());
  EXPECT_NE(fresh.plan.token_experts, b.plan.token_experts);
  // Weights come from the later logits: renormalised softmax over the replayed experts.
  for (int64_t t = 0; t < 10; ++t) {
    const auto e = kept_experts(b.plan, t);
    const double z = std::exp(double(later(t, e[0]))) + std::exp(double(later(t, e[1])));
    EXPECT_NEAR(kept_weights(b.plan, t)[0], std::exp(double(later(t, e[0]))) / z, 1e-6);
  }
}

TEST(RoutingBias, AuxLossFreeUpdateMovesTowardBalance) {
  std::vector<double> bias = {0.0, 0.0, 0.0, 0.0};
  const std::vector<int64_t> load = {10, 2, 4, 4};  // mean 5
  update_expert_bias(bias, load, 0.01);
  EXPECT_EQ(bias, (std::vector<double>{-0.01, 0.01, 0.01, 0.01}));
  const std::vector<int64_t> even = {5, 5, 5, 5};
  update_expert_bias(bias, even, 0.01);
  EXPECT_EQ(bias, (std::vector<double>{-0.01, 0.01, 0.01, 0.01}));
  const std::vector<int64_t> short_load = {1, 2};
  EXPECT_THROW(update_expert_bias(bias, short_load, 0.01), InputError);
}

TEST(RoutingBias, FloatBiasUpdateMovesTowardBalanceInFloat) {
  std::vector<float> bias = {0.1f, 0.3f, -0.7f, 12.5f};
  const std::vector<int64_t> load = {10, 2, 4, 4};  // mean 5
  update_expert_bias(bias, load, 1e-3);
  const float r = 1e-3f;
  EXPECT_EQ(bias, (std::vector<float>{0.1f - r, 0.3f + r, -0.7f + r, 12.5f + r}));
  const std::vector<int64_t> short_load = {1, 2};
  EXPECT_THROW(update_expert_bias(bias, short_load, 1e-3), InputError);
  EXPECT_THROW(update_expert_bias(bias, load, -1.0), InputError);
}

// ---------------------------------------------------------------------------------------------
// Losses at perfect balance and with padding.

// E tokens whose logits are cyclic shifts of one vector: mean probabilities are uniform and
// each expert is chosen exactly k times.
Matrix<float> cyclic_logits(int64_t experts) {
  Matrix<float> m(experts, experts);
  for (int64_t t = 0; t < experts; ++t)
    for (int64_t e = 0; e < experts; ++e) m(t, e) = float((e - t + experts) % experts) * -0.7f;
  return m;
}

TEST(RoutingLoss, LoadBalancingEqualsKOrOneAtPerfectBalance) {
  for (int64_t k : {1, 2, 3}) {
    RoutingConfig c = topk_config(6, k);
    const auto logits = cyclic_logits(6);
    c.aux_loss_scale = AuxLossScale::kK;
    EXPECT_NEAR(route_logits<float>(c, logits.cview()).losses.aux_loss, double(k), 1e-6);
    c.aux_loss_scale = AuxLossScale::kOne;
    EXPECT_NEAR(route_logits<float>(c, logits.cview()).losses.aux_loss, 1.0, 1e-6);
    c.aux_loss_counts = AuxLossCounts::kFirstChoice;
    EXPECT_NEAR(route_logits<float>(c, logits.cview()).losses.aux_loss, 1.0, 1e-6);
    c.scoring_func = ScoringFunc::kSigmoid;
    c.aux_loss_counts = AuxLossCounts::kAllChoices;
    EXPECT_NEAR(route_logits<float>(c, logits.cview()).losses.aux_loss, 1.0, 1e-6);
  }
}

TEST(RoutingLoss, CollapsedRoutingCostsE) {
  // All tokens on expert 0 with probability → 1: E·f_0·P_0 → E (scale one, k = 1).
  Matrix<float> logits(8, 4);
  for (int64_t t = 0; t < 8; ++t) logits(t, 0) = 30.0f;
  RoutingConfig c = topk_config(4, 1);
  c.aux_loss_scale = AuxLossScale::kOne;
  const auto r = route_logits<float>(c, logits.cview());
  EXPECT_NEAR(r.losses.aux_loss, 4.0, 1e-6);
  EXPECT_TRUE(r.stats.collapsed);
  EXPECT_EQ(r.stats.dead_experts, 3);
  EXPECT_NEAR(r.stats.effective_experts, 1.0, 1e-12);
}

TEST(RoutingLoss, ZLossIsMeanSquaredLogSumExp) {
  Matrix<float> logits(2, 3);
  logits.values = {1.0f, 2.0f, 3.0f, -1.0f, 0.0f, 0.5f};
  RoutingConfig c = topk_config(3, 1);
  const auto r = route_logits<float>(c, logits.cview());
  const double l0 = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0));
  const double l1 = std::log(std::exp(-1.0) + std::exp(0.0) + std::exp(0.5));
  EXPECT_NEAR(r.losses.z_loss, (l0 * l0 + l1 * l1) / 2, 1e-5);
}

TEST(RoutingLoss, PaddingIsExcludedFromLossesCountsAndCapacity) {
  const auto logits = random_logits(8, 4, 21);
  RoutingConfig c = topk_config(4, 2);
  c.capacity_factor = 1.0;
  c.router_z_loss_coef = 0.1;
  std::vector<uint8_t> mask = {1, 1, 1, 0, 1, 0, 0, 1};
  RoutingOptions o;
  o.token_mask = mask;
  const auto r = route_logits<float>(c, logits.cview(), o);
  // The same as routing only the real rows.
  Matrix<float> real_rows(5, 4);
  int64_t row = 0;
  for (int64_t t = 0; t < 8; ++t)
    if (mask[t]) std::copy(logits.row(t), logits.row(t) + 4, real_rows.row(row++));
  const auto ref = route_logits<float>(c, real_rows.cview());
  EXPECT_NEAR(r.losses.aux_loss, ref.losses.aux_loss, 1e-6);
  EXPECT_NEAR(r.losses.z_loss, ref.losses.z_loss, 1e-6);
  EXPECT_EQ(r.plan.capacity, ref.plan.capacity);
  EXPECT_EQ(r.stats.tokens_per_expert, ref.stats.tokens_per_expert);
  EXPECT_EQ(r.stats.num_tokens, 5);
  for (int64_t t = 0; t < 8; ++t)
    if (!mask[t]) EXPECT_TRUE(kept_experts(r.plan, t).empty());
}

TEST(RoutingLoss, SequenceScopeAveragesPerSequenceLosses) {
  const auto logits = random_logits(12, 4, 31);
  RoutingConfig c = topk_config(4, 2);
  c.aux_loss_scope = AuxLossScope::kSequence;
  RoutingOptions o;
  o.sequence_length = 4;
  const auto r = route_logits<float>(c, logits.cview(), o);
  c.aux_loss_scope = AuxLossScope::kBatch;
  double sum = 0;
  for (int64_t s = 0; s < 3; ++s) {
    Matrix<float> part(4, 4);
    std::copy(logits.row(s * 4), logits.row(s * 4 + 4), part.values.begin());
    sum += route_logits<float>(c, part.cview()).losses.aux_loss;
  }
  EXPECT_NEAR(r.losses.aux_loss, sum / 3, 1e-6);
}

TEST(RoutingLoss, GlobalScopeAddsEarlierCounts) {
  const auto logits = random_logits(8, 4, 41);
  RoutingConfig c = topk_config(4, 1);
  c.aux_loss_scale = AuxLossScale::kOne;
  const auto local = route_logits<float>(c, logits.cview());
  c.aux_loss_scope = AuxLossScope::kGlobal;
  const std::vector<double> earlier = {8, 0, 0, 0};
  RoutingOptions o;
  o.global_counts = earlier;
  o.global_tokens = 8;
  const auto r = route_logits<float>(c, logits.cview(), o);
  // f_e = (earlier_e + count_e) / 16; P from this call only.
  double expected = 0;
  for (int64_t e = 0; e < 4; ++e) {
    double p = 0;
    for (int64_t t = 0; t < 8; ++t) p += local.saved.scores(t, e) / 8;
    expected += (earlier[e] + local.stats.selected_per_expert[e]) / 16.0 * p;
  }
  EXPECT_NEAR(r.losses.aux_loss, 4 * expected, 1e-6);
}

// ---------------------------------------------------------------------------------------------
// Statistics.

TEST(RoutingStats, EntropyConfidenceAndLabels) {
  Matrix<float> uniform(4, 4);
  RoutingConfig c = topk_config(4, 1);
  const auto u = route_logits<float>(c, uniform.cview());
  EXPECT_NEAR(u.stats.mean_entropy, std::log(4.0), 1e-6);
  EXPECT_NEAR(u.stats.mean_entropy_normalized, 1.0, 1e-6);
  EXPECT_NEAR(u.stats.router_confidence, 0.25, 1e-6);

  // Label determines the expert → normalised mutual information 1.
  Matrix<float> logits(8, 4);
  std::vector<int32_t> labels(8);
  for (int64_t t = 0; t < 8; ++t) {
    labels[t] = int32_t(t % 4) + 10;
    logits(t, t % 4) = 5.0f;
  }
  RoutingOptions o;
  o.labels = labels;
  const auto r = route_logits<float>(c, logits.cview(), o);
  ASSERT_EQ(r.stats.by_label.size(), 4u);
  for (int64_t i = 0; i < 4; ++i) {
    EXPECT_EQ(r.stats.by_label[i].label, 10 + i);
    EXPECT_EQ(r.stats.by_label[i].num_tokens, 2);
    EXPECT_EQ(r.stats.by_label[i].top_expert, i);
    EXPECT_DOUBLE_EQ(r.stats.by_label[i].top_expert_share, 1.0);
  }
  EXPECT_NEAR(r.stats.label_expert_mutual_information, 1.0, 1e-12);
  EXPECT_FALSE(r.stats.collapsed);
  EXPECT_NEAR(r.stats.load_cv, 0.0, 1e-12);
}

// ---------------------------------------------------------------------------------------------
// Determinism across thread counts.

TEST(RoutingDeterminism, BitwiseIdenticalAcrossThreadCounts) {
  std::mt19937 gen(5);
  std::normal_distribution<float> dist;
  Matrix<float> hidden(1024, 16), weight(16, 16);
  for (auto& v : hidden.values) v = dist(gen);
  for (auto& v : weight.values) v = dist(gen);
  for (RoutingMethod method : {RoutingMethod::kTopK, RoutingMethod::kExpertChoice,
                               RoutingMethod::kSinkhorn, RoutingMethod::kDense}) {
    RoutingConfig c = topk_config(16, 4);
    c.routing_method = method;
    c.capacity_factor = 1.0;
    c.training = true;
    c.router_jitter_noise = 0.01;
    c.noise_std = 1.0;
    RouterParams<float> params{weight.cview(), {}, {}};
    RoutingOptions one, two;
    one.num_threads = 1;
    two.num_threads = 2;
    const auto a = route_hidden<float>(c, hidden.cview(), params, one);
    const auto b = route_hidden<float>(c, hidden.cview(), params, two);
    EXPECT_EQ(a.plan.token_experts, b.plan.token_experts);
    EXPECT_EQ(a.plan.token_weights, b.plan.token_weights);
    EXPECT_EQ(a.plan.expert_tokens, b.plan.expert_tokens);
    EXPECT_EQ(a.losses.aux_loss, b.losses.aux_loss);
    EXPECT_EQ(a.losses.z_loss, b.losses.z_loss);
    RoutingGradOutput<float> g;
    g.d_token_weights.assign(a.plan.token_weights.size(), 0.5f);
    g.d_aux_loss = 0.01;
    g.d_z_loss = 0.001;
    const auto da = route_backward<float>(c, a, g);
    const auto db = route_backward<float>(c, b, g);
    EXPECT_EQ(da.values, db.values);
    const auto ga = router_backward<float>(c, a, hidden.cview(), params, da.cview(), 1);
    const auto gb = router_backward<float>(c, b, hidden.cview(), params, db.cview(), 2);
    EXPECT_EQ(ga.d_hidden_states.values, gb.d_hidden_states.values);
    EXPECT_EQ(ga.d_weight.values, gb.d_weight.values);
  }
}

// ---------------------------------------------------------------------------------------------
// Bad input: one test per class; the message names the argument, expected and actual values.

template <typename Fn>
void expect_input_error(Fn&& fn, const std::vector<std::string>& fragments) {
  try {
    fn();
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    for (const auto& f : fragments)
      EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what() << " lacks " << f;
  }
}

TEST(RoutingBias, SelectionBiasTensorGivesTheConfigValuesPlan) {
  // DeepSeek-V3 style: sigmoid, bias, 4 groups of 4 keep 2 by sum of top-2, top-4, ×2.5. Bias
  // values are exact in float, so the tensor and the config value give the same keys.
  RoutingConfig c = routing_config_from_json(
      R"({"preset": "hf-deepseek-v3", "num_experts": 16, "num_experts_per_tok": 4, "n_group": 4,
          "topk_group": 2})");
  const Matrix<float> logits = random_logits(24, 16, 77);
  std::vector<float> bias(16);
  for (int e = 0; e < 16; ++e) bias[e] = 0.0625f * float((e * 7) % 16) - 0.5f;
  c.e_score_correction_bias.assign(bias.begin(), bias.end());
  const auto from_config = route_logits<float>(c, logits.cview());
  RoutingConfig no_bias = c;
  no_bias.e_score_correction_bias.clear();
  RoutingOptions o;
  o.selection_bias = bias;
  const auto from_tensor = route_logits<float>(no_bias, logits.cview(), o);
  EXPECT_EQ(from_tensor.plan.token_experts, from_config.plan.token_experts);
  EXPECT_EQ(from_tensor.plan.token_weights, from_config.plan.token_weights);
  EXPECT_EQ(from_tensor.plan.expert_tokens, from_config.plan.expert_tokens);
  // The bias does change the plan (so the comparison above can fail).
  EXPECT_NE(route_logits<float>(no_bias, logits.cview()).plan.token_experts,
            from_config.plan.token_experts);
  // Given both, the tensor wins over the config value.
  RoutingConfig other = c;
  for (auto& b : other.e_score_correction_bias) b = -b;
  EXPECT_EQ(route_logits<float>(other, logits.cview(), o).plan.token_experts,
            from_config.plan.token_experts);
  // Shape and finiteness.
  const std::vector<float> short_bias(15, 0.0f);
  o.selection_bias = short_bias;
  expect_input_error([&] { route_logits<float>(no_bias, logits.cview(), o); },
                     {"selection_bias length", "16 (num_experts)", "got 15"});
  std::vector<float> nan_bias(16, 0.0f);
  nan_bias[3] = std::nanf("");
  o.selection_bias = nan_bias;
  expect_input_error([&] { route_logits<float>(no_bias, logits.cview(), o); },
                     {"selection_bias[3]", "a finite number", "nan"});
}

TEST(RoutingBadInput, NanAndInfInLogits) {
  RoutingConfig c = topk_config(4, 2);
  Matrix<float> logits(2, 4);
  logits(1, 2) = std::nanf("");
  expect_input_error([&] { route_logits<float>(c, logits.cview()); }, {"logits", "finite", "[1][2]"});
  logits(1, 2) = INFINITY;
  expect_input_error([&] { route_logits<float>(c, logits.cview()); }, {"logits", "inf"});
}

TEST(RoutingBadInput, LogitsThatOverflowAreRejected) {
  // Finite hidden states and router weights whose product overflows float: token 3's logit
  // for expert 1 is 2 · 3e38 + 2 · 3e38 = inf.
  RoutingConfig c = topk_config(2, 1);
  Matrix<float> hidden(4, 2), weight(2, 2);
  hidden.values = {1e-3f, 1e-3f, -1e-3f, 1e-3f, 0.5f, -1e-3f, 2.0f, 2.0f};
  weight.values = {1.0f, 1.0f, 3e38f, 3e38f};
  RouterParams<float> params{weight.cview(), {}, {}};
  try {
    route_hidden<float>(c, hidden.cview(), params);
    ADD_FAILURE() << "expected an InputError";
  } catch (const InputError& e) {
    EXPECT_STREQ(e.what(), "logits[3][1]: expected a finite number, got inf");
  }
  // Finite logits that the temperature pushes past the float range.
  Matrix<float> logits(2, 2);
  logits.values = {1.0f, 0.0f, -3e38f, 2.0f};
  c.temperature = 0.5;
  try {
    route_logits<float>(c, logits.cview());
    ADD_FAILURE() << "expected an InputError";
  } catch (const InputError& e) {
    EXPECT_STREQ(e.what(), "logits[1][0]: expected a finite number, got -inf");
  }
  // Finite logits plus finite logit noise.
  c.temperature = 1.0;
  c.noise_std = 1.0;
  c.training = true;
  logits.values = {1.0f, 3e38f, 0.0f, 2.0f};
  const std::vector<double> noise = {0.0, 3e38, 0.0, 0.0};
  RoutingOptions o;
  o.logit_noise = noise;
  try {
    route_logits<float>(c, logits.cview(), o);
    ADD_FAILURE() << "expected an InputError";
  } catch (const InputError& e) {
    EXPECT_STREQ(e.what(), "logits[0][1]: expected a finite number, got inf");
  }
}

TEST(RoutingBadInput, NanInHiddenStates) {
  RoutingConfig c = topk_config(4, 2);
  Matrix<float> hidden(3, 5), weight(4, 5);
  hidden(2, 4) = -INFINITY;
  RouterParams<float> params{weight.cview(), {}, {}};
  expect_input_error([&] { route_hidden<float>(c, hidden.cview(), params); },
                     {"hidden_states", "finite", "[2][4]"});
}

TEST(RoutingBadInput, ShapeMismatches) {
  RoutingConfig c = topk_config(4, 2);
  Matrix<float> logits(3, 5);
  expect_input_error([&] { route_logits<float>(c, logits.cview()); },
                     {"logits columns", "4", "5"});
  Matrix<float> hidden(3, 5), weight(4, 6);
  RouterParams<float> params{weight.cview(), {}, {}};
  expect_input_error([&] { route_hidden<float>(c, hidden.cview(), params); },
                     {"router_weight columns", "5", "6"});
  Matrix<float> weight_rows(3, 5);
  RouterParams<float> rows{weight_rows.cview(), {}, {}};
  expect_input_error([&] { route_hidden<float>(c, hidden.cview(), rows); },
                     {"router_weight rows", "4", "3"});
  Matrix<float> ok_weight(4, 5);
  std::vector<float> bias(3, 0.0f);
  RouterParams<float> with_bias{ok_weight.cview(), bias, {}};
  expect_input_error([&] { route_hidden<float>(c, hidden.cview(), with_bias); },
                     {"router_bias length", "4", "3"});
  Matrix<float> good(3, 4);
  std::vector<uint8_t> mask(2, 1);
  RoutingOptions o;
  o.token_mask = mask;
  expect_input_error([&] { route_logits<float>(c, good.cview(), o); }, {"token_mask length", "3", "2"});
  RoutingOptions s;
  s.sequence_length = 2;
  expect_input_error([&] { route_logits<float>(c, good.cview(), s); }, {"sequence_length", "3", "2"});
}

TEST(RoutingBadInput, EmptyInput) {
  RoutingConfig c = topk_config(4, 2);
  Matrix<float> empty(0, 4);
  expect_input_error([&] { route_logits<float>(c, empty.cview()); }, {"logits", "at least one row"});
}

TEST(RoutingBadInput, NegativeProbsAndBadReplay) {
  RoutingConfig c = topk_config(4, 2);
  Matrix<float> probs(2, 4);
  probs(0, 1) = -0.1f;
  expect_input_error([&] { route_probs<float>(c, probs.cview()); }, {"probs", "non-negative"});
  Matrix<float> logits(2, 4);
  RoutingRecord record;
  record.num_tokens = 2;
  record.num_experts = 4;
  record.token_offsets = {0, 1, 2};
  record.token_experts = {0, 9};
  RoutingOptions o;
  o.replay = &record;
  expect_input_error([&] { route_logits<float>(c, logits.cview(), o); }, {"replay expert", "9"});
}

TEST(RoutingBadInput, InvalidConfigIsRejectedBeforeRouting) {
  RoutingConfig c = topk_config(4, 5);
  Matrix<float> logits(2, 4);
  try {
    route_logits<float>(c, logits.cview());
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("num_experts_per_tok"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moekit
