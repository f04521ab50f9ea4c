// RoutingConfig: presets, aliases, JSON round trip and every class of rejected input.

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "moekit/config.h"
#include "moekit/error.h"

namespace moekit {
namespace {

using Json = nlohmann::ordered_json;

// Runs `action`, requires a ConfigError, and requires every fragment in its message, so that a
// test pins the field, the expected value and the actual value rather than only the type.
void expect_config_error(const std::function<void()>& action,
                         const std::vector<std::string>& fragments) {
  try {
    action();
  } catch (const ConfigError& error) {
    const std::string message = error.what();
    for (const auto& fragment : fragments) {
      EXPECT_NE(message.find(fragment), std::string::npos)
          << "message \"" << message << "\" lacks \"" << fragment << "\"";
    }
    return;
  } catch (const std::exception& error) {
    FAIL() << "expected ConfigError, got another exception: " << error.what();
  }
  FAIL() << "expected ConfigError, nothing was thrown";
}

void expect_json_error(const std::string& json_text, const std::vector<std::string>& fragments) {
  SCOPED_TRACE(json_text);
  expect_config_error([&] { routing_config_from_json(json_text); }, fragments);
}

void expect_invalid(const RoutingConfig& config, const std::vector<std::string>& fragments) {
  expect_config_error([&] { config.validate(); }, fragments);
}

// A valid config in which every aliased field differs from its default, so that an alias that
// landed on the wrong field would show in the comparison.
RoutingConfig non_default_config() {
  RoutingConfig config;
  config.num_experts = 16;
  config.num_experts_per_tok = 4;
  config.routing_method = RoutingMethod::kSinkhorn;
  config.scoring_func = ScoringFunc::kSigmoid;
  config.softmax_order = SoftmaxOrder::kAfterTopK;
  config.renormalize = Renormalize::kAfterDrop;
  config.renormalize_sigmoid_top1 = false;
  config.routed_scaling_factor = 2.5;
  config.temperature = 0.7;
  config.e_score_correction_bias.assign(16, 0.0);
  for (int e = 0; e < 16; ++e) config.e_score_correction_bias[e] = 0.125 * e - 1.0;
  config.expert_bias_update_rate = 0.01;
  config.n_group = 4;
  config.topk_group = 2;
  config.group_score = GroupScore::kSumTopKPerGroup;
  config.masked_group_fill = MaskedGroupFill::kZero;
  config.capacity_factor = 1.5;
  config.eval_capacity_factor = 2.0;
  config.expert_capacity = 12;
  config.drop_tokens = false;
  config.capacity_formula = CapacityFormula::kTutel;
  config.capacity_rounding = CapacityRounding::kRoundHalfEven;
  config.capacity_times_k = false;
  config.min_capacity = 3;
  config.capacity_multiple = 4;
  config.capacity_scope = Scope::kSequence;
  config.drop_policy = DropPolicy::kProbs;
  config.position_order = PositionOrder::kTokenMajor;
  config.drop_score = DropScore::kLogits;
  config.batch_prioritized_routing = true;
  config.slots_per_expert = 2;
  config.sinkhorn_max_iterations = 50;
  config.sinkhorn_tolerance = 1e-6;
  config.router_jitter_noise = 0.05;
  config.noise_std = 0.5;
  config.gumbel_noise = GumbelNoise::kAll;
  config.noise_in_eval = true;
  config.seed = 18446744073709551615ull;
  config.aux_loss_type = AuxLossType::kImportanceLoad;
  config.aux_loss_scale = AuxLossScale::kOne;
  config.aux_loss_counts = AuxLossCounts::kFirstChoice;
  config.aux_loss_scope = AuxLossScope::kGlobal;
  config.aux_loss_dropped_to_expert0 = true;
  config.router_aux_loss_coef = 0.02;
  config.router_z_loss_coef = 0.003;
  config.importance_loss_weight = 0.25;
  config.load_loss_weight = 0.75;
  config.collapse_threshold = 0.3;
  config.training = true;
  return config;
}

// ---------------------------------------------------------------------------------------------
// Presets.

TEST(ConfigPresets, EveryPresetLoadsAndValidates) {
  const std::vector<std::string> documented = {"hf-switch",
                                               "hf-mixtral",
                                               "hf-qwen2-moe",
                                               "hf-qwen3-moe",
                                               "hf-olmoe",
                                               "hf-deepseek-v3",
                                               "hf-gpt-oss",
                                               "megatron",
                                               "deepspeed-top1",
                                               "deepspeed-top2",
                                               "deepspeed-topk",
                                               "flaxformer-tokens-choose",
                                               "flaxformer-experts-choose",
                                               "vmoe",
                                               "vmoe-experts-choose",
                                               "tutel",
                                               "megablocks"};
  EXPECT_EQ(preset_names(), documented);
  for (const auto& name : preset_names()) {
    SCOPED_TRACE(name);
    const RoutingConfig config = routing_config_from_preset(name);
    EXPECT_EQ(config.preset, name);
    EXPECT_NO_THROW(config.validate());
    const RoutingConfig from_json = routing_config_from_json(Json{{"preset", name}}.dump());
    EXPECT_EQ(routing_config_to_json(from_json), routing_config_to_json(config));
  }
}

TEST(ConfigPresets, EmptyPresetIsTheLibraryDefault) {
  const RoutingConfig defaults;
  EXPECT_EQ(routing_config_to_json(routing_config_from_preset("")),
            routing_config_to_json(defaults));
  EXPECT_EQ(routing_config_to_json(routing_config_from_json("{}")),
            routing_config_to_json(defaults));
}

TEST(ConfigPresets, HfSwitch) {
  const RoutingConfig c = routing_config_from_preset("hf-switch");
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.top_k(), 1);
  EXPECT_EQ(c.renormalize, Renormalize::kNone);
  EXPECT_EQ(c.expert_capacity, 64);
  EXPECT_FALSE(c.capacity_factor.has_value());
  EXPECT_EQ(c.capacity_scope, Scope::kSequence);
  EXPECT_EQ(c.position_order, PositionOrder::kChoiceMajor);
  EXPECT_EQ(c.aux_loss_scale, AuxLossScale::kK);
  EXPECT_EQ(c.aux_loss_scope, AuxLossScope::kSequence);
  EXPECT_FALSE(c.aux_loss_dropped_to_expert0);
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.001);
  EXPECT_DOUBLE_EQ(c.router_z_loss_coef, 0.001);
  EXPECT_DOUBLE_EQ(c.router_jitter_noise, 0.01);
  EXPECT_FALSE(c.noise_in_eval);
}

TEST(ConfigPresets, HfMixtralFamily) {
  const RoutingConfig mixtral = routing_config_from_preset("hf-mixtral");
  EXPECT_EQ(mixtral.top_k(), 2);
  EXPECT_EQ(mixtral.softmax_order, SoftmaxOrder::kBeforeTopK);
  EXPECT_EQ(mixtral.renormalize, Renormalize::kBeforeDrop);
  EXPECT_FALSE(mixtral.capacity_factor || mixtral.expert_capacity);
  EXPECT_DOUBLE_EQ(mixtral.router_aux_loss_coef, 0.001);

  const RoutingConfig qwen2 = routing_config_from_preset("hf-qwen2-moe");
  EXPECT_EQ(qwen2.num_experts, 60);
  EXPECT_EQ(qwen2.top_k(), 4);
  EXPECT_EQ(qwen2.renormalize, Renormalize::kNone);

  const RoutingConfig qwen3 = routing_config_from_preset("hf-qwen3-moe");
  EXPECT_EQ(qwen3.num_experts, 128);
  EXPECT_EQ(qwen3.top_k(), 8);
  EXPECT_EQ(qwen3.renormalize, Renormalize::kBeforeDrop);

  const RoutingConfig olmoe = routing_config_from_preset("hf-olmoe");
  EXPECT_EQ(olmoe.num_experts, 64);
  EXPECT_EQ(olmoe.top_k(), 8);
  EXPECT_EQ(olmoe.renormalize, Renormalize::kNone);
  EXPECT_DOUBLE_EQ(olmoe.router_aux_loss_coef, 0.01);

  const RoutingConfig gpt_oss = routing_config_from_preset("hf-gpt-oss");
  EXPECT_EQ(gpt_oss.num_experts, 32);
  EXPECT_EQ(gpt_oss.top_k(), 4);
  EXPECT_EQ(gpt_oss.softmax_order, SoftmaxOrder::kAfterTopK);
  EXPECT_DOUBLE_EQ(gpt_oss.router_aux_loss_coef, 0.9);
}

TEST(ConfigPresets, HfDeepseekV3) {
  const RoutingConfig c = routing_config_from_preset("hf-deepseek-v3");
  EXPECT_EQ(c.num_experts, 256);
  EXPECT_EQ(c.top_k(), 8);
  EXPECT_EQ(c.scoring_func, ScoringFunc::kSigmoid);
  EXPECT_EQ(c.n_group, 8);
  EXPECT_EQ(c.topk_group, 4);
  EXPECT_EQ(c.group_score, GroupScore::kSumTop2);
  EXPECT_EQ(c.masked_group_fill, MaskedGroupFill::kNegInf);
  EXPECT_EQ(c.renormalize, Renormalize::kBeforeDrop);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 2.5);
  EXPECT_EQ(c.aux_loss_type, AuxLossType::kNone);
  EXPECT_FALSE(c.capacity_factor || c.expert_capacity);
}

TEST(ConfigPresets, Megatron) {
  const RoutingConfig c = routing_config_from_preset("megatron");
  EXPECT_EQ(c.softmax_order, SoftmaxOrder::kAfterTopK);
  EXPECT_FALSE(c.capacity_factor.has_value());
  EXPECT_EQ(c.capacity_rounding, CapacityRounding::kCeil);
  EXPECT_TRUE(c.capacity_times_k);
  EXPECT_EQ(c.min_capacity, 0);
  EXPECT_EQ(c.drop_policy, DropPolicy::kProbs);
  EXPECT_EQ(c.drop_score, DropScore::kWeights);
  EXPECT_EQ(c.aux_loss_scale, AuxLossScale::kOne);
  EXPECT_TRUE(c.noise_in_eval);
  EXPECT_FALSE(c.renormalize_sigmoid_top1);  // sigmoid weights normalised only when k > 1
  // Every other preset keeps the default (HF DeepSeek-V3 divides by the sum for any k).
  for (const auto& name : preset_names())
    if (name != "megatron") EXPECT_TRUE(routing_config_from_preset(name).renormalize_sigmoid_top1) << name;

  // Megatron's own flag names work on top of the preset.
  const RoutingConfig pre = routing_config_from_json(R"({"preset": "megatron",
      "moe_router_pre_softmax": true, "moe_expert_capacity_factor": 1.25})");
  EXPECT_EQ(pre.softmax_order, SoftmaxOrder::kBeforeTopK);
  EXPECT_EQ(pre.capacity_factor, 1.25);
}

TEST(ConfigPresets, DeepSpeed) {
  const RoutingConfig top1 = routing_config_from_preset("deepspeed-top1");
  EXPECT_EQ(top1.top_k(), 1);
  EXPECT_EQ(top1.capacity_factor, 1.0);
  EXPECT_EQ(top1.eval_capacity_factor, 1.0);
  EXPECT_EQ(top1.min_capacity, 8);
  EXPECT_EQ(top1.drop_policy, DropPolicy::kRandom);
  EXPECT_EQ(top1.renormalize, Renormalize::kNone);
  EXPECT_EQ(top1.aux_loss_scale, AuxLossScale::kOne);

  const RoutingConfig top2 = routing_config_from_preset("deepspeed-top2");
  EXPECT_EQ(top2.top_k(), 2);
  EXPECT_EQ(top2.drop_policy, DropPolicy::kPosition);
  EXPECT_EQ(top2.position_order, PositionOrder::kChoiceMajor);
  EXPECT_EQ(top2.renormalize, Renormalize::kAfterDrop);
  EXPECT_EQ(top2.aux_loss_counts, AuxLossCounts::kFirstChoice);
  EXPECT_EQ(top2.gumbel_noise, GumbelNoise::kNone);

  const RoutingConfig topk = routing_config_from_preset("deepspeed-topk");
  EXPECT_EQ(topk.drop_policy, DropPolicy::kProbs);
  EXPECT_EQ(topk.drop_score, DropScore::kProbs);
  EXPECT_EQ(topk.renormalize, Renormalize::kAfterDrop);
}

TEST(ConfigPresets, FlaxformerVmoeTutelMegablocks) {
  const RoutingConfig tokens = routing_config_from_preset("flaxformer-tokens-choose");
  EXPECT_EQ(tokens.capacity_factor, 1.25);
  EXPECT_EQ(tokens.eval_capacity_factor, 2.0);
  EXPECT_EQ(tokens.capacity_rounding, CapacityRounding::kRoundHalfEven);
  EXPECT_FALSE(tokens.capacity_times_k);
  EXPECT_EQ(tokens.min_capacity, 4);
  EXPECT_EQ(tokens.capacity_scope, Scope::kSequence);
  EXPECT_DOUBLE_EQ(tokens.router_aux_loss_coef, 0.01);

  const RoutingConfig experts = routing_config_from_preset("flaxformer-experts-choose");
  EXPECT_EQ(experts.routing_method, RoutingMethod::kExpertChoice);
  EXPECT_EQ(experts.aux_loss_type, AuxLossType::kNone);
  EXPECT_EQ(experts.min_capacity, 4);

  const RoutingConfig vmoe = routing_config_from_preset("vmoe");
  EXPECT_DOUBLE_EQ(vmoe.noise_std, 1.0);
  EXPECT_EQ(vmoe.capacity_multiple, 4);
  EXPECT_EQ(vmoe.min_capacity, 1);
  EXPECT_EQ(vmoe.aux_loss_type, AuxLossType::kImportanceLoad);

  const RoutingConfig vmoe_ec = routing_config_from_preset("vmoe-experts-choose");
  EXPECT_EQ(vmoe_ec.routing_method, RoutingMethod::kExpertChoice);
  EXPECT_EQ(vmoe_ec.capacity_multiple, 4);

  const RoutingConfig tutel = routing_config_from_preset("tutel");
  EXPECT_EQ(tutel.capacity_formula, CapacityFormula::kTutel);
  EXPECT_EQ(tutel.renormalize, Renormalize::kBeforeDrop);
  EXPECT_EQ(tutel.aux_loss_counts, AuxLossCounts::kFirstChoice);

  const RoutingConfig megablocks = routing_config_from_preset("megablocks");
  EXPECT_EQ(megablocks.capacity_rounding, CapacityRounding::kFloor);
  EXPECT_EQ(megablocks.position_order, PositionOrder::kTokenMajor);
  EXPECT_EQ(megablocks.renormalize, Renormalize::kNone);
}

TEST(ConfigPresets, KeyOverridesPresetWhereverItIsWritten) {
  for (const char* text : {R"({"preset": "hf-mixtral", "num_experts_per_tok": 1})",
                           R"({"top_k": 1, "preset": "hf-mixtral"})"}) {
    SCOPED_TRACE(text);
    const RoutingConfig c = routing_config_from_json(text);
    EXPECT_EQ(c.preset, "hf-mixtral");
    EXPECT_EQ(c.top_k(), 1);
    EXPECT_EQ(c.num_experts, 8);                         // kept from the preset
    EXPECT_EQ(c.renormalize, Renormalize::kBeforeDrop);  // kept from the preset
  }
  const RoutingConfig switch_small = routing_config_from_json(
      R"({"preset": "hf-switch", "num_experts": 4, "expert_capacity": 2})");
  EXPECT_EQ(switch_small.num_experts, 4);
  EXPECT_EQ(switch_small.expert_capacity, 2);
  EXPECT_FALSE(switch_small.aux_loss_dropped_to_expert0);
}

TEST(ConfigPresets, NullUnsetsCapacity) {
  const RoutingConfig c = routing_config_from_json(
      R"({"preset": "deepspeed-top2", "capacity_factor": null, "eval_capacity_factor": null})");
  EXPECT_FALSE(c.capacity_factor.has_value());
  EXPECT_FALSE(c.eval_capacity_factor.has_value());
  const RoutingConfig s =
      routing_config_from_json(R"({"preset": "hf-switch", "expert_capacity": null})");
  EXPECT_FALSE(s.expert_capacity.has_value());
}

// ---------------------------------------------------------------------------------------------
// Aliases.

TEST(ConfigAliases, EveryAliasMapsToItsCanonicalKey) {
  const RoutingConfig reference = non_default_config();
  ASSERT_NO_THROW(reference.validate());
  const Json full = Json::parse(routing_config_to_json(reference));

  std::set<std::string> canonical_keys;
  for (const auto& [key, value] : full.items()) canonical_keys.insert(key);

  for (const auto& [alias, canonical] : config_key_aliases()) {
    SCOPED_TRACE(alias + " -> " + canonical);
    ASSERT_TRUE(canonical_keys.count(canonical)) << "alias target is not a canonical key";
    ASSERT_FALSE(canonical_keys.count(alias)) << "alias shadows a canonical key";
    if (alias == "norm_topk_prob" || alias == "moe_router_pre_softmax") continue;  // bools below

    Json with_alias = full;
    const Json value = with_alias[canonical];
    with_alias.erase(canonical);
    with_alias[alias] = value;
    EXPECT_EQ(routing_config_to_json(routing_config_from_json(with_alias.dump())),
              routing_config_to_json(reference));
  }
}

TEST(ConfigAliases, DocumentedAliasesAreAccepted) {
  const std::set<std::pair<std::string, std::string>> expected = {
      {"num_local_experts", "num_experts"},
      {"n_routed_experts", "num_experts"},
      {"num_moe_experts", "num_experts"},
      {"moe_num_experts", "num_experts"},
      {"expert_count", "num_experts"},
      {"top_k", "num_experts_per_tok"},
      {"moe_router_topk", "num_experts_per_tok"},
      {"k", "num_experts_per_tok"},
      {"num_selected_experts", "num_experts_per_tok"},
      {"experts_per_token", "num_experts_per_tok"},
      {"expert_used_count", "num_experts_per_tok"},
      {"router_type", "routing_method"},
      {"moe_router_score_function", "scoring_func"},
      {"score_function", "scoring_func"},
      {"moe_router_pre_softmax", "softmax_order"},
      {"norm_topk_prob", "renormalize"},
      {"moe_router_topk_scaling_factor", "routed_scaling_factor"},
      {"router_temperature", "temperature"},
      {"expert_bias", "e_score_correction_bias"},
      {"moe_router_bias_update_rate", "expert_bias_update_rate"},
      {"moe_router_num_groups", "n_group"},
      {"num_expert_group", "n_group"},
      {"moe_router_group_topk", "topk_group"},
      {"moe_expert_capacity_factor", "capacity_factor"},
      {"capacity_alignment", "capacity_multiple"},
      {"moe_token_drop_policy", "drop_policy"},
      {"use_bpr", "batch_prioritized_routing"},
      {"num_slots_per_expert", "slots_per_expert"},
      {"moe_input_jitter_eps", "router_jitter_noise"},
      {"jitter_eps", "router_jitter_noise"},
      {"gate_noise", "noise_std"},
      {"moe_router_load_balancing_type", "aux_loss_type"},
      {"moe_aux_loss_coeff", "router_aux_loss_coef"},
      {"aux_loss_coef", "router_aux_loss_coef"},
      {"moe_z_loss_coeff", "router_z_loss_coef"},
      {"z_loss_coef", "router_z_loss_coef"},
  };
  const auto& aliases = config_key_aliases();
  const std::set<std::pair<std::string, std::string>> actual(aliases.begin(), aliases.end());
  EXPECT_EQ(actual, expected);
}

TEST(ConfigAliases, BooleanFlagsMapToEnums) {
  EXPECT_EQ(routing_config_from_json(R"({"norm_topk_prob": true})").renormalize,
            Renormalize::kBeforeDrop);
  EXPECT_EQ(routing_config_from_json(R"({"norm_topk_prob": false})").renormalize,
            Renormalize::kNone);
  EXPECT_EQ(routing_config_from_json(R"({"moe_router_pre_softmax": true})").softmax_order,
            SoftmaxOrder::kBeforeTopK);
  EXPECT_EQ(routing_config_from_json(R"({"moe_router_pre_softmax": false})").softmax_order,
            SoftmaxOrder::kAfterTopK);
  expect_json_error(R"({"norm_topk_prob": "yes"})",
                    {"norm_topk_prob", "renormalize", "a boolean", "string \"yes\""});
}

TEST(ConfigAliases, RouterDtypeIsAcceptedAndIgnored) {
  const RoutingConfig defaults;
  for (const char* dtype : {"float32", "fp32", "float64", "fp64"}) {
    const RoutingConfig c =
        routing_config_from_json(std::string(R"({"router_dtype": ")") + dtype + "\"}");
    EXPECT_EQ(routing_config_to_json(c), routing_config_to_json(defaults)) << dtype;
  }
  expect_json_error(R"({"router_dtype": "bfloat16"})",
                    {"router_dtype", "float32, fp32, float64, fp64", "\"bfloat16\""});
}

// ---------------------------------------------------------------------------------------------
// Round trip.

TEST(ConfigJson, RoundTrip) {
  std::vector<RoutingConfig> configs = {RoutingConfig{}, non_default_config()};
  for (const auto& name : preset_names()) configs.push_back(routing_config_from_preset(name));
  for (const auto& config : configs) {
    SCOPED_TRACE(config.preset);
    const std::string text = routing_config_to_json(config);
    const RoutingConfig back = routing_config_from_json(text);
    EXPECT_EQ(routing_config_to_json(back), text);
  }

  const RoutingConfig reference = non_default_config();
  const RoutingConfig back = routing_config_from_json(routing_config_to_json(reference));
  EXPECT_EQ(back.seed, reference.seed);
  EXPECT_EQ(back.e_score_correction_bias, reference.e_score_correction_bias);
  EXPECT_EQ(back.capacity_factor, reference.capacity_factor);
  EXPECT_EQ(back.expert_capacity, reference.expert_capacity);
  EXPECT_EQ(back.sinkhorn_tolerance, reference.sinkhorn_tolerance);
  EXPECT_EQ(back.group_score, reference.group_score);
  EXPECT_EQ(back.aux_loss_scope, reference.aux_loss_scope);
}

TEST(ConfigJson, SerialisesEveryKeyInDocumentedSpelling) {
  const Json out = Json::parse(routing_config_to_json(routing_config_from_preset("hf-switch")));
  EXPECT_EQ(out.at("preset"), "hf-switch");
  EXPECT_EQ(out.at("renormalize"), "none");
  EXPECT_EQ(out.at("capacity_rounding"), "ceil");
  EXPECT_TRUE(out.at("capacity_factor").is_null());
  EXPECT_EQ(out.at("expert_capacity"), 64);
  EXPECT_EQ(out.begin().key(), "preset");
  EXPECT_EQ(out.size(), 53u);  // preset + the 52 other RoutingConfig fields
}

// ---------------------------------------------------------------------------------------------
// Malformed input.

TEST(ConfigJsonErrors, UnknownKeySuggestsTheClosest) {
  expect_json_error(R"({"num_expert": 8})",
                    {"num_expert", "known configuration key", "\"num_experts\"", "unknown key"});
  expect_json_error(R"({"completely_unrelated_setting": 1})",
                    {"completely_unrelated_setting", "known configuration key"});
}

TEST(ConfigJsonErrors, WrongType) {
  expect_json_error(R"({"num_experts": "8"})", {"num_experts", "an integer", "string \"8\""});
  expect_json_error(R"({"num_experts": 8.5})", {"num_experts", "an integer", "number 8.5"});
  expect_json_error(R"({"training": 1})", {"training", "a boolean", "number 1"});
  expect_json_error(R"({"temperature": [1]})", {"temperature", "a finite number", "array [1]"});
  expect_json_error(R"({"capacity_factor": "1.25"})",
                    {"capacity_factor", "a finite number or null", "string \"1.25\""});
  expect_json_error(R"({"expert_capacity": 1.5})",
                    {"expert_capacity", "an integer or null", "number 1.5"});
  expect_json_error(R"({"routing_method": 3})",
                    {"routing_method", "a string", "topk, dense", "number 3"});
  expect_json_error(R"({"e_score_correction_bias": [0.0, "x"]})",
                    {"e_score_correction_bias[1]", "a finite number", "string \"x\""});
  expect_json_error(R"({"e_score_correction_bias": 0.5})",
                    {"e_score_correction_bias", "an array of numbers", "number 0.5"});
  expect_json_error(R"({"seed": -1})", {"seed", "an integer >= 0", "number -1"});
  expect_json_error(R"({"num_experts": null})", {"num_experts", "an integer", "null"});
  expect_json_error(R"({"top_k": true})",
                    {"top_k (alias of num_experts_per_tok)", "an integer", "boolean true"});
  expect_json_error(R"({"preset": 3})", {"preset", "a string", "number 3"});
}

TEST(ConfigJsonErrors, UnknownEnumValue) {
  expect_json_error(
      R"({"routing_method": "topK"})",
      {"routing_method", "one of topk, dense, expert_choice, soft_moe, sinkhorn", "\"topK\""});
  expect_json_error(R"({"capacity_rounding": "nearest"})",
                    {"capacity_rounding", "ceil, round, floor", "\"nearest\""});
}

TEST(ConfigJsonErrors, UnknownPreset) {
  expect_json_error(R"({"preset": "hf-mixtrall"})",
                    {"preset", "hf-switch", "closest: hf-mixtral", "\"hf-mixtrall\""});
  expect_config_error([] { routing_config_from_preset("switch"); },
                      {"preset", "megablocks", "\"switch\""});
}

TEST(ConfigJsonErrors, DuplicatedKeyViaAlias) {
  expect_json_error(R"({"top_k": 2, "num_experts_per_tok": 2})",
                    {"num_experts_per_tok", "one key", "\"num_experts_per_tok\"", "\"top_k\""});
  expect_json_error(R"({"k": 2, "top_k": 2})", {"num_experts_per_tok", "\"k\"", "\"top_k\""});
  expect_json_error(R"({"norm_topk_prob": true, "renormalize": "none"})",
                    {"renormalize", "\"norm_topk_prob\"", "\"renormalize\""});
  expect_json_error(R"({"num_experts": 4, "num_experts": 8})",
                    {"num_experts", "at most once", "repeated"});
}

TEST(ConfigJsonErrors, NotAnObject) {
  expect_json_error("[1, 2]", {"config", "a JSON object", "array"});
  expect_json_error(R"({"num_experts": )", {"config", "a JSON object", "invalid JSON"});
  expect_json_error("", {"config", "invalid JSON"});
}

TEST(ConfigJsonErrors, ParsedConfigIsValidated) {
  expect_json_error(R"({"preset": "hf-mixtral", "num_experts_per_tok": 9})",
                    {"num_experts_per_tok", "<= num_experts (8)", "got 9"});
}

// ---------------------------------------------------------------------------------------------
// validate(): one test per rule.

TEST(ConfigValidate, NumExperts) {
  expect_json_error(R"({"num_experts": 0})", {"num_experts", ">= 1", "got 0"});
}

TEST(ConfigValidate, TopKAtLeastOne) {
  expect_json_error(R"({"num_experts_per_tok": 0})", {"num_experts_per_tok", ">= 1", "got 0"});
}

TEST(ConfigValidate, TopKAtMostNumExperts) {
  expect_json_error(R"({"num_experts": 4, "num_experts_per_tok": 5})",
                    {"num_experts_per_tok", "<= num_experts (4)", "got 5"});
  expect_json_error(R"({"num_experts": 4, "num_experts_per_tok": 5, "routing_method": "sinkhorn"})",
                    {"num_experts_per_tok", "<= num_experts (4)", "got 5"});
  // Dense routing uses every expert; its top_k is ignored.
  EXPECT_NO_THROW(routing_config_from_json(
      R"({"num_experts": 4, "num_experts_per_tok": 5, "routing_method": "dense"})"));
}

TEST(ConfigValidate, CapacityFactor) {
  expect_json_error(R"({"capacity_factor": 0})", {"capacity_factor", "> 0", "got 0"});
  expect_json_error(R"({"capacity_factor": -1.5})", {"capacity_factor", "> 0", "got -1.5"});
  RoutingConfig c;
  c.capacity_factor = std::numeric_limits<double>::infinity();
  expect_invalid(c, {"capacity_factor", "finite", "got inf"});
  c.capacity_factor = std::nan("");
  expect_invalid(c, {"capacity_factor", "finite", "got nan"});
}

TEST(ConfigValidate, EvalCapacityFactor) {
  expect_json_error(R"({"eval_capacity_factor": 0})", {"eval_capacity_factor", "> 0", "got 0"});
}

TEST(ConfigValidate, ExpertCapacity) {
  expect_json_error(R"({"expert_capacity": 0})", {"expert_capacity", ">= 1", "got 0"});
}

TEST(ConfigValidate, MinCapacity) {
  expect_json_error(R"({"min_capacity": -1})", {"min_capacity", ">= 0", "got -1"});
}

TEST(ConfigValidate, CapacityMultiple) {
  expect_json_error(R"({"capacity_multiple": 0})", {"capacity_multiple", ">= 1", "got 0"});
}

TEST(ConfigValidate, NGroupNonNegative) {
  expect_json_error(R"({"n_group": -1})", {"n_group", ">= 0", "got -1"});
}

TEST(ConfigValidate, NGroupDividesNumExperts) {
  expect_json_error(R"({"num_experts": 10, "n_group": 4, "topk_group": 1})",
                    {"n_group", "divisor of num_experts (10)", "got 4"});
}

TEST(ConfigValidate, TopkGroupRange) {
  expect_json_error(R"({"num_experts": 8, "n_group": 4, "topk_group": 0})",
                    {"topk_group", "in [1, n_group (4)]", "got 0"});
  expect_json_error(R"({"num_experts": 8, "n_group": 4, "topk_group": 5})",
                    {"topk_group", "in [1, n_group (4)]", "got 5"});
}

TEST(ConfigValidate, TooFewExpertsInKeptGroups) {
  expect_json_error(
      R"({"num_experts": 16, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 2})",
      {"topk_group", ">= num_experts_per_tok (8)", "got 2 * 2 = 4"});
}

TEST(ConfigValidate, SumTopKPerGroupTakesAnyTopKFromTopkGroupOn) {
  // Megatron's group score sums the top-(k // topk_group) keys: k need not be a multiple of
  // topk_group, but k < topk_group would sum nothing.
  EXPECT_NO_THROW(routing_config_from_json(
      R"({"num_experts": 16, "num_experts_per_tok": 7, "n_group": 4, "topk_group": 2,
          "group_score": "sum_topk_per_group"})"));
  EXPECT_NO_THROW(routing_config_from_json(
      R"({"num_experts": 16, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
          "group_score": "sum_topk_per_group"})"));
  expect_json_error(
      R"({"num_experts": 16, "num_experts_per_tok": 1, "n_group": 4, "topk_group": 2,
          "group_score": "sum_topk_per_group"})",
      {"group_score", "num_experts_per_tok (1)", "less than topk_group (2)",
       "got sum_topk_per_group"});
}

TEST(ConfigValidate, SumTop2NeedsTwoExpertsPerGroup) {
  expect_json_error(
      R"({"num_experts": 8, "num_experts_per_tok": 2, "n_group": 8, "topk_group": 4})",
      {"group_score", "num_experts / n_group = 1", "got sum_top2"});
}

TEST(ConfigValidate, CorrectionBiasSize) {
  expect_json_error(R"({"num_experts": 4, "e_score_correction_bias": [0, 0, 0]})",
                    {"e_score_correction_bias", "4 entries", "got 3 entries"});
  EXPECT_NO_THROW(routing_config_from_json(R"({"num_experts": 4, "expert_bias": [0, 1, 2, 3]})"));
}

TEST(ConfigValidate, CorrectionBiasFinite) {
  RoutingConfig c;
  c.e_score_correction_bias.assign(8, 0.0);
  c.e_score_correction_bias[5] = std::numeric_limits<double>::quiet_NaN();
  expect_invalid(c, {"e_score_correction_bias[5]", "finite", "got nan"});
}

TEST(ConfigValidate, Temperature) {
  expect_json_error(R"({"temperature": 0})", {"temperature", "> 0", "got 0"});
}

TEST(ConfigValidate, RoutedScalingFactor) {
  expect_json_error(R"({"routed_scaling_factor": -2})", {"routed_scaling_factor", "> 0", "got -2"});
}

TEST(ConfigValidate, RouterJitterNoise) {
  expect_json_error(R"({"router_jitter_noise": 1})", {"router_jitter_noise", "[0, 1)", "got 1"});
  expect_json_error(R"({"moe_input_jitter_eps": -0.1})",
                    {"router_jitter_noise", "[0, 1)", "got -0.1"});
}

TEST(ConfigValidate, NoiseStd) {
  expect_json_error(R"({"noise_std": -0.5})", {"noise_std", ">= 0", "got -0.5"});
}

TEST(ConfigValidate, Coefficients) {
  expect_json_error(R"({"router_aux_loss_coef": -0.01})",
                    {"router_aux_loss_coef", ">= 0", "got -0.01"});
  expect_json_error(R"({"router_z_loss_coef": -1})", {"router_z_loss_coef", ">= 0", "got -1"});
  expect_json_error(R"({"importance_loss_weight": -1})",
                    {"importance_loss_weight", ">= 0", "got -1"});
  expect_json_error(R"({"load_loss_weight": -1})", {"load_loss_weight", ">= 0", "got -1"});
  expect_json_error(R"({"expert_bias_update_rate": -1})",
                    {"expert_bias_update_rate", ">= 0", "got -1"});
}

TEST(ConfigValidate, SlotsPerExpert) {
  expect_json_error(R"({"slots_per_expert": 0})", {"slots_per_expert", ">= 1", "got 0"});
}

TEST(ConfigValidate, RandomRoutingNeedsTopTwo) {
  expect_json_error(R"({"random_routing": true, "num_experts_per_tok": 3})",
                    {"random_routing", "num_experts_per_tok = 2", "got num_experts_per_tok 3"});
  EXPECT_NO_THROW(
      routing_config_from_json(R"({"random_routing": true, "num_experts_per_tok": 2})"));
}

TEST(ConfigValidate, GumbelSecondNeedsTwoChoices) {
  expect_json_error(R"({"gumbel_noise": "second", "num_experts_per_tok": 1})",
                    {"gumbel_noise", "num_experts_per_tok >= 2", "got num_experts_per_tok 1"});
}

TEST(ConfigValidate, CollapseThreshold) {
  expect_json_error(R"({"collapse_threshold": 0})", {"collapse_threshold", "(0, 1]", "got 0"});
  expect_json_error(R"({"collapse_threshold": 1.5})", {"collapse_threshold", "(0, 1]", "got 1.5"});
  EXPECT_NO_THROW(routing_config_from_json(R"({"collapse_threshold": 1})"));
}

TEST(ConfigValidate, SinkhornIterations) {
  expect_json_error(R"({"sinkhorn_max_iterations": 0})",
                    {"sinkhorn_max_iterations", ">= 1", "got 0"});
  expect_json_error(R"({"sinkhorn_tolerance": 0})", {"sinkhorn_tolerance", "> 0", "got 0"});
}

TEST(ConfigValidate, NoisyGatingNeedsTopK) {
  expect_json_error(R"({"noisy_gating": true, "routing_method": "expert_choice"})",
                    {"noisy_gating", "routing_method topk", "got routing_method expert_choice"});
  EXPECT_NO_THROW(routing_config_from_json(R"({"noisy_gating": true})"));
}

TEST(ConfigValidate, ExpertChoiceAndSoftMoeNeedSoftmax) {
  expect_json_error(R"({"routing_method": "expert_choice", "scoring_func": "sigmoid"})",
                    {"scoring_func", "softmax for routing_method expert_choice", "got sigmoid"});
  expect_json_error(R"({"routing_method": "soft_moe", "scoring_func": "sigmoid"})",
                    {"scoring_func", "softmax for routing_method soft_moe", "got sigmoid"});
}

}  // namespace
}  // namespace moekit
