#include "activation.h"

#include "gemm_kernels.h"
#include "moekit/experts.h"

namespace moekit::cpu {

namespace {
float maybe_round(float v, bool round_bf16) { return round_bf16 ? bf16_round(v) : v; }
bool vector_path(Isa isa) { return isa == Isa::kAvx512 || isa == Isa::kAvx512Bf16; }
}  // namespace

Activation epilogue_activation(ExpertActivation a) {
  switch (a) {
    case ExpertActivation::kSwiGlu: return Activation::kSiluMul;
    case ExpertActivation::kSwiGluClamped: return Activation::kSiluMulClamped;
    case ExpertActivation::kGelu: return Activation::kGelu;
    case ExpertActivation::kGeluErf: return Activation::kGeluErf;
    case ExpertActivation::kRelu: return Activation::kRelu;
  }
  return Activation::kNone;
}

void swiglu_forward_row(Isa isa, const float* g, const float* u, int64_t n, bool round_bf16, float* h) {
  if (vector_path(isa) && detail_gemm::swiglu_forward_avx512(g, u, n, round_bf16, h)) return;
  const ActivationConstants k;
  for (int64_t j = 0; j < n; ++j)
    h[j] = maybe_round(activation_forward(ExpertActivation::kSwiGlu, g[j], u[j], k), round_bf16);
}

double swiglu_backward_row(Isa isa, float* g_io, float* u_io, const float* G, float w, int64_t n,
                           bool round_bf16, float* h) {
  double dot = 0;
  if (vector_path(isa) && detail_gemm::swiglu_backward_avx512(g_io, u_io, G, w, n, round_bf16, h, &dot))
    return dot;
  const ActivationConstants k;
  for (int64_t j = 0; j < n; ++j) {
    const float hv = maybe_round(activation_forward(ExpertActivation::kSwiGlu, g_io[j], u_io[j], k), round_bf16);
    if (h) h[j] = hv;
    dot += double(G[j]) * hv;
    float d_g = 0, d_u = 0;
    activation_backward(ExpertActivation::kSwiGlu, g_io[j], u_io[j], w * G[j], k, &d_g, &d_u);
    g_io[j] = d_g;
    u_io[j] = d_u;
  }
  return dot;
}

}  // namespace moekit::cpu
