// moekit._moekit: the Python extension. A thin layer over the public C++ API (routing.h,
// layer.h): arrays are checked and read where they lie, results are handed to NumPy without a
// copy, errors are the library's one-line messages (ConfigError, InputError → ValueError; a
// wrong dtype → TypeError). The Python package (python/moekit/) builds the friendly API on it.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "array.h"
#include "buffers.h"
#include "moekit/config.h"
#include "moekit/error.h"
#include "moekit/layer.h"
#include "moekit/model_family.h"
#include "moekit/layer_file.h"
#include "moekit/params.h"
#include "moekit/pretrained.h"
#include "moekit/routing.h"
#include "moekit/stats.h"

namespace moekit::python {
namespace {

using nb::literals::operator""_a;

// ---------------------------------------------------------------------------------------------
// Routing results as Python objects (the vectors are moved into NumPy arrays).

// A statistics struct as a dict: the names of stats.h's visit_* lists (those of the JSON the
// command line writes), the vectors moved into NumPy arrays.
template <typename Stats, typename Visit>
nb::dict stats_dict_of(Stats& stats, Visit visit) {
  nb::dict d;
  visit(stats, [&](const char* name, auto& field) {
    using Field = std::remove_cvref_t<decltype(field)>;
    if constexpr (std::is_same_v<Field, std::vector<LabelStats>>) {
      nb::list list;
      for (LabelStats& l : field) list.append(stats_dict_of(l, [](LabelStats& x, auto&& v) { visit_label_stats(x, v); }));
      d[name] = list;
    } else if constexpr (std::is_same_v<Field, std::vector<int64_t>>) {
      const size_t n = field.size();
      d[name] = to_numpy(std::move(field), {n});
    } else {
      d[name] = field;
    }
  });
  return d;
}

nb::dict stats_dict(RoutingStats&& s) {
  return stats_dict_of(s, [](RoutingStats& x, auto&& v) { visit_routing_stats(x, v); });
}

nb::dict losses_dict(const RoutingLosses& l) {
  nb::dict d;
  d["aux_loss"] = l.aux_loss;
  d["z_loss"] = l.z_loss;
  d["load_balancing"] = l.load_balancing;
  d["importance_cv2"] = l.importance_cv2;
  d["load_cv2"] = l.load_cv2;
  d["total"] = l.total;
  return d;
}

nb::dict plan_dict(RoutingPlan&& p) {
  nb::dict d;
  const size_t sel = p.token_experts.size(), kept = p.expert_tokens.size();
  d["num_tokens"] = p.num_tokens;
  d["num_experts"] = p.num_experts;
  d["capacity"] = p.capacity;
  d["token_offsets"] = to_numpy(std::move(p.token_offsets), {static_cast<size_t>(p.num_tokens + 1)});
  d["token_experts"] = to_numpy(std::move(p.token_experts), {sel});
  d["token_weights"] = to_numpy(std::move(p.token_weights), {sel});
  d["token_kept"] = to_numpy(std::move(p.token_kept), {sel});
  d["expert_offsets"] = to_numpy(std::move(p.expert_offsets), {static_cast<size_t>(p.num_experts + 1)});
  d["expert_tokens"] = to_numpy(std::move(p.expert_tokens), {kept});
  d["expert_weights"] = to_numpy(std::move(p.expert_weights), {kept});
  d["expert_selection"] = to_numpy(std::move(p.expert_selection), {kept});
  std::vector<int64_t> dropped;
  std::vector<uint8_t> reasons;
  dropped.reserve(2 * p.dropped.size());
  for (const DroppedAssignment& a : p.dropped) {
    dropped.push_back(a.token);
    dropped.push_back(a.expert);
    reasons.push_back(a.reason == DropReason::kCapacity ? 0 : 1);
  }
  const size_t num_dropped = reasons.size();
  d["dropped"] = to_numpy(std::move(dropped), {num_dropped, 2});
  d["dropped_reason"] = to_numpy(std::move(reasons), {num_dropped});
  if (p.num_slots > 0) {
    const size_t t = static_cast<size_t>(p.num_tokens), s = static_cast<size_t>(p.num_slots);
    d["num_slots"] = p.num_slots;
    d["dispatch"] = to_numpy(std::move(p.dispatch), {t, s});
    d["combine"] = to_numpy(std::move(p.combine), {t, s});
  }
  return d;
}

nb::dict routing_dict(RoutingResult<float>&& r, bool with_scores) {
  nb::dict d;
  d["losses"] = losses_dict(r.losses);
  d["stats"] = stats_dict(std::move(r.stats));
  if (with_scores) {
    const size_t t = static_cast<size_t>(r.saved.logits.rows);
    d["logits"] = to_numpy(std::move(r.saved.logits.values), {t, static_cast<size_t>(r.saved.logits.cols)});
    d["scores"] = to_numpy(std::move(r.saved.scores.values), {t, static_cast<size_t>(r.saved.scores.cols)});
  }
  d["plan"] = plan_dict(std::move(r.plan));
  return d;
}

// ---------------------------------------------------------------------------------------------
// Optional per-token inputs shared by route() and Layer.forward().

RoutingOptions token_options(int64_t num_tokens, const std::optional<InArray>& token_mask, int64_t sequence_length,
                         const std::optional<InArray>& labels) {
  RoutingOptions in;
  if (token_mask) {
    const Elem e = token_mask->dtype() == nb::dtype<bool>() ? Elem::kBool : Elem::kU8;
    check_array(*token_mask, "token_mask", e, {num_tokens});
    in.token_mask = {static_cast<const uint8_t*>(token_mask->data()), static_cast<size_t>(num_tokens)};
  }
  if (labels) {
    check_array(*labels, "labels", Elem::kI32, {num_tokens});
    in.labels = {data_as<int32_t>(*labels), static_cast<size_t>(num_tokens)};
  }
  if (sequence_length < 0) throw_input_error("sequence_length", ">= 0 (0: one sequence)", sequence_length);
  in.sequence_length = sequence_length;
  return in;
}

ConstMatrixView<float> matrix_of(const InArray& a, const char* name, int64_t cols) {
  check_array(a, name, Elem::kF32, {-1, cols});
  return {data_as<float>(a), static_cast<int64_t>(a.shape(0)), static_cast<int64_t>(a.shape(1))};
}

nb::dict route(const std::string& config_json, const InArray& input, const std::string& kind,
               const std::optional<InArray>& router_weight, const std::optional<InArray>& router_bias,
               const std::optional<InArray>& noise_weight, const std::optional<InArray>& token_mask,
               int64_t sequence_length, const std::optional<InArray>& labels,
               const std::optional<InArray>& selection_bias, int num_threads) {
  const RoutingConfig config = routing_config_from_json(config_json);
  if (input.ndim() != 2) {
    throw nb::value_error(("scores: expected a 2-D [num_tokens, *] array, got shape " + shape_text(shape_of(input))).c_str());
  }
  const int64_t num_tokens = static_cast<int64_t>(input.shape(0));
  RoutingOptions in = token_options(num_tokens, token_mask, sequence_length, labels);
  if (num_threads < 1 || num_threads > 1024) throw_input_error("num_threads", "in [1, 1024]", num_threads);
  in.num_threads = num_threads;
  if (selection_bias) {
    check_array(*selection_bias, "selection_bias", Elem::kF32, {config.num_experts});
    in.selection_bias = {data_as<float>(*selection_bias), static_cast<size_t>(config.num_experts)};
  }
  RoutingResult<float> result;
  if (kind == "hidden_states") {
    if (!router_weight) throw nb::value_error("router_weight: expected a [router_rows, d_model] array with hidden_states, got None");
    const int64_t d_model = static_cast<int64_t>(input.shape(1));
    const ConstMatrixView<float> x = matrix_of(input, "hidden_states", d_model);
    RouterParams<float> params;
    params.weight = matrix_of(*router_weight, "router_weight", d_model);
    if (router_bias) {
      check_array(*router_bias, "router_bias", Elem::kF32, {params.weight.rows});
      params.bias = {data_as<float>(*router_bias), static_cast<size_t>(params.weight.rows)};
    }
    if (noise_weight) params.noise_weight = matrix_of(*noise_weight, "noise_weight", d_model);
    nb::gil_scoped_release release;
    result = route_hidden(config, x, params, in);
  } else if (kind == "logits" || kind == "probs") {
    const ConstMatrixView<float> s = matrix_of(input, kind.c_str(), static_cast<int64_t>(input.shape(1)));
    nb::gil_scoped_release release;
    result = kind == "logits" ? route_logits(config, s, in) : route_probs(config, s, in);
  } else {
    throw nb::value_error(("kind: expected 'logits', 'probs' or 'hidden_states', got '" + kind + "'").c_str());
  }
  return routing_dict(std::move(result), true);
}

// ---------------------------------------------------------------------------------------------
// The parameter schema (params.h) as Python sees it.

// A parameter's shape as the extension's arrays have it: the row's shape, a weight of the shared
// expert without its leading 1.
std::vector<size_t> array_shape(const MoeParamSpec& spec, const MoeLayerConfig& c) {
  std::vector<size_t> shape;
  for (const int64_t v : moe_param_shape(spec, c)) shape.push_back(static_cast<size_t>(v));
  if (spec.single_expert()) shape.erase(shape.begin());
  return shape;
}

// One dict per row of kMoeParamSchema, in its order.
nb::list parameter_schema() {
  nb::list rows;
  for (const MoeParamSpec& s : kMoeParamSchema) {
    nb::dict r;
    r["name"] = s.name;
    r["storage"] = moe_param_storage_name(s.storage);
    r["fp32_only"] = s.fp32_only();
    nb::list shape;
    for (int i = 0; i < s.rank(); ++i) shape.append(moe_param_dim_name(s.shape[static_cast<size_t>(i)]));
    r["shape"] = shape;
    r["single_expert"] = s.single_expert();
    r["used_when"] = moe_param_condition_name(s.used_when);
    r["expert_weight"] = s.expert_weight;
    r["has_gradient"] = s.has_gradient;
    nb::list layouts;
    for (const char* l : moe_param_layout_names(s.layouts)) layouts.append(l);
    r["layouts"] = layouts;
    r["up_name"] = s.up_name != nullptr ? nb::cast(std::string(s.up_name)) : nb::none();
    nb::list hf;
    for (const MoeParamHfName& h : s.hf_names) {
      if (h.name == nullptr) break;
      hf.append(nb::make_tuple(h.name, h.up != nullptr ? nb::cast(std::string(h.up)) : nb::none()));
    }
    r["hf_names"] = hf;
    rows.append(r);
  }
  return rows;
}

// (name, shape) of every parameter `config_json` uses, in the schema's order, shaped as the
// extension's arrays (array_shape).
std::vector<std::pair<std::string, std::vector<size_t>>> parameter_shapes(const std::string& config_json) {
  const MoeLayerConfig c = moe_layer_config_from_json(config_json);
  std::vector<std::pair<std::string, std::vector<size_t>>> out;
  for (const MoeParamSpec& s : kMoeParamSchema) {
    if (moe_param_used(s, c)) out.emplace_back(s.name, array_shape(s, c));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The layer.

struct ForwardState {
  MoeForwardState state;
  bool empty() const { return state.empty(); }
};

class Layer {
 public:
  // Owns its parameters, initialised from `seed` (nn.Linear's rule, see layer.h).
  Layer(const std::string& config_json, uint64_t seed)
      : layer_(std::make_unique<MoeLayer>(moe_layer_config_from_json(config_json), seed)) {}

  // Borrows the arrays of `params` (kept alive by this object).
  Layer(const std::string& config_json, const nb::dict& params) {
    const MoeLayerConfig c = moe_layer_config_from_json(config_json);
    MoeParams p;
    // The schema's names and the names of its up halves (params.h).
    std::vector<std::string> known;
    for (const MoeParamSpec& s : kMoeParamSchema) {
      known.emplace_back(s.name);
      if (s.up_name != nullptr) known.emplace_back(s.up_name);
    }
    for (auto [key, value] : params) {
      const std::string name = nb::cast<std::string>(key);
      if (std::find(known.begin(), known.end(), name) == known.end()) {
        throw nb::value_error(("params: unknown parameter '" + name + "'").c_str());
      }
      (void)value;
    }
    auto get = [&](const char* name) -> std::optional<InArray> {
      if (!params.contains(name) || params[name].is_none()) return std::nullopt;
      nb::object obj = params[name];
      InArray a;
      if (!nb::try_cast(obj, a)) {
        throw nb::type_error((std::string("params['") + name + "']: expected an array (NumPy, PyTorch), got " +
                              nb::cast<std::string>(nb::str(obj.type())))
                                 .c_str());
      }
      keep_.push_back(obj);
      return a;
    };
    auto vec = [&](const char* name, std::vector<int64_t> shape) -> std::span<const float> {
      auto a = get(name);
      if (!a) return {};
      check_array(*a, (std::string("params['") + name + "']").c_str(), Elem::kF32, shape);
      return {data_as<float>(*a), static_cast<size_t>(a->size())};
    };
    auto mat = [&](const char* name, int64_t rows, int64_t cols) -> ConstMatrixView<float> {
      auto a = get(name);
      if (!a) return {};
      check_array(*a, (std::string("params['") + name + "']").c_str(), Elem::kF32, {rows, cols});
      return {data_as<float>(*a), rows, cols};
    };
    // Expert weights: fp32 or bf16, [experts, rows, cols] (the shared expert without its
    // leading 1); gated weights either stacked (gate rows, then up rows) or as two halves.
    // One array per expert (a list): experts stored as separate tensors (Switch Transformers'
    // per-expert Linears), read through one pointer per expert.
    auto pointers = [&](const char* name, int64_t experts, int64_t rows, int64_t cols, Elem* elem,
                        std::vector<int64_t>* strides) -> std::vector<const void*>& {
      const nb::list list = nb::cast<nb::list>(params[name]);
      if (static_cast<int64_t>(list.size()) != experts) {
        throw nb::value_error((std::string("params['") + name + "']: expected a list of " + std::to_string(experts) +
                               " per-expert arrays, got " + std::to_string(list.size())).c_str());
      }
      std::vector<const void*>& out = pointer_lists_.emplace_back();
      for (size_t i = 0; i < list.size(); ++i) {
        InArray a;
        const std::string label = std::string("params['") + name + "'][" + std::to_string(i) + "]";
        if (!nb::try_cast(list[i], a)) throw nb::type_error((label + ": expected an array (NumPy, PyTorch)").c_str());
        if (i == 0) *elem = a.dtype() == nb::dtype<float>() ? Elem::kF32 : Elem::kBF16;
        check_array(a, label.c_str(), *elem, {rows, cols}, /*any_strides=*/true);
        const std::vector<int64_t> st = {static_cast<int64_t>(a.stride(0)), static_cast<int64_t>(a.stride(1))};
        if (i == 0) *strides = st;
        if (st != *strides) throw nb::value_error((label + ": expected the strides of the first expert's array").c_str());
        keep_.push_back(nb::borrow(list[i]));
        out.push_back(a.data());
      }
      return out;
    };
    auto weight = [&](const char* name, const char* up_name, int64_t experts, int64_t rows, int64_t cols,
                      bool stacked) -> WeightView {
      if (stacked && params.contains(name) && nb::isinstance<nb::list>(params[name])) {
        const bool split = up_name != nullptr && params.contains(up_name) && !params[up_name].is_none();
        const int64_t own_rows = split ? rows / 2 : rows;
        Elem elem = Elem::kF32, up_elem = Elem::kF32;
        std::vector<int64_t> strides, up_strides;
        WeightView w;
        w.experts = experts;
        w.rows = rows;
        w.cols = cols;
        w.expert_data = pointers(name, experts, own_rows, cols, &elem, &strides);
        w.data = w.expert_data[0];
        w.dtype = elem == Elem::kF32 ? DType::kF32 : DType::kBF16;
        w.row_stride = strides[0];
        w.col_stride = strides[1];
        if (split) {
          w.expert_up_data = pointers(up_name, experts, own_rows, cols, &up_elem, &up_strides);
          if (up_elem != elem || up_strides != strides) {
            throw nb::value_error((std::string("params['") + up_name + "']: expected the dtype and strides of params['" +
                                   name + "']").c_str());
          }
          w.up_data = w.expert_up_data[0];
        }
        return w;
      }
      auto a = get(name);
      auto up = up_name ? get(up_name) : std::nullopt;
      if (!a) return {};
      const int64_t own_rows = up ? rows / 2 : rows;
      std::vector<int64_t> shape = stacked ? std::vector<int64_t>{experts, own_rows, cols} : std::vector<int64_t>{own_rows, cols};
      const Elem e = a->dtype() == nb::dtype<float>() ? Elem::kF32 : Elem::kBF16;
      const std::string label = std::string("params['") + name + "']";
      // Routed expert stacks may be strided views (gpt-oss's interleaved, transposed layout read
      // in place); the layer reads through the strides.
      check_array(*a, label.c_str(), e, shape, /*any_strides=*/stacked);
      WeightView w{a->data(), e == Elem::kF32 ? DType::kF32 : DType::kBF16, experts, rows, cols};
      const size_t row_dim = stacked ? 1 : 0;  // a shared weight has no expert axis
      w.expert_stride = stacked ? static_cast<int64_t>(a->stride(0)) : own_rows * cols;
      w.row_stride = static_cast<int64_t>(a->stride(row_dim));
      w.col_stride = static_cast<int64_t>(a->stride(row_dim + 1));
      if (up) {
        const std::string up_label = std::string("params['") + up_name + "']";
        check_array(*up, up_label.c_str(), e, shape, stacked);
        for (size_t i = 0; i < up->ndim(); ++i) {
          if (up->stride(i) != a->stride(i)) {
            throw nb::value_error((up_label + ": expected the strides of " + label + ", got stride " +
                                   std::to_string(up->stride(i)) + " in dimension " + std::to_string(i) + " (" +
                                   std::to_string(a->stride(i)) + " there)").c_str());
          }
        }
        w.up_data = up->data();
      }
      return w;
    };
    // Every parameter of the schema, in its order, with the row's shape (a weight of the shared
    // expert without its leading 1); gate and up halves under the row's up name.
    for_each_moe_field(p, [&](auto row, auto& view) {
      const MoeParamSpec& s = kMoeParamSchema[row];
      const std::vector<int64_t> shape = moe_param_shape(s, c);
      using View = std::remove_reference_t<decltype(view)>;
      if constexpr (std::is_same_v<View, WeightView>) {
        const char* up = is_gated(c.activation) ? s.up_name : nullptr;
        view = weight(s.name, up, shape[0], shape[1], shape[2], !s.single_expert());
      } else if constexpr (std::is_same_v<View, ConstMatrixView<float>>) {
        view = mat(s.name, shape[0], shape[1]);
      } else if ((s.layouts & kLayoutRowMatrix) != 0) {
        // As a [1, n] matrix (HF's shared_expert_gate.weight is [1, d_model]) or as the vector.
        if (auto a = get(s.name)) {
          const std::vector<int64_t> as_given = a->ndim() == 2 ? std::vector<int64_t>{1, shape[0]} : shape;
          check_array(*a, (std::string("params['") + s.name + "']").c_str(), Elem::kF32, as_given);
          view = {data_as<float>(*a), static_cast<size_t>(shape[0])};
        }
      } else {
        view = vec(s.name, shape);
      }
    });
    layer_ = std::make_unique<MoeLayer>(c, p);
  }

  // A checkpoint's layer (pretrained.h): the layer borrows the mapping and the conversions,
  // which this object keeps.
  explicit Layer(PretrainedLayer&& pretrained)
      : layer_(std::make_unique<MoeLayer>(std::move(pretrained.moe()))),
        pretrained_(std::make_unique<PretrainedLayer>(std::move(pretrained))) {}

  // A layer file (layer_file.h): the layer borrows the file's mapping, which this object keeps.
  explicit Layer(LayerFile&& file)
      : layer_(std::make_unique<MoeLayer>(std::move(file.moe()))),
        file_(std::make_unique<LayerFile>(std::move(file))) {}

  const MoeLayerConfig& config() const { return layer_->config(); }

  // The parameters the layer computes with, copied into fp32 arrays of the stacked layout
  // (MoeTensors' names): a checkpoint's tensors as a PyTorch module's starting values.
  nb::dict stored_parameters() {
    MoeTensors t = moe_tensors_from_params(config(), layer_->params());
    nb::dict d;
    t.for_each([&](const char* name, std::vector<float>& v) {
      if (v.empty()) return;
      d[name] = to_numpy(std::move(v), array_shape(moe_param_spec(name), config()));
    });
    return d;
  }

  nb::list sources() const {
    nb::list out;
    if (!pretrained_) return out;
    for (const LoadedParameter& s : pretrained_->sources()) {
      nb::dict e;
      e["parameter"] = s.parameter;
      e["tensors"] = s.tensors;
      e["stored"] = s.stored;
      e["how"] = s.how;
      out.append(e);
    }
    return out;
  }

  nb::tuple forward(const InArray& hidden_states, const std::optional<InArray>& token_mask, int64_t sequence_length,
                    const std::optional<InArray>& labels) {
    const ConstMatrixView<float> x = matrix_of(hidden_states, "hidden_states", config().d_model);
    RoutingOptions in = token_options(x.rows, token_mask, sequence_length, labels);
    MoeForwardResult r;
    std::unique_ptr<ForwardState> state;
    {
      nb::gil_scoped_release release;
      r = layer_->forward(x, in);
      if (layer_->saves_for_backward()) state = std::make_unique<ForwardState>(ForwardState{layer_->take_forward_state()});
    }
    const size_t t = static_cast<size_t>(r.output.rows), d = static_cast<size_t>(r.output.cols);
    nb::object out = to_numpy(std::move(r.output.values), {t, d});
    nb::dict routing = routing_dict(std::move(r.routing), false);
    nb::object st = state ? nb::cast(state.release(), nb::rv_policy::take_ownership) : nb::none();
    return nb::make_tuple(out, routing, st);
  }

  nb::object backward(const InArray& d_output, ForwardState& state, const std::optional<nb::dict>& into,
                      std::optional<double> d_aux_loss, std::optional<double> d_z_loss) {
    const ConstMatrixView<float> dy = matrix_of(d_output, "d_output", config().d_model);
    MoeGradBuffers buffers;
    MoeBackwardOptions options;
    options.d_aux_loss = d_aux_loss;
    options.d_z_loss = d_z_loss;
    if (into) {
      for (auto [key, value] : *into) {
        const std::string name = nb::cast<std::string>(key);
        const MoeParamSpec* s = find_moe_param(name);
        if (s == nullptr || !s->has_gradient) {
          throw nb::value_error(("grads: unknown gradient '" + name + "'").c_str());
        }
      }
      buffers.for_each([&](const char* name, std::span<float>& span) {
        const int64_t want = moe_param_size(moe_param_spec(name), config());
        if (want == 0) return;
        if (!into->contains(name)) throw nb::value_error((std::string("grads: expected a buffer '") + name + "', got none").c_str());
        OutArray a;
        if (!nb::try_cast(nb::object((*into)[name]), a)) {
          throw nb::type_error((std::string("grads['") + name + "']: expected a writable float32 array").c_str());
        }
        check_array(a, (std::string("grads['") + name + "']").c_str(), Elem::kF32, shape_of(a));
        if (static_cast<int64_t>(a.size()) != want) {
          throw nb::value_error((std::string("grads['") + name + "']: expected " + std::to_string(want) +
                                 " elements, got " + std::to_string(a.size()))
                                    .c_str());
        }
        span = {static_cast<float*>(a.data()), static_cast<size_t>(want)};
      });
      options.into = &buffers;
    }
    Matrix<float> d_x;
    {
      nb::gil_scoped_release release;
      d_x = layer_->backward(dy, state.state, options);
    }
    const size_t t = static_cast<size_t>(d_x.rows), d = static_cast<size_t>(d_x.cols);
    return to_numpy(std::move(d_x.values), {t, d});
  }

  // NumPy views of the owned parameters or of the accumulated gradients, valid while the layer
  // lives (the views keep it alive); writes through a parameter view reach the layer after
  // refresh_packed_weights().
  static nb::dict tensor_views(MoeTensors& t, nb::handle owner) {
    nb::dict d;
    t.for_each([&](const char* name, std::vector<float>& v) {
      if (!v.empty()) d[name] = numpy_view(v.data(), {v.size()}, owner);
    });
    return d;
  }

  MoeLayer& layer() { return *layer_; }

 private:
  std::unique_ptr<MoeLayer> layer_;
  std::vector<nb::object> keep_;  // the borrowed arrays
  std::unique_ptr<PretrainedLayer> pretrained_;  // a checkpoint's mapping and conversions
  std::unique_ptr<LayerFile> file_;              // a layer file's mapping
  std::vector<std::vector<const void*>> pointer_lists_;  // per-expert weights given as lists
};

}  // namespace
}  // namespace moekit::python

NB_MODULE(_moekit, m) {
  using namespace moekit;
  using namespace moekit::python;
  m.doc() = "moekit's C++ core (routing, the MoE layer); use the moekit package, not this module.";

  m.def("preset_names", [] { return preset_names(); });
  m.def("preset_json", [](const std::string& name) { return routing_config_to_json(routing_config_from_preset(name)); });
  m.def("routing_config_json", [](const std::string& text) { return routing_config_to_json(routing_config_from_json(text)); });
  m.def("check_layer_config", [](const std::string& text) { moe_layer_config_from_json(text); });
  // The derived shapes and switches the Python module needs to lay out its parameters.
  m.def("layer_summary", [](const std::string& text) {
    const MoeLayerConfig c = moe_layer_config_from_json(text);
    nb::dict d;
    d["d_model"] = c.d_model;
    d["d_ff"] = c.d_ff;
    d["num_experts"] = c.num_experts();
    d["num_experts_per_tok"] = c.routing.num_experts_per_tok;
    d["router_rows"] = c.router_rows();
    d["gate_up_rows"] = c.gate_up_rows();
    d["gated"] = is_gated(c.activation);
    d["router_bias"] = c.router_bias;
    d["expert_bias"] = c.expert_bias;
    d["noisy_gating"] = c.routing.noisy_gating;
    d["selection_bias"] = c.has_selection_bias();
    d["shared_d_ff"] = c.has_shared() ? c.effective_shared_d_ff() : 0;
    d["shared_expert_gate"] = c.shared_expert_gate;
    d["router_aux_loss_coef"] = c.routing.router_aux_loss_coef;
    d["router_z_loss_coef"] = c.routing.router_z_loss_coef;
    return nb::cast<std::string>(nb::module_::import_("json").attr("dumps")(d));
  });
  // The parameter schema (params.h): one dict per row, and the rows a config uses with shapes.
  m.def("parameter_schema", &parameter_schema);
  m.def("parameter_shapes", &parameter_shapes, "config_json"_a);
  m.def("route", &route, "config_json"_a, "input"_a, "kind"_a, "router_weight"_a.none() = nb::none(),
        "router_bias"_a.none() = nb::none(), "noise_weight"_a.none() = nb::none(), "token_mask"_a.none() = nb::none(),
        "sequence_length"_a = 0, "labels"_a.none() = nb::none(), "selection_bias"_a.none() = nb::none(),
        "num_threads"_a = 1);

  m.def("model_family", [](const std::string& text) {
    const ModelFamily f = model_family_from_config(text);
    nb::dict d;
    d["model_type"] = f.model_type;
    d["layer_config_json"] = f.layer_config_json;
    nb::list layers;
    for (const ModelLayer& l : f.layers) {
      nb::dict ld;
      ld["name"] = l.name;
      ld["stack"] = l.stack;
      ld["index"] = l.index;
      ld["is_moe"] = l.is_moe;
      ld["prefix"] = l.prefix;
      ld["reason"] = l.reason;
      ld["dense_d_ff"] = l.dense_d_ff;
      layers.append(ld);
    }
    d["layers"] = layers;
    return d;
  });

  m.def("load_pretrained", [](const std::string& dir, const std::string& layer, const std::string& dtype,
                              int num_threads) {
    PretrainedOptions options;
    bool known = false;
    for (const DType d : {DType::kF32, DType::kBF16, DType::kInt8, DType::kInt4, DType::kMxfp4}) {
      if (dtype == dtype_name(d)) {
        options.dtype = d;
        known = true;
      }
    }
    if (!known) {
      throw nb::value_error(("dtype: expected 'fp32', 'bf16', 'int8', 'int4' or 'mxfp4', got '" + dtype + "'").c_str());
    }
    options.num_threads = num_threads;
    std::unique_ptr<Layer> result;
    std::string model_type, name, layer_config;
    {
      nb::gil_scoped_release release;
      PretrainedLayer p = PretrainedLayer::load(dir, layer, options);
      model_type = p.family().model_type;
      name = p.layer().name;
      layer_config = p.family().layer_config_json;
      result = std::make_unique<Layer>(std::move(p));
    }
    nb::dict info;
    info["model_type"] = model_type;
    info["layer"] = name;
    info["layer_config_json"] = layer_config;
    return nb::make_tuple(nb::cast(result.release(), nb::rv_policy::take_ownership), info);
  }, "dir"_a, "layer"_a, "dtype"_a = "fp32", "num_threads"_a = 1);

  m.def("load_layer_file", [](const std::string& path, int num_threads) {
    std::unique_ptr<Layer> result;
    std::string config_json;
    std::map<std::string, std::string> m;
    {
      nb::gil_scoped_release release;
      LayerFile f = LayerFile::open(path, num_threads);
      config_json = moe_layer_config_to_json(f.config());
      m = f.metadata();
      result = std::make_unique<Layer>(std::move(f));
    }
    nb::dict meta;
    for (const auto& [k, v] : m) meta[k.c_str()] = v;
    return nb::make_tuple(nb::cast(result.release(), nb::rv_policy::take_ownership), config_json, meta);
  }, "path"_a, "num_threads"_a = 0);

  m.def("pooled_array", [](const std::vector<size_t>& shape, const std::string& dtype) {
    if (dtype != "float32" && dtype != "bfloat16") {
      throw nb::value_error(("dtype: expected 'float32' or 'bfloat16', got '" + dtype + "'").c_str());
    }
    return pooled_array(shape, dtype == "float32" ? 4 : 2);
  }, "shape"_a, "dtype"_a = "float32");
  m.def("pooled_bytes", &pooled_bytes);

  nb::class_<ForwardState>(m, "ForwardState").def_prop_ro("empty", &ForwardState::empty);

  nb::class_<Layer>(m, "Layer")
      .def(nb::init<const std::string&, uint64_t>(), "config_json"_a, "seed"_a)
      .def(nb::init<const std::string&, const nb::dict&>(), "config_json"_a, "params"_a)
      .def("forward", &Layer::forward, "hidden_states"_a, "token_mask"_a.none() = nb::none(), "sequence_length"_a = 0,
           "labels"_a.none() = nb::none())
      .def("backward", &Layer::backward, "d_output"_a, "state"_a, "grads"_a.none() = nb::none(),
           "d_aux_loss"_a.none() = nb::none(), "d_z_loss"_a.none() = nb::none())
      .def("stored_parameters", &Layer::stored_parameters)
      .def("sources", &Layer::sources)
      .def("refresh_packed_weights", [](Layer& l) { l.layer().refresh_packed_weights(); })
      .def("set_training", [](Layer& l, bool t) { l.layer().set_training(t); })
      .def_prop_ro("training", [](Layer& l) { return l.layer().config().routing.training; })
      .def_prop_rw("save_for_backward", [](Layer& l) { return l.layer().saves_for_backward(); },
                   [](Layer& l, bool s) { l.layer().set_save_for_backward(s); })
      .def_prop_rw("num_threads", [](Layer& l) { return l.layer().config().num_threads; },
                   [](Layer& l, int n) { l.layer().set_num_threads(n); })
      .def_prop_ro("owns_parameters", [](Layer& l) { return l.layer().owns_parameters(); })
      .def_prop_ro("isa", [](Layer& l) { return std::string(l.layer().isa_name()); })
      .def_prop_ro("d_model", [](Layer& l) { return l.layer().config().d_model; })
      .def_prop_ro("dtype", [](Layer& l) { return std::string(dtype_name(l.layer().config().dtype)); })
      .def("zero_grad", [](Layer& l) { l.layer().zero_grad(); })
      .def("save", [](Layer& l, const std::string& path, const std::map<std::string, std::string>& metadata) {
        nb::gil_scoped_release release;
        save_layer_file(l.layer(), path, metadata);
      }, "path"_a, "metadata"_a = std::map<std::string, std::string>{})
      .def("parameters", [](nb::handle self) {
        Layer& l = nb::cast<Layer&>(self);
        return Layer::tensor_views(l.layer().parameters(), self);
      })
      .def("grads", [](nb::handle self) {
        Layer& l = nb::cast<Layer&>(self);
        return Layer::tensor_views(l.layer().grads(), self);
      })
      .def("update_selection_bias", [](Layer& l, const InArray& counts) {
        const int64_t n = l.layer().config().num_experts();
        check_array(counts, "tokens_per_expert", Elem::kI64, {n});
        l.layer().update_selection_bias({data_as<int64_t>(counts), static_cast<size_t>(n)});
      })
      .def("last_phases", [](Layer& l) {
        std::vector<std::pair<std::string, double>> out;
        for (const PhaseTime& p : l.layer().last_phases()) out.emplace_back(p.name, p.ms);
        return out;
      });
}
