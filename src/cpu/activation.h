// SwiGLU rows of the layer's training path: h = silu(g)·u recomputed from the saved
// pre-activations (forward GEMM 2 and backward), and its backward. The same formulas as
// activation_forward / activation_backward (moekit/experts.h) in fp32; the AVX-512 path
// evaluates exp with a vector polynomial (≈ 1 ulp, as the GEMM epilogue does), the others call
// those functions. Elementwise, so the result does not depend on how rows are split over
// threads.
#pragma once

#include <cstdint>

#include "gemm.h"
#include "moekit/experts.h"

namespace moekit::cpu {

// The GEMM epilogue that applies an expert activation (gated ones as the paired kSiluMul*).
Activation epilogue_activation(ExpertActivation a);

// h[j] = silu(g[j]) · u[j], j < n; rounded to bf16 (kept in fp32) when round_bf16.
void swiglu_forward_row(Isa isa, const float* g,  // [n]
                        const float* u,           // [n]
                        int64_t n, bool round_bf16,
                        float* h);  // [n]

// With d_h = w · G:  h as above (written when h is not null), dot = Σ_j G[j]·h[j] (double,
// h as rounded), and in place of g and u:
//   d_g = d_h · u · σ(g) · (1 + g · (1 − σ(g))),   d_u = d_h · g · σ(g).
// Returns dot.
double swiglu_backward_row(Isa isa, float* g_io,  // [n] in: g, out: d_g
                           float* u_io,           // [n] in: u, out: d_u
                           const float* G,        // [n]
                           float w, int64_t n, bool round_bf16,
                           float* h);  // [n] or null
}  // namespace moekit::cpu
