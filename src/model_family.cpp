// config.json → MoE layer configuration per model family (model_family.h). Each family below
// follows its transformers 5.x modeling file (the block's __init__ and the decoder layer's
// choice between the MoE block and a dense MLP).
#include "moekit/model_family.h"

#include <nlohmann/json.hpp>
#include <algorithm>
#include <set>

#include "moekit/error.h"

namespace moekit {

namespace {

using Json = nlohmann::json;

[[noreturn]] void fail(const std::string& key, const std::string& expected, const Json& actual) {
  throw_config_error("config.json " + key, expected, actual.is_null() ? std::string("none") : actual.dump());
}

// The value of the first present key among `names`; all present spellings must agree.
const Json* pick(const Json& c, const std::vector<std::string>& names) {
  const Json* found = nullptr;
  std::string found_name;
  for (const std::string& n : names) {
    if (!c.contains(n) || c[n].is_null()) continue;
    if (found != nullptr && *found != c[n]) {
      throw_config_error("config.json " + n, detail::concat("the value of ", found_name, " (", found->dump(), ")"),
                         c[n].dump());
    }
    if (found == nullptr) {
      found = &c[n];
      found_name = n;
    }
  }
  return found;
}

int64_t integer(const Json& c, const std::vector<std::string>& names, int64_t min_value) {
  const Json* v = pick(c, names);
  if (v == nullptr) fail(names.front(), "an integer", Json());
  if (!v->is_number_integer() || v->get<int64_t>() < min_value) fail(names.front(), detail::concat("an integer >= ", min_value), *v);
  return v->get<int64_t>();
}

int64_t integer_or(const Json& c, const std::vector<std::string>& names, int64_t fallback, int64_t min_value) {
  return pick(c, names) == nullptr ? fallback : integer(c, names, min_value);
}

// Copies a key the layer config reads under the same name, when present.
void copy_key(const Json& c, Json& out, const std::string& from, const std::string& to) {
  if (c.contains(from) && !c[from].is_null()) out[to] = c[from];
}

std::vector<int64_t> int_list(const Json& c, const std::string& name) {
  std::vector<int64_t> out;
  if (!c.contains(name) || c[name].is_null()) return out;
  if (!c[name].is_array()) fail(name, "an array of layer indices", c[name]);
  for (const Json& v : c[name]) {
    if (!v.is_number_integer()) fail(name, "an array of layer indices", c[name]);
    out.push_back(v.get<int64_t>());
  }
  return out;
}

}  // namespace

const std::vector<std::string>& model_family_names() {
  static const std::vector<std::string> names = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"};
  return names;
}

ModelFamily model_family_from_config(const std::string& config_json) {
  Json c;
  try {
    c = Json::parse(config_json);
  } catch (const Json::exception& e) {
    throw_config_error("config.json", "well-formed JSON", e.what());
  }
  if (!c.is_object()) throw_config_error("config.json", "a JSON object", c.type_name());
  if (!c.contains("model_type") || !c["model_type"].is_string()) fail("model_type", "a string", c.value("model_type", Json()));
  ModelFamily f;
  f.model_type = c["model_type"].get<std::string>();
  const std::string& t = f.model_type;
  Json out = Json::object();
  const int64_t d_model = integer(c, {"hidden_size"}, 1);
  const int64_t num_layers = integer(c, {"num_hidden_layers"}, 1);
  out["d_model"] = d_model;
  copy_key(c, out, "hidden_act", "hidden_act");
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
  } else {
    std::string names;
    for (const std::string& n : model_family_names()) names += (names.empty() ? "" : ", ") + n;
    throw_config_error("config.json model_type", "one of " + names, "\"" + t + "\"");
  }
  f.layer_config_json = out.dump();
  f.layer = moe_layer_config_from_json(f.layer_config_json);
  for (int64_t i = 0; i < num_layers; ++i) {
    ModelLayer l;
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
