// MoeLayerConfig: derived shapes, validation and the JSON form (one flat object holding the
// layer keys and the routing keys side by side, as Hugging Face model configs do).
#include <cmath>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/json.h"
#include "io/routing_config.h"
#include "moekit/error.h"
#include "moekit/layer.h"
#include "moekit/quant.h"

namespace moekit {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "fp32";
    case DType::kBF16: return "bf16";
    case DType::kInt8: return "int8";
    case DType::kInt4: return "int4";
    case DType::kMxfp4: return "mxfp4";
  }
  return "unknown";
}

const char* backend_name(Backend backend) {
  switch (backend) {
    case Backend::kCpu: return "cpu";
    case Backend::kCuda: return "cuda";
  }
  return "unknown";
}

int64_t MoeLayerConfig::router_rows() const {
  return routing.routing_method == RoutingMethod::kSoftMoe
             ? routing.num_experts * routing.slots_per_expert
             : routing.num_experts;
}

int64_t MoeLayerConfig::effective_shared_d_ff() const {
  if (num_shared_experts <= 0) return 0;
  return shared_d_ff > 0 ? shared_d_ff : num_shared_experts * d_ff;
}

void MoeLayerConfig::validate() const {
  routing.validate();
  if (d_model < 1) throw_config_error("d_model", ">= 1", d_model);
  if (d_ff < 1) throw_config_error("d_ff", ">= 1", d_ff);
  const int act = static_cast<int>(activation);
  if (act < 0 || act > static_cast<int>(ExpertActivation::kSwiGluClamped)) {
    throw_config_error("activation", "swiglu, gelu, gelu_erf, relu or swiglu_clamped", act);
  }
  if (activation == ExpertActivation::kSwiGluClamped) {
    const double limit = activation_constants.clamp_limit, alpha = activation_constants.clamp_alpha;
    if (!(limit > 0) || !std::isfinite(limit)) throw_config_error("clamp_limit", "a finite number > 0", limit);
    if (!std::isfinite(alpha)) throw_config_error("clamp_alpha", "a finite number", alpha);
  }
  if (num_shared_experts < 0) throw_config_error("num_shared_experts", ">= 0", num_shared_experts);
  if (shared_d_ff < 0) throw_config_error("shared_d_ff", ">= 0", shared_d_ff);
  if (shared_d_ff > 0 && num_shared_experts == 0) {
    throw_config_error("num_shared_experts", ">= 1 when shared_d_ff is set", num_shared_experts);
  }
  if (shared_expert_gate && num_shared_experts == 0) {
    throw_config_error("shared_expert_gate", "false when num_shared_experts is 0", "true");
  }
  const int dt = static_cast<int>(dtype);
  if (dt < 0 || dt > static_cast<int>(DType::kMxfp4)) {
    throw_config_error("dtype", "fp32, bf16, int8, int4 or mxfp4", dt);
  }
  if (is_quantized(dtype)) {
    // The quantized formats group the input dimension of both expert GEMMs by 32.
    if (d_model % kQuantGroup != 0) {
      throw_config_error("d_model", detail::concat("a multiple of ", kQuantGroup, " for dtype ", dtype_name(dtype)), d_model);
    }
    for (const auto& [key, width] : {std::pair{"d_ff", d_ff}, std::pair{"shared_d_ff", effective_shared_d_ff()}}) {
      if (width % kQuantGroup != 0) {
        throw_config_error(key, detail::concat("a multiple of ", kQuantGroup, " for dtype ", dtype_name(dtype)), width);
      }
    }
  }
  if (backend != Backend::kCpu && backend != Backend::kCuda) {
    throw_config_error("backend", "cpu or cuda", static_cast<int>(backend));
  }
  if (num_threads < 1 || num_threads > 1024) throw_config_error("num_threads", "in [1, 1024]", num_threads);
  // Row indices of the GEMM gathers are int32.
  if (d_model > std::numeric_limits<int32_t>::max()) {
    throw_config_error("d_model", "< 2^31", d_model);
  }
}

namespace {

using io::EnumName;

// Every layer field with its spellings: the canonical key first, then its aliases.
const std::vector<std::string> kDModelKeys = {"d_model", "hidden_size"};
const std::vector<std::string> kDFfKeys = {"d_ff", "intermediate_size", "moe_intermediate_size",
                                           "ffn_hidden_size"};
const std::vector<std::string> kActivationKeys = {"activation", "hidden_act"};
const std::vector<std::string> kClampLimitKeys = {"clamp_limit", "swiglu_limit"};
const std::vector<std::string> kNumSharedKeys = {"num_shared_experts", "n_shared_experts"};
const std::vector<std::string> kSharedDFfKeys = {"shared_d_ff", "shared_expert_intermediate_size"};

constexpr EnumName<ExpertActivation> kActivationNames[] = {
    {ExpertActivation::kSwiGlu, "swiglu"},
    {ExpertActivation::kSwiGlu, "silu"},
    {ExpertActivation::kGelu, "gelu"},
    {ExpertActivation::kGelu, "gelu_new"},
    {ExpertActivation::kGelu, "gelu_pytorch_tanh"},
    {ExpertActivation::kGeluErf, "gelu_erf"},
    {ExpertActivation::kRelu, "relu"},
    {ExpertActivation::kSwiGluClamped, "swiglu_clamped"},
};
// HF's hidden_act "gelu" is the exact erf GELU; our own key "gelu" is the tanh one.
constexpr EnumName<ExpertActivation> kHiddenActNames[] = {
    {ExpertActivation::kSwiGlu, "swiglu"},
    {ExpertActivation::kSwiGlu, "silu"},
    {ExpertActivation::kGeluErf, "gelu"},
    {ExpertActivation::kGelu, "gelu_new"},
    {ExpertActivation::kGelu, "gelu_pytorch_tanh"},
    {ExpertActivation::kGeluErf, "gelu_erf"},
    {ExpertActivation::kRelu, "relu"},
    {ExpertActivation::kSwiGluClamped, "swiglu_clamped"},
};

constexpr EnumName<DType> kDTypeNames[] = {
    {DType::kF32, "fp32"},
    {DType::kF32, "float32"},
    {DType::kBF16, "bf16"},
    {DType::kBF16, "bfloat16"},
    {DType::kInt8, "int8"},
    {DType::kInt4, "int4"},
    {DType::kMxfp4, "mxfp4"},
};

constexpr EnumName<Backend> kBackendNames[] = {
    {Backend::kCpu, "cpu"},
    {Backend::kCuda, "cuda"},
};

const std::vector<std::string> kSelectionBiasKeys = {"selection_bias", "moe_router_enable_expert_bias"};

// The thread pool is sized once per layer; more workers than this is a typo, not a machine.
constexpr int64_t kMaxThreads = 1024;

}  // namespace

MoeLayerConfig moe_layer_config_from_json(const std::string& json_text) {
  const io::Json root = io::parse_object(json_text, io::Document::kConfig);
  io::ObjectReader reader(root, io::Document::kConfig);
  MoeLayerConfig c;
  if (const auto v = reader.take_one_of(kDModelKeys, "d_model")) c.d_model = v->integer();
  if (const auto v = reader.take_one_of(kDFfKeys, "d_ff")) c.d_ff = v->integer();
  std::size_t which = 0;
  if (const auto v = reader.take_one_of(kActivationKeys, "activation", &which)) {
    c.activation = v->enumeration<ExpertActivation>(which == 0 ? std::span(kActivationNames)
                                                               : std::span(kHiddenActNames));
  }
  if (const auto v = reader.take_one_of(kClampLimitKeys, "clamp_limit")) {
    c.activation_constants.clamp_limit = v->number();
  }
  if (const auto v = reader.number("clamp_alpha")) c.activation_constants.clamp_alpha = *v;
  if (const auto v = reader.boolean("router_bias")) c.router_bias = *v;
  // Taken before the routing keys: in a layer config "expert_bias" is this flag, not the
  // routing alias of e_score_correction_bias.
  if (const auto v = reader.boolean("expert_bias")) c.expert_bias = *v;
  if (const auto v = reader.take_one_of(kNumSharedKeys, "num_shared_experts")) {
    c.num_shared_experts = v->integer();
  }
  if (const auto v = reader.take_one_of(kSharedDFfKeys, "shared_d_ff")) c.shared_d_ff = v->integer();
  if (const auto v = reader.boolean("shared_expert_gate")) c.shared_expert_gate = *v;
  if (const auto v = reader.enumeration<DType>("dtype", kDTypeNames)) c.dtype = *v;
  if (const auto v = reader.enumeration<Backend>("backend", kBackendNames)) c.backend = *v;
  if (const auto v = reader.take_one_of(kSelectionBiasKeys, "selection_bias")) c.selection_bias = v->boolean();
  if (const auto v = reader.integer("num_threads", 1, kMaxThreads)) c.num_threads = static_cast<int>(*v);
  c.routing = io::read_routing_config(reader);
  reader.reject_unknown_keys();
  c.validate();
  return c;
}

std::string moe_layer_config_to_json(const MoeLayerConfig& c) {
  // The routing keys as routing_config_to_json writes them, then the layer's own: the object
  // moe_layer_config_from_json reads back to the same config.
  nlohmann::ordered_json out = nlohmann::ordered_json::parse(routing_config_to_json(c.routing));
  auto name_of = [](auto value, const auto& names) {
    for (const auto& n : names)
      if (n.value == value) return std::string(n.name);
    return std::string("unknown");
  };
  out["d_model"] = c.d_model;
  out["d_ff"] = c.d_ff;
  out["activation"] = name_of(c.activation, kActivationNames);
  if (c.activation == ExpertActivation::kSwiGluClamped) {
    out["clamp_limit"] = c.activation_constants.clamp_limit;
    out["clamp_alpha"] = c.activation_constants.clamp_alpha;
  }
  out["router_bias"] = c.router_bias;
  out["expert_bias"] = c.expert_bias;
  out["num_shared_experts"] = c.num_shared_experts;
  out["shared_d_ff"] = c.shared_d_ff;
  out["shared_expert_gate"] = c.shared_expert_gate;
  out["selection_bias"] = c.selection_bias;
  out["dtype"] = dtype_name(c.dtype);
  out["backend"] = backend_name(c.backend);
  out["num_threads"] = c.num_threads;
  return out.dump(2);
}

}  // namespace moekit
