// The grouped expert FFN over the row space (row_space.h) and its backward.
//
// Forward, per group e with rows R_e (A = X[R_e], gathered in place):
//   pre = X[R_e] · W_gate_upᵀ + b_gate_up            GEMM 1, the activation in its epilogue
//   h   = act(pre)
//   y   = w ⊙ (h · W_downᵀ + b_down)                 GEMM 2, the combine weight as a row scale
// Backward, same groups (d_y row i = Group::dy + src(i)·d_model, the gathered output gradient):
//   G        = d_y · W_down                           [R_e, d_ff]
//   d_w      = ⟨G, h⟩ + ⟨d_y, b_down⟩                  (= ⟨d_out_t, E_e(x_t)⟩ per row)
//   d_pre    = act'(pre) ⊙ (w · G)                    (from the saved pre-activations)
//   dW_down  += (w ⊙ d_y)ᵀ · h,   db_down += Σ w ⊙ d_y
//   dW_gate_up += d_preᵀ · X[R_e],  db_gate_up += Σ d_pre
//   d_X[R_e]  = d_pre · W_gate_up                     (per row; the caller sums rows per token)
//
// An implementation is chosen per (backend, weight format) by make_expert_ffn; it owns its
// caches (weights packed into the kernels' layout, kept until invalidate()) and its scratch
// memory, so the views it returns stay valid until its next call.
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "moekit/backend.h"
#include "moekit/experts.h"
#include "moekit/tensor.h"
#include "ops/context.h"
#include "ops/row_space.h"

namespace moekit::ops {

struct ExpertFfnConfig {
  Backend backend = Backend::kCpu;
  DType weight_format = DType::kF32;  // the format the GEMMs multiply in
  int64_t d_model = 0;
  int64_t num_groups = 0;  // routed experts, plus one for the shared expert
  ExpertActivation activation = ExpertActivation::kSwiGlu;
  ActivationConstants activation_constants;
};

// What a training forward keeps for the backward: per group its [num_rows, gu_cols] block of
// pre-activations (at gu_offset), the experts stage's saved state (moekit/stages.h).
using ExpertFfnSaved = ExpertsSaved;

// Where the backward puts each group's weight gradients (per group of the row space).
struct ExpertGrads {
  float* d_gate_up = nullptr;       // [gu_cols, d_model]
  float* d_down = nullptr;          // [d_model, d_ff]
  float* d_gate_up_bias = nullptr;  // [gu_cols] or null (accumulated)
  float* d_down_bias = nullptr;     // [d_model] or null (accumulated)
  bool accumulate = true;           // false: d_gate_up and d_down are written, not added to
};

struct ExpertFfnBackwardResult {
  ConstMatrixView<float> d_rows;  // [total_rows, d_model]: d_X per row (valid until next call)
  std::vector<float> d_scale;     // [total_rows] dL/d(row scale); 0 for rows without a scale
};

class ExpertFfn {
 public:
  virtual ~ExpertFfn() = default;

  // The expert weights changed (an optimizer step, new borrowed values): nothing packed from
  // them may be used again.
  virtual void invalidate() = 0;

  // y [total_rows, d_model] per row of the row space (valid until the next call). With `saved`
  // (training) the pre-activations are kept there for backward.
  virtual ConstMatrixView<float> forward(const OpContext& ctx, const RowSpace& rs, ExpertFfnSaved* saved) = 0;

  // The backward of forward for the same row space (Group::dy set); consumes `saved` (its
  // pre-activations are overwritten by their gradients). grads: one entry per group.
  virtual ExpertFfnBackwardResult backward(const OpContext& ctx, const RowSpace& rs, ExpertFfnSaved& saved,
                                           std::span<const ExpertGrads> grads) = 0;
};

// The implementation of config.backend's backend object for config.weight_format; throws
// ConfigError naming both when this build has none.
std::unique_ptr<ExpertFfn> make_expert_ffn(const ExpertFfnConfig& config);

}  // namespace moekit::ops
