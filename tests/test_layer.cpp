// MoeLayer forward against the scalar double-precision reference, within a derived error bound;
// every activation, shared experts, every routing method, thread-count determinism, bf16,
// borrowed parameters and rejected input.
//
// The error bound. The layer computes in fp32 (or bf16 with fp32 accumulation) what the
// reference computes in double, so |layer − reference| is bounded element by element by
// propagating rounding errors through the layer's steps (u = 2⁻²⁴ for fp32, u_b = 2⁻⁸ for each
// bf16 rounding, γ_n = n·u/(1 − n·u) for an n-term fp32 dot product, any summation order):
//   GEMM 1   |Δa_r| ≤ (1+u_b)²·Σ_k |W1_rk|·Δx_k + ((1+u_b)²(1+γ_{d+1}) − 1)·(Σ_k |W1_rk|(|x_k|+Δx_k) + |b1_r|)
//            (x and W1 each rounded once to bf16, then an fp32 dot product plus the bias)
//   act      |Δh_j| ≤ L·|Δa_j| (gated: 1.1·Δg·(|u|+Δu) + |silu(g)|·Δu, |silu'| ≤ 1.1), plus the
//            fp32 evaluation error 16u·(|h| + |g|(1+|u|)) and the bf16 rounding of h, u_b·|ĥ|
//            (L = 1 for relu, 1.15 ≥ sup|gelu'| ≈ 1.129 for both GELUs)
//   GEMM 2   |Δy_r| ≤ (1+u_b)·Σ_j |W2_rj|·Δh_j + ((1+u_b)(1+γ_{f+1}) − 1)·(Σ_j |W2_rj|(|h_j|+Δh_j) + |b2_r|)
//   combine  Σ_i |w_i|·Δy_i + |Δw_i|·(|y_i| + Δy_i), plus (u + γ_{terms})·Σ_i (|w_i|+|Δw_i|)(|y_i|+Δy_i)
// The fp32 router perturbs each logit by at most Δl = γ_{d+1}·(Σ_k |x_k W_ek| + |b_e|), which moves
// a softmax (or sigmoid, or renormalised) weight by a relative 4·(e^{2Δl} − 1) + (2n + 16)·u at
// most (n the softmax width). Soft MoE adds the fp32 slot mixing, Δx̃ ≤ Σ_t |dispatch_t|·|x_t|·
// (δ(1+γ_L) + γ_L), and combines slots like weights. The shared gate σ(z) moves by ≤ Δz/4 + 4u.
// The plans must agree (tests keep away from top-k ties), so the bound covers arithmetic only.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "moekit/error.h"
#include "moekit/layer.h"
#include "oracles/reference_moe.h"

namespace moekit {
namespace {

constexpr double kU32 = 0x1p-24;
constexpr double kUBf16 = 0x1p-8;

double gamma_n(double n) { return n * kU32 / (1.0 - n * kU32); }

MoeLayerConfig make_config(int64_t num_experts, int64_t top_k, int64_t d_model, int64_t d_ff,
                           ExpertActivation activation = ExpertActivation::kSwiGlu) {
  MoeLayerConfig c;
  c.routing.num_experts = num_experts;
  c.routing.num_experts_per_tok = top_k;
  c.d_model = d_model;
  c.d_ff = d_ff;
  c.activation = activation;
  return c;
}

// Random parameters with O(1) activations: weights N(0, 1/fan_in), biases N(0, 0.1²), router
// N(0, 1/d_model) scaled so that routing is decisive.
void randomize(const MoeLayerConfig& c, MoeTensors& t, uint32_t seed) {
  std::mt19937 gen(seed);
  auto fill = [&](std::vector<float>& v, double stddev) {
    std::normal_distribution<double> dist(0.0, stddev);
    for (float& x : v) x = static_cast<float>(dist(gen));
  };
  const double d = double(c.d_model);
  fill(t.router_weight, 2.0 / std::sqrt(d));
  fill(t.router_bias, 0.3);
  fill(t.router_noise_weight, 0.5 / std::sqrt(d));
  fill(t.gate_up, 1.0 / std::sqrt(d));
  fill(t.down, 1.0 / std::sqrt(double(c.d_ff)));
  fill(t.gate_up_bias, 0.1);
  fill(t.down_bias, 0.1);
  fill(t.shared_gate_up, 1.0 / std::sqrt(d));
  fill(t.shared_down, 1.0 / std::sqrt(double(std::max<int64_t>(1, c.effective_shared_d_ff()))));
  fill(t.shared_gate_up_bias, 0.1);
  fill(t.shared_down_bias, 0.1);
  fill(t.shared_gate, 1.0 / std::sqrt(d));
}

MoeLayer random_layer(const MoeLayerConfig& c, uint32_t seed) {
  MoeLayer layer(c, uint64_t{seed});
  randomize(c, layer.parameters(), seed);
  layer.refresh_packed_weights();
  return layer;
}

Matrix<float> random_hidden(int64_t num_tokens, int64_t d_model, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Matrix<float> m(num_tokens, d_model);
  for (float& v : m.values) v = dist(gen);
  return m;
}

BasicMoeTensors<double> to_double(const MoeTensors& t) {
  BasicMoeTensors<double> out;
  auto copy = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
  out.router_weight = copy(t.router_weight);
  out.router_bias = copy(t.router_bias);
  out.router_noise_weight = copy(t.router_noise_weight);
  out.gate_up = copy(t.gate_up);
  out.down = copy(t.down);
  out.gate_up_bias = copy(t.gate_up_bias);
  out.down_bias = copy(t.down_bias);
  out.shared_gate_up = copy(t.shared_gate_up);
  out.shared_down = copy(t.shared_down);
  out.shared_gate_up_bias = copy(t.shared_gate_up_bias);
  out.shared_down_bias = copy(t.shared_down_bias);
  out.shared_gate = copy(t.shared_gate);
  return out;
}

Matrix<double> to_double(const Matrix<float>& m) {
  Matrix<double> out(m.rows, m.cols);
  std::copy(m.values.begin(), m.values.end(), out.values.begin());
  return out;
}

// ---------------------------------------------------------------------------------------------
// The derived bound (see the file comment).

struct ExpertEval {
  std::vector<double> y;      // [d_model] exact expert output
  std::vector<double> bound;  // [d_model] bound on |ŷ − y|
};

ExpertEval expert_with_bound(const MoeLayerConfig& c, const BasicMoeTensors<double>& p, int64_t e,
                             const double* x,   // [d_model]
                             const double* dx,  // [d_model] input error bound
                             double ub) {
  const bool shared = e == c.num_experts();
  const int64_t d = c.d_model, f = shared ? c.effective_shared_d_ff() : c.d_ff;
  const bool gated = is_gated(c.activation);
  const int64_t rows = gated ? 2 * f : f;
  const double* w1 = shared ? p.shared_gate_up.data() : p.gate_up.data() + e * rows * d;
  const double* w2 = shared ? p.shared_down.data() : p.down.data() + e * d * f;
  const std::vector<double>& b1v = shared ? p.shared_gate_up_bias : p.gate_up_bias;
  const std::vector<double>& b2v = shared ? p.shared_down_bias : p.down_bias;
  const double* b1 = b1v.empty() ? nullptr : b1v.data() + (shared ? 0 : e * rows);
  const double* b2 = b2v.empty() ? nullptr : b2v.data() + (shared ? 0 : e * d);

  std::vector<double> a(rows), da(rows), h(f), dh(f);
  const double k1 = (1 + ub) * (1 + ub);
  for (int64_t r = 0; r < rows; ++r) {
    double acc = b1 ? b1[r] : 0.0, mag = b1 ? std::abs(b1[r]) : 0.0, prop = 0;
    for (int64_t k = 0; k < d; ++k) {
      acc += w1[r * d + k] * x[k];
      mag += std::abs(w1[r * d + k]) * (std::abs(x[k]) + dx[k]);
      prop += std::abs(w1[r * d + k]) * dx[k];
    }
    a[r] = acc;
    da[r] = k1 * prop + (k1 * (1 + gamma_n(double(d + 1))) - 1) * mag;
  }
  const double limit = c.activation_constants.clamp_limit;
  for (int64_t j = 0; j < f; ++j) {
    const double g = a[j], u = gated ? a[f + j] : 0.0, dg = da[j], du = gated ? da[f + j] : 0.0;
    h[j] = activation_forward(c.activation, g, u, c.activation_constants);
    double prop;
    switch (c.activation) {
      case ExpertActivation::kSwiGlu: prop = 1.1 * dg * (std::abs(u) + du) + std::abs(g / (1 + std::exp(-g))) * du; break;
      case ExpertActivation::kSwiGluClamped: {
        const double gc = std::min(g, limit), uc = std::clamp(u, -limit, limit);
        const double q = gc / (1 + std::exp(-c.activation_constants.clamp_alpha * gc));
        prop = 1.1 * dg * (std::abs(uc) + 1 + du) + std::abs(q) * du;
        break;
      }
      case ExpertActivation::kRelu: prop = dg; break;
      default: prop = 1.15 * dg; break;
    }
    const double eval = 16 * kU32 * (std::abs(h[j]) + std::abs(g) * (1 + std::abs(u)) + std::abs(u));
    dh[j] = prop + eval + ub * (std::abs(h[j]) + prop + eval);
  }
  ExpertEval out;
  out.y.resize(d);
  out.bound.resize(d);
  for (int64_t r = 0; r < d; ++r) {
    double acc = b2 ? b2[r] : 0.0, mag = b2 ? std::abs(b2[r]) : 0.0, prop = 0;
    for (int64_t j = 0; j < f; ++j) {
      acc += w2[r * f + j] * h[j];
      mag += std::abs(w2[r * f + j]) * (std::abs(h[j]) + dh[j]);
      prop += std::abs(w2[r * f + j]) * dh[j];
    }
    out.y[r] = acc;
    out.bound[r] = (1 + ub) * prop + ((1 + ub) * (1 + gamma_n(double(f + 1))) - 1) * mag;
  }
  return out;
}

// Bound on |layer output − reference output| per element.
Matrix<double> derived_bound(const MoeLayerConfig& c, const BasicMoeTensors<double>& p,
                             const Matrix<double>& x, const ReferenceMoeForward<double>& ref,
                             bool bf16) {
  const double ub = bf16 ? kUBf16 : 0.0;
  const int64_t num_tokens = x.rows, d = c.d_model, num_experts = c.num_experts();
  const auto& plan = ref.routing.plan;
  Matrix<double> bound(num_tokens, d);
  // Largest logit perturbation of the fp32 router, and the relative weight error it causes.
  double dl = 0;
  for (int64_t t = 0; t < num_tokens; ++t)
    for (int64_t e = 0; e < c.router_rows(); ++e) {
      double mag = p.router_bias.empty() ? 0.0 : std::abs(p.router_bias[e]);
      for (int64_t k = 0; k < d; ++k) mag += std::abs(x(t, k) * p.router_weight[e * d + k]);
      dl = std::max(dl, gamma_n(double(d + 1)) * mag);
    }
  const double width = double(std::max(c.router_rows(), ref.routing.saved.sequence_length));
  const double dw_rel = 4 * (std::exp(2 * dl) - 1) + (2 * width + 16) * kU32;
  const std::vector<double> zeros(d, 0.0);

  // Adds Σ of weighted expert outputs into bound row t.
  auto add_terms = [&](int64_t t, const std::vector<std::pair<double, double>>& weights,  // (w, Δw)
                       const std::vector<ExpertEval>& evals) {
    const double acc = kU32 + gamma_n(double(evals.size() + 1));
    for (int64_t k = 0; k < d; ++k) {
      double b = 0;
      for (size_t i = 0; i < evals.size(); ++i) {
        const double w = std::abs(weights[i].first), dw = weights[i].second;
        const double y = std::abs(evals[i].y[k]), dy = evals[i].bound[k];
        b += w * dy + dw * (y + dy) + acc * (w + dw) * (y + dy);
      }
      bound(t, k) += b;
    }
  };

  std::vector<std::pair<double, double>> weights;
  std::vector<ExpertEval> evals;
  auto shared_term = [&](int64_t t) {
    if (!c.has_shared()) return;
    double s = 1, ds = 0;
    if (c.shared_expert_gate) {
      double z = 0, mag = 0;
      for (int64_t k = 0; k < d; ++k) {
        z += x(t, k) * p.shared_gate[k];
        mag += std::abs(x(t, k) * p.shared_gate[k]);
      }
      s = 1 / (1 + std::exp(-z));
      ds = 0.25 * gamma_n(double(d)) * mag + 4 * kU32;
    }
    weights.push_back({s, ds});
    evals.push_back(expert_with_bound(c, p, num_experts, x.row(t), zeros.data(), ub));
  };

  if (c.routing.routing_method == RoutingMethod::kSoftMoe) {
    const int64_t len = ref.routing.saved.sequence_length, slots = plan.num_slots;
    const int64_t per_expert = c.routing.slots_per_expert;
    for (int64_t g = 0; g < num_tokens / len; ++g) {
      std::vector<ExpertEval> slot_evals;
      for (int64_t j = 0; j < slots; ++j) {
        std::vector<double> xs(d, 0.0), dxs(d, 0.0);
        for (int64_t t = g * len; t < (g + 1) * len; ++t)
          for (int64_t k = 0; k < d; ++k) {
            const double pd = plan.dispatch[t * slots + j];
            xs[k] += pd * x(t, k);
            dxs[k] += std::abs(pd * x(t, k)) * (dw_rel * (1 + gamma_n(double(len))) + gamma_n(double(len)));
          }
        slot_evals.push_back(expert_with_bound(c, p, j / per_expert, xs.data(), dxs.data(), ub));
      }
      for (int64_t t = g * len; t < (g + 1) * len; ++t) {
        weights.clear();
        evals = slot_evals;
        for (int64_t j = 0; j < slots; ++j) {
          const double w = plan.combine[t * slots + j];
          weights.push_back({w, dw_rel * std::abs(w)});
        }
        shared_term(t);
        add_terms(t, weights, evals);
      }
    }
  } else {
    for (int64_t t = 0; t < num_tokens; ++t) {
      weights.clear();
      evals.clear();
      for (int64_t i = plan.token_offsets[t]; i < plan.token_offsets[t + 1]; ++i) {
        if (!plan.token_kept[i]) continue;
        weights.push_back({plan.token_weights[i], dw_rel * std::abs(plan.token_weights[i])});
        evals.push_back(expert_with_bound(c, p, plan.token_experts[i], x.row(t), zeros.data(), ub));
      }
      shared_term(t);
      add_terms(t, weights, evals);
    }
  }
  return bound;
}

// Runs the layer and the reference on the same input and checks the bound; returns the largest
// |error| / bound seen.
double check_against_reference(MoeLayer& layer, const Matrix<float>& hidden,
                               const RoutingOptions& options = {}, const std::string& what = "") {
  const MoeLayerConfig& c = layer.config();
  const MoeForwardResult out = layer.forward(hidden.cview(), options);
  const BasicMoeTensors<double> p = to_double(layer.parameters());
  const Matrix<double> x = to_double(hidden);
  const ReferenceMoeForward<double> ref = reference_moe_forward(c, p, x.cview(), options);
  // The same plan: selection is piecewise constant and the tests stay away from ties.
  EXPECT_EQ(out.routing.plan.token_experts, ref.routing.plan.token_experts) << what;
  EXPECT_EQ(out.routing.plan.token_kept, ref.routing.plan.token_kept) << what;
  const Matrix<double> bound = derived_bound(c, p, x, ref, c.dtype == DType::kBF16);
  double worst = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(bound.values.size()); ++i) {
    const double err = std::abs(double(out.output.values[i]) - ref.output.values[i]);
    const double ratio = err / std::max(bound.values[i], 1e-300);
    worst = std::max(worst, ratio);
    if (ratio > 1) {
      ADD_FAILURE() << what << ": element " << i << " layer " << out.output.values[i] << " reference "
                    << ref.output.values[i] << " error " << err << " > bound " << bound.values[i];
      break;
    }
  }
  return worst;
}

std::vector<int64_t> tokens_per_expert(const RoutingPlan& plan) {
  std::vector<int64_t> n(static_cast<size_t>(plan.num_experts));
  for (int64_t e = 0; e < plan.num_experts; ++e) n[e] = plan.tokens_for_expert(e);
  return n;
}

const ExpertActivation kActivations[] = {ExpertActivation::kSwiGlu, ExpertActivation::kGelu,
                                         ExpertActivation::kGeluErf, ExpertActivation::kRelu,
                                         ExpertActivation::kSwiGluClamped};

// ---------------------------------------------------------------------------------------------

TEST(LayerForward, MatchesReferenceOnRandomShapesAndEveryActivation) {
  struct Shape {
    int64_t tokens, d_model, d_ff, experts, top_k;
  };
  // d_model and d_ff off the vector width; experts with no token (more experts than
  // selections), one token, and (with the biased router below) all tokens.
  const Shape shapes[] = {{1, 19, 13, 4, 2}, {3, 8, 5, 16, 1}, {37, 33, 21, 8, 2}, {70, 17, 70, 5, 3}};
  uint32_t seed = 1;
  bool saw_empty = false, saw_one = false, saw_all = false;
  for (const Shape& s : shapes) {
    for (ExpertActivation act : kActivations) {
      MoeLayerConfig c = make_config(s.experts, s.top_k, s.d_model, s.d_ff, act);
      c.expert_bias = seed % 2 == 0;
      c.router_bias = true;
      c.activation_constants.clamp_limit = 1.0;  // both sides of the clamp are reached
      MoeLayer layer = random_layer(c, ++seed);
      layer.parameters().router_bias[0] = 50.0f;  // every token picks expert 0
      layer.refresh_packed_weights();
      const Matrix<float> hidden = random_hidden(s.tokens, s.d_model, seed * 7);
      const double worst = check_against_reference(layer, hidden, {}, activation_name(act));
      EXPECT_LE(worst, 1.0);
      const auto n = tokens_per_expert(layer.forward(hidden.cview()).routing.plan);
      saw_empty |= std::count(n.begin(), n.end(), 0) > 0;
      saw_one |= std::count(n.begin(), n.end(), 1) > 0;
      saw_all |= n[0] == s.tokens && s.tokens > 1;
    }
  }
  EXPECT_TRUE(saw_empty && saw_one && saw_all);
}

TEST(LayerForward, SharedExpertsWithAndWithoutGate) {
  for (bool gate : {false, true}) {
    for (int64_t shared_d_ff : {int64_t{0}, int64_t{11}}) {
      MoeLayerConfig c = make_config(6, 2, 24, 10);
      c.num_shared_experts = 2;
      c.shared_d_ff = shared_d_ff;  // 0: 2 · d_ff
      c.shared_expert_gate = gate;
      c.expert_bias = true;
      MoeLayer layer = random_layer(c, 40 + gate);
      const Matrix<float> hidden = random_hidden(29, 24, 5);
      EXPECT_LE(check_against_reference(layer, hidden, {}, gate ? "gated" : "ungated"), 1.0);
    }
  }
  // The shared expert alone: zero routed experts' down projections leave only S(x).
  MoeLayerConfig c = make_config(4, 1, 8, 4);
  c.num_shared_experts = 1;
  MoeLayer layer = random_layer(c, 3);
  std::fill(layer.parameters().down.begin(), layer.parameters().down.end(), 0.0f);
  layer.refresh_packed_weights();
  const Matrix<float> hidden = random_hidden(5, 8, 1);
  const auto out = layer.forward(hidden.cview());
  const auto p = to_double(layer.parameters());
  for (int64_t t = 0; t < 5; ++t) {
    const std::vector<double> zeros(8, 0.0);
    const ExpertEval s = expert_with_bound(c, p, 4, to_double(hidden).row(t), zeros.data(), 0.0);
    for (int64_t k = 0; k < 8; ++k) EXPECT_NEAR(out.output(t, k), s.y[k], 1e-5);
  }
}

TEST(LayerForward, EveryRoutingMethodEndToEnd) {
  struct Case {
    std::string name;
    std::function<void(MoeLayerConfig&)> set;
    RoutingOptions options;
  };
  std::vector<uint8_t> mask(48, 1);
  mask[3] = mask[17] = mask[40] = 0;
  const std::vector<Case> cases = {
      {"topk_capacity_drops",
       [](MoeLayerConfig& c) { c.routing.capacity_factor = 0.5; c.routing.training = true; },
       {}},
      {"topk_drops_renormalised_after",
       [](MoeLayerConfig& c) {
         c.routing.expert_capacity = 5;
         c.routing.renormalize = Renormalize::kAfterDrop;
         c.routing.drop_policy = DropPolicy::kProbs;
       },
       {}},
      {"topk_sigmoid_grouped",
       [](MoeLayerConfig& c) {
         c.routing.scoring_func = ScoringFunc::kSigmoid;
         c.routing.n_group = 2;
         c.routing.topk_group = 1;
         c.routing.routed_scaling_factor = 2.5;
       },
       {}},
      {"dense", [](MoeLayerConfig& c) { c.routing.routing_method = RoutingMethod::kDense; }, {}},
      {"expert_choice",
       [](MoeLayerConfig& c) {
         c.routing.routing_method = RoutingMethod::kExpertChoice;
         c.routing.capacity_factor = 1.0;
       },
       {}},
      {"sinkhorn", [](MoeLayerConfig& c) { c.routing.routing_method = RoutingMethod::kSinkhorn; }, {}},
      {"soft_moe",
       [](MoeLayerConfig& c) {
         c.routing.routing_method = RoutingMethod::kSoftMoe;
         c.routing.slots_per_expert = 2;
       },
       [] { RoutingOptions o; o.sequence_length = 12; return o; }()},
      {"topk_masked", [](MoeLayerConfig&) {}, [&] { RoutingOptions o; o.token_mask = mask; return o; }()},
      {"soft_moe_masked_shared",
       [](MoeLayerConfig& c) {
         c.routing.routing_method = RoutingMethod::kSoftMoe;
         c.num_shared_experts = 1;
         c.shared_expert_gate = true;
       },
       [&] { RoutingOptions o; o.token_mask = mask; o.sequence_length = 24; return o; }()},
  };
  for (const Case& k : cases) {
    MoeLayerConfig c = make_config(4, 2, 20, 12);
    c.expert_bias = true;
    k.set(c);
    MoeLayer layer = random_layer(c, 11);
    const Matrix<float> hidden = random_hidden(48, 20, 12);
    EXPECT_LE(check_against_reference(layer, hidden, k.options, k.name), 1.0) << k.name;
    if (k.name == "topk_capacity_drops") {
      EXPECT_GT(layer.forward(hidden.cview(), k.options).routing.plan.dropped.size(), 0u);
    }
    if (k.name == "topk_masked") {
      // Padding tokens get no routed output.
      const auto out = layer.forward(hidden.cview(), k.options);
      for (int64_t j = 0; j < 20; ++j) EXPECT_EQ(out.output(3, j), 0.0f);
    }
  }
}

// Nothing kept (every token padding): routed experts contribute zero, the shared expert still
// sees every token, and backward still runs.
TEST(LayerForward, NoKeptAssignments) {
  for (RoutingMethod method : {RoutingMethod::kTopK, RoutingMethod::kSoftMoe}) {
    MoeLayerConfig c = make_config(4, 2, 12, 8);
    c.routing.routing_method = method;
    c.num_shared_experts = 1;
    c.routing.training = true;
    MoeLayer layer = random_layer(c, 81);
    const Matrix<float> hidden = random_hidden(6, 12, 82);
    const std::vector<uint8_t> mask(6, 0);
    RoutingOptions options;
    options.token_mask = mask;
    EXPECT_LE(check_against_reference(layer, hidden, options, "nothing kept"), 1.0);
    const auto out = layer.forward(hidden.cview(), options);
    EXPECT_EQ(out.routing.plan.num_kept(), 0);
    const Matrix<float> d_x = layer.backward(hidden.cview());
    EXPECT_TRUE(std::all_of(layer.grads().gate_up.begin(), layer.grads().gate_up.end(),
                            [](float g) { return g == 0.0f; }));
    EXPECT_TRUE(std::any_of(d_x.values.begin(), d_x.values.end(), [](float g) { return g != 0.0f; }));
  }
}

// The combine is a fixed-order sum per token and every tile writes its own outputs, so any
// thread count gives the same bits, forward and backward.
TEST(LayerForward, BitwiseIdenticalAcrossThreadCounts) {
  for (RoutingMethod method : {RoutingMethod::kTopK, RoutingMethod::kSoftMoe}) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      std::vector<Matrix<float>> outputs, d_inputs;
      std::vector<MoeTensors> grads;
      for (int threads : {1, 2, 3}) {
        // 150 rows per expert on average: several row blocks and column blocks per expert.
        MoeLayerConfig c = make_config(4, 2, 64, 48);
        c.routing.routing_method = method;
        c.routing.router_aux_loss_coef = 0.01;
        c.routing.training = true;
        c.num_shared_experts = 1;
        c.shared_expert_gate = true;
        c.expert_bias = true;
        c.dtype = dtype;
        c.num_threads = threads;
        MoeLayer layer = random_layer(c, 21);
        const Matrix<float> hidden = random_hidden(300, 64, 22);
        const Matrix<float> d_out = random_hidden(300, 64, 23);
        outputs.push_back(layer.forward(hidden.cview()).output);
        d_inputs.push_back(layer.backward(d_out.cview()));
        grads.push_back(layer.grads());
      }
      for (size_t i = 1; i < outputs.size(); ++i) {
        EXPECT_EQ(0, std::memcmp(outputs[0].values.data(), outputs[i].values.data(), outputs[0].values.size() * 4));
        EXPECT_EQ(0, std::memcmp(d_inputs[0].values.data(), d_inputs[i].values.data(), d_inputs[0].values.size() * 4));
        grads[0].for_each([&](const char* name, const std::vector<float>& v) {
          const std::vector<float>* other = nullptr;
          grads[i].for_each([&](const char* n, const std::vector<float>& w) {
            if (std::string(n) == name) other = &w;
          });
          EXPECT_TRUE(v == *other) << name << " differs with " << (i + 1) << " threads";
        });
      }
    }
  }
}

// bf16 weights and activations stay within the propagated bf16 rounding bound, and the bound is
// not vacuous: the bf16 layer does differ from the fp32 one by a visible fraction of it.
TEST(LayerForward, Bf16WithinDerivedBound) {
  for (ExpertActivation act : kActivations) {
    for (bool training : {false, true}) {
      MoeLayerConfig c = make_config(8, 2, 64, 48, act);
      c.dtype = DType::kBF16;
      c.expert_bias = true;
      c.num_shared_experts = 1;
      c.routing.training = training;
      c.activation_constants.clamp_limit = 1.5;
      MoeLayer layer = random_layer(c, 31);
      const Matrix<float> hidden = random_hidden(40, 64, 32);
      const double worst = check_against_reference(layer, hidden, {}, activation_name(act));
      EXPECT_LE(worst, 1.0);
      EXPECT_GT(worst, 1e-3) << "bound far looser than the bf16 error";
    }
  }
}

// (3 tokens: groups of at most 4 rows, whose weights the training forward reads in place.)
TEST(LayerForward, TrainingAndInferencePathsAgree) {
  for (ExpertActivation act : kActivations)
    for (int64_t num_tokens : {33, 3}) {
      MoeLayerConfig c = make_config(5, 2, 40, 30, act);
      c.expert_bias = true;
      c.num_shared_experts = 1;
      MoeLayer layer = random_layer(c, 41);
      const Matrix<float> hidden = random_hidden(num_tokens, 40, 42);
      const auto inference = layer.forward(hidden.cview());
      layer.set_training(true);
      const auto training = layer.forward(hidden.cview());
      for (size_t i = 0; i < inference.output.values.size(); ++i)
        EXPECT_NEAR(inference.output.values[i], training.output.values[i],
                    1e-5 * (1 + std::abs(inference.output.values[i])))
            << num_tokens << " tokens";
    }
}

// Weights are packed (and, owned bf16, rounded) lazily, per expert, when tokens first reach it
// after a weight update. A layer whose calls before and after an update (refresh_packed_weights)
// touched only some experts, and which then runs in both modes on tokens reaching the others,
// must give bitwise the outputs of a fresh layer holding the new weights, fp32 and bf16.
TEST(LayerForward, LazyPackingAfterWeightUpdateMatchesFreshLayer) {
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    MoeLayerConfig c = make_config(8, 1, 24, 20);
    c.dtype = dtype;
    c.num_shared_experts = 1;
    MoeLayer layer = random_layer(c, 51);
    const Matrix<float> few = random_hidden(2, 24, 52), many = random_hidden(40, 24, 53);
    const auto first = layer.forward(few.cview());
    int touched = 0;
    for (int64_t e = 0; e < 8; ++e) touched += first.routing.plan.tokens_for_expert(e) > 0;
    EXPECT_LE(touched, 2);
    randomize(c, layer.parameters(), 54);
    layer.refresh_packed_weights();
    layer.forward(few.cview());  // after the update, again only a few experts first
    MoeLayer fresh = random_layer(c, 54);
    for (bool training : {false, true, false}) {
      layer.set_training(training);
      fresh.set_training(training);
      const auto got = layer.forward(many.cview());
      const auto want = fresh.forward(many.cview());
      EXPECT_EQ(got.output.values, want.output.values) << dtype_name(dtype) << (training ? " training" : "");
    }
  }
}

// Runs fn(isa) under MOEKIT_ISA = each kernel path, from the scalar oracle up; paths this CPU
// lacks make the layer's constructor throw and are skipped. Returns the number of paths run.
int for_each_kernel_path(const std::function<void(const std::string&)>& fn) {
  const char* previous = std::getenv("MOEKIT_ISA");
  const std::string saved = previous ? previous : "";
  int paths = 0;
  for (const char* isa : {"scalar", "avx2", "avx512", "avx512bf16"}) {
    setenv("MOEKIT_ISA", isa, 1);
    try {
      MoeLayer probe(make_config(2, 1, 4, 4), uint64_t{0});
    } catch (const InputError&) {
      continue;  // not available on this CPU or build
    }
    fn(isa);
    ++paths;
  }
  if (previous) setenv("MOEKIT_ISA", saved.c_str(), 1);
  else unsetenv("MOEKIT_ISA");
  return paths;
}

// Every kernel path the machine has, fp32 and bf16, inference and training, against the
// reference within the derived bound.
TEST(LayerForward, EveryKernelPathWithinDerivedBound) {
  const int paths = for_each_kernel_path([](const std::string& isa) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      for (bool training : {false, true}) {
        MoeLayerConfig c = make_config(7, 2, 53, 45);
        c.dtype = dtype;
        c.expert_bias = true;
        c.num_shared_experts = 1;
        c.shared_expert_gate = true;
        c.routing.training = training;
        MoeLayer layer = random_layer(c, 71);
        EXPECT_EQ(isa, layer.isa_name());
        const Matrix<float> hidden = random_hidden(48, 53, 72);
        EXPECT_LE(check_against_reference(layer, hidden, {}, isa), 1.0) << isa << " " << dtype_name(dtype);
      }
    }
  });
  EXPECT_GE(paths, 1);
}

// A layer on borrowed memory (fp32 or bf16 weights) computes what the owning layer computes.
TEST(LayerForward, BorrowedParametersMatchOwned) {
  MoeLayerConfig c = make_config(6, 2, 32, 24);
  c.expert_bias = true;
  c.num_shared_experts = 1;
  c.shared_expert_gate = true;
  MoeLayer owned = random_layer(c, 51);
  const Matrix<float> hidden = random_hidden(20, 32, 52);
  const auto expected = owned.forward(hidden.cview());
  MoeLayer borrowed(c, moe_params_view(c, owned.parameters()));
  EXPECT_FALSE(borrowed.owns_parameters());
  const auto got = borrowed.forward(hidden.cview());
  EXPECT_TRUE(expected.output.values == got.output.values);

  // bf16 checkpoint weights borrowed by a bf16 layer = an owned bf16 layer on the same values.
  MoeLayerConfig cb = c;
  cb.dtype = DType::kBF16;
  MoeLayer owned_bf16(cb, uint64_t{0});
  owned_bf16.parameters() = owned.parameters();
  owned_bf16.refresh_packed_weights();
  const MoeTensors& t = owned.parameters();
  auto to_bf16 = [](const std::vector<float>& v) {
    std::vector<uint16_t> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      uint32_t bits;
      std::memcpy(&bits, &v[i], 4);
      bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even (finite values)
      out[i] = static_cast<uint16_t>(bits >> 16);
    }
    return out;
  };
  const auto gu = to_bf16(t.gate_up), dn = to_bf16(t.down), sgu = to_bf16(t.shared_gate_up),
             sdn = to_bf16(t.shared_down);
  MoeParams view = moe_params_view(cb, t);
  view.gate_up = {gu.data(), DType::kBF16, 6, c.gate_up_rows(), 32};
  view.down = {dn.data(), DType::kBF16, 6, 32, 24};
  view.shared_gate_up = {sgu.data(), DType::kBF16, 1, c.shared_gate_up_rows(), 32};
  view.shared_down = {sdn.data(), DType::kBF16, 1, 32, c.effective_shared_d_ff()};
  MoeLayer borrowed_bf16(cb, view);
  EXPECT_TRUE(owned_bf16.forward(hidden.cview()).output.values ==
              borrowed_bf16.forward(hidden.cview()).output.values);
}

// ---------------------------------------------------------------------------------------------
// Bad input.

template <typename Error>
void expect_error(const std::function<void()>& action, const std::vector<std::string>& fragments) {
  try {
    action();
  } catch (const Error& error) {
    const std::string message = error.what();
    for (const auto& f : fragments)
      EXPECT_NE(message.find(f), std::string::npos) << "\"" << message << "\" lacks \"" << f << "\"";
    return;
  } catch (const std::exception& error) {
    FAIL() << "wrong exception type: " << error.what();
  }
  FAIL() << "nothing was thrown";
}

TEST(LayerInput, RejectsBadHiddenStatesAndGradients) {
  MoeLayerConfig c = make_config(4, 2, 8, 6);
  MoeLayer layer = random_layer(c, 61);
  const Matrix<float> wrong_cols = random_hidden(5, 7, 1);
  expect_error<InputError>([&] { layer.forward(wrong_cols.cview()); },
                           {"hidden_states columns", "expected 8 (d_model)", "got 7"});
  expect_error<InputError>([&] { layer.forward(ConstMatrixView<float>{nullptr, 0, 8}); },
                           {"hidden_states", "non-empty", "[0, 8]"});
  Matrix<float> nan = random_hidden(5, 8, 2);
  nan(2, 3) = std::nanf("");
  expect_error<InputError>([&] { layer.forward(nan.cview()); }, {"hidden_states", "finite", "[2][3]"});
  // Backward needs a training forward first, and d_output of the output's shape.
  const Matrix<float> hidden = random_hidden(5, 8, 3);
  layer.forward(hidden.cview());
  expect_error<InputError>([&] { layer.backward(hidden.cview()); }, {"backward", "training"});
  layer.set_training(true);
  layer.forward(hidden.cview());
  const Matrix<float> short_grad = random_hidden(4, 8, 4);
  expect_error<InputError>([&] { layer.backward(short_grad.cview()); }, {"d_output shape", "[5, 8]", "[4, 8]"});
  Matrix<float> inf_grad = random_hidden(5, 8, 5);
  inf_grad(1, 1) = INFINITY;
  expect_error<InputError>([&] { layer.backward(inf_grad.cview()); }, {"d_output", "finite", "[1][1]"});
  // Routing options are checked by the routing core.
  std::vector<uint8_t> mask(3, 1);
  RoutingOptions options;
  options.token_mask = mask;
  expect_error<InputError>([&] { layer.forward(hidden.cview(), options); }, {"token_mask length", "5"});
}

TEST(LayerInput, RejectsMismatchedParameters) {
  MoeLayerConfig c = make_config(4, 2, 8, 6);
  c.expert_bias = true;
  MoeTensors t = make_moe_tensors<float>(c);
  MoeParams good = moe_params_view(c, t);
  EXPECT_NO_THROW(check_moe_params(c, good));

  MoeParams p = good;
  p.gate_up.rows = 6;  // ungated rows given to a SwiGLU layer
  expect_error<InputError>([&] { MoeLayer bad(c, p); }, {"params.gate_up shape", "[4, 12, 8]", "[4, 6, 8]"});
  p = good;
  p.down.experts = 3;
  expect_error<InputError>([&] { MoeLayer bad(c, p); }, {"params.down shape", "[4, 8, 6]", "[3, 8, 6]"});
  p = good;
  p.router_weight.cols = 9;
  expect_error<InputError>([&] { MoeLayer bad(c, p); }, {"params.router_weight shape", "[4, 8]", "[4, 9]"});
  p = good;
  p.down_bias = {};
  expect_error<InputError>([&] { MoeLayer bad(c, p); }, {"params.down_bias length", "32", "0"});
  p = good;
  p.gate_up.data = nullptr;
  expect_error<InputError>([&] { MoeLayer bad(c, p); }, {"params.gate_up", "[4, 12, 8]", "none"});
  p = good;
  p.shared_gate = t.down_bias;  // a gate without shared experts
  expect_error<InputError>([&] { MoeLayer bad(c, p); }, {"params.shared_gate", "empty", "length 32"});
  p = good;
  p.gate_up.dtype = static_cast<DType>(7);
  expect_error<InputError>([&] { MoeLayer bad(c, p); }, {"params.gate_up dtype", "fp32, bf16 or the layer's quantized format", "7"});
}

TEST(LayerConfig, ValidatesFields) {
  MoeLayerConfig c = make_config(4, 2, 8, 6);
  c.d_ff = 0;
  expect_error<ConfigError>([&] { c.validate(); }, {"d_ff", ">= 1", "got 0"});
  c = make_config(4, 2, 8, 6);
  c.shared_expert_gate = true;
  expect_error<ConfigError>([&] { c.validate(); }, {"shared_expert_gate", "num_shared_experts is 0"});
  c = make_config(4, 2, 8, 6);
  c.dtype = static_cast<DType>(7);
  expect_error<ConfigError>([&] { c.validate(); }, {"dtype", "fp32, bf16, int8, int4 or mxfp4", "7"});
  c = make_config(4, 2, 8, 6);
  c.num_threads = 0;
  expect_error<ConfigError>([&] { MoeLayer bad(c, uint64_t{1}); }, {"num_threads", "[1, 1024]", "0"});
  c = make_config(4, 5, 8, 6);  // top_k > num_experts: the routing core's check
  expect_error<ConfigError>([&] { c.validate(); }, {"num_experts_per_tok"});
}

TEST(LayerConfig, ParsesJsonWithRoutingKeysAndRejectsUnknownValues) {
  const MoeLayerConfig c = moe_layer_config_from_json(R"({
    "hidden_size": 64, "moe_intermediate_size": 32, "hidden_act": "silu", "dtype": "bfloat16",
    "n_shared_experts": 2, "num_threads": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
    "norm_topk_prob": true})");
  EXPECT_EQ(c.d_model, 64);
  EXPECT_EQ(c.d_ff, 32);
  EXPECT_EQ(c.activation, ExpertActivation::kSwiGlu);
  EXPECT_EQ(c.dtype, DType::kBF16);
  EXPECT_EQ(c.effective_shared_d_ff(), 64);
  EXPECT_EQ(c.num_threads, 2);
  EXPECT_EQ(c.num_experts(), 8);
  EXPECT_EQ(moe_layer_config_from_json(R"({"d_model": 4, "d_ff": 4, "hidden_act": "gelu"})").activation,
            ExpertActivation::kGeluErf);
  expect_error<ConfigError>([] { moe_layer_config_from_json(R"({"d_model": 4, "d_ff": 4, "dtype": "fp16"})"); },
                            {"dtype", "fp32, float32, bf16, bfloat16", "\"fp16\""});
  expect_error<ConfigError>([] { moe_layer_config_from_json(R"({"d_model": 4, "d_ff": 4, "activation": "tanh"})"); },
                            {"activation", "swiglu", "\"tanh\""});
  expect_error<ConfigError>([] { moe_layer_config_from_json(R"({"d_model": 4, "hidden_size": 4, "d_ff": 4})"); },
                            {"d_model", "one key", "hidden_size"});
  expect_error<ConfigError>([] { moe_layer_config_from_json(R"({"d_model": 4, "d_ff": 4, "d_fff": 3})"); },
                            {"d_fff", "unknown key"});
  expect_error<ConfigError>([] { moe_layer_config_from_json(R"({"d_model": "4", "d_ff": 4})"); },
                            {"d_model", "an integer", "string"});
}

}  // namespace
}  // namespace moekit
