// The MoE layer: router, routed experts, optional shared experts; forward and backward, fp32 and
// bf16, on one persistent thread pool.
//
//   out_t = Σ_{kept (t, e)} w_te · E_e(x_t)  +  s_t · S(x_t)
//
// with E_e(x) = W_down,e · act(W_gate_up,e · x + b_gate_up,e) + b_down,e (see experts.h), w_te
// the plan's combine weight, S the shared MLP and s_t = σ(x_t · w_shared_gate) (Qwen2-MoE) or 1
// (DeepSeek). A dropped assignment contributes zero; the residual connection is the caller's.
// Soft MoE replaces the token sum by slots: per sequence, slot inputs X̃ = dispatchᵀ · X, expert
// e runs on its slots_per_expert slots, and out_t = Σ_j combine_tj · E_{e(j)}(X̃_j).
//
// How the forward runs (src/layer.cpp, a sequence of op calls; docs/architecture.md):
//   1. router logits x · W_routerᵀ + b by the router op, one fp32 GEMM (route_hidden runs the same
//      op on the jittered input when input jitter or noisy gating is on), then the routing core
//      turns them into the plan;
//   2. the plan's per-expert token lists (a counting sort, tokens ascending) are the row segments
//      of two grouped GEMMs; the first gathers its A rows straight from hidden_states (no
//      permuted copy) and applies the activation in its epilogue (SwiGLU on the paired
//      gate/up layout); the second applies the combine weight as a row scale;
//   3. the per-assignment outputs are summed per token in choice order, a fixed order, so the
//      output is bitwise identical for any num_threads.
// Work is split into (expert, row block, column block) tiles pulled from one queue by
// num_threads threads of the process-wide pool, so a hot expert still keeps every core busy.
// The expert FFN's implementation is chosen from (config.backend, config.dtype) when the layer
// is built: a pair this build lacks is a ConfigError naming both.
//
// Memory, with num_kept ≤ num_tokens · top_k the kept assignments (the shared expert counts as
// one more expert receiving all num_tokens tokens):
//   inference: h [num_kept, d_ff] (bf16 when dtype is bf16) and the per-assignment outputs
//              [num_kept, d_model], at most num_tokens · top_k · (d_model + d_ff) values;
//   training:  saved for backward: a copy of hidden_states [num_tokens, d_model], the
//              pre-activations [num_kept, 2·d_ff] (d_ff for ungated activations) and the routing
//              result (O(num_tokens · num_experts)), so at most num_tokens · top_k · (d_model +
//              2·d_ff) values plus the routing's; during the forward also the per-assignment
//              outputs [num_kept, d_model] and [num_threads · 128, d_ff] of scratch. Soft MoE
//              also keeps its slot inputs and outputs [num_sequences · num_slots, d_model];
//   backward:  [num_kept, 2·d_ff] and [num_kept, d_model] of scratch, the weights of the
//              experts that received rows packed as the backward reads them (one more copy of
//              those weights in the layer's dtype, kept until refresh_packed_weights(), so that
//              several backward passes per update pack once) and h and x packed as
//              weight-gradient operands ([num_kept, d_ff + d_model] in the layer's dtype).
// Scratch buffers are kept by the layer between calls (no page faults per call; large ones as
// transparent huge pages) and freed with it; packed weights are one more copy of the expert
// weights (fp32 or bf16 per dtype), packed lazily for the experts tokens reach (in training,
// experts with at most 4 rows read their weights in place and are not packed).
//
// Training step: after an optimizer update call refresh_packed_weights(); zero_grad() is lazy
// (see there). last_phases() tells where a forward or backward spent its time.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "moekit/backend.h"
#include "moekit/config.h"
#include "moekit/experts.h"
#include "moekit/params.h"
#include "moekit/routing.h"
#include "moekit/tensor.h"
#include "moekit/weights.h"

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
// bfloat16), num_threads. Throws ConfigError on an unknown key, wrong type or bad value.
MoeLayerConfig moe_layer_config_from_json(const std::string& json_text);
// The JSON object of `config` (routing and layer keys) that moe_layer_config_from_json reads
// back to the same config.
std::string moe_layer_config_to_json(const MoeLayerConfig& config);

// The parameter structs below have one field per row of kMoeParamSchema (params.h), in the
// table's order. This is where a row meets its field, the one list C++ needs besides the
// fields themselves (it cannot reach a field by its name; tests/test_param_schema.cpp checks
// each name against its field); a struct without a field for a row (MoeGradBuffers has none for
// the selection bias, which has no gradient) binds it to null.
namespace detail {
template <typename Struct>
constexpr auto moe_param_fields() {
  constexpr auto selection_bias = [] {
    if constexpr (requires { &Struct::selection_bias; }) {
      return &Struct::selection_bias;
    } else {
      return nullptr;
    }
  }();
  return std::tuple{&Struct::router_weight,    &Struct::router_bias,    &Struct::router_noise_weight,
                    &Struct::gate_up,          &Struct::down,           &Struct::gate_up_bias,
                    &Struct::down_bias,        &Struct::shared_gate_up, &Struct::shared_down,
                    &Struct::shared_gate_up_bias, &Struct::shared_down_bias, &Struct::shared_gate,
                    selection_bias};
}
template <typename Struct>
inline constexpr auto kMoeParamFields = moe_param_fields<Struct>();
}  // namespace detail

// The field of row `row` of kMoeParamSchema in `s` (a MoeParams, BasicMoeTensors or
// MoeGradBuffers, const or not).
template <size_t row, typename Struct>
constexpr auto& moe_param_field(Struct& s) {
  return s.*std::get<row>(detail::kMoeParamFields<std::remove_const_t<Struct>>);
}

// Calls fn(row, field) for every row of kMoeParamSchema that `s` has a field for, in the
// table's order; `row` is a std::integral_constant<size_t, i> (kMoeParamSchema[row] is its
// spec, moe_param_field<row>(other) the same parameter in another struct) and `field` a
// reference to the field, of its own type (a generic lambda tells them apart).
template <typename Struct, typename Fn>
constexpr void for_each_moe_field(Struct& s, Fn&& fn) {
  using Fields = std::remove_cv_t<decltype(detail::kMoeParamFields<std::remove_const_t<Struct>>)>;
  static_assert(std::tuple_size_v<Fields> == kNumMoeParams, "one field per row of kMoeParamSchema");
  [&]<size_t... rows>(std::index_sequence<rows...>) {
    (
        [&] {
          if constexpr (!std::is_null_pointer_v<std::tuple_element_t<rows, Fields>>) {
            fn(std::integral_constant<size_t, rows>{}, moe_param_field<rows>(s));
          }
        }(),
        ...);
  }(std::make_index_sequence<kNumMoeParams>{});
}

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

  // Calls fn(name, tensor) for every tensor, in declaration order (kMoeParamSchema's).
  template <typename Fn>
  void for_each(Fn&& fn) {
    for_each_moe_field(*this, [&](auto row, std::vector<Real>& v) { fn(kMoeParamSchema[row].name, v); });
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

  // Calls fn(name, span) for every buffer, in MoeTensors' order (names as there): every row of
  // kMoeParamSchema with a gradient. The non-const form passes each span by reference, to be
  // set.
  template <typename Fn>
  void for_each(Fn&& fn) {
    for_each_moe_field(*this, [&](auto row, std::span<float>& v) {
      static_assert(kMoeParamSchema[decltype(row)::value].has_gradient,
                    "a gradient buffer for a parameter without a gradient");
      fn(kMoeParamSchema[row].name, v);
    });
  }
  template <typename Fn>
  void for_each(Fn&& fn) const {
    const_cast<MoeGradBuffers*>(this)->for_each([&](const char* name, std::span<float>& v) { fn(name, v); });
  }
};

struct MoeBackwardOptions {
  // Where the parameter gradients go: written (assigned) there; null: accumulated into grads().
  const MoeGradBuffers* into = nullptr;
  // dL/d aux_loss and dL/d z_loss; unset: routing.router_aux_loss_coef and router_z_loss_coef
  // (the losses as the config weights them). A front end whose losses are graph outputs passes
  // the gradients they received.
  std::optional<double> d_aux_loss;
  std::optional<double> d_z_loss;
};

// Views of owned gradient tensors as buffers (every tensor of `t` but the selection bias).
MoeGradBuffers moe_grad_buffers(MoeTensors& t);

// What one training forward keeps for its backward (a copy of hidden_states, the routing
// result, the pre-activations; see the memory note at the top), taken out of the layer by
// MoeLayer::take_forward_state() so that several forwards may precede their backwards, in any
// order (PyTorch autograd, activation checkpointing). Move-only; empty when default-made.
struct MoeSavedForward;
class MoeForwardState {
 public:
  MoeForwardState();
  ~MoeForwardState();
  MoeForwardState(MoeForwardState&&) noexcept;
  MoeForwardState& operator=(MoeForwardState&&) noexcept;
  bool empty() const;

 private:
  friend class MoeLayer;
  std::unique_ptr<MoeSavedForward> saved_;
};

// fp32 views of owned tensors (the layout MoeParams expects).
MoeParams moe_params_view(const MoeLayerConfig& config, const MoeTensors& tensors);

// The parameters behind `params` copied into owned fp32 tensors of MoeTensors' layout, read
// through the views' strides, split halves and per-expert pointers (bf16 widened exactly): what
// a front end that owns its parameters (a fine-tuned PyTorch module) starts from.
MoeTensors moe_tensors_from_params(const MoeLayerConfig& config, const MoeParams& params);

// Throws InputError unless every view has the shape `config` asks for (names the parameter,
// the expected and the actual shape).
void check_moe_params(const MoeLayerConfig& config, const MoeParams& params);

// Wall time of one phase of the last forward or backward call (MoeLayer::last_phases()).
struct PhaseTime {
  std::string name;
  double ms = 0;
};

struct MoeForwardResult {
  Matrix<float> output;           // [num_tokens, d_model]
  RoutingResult<float> routing;   // plan, losses, statistics (and what routing's backward needs)
};

class MoeLayer {
 public:
  // Owns its parameters, initialised from `seed` like PyTorch's nn.Linear: every weight and bias
  // of a Linear with fan_in inputs is drawn from U(−1/√fan_in, 1/√fan_in) (router, experts,
  // shared experts, shared gate), by a counter-based generator, so the values do not depend on
  // the thread count. Noisy-gating noise weights start at zero.
  MoeLayer(const MoeLayerConfig& config, uint64_t seed);

  // Borrows `params`: the memory must outlive the layer. Expert weights are packed into the
  // kernels' layout on the first forward (a one-time copy: fp32 or bf16 per config.dtype); call
  // refresh_packed_weights() after changing the borrowed values.
  MoeLayer(const MoeLayerConfig& config, const MoeParams& params);

  ~MoeLayer();
  MoeLayer(MoeLayer&&) noexcept;
  MoeLayer& operator=(MoeLayer&&) noexcept;

  const MoeLayerConfig& config() const { return config_; }
  // Routing in training mode (noise, training capacity factor, saving for backward). For gated
  // activations the first GEMM's weights are packed per mode (paired for the fused SwiGLU in
  // inference, plain in training, which keeps the raw pre-activations), so switching re-packs
  // them on the next forward.
  void set_training(bool training);
  // Keep what backward needs after eval-mode forwards too (default: only in training), so a
  // gradient can be taken through the eval routing (no noise, the eval capacity factor) — a
  // frozen-router fine-tune, or PyTorch autograd through a module in eval(). Training
  // forwards always save.
  void set_save_for_backward(bool save);
  bool saves_for_backward() const;
  bool owns_parameters() const { return owned_ != nullptr; }

  // Owned parameters (fp32 master copy; for dtype bf16 the layer computes with a bf16 rounding
  // of them). Throws std::logic_error for a borrowing layer. After changing them (an optimiser
  // step), call refresh_packed_weights().
  MoeTensors& parameters();
  const MoeTensors& parameters() const;
  // The views the layer computes with.
  const MoeParams& params() const;

  // Re-packs expert weights (and, when owned and bf16, re-rounds the bf16 copy).
  void refresh_packed_weights();

  // hidden_states [num_tokens, d_model] → output [num_tokens, d_model], plan, losses, stats.
  // options.num_threads is replaced by config().num_threads. With routing.training set, the
  // forward keeps what backward needs (see the memory note at the top).
  MoeForwardResult forward(ConstMatrixView<float> hidden_states,  // [num_tokens, d_model]
                           const RoutingOptions& options = {});

  // Gradient of L = ⟨d_output, output⟩ + router_aux_loss_coef · aux_loss
  //                 + router_z_loss_coef · z_loss
  // for the last training forward. Returns d_hidden_states [num_tokens, d_model] and
  // ACCUMULATES (+=) every parameter gradient into grads(): call zero_grad() to start a new
  // step. The router weight and bias receive the gradient through the combine weights
  // (dL/dw_te = ⟨d_output_t, E_e(x_t)⟩) and through the losses. The backward consumes the saved
  // state: one backward per training forward. With dtype bf16 every expert GEMM has bf16
  // operands and fp32 accumulation, as PyTorch's autocast runs the backward matmuls: those
  // against the weights round their other operand (d_y, d_pre) to bf16, and the weight-gradient
  // GEMMs round both (w ⊙ d_y and h; d_pre and x). Gradients are always stored in fp32.
  Matrix<float> backward(ConstMatrixView<float> d_output);  // [num_tokens, d_model]

  // The state the last training forward saved, moved out of the layer (the layer then holds
  // none). Empty when the last forward was not a training forward or was already consumed.
  MoeForwardState take_forward_state();

  // The backward of the forward that saved `state` (consumed: empty afterwards). Without `into`
  // the parameter gradients accumulate into grads() as above; with `into` they are written
  // (assigned) there and grads() is left untouched. The packed weights must be those of that
  // forward: do not change the parameters in between (PyTorch's version counters guard this).
  Matrix<float> backward(ConstMatrixView<float> d_output,  // [num_tokens, d_model]
                         MoeForwardState& state, const MoeBackwardOptions& options = {});

  // Threads of the process-wide pool the next calls use (results do not depend on it).
  void set_num_threads(int num_threads);

  // Aux-loss-free balancing of an owned layer's selection bias, between steps:
  //   bias_e += routing.expert_bias_update_rate · sign(mean load − load_e)
  // with load_e = tokens_per_expert[e], e.g. the last forward's stats.selected_per_expert (the
  // load before capacity drops, as DeepSeek-V3 and Megatron count it). A borrowing layer's
  // caller updates its own tensor (update_expert_bias()). Throws std::logic_error when the
  // layer has no selection bias or borrows it.
  void update_selection_bias(std::span<const int64_t> tokens_per_expert);  // [num_experts]

  // Gradient buffers are allocated on first use (the first backward or a call of grads() or
  // zero_grad()), so an inference-only layer never holds them.
  const MoeTensors& grads() const;
  MoeTensors& grads();
  // Zeroes every gradient. The expert weight gradients are zeroed lazily: the next backward
  // writes (not adds) those of the experts that receive rows, and grads() fills the rest, so
  // a training step does not read or clear gradient memory it does not need to.
  void zero_grad();

  // Name of the kernel path in use ("avx512bf16", "scalar", ...).
  const char* isa_name() const;

  // Where the last forward() or backward() spent its time, phase by phase in the order they
  // ran (forward: "pack_router", "router", "routing", "dispatch", "pack_experts", "gemm1",
  // "gemm2", "combine", "save"; backward: "setup", "pack_down_t", "d_h", "activation",
  // "pack_h", "d_w_down", "transpose", "pack_x", "d_w_gate_up", "pack_gate_up_t", "d_x_rows",
  // "d_x", "router"). Two clock reads per phase: always on.
  const std::vector<PhaseTime>& last_phases() const;

  struct Impl;

 private:
  Matrix<float> run_backward(ConstMatrixView<float> d_output, MoeSavedForward& saved,
                             const MoeGradBuffers& grads, std::vector<uint8_t>& pending_zero, double d_aux_loss,
                             double d_z_loss);
  void ensure_grads();
  void materialize_zero_grads();
  const MoeParams& compute_params() const;  // params_, or an owned bf16 layer's fp32 masters

  MoeLayerConfig config_;
  std::unique_ptr<MoeTensors> owned_;  // fp32 master parameters when owned
  MoeParams params_;
  MoeTensors grads_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moekit
