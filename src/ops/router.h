// The router projection and its backward: one implementation, used by the routing core
// (route_hidden, router_backward), the layer and the bench.
//
//   forward:   logits = x · Wᵀ + b                       x [T, d], W [R, d], b [R], logits [T, R]
//   backward:  d_x += d_logits · W,   d_W += d_logitsᵀ · x,   d_b += Σ_t d_logits[t]
//
// R is num_experts (num_experts · slots_per_expert for Soft MoE). fp32 runs on the backend's
// GEMM kernels (W packed once per weight update when a RouterCache is given); double (the
// gradient checks of the routing core) accumulates in double with plain loops. The token sum of
// d_b runs in token order, so every result is bitwise identical for any thread count.
#pragma once

#include <cstdint>
#include <span>

#include "cpu/exec.h"
#include "cpu/gemm.h"
#include "moekit/tensor.h"
#include "ops/context.h"

namespace moekit::ops {

// W in the kernels' layout, kept between forwards until invalidate() (a weight update).
struct RouterCache {
  cpu::PackedWeight packed;
  cpu::Workspace ws;
  bool valid = false;
  void invalidate() { valid = false; }
};

template <typename Real>
void router_forward(const OpContext& ctx,
                    ConstMatrixView<Real> x,       // [num_tokens, d_model]
                    ConstMatrixView<Real> weight,  // [R, d_model]
                    std::span<const Real> bias,    // [R] or empty
                    MatrixView<Real> logits,       // [num_tokens, R], written
                    RouterCache* cache = nullptr);

// Accumulates (+=) into d_x, d_weight and d_bias; any of them may be empty (not wanted).
template <typename Real>
void router_backward(const OpContext& ctx,
                     ConstMatrixView<Real> x,         // [num_tokens, d_model]
                     ConstMatrixView<Real> weight,    // [R, d_model]
                     ConstMatrixView<Real> d_logits,  // [num_tokens, R]
                     MatrixView<Real> d_x,            // [num_tokens, d_model] or empty
                     MatrixView<Real> d_weight,       // [R, d_model] or empty
                     std::span<Real> d_bias);         // [R] or empty

// Packs W into `cache` unless it is current (the forward does this itself; a caller that times
// packing apart from the projection calls it first).
void router_prepare(const OpContext& ctx, ConstMatrixView<float> weight,  // [R, d_model]
                    RouterCache& cache);

// A context for callers outside the layer (the routing core): CPU, the active kernel path.
OpContext cpu_context(int num_threads);

}  // namespace moekit::ops
