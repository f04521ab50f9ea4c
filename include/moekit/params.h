// The parameters of one MoE layer: views of memory the layer does not own (MoeParams), owned
// tensors (MoeTensors, also the gradients) and gradient buffers a caller owns (MoeGradBuffers).
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "moekit/layer_config.h"
#include "moekit/tensor.h"
#include "moekit/weights.h"

namespace moekit {

// The parameters a layer computes with, as views of memory it does not own (Python tensors,
// memory-mapped safetensors). Weights follow the Hugging Face layout (out × in); biases, the
// router and the shared gate are fp32.
struct MoeParams {
  ConstMatrixView<float> router_weight;        // [router_rows, d_model]
  std::span<const float> router_bias;          // [router_rows] or empty
  ConstMatrixView<float> router_noise_weight;  // [num_experts, d_model], noisy gating only
  WeightView gate_up;                          // [num_experts, gate_up_rows, d_model]
  WeightView down;                             // [num_experts, d_model, d_ff]
  std::span<const float> gate_up_bias;         // [num_experts · gate_up_rows] or empty
  std::span<const float> down_bias;            // [num_experts · d_model] or empty
  WeightView shared_gate_up;                   // [1, shared_gate_up_rows, d_model] or empty
  WeightView shared_down;                      // [1, d_model, shared_d_ff] or empty
  std::span<const float> shared_gate_up_bias;  // [shared_gate_up_rows] or empty
  std::span<const float> shared_down_bias;     // [d_model] or empty
  std::span<const float> shared_gate;          // [d_model] (the [1, d_model] gate) or empty
  std::span<const float> selection_bias;       // [num_experts] or empty (has_selection_bias())
};

// Owning flat storage of every parameter (or gradient), shapes as in MoeParams. Tensors a
// config does not use are empty.
template <typename Real>
struct BasicMoeTensors {
  std::vector<Real> router_weight;        // [router_rows, d_model]
  std::vector<Real> router_bias;          // [router_rows]
  std::vector<Real> router_noise_weight;  // [num_experts, d_model]
  std::vector<Real> gate_up;              // [num_experts, gate_up_rows, d_model]
  std::vector<Real> down;                 // [num_experts, d_model, d_ff]
  std::vector<Real> gate_up_bias;         // [num_experts, gate_up_rows]
  std::vector<Real> down_bias;            // [num_experts, d_model]
  std::vector<Real> shared_gate_up;       // [shared_gate_up_rows, d_model]
  std::vector<Real> shared_down;          // [d_model, shared_d_ff]
  std::vector<Real> shared_gate_up_bias;  // [shared_gate_up_rows]
  std::vector<Real> shared_down_bias;     // [d_model]
  std::vector<Real> shared_gate;          // [d_model]
  std::vector<Real> selection_bias;       // [num_experts] (no gradient: it only selects)

  // Calls fn(name, tensor) for every tensor, in declaration order.
  template <typename Fn>
  void for_each(Fn&& fn) {
    fn("router_weight", router_weight);
    fn("router_bias", router_bias);
    fn("router_noise_weight", router_noise_weight);
    fn("gate_up", gate_up);
    fn("down", down);
    fn("gate_up_bias", gate_up_bias);
    fn("down_bias", down_bias);
    fn("shared_gate_up", shared_gate_up);
    fn("shared_down", shared_down);
    fn("shared_gate_up_bias", shared_gate_up_bias);
    fn("shared_down_bias", shared_down_bias);
    fn("shared_gate", shared_gate);
    fn("selection_bias", selection_bias);
  }
  template <typename Fn>
  void for_each(Fn&& fn) const {
    const_cast<BasicMoeTensors*>(this)->for_each(
        [&](const char* name, std::vector<Real>& v) { fn(name, std::as_const(v)); });
  }
};

using MoeTensors = BasicMoeTensors<float>;

// Zero-filled tensors of the sizes `config` uses.
template <typename Real>
BasicMoeTensors<Real> make_moe_tensors(const MoeLayerConfig& config);

// (name, element count) of every tensor of MoeTensors in declaration order; 0 for a tensor the
// config does not use.
std::vector<std::pair<const char*, int64_t>> moe_tensor_sizes(const MoeLayerConfig& config);

// Gradient memory the caller owns (fresh PyTorch .grad tensors, say), fp32, shapes as in
// MoeTensors; empty spans where the config has no such tensor. backward(…, into) writes the
// gradients of that one backward there (assigns, never accumulates), so the caller need not
// clear them first and the layer keeps no gradient memory of its own for that call.
struct MoeGradBuffers {
  std::span<float> router_weight;        // [router_rows, d_model]
  std::span<float> router_bias;          // [router_rows]
  std::span<float> router_noise_weight;  // [num_experts, d_model]
  std::span<float> gate_up;              // [num_experts, gate_up_rows, d_model]
  std::span<float> down;                 // [num_experts, d_model, d_ff]
  std::span<float> gate_up_bias;         // [num_experts, gate_up_rows]
  std::span<float> down_bias;            // [num_experts, d_model]
  std::span<float> shared_gate_up;       // [shared_gate_up_rows, d_model]
  std::span<float> shared_down;          // [d_model, shared_d_ff]
  std::span<float> shared_gate_up_bias;  // [shared_gate_up_rows]
  std::span<float> shared_down_bias;     // [d_model]
  std::span<float> shared_gate;          // [d_model]

  // Calls fn(name, span) for every buffer, in MoeTensors' order (names as there); the
  // non-const form passes each span by reference, to be set.
  template <typename Fn>
  void for_each(Fn&& fn) {
    fn("router_weight", router_weight);
    fn("router_bias", router_bias);
    fn("router_noise_weight", router_noise_weight);
    fn("gate_up", gate_up);
    fn("down", down);
    fn("gate_up_bias", gate_up_bias);
    fn("down_bias", down_bias);
    fn("shared_gate_up", shared_gate_up);
    fn("shared_down", shared_down);
    fn("shared_gate_up_bias", shared_gate_up_bias);
    fn("shared_down_bias", shared_down_bias);
    fn("shared_gate", shared_gate);
  }
  template <typename Fn>
  void for_each(Fn&& fn) const {
    const_cast<MoeGradBuffers*>(this)->for_each([&](const char* name, std::span<float>& v) { fn(name, v); });
  }
};

// Views of owned gradient tensors as buffers (every tensor of `t` but the selection bias).
MoeGradBuffers moe_grad_buffers(MoeTensors& t);

// fp32 views of owned tensors (the layout MoeParams expects).
MoeParams moe_params_view(const MoeLayerConfig& config, const MoeTensors& tensors);

// The parameters behind `params` copied into owned fp32 tensors of MoeTensors' layout, read
// through the views' strides, split halves and per-expert pointers (bf16 widened exactly): what
// a front end that owns its parameters (a fine-tuned PyTorch module) starts from.
MoeTensors moe_tensors_from_params(const MoeLayerConfig& config, const MoeParams& params);

// Throws InputError unless every view has the shape `config` asks for (names the parameter,
// the expected and the actual shape).
void check_moe_params(const MoeLayerConfig& config, const MoeParams& params);

}  // namespace moekit
