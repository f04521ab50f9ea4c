// `moekit route` documents: parse INPUT, route, optionally run the backward, write OUT.
#include "route_io.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "io/json.h"
#include "io/stats_json.h"
#include "moekit/config.h"
#include "moekit/error.h"
#include "moekit/routing.h"

namespace moekit::cli {
namespace {

using nlohmann::json;

constexpr int64_t kMaxThreads = 1024;  // as in the layer config: more is a typo, not a machine
constexpr int64_t kInt32Min = std::numeric_limits<int32_t>::min();
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

enum class Precision { kFloat32, kFloat64 };
constexpr io::EnumName<Precision> kPrecisionNames[] = {{Precision::kFloat32, "float32"},
                                                       {Precision::kFloat64, "float64"}};

// The INPUT document, read and type-checked before anything is routed, so that every fault of
// the document itself (an unknown key included) is reported before shapes are compared.
struct Input {
  std::optional<io::NumberMatrix> logits, probs, hidden_states, router_weight, noise_weight;
  std::optional<std::vector<double>> router_bias;
  std::optional<std::vector<uint8_t>> token_mask;
  std::optional<int64_t> sequence_length;
  std::optional<std::vector<int32_t>> labels;
  std::optional<RoutingRecord> replay;
  std::optional<std::vector<double>> global_counts;
  std::optional<int64_t> global_tokens;
  std::optional<io::NumberMatrix> logit_noise;
  std::optional<int64_t> num_threads;
  Precision precision = Precision::kFloat32;
  std::optional<io::NumberMatrix> d_weights, d_dispatch, d_combine;
  std::optional<double> d_aux_loss, d_z_loss;

  bool backward() const { return d_weights || d_aux_loss || d_z_loss || d_dispatch || d_combine; }
};

std::optional<io::NumberMatrix> take_matrix(io::ObjectReader& in, std::string_view key) {
  const auto value = in.take(key);
  if (!value) return std::nullopt;
  return value->number_matrix();
}

std::optional<std::vector<double>> take_numbers(io::ObjectReader& in, std::string_view key) {
  const auto value = in.take(key);
  if (!value) return std::nullopt;
  return value->numbers();
}

std::vector<int32_t> int32_values(const io::Value& value) {
  std::vector<int32_t> out;
  for (const int64_t v : value.integers(kInt32Min, kInt32Max)) out.push_back(static_cast<int32_t>(v));
  return out;
}

Input read_input(const json& root, const RoutingConfig& config) {
  io::ObjectReader in(root, io::Document::kInput);
  Input input;
  input.logits = take_matrix(in, "logits");
  input.probs = take_matrix(in, "probs");
  input.hidden_states = take_matrix(in, "hidden_states");
  input.router_weight = take_matrix(in, "router_weight");
  input.router_bias = take_numbers(in, "router_bias");
  input.noise_weight = take_matrix(in, "noise_weight");
  if (const auto value = in.take("token_mask")) {
    std::vector<uint8_t> mask;
    for (const int64_t v : value->integers(0, 1)) mask.push_back(static_cast<uint8_t>(v));
    input.token_mask = std::move(mask);
  }
  input.sequence_length = in.integer("sequence_length", 0);
  if (const auto value = in.take("labels")) input.labels = int32_values(*value);
  if (const auto value = in.take("replay")) {
    RoutingRecord replay;
    replay.num_experts = config.num_experts;
    replay.num_tokens = static_cast<int64_t>(value->array_size());
    replay.token_offsets.push_back(0);
    for (std::size_t t = 0; t < value->array_size(); ++t) {
      for (const int32_t e : int32_values(value->element(t))) replay.token_experts.push_back(e);
      replay.token_offsets.push_back(static_cast<int64_t>(replay.token_experts.size()));
    }
    input.replay = std::move(replay);
  }
  input.global_counts = take_numbers(in, "global_counts");
  input.global_tokens = in.integer("global_tokens", 0);
  input.logit_noise = take_matrix(in, "logit_noise");
  input.num_threads = in.integer("num_threads", 1, kMaxThreads);
  if (const auto v = in.enumeration<Precision>("dtype", kPrecisionNames)) input.precision = *v;
  input.d_weights = take_matrix(in, "d_weights");
  input.d_aux_loss = in.number("d_aux_loss");
  input.d_z_loss = in.number("d_z_loss");
  input.d_dispatch = take_matrix(in, "d_dispatch");
  input.d_combine = take_matrix(in, "d_combine");
  in.reject_unknown_keys();

  const int sources = int(input.logits.has_value()) + int(input.probs.has_value()) +
                      int(input.hidden_states.has_value());
  if (sources != 1) {
    throw_input_error("input", "exactly one of logits, probs, hidden_states",
                      detail::concat(sources, " of them"));
  }
  if (input.hidden_states && !input.router_weight)
    throw_input_error("router_weight", "an [experts][d_model] array with hidden_states", "missing");
  if (!input.hidden_states && input.router_weight)
    throw_input_error("router_weight", "only with hidden_states", "given with logits or probs");
  if (!input.hidden_states && input.router_bias)
    throw_input_error("router_bias", "only with hidden_states", "given with logits or probs");
  if (!input.hidden_states && input.noise_weight)
    throw_input_error("noise_weight", "only with hidden_states", "given with logits or probs");
  return input;
}

template <typename Real>
Matrix<Real> to_matrix(const io::NumberMatrix& m) {
  Matrix<Real> out(m.rows, m.cols);
  for (std::size_t i = 0; i < m.values.size(); ++i) out.values[i] = static_cast<Real>(m.values[i]);
  return out;
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

template <typename Real>
json route_typed(const RoutingConfig& config, const Input& in) {
  RoutingOptions options;
  if (in.token_mask) options.token_mask = *in.token_mask;
  if (in.sequence_length) options.sequence_length = *in.sequence_length;
  if (in.labels) options.labels = *in.labels;
  if (in.global_counts) options.global_counts = *in.global_counts;
  if (in.logit_noise) options.logit_noise = in.logit_noise->values;
  if (in.global_tokens) options.global_tokens = *in.global_tokens;
  if (in.num_threads) options.num_threads = static_cast<int>(*in.num_threads);
  if (in.replay) options.replay = &*in.replay;

  RoutingResult<Real> result;
  Matrix<Real> hidden, weight, noise_weight;
  std::vector<Real> bias;
  RouterParams<Real> params;
  const bool from_hidden = in.hidden_states.has_value();
  if (in.logits) {
    const Matrix<Real> logits = to_matrix<Real>(*in.logits);
    result = route_logits<Real>(config, logits.cview(), options);
  } else if (in.probs) {
    const Matrix<Real> probs = to_matrix<Real>(*in.probs);
    result = route_probs<Real>(config, probs.cview(), options);
  } else {
    hidden = to_matrix<Real>(*in.hidden_states);
    weight = to_matrix<Real>(*in.router_weight);
    params.weight = weight.cview();
    if (in.router_bias) {
      bias.assign(in.router_bias->begin(), in.router_bias->end());
      params.bias = bias;
    }
    if (in.noise_weight) {
      noise_weight = to_matrix<Real>(*in.noise_weight);
      params.noise_weight = noise_weight.cview();
    }
    result = route_hidden<Real>(config, hidden.cview(), params, options);
  }

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
  out["stats"] = io::routing_stats_json(result.stats);
  if (p.num_slots > 0) {
    Matrix<Real> dispatch(p.num_tokens, p.num_slots), combine(p.num_tokens, p.num_slots);
    dispatch.values = p.dispatch;
    combine.values = p.combine;
    out["dispatch_weights"] = matrix_json(dispatch);
    out["combine_weights"] = matrix_json(combine);
  }

  // Backward, when any upstream gradient is given.
  if (in.backward()) {
    RoutingGradOutput<Real> grad;
    grad.d_aux_loss = in.d_aux_loss ? *in.d_aux_loss : config.router_aux_loss_coef;
    grad.d_z_loss = in.d_z_loss ? *in.d_z_loss : config.router_z_loss_coef;
    if (in.d_weights) {
      const Matrix<Real> dw = to_matrix<Real>(*in.d_weights);
      if (dw.rows != p.num_tokens || dw.cols != p.num_experts)
        throw_input_error("d_weights shape", detail::concat("[", p.num_tokens, "][", p.num_experts, "]"),
                          detail::concat("[", dw.rows, "][", dw.cols, "]"));
      grad.d_token_weights.resize(static_cast<size_t>(p.num_selections()));
      for (int64_t t = 0; t < p.num_tokens; ++t)
        for (int64_t i = p.token_offsets[t]; i < p.token_offsets[t + 1]; ++i)
          grad.d_token_weights[i] = dw(t, p.token_experts[i]);
    }
    const std::tuple<const char*, const std::optional<io::NumberMatrix>*, std::vector<Real>*> slot_grads[] = {
        {"d_dispatch", &in.d_dispatch, &grad.d_dispatch}, {"d_combine", &in.d_combine, &grad.d_combine}};
    for (const auto& [key, given, target] : slot_grads) {
      if (!*given) continue;
      const Matrix<Real> m = to_matrix<Real>(**given);
      if (m.rows != p.num_tokens || m.cols != p.num_slots)
        throw_input_error(detail::concat(key, " shape"), detail::concat("[", p.num_tokens, "][", p.num_slots, "]"),
                          detail::concat("[", m.rows, "][", m.cols, "]"));
      *target = m.values;
    }
    Matrix<Real> d_noisy;
    Matrix<Real> d_logits = route_backward<Real>(config, result, grad, &d_noisy);
    out[in.probs ? "d_probs" : "d_logits"] = matrix_json(d_logits);
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
  const Input input = read_input(io::parse_object(input_json, io::Document::kInput), config);
  const json out = input.precision == Precision::kFloat32 ? route_typed<float>(config, input)
                                                         : route_typed<double>(config, input);
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
