// CPU implementation of the routing op (ops/backend.h): the routing core (routing.h) on the
// process-wide pool.
#include "cpu/backend.h"

namespace moekit::cpu {

RoutingResult<float> CpuBackend::route_logits(const ops::OpContext& ctx, const RoutingConfig& config,
                                              ConstMatrixView<float> logits, const RoutingOptions& options) const {
  RoutingOptions o = options;
  o.num_threads = ctx.num_threads;
  return moekit::route_logits(config, logits, o);
}

RoutingResult<float> CpuBackend::route_hidden(const ops::OpContext& ctx, const RoutingConfig& config,
                                              ConstMatrixView<float> x, const RouterParams<float>& params,
                                              const RoutingOptions& options) const {
  RoutingOptions o = options;
  o.num_threads = ctx.num_threads;
  return moekit::route_hidden(config, x, params, o);
}

Matrix<float> CpuBackend::route_backward(const ops::OpContext&, const RoutingConfig& config,
                                         const RoutingResult<float>& result, const RoutingGradOutput<float>& d_result,
                                         Matrix<float>* d_noisy_logits) const {
  return moekit::route_backward(config, result, d_result, d_noisy_logits);
}

RouterGrads<float> CpuBackend::route_hidden_backward(const ops::OpContext& ctx, const RoutingConfig& config,
                                                     const RoutingResult<float>& result, ConstMatrixView<float> x,
                                                     const RouterParams<float>& params,
                                                     ConstMatrixView<float> d_logits,
                                                     ConstMatrixView<float> d_noisy_logits) const {
  return moekit::router_backward(config, result, x, params, d_logits, ctx.num_threads, d_noisy_logits);
}

}  // namespace moekit::cpu
