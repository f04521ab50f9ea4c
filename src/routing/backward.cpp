// route_backward: d_logits of L given dL/d(combine weights, losses).
//
// Combine weights w_i = c · q_i / Z_t (see include/moekit/routing.h). Selection is piecewise
// constant, so only q and Z carry gradient:
//   dq_e += c·dw_i / Z_t,   dZ_t = −Σ_i c·dw_i·q_i / Z_t²,   dq_j += dZ_t for j in Z_t's sum;
// then through the score function: softmax dl = q ⊙ (dq − ⟨q, dq⟩), sigmoid dl = q(1 − q)·dq,
// given probs: dl = dq.
//
// Soft MoE: dispatch and combine are softmaxes (over tokens per slot, over slots per token), so
// each contributes p ⊙ (dp − ⟨p, dp⟩) along its softmax axis.
//
// z = mean_t lse_t²:  dz/dl_te = 2·lse_t·softmax(l_t)_e / T.
// Load balancing: aux = E/k_div · Σ_e f_e · P̄_e per group, f piecewise constant:
//   daux/dP_te = E · f_e / (k_div · T_group · groups).
// Importance CV²: dCV²(Σ_t P)/dP_te = the CV² gradient at e. Load CV²: through Φ into the clean
// logits and into the threshold (a noisy logit). Then through the map logits → P (softmax, or
// the per-token normalised sigmoid: dP_i/dσ_j = (δ_ij − P_i)/(Σσ + ε), dσ/dl = σ(1 − σ)).
// Temperature l = raw / τ divides the result by τ.
#include <algorithm>
#include <cmath>

#include "router_state.h"

namespace moekit {
namespace routing_detail {
namespace {

template <typename Real>
void soft_moe_backward(const BasicRoutingPlan<Real>& p, const RoutingSaved<Real>& s,
                       const RoutingGradOutput<Real>& g,
                       Matrix<Real>& d_logits) {  // [num_tokens, num_slots]
  const int64_t num_tokens = p.num_tokens;
  const int64_t slots = p.num_slots;
  if (static_cast<int64_t>(g.d_dispatch.size()) != (g.d_dispatch.empty() ? 0 : num_tokens * slots) ||
      static_cast<int64_t>(g.d_combine.size()) != (g.d_combine.empty() ? 0 : num_tokens * slots)) {
    throw_input_error("d_dispatch/d_combine size", num_tokens * slots, g.d_dispatch.size());
  }
  // Combine: softmax over slots per token.
  if (!g.d_combine.empty()) {
    for (int64_t t = 0; t < num_tokens; ++t) {
      if (!s.token_mask[t]) continue;
      double dot = 0;
      for (int64_t j = 0; j < slots; ++j) dot += double(p.combine[t * slots + j]) * g.d_combine[t * slots + j];
      for (int64_t j = 0; j < slots; ++j)
        d_logits(t, j) += Real(double(p.combine[t * slots + j]) * (g.d_combine[t * slots + j] - dot));
    }
  }
  // Dispatch: softmax over the real tokens of each sequence, per slot.
  if (!g.d_dispatch.empty()) {
    const int64_t len = s.sequence_length;
    for (int64_t first = 0; first < num_tokens; first += len) {
      for (int64_t j = 0; j < slots; ++j) {
        double dot = 0;
        for (int64_t t = first; t < first + len; ++t)
          if (s.token_mask[t]) dot += double(p.dispatch[t * slots + j]) * g.d_dispatch[t * slots + j];
        for (int64_t t = first; t < first + len; ++t)
          if (s.token_mask[t])
            d_logits(t, j) += Real(double(p.dispatch[t * slots + j]) * (g.d_dispatch[t * slots + j] - dot));
      }
    }
  }
}

template <typename Real>
void weights_backward(const RoutingConfig& c, const BasicRoutingPlan<Real>& p,
                      const RoutingSaved<Real>& s, const RoutingGradOutput<Real>& g,
                      Matrix<Real>& d_logits) {  // [num_tokens, num_experts]
  const int64_t num_tokens = p.num_tokens, num_experts = p.num_experts;
  if (static_cast<int64_t>(g.d_token_weights.size()) != p.num_selections() && !g.d_token_weights.empty()) {
    throw_input_error("d_token_weights length", p.num_selections(), g.d_token_weights.size());
  }
  std::vector<double> dq(static_cast<size_t>(num_experts));  // [num_experts]
  const double scale = c.routed_scaling_factor;
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (!s.token_mask[t]) continue;
    const int64_t begin = p.token_offsets[t], end = p.token_offsets[t + 1];
    std::fill(dq.begin(), dq.end(), 0.0);
    bool any = false;
    if (!g.d_token_weights.empty()) {
      // w_i = c · q_i / Z;  dq_i += c·dw_i/Z;  dZ = −Σ_i c·dw_i·q_i/Z².
      double d_norm = 0;
      for (int64_t i = begin; i < end; ++i) {
        if (!p.token_kept[i]) continue;
        const int32_t e = p.token_experts[i];
        const double z = double(s.norm[i]);
        if (z <= 0) continue;
        const double dw = double(g.d_token_weights[i]) * scale;
        dq[e] += dw / z;
        d_norm -= dw * double(s.scores(t, e)) / (z * z);
        any = true;
      }
      for (int64_t i = begin; i < end; ++i)
        if (s.in_norm[i]) dq[p.token_experts[i]] += d_norm;
    }
    if (s.scores_given) {
      for (int64_t e = 0; e < num_experts; ++e) d_logits(t, e) += Real(dq[e]);
      continue;
    }
    if (!any) continue;
    if (uses_sigmoid(c)) {
      for (int64_t e = 0; e < num_experts; ++e) {
        const double q = double(s.scores(t, e));
        d_logits(t, e) += Real(q * (1.0 - q) * dq[e]);
      }
    } else {
      double dot = 0;
      for (int64_t e = 0; e < num_experts; ++e) dot += double(s.scores(t, e)) * dq[e];
      for (int64_t e = 0; e < num_experts; ++e)
        d_logits(t, e) += Real(double(s.scores(t, e)) * (dq[e] - dot));
    }
  }
}

template <typename Real>
void z_loss_backward(const RoutingConfig& c, const RoutingSaved<Real>& s, double d_z_loss,
                     int64_t n_real,
                     Matrix<Real>& d_logits) {  // [num_tokens, cols]
  // z = mean_t lse_t²: dz/dl_te = 2·lse_t·softmax(l_t)_e / T.
  const int64_t num_tokens = s.clean_logits.rows, cols = s.logits.cols;
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (!s.token_mask[t]) continue;
    const double lse = logsumexp_row(s.clean_logits.row(t), cols);
    const double factor =
        d_z_loss * 2.0 * lse / double(c.padding_in_loss_means ? num_tokens : n_real);
    for (int64_t e = 0; e < cols; ++e)
      d_logits(t, e) += Real(factor * std::exp(double(s.clean_logits(t, e)) - lse));
  }
}

// d aux / d P for the load-balancing loss: E · f_e / (k_div · T_group · used groups).
template <typename Real>
void load_balancing_grad(const RoutingConfig& c, const RoutingSaved<Real>& s, double d_aux_loss,
                         Matrix<double>& d_p) {  // [num_tokens, num_experts]
  const int64_t num_tokens = d_p.rows, num_experts = d_p.cols;
  const double k_div = aux_k_divisor(c);
  const bool per_seq = c.aux_loss_scope == AuxLossScope::kSequence;
  const int64_t group_len = per_seq ? s.sequence_length : num_tokens;
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (!s.token_mask[t]) continue;
    const int64_t gi = t / group_len;
    // aux_token_counts holds tokens · used_groups (see compute_load_balancing).
    const double denom = s.aux_token_counts[gi];
    for (int64_t e = 0; e < num_experts; ++e)
      d_p(t, e) = d_aux_loss * double(num_experts) * s.aux_counts[gi * num_experts + e] /
                  (k_div * denom);
  }
}

// d aux / d P for the importance CV², and the load CV²'s gradient straight into the logits
// (clean logits, and the threshold noisy logit, also into d_noisy when given).
template <typename Real>
void importance_load_grad(const RoutingConfig& c, const RoutingSaved<Real>& s, double d_aux_loss,
                          Matrix<double>& d_p,      // [num_tokens, num_experts]
                          Matrix<Real>& d_logits,   // [num_tokens, num_experts]
                          Matrix<Real>* d_noisy) {  // [num_tokens, num_experts] or null
  const int64_t num_tokens = d_p.rows, num_experts = d_p.cols;
  std::vector<double> importance(static_cast<size_t>(num_experts), 0.0), probs;
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (!s.token_mask[t]) continue;
    balance_probs(c, s, t, probs);
    for (int64_t e = 0; e < num_experts; ++e) importance[e] += probs[e];
  }
  const std::vector<double> gi = cv_squared_grad(importance);
  for (int64_t t = 0; t < num_tokens; ++t)
    if (s.token_mask[t])
      for (int64_t e = 0; e < num_experts; ++e)
        d_p(t, e) = d_aux_loss * c.importance_loss_weight * gi[e];
  // Load CV²: d/d clean logits and d/d threshold (a noisy logit).
  if (smooth_load_active(c, s.scores_given) && c.load_loss_weight != 0) {
    const double sigma = c.noise_std / double(num_experts);
    std::vector<int32_t> threshold_expert;
    const std::vector<double> load = smooth_load(c, s, threshold_expert);
    const std::vector<double> gl = cv_squared_grad(load);
    for (int64_t t = 0; t < num_tokens; ++t) {
      if (!s.token_mask[t]) continue;
      const double threshold = double(s.logits(t, threshold_expert[t]));
      double d_threshold = 0;
      for (int64_t e = 0; e < num_experts; ++e) {
        const double dens = normal_pdf((threshold - double(s.clean_logits(t, e))) / sigma) / sigma;
        const double up = d_aux_loss * c.load_loss_weight * gl[e];
        d_logits(t, e) += Real(up * dens);
        d_threshold -= up * dens;
      }
      d_logits(t, threshold_expert[t]) += Real(d_threshold);
      // The threshold is a noisy logit.
      if (d_noisy != nullptr) (*d_noisy)(t, threshold_expert[t]) += Real(d_threshold);
    }
  }
}

// d_logits += dP/dl^T · d_p per real token, through the map logits → P.
template <typename Real>
void balance_probs_backward(const RoutingConfig& c, const RoutingSaved<Real>& s,
                            const Matrix<double>& d_p,  // [num_tokens, num_experts]
                            Matrix<Real>& d_logits) {   // [num_tokens, num_experts]
  const int64_t num_tokens = d_p.rows, num_experts = d_p.cols;
  std::vector<double> probs;
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (!s.token_mask[t]) continue;
    if (s.scores_given) {
      for (int64_t e = 0; e < num_experts; ++e) d_logits(t, e) += Real(d_p(t, e));
      continue;
    }
    balance_probs(c, s, t, probs);
    if (uses_sigmoid(c)) {
      // P = σ / (Σσ + ε): dP_i/dσ_j = (δ_ij − P_i)/(Σσ + ε); dσ/dl = σ(1 − σ).
      double sum = 0;
      std::vector<double> sig(static_cast<size_t>(num_experts));
      for (int64_t e = 0; e < num_experts; ++e) sum += sig[e] = sigmoid(double(s.clean_logits(t, e)));
      const double denom = sum + kSigmoidNormEps;
      double dot = 0;
      for (int64_t e = 0; e < num_experts; ++e) dot += d_p(t, e) * probs[e];
      for (int64_t e = 0; e < num_experts; ++e)
        d_logits(t, e) += Real((d_p(t, e) - dot) / denom * sig[e] * (1.0 - sig[e]));
    } else {
      double dot = 0;
      for (int64_t e = 0; e < num_experts; ++e) dot += d_p(t, e) * probs[e];
      for (int64_t e = 0; e < num_experts; ++e) d_logits(t, e) += Real(probs[e] * (d_p(t, e) - dot));
    }
  }
}

template <typename Real>
Matrix<Real> backward_impl(const RoutingConfig& c, const RoutingResult<Real>& r,
                           const RoutingGradOutput<Real>& g, Matrix<Real>* d_noisy) {
  const BasicRoutingPlan<Real>& p = r.plan;
  const RoutingSaved<Real>& s = r.saved;
  const int64_t num_tokens = p.num_tokens, num_experts = p.num_experts;
  Matrix<Real> d_logits(num_tokens, s.logits.cols);  // [num_tokens, cols]
  int64_t n_real = 0;
  for (int64_t t = 0; t < num_tokens; ++t) n_real += s.token_mask[t];

  if (c.routing_method == RoutingMethod::kSoftMoe) {
    soft_moe_backward(p, s, g, d_logits);
  } else {
    weights_backward(c, p, s, g, d_logits);
  }

  // Up to here every term flowed through the (possibly noisy) logits H; noisy gating needs that
  // part alone for its noise branch.
  if (d_noisy != nullptr) *d_noisy = d_logits;
  // Loss gradients flow into the clean logits, which differ from the noisy ones by an additive
  // constant (or a term of its own for noisy gating), so they add into the same d_logits.
  if (n_real > 0 && !s.scores_given && g.d_z_loss != 0) {
    z_loss_backward(c, s, g.d_z_loss, n_real, d_logits);
  }
  if (n_real > 0 && g.d_aux_loss != 0 && c.routing_method != RoutingMethod::kSoftMoe) {
    // Gradient with respect to the balance probabilities P_te, then through their map.
    Matrix<double> d_p(num_tokens, num_experts);
    if (c.aux_loss_type == AuxLossType::kLoadBalancing && is_token_choice(c)) {
      load_balancing_grad(c, s, g.d_aux_loss, d_p);
    } else if (c.aux_loss_type == AuxLossType::kImportanceLoad) {
      importance_load_grad(c, s, g.d_aux_loss, d_p, d_logits, d_noisy);
    }
    balance_probs_backward(c, s, d_p, d_logits);
  }
  return d_logits;
}

}  // namespace
}  // namespace routing_detail

template <typename Real>
Matrix<Real> route_backward(const RoutingConfig& config, const RoutingResult<Real>& result,
                            const RoutingGradOutput<Real>& grad, Matrix<Real>* d_noisy_logits) {
  Matrix<Real> d = routing_detail::backward_impl(config, result, grad, d_noisy_logits);
  // Temperature: l = raw / τ.
  if (!result.saved.scores_given && config.temperature != 1.0) {
    for (auto& v : d.values) v = Real(double(v) / config.temperature);
  }
  return d;
}

template Matrix<float> route_backward<float>(const RoutingConfig&, const RoutingResult<float>&,
                                             const RoutingGradOutput<float>&, Matrix<float>*);
template Matrix<double> route_backward<double>(const RoutingConfig&, const RoutingResult<double>&,
                                               const RoutingGradOutput<double>&, Matrix<double>*);

}  // namespace moekit
