// Expert MLP activations: one definition of the math, shared by the layer's backward and the
// scalar reference.
//
// Every expert is an MLP  y = W_down · act(W_gate_up · x + b_gate_up) + b_down  with weights in
// the Hugging Face layout (out_features × in_features). Gated activations (SwiGLU family) read
// two pre-activations per hidden unit, the gate g (rows [0, d_ff) of W_gate_up) and the up
// projection u (rows [d_ff, 2·d_ff)); the others read one (W_gate_up is Switch's "wi").
#pragma once

#include <algorithm>
#include <cmath>
#include <numbers>

#include "moekit/math.h"  // detail::sigmoid

namespace moekit {

enum class ExpertActivation {
  kSwiGlu,         // h = silu(g) · u                                   (Mixtral, Qwen, DeepSeek)
  kGelu,           // h = gelu_tanh(a)              (HF "gelu_new" / "gelu_pytorch_tanh")
  kGeluErf,        // h = a · Φ(a), exact erf GELU  (HF "gelu")
  kRelu,           // h = max(a, 0)                                     (Switch, T5)
  kSwiGluClamped,  // gpt-oss: g' = min(g, L), u' = clamp(u, −L, L), h = (u' + 1) · g' · σ(α g')
};

// Gated activations read [gate | up], so W_gate_up has 2·d_ff rows instead of d_ff.
inline bool is_gated(ExpertActivation a) {
  return a == ExpertActivation::kSwiGlu || a == ExpertActivation::kSwiGluClamped;
}

const char* activation_name(ExpertActivation a);  // "swiglu", "gelu", "gelu_erf", ...

// Constants of the activations (gpt-oss: limit 7, alpha 1.702).
struct ActivationConstants {
  double clamp_limit = 7.0;
  double clamp_alpha = 1.702;
};

namespace detail {
// √(2/π) and the cubic coefficient of the tanh GELU approximation.
inline constexpr double kGeluTanhScale = 0.7978845608028654;
inline constexpr double kGeluTanhCubic = 0.044715;
}  // namespace detail

// h for one hidden unit. `g` is the pre-activation (the gate for gated activations), `u` the up
// projection (ignored unless gated).
template <typename Real>
Real activation_forward(ExpertActivation a, Real g, Real u, const ActivationConstants& k) {
  switch (a) {
    case ExpertActivation::kSwiGlu: return g * detail::sigmoid(g) * u;
    case ExpertActivation::kSwiGluClamped: {
      const Real limit = Real(k.clamp_limit);
      const Real gc = std::min(g, limit);
      const Real uc = std::clamp(u, -limit, limit);
      return (uc + Real(1)) * gc * detail::sigmoid(Real(k.clamp_alpha) * gc);
    }
    case ExpertActivation::kGelu: {
      const Real z = Real(detail::kGeluTanhScale) * (g + Real(detail::kGeluTanhCubic) * g * g * g);
      return Real(0.5) * g * (Real(1) + std::tanh(z));
    }
    case ExpertActivation::kGeluErf:
      return Real(0.5) * g * (Real(1) + std::erf(g * Real(1.0 / std::numbers::sqrt2)));
    case ExpertActivation::kRelu: return g > Real(0) ? g : Real(0);
  }
  return Real(0);
}

// d_g and d_u of one hidden unit given d_h (d_u is left untouched unless gated). Derivatives:
//   silu'(g)      = σ(g) · (1 + g · (1 − σ(g)))
//   clamped:      ∂h/∂g = [g ≤ L] · (u'+1) · (σ(αg') + αg'·σ(αg')(1 − σ(αg'))),
//                 ∂h/∂u = [−L ≤ u ≤ L] · g'·σ(αg')      (torch.clamp passes the gradient at the
//                                                         bounds, so the intervals are closed)
//   gelu_tanh'(a) = ½(1 + tanh z) + ½a(1 − tanh² z)·√(2/π)(1 + 3·0.044715·a²)
//   gelu_erf'(a)  = Φ(a) + a·φ(a)
//   relu'(a)      = [a > 0]
template <typename Real>
void activation_backward(ExpertActivation a, Real g, Real u, Real d_h, const ActivationConstants& k,
                         Real* d_g, Real* d_u) {
  switch (a) {
    case ExpertActivation::kSwiGlu: {
      const Real s = detail::sigmoid(g);
      *d_g = d_h * u * s * (Real(1) + g * (Real(1) - s));
      *d_u = d_h * g * s;
      return;
    }
    case ExpertActivation::kSwiGluClamped: {
      const Real limit = Real(k.clamp_limit), alpha = Real(k.clamp_alpha);
      const Real gc = std::min(g, limit);
      const Real uc = std::clamp(u, -limit, limit);
      const Real s = detail::sigmoid(alpha * gc);
      *d_g = g <= limit ? d_h * (uc + Real(1)) * (s + alpha * gc * s * (Real(1) - s)) : Real(0);
      *d_u = (u >= -limit && u <= limit) ? d_h * gc * s : Real(0);
      return;
    }
    case ExpertActivation::kGelu: {
      const Real c = Real(detail::kGeluTanhScale), b = Real(detail::kGeluTanhCubic);
      const Real th = std::tanh(c * (g + b * g * g * g));
      *d_g = d_h * (Real(0.5) * (Real(1) + th) +
                    Real(0.5) * g * (Real(1) - th * th) * c * (Real(1) + Real(3) * b * g * g));
      return;
    }
    case ExpertActivation::kGeluErf: {
      const Real cdf = Real(0.5) * (Real(1) + std::erf(g * Real(1.0 / std::numbers::sqrt2)));
      const Real pdf = std::exp(Real(-0.5) * g * g) * Real(0.5 * std::numbers::inv_sqrtpi *
                                                            std::numbers::sqrt2);
      *d_g = d_h * (cdf + g * pdf);
      return;
    }
    case ExpertActivation::kRelu: *d_g = g > Real(0) ? d_h : Real(0); return;
  }
}

}  // namespace moekit
