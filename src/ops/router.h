// The router projection and its backward: one op, used by the routing core (route_hidden,
// router_backward), the route stage and the bench.
//
//   forward:   logits = x · Wᵀ + b                       x [T, d], W [R, d], b [R], logits [T, R]
//   backward:  d_x += d_logits · W,   d_W += d_logitsᵀ · x,   d_b += Σ_t d_logits[t]
//
// R is num_experts (num_experts · slots_per_expert for Soft MoE). fp32 runs on the backend's
// GEMM kernels (W kept in the kernels' layout between forwards when a RouterCache is given);
// double (the gradient checks of the routing core) accumulates in double with plain loops. The
// token sum of d_b runs in token order, so every result is bitwise identical for any thread count.
// These functions check shapes and dispatch to ctx.backend (ops/backend.h).
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "moekit/tensor.h"
#include "ops/backend.h"
#include "ops/context.h"

namespace moekit::ops {

template <typename Real>
void router_forward(const OpContext& ctx,
                    ConstMatrixView<Real> x,       // [num_tokens, d_model]
                    ConstMatrixView<Real> weight,  // [R, d_model]
                    std::span<const Real> bias,    // [R] or empty
                    MatrixView<Real> logits,       // [num_tokens, R], written
                    RouterCache* cache = nullptr);  // fp32 only; may be null

// Accumulates (+=) into d_x, d_weight and d_bias; any of them may be empty (not wanted).
template <typename Real>
void router_backward(const OpContext& ctx,
                     ConstMatrixView<Real> x,         // [num_tokens, d_model]
                     ConstMatrixView<Real> weight,    // [R, d_model]
                     ConstMatrixView<Real> d_logits,  // [num_tokens, R]
                     MatrixView<Real> d_x,            // [num_tokens, d_model] or empty
                     MatrixView<Real> d_weight,       // [R, d_model] or empty
                     std::span<Real> d_bias);         // [R] or empty

// The backend's cache for one router weight (kept by the caller across forwards).
std::unique_ptr<RouterCache> make_router_cache(const OpContext& ctx);

// Brings W into `cache` unless it is current (the forward does this itself; a caller that times
// packing apart from the projection calls it first).
void router_prepare(const OpContext& ctx, ConstMatrixView<float> weight,  // [R, d_model]
                    RouterCache& cache);

}  // namespace moekit::ops
