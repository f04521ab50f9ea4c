// RoutingConfig: JSON parsing and serialisation, peer presets (read from src/presets/ by
// io/presets.cpp) and validation.
//
// Every canonical key is described once in a field table (key, parser, serialiser), so parsing,
// serialising, unknown-key suggestions and the alias check cannot drift apart.

#include "moekit/config.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string_view>
#include <type_traits>

#include "io/json.h"
#include "io/presets.h"
#include "io/routing_config.h"
#include "moekit/error.h"

namespace moekit {
namespace {

using Json = nlohmann::json;
// Ordered so that the serialised config lists keys in declaration order, as docs/config.md does.
using OrderedJson = nlohmann::ordered_json;

// ---------------------------------------------------------------------------------------------
// Enum spellings (docs/config.md).

using io::EnumName;

constexpr std::array kRoutingMethodNames{
    EnumName<RoutingMethod>{RoutingMethod::kTopK, "topk"},
    EnumName<RoutingMethod>{RoutingMethod::kDense, "dense"},
    EnumName<RoutingMethod>{RoutingMethod::kExpertChoice, "expert_choice"},
    EnumName<RoutingMethod>{RoutingMethod::kSoftMoe, "soft_moe"},
    EnumName<RoutingMethod>{RoutingMethod::kSinkhorn, "sinkhorn"},
};
constexpr std::array kScoringFuncNames{
    EnumName<ScoringFunc>{ScoringFunc::kSoftmax, "softmax"},
    EnumName<ScoringFunc>{ScoringFunc::kSigmoid, "sigmoid"},
};
constexpr std::array kSoftmaxOrderNames{
    EnumName<SoftmaxOrder>{SoftmaxOrder::kBeforeTopK, "before_topk"},
    EnumName<SoftmaxOrder>{SoftmaxOrder::kAfterTopK, "after_topk"},
};
constexpr std::array kRenormalizeNames{
    EnumName<Renormalize>{Renormalize::kNone, "none"},
    EnumName<Renormalize>{Renormalize::kBeforeDrop, "before_drop"},
    EnumName<Renormalize>{Renormalize::kAfterDrop, "after_drop"},
};
constexpr std::array kGroupScoreNames{
    EnumName<GroupScore>{GroupScore::kSumTop2, "sum_top2"},
    EnumName<GroupScore>{GroupScore::kSumTopKPerGroup, "sum_topk_per_group"},
    EnumName<GroupScore>{GroupScore::kMax, "max"},
};
constexpr std::array kMaskedGroupFillNames{
    EnumName<MaskedGroupFill>{MaskedGroupFill::kNegInf, "neg_inf"},
    EnumName<MaskedGroupFill>{MaskedGroupFill::kZero, "zero"},
};
constexpr std::array kCapacityFormulaNames{
    EnumName<CapacityFormula>{CapacityFormula::kStandard, "standard"},
    EnumName<CapacityFormula>{CapacityFormula::kTutel, "tutel"},
};
constexpr std::array kCapacityRoundingNames{
    EnumName<CapacityRounding>{CapacityRounding::kCeil, "ceil"},
    EnumName<CapacityRounding>{CapacityRounding::kRoundHalfEven, "round"},
    EnumName<CapacityRounding>{CapacityRounding::kFloor, "floor"},
};
constexpr std::array kScopeNames{
    EnumName<Scope>{Scope::kBatch, "batch"},
    EnumName<Scope>{Scope::kSequence, "sequence"},
};
constexpr std::array kDropPolicyNames{
    EnumName<DropPolicy>{DropPolicy::kPosition, "position"},
    EnumName<DropPolicy>{DropPolicy::kProbs, "probs"},
    EnumName<DropPolicy>{DropPolicy::kRandom, "random"},
};
constexpr std::array kPositionOrderNames{
    EnumName<PositionOrder>{PositionOrder::kChoiceMajor, "choice_major"},
    EnumName<PositionOrder>{PositionOrder::kTokenMajor, "token_major"},
};
constexpr std::array kDropScoreNames{
    EnumName<DropScore>{DropScore::kProbs, "probs"},
    EnumName<DropScore>{DropScore::kLogits, "logits"},
    EnumName<DropScore>{DropScore::kWeights, "weights"},
};
constexpr std::array kGumbelNoiseNames{
    EnumName<GumbelNoise>{GumbelNoise::kNone, "none"},
    EnumName<GumbelNoise>{GumbelNoise::kAll, "all"},
    EnumName<GumbelNoise>{GumbelNoise::kSecond, "second"},
};
constexpr std::array kAuxLossTypeNames{
    EnumName<AuxLossType>{AuxLossType::kNone, "none"},
    EnumName<AuxLossType>{AuxLossType::kLoadBalancing, "load_balancing"},
    EnumName<AuxLossType>{AuxLossType::kImportanceLoad, "importance_load"},
};
constexpr std::array kAuxLossScaleNames{
    EnumName<AuxLossScale>{AuxLossScale::kK, "k"},
    EnumName<AuxLossScale>{AuxLossScale::kOne, "one"},
};
constexpr std::array kAuxLossCountsNames{
    EnumName<AuxLossCounts>{AuxLossCounts::kAllChoices, "all_choices"},
    EnumName<AuxLossCounts>{AuxLossCounts::kFirstChoice, "first_choice"},
};
constexpr std::array kAuxLossScopeNames{
    EnumName<AuxLossScope>{AuxLossScope::kBatch, "batch"},
    EnumName<AuxLossScope>{AuxLossScope::kSequence, "sequence"},
    EnumName<AuxLossScope>{AuxLossScope::kGlobal, "global"},
};

template <typename E, std::size_t N>
std::string_view enum_name(E value, const std::array<EnumName<E>, N>& names) {
  for (const auto& entry : names) {
    if (entry.value == value) return entry.name;
  }
  return "<invalid>";
}

// ---------------------------------------------------------------------------------------------
// Message helpers.

// The JSON layer's wording, so that validation messages read like parsing ones.
using io::closest_name;
using io::format_number;

std::string quote_text(std::string_view text) { return io::quote(text); }

// ---------------------------------------------------------------------------------------------
// Typed JSON readers over the JSON layer. A value's path is the key as the user wrote it (with
// the canonical name when it was an alias), so the message points at their text.

template <typename E, std::size_t N>
E read_enum(const io::Value& value, const std::array<EnumName<E>, N>& names) {
  return value.enumeration(std::span<const EnumName<E>>(names));
}

template <typename T>
T read_value(const io::Value& value) {
  if constexpr (std::is_same_v<T, int64_t>) {
    return value.integer();
  } else if constexpr (std::is_same_v<T, uint64_t>) {
    return value.unsigned_integer();
  } else if constexpr (std::is_same_v<T, double>) {
    return value.number();
  } else if constexpr (std::is_same_v<T, bool>) {
    return value.boolean();
  } else if constexpr (std::is_same_v<T, std::optional<double>>) {
    if (value.is_null()) return std::nullopt;
    if (!value.json().is_number()) value.fail("a finite number or null", io::describe(value.json()));
    return value.number();
  } else if constexpr (std::is_same_v<T, std::optional<int64_t>>) {
    if (value.is_null()) return std::nullopt;
    if (!value.json().is_number_integer()) {
      value.fail("an integer or null", io::describe(value.json()));
    }
    return value.integer();
  } else if constexpr (std::is_same_v<T, std::vector<double>>) {
    return value.numbers();
  } else {
    static_assert(!sizeof(T), "no JSON reader for this field type");
  }
}

template <typename T>
OrderedJson write_value(const T& value) {
  if constexpr (std::is_same_v<T, std::optional<double>> ||
                std::is_same_v<T, std::optional<int64_t>>) {
    return value ? OrderedJson(*value) : OrderedJson(nullptr);
  } else {
    return OrderedJson(value);
  }
}

// ---------------------------------------------------------------------------------------------
// Field and alias tables.

using ReadFn = std::function<void(RoutingConfig&, const io::Value&)>;
using WriteFn = std::function<OrderedJson(const RoutingConfig&)>;

struct FieldSpec {
  std::string key;
  ReadFn read;
  WriteFn write;
};

template <typename T>
FieldSpec field(std::string key, T RoutingConfig::*member) {
  return {std::move(key),
          [member](RoutingConfig& config, const io::Value& value) {
            config.*member = read_value<T>(value);
          },
          [member](const RoutingConfig& config) { return write_value(config.*member); }};
}

template <typename E, std::size_t N>
FieldSpec enum_field(std::string key, E RoutingConfig::*member,
                     const std::array<EnumName<E>, N>& names) {
  return {std::move(key),
          [member, &names](RoutingConfig& config, const io::Value& value) {
            config.*member = read_enum(value, names);
          },
          [member, &names](const RoutingConfig& config) {
            return OrderedJson(std::string(enum_name(config.*member, names)));
          }};
}

// Every canonical key except `preset`, in declaration order.
const std::vector<FieldSpec>& field_specs() {
  using C = RoutingConfig;
  static const std::vector<FieldSpec> kFields = {
      field("num_experts", &C::num_experts),
      field("num_experts_per_tok", &C::num_experts_per_tok),
      enum_field("routing_method", &C::routing_method, kRoutingMethodNames),
      enum_field("scoring_func", &C::scoring_func, kScoringFuncNames),
      enum_field("softmax_order", &C::softmax_order, kSoftmaxOrderNames),
      enum_field("renormalize", &C::renormalize, kRenormalizeNames),
      field("renormalize_sigmoid_top1", &C::renormalize_sigmoid_top1),
      field("routed_scaling_factor", &C::routed_scaling_factor),
      field("temperature", &C::temperature),
      field("e_score_correction_bias", &C::e_score_correction_bias),
      field("expert_bias_update_rate", &C::expert_bias_update_rate),
      field("n_group", &C::n_group),
      field("topk_group", &C::topk_group),
      enum_field("group_score", &C::group_score, kGroupScoreNames),
      enum_field("masked_group_fill", &C::masked_group_fill, kMaskedGroupFillNames),
      field("capacity_factor", &C::capacity_factor),
      field("eval_capacity_factor", &C::eval_capacity_factor),
      field("expert_capacity", &C::expert_capacity),
      field("drop_tokens", &C::drop_tokens),
      enum_field("capacity_formula", &C::capacity_formula, kCapacityFormulaNames),
      enum_field("capacity_rounding", &C::capacity_rounding, kCapacityRoundingNames),
      field("capacity_times_k", &C::capacity_times_k),
      field("min_capacity", &C::min_capacity),
      field("capacity_multiple", &C::capacity_multiple),
      enum_field("capacity_scope", &C::capacity_scope, kScopeNames),
      enum_field("drop_policy", &C::drop_policy, kDropPolicyNames),
      enum_field("position_order", &C::position_order, kPositionOrderNames),
      enum_field("drop_score", &C::drop_score, kDropScoreNames),
      field("batch_prioritized_routing", &C::batch_prioritized_routing),
      field("slots_per_expert", &C::slots_per_expert),
      field("sinkhorn_max_iterations", &C::sinkhorn_max_iterations),
      field("sinkhorn_tolerance", &C::sinkhorn_tolerance),
      field("router_jitter_noise", &C::router_jitter_noise),
      field("noise_std", &C::noise_std),
      field("noisy_gating", &C::noisy_gating),
      enum_field("gumbel_noise", &C::gumbel_noise, kGumbelNoiseNames),
      field("random_routing", &C::random_routing),
      field("noise_in_eval", &C::noise_in_eval),
      field("seed", &C::seed),
      enum_field("aux_loss_type", &C::aux_loss_type, kAuxLossTypeNames),
      enum_field("aux_loss_scale", &C::aux_loss_scale, kAuxLossScaleNames),
      enum_field("aux_loss_counts", &C::aux_loss_counts, kAuxLossCountsNames),
      enum_field("aux_loss_scope", &C::aux_loss_scope, kAuxLossScopeNames),
      field("aux_loss_dropped_to_expert0", &C::aux_loss_dropped_to_expert0),
      field("padding_in_loss_means", &C::padding_in_loss_means),
      field("aux_loss_recompute_topk", &C::aux_loss_recompute_topk),
      field("router_aux_loss_coef", &C::router_aux_loss_coef),
      field("router_z_loss_coef", &C::router_z_loss_coef),
      field("importance_loss_weight", &C::importance_loss_weight),
      field("load_loss_weight", &C::load_loss_weight),
      field("collapse_threshold", &C::collapse_threshold),
      field("training", &C::training),
  };
  return kFields;
}

struct AliasSpec {
  std::string alias;
  std::string canonical;
  ReadFn read;  // empty: the canonical key's reader (same JSON type and values)
};

const std::vector<AliasSpec>& alias_specs() {
  static const std::vector<AliasSpec> kAliases = {
      {"num_local_experts", "num_experts", {}},
      {"n_routed_experts", "num_experts", {}},
      {"num_moe_experts", "num_experts", {}},
      {"moe_num_experts", "num_experts", {}},
      {"expert_count", "num_experts", {}},
      {"top_k", "num_experts_per_tok", {}},
      {"moe_router_topk", "num_experts_per_tok", {}},
      {"k", "num_experts_per_tok", {}},
      {"num_selected_experts", "num_experts_per_tok", {}},
      {"experts_per_token", "num_experts_per_tok", {}},
      {"expert_used_count", "num_experts_per_tok", {}},
      {"router_type", "routing_method", {}},
      {"moe_router_score_function", "scoring_func", {}},
      {"score_function", "scoring_func", {}},
      // Megatron's flag is a bool; true means softmax over all experts before the top-k.
      {"moe_router_pre_softmax", "softmax_order",
       [](RoutingConfig& config, const io::Value& value) {
         config.softmax_order =
             value.boolean() ? SoftmaxOrder::kBeforeTopK : SoftmaxOrder::kAfterTopK;
       }},
      // HF's flag is a bool; HF renormalises over the selected experts (there are no drops).
      {"norm_topk_prob", "renormalize",
       [](RoutingConfig& config, const io::Value& value) {
         config.renormalize = value.boolean() ? Renormalize::kBeforeDrop : Renormalize::kNone;
       }},
      {"moe_router_topk_scaling_factor", "routed_scaling_factor", {}},
      {"router_temperature", "temperature", {}},
      {"expert_bias", "e_score_correction_bias", {}},
      {"moe_router_bias_update_rate", "expert_bias_update_rate", {}},
      {"moe_router_num_groups", "n_group", {}},
      {"num_expert_group", "n_group", {}},
      {"moe_router_group_topk", "topk_group", {}},
      {"moe_expert_capacity_factor", "capacity_factor", {}},
      {"capacity_alignment", "capacity_multiple", {}},
      {"moe_token_drop_policy", "drop_policy", {}},
      {"use_bpr", "batch_prioritized_routing", {}},
      {"num_slots_per_expert", "slots_per_expert", {}},
      {"moe_input_jitter_eps", "router_jitter_noise", {}},
      {"jitter_eps", "router_jitter_noise", {}},
      {"gate_noise", "noise_std", {}},
      {"moe_router_load_balancing_type", "aux_loss_type", {}},
      {"moe_aux_loss_coeff", "router_aux_loss_coef", {}},
      {"aux_loss_coef", "router_aux_loss_coef", {}},
      {"moe_z_loss_coeff", "router_z_loss_coef", {}},
      {"z_loss_coef", "router_z_loss_coef", {}},
  };
  return kAliases;
}

constexpr std::string_view kPresetKey = "preset";
// Accepted for compatibility with HF Switch and Megatron configs, then ignored: moekit routes in
// fp32 or fp64 whatever the model dtype, so the choice has nothing left to select.
constexpr std::string_view kRouterDtypeKey = "router_dtype";
constexpr std::array kRouterDtypeNames{
    EnumName<int>{0, "float32"}, EnumName<int>{0, "fp32"}, EnumName<int>{0, "float64"},
    EnumName<int>{0, "fp64"}};

// One canonical field and every spelling of it: the canonical key first, then its aliases, each
// with the reader to apply.
struct FieldSpellings {
  std::string canonical;
  std::vector<std::string> keys;
  std::vector<const ReadFn*> readers;
};

const std::vector<FieldSpellings>& field_spellings() {
  static const auto kSpellings = [] {
    std::vector<FieldSpellings> fields;
    std::map<std::string, std::size_t, std::less<>> index;
    for (const auto& spec : field_specs()) {
      index[spec.key] = fields.size();
      fields.push_back({spec.key, {spec.key}, {&spec.read}});
    }
    for (const auto& spec : alias_specs()) {
      FieldSpellings& field = fields[index.at(spec.canonical)];
      field.keys.push_back(spec.alias);
      field.readers.push_back(spec.read ? &spec.read : field.readers.front());
    }
    return fields;
  }();
  return kSpellings;
}

// ---------------------------------------------------------------------------------------------
// Parsing.

void require(bool ok, const std::string& field, const std::string& expected,
             const std::string& actual) {
  if (!ok) throw_config_error(field, expected, actual);
}

void require_at_least(const std::string& field, int64_t value, int64_t minimum) {
  require(value >= minimum, field, ">= " + std::to_string(minimum), std::to_string(value));
}

// Non-finite values fail too: NaN compares false both ways and inf would pass `> 0`.
void require_positive(const std::string& field, double value) {
  require(std::isfinite(value) && value > 0, field, "a finite number > 0", format_number(value));
}

void require_non_negative(const std::string& field, double value) {
  require(std::isfinite(value) && value >= 0, field, "a finite number >= 0", format_number(value));
}

}  // namespace

// ---------------------------------------------------------------------------------------------

void RoutingConfig::validate() const {
  const int64_t k = num_experts_per_tok;
  const bool uses_top_k =
      routing_method == RoutingMethod::kTopK || routing_method == RoutingMethod::kSinkhorn;

  require_at_least("num_experts", num_experts, 1);
  require_at_least("num_experts_per_tok", k, 1);
  if (uses_top_k) {
    require(k <= num_experts, "num_experts_per_tok",
            "<= num_experts (" + std::to_string(num_experts) + ")", std::to_string(k));
  }

  require_positive("routed_scaling_factor", routed_scaling_factor);
  require_positive("temperature", temperature);
  if (!e_score_correction_bias.empty()) {
    require(static_cast<int64_t>(e_score_correction_bias.size()) == num_experts,
            "e_score_correction_bias",
            std::to_string(num_experts) + " entries (num_experts) or none",
            std::to_string(e_score_correction_bias.size()) + " entries");
    for (std::size_t e = 0; e < e_score_correction_bias.size(); ++e) {
      require(std::isfinite(e_score_correction_bias[e]),
              "e_score_correction_bias[" + std::to_string(e) + "]", "a finite number",
              format_number(e_score_correction_bias[e]));
    }
  }
  require_non_negative("expert_bias_update_rate", expert_bias_update_rate);

  require_at_least("n_group", n_group, 0);
  if (n_group > 0) {
    require(num_experts % n_group == 0, "n_group",
            "a divisor of num_experts (" + std::to_string(num_experts) + ")",
            std::to_string(n_group));
    require(topk_group >= 1 && topk_group <= n_group, "topk_group",
            "in [1, n_group (" + std::to_string(n_group) + ")]", std::to_string(topk_group));
    const int64_t experts_per_group = num_experts / n_group;
    if (group_score == GroupScore::kSumTop2) {
      require(experts_per_group >= 2, "group_score",
              "max or sum_topk_per_group when groups hold one expert (num_experts / n_group = " +
                  std::to_string(experts_per_group) + ")",
              "sum_top2");
    }
    if (uses_top_k) {
      const int64_t kept = topk_group * experts_per_group;
      require(
          kept >= k, "topk_group",
          "topk_group * num_experts / n_group >= num_experts_per_tok (" + std::to_string(k) + ")",
          std::to_string(topk_group) + " * " + std::to_string(experts_per_group) + " = " +
              std::to_string(kept));
      if (group_score == GroupScore::kSumTopKPerGroup) {
        // Megatron scores a group by the sum of its top-(k // topk_group) keys (floor
        // division, any k); with k < topk_group that is an empty sum and every group ties.
        require(k >= topk_group, "group_score",
                "sum_top2 or max when num_experts_per_tok (" + std::to_string(k) +
                    ") is less than topk_group (" + std::to_string(topk_group) + ")",
                "sum_topk_per_group");
      }
    }
  }

  if (capacity_factor) require_positive("capacity_factor", *capacity_factor);
  if (eval_capacity_factor) require_positive("eval_capacity_factor", *eval_capacity_factor);
  if (expert_capacity) require_at_least("expert_capacity", *expert_capacity, 1);
  require_at_least("min_capacity", min_capacity, 0);
  require_at_least("capacity_multiple", capacity_multiple, 1);

  require_at_least("slots_per_expert", slots_per_expert, 1);
  require_at_least("sinkhorn_max_iterations", sinkhorn_max_iterations, 1);
  require_positive("sinkhorn_tolerance", sinkhorn_tolerance);

  require(std::isfinite(router_jitter_noise) && router_jitter_noise >= 0 && router_jitter_noise < 1,
          "router_jitter_noise", "a number in [0, 1)", format_number(router_jitter_noise));
  require_non_negative("noise_std", noise_std);
  if (noisy_gating) {
    require(routing_method == RoutingMethod::kTopK, "noisy_gating",
            "routing_method topk (noisy top-k gating)",
            "routing_method " + std::string(enum_name(routing_method, kRoutingMethodNames)));
  }
  if (gumbel_noise == GumbelNoise::kSecond) {
    require(k >= 2, "gumbel_noise", "num_experts_per_tok >= 2 for second",
            "num_experts_per_tok " + std::to_string(k));
  }
  if (random_routing) {
    // GShard's rule keeps or drops the second of exactly two choices.
    require(k == 2, "random_routing", "num_experts_per_tok = 2",
            "num_experts_per_tok " + std::to_string(k));
  }

  if (routing_method == RoutingMethod::kExpertChoice || routing_method == RoutingMethod::kSoftMoe) {
    // Both normalise over tokens or slots with a softmax; sigmoid scores have no such form.
    require(
        scoring_func == ScoringFunc::kSoftmax, "scoring_func",
        "softmax for routing_method " + std::string(enum_name(routing_method, kRoutingMethodNames)),
        "sigmoid");
  }

  require_non_negative("router_aux_loss_coef", router_aux_loss_coef);
  require_non_negative("router_z_loss_coef", router_z_loss_coef);
  require_non_negative("importance_loss_weight", importance_loss_weight);
  require_non_negative("load_loss_weight", load_loss_weight);

  require(std::isfinite(collapse_threshold) && collapse_threshold > 0 && collapse_threshold <= 1,
          "collapse_threshold", "a number in (0, 1]", format_number(collapse_threshold));
}

const std::vector<std::string>& preset_names() {
  static const std::vector<std::string> kNames = [] {
    std::vector<std::string> names;
    for (const io::Preset& preset : io::presets()) names.push_back(preset.name);
    return names;
  }();
  return kNames;
}

RoutingConfig routing_config_from_preset(const std::string& preset) {
  if (preset.empty()) return RoutingConfig{};
  for (const io::Preset& spec : io::presets()) {
    if (spec.name == preset) {
      RoutingConfig config = spec.routing;
      config.preset = preset;
      return config;
    }
  }
  std::string expected = "one of ";
  for (const auto& name : preset_names()) {
    if (&name != &preset_names().front()) expected += ", ";
    expected += name;
  }
  const std::string suggestion = closest_name(preset, preset_names());
  if (!suggestion.empty()) expected += " (closest: " + suggestion + ")";
  throw_config_error(std::string(kPresetKey), expected, quote_text(preset));
}

namespace io {

void read_routing_fields(ObjectReader& reader, RoutingConfig& config) {
  if (const auto dtype = reader.take(kRouterDtypeKey)) {
    dtype->enumeration(std::span<const EnumName<int>>(kRouterDtypeNames));
  }
  for (const FieldSpellings& field : field_spellings()) {
    std::size_t which = 0;
    if (const auto value = reader.take_one_of(field.keys, field.canonical, &which)) {
      (*field.readers[which])(config, *value);
    }
  }
}

RoutingConfig read_routing_config(ObjectReader& reader) {
  RoutingConfig config;
  if (const auto preset = reader.take(kPresetKey)) {
    config = routing_config_from_preset(preset->string());
  }
  read_routing_fields(reader, config);
  return config;
}

OrderedJson routing_fields_json(const RoutingConfig& config) {
  OrderedJson out = OrderedJson::object();
  for (const auto& spec : field_specs()) out[spec.key] = spec.write(config);
  return out;
}

}  // namespace io

RoutingConfig routing_config_from_json(const std::string& json_text) {
  const Json root = io::parse_object(json_text, io::Document::kConfig);
  io::ObjectReader reader(root, io::Document::kConfig);
  RoutingConfig config = io::read_routing_config(reader);
  reader.reject_unknown_keys();
  config.validate();
  return config;
}

std::string routing_config_to_json(const RoutingConfig& config) {
  OrderedJson out;
  out[std::string(kPresetKey)] = config.preset;
  const OrderedJson fields = io::routing_fields_json(config);
  for (auto it = fields.begin(); it != fields.end(); ++it) out[it.key()] = *it;
  return out.dump(2);
}

const std::vector<std::pair<std::string, std::string>>& config_key_aliases() {
  static const std::vector<std::pair<std::string, std::string>> kPairs = [] {
    std::vector<std::pair<std::string, std::string>> pairs;
    for (const auto& spec : alias_specs()) pairs.emplace_back(spec.alias, spec.canonical);
    return pairs;
  }();
  return kPairs;
}

}  // namespace moekit
