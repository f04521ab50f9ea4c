// The backend object: one implementation of every op of the layer, for one kind of device.
//
// Each op has a header under src/ops/ (router.h, row_space.h (permute), expert_ffn.h,
// combine.h; routing's is the routing core, routing.h) that states its math and shapes, checks its arguments and dispatches to
// ctx.backend; a backend implements the ops in one file per op (src/cpu/<op>.cpp, later
// src/cuda/<op>.cu) and is listed in src/ops/registry.cpp. The layer and the stages see only
// this interface, so adding a backend adds files and registry rows, not edits to the layer.
//
// What a backend can do is asked once, when a layer is built: supports(op, weight format,
// training). A pair it lacks is a ConfigError naming the op, the backend and the format then,
// never a throw in the middle of a forward or backward.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "moekit/backend.h"
#include "moekit/config.h"
#include "moekit/layer_config.h"
#include "moekit/plan.h"
#include "moekit/routing.h"
#include "moekit/tensor.h"
#include "ops/context.h"

namespace moekit {
struct ExpertRows;
}

namespace moekit::ops {

enum class Op {
  kRouter,      // router projection and its backward (router.h)
  kRouting,     // routing method: logits → plan, losses, statistics, and the backward (routing.h)
  kPermute,     // plan → expert-major rows (row_space.h), and the token sum of row gradients
  kExperts,     // the grouped expert FFN (expert_ffn.h)
  kCombine,     // expert rows → token outputs in choice order (combine.h)
  kSoftSlots,   // Soft MoE's slot dispatch and combine (combine.h)
  kSharedGate,  // the shared expert gate σ(⟨x, w⟩) (combine.h)
};
const char* op_name(Op op);

// Backend state the router keeps between calls (the router weight in the kernels' layout).
class RouterCache {
 public:
  virtual ~RouterCache() = default;
  virtual void invalidate() = 0;  // the router weight changed
};

struct SoftMoeShape;
struct ExpertFfnConfig;
class ExpertFfn;

class BackendOps {
 public:
  virtual ~BackendOps() = default;

  virtual Backend kind() const = 0;
  // The kernel path in use, e.g. "avx512bf16" (MoeLayer::isa_name).
  virtual const char* kernel_path() const = 0;
  // Whether this backend implements `op` for expert weights in `weight_format`, for inference
  // only (training = false) or also for training (forward saving state, backward).
  virtual bool supports(Op op, DType weight_format, bool training) const = 0;

  // Router (router.h).
  virtual std::unique_ptr<RouterCache> make_router_cache() const = 0;
  virtual void router_prepare(const OpContext& ctx, ConstMatrixView<float> weight, RouterCache& cache) const = 0;
  virtual void router_forward(const OpContext& ctx, ConstMatrixView<float> x, ConstMatrixView<float> weight,
                              std::span<const float> bias, MatrixView<float> logits, RouterCache* cache) const = 0;
  virtual void router_forward(const OpContext& ctx, ConstMatrixView<double> x, ConstMatrixView<double> weight,
                              std::span<const double> bias, MatrixView<double> logits) const = 0;
  virtual void router_backward(const OpContext& ctx, ConstMatrixView<float> x, ConstMatrixView<float> weight,
                               ConstMatrixView<float> d_logits, MatrixView<float> d_x, MatrixView<float> d_weight,
                               std::span<float> d_bias) const = 0;
  virtual void router_backward(const OpContext& ctx, ConstMatrixView<double> x, ConstMatrixView<double> weight,
                               ConstMatrixView<double> d_logits, MatrixView<double> d_x, MatrixView<double> d_weight,
                               std::span<double> d_bias) const = 0;

  // Routing (the routing core, routing.h).
  virtual RoutingResult<float> route_logits(const OpContext& ctx, const RoutingConfig& config,
                                            ConstMatrixView<float> logits, const RoutingOptions& options) const = 0;
  virtual RoutingResult<float> route_hidden(const OpContext& ctx, const RoutingConfig& config,
                                            ConstMatrixView<float> x, const RouterParams<float>& params,
                                            const RoutingOptions& options) const = 0;
  virtual Matrix<float> route_backward(const OpContext& ctx, const RoutingConfig& config,
                                       const RoutingResult<float>& result, const RoutingGradOutput<float>& d_result,
                                       Matrix<float>* d_noisy_logits) const = 0;
  virtual RouterGrads<float> route_hidden_backward(const OpContext& ctx, const RoutingConfig& config,
                                                   const RoutingResult<float>& result, ConstMatrixView<float> x,
                                                   const RouterParams<float>& params, ConstMatrixView<float> d_logits,
                                                   ConstMatrixView<float> d_noisy_logits) const = 0;

  // Permute (row_space.h) and the token sum (combine.h).
  virtual void permute_rows(const OpContext& ctx, const MoeLayerConfig& config, const RoutingPlan& plan,
                            const float* hidden_states, ExpertRows& rows) const = 0;
  virtual void token_sum(const OpContext& ctx, const RoutingPlan& plan, ConstMatrixView<float> rows,
                         std::span<const float> weights, int64_t shared_begin, MatrixView<float> out) const = 0;
  virtual void gather_rows(const OpContext& ctx, ConstMatrixView<float> source, std::span<const int32_t> source_rows,
                           std::span<const float> scale, MatrixView<float> out) const = 0;
  virtual void row_dots(const OpContext& ctx, ConstMatrixView<float> a, std::span<const int32_t> a_rows,
                        ConstMatrixView<float> b, std::span<float> out) const = 0;

  // Experts (expert_ffn.h): the grouped FFN for config's weight format.
  virtual std::unique_ptr<ExpertFfn> make_expert_ffn(const ExpertFfnConfig& config) const = 0;

  // Soft MoE slots and the shared gate (combine.h).
  virtual void soft_dispatch_forward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& shape,
                                     ConstMatrixView<float> x, MatrixView<float> slot_inputs) const = 0;
  virtual void soft_dispatch_backward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& shape,
                                      ConstMatrixView<float> x, ConstMatrixView<float> d_slot_inputs,
                                      ConstMatrixView<float> shared_rows, MatrixView<float> d_x,
                                      std::span<float> d_dispatch) const = 0;
  virtual void soft_combine_forward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& shape,
                                    ConstMatrixView<float> slot_outputs, ConstMatrixView<float> shared_rows,
                                    MatrixView<float> out) const = 0;
  virtual void soft_combine_backward(const OpContext& ctx, const RoutingPlan& plan, const SoftMoeShape& shape,
                                     ConstMatrixView<float> d_out, ConstMatrixView<float> slot_outputs,
                                     MatrixView<float> d_slot_outputs, std::span<float> d_combine) const = 0;
  virtual std::vector<float> shared_gate_forward(const OpContext& ctx, ConstMatrixView<float> x,
                                                 std::span<const float> w_gate) const = 0;
  virtual void shared_gate_backward(const OpContext& ctx, ConstMatrixView<float> x, std::span<const float> w_gate,
                                    std::span<const float> gate, std::span<const float> d_gate, MatrixView<float> d_x,
                                    std::span<float> d_w_gate) const = 0;
};

// The backend object of `kind` (one per process, made on first use); ConfigError naming the
// backend when this build has none.
const BackendOps& backend_for(Backend kind);

// ConfigError unless this build's backend of `kind` supports `op` for `weight_format` (and
// training when asked), naming the backend, the format and the pairs this build does support.
void require_support(Backend kind, Op op, DType weight_format, bool training);

}  // namespace moekit::ops
