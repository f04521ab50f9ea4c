// config.json → MoE layer configuration per model family (model_family.h). Each family below
// follows its transformers 5.x modeling file (the block's __init__ and the decoder layer's
// choice between the MoE block and a dense MLP).
#include "moekit/model_family.h"

#include <algorithm>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string_view>
#include <tuple>

#include "io/json.h"
#include "moekit/error.h"

namespace moekit {

namespace {

using Json = nlohmann::json;
using io::ObjectReader;
using io::Value;

// config.json is read through the strict JSON layer: one parser (nesting bounded, a key
// repeated within an object rejected) and every key named by its path after "config.json "
// ("config.json quantization_config.fmt"). Unlike a moekit config, keys no family reads are not
// an error (a config.json describes the whole model), and null counts as absent (transformers
// writes null for an option left unset).
constexpr const char* kConfigPrefix = "config.json ";

// "<path>: expected <expected>, got <the value as JSON text, or none for null>".
[[noreturn]] void fail(const Value& value, const std::string& expected) {
  value.fail(expected, value.is_null() ? std::string("none") : value.json().dump());
}

[[noreturn]] void fail_absent(const ObjectReader& c, std::string_view key, const std::string& expected) {
  io::fail(io::Document::kConfig, c.path(key), expected, "none");
}

// The value under `key` unless it is absent or null.
std::optional<Value> present(const ObjectReader& c, std::string_view key) {
  std::optional<Value> value = c.peek(key);
  if (value && value->is_null()) return std::nullopt;
  return value;
}

// The value of the first present key among `names`; all present spellings must agree.
std::optional<Value> pick(const ObjectReader& c, std::initializer_list<std::string_view> names) {
  std::optional<Value> found;
  std::string_view found_name;
  for (const std::string_view n : names) {
    std::optional<Value> value = present(c, n);
    if (!value) continue;
    if (found && found->json() != value->json()) {
      value->fail(detail::concat("the value of ", found_name, " (", found->json().dump(), ")"), value->json().dump());
    }
    if (!found) {
      found = value;
      found_name = n;
    }
  }
  return found;
}

// Every count and width read here is at most this (2^24): far above any model's, and small
// enough that products of two (n_shared_experts · moe_intermediate_size) and per-layer tables
// stay in range.
constexpr int64_t kMaxCount = int64_t{1} << 24;

// An integer in [min_value, kMaxCount] under the first present spelling, named by the first.
int64_t integer(const ObjectReader& c, std::initializer_list<std::string_view> names, int64_t min_value) {
  const std::optional<Value> v = pick(c, names);
  if (!v) fail_absent(c, *names.begin(), "an integer");
  const Json& j = v->json();
  // is_number_integer covers unsigned values above INT64_MAX too: read them as unsigned first.
  if (!j.is_number_integer() || (j.is_number_unsigned() && j.get<uint64_t>() > uint64_t(kMaxCount)) ||
      j.get<int64_t>() < min_value || j.get<int64_t>() > kMaxCount) {
    io::fail(io::Document::kConfig, c.path(*names.begin()),
             detail::concat("an integer in [", min_value, ", ", kMaxCount, "]"), j.dump());
  }
  return j.get<int64_t>();
}

int64_t integer_or(const ObjectReader& c, std::initializer_list<std::string_view> names, int64_t fallback,
                   int64_t min_value) {
  return pick(c, names) ? integer(c, names, min_value) : fallback;
}

// Copies a key the layer config reads under the same name, when present.
void copy_key(const ObjectReader& c, Json& out, std::string_view from, const std::string& to) {
  if (const std::optional<Value> value = present(c, from)) out[to] = value->json();
}

std::vector<int64_t> int_list(const ObjectReader& c, std::string_view name) {
  std::vector<int64_t> out;
  const std::optional<Value> list = present(c, name);
  if (!list) return out;
  if (!list->json().is_array()) fail(*list, "an array of layer indices");
  for (const Json& v : list->json()) {
    if (!v.is_number_integer()) fail(*list, "an array of layer indices");
    out.push_back(v.get<int64_t>());
  }
  return out;
}

// quantization_config: the formats the loader dequantizes (quant.h); any other method is an
// error rather than weights read as if they were plain.
void read_quantization(const ObjectReader& c, ModelFamily& f) {
  const std::optional<Value> config = present(c, "quantization_config");
  if (!config) return;
  const Json& q = config->json();
  if (!q.is_object() || !q.contains("quant_method") || !q["quant_method"].is_string()) {
    fail(*config, "an object with a quant_method string");
  }
  const ObjectReader quantization(*config);
  const Value method = *quantization.peek("quant_method");
  f.quant_method = method.string();
  if (f.quant_method == "fp8") {
    if (const auto fmt = quantization.peek("fmt"); fmt && fmt->json() != "e4m3") fail(*fmt, "\"e4m3\"");
    if (const auto block = present(quantization, "weight_block_size")) {
      const Json& b = block->json();
      if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() || !b[1].is_number_integer() ||
          b[0].get<int64_t>() < 1 || b[1].get<int64_t>() < 1) {
        fail(*block, "two positive integers [rows, cols]");
      }
      f.fp8_block_rows = b[0].get<int64_t>();
      f.fp8_block_cols = b[1].get<int64_t>();
    }
  } else if (f.quant_method != "mxfp4") {
    fail(method, "\"fp8\" or \"mxfp4\" (the formats moekit dequantizes)");
  }
}

// The text as a JSON object, whole-text faults named "config.json".
Json parse_config_json(const std::string& text) {
  io::ParsedJson parsed = io::parse_json(text);
  if (parsed.too_deep) {
    throw_config_error("config.json", detail::concat("JSON nested at most ", io::kMaxJsonDepth, " levels"),
                       "deeper nesting");
  }
  if (!parsed.invalid.empty()) throw_config_error("config.json", "well-formed JSON", parsed.invalid);
  if (!parsed.root.is_object()) throw_config_error("config.json", "a JSON object", parsed.root.type_name());
  if (!parsed.repeated_path.empty()) {
    throw_config_error(kConfigPrefix + parsed.repeated_path, "the key at most once", "it repeated");
  }
  return std::move(parsed.root);
}

// Switch Transformers (SwitchTransformersSparseMLP): an encoder and a decoder stack of
// num_layers and num_decoder_layers blocks; block i of a stack with sparse step s is sparse
// when s == 1 or i % s == 1 (transformers' SwitchTransformersStack), else a dense T5 MLP of
// d_ff. Experts are ungated MLPs of d_ff with dense_act_fn; top-1 with a fixed expert_capacity
// applied per sequence (per batch row), as the original model and transformers ≥ 5.23 do.
ModelFamily switch_family(const ObjectReader& c, ModelFamily f, Json out) {
  out["preset"] = "hf-switch";
  const int64_t d_ff = integer(c, {"d_ff"}, 1);
  out["d_ff"] = d_ff;
  out["num_experts"] = integer(c, {"num_experts", "num_local_experts"}, 1);
  out["expert_capacity"] = integer(c, {"expert_capacity"}, 1);
  copy_key(c, out, "router_jitter_noise", "router_jitter_noise");
  copy_key(c, out, "router_z_loss_coef", "router_z_loss_coef");
  copy_key(c, out, "router_bias", "router_bias");
  const std::optional<Value> act = pick(c, {"dense_act_fn"});
  out["hidden_act"] = act ? act->json() : Json("relu");
  f.layer_config_json = out.dump();
  f.layer = moe_layer_config_from_json(f.layer_config_json);
  const int64_t num_encoder = integer(c, {"num_layers"}, 1);
  const int64_t num_decoder = integer_or(c, {"num_decoder_layers"}, num_encoder, 0);
  for (const auto& [stack, count, step_key, mlp_slot] :
       {std::tuple{std::string("encoder"), num_encoder, std::string("encoder_sparse_step"), 1},
        std::tuple{std::string("decoder"), num_decoder, std::string("decoder_sparse_step"), 2}}) {
    const int64_t step = integer_or(c, {step_key}, 1, 0);
    for (int64_t i = 0; i < count; ++i) {
      ModelLayer l;
      l.stack = stack;
      l.index = i;
      l.name = stack == "encoder" ? std::to_string(i) : detail::concat("decoder.", i);
      l.prefix = detail::concat(stack, ".block.", i, ".layer.", mlp_slot, ".mlp");
      const bool sparse = step > 0 && (step == 1 || i % step == 1);
      if (!sparse) {
        l.reason = step == 0 ? step_key + " = 0" : detail::concat("block % ", step_key, " (", step, ") != 1");
        l.dense_d_ff = d_ff;
      }
      l.is_moe = sparse;
      f.layers.push_back(l);
    }
  }
  return f;
}

}  // namespace

const std::vector<std::string>& model_family_names() {
  static const std::vector<std::string> names = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3",
                                                 "gpt_oss", "switch_transformers"};
  return names;
}

const ModelLayer& find_model_layer(const ModelFamily& family, const std::string& name) {
  std::string wanted = name;
  if (family.model_type == "switch_transformers" && wanted.rfind("encoder.", 0) == 0) wanted = wanted.substr(8);
  for (const ModelLayer& l : family.layers) {
    if (l.name == wanted) return l;
  }
  std::string valid;
  if (family.model_type == "switch_transformers") {
    int64_t enc = 0, dec = 0;
    for (const ModelLayer& l : family.layers) (l.stack == "encoder" ? enc : dec) += 1;
    valid = detail::concat("an encoder block 0..", enc - 1, " (\"N\" or \"encoder.N\") or \"decoder.N\" with N in 0..",
                           dec - 1);
  } else {
    valid = detail::concat("a layer index 0..", static_cast<int64_t>(family.layers.size()) - 1);
  }
  throw_input_error("layer", valid, "\"" + name + "\"");
}

ModelFamily model_family_from_config(const std::string& config_json) {
  const Json root = parse_config_json(config_json);
  const ObjectReader c(root, io::Document::kConfig, kConfigPrefix);
  const std::optional<Value> model_type = c.peek("model_type");
  if (!model_type) fail_absent(c, "model_type", "a string");
  if (!model_type->json().is_string()) fail(*model_type, "a string");
  ModelFamily f;
  f.model_type = model_type->string();
  const std::string& t = f.model_type;
  Json out = Json::object();
  const int64_t d_model = integer(c, {"hidden_size", "d_model"}, 1);
  const int64_t num_layers = integer(c, {"num_hidden_layers", "num_layers"}, 1);
  out["d_model"] = d_model;
  if (t != "gpt_oss") copy_key(c, out, "hidden_act", "hidden_act");
  read_quantization(c, f);
  copy_key(c, out, "router_aux_loss_coef", "router_aux_loss_coef");
  copy_key(c, out, "num_experts_per_tok", "num_experts_per_tok");
  // Dense layers: index → reason (empty: MoE).
  std::vector<std::string> dense(static_cast<size_t>(num_layers));
  int64_t dense_d_ff = integer_or(c, {"intermediate_size"}, 0, 1);

  if (t == "mixtral") {
    // MixtralSparseMoeBlock in every layer; intermediate_size is the expert width.
    out["preset"] = "hf-mixtral";
    out["d_ff"] = integer(c, {"intermediate_size"}, 1);
    out["num_experts"] = integer(c, {"num_local_experts", "num_experts"}, 1);
    copy_key(c, out, "router_jitter_noise", "router_jitter_noise");
    dense_d_ff = 0;
  } else if (t == "qwen2_moe" || t == "qwen3_moe") {
    // Qwen2/3MoeSparseMoeBlock where layer_idx ∉ mlp_only_layers and (layer_idx + 1) %
    // decoder_sparse_step == 0, else a dense MLP of intermediate_size; the expert width is
    // moe_intermediate_size. Qwen2-MoE adds one shared expert behind a sigmoid gate.
    out["preset"] = t == "qwen2_moe" ? "hf-qwen2-moe" : "hf-qwen3-moe";
    out["d_ff"] = integer(c, {"moe_intermediate_size"}, 1);
    const int64_t experts = integer(c, {"num_experts", "num_local_experts"}, 0);
    out["num_experts"] = experts;
    copy_key(c, out, "norm_topk_prob", "norm_topk_prob");
    if (t == "qwen2_moe") {
      const int64_t shared = integer(c, {"shared_expert_intermediate_size"}, 1);
      out["num_shared_experts"] = 1;
      out["shared_d_ff"] = shared;
      out["shared_expert_gate"] = true;
    }
    const int64_t step = integer_or(c, {"decoder_sparse_step"}, 1, 1);
    std::set<int64_t> mlp_only;
    for (int64_t i : int_list(c, "mlp_only_layers")) mlp_only.insert(i);
    for (int64_t i = 0; i < num_layers; ++i) {
      if (mlp_only.count(i)) dense[static_cast<size_t>(i)] = "in mlp_only_layers";
      else if (experts == 0) dense[static_cast<size_t>(i)] = "num_experts = 0";
      else if ((i + 1) % step != 0) dense[static_cast<size_t>(i)] = detail::concat("(layer + 1) % decoder_sparse_step (", step, ") != 0");
    }
    if (experts == 0) out["num_experts"] = 1;  // no MoE layer: any valid layer config
  } else if (t == "olmoe") {
    // OlmoeSparseMoeBlock in every layer; intermediate_size is the expert width.
    out["preset"] = "hf-olmoe";
    out["d_ff"] = integer(c, {"intermediate_size"}, 1);
    out["num_experts"] = integer(c, {"num_experts", "num_local_experts"}, 1);
    copy_key(c, out, "norm_topk_prob", "norm_topk_prob");
    dense_d_ff = 0;
  } else if (t == "deepseek_v3") {
    // DeepseekV3MoE for layer_idx >= first_k_dense_replace, else a dense MLP of
    // intermediate_size; experts of moe_intermediate_size; n_shared_experts MLPs as one of their
    // summed width; sigmoid scores with the e_score_correction_bias tensor for selection.
    out["preset"] = "hf-deepseek-v3";
    const int64_t f_moe = integer(c, {"moe_intermediate_size"}, 1);
    out["d_ff"] = f_moe;
    out["num_experts"] = integer(c, {"n_routed_experts", "num_experts"}, 1);
    copy_key(c, out, "n_group", "n_group");
    copy_key(c, out, "topk_group", "topk_group");
    copy_key(c, out, "routed_scaling_factor", "routed_scaling_factor");
    copy_key(c, out, "norm_topk_prob", "norm_topk_prob");
    const int64_t shared = integer_or(c, {"n_shared_experts"}, 0, 0);
    if (shared > 0) {
      out["num_shared_experts"] = shared;
      out["shared_d_ff"] = shared * f_moe;
    }
    out["selection_bias"] = true;
    const int64_t first_dense = integer_or(c, {"first_k_dense_replace"}, 0, 0);
    for (int64_t i = 0; i < std::min(first_dense, num_layers); ++i)
      dense[static_cast<size_t>(i)] = detail::concat("first_k_dense_replace = ", first_dense);
  } else if (t == "gpt_oss") {
    // GptOssMLP in every layer: router with a bias, top-k of the logits then softmax over the k,
    // experts with biases and the clamped SwiGLU (transformers' GptOssExperts: limit =
    // swiglu_limit, alpha = 1.702 fixed in the code, out = (up + 1) · gate · σ(alpha · gate)).
    // Its hidden_act "silu" does not describe that activation and is not read.
    out["preset"] = "hf-gpt-oss";
    out["d_ff"] = integer(c, {"intermediate_size"}, 1);
    out["num_experts"] = integer(c, {"num_local_experts", "num_experts"}, 1);
    out["activation"] = "swiglu_clamped";
    const std::optional<Value> limit = present(c, "swiglu_limit");
    out["clamp_limit"] = limit ? limit->json() : Json(7.0);
    out["clamp_alpha"] = 1.702;
    out["router_bias"] = true;
    out["expert_bias"] = true;
    dense_d_ff = 0;
  } else if (t == "switch_transformers") {
    return switch_family(c, std::move(f), std::move(out));
  } else {
    std::string names;
    for (const std::string& n : model_family_names()) names += (names.empty() ? "" : ", ") + n;
    throw_config_error("config.json model_type", "one of " + names, "\"" + t + "\"");
  }
  f.layer_config_json = out.dump();
  f.layer = moe_layer_config_from_json(f.layer_config_json);
  for (int64_t i = 0; i < num_layers; ++i) {
    ModelLayer l;
    l.name = std::to_string(i);
    l.index = i;
    l.prefix = detail::concat("model.layers.", i, ".mlp");
    l.reason = dense[static_cast<size_t>(i)];
    l.is_moe = l.reason.empty();
    l.dense_d_ff = l.is_moe ? 0 : dense_d_ff;
    f.layers.push_back(l);
  }
  return f;
}

}  // namespace moekit
