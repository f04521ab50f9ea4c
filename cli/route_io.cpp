// `moekit route` documents: parse INPUT, route, optionally run the backward, write OUT.
#include "route_io.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <set>

#include "moekit/config.h"
#include "moekit/error.h"
#include "moekit/routing.h"

namespace moekit::cli {
namespace {

using nlohmann::json;

json parse_document(const std::string& text, const char* what) {
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    throw InputError(detail::concat(what, ": expected valid JSON, got a parse error: ", e.what()));
  }
}

const char* type_name(const json& j) { return j.type_name(); }

double number_at(const json& j, const std::string& field) {
  if (!j.is_number()) throw_input_error(field, "a number", type_name(j));
  return j.get<double>();
}

int64_t integer_at(const json& j, const std::string& field) {
  if (!j.is_number_integer()) throw_input_error(field, "an integer", type_name(j));
  return j.get<int64_t>();
}

// A [rows][cols] array of numbers; non-finite values cannot appear in JSON numbers, but null
// (how some writers spell NaN) is rejected with its position.
template <typename Real>
Matrix<Real> matrix_at(const json& j, const std::string& field) {
  if (!j.is_array() || j.empty()) throw_input_error(field, "a non-empty array of rows", type_name(j));
  const int64_t rows = static_cast<int64_t>(j.size());
  if (!j[0].is_array() || j[0].empty())
    throw_input_error(field + "[0]", "a non-empty array of numbers", type_name(j[0]));
  const int64_t cols = static_cast<int64_t>(j[0].size());
  Matrix<Real> m(rows, cols);
  for (int64_t r = 0; r < rows; ++r) {
    const json& row = j[r];
    if (!row.is_array()) throw_input_error(detail::concat(field, "[", r, "]"), "an array", type_name(row));
    if (static_cast<int64_t>(row.size()) != cols)
      throw_input_error(detail::concat(field, "[", r, "] length"), cols, row.size());
    for (int64_t c = 0; c < cols; ++c) {
      if (!row[c].is_number())
        throw_input_error(detail::concat(field, "[", r, "][", c, "]"), "a finite number",
                          row[c].dump());
      m(r, c) = static_cast<Real>(row[c].get<double>());
    }
  }
  return m;
}

template <typename T>
std::vector<T> vector_at(const json& j, const std::string& field) {
  if (!j.is_array()) throw_input_error(field, "an array", type_name(j));
  std::vector<T> v;
  for (size_t i = 0; i < j.size(); ++i) {
    if (!j[i].is_number())
      throw_input_error(detail::concat(field, "[", i, "]"), "a number", j[i].dump());
    if constexpr (std::is_integral_v<T>) {
      if (!j[i].is_number_integer())
        throw_input_error(detail::concat(field, "[", i, "]"), "an integer", j[i].dump());
      v.push_back(static_cast<T>(j[i].get<int64_t>()));
    } else {
      v.push_back(static_cast<T>(j[i].get<double>()));
    }
  }
  return v;
}

template <typename Real>
json matrix_json(const Matrix<Real>& m) {
  json out = json::array();
  for (int64_t r = 0; r < m.rows; ++r) {
    json row = json::array();
    for (int64_t c = 0; c < m.cols; ++c) row.push_back(double(m(r, c)));
    out.push_back(std::move(row));
  }
  return out;
}

json stats_json(const RoutingStats& s) {
  json by_label = json::array();
  for (const LabelStats& l : s.by_label) {
    by_label.push_back({{"label", l.label},
                        {"num_tokens", l.num_tokens},
                        {"tokens_per_expert", l.tokens_per_expert},
                        {"mean_entropy", l.mean_entropy},
                        {"load_entropy_normalized", l.load_entropy_normalized},
                        {"top_expert", l.top_expert},
                        {"top_expert_share", l.top_expert_share}});
  }
  return {{"num_tokens", s.num_tokens},
          {"num_selections", s.num_selections},
          {"num_kept", s.num_kept},
          {"num_dropped", s.num_dropped},
          {"dropped_fraction", s.dropped_fraction},
          {"tokens_per_expert", s.tokens_per_expert},
          {"selected_per_expert", s.selected_per_expert},
          {"mean_entropy", s.mean_entropy},
          {"mean_entropy_normalized", s.mean_entropy_normalized},
          {"max_load", s.max_load},
          {"mean_load", s.mean_load},
          {"max_over_mean_load", s.max_over_mean_load},
          {"load_cv", s.load_cv},
          {"router_confidence", s.router_confidence},
          {"mean_combine_weight", s.mean_combine_weight},
          {"dead_experts", s.dead_experts},
          {"effective_experts", s.effective_experts},
          {"collapsed", s.collapsed},
          {"by_label", by_label},
          {"label_expert_mutual_information", s.label_expert_mutual_information}};
}

const std::set<std::string>& input_keys() {
  static const std::set<std::string> keys = {
      "logits", "probs", "hidden_states", "router_weight", "router_bias", "noise_weight",
      "token_mask", "sequence_length", "labels", "replay", "global_counts", "global_tokens",
      "num_threads", "dtype", "logit_noise", "d_weights", "d_aux_loss", "d_z_loss", "d_dispatch", "d_combine"};
  return keys;
}

template <typename Real>
json route_typed(const RoutingConfig& config, const json& in) {
  RoutingOptions options;
  std::vector<uint8_t> mask;
  std::vector<int32_t> labels;
  std::vector<double> global_counts;
  RoutingRecord replay;
  if (in.contains("token_mask")) {
    for (int64_t v : vector_at<int64_t>(in["token_mask"], "token_mask")) {
      if (v != 0 && v != 1) throw_input_error("token_mask", "values 0 or 1", v);
      mask.push_back(static_cast<uint8_t>(v));
    }
    options.token_mask = mask;
  }
  if (in.contains("sequence_length")) options.sequence_length = integer_at(in["sequence_length"], "sequence_length");
  if (in.contains("labels")) {
    labels = vector_at<int32_t>(in["labels"], "labels");
    options.labels = labels;
  }
  if (in.contains("global_counts")) {
    global_counts = vector_at<double>(in["global_counts"], "global_counts");
    options.global_counts = global_counts;
  }
  std::vector<double> logit_noise;
  if (in.contains("logit_noise")) {
    const Matrix<double> m = matrix_at<double>(in["logit_noise"], "logit_noise");
    logit_noise = m.values;
    options.logit_noise = logit_noise;
  }
  if (in.contains("global_tokens")) options.global_tokens = integer_at(in["global_tokens"], "global_tokens");
  if (in.contains("num_threads")) {
    const int64_t threads = integer_at(in["num_threads"], "num_threads");
    if (threads < 1) throw_input_error("num_threads", ">= 1", threads);
    options.num_threads = static_cast<int>(threads);
  }

  const int sources = int(in.contains("logits")) + int(in.contains("probs")) + int(in.contains("hidden_states"));
  if (sources != 1) {
    throw_input_error("input", "exactly one of logits, probs, hidden_states",
                      detail::concat(sources, " of them"));
  }
  if (in.contains("replay")) {
    const json& r = in["replay"];
    if (!r.is_array()) throw_input_error("replay", "an array of expert lists per token", type_name(r));
    replay.num_experts = config.num_experts;
    replay.num_tokens = static_cast<int64_t>(r.size());
    replay.token_offsets.push_back(0);
    for (size_t t = 0; t < r.size(); ++t) {
      for (int32_t e : vector_at<int32_t>(r[t], detail::concat("replay[", t, "]")))
        replay.token_experts.push_back(e);
      replay.token_offsets.push_back(static_cast<int64_t>(replay.token_experts.size()));
    }
    options.replay = &replay;
  }

  RoutingResult<Real> result;
  Matrix<Real> hidden, weight, noise_weight;
  std::vector<Real> bias;
  RouterParams<Real> params;
  const bool from_hidden = in.contains("hidden_states");
  if (in.contains("logits")) {
    Matrix<Real> logits = matrix_at<Real>(in["logits"], "logits");
    result = route_logits<Real>(config, logits.cview(), options);
  } else if (in.contains("probs")) {
    Matrix<Real> probs = matrix_at<Real>(in["probs"], "probs");
    result = route_probs<Real>(config, probs.cview(), options);
  } else {
    hidden = matrix_at<Real>(in["hidden_states"], "hidden_states");
    if (!in.contains("router_weight"))
      throw_input_error("router_weight", "an [experts][d_model] array with hidden_states", "missing");
    weight = matrix_at<Real>(in["router_weight"], "router_weight");
    params.weight = weight.cview();
    if (in.contains("router_bias")) {
      bias = vector_at<Real>(in["router_bias"], "router_bias");
      params.bias = bias;
    }
    if (in.contains("noise_weight")) {
      noise_weight = matrix_at<Real>(in["noise_weight"], "noise_weight");
      params.noise_weight = noise_weight.cview();
    }
    result = route_hidden<Real>(config, hidden.cview(), params, options);
  }
  if (!from_hidden && (in.contains("router_weight") || in.contains("router_bias")))
    throw_input_error("router_weight", "only with hidden_states", "given with logits or probs");

  const BasicRoutingPlan<Real>& p = result.plan;
  json out;
  json experts = json::array(), weights = json::array(), selected = json::array();
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    json te = json::array(), tw = json::array(), ts = json::array();
    for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i) {
      ts.push_back(p.token_experts[i]);
      if (!p.token_kept[i]) continue;
      te.push_back(p.token_experts[i]);
      tw.push_back(double(p.token_weights[i]));
    }
    experts.push_back(std::move(te));
    weights.push_back(std::move(tw));
    selected.push_back(std::move(ts));
  }
  json dropped = json::array(), reasons = json::array();
  for (const DroppedAssignment& d : p.dropped) {
    dropped.push_back({d.token, d.expert});
    reasons.push_back(d.reason == DropReason::kCapacity ? "capacity" : "random_routing");
  }
  out["experts"] = std::move(experts);
  out["weights"] = std::move(weights);
  out["selected"] = std::move(selected);
  out["dropped"] = std::move(dropped);
  out["dropped_reasons"] = std::move(reasons);
  out["tokens_per_expert"] = result.stats.tokens_per_expert;
  out["capacity"] = p.capacity >= 0 ? json(p.capacity) : json(nullptr);
  out["aux_loss"] = result.losses.aux_loss;
  out["z_loss"] = result.losses.z_loss;
  out["losses"] = {{"aux_loss", result.losses.aux_loss},
                   {"z_loss", result.losses.z_loss},
                   {"load_balancing", result.losses.load_balancing},
                   {"importance_cv2", result.losses.importance_cv2},
                   {"load_cv2", result.losses.load_cv2},
                   {"total", result.losses.total}};
  out["stats"] = stats_json(result.stats);
  if (p.num_slots > 0) {
    Matrix<Real> dispatch(p.num_tokens, p.num_slots), combine(p.num_tokens, p.num_slots);
    dispatch.values = p.dispatch;
    combine.values = p.combine;
    out["dispatch_weights"] = matrix_json(dispatch);
    out["combine_weights"] = matrix_json(combine);
  }

  // Backward, when any upstream gradient is given.
  const bool backward = in.contains("d_weights") || in.contains("d_aux_loss") ||
                        in.contains("d_z_loss") || in.contains("d_dispatch") || in.contains("d_combine");
  if (backward) {
    RoutingGradOutput<Real> grad;
    grad.d_aux_loss = in.contains("d_aux_loss") ? number_at(in["d_aux_loss"], "d_aux_loss") : config.router_aux_loss_coef;
    grad.d_z_loss = in.contains("d_z_loss") ? number_at(in["d_z_loss"], "d_z_loss") : config.router_z_loss_coef;
    if (in.contains("d_weights")) {
      Matrix<Real> dw = matrix_at<Real>(in["d_weights"], "d_weights");
      if (dw.rows != p.num_tokens || dw.cols != p.num_experts)
        throw_input_error("d_weights shape", detail::concat("[", p.num_tokens, "][", p.num_experts, "]"),
                          detail::concat("[", dw.rows, "][", dw.cols, "]"));
      grad.d_token_weights.resize(static_cast<size_t>(p.num_selections()));
      for (int64_t t = 0; t < p.num_tokens; ++t)
        for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i)
          grad.d_token_weights[i] = dw(t, p.token_experts[i]);
    }
    for (const char* key : {"d_dispatch", "d_combine"}) {
      if (!in.contains(key)) continue;
      Matrix<Real> m = matrix_at<Real>(in[key], key);
      if (m.rows != p.num_tokens || m.cols != p.num_slots)
        throw_input_error(detail::concat(key, " shape"), detail::concat("[", p.num_tokens, "][", p.num_slots, "]"),
                          detail::concat("[", m.rows, "][", m.cols, "]"));
      (std::string(key) == "d_dispatch" ? grad.d_dispatch : grad.d_combine) = m.values;
    }
    Matrix<Real> d_noisy;
    Matrix<Real> d_logits = route_backward<Real>(config, result, grad, &d_noisy);
    out[in.contains("probs") ? "d_probs" : "d_logits"] = matrix_json(d_logits);
    if (from_hidden) {
      RouterGrads<Real> g = router_backward<Real>(config, result, hidden.cview(), params,
                                                  d_logits.cview(), options.num_threads,
                                                  d_noisy.cview());
      out["d_hidden_states"] = matrix_json(g.d_hidden_states);
      out["d_router_weight"] = matrix_json(g.d_weight);
      if (!g.d_bias.empty()) {
        json b = json::array();
        for (Real v : g.d_bias) b.push_back(double(v));
        out["d_router_bias"] = b;
      }
      if (g.d_noise_weight.rows > 0) out["d_noise_weight"] = matrix_json(g.d_noise_weight);
    }
  }
  return out;
}

}  // namespace

std::string route_json(const std::string& config_json, const std::string& input_json, int indent) {
  const RoutingConfig config = routing_config_from_json(config_json);
  const json in = parse_document(input_json, "input");
  if (!in.is_object()) throw_input_error("input", "a JSON object", type_name(in));
  for (const auto& [key, value] : in.items()) {
    if (!input_keys().count(key)) throw_input_error("input key", "one of the documented keys", key);
  }
  std::string dtype = "float32";
  if (in.contains("dtype")) {
    if (!in["dtype"].is_string()) throw_input_error("dtype", "\"float32\" or \"float64\"", type_name(in["dtype"]));
    dtype = in["dtype"].get<std::string>();
  }
  json out;
  if (dtype == "float32") {
    out = route_typed<float>(config, in);
  } else if (dtype == "float64") {
    out = route_typed<double>(config, in);
  } else {
    throw_input_error("dtype", "\"float32\" or \"float64\"", dtype);
  }
  if (indent <= 0) return out.dump();
  // One top-level key per line with compact values: per-token rows stay readable.
  std::string text = "{";
  const std::string pad(static_cast<size_t>(indent), ' ');
  bool first = true;
  for (const auto& [key, value] : out.items()) {
    text += first ? "\n" : ",\n";
    first = false;
    text += pad + json(key).dump() + ": " + value.dump();
  }
  return text + "\n}";
}

}  // namespace moekit::cli
