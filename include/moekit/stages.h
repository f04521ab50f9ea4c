// The MoE layer's forward and backward as four stages, each with its backward beside it:
//
//   route    x → logits (router projection) → plan, losses, statistics (the routing method)
//   permute  plan → expert-major rows: per expert the tokens it keeps, ascending (on the CPU an
//            index list the first GEMM gathers through: no copy); Soft MoE: the slot inputs;
//            the shared expert's rows (every token, scaled by its gate)
//   experts  the grouped FFN over each expert's contiguous segment of rows, the combine weight
//            applied as a row scale or left to the combine (CombineWeights)
//   combine  rows → tokens: out_t = Σ_{kept choices i of t, in choice order} w_i · y_i (+ shared)
//
// backward, in reverse:
//   combine_backward  d_out → where each segment reads its d_y (in place, or materialised when
//                     the combine applied the weights: w_i · d_out_t), d_w, Soft MoE's d_combine
//   experts_backward  d_y → d_rows (d_X per row), d_scale, the expert weight gradients
//   permute_backward  d_rows → d_x (the token sum in choice order; Soft MoE: the dispatch
//                     backward), d_w from d_scale, the shared gate's backward
//   route_backward    d_w, d_aux, d_z → d_logits → d_x += d_logits·W, the router's gradients
//
// MoeLayer::forward and backward are these calls in this order. A front end may run them itself
// and put something between them — an exchange of rows between processes between permute and
// experts and between experts and combine — as long as the rows a stage receives are laid out as
// the segments say. Every stage runs on the backend object chosen from config.backend when the
// MoeStages is made (what it cannot do for config.dtype is a ConfigError then).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "moekit/layer_config.h"
#include "moekit/params.h"
#include "moekit/plan.h"
#include "moekit/routing.h"
#include "moekit/tensor.h"
#include "moekit/timing.h"

namespace moekit {

// Where the combine weight w_te is multiplied in: by the experts stage (the second GEMM's row
// scale; the combine is then a plain sum) or by the combine (the experts' rows are unweighted,
// so they can travel to another process and back without the weights).
enum class CombineWeights { kInExperts, kInCombine };

// Where rows are read: row i of a segment at data + (rows ? rows[i] : i) · d_model.
struct RowSource {
  const float* data = nullptr;
  const int32_t* rows = nullptr;  // a gather (token indices), or null: contiguous
};

// One expert's contiguous segment of the stage's rows.
struct ExpertSegment {
  int64_t expert = 0;        // weight index in [0, num_experts); num_experts: the shared expert
  int64_t row_begin = 0;     // first row of the segment in the stage's rows
  int64_t num_rows = 0;
  RowSource input;           // the segment's input rows [num_rows, d_model]
  const float* scale = nullptr;  // [num_rows] row scale applied by the experts stage, or null (1)
};

// The permute stage's output: expert-major rows. Routed experts in expert order (a segment per
// expert, empty ones included), then the shared expert. The segments' pointers refer to the
// plan, the hidden states and the members below: keep those alive and in place while the rows
// are used.
struct ExpertRows {
  std::vector<ExpertSegment> segments;
  int64_t routed_rows = 0;    // rows of routed experts (kept assignments, or Soft MoE slots)
  int64_t total_rows = 0;     // routed_rows plus the shared expert's num_tokens rows
  CombineWeights weights = CombineWeights::kInExperts;
  Matrix<float> slot_inputs;  // Soft MoE: [num_experts · num_sequences · slots_per_expert, d_model]
  std::vector<float> shared_gate;  // [num_tokens] σ(⟨x_t, w_shared_gate⟩) (Qwen2-MoE), or empty
  int64_t num_sequences = 1;  // Soft MoE: sequences the slots are per
};

// What a training forward of the experts stage keeps for its backward.
struct ExpertsSaved {
  std::vector<float> pre_activations;  // per segment its [num_rows, gate_up_rows] block
};

// What a training forward of the combine keeps: the experts' output rows when the combine's
// backward needs them (Soft MoE's slots; the weights applied in the combine).
struct CombineSaved {
  Matrix<float> rows;  // [routed_rows, d_model] or empty
};

// Where each segment reads its output gradient d_y (per segment, as RowSource), and the
// materialised rows when they had to be computed.
struct ExpertRowGrads {
  std::vector<RowSource> d_output;  // [segments]
  Matrix<float> storage;            // [routed_rows, d_model] when materialised
};

struct ExpertsBackward {
  ConstMatrixView<float> d_rows;  // [total_rows, d_model] d_X per row (valid until the next call)
  std::vector<float> d_scale;     // [total_rows] dL/d(row scale); 0 for rows without a scale
};

// Where experts_backward puts the expert weight gradients: the layer's buffers, and per expert
// (index num_experts: the shared expert) whether they are pending zero (written, not added to;
// cleared for every expert that received rows).
struct ExpertGradTargets {
  const MoeGradBuffers* grads = nullptr;
  std::vector<uint8_t>* pending_zero = nullptr;  // [num_experts + 1]
};

class MoeStages {
 public:
  // The backend object for config.backend; ConfigError when it lacks an op the config needs for
  // config.dtype (for training too when config.routing.training is set).
  explicit MoeStages(const MoeLayerConfig& config);
  ~MoeStages();
  MoeStages(MoeStages&&) noexcept;
  MoeStages& operator=(MoeStages&&) noexcept;

  const MoeLayerConfig& config() const;
  void set_num_threads(int num_threads);
  // Routing in training mode (noise, jitter, the training capacity factor): config().routing.training.
  void set_training(bool training);
  // Whether the backend trains with config.dtype (forwards that save state, backward).
  bool can_train() const;
  // ConfigError naming the backend and the weight format unless can_train().
  void require_training() const;
  // The kernel path in use, e.g. "avx512bf16".
  const char* kernel_path() const;
  // The weights changed: nothing kept from them (packed router and expert weights) is used again.
  void invalidate_weights();
  // Phase times of the calls from here on go to `out` (cleared), or nowhere when null.
  void start_timing(std::vector<PhaseTime>* out);
  void phase(const char* name);

  // ---- route: logits = x·W_routerᵀ + b, then the routing method (routing.h). With input jitter
  // or noisy gating the routing core projects the (jittered) input itself.
  RoutingResult<float> route(const MoeParams& params,
                             ConstMatrixView<float> hidden_states,  // [num_tokens, d_model]
                             const RoutingOptions& options);
  // d_logits from the routing gradient, then d_x += d_logits · W (+ the noise and jitter paths)
  // and the router's gradients accumulated into grads.
  void route_backward(const MoeParams& params, ConstMatrixView<float> hidden_states,  // [num_tokens, d_model]
                      const RoutingResult<float>& routing, const RoutingGradOutput<float>& d_routing,
                      MatrixView<float> d_hidden_states,  // [num_tokens, d_model], accumulated
                      const MoeGradBuffers& grads);

  // ---- permute: the plan's rows (no copy of hidden_states on the CPU).
  ExpertRows permute(const MoeParams& params, const RoutingPlan& plan,
                     ConstMatrixView<float> hidden_states,  // [num_tokens, d_model]
                     int64_t sequence_length, CombineWeights weights = CombineWeights::kInExperts);
  // d_hidden_states = Σ over each token's rows of d_rows (choice order; Soft MoE: the dispatch
  // backward), written; d_routing's d_token_weights (from d_scale, weights in the experts) or
  // d_dispatch; the shared gate's gradient accumulated into grads.shared_gate.
  void permute_backward(const MoeParams& params, const RoutingPlan& plan, const ExpertRows& rows,
                        ConstMatrixView<float> hidden_states,  // [num_tokens, d_model]
                        const ExpertsBackward& d_experts, MatrixView<float> d_hidden_states,
                        RoutingGradOutput<float>& d_routing, const MoeGradBuffers& grads);

  // ---- experts: y [total_rows, d_model] (valid until the next experts call). `params` are the
  // weights computed with (a bf16 layer owning fp32 masters passes the masters: every path rounds
  // them as it packs). With `saved` (training) the pre-activations are kept there.
  ConstMatrixView<float> experts(const MoeParams& params, const ExpertRows& rows, ExpertsSaved* saved);
  // The backward of experts for the same rows; consumes `saved`.
  ExpertsBackward experts_backward(const MoeParams& params, const ExpertRows& rows, const ExpertRowGrads& d_y,
                                   ExpertsSaved& saved, const ExpertGradTargets& targets);

  // ---- combine: out [num_tokens, d_model] written. With `saved` (training) keeps what the
  // backward needs.
  void combine(const RoutingPlan& plan, const ExpertRows& rows,
               ConstMatrixView<float> y,  // [total_rows, d_model]
               MatrixView<float> out,     // [num_tokens, d_model]
               CombineSaved* saved);
  // Where each segment reads d_y; fills d_routing's d_token_weights (weights in the combine) or
  // d_combine (Soft MoE).
  ExpertRowGrads combine_backward(const RoutingPlan& plan, const ExpertRows& rows,
                                  ConstMatrixView<float> d_out,  // [num_tokens, d_model]
                                  const CombineSaved& saved, RoutingGradOutput<float>& d_routing);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace moekit
