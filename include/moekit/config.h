// moekit routing configuration: one validated struct for every routing method and peer.
//
// Keys follow Hugging Face names; other systems' names are accepted as aliases (see
// `config_key_aliases()`). A `preset` fills in the defaults of one peer system; every key given
// next to it overrides the preset. `validate()` checks the whole struct and throws
// `moekit::ConfigError` naming the field, the expected and the actual value.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace moekit {

// Which family of routing algorithm turns scores into a plan.
enum class RoutingMethod {
  kTopK,          // token choice: each token picks its top-k experts (Switch is k = 1)
  kDense,         // dense softmax mixture: every token uses every expert, weights softmax(logits)
  kExpertChoice,  // each expert picks its top-C tokens (Zhou et al.; flaxformer, V-MoE)
  kSoftMoe,       // Soft MoE slots (Puigcerver et al.): per-slot token mixes, per-token slot mixes
  kSinkhorn,      // balanced assignment by Sinkhorn iterations for selection (Megatron)
};

enum class ScoringFunc { kSoftmax, kSigmoid };

// Softmax before top-k (p = softmax over all experts, then select) or after (softmax over the
// k selected logits). After-top-k equals before-top-k followed by renormalisation over the
// selected experts; it is kept as its own option because the float rounding differs.
enum class SoftmaxOrder { kBeforeTopK, kAfterTopK };

// Renormalisation of the kept combine weights: never, over the selected top-k before any
// capacity drop (Mixtral, Tutel), or over the survivors after drops (DeepSpeed top2/topk).
enum class Renormalize { kNone, kBeforeDrop, kAfterDrop };

// Group score for group-limited selection (DeepSeek): sum of the top-2 scores of the group
// (DeepSeek-V3, HF), sum of the top-⌊k / topk_group⌋ scores (Megatron group_limited_topk, any
// k ≥ topk_group), or the maximum (V2).
enum class GroupScore { kSumTop2, kSumTopKPerGroup, kMax };

// Value given to experts of groups that were not kept, before the final top-k. -inf never lets
// them win (DeepSeek reference, Megatron, vLLM); 0.0 is the HF snapshot's behaviour, where a
// masked expert can win when every kept score is negative.
enum class MaskedGroupFill { kNegInf, kZero };

enum class CapacityRounding { kCeil, kRoundHalfEven, kFloor };

// standard: C = rounding(cf · T · (k if capacity_times_k) / E);
// tutel:    C = k · floor(cf · ceil(T / E)).
enum class CapacityFormula { kStandard, kTutel };

// Capacity and capacity-based losses per whole batch or per sequence (consecutive rows of
// `sequence_length` tokens: HF Switch batch rows, flaxformer groups).
enum class Scope { kBatch, kSequence };

// Load-balancing loss over this call's batch, per sequence then averaged (Megatron seq_aux,
// DeepSeek sequence-wise loss), or global (counts accumulated over calls by the caller).
enum class AuxLossScope { kBatch, kSequence, kGlobal };

// Which assignments survive when an expert is over capacity.
enum class DropPolicy {
  kPosition,  // earliest first; see PositionOrder and batch_prioritized_routing
  kProbs,     // per expert, the C highest scores (Megatron 'probs', DeepSpeed topk 'probs')
  kRandom,    // per expert, C chosen by a seeded uniform priority (DeepSpeed RTS)
};

// For DropPolicy::kPosition: choice-major (every first choice before any second choice:
// flaxformer, V-MoE, Tutel, DeepSpeed top2) or token-major (one joint order over
// (token, choice) pairs: DeepSpeed topk 'position', Megablocks bins).
enum class PositionOrder { kChoiceMajor, kTokenMajor };

// Ranking key for DropPolicy::kProbs: the router score q, the raw logit (DeepSpeed topk), or
// the combine weight before drops (Megatron: softmax over the selected logits, or normalised and
// scaled sigmoid).
enum class DropScore { kProbs, kLogits, kWeights };

// What goes into the reported `aux_loss`.
enum class AuxLossType {
  kNone,
  kLoadBalancing,   // E · Σ_e f_e · P_e (Switch/GShard), scaled per `aux_loss_scale`
  kImportanceLoad,  // importance CV² · importance_loss_weight + load CV² · load_loss_weight (V-MoE)
};

// Value of the load-balancing loss at perfect balance: k (HF Mixtral family, HF Switch
// function, flaxformer) or 1 (Megatron, DeepSpeed, Tutel, Megablocks).
enum class AuxLossScale { kK, kOne };

// Which selections count in f_e: all k choices, or only the first choice (DeepSpeed top2,
// Tutel gshard loss).
enum class AuxLossCounts { kAllChoices, kFirstChoice };

// Gumbel noise on the logits for selection only: none, every choice (DeepSpeed top1 'RSample'),
// or only the second choice (DeepSpeed top2 `top2_2nd_expert_sampling`).
enum class GumbelNoise { kNone, kAll, kSecond };

struct RoutingConfig {
  std::string preset;  // empty: no preset; otherwise the name it was built from

  // Shape of the routing problem.
  int64_t num_experts = 8;          // aliases: num_local_experts, n_routed_experts, ...
  int64_t num_experts_per_tok = 2;  // top_k; aliases: top_k, moe_router_topk, k, ...

  RoutingMethod routing_method = RoutingMethod::kTopK;
  ScoringFunc scoring_func = ScoringFunc::kSoftmax;
  SoftmaxOrder softmax_order = SoftmaxOrder::kBeforeTopK;
  Renormalize renormalize = Renormalize::kBeforeDrop;  // `norm_topk_prob` true/false maps here
  // false: with num_experts_per_tok = 1 a sigmoid weight is the raw score, not renormalised
  // (Megatron divides sigmoid scores by their sum only when k > 1; HF DeepSeek-V3 always does).
  bool renormalize_sigmoid_top1 = true;
  double routed_scaling_factor = 1.0;                  // final weights ×= this
  double temperature = 1.0;                            // logits /= temperature

  // Per-expert selection bias (DeepSeek-V3 `e_score_correction_bias`): added to the scores for
  // the choice only, never to the combine weights. Empty: none.
  std::vector<double> e_score_correction_bias;  // [num_experts]
  double expert_bias_update_rate = 1e-3;        // aux-loss-free update: b += rate·sign(mean − load)

  // Group-limited selection (0 groups: off).
  int64_t n_group = 0;
  int64_t topk_group = 0;
  GroupScore group_score = GroupScore::kSumTop2;
  MaskedGroupFill masked_group_fill = MaskedGroupFill::kNegInf;

  // Capacity. No capacity_factor and no expert_capacity: dropless (capacity = the largest load).
  std::optional<double> capacity_factor;       // training
  std::optional<double> eval_capacity_factor;  // evaluation; falls back to capacity_factor
  // Fixed per-expert capacity, used as given: it overrides the factors, and min_capacity and
  // capacity_multiple do not apply to it (V-MoE's dispatcher `capacity`, HF Switch).
  std::optional<int64_t> expert_capacity;
  bool drop_tokens = true;                     // false: dropless even if a factor is set
  CapacityFormula capacity_formula = CapacityFormula::kStandard;
  CapacityRounding capacity_rounding = CapacityRounding::kCeil;
  bool capacity_times_k = true;
  // Applied to a capacity computed from a factor only: C = max(C, min_capacity), then rounded
  // up to a multiple of capacity_multiple (V-MoE 4, Tutel alignment).
  int64_t min_capacity = 0;
  int64_t capacity_multiple = 1;
  Scope capacity_scope = Scope::kBatch;
  DropPolicy drop_policy = DropPolicy::kPosition;
  PositionOrder position_order = PositionOrder::kChoiceMajor;
  DropScore drop_score = DropScore::kProbs;
  bool batch_prioritized_routing = false;  // position order by descending top-1 score first

  // Soft MoE.
  int64_t slots_per_expert = 1;

  // Sinkhorn selection.
  int64_t sinkhorn_max_iterations = 1000;
  double sinkhorn_tolerance = 1e-4;

  // Noise. All of it is drawn from `seed` and applies only when `training` (or noise_in_eval).
  double router_jitter_noise = 0.0;  // x ×= U(1 − ε, 1 + ε) per element (Switch, Mixtral)
  double noise_std = 0.0;            // logits += N(0, (noise_std / E)²) (V-MoE, Tutel)
  bool noisy_gating = false;         // logits += N(0,1)·softplus(x·W_noiseᵀ) (Shazeer et al.)
  GumbelNoise gumbel_noise = GumbelNoise::kNone;
  bool random_routing = false;  // GShard: keep the 2nd choice iff 2·g2/(g1+g2) > U(0,1)
  bool noise_in_eval = false;   // Megatron applies input jitter regardless of training
  uint64_t seed = 0;

  // Losses.
  AuxLossType aux_loss_type = AuxLossType::kLoadBalancing;
  AuxLossScale aux_loss_scale = AuxLossScale::kK;
  AuxLossCounts aux_loss_counts = AuxLossCounts::kAllChoices;
  AuxLossScope aux_loss_scope = AuxLossScope::kBatch;
  bool aux_loss_dropped_to_expert0 = false;  // HF Switch: dropped tokens count as expert 0
  // Padding stays in the denominators of the balance and z losses, with zero probabilities, no
  // selections and zero logits (flaxformer ignore_padding_tokens); default: real tokens only.
  bool padding_in_loss_means = false;
  // f counts the top-k of the balance probabilities recomputed without groups, bias, noise or
  // replay (Megatron), instead of the routing's own selection.
  bool aux_loss_recompute_topk = false;
  double router_aux_loss_coef = 0.0;
  double router_z_loss_coef = 0.0;
  double importance_loss_weight = 1.0;
  double load_loss_weight = 1.0;

  // Statistics.
  double collapse_threshold = 0.5;  // collapsed when effective experts < threshold · E

  bool training = false;

  // Effective top-k of the method (1 for expert choice etc. is not used); see routing.h.
  int64_t top_k() const { return num_experts_per_tok; }

  // Throws ConfigError on the first invalid field.
  void validate() const;
};

// Parses a JSON object (text) into a validated config: `preset` first, then every other key.
// Repeated keys, unknown keys, wrong types and bad values throw ConfigError naming the key.
RoutingConfig routing_config_from_json(const std::string& json_text);

// The same, starting from a preset name ("" for the library defaults), keys applied on top.
RoutingConfig routing_config_from_preset(const std::string& preset);

// The preset names, in documentation order.
const std::vector<std::string>& preset_names();

// Serialises every field with its canonical key (round-trips through routing_config_from_json).
std::string routing_config_to_json(const RoutingConfig& config);

// (alias, canonical key) pairs accepted by routing_config_from_json.
const std::vector<std::pair<std::string, std::string>>& config_key_aliases();

}  // namespace moekit
