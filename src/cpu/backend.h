// The CPU backend object: every op of ops/backend.h on x86-64 kernels chosen from the CPU's
// features (the ISA is fixed when the object is made). One implementation file per op:
// router.cpp, routing.cpp, permute.cpp, combine.cpp (token sum, row gathers, Soft MoE slots,
// shared gate),
// expert_ffn.cpp and quant_ffn.cpp (the expert FFN per weight format), backend.cpp (what it
// supports, the expert FFN per format).
#pragma once

#include "cpu/gemm.h"
#include "ops/backend.h"

namespace moekit::cpu {

class CpuBackend final : public ops::BackendOps {
 public:
  explicit CpuBackend(Isa isa) : isa_(isa) {}
  Isa isa() const { return isa_; }

  Backend kind() const override { return Backend::kCpu; }
  const char* kernel_path() const override;
  bool supports(ops::Op op, moekit::DType weight_format, bool training) const override;

  std::unique_ptr<ops::RouterCache> make_router_cache() const override;
  void router_prepare(const ops::OpContext& ctx, ConstMatrixView<float> weight, ops::RouterCache& cache) const override;
  void router_forward(const ops::OpContext& ctx, ConstMatrixView<float> x, ConstMatrixView<float> weight,
                      std::span<const float> bias, MatrixView<float> logits, ops::RouterCache* cache) const override;
  void router_forward(const ops::OpContext& ctx, ConstMatrixView<double> x, ConstMatrixView<double> weight,
                      std::span<const double> bias, MatrixView<double> logits) const override;
  void router_backward(const ops::OpContext& ctx, ConstMatrixView<float> x, ConstMatrixView<float> weight,
                       ConstMatrixView<float> d_logits, MatrixView<float> d_x, MatrixView<float> d_weight,
                       std::span<float> d_bias) const override;
  void router_backward(const ops::OpContext& ctx, ConstMatrixView<double> x, ConstMatrixView<double> weight,
                       ConstMatrixView<double> d_logits, MatrixView<double> d_x, MatrixView<double> d_weight,
                       std::span<double> d_bias) const override;

  RoutingResult<float> route_logits(const ops::OpContext& ctx, const RoutingConfig& config,
                                    ConstMatrixView<float> logits, const RoutingOptions& options) const override;
  RoutingResult<float> route_hidden(const ops::OpContext& ctx, const RoutingConfig& config, ConstMatrixView<float> x,
                                    const RouterParams<float>& params, const RoutingOptions& options) const override;
  Matrix<float> route_backward(const ops::OpContext& ctx, const RoutingConfig& config,
                               const RoutingResult<float>& result, const RoutingGradOutput<float>& d_result,
                               Matrix<float>* d_noisy_logits) const override;
  RouterGrads<float> route_hidden_backward(const ops::OpContext& ctx, const RoutingConfig& config,
                                           const RoutingResult<float>& result, ConstMatrixView<float> x,
                                           const RouterParams<float>& params, ConstMatrixView<float> d_logits,
                                           ConstMatrixView<float> d_noisy_logits) const override;

  void permute_rows(const ops::OpContext& ctx, const MoeLayerConfig& config, const RoutingPlan& plan,
                    const float* hidden_states, ExpertRows& rows) const override;
  void token_sum(const ops::OpContext& ctx, const RoutingPlan& plan, ConstMatrixView<float> rows,
                 std::span<const float> weights, int64_t shared_begin, MatrixView<float> out) const override;
  void gather_rows(const ops::OpContext& ctx, ConstMatrixView<float> source, std::span<const int32_t> source_rows,
                   std::span<const float> scale, MatrixView<float> out) const override;
  void row_dots(const ops::OpContext& ctx, ConstMatrixView<float> a, std::span<const int32_t> a_rows,
                ConstMatrixView<float> b, std::span<float> out) const override;

  std::unique_ptr<ops::ExpertFfn> make_expert_ffn(const ops::ExpertFfnConfig& config) const override;

  void soft_dispatch_forward(const ops::OpContext& ctx, const RoutingPlan& plan, const ops::SoftMoeShape& shape,
                             ConstMatrixView<float> x, MatrixView<float> slot_inputs) const override;
  void soft_dispatch_backward(const ops::OpContext& ctx, const RoutingPlan& plan, const ops::SoftMoeShape& shape,
                              ConstMatrixView<float> x, ConstMatrixView<float> d_slot_inputs,
                              ConstMatrixView<float> shared_rows, MatrixView<float> d_x,
                              std::span<float> d_dispatch) const override;
  void soft_combine_forward(const ops::OpContext& ctx, const RoutingPlan& plan, const ops::SoftMoeShape& shape,
                            ConstMatrixView<float> slot_outputs, ConstMatrixView<float> shared_rows,
                            MatrixView<float> out) const override;
  void soft_combine_backward(const ops::OpContext& ctx, const RoutingPlan& plan, const ops::SoftMoeShape& shape,
                             ConstMatrixView<float> d_out, ConstMatrixView<float> slot_outputs,
                             MatrixView<float> d_slot_outputs, std::span<float> d_combine) const override;
  std::vector<float> shared_gate_forward(const ops::OpContext& ctx, ConstMatrixView<float> x,
                                         std::span<const float> w_gate) const override;
  void shared_gate_backward(const ops::OpContext& ctx, ConstMatrixView<float> x, std::span<const float> w_gate,
                            std::span<const float> gate, std::span<const float> d_gate, MatrixView<float> d_x,
                            std::span<float> d_w_gate) const override;

 private:
  Isa isa_;
};

// The process's CPU backend object for active_isa() (one per kernel path, made on first use).
const ops::BackendOps& cpu_backend();

// The ISA of the CPU backend an op runs on: CPU implementations are reached only through
// CpuBackend, so ctx.backend is one.
inline Isa isa_of(const ops::OpContext& ctx) { return static_cast<const CpuBackend*>(ctx.backend)->isa(); }

}  // namespace moekit::cpu
