// The scalar reference MoE: plain loops over tokens and their kept experts, templated on Real
// (double for finite differences). It implements the layer's math with none of its machinery
// (no GEMM, no grouping, no threads) and is the oracle the layer is tested against.
// config.dtype and num_threads are ignored.
#pragma once

#include "moekit/layer.h"
#include "moekit/routing.h"
#include "moekit/tensor.h"

namespace moekit {

template <typename Real>
struct ReferenceMoeForward {
  Matrix<Real> output;  // [num_tokens, d_model]
  RoutingResult<Real> routing;
};

template <typename Real>
struct ReferenceMoeGrads {
  Matrix<Real> d_hidden_states;  // [num_tokens, d_model]
  BasicMoeTensors<Real> d_params;
};

template <typename Real>
ReferenceMoeForward<Real> reference_moe_forward(const MoeLayerConfig& config,
                                                const BasicMoeTensors<Real>& params,
                                                ConstMatrixView<Real> hidden_states,
                                                const RoutingOptions& options = {});

// Gradient of the same L as MoeLayer::backward (assigned, not accumulated).
template <typename Real>
ReferenceMoeGrads<Real> reference_moe_backward(const MoeLayerConfig& config,
                                               const BasicMoeTensors<Real>& params,
                                               ConstMatrixView<Real> hidden_states,
                                               const ReferenceMoeForward<Real>& forward,
                                               ConstMatrixView<Real> d_output);

}  // namespace moekit
