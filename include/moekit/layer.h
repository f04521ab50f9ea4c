// The MoE layer: router, routed experts, optional shared experts; forward and backward with fp32
// or bf16 experts, forward (inference) with quantized experts (int8, int4, MXFP4: quant.h), on
// one persistent thread pool.
//
//   out_t = Σ_{kept (t, e)} w_te · E_e(x_t)  +  s_t · S(x_t)
//
// with E_e(x) = W_down,e · act(W_gate_up,e · x + b_gate_up,e) + b_down,e (see experts.h), w_te
// the plan's combine weight, S the shared MLP and s_t = σ(x_t · w_shared_gate) (Qwen2-MoE) or 1
// (DeepSeek). A dropped assignment contributes zero; the residual connection is the caller's.
// Soft MoE replaces the token sum by slots: per sequence, slot inputs X̃ = dispatchᵀ · X, expert
// e runs on its slots_per_expert slots, and out_t = Σ_j combine_tj · E_{e(j)}(X̃_j).
//
// How the forward runs (src/layer.cpp: the four stage calls of moekit/stages.h, which a front end
// may also run itself; docs/architecture.md):
//   1. route: router logits x · W_routerᵀ + b by the router op, one fp32 GEMM (route_hidden runs
//      the same op on the jittered input when input jitter or noisy gating is on), then the
//      routing method turns them into the plan;
//   2. permute: the plan's per-expert token lists (a counting sort, tokens ascending) are the row
//      segments of two grouped GEMMs, read straight from hidden_states (no permuted copy);
//   3. experts: the first GEMM gathers its A rows through those lists and applies the activation
//      in its epilogue (SwiGLU on the paired gate/up layout); the second applies the combine
//      weight as a row scale;
//   4. combine: the per-assignment outputs are summed per token in choice order, a fixed order,
//      so the output is bitwise identical for any num_threads.
// Work is split into (expert, row block, column block) tiles pulled from one queue by
// num_threads threads of the process-wide pool, so a hot expert still keeps every core busy.
// Every stage runs on the backend object of config.backend (src/ops/backend.h), asked when the
// layer is built whether it implements each op for config.dtype: a pair this build lacks, or an
// inference-only format (int8, int4, MXFP4) in a layer built for training, is a ConfigError
// naming both then; a training forward of an inference-only layer fails before any work.
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
#include <utility>
#include <vector>

#include "moekit/layer_config.h"
#include "moekit/params.h"
#include "moekit/routing.h"
#include "moekit/tensor.h"
#include "moekit/timing.h"

namespace moekit {

struct MoeBackwardOptions {
  // Where the parameter gradients go: written (assigned) there; null: accumulated into grads().
  const MoeGradBuffers* into = nullptr;
  // dL/d aux_loss and dL/d z_loss; unset: routing.router_aux_loss_coef and router_z_loss_coef
  // (the losses as the config weights them). A front end whose losses are graph outputs passes
  // the gradients they received.
  std::optional<double> d_aux_loss;
  std::optional<double> d_z_loss;
};

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
  // ran (forward: "save_input" (training), "pack_router", "router", "routing", "dispatch",
  // "pack_experts", "gemm1",
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
