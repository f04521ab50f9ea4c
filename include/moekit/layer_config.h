// The configuration of one MoE layer: its routing (config.h), its widths, activation, biases,
// shared experts, weight format and backend, validated, and read from / written to JSON with
// Hugging Face key names.
#pragma once

#include <cstdint>
#include <string>

#include "moekit/backend.h"
#include "moekit/config.h"
#include "moekit/experts.h"

namespace moekit {

struct MoeLayerConfig {
  RoutingConfig routing;
  int64_t d_model = 0;
  int64_t d_ff = 0;  // hidden width of one routed expert
  ExpertActivation activation = ExpertActivation::kSwiGlu;
  ActivationConstants activation_constants;  // swiglu_clamped only
  bool router_bias = false;                  // the router Linear has a bias
  bool expert_bias = false;                  // routed and shared expert Linears have biases
  // Shared experts see every token. They are evaluated as one MLP of width shared_d_ff (HF
  // Qwen2-MoE shared_expert; DeepSeek's n_shared_experts MLPs of moe_intermediate_size are one
  // MLP of their summed width). shared_d_ff = 0 means num_shared_experts · d_ff.
  int64_t num_shared_experts = 0;
  int64_t shared_d_ff = 0;
  bool shared_expert_gate = false;  // Qwen2-MoE: shared output × σ(x · w_shared_gate)
  // The aux-loss-free selection bias (DeepSeek-V3 e_score_correction_bias, Megatron expert
  // bias) is a parameter of the layer, [num_experts]: owned (initialised from
  // routing.e_score_correction_bias, else zeros) or borrowed (MoeParams::selection_bias). It
  // is there when this is set or routing.e_score_correction_bias is given.
  bool selection_bias = false;
  DType dtype = DType::kF32;      // weight format of the experts
  Backend backend = Backend::kCpu;
  int num_threads = 1;            // threads of the process-wide pool this layer's calls use

  // Derived shapes.
  int64_t num_experts() const { return routing.num_experts; }
  // Router rows: num_experts, or num_experts · slots_per_expert for Soft MoE.
  int64_t router_rows() const;
  int64_t gate_up_rows() const { return is_gated(activation) ? 2 * d_ff : d_ff; }
  bool has_shared() const { return num_shared_experts > 0; }
  bool has_selection_bias() const { return selection_bias || !routing.e_score_correction_bias.empty(); }
  int64_t effective_shared_d_ff() const;
  int64_t shared_gate_up_rows() const {
    return is_gated(activation) ? 2 * effective_shared_d_ff() : effective_shared_d_ff();
  }

  // Throws ConfigError naming the field, the expected and the actual value.
  void validate() const;
};

// Parses a JSON object: the layer keys below plus any routing key (see config.h) in the same
// object, Hugging Face style. Layer keys (aliases in brackets): d_model [hidden_size],
// d_ff [intermediate_size, moe_intermediate_size, ffn_hidden_size], activation [hidden_act:
// silu→swiglu, gelu→gelu_erf, gelu_new/gelu_pytorch_tanh→gelu, relu], clamp_limit
// [swiglu_limit], clamp_alpha, router_bias, expert_bias, num_shared_experts [n_shared_experts],
// shared_d_ff [shared_expert_intermediate_size], shared_expert_gate, dtype (fp32|float32|bf16|
// bfloat16|int8|int4|mxfp4; the last three inference only), num_threads. Throws ConfigError on an unknown key, wrong type or bad value.
MoeLayerConfig moe_layer_config_from_json(const std::string& json_text);
// The JSON object of `config` (routing and layer keys) that moe_layer_config_from_json reads
// back to the same config.
std::string moe_layer_config_to_json(const MoeLayerConfig& config);

}  // namespace moekit
