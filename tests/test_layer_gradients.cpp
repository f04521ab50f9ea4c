// Gradients of the MoE layer.
//
// Two steps, because finite differences need double precision and the layer computes in fp32:
//   1. The scalar reference (templated on Real) runs in double; its analytic backward
//      (reference_moe_backward) is checked against central differences of
//          L = ⟨d_out, output⟩ + router_aux_loss_coef · aux_loss + router_z_loss_coef · z_loss
//      for every element of every parameter and of hidden_states.
//   2. The layer's backward (grouped GEMMs, threads, fp32 or bf16) is checked against that
//      reference backward on the same parameters.
//
// Selection (top-k, capacity, expert choice, Sinkhorn) is piecewise constant and ReLU/clamp have
// kinks, so L is smooth only away from ties: every perturbed forward must reproduce the
// unperturbed plan, otherwise the draw is rejected and redrawn.
//
// Tolerance of step 1: central differences with h = 1e-6 have truncation error h²/6·|L'''| ~
// 1e-12 and rounding error ε·|L|/h ~ 1e-16·10/1e-6 = 1e-9; 1e-6·(1 + |g|) is far above both and
// far below any real mistake (a missing term or a wrong factor moves a gradient by O(|g|)).
// Step 2 compares fp32 against double: the sums run over at most a few hundred terms, so the
// relative error is ~1e-5 of the largest gradient; 1e-4 of the tensor's largest magnitude
// leaves room and still catches any structural error. bf16 rounds every GEMM input (relative
// 2⁻⁸ each, a few of them compound through the forward and backward GEMMs, ~0.5% observed):
// 2e-2 of the tensor's norm (1e-1 for ReLU, whose derivative flips for units near 0).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "moekit/error.h"
#include "moekit/layer.h"
#include "oracles/reference_moe.h"

namespace moekit {
namespace {

constexpr double kStep = 1e-6;
constexpr int kMaxAttempts = 20;

struct GradCase {
  std::string name;
  std::function<void(MoeLayerConfig&)> set;
  int64_t sequence_length = 0;
  bool masked = false;
  int64_t num_tokens = 48;  // > 64 rows per group takes the packed-B paths of the backward
};

MoeLayerConfig base_config(int64_t d_model, int64_t d_ff) {
  MoeLayerConfig c;
  c.routing.num_experts = 4;
  c.routing.num_experts_per_tok = 2;
  c.routing.training = true;
  c.routing.router_aux_loss_coef = 0.3;
  c.routing.router_z_loss_coef = 0.05;
  c.d_model = d_model;
  c.d_ff = d_ff;
  c.expert_bias = true;
  c.router_bias = true;
  return c;
}

const std::vector<GradCase>& grad_cases() {
  static const std::vector<GradCase> cases = {
      {"topk_swiglu", [](MoeLayerConfig&) {}},
      {"topk_gelu_shared_gated",
       [](MoeLayerConfig& c) {
         c.activation = ExpertActivation::kGelu;
         c.num_shared_experts = 1;
         c.shared_expert_gate = true;
       }},
      {"topk_gelu_erf_capacity_drops_after_drop",
       [](MoeLayerConfig& c) {
         c.activation = ExpertActivation::kGeluErf;
         c.routing.expert_capacity = 2;
         c.routing.renormalize = Renormalize::kAfterDrop;
       }},
      {"dense_relu", [](MoeLayerConfig& c) {
         c.routing.routing_method = RoutingMethod::kDense;
         c.activation = ExpertActivation::kRelu;
       }},
      {"dense_swiglu_shared_many_rows",
       [](MoeLayerConfig& c) {
         c.routing.routing_method = RoutingMethod::kDense;
         c.num_shared_experts = 1;
       },
       0, false, 150},
      {"topk_swiglu_shared_few_rows",  // ≤ 4 rows per group: weights read in place in training
       [](MoeLayerConfig& c) { c.num_shared_experts = 1; }, 0, false, 3},
      {"expert_choice_swiglu_clamped",
       [](MoeLayerConfig& c) {
         c.routing.routing_method = RoutingMethod::kExpertChoice;
         c.routing.capacity_factor = 1.0;
         c.activation = ExpertActivation::kSwiGluClamped;
         c.activation_constants.clamp_limit = 0.6;  // both sides of both clamps
       }},
      {"sinkhorn_shared_ungated",
       [](MoeLayerConfig& c) {
         c.routing.routing_method = RoutingMethod::kSinkhorn;
         c.num_shared_experts = 2;
         c.shared_d_ff = 3;
       }},
      {"sigmoid_scaled_noisy_gating",
       [](MoeLayerConfig& c) {
         c.routing.scoring_func = ScoringFunc::kSigmoid;
         c.routing.routed_scaling_factor = 1.7;
         c.routing.noisy_gating = true;
         c.routing.seed = 5;
       }},
      {"topk_input_jitter_logit_noise",
       [](MoeLayerConfig& c) {
         c.routing.router_jitter_noise = 0.1;
         c.routing.noise_std = 0.5;
         c.routing.seed = 9;
       }},
      {"soft_moe_shared_gated",
       [](MoeLayerConfig& c) {
         c.routing.routing_method = RoutingMethod::kSoftMoe;
         c.routing.slots_per_expert = 2;
         c.num_shared_experts = 1;
         c.shared_expert_gate = true;
       },
       3, true},
  };
  return cases;
}

template <typename Real>
void randomize(const MoeLayerConfig& c, BasicMoeTensors<Real>& t, std::mt19937& gen) {
  auto fill = [&](std::vector<Real>& v, double stddev) {
    std::normal_distribution<double> dist(0.0, stddev);
    for (Real& x : v) x = Real(dist(gen));
  };
  const double d = double(c.d_model);
  fill(t.router_weight, 1.5 / std::sqrt(d));
  fill(t.router_bias, 0.3);
  fill(t.router_noise_weight, 0.5 / std::sqrt(d));
  fill(t.gate_up, 1.0 / std::sqrt(d));
  fill(t.down, 1.0 / std::sqrt(double(c.d_ff)));
  fill(t.gate_up_bias, 0.2);
  fill(t.down_bias, 0.2);
  fill(t.shared_gate_up, 1.0 / std::sqrt(d));
  fill(t.shared_down, 0.5);
  fill(t.shared_gate_up_bias, 0.2);
  fill(t.shared_down_bias, 0.2);
  fill(t.shared_gate, 1.0 / std::sqrt(d));
}

template <typename Real>
Matrix<Real> random_matrix(int64_t rows, int64_t cols, std::mt19937& gen) {
  std::normal_distribution<double> dist(0.0, 1.0);
  Matrix<Real> m(rows, cols);
  for (Real& v : m.values) v = Real(dist(gen));
  return m;
}

bool same_plan(const RoutingResult<double>& a, const RoutingResult<double>& b) {
  return a.plan.token_experts == b.plan.token_experts && a.plan.token_kept == b.plan.token_kept;
}

// L for the reference, and whether its plan equals `plan`.
double loss(const MoeLayerConfig& c, const BasicMoeTensors<double>& p, const Matrix<double>& x,
            const Matrix<double>& d_out, const RoutingOptions& options,
            const RoutingResult<double>& plan, bool* same) {
  const auto f = reference_moe_forward(c, p, x.cview(), options);
  *same = same_plan(f.routing, plan);
  double l = f.routing.losses.total;
  for (size_t i = 0; i < d_out.values.size(); ++i) l += d_out.values[i] * f.output.values[i];
  return l;
}

// Checks every coordinate; returns false when a perturbation changed the plan (redraw).
bool finite_difference_check(const GradCase& k, const MoeLayerConfig& c, BasicMoeTensors<double>& p,
                             Matrix<double>& x, const Matrix<double>& d_out,
                             const RoutingOptions& options) {
  const auto forward = reference_moe_forward(c, p, x.cview(), options);
  const auto grads = reference_moe_backward(c, p, x.cview(), forward, d_out.cview());
  bool tie = false;
  int64_t checked = 0;
  auto check = [&](const std::string& name, std::vector<double>& values, const std::vector<double>& analytic) {
    ASSERT_EQ(values.size(), analytic.size()) << name;
    for (size_t i = 0; i < values.size() && !tie; ++i) {
      const double saved = values[i];
      bool same_plus = false, same_minus = false;
      values[i] = saved + kStep;
      const double plus = loss(c, p, x, d_out, options, forward.routing, &same_plus);
      values[i] = saved - kStep;
      const double minus = loss(c, p, x, d_out, options, forward.routing, &same_minus);
      values[i] = saved;
      if (!same_plus || !same_minus) {
        tie = true;
        return;
      }
      const double numeric = (plus - minus) / (2 * kStep);
      EXPECT_NEAR(analytic[i], numeric, 1e-6 * (1 + std::abs(analytic[i])))
          << k.name << ": " << name << "[" << i << "]";
      ++checked;
    }
  };
  check("hidden_states", x.values, grads.d_hidden_states.values);
  BasicMoeTensors<double> g = grads.d_params;
  std::vector<std::pair<std::string, std::vector<double>*>> params, analytic;
  p.for_each([&](const char* name, std::vector<double>& v) { params.push_back({name, &v}); });
  g.for_each([&](const char* name, std::vector<double>& v) { analytic.push_back({name, &v}); });
  for (size_t i = 0; i < params.size() && !tie; ++i) {
    if (params[i].first == "router_noise_weight" && params[i].second->empty()) continue;
    check(params[i].first, *params[i].second, *analytic[i].second);
  }
  if (!tie) EXPECT_GT(checked, 100) << k.name;
  return !tie;
}

TEST(LayerGradients, ReferenceBackwardMatchesFiniteDifferences) {
  for (const GradCase& k : grad_cases()) {
    MoeLayerConfig c = base_config(5, 3);
    k.set(c);
    std::mt19937 gen(17);
    bool done = false;
    for (int attempt = 0; attempt < kMaxAttempts && !done; ++attempt) {
      BasicMoeTensors<double> p = make_moe_tensors<double>(c);
      randomize(c, p, gen);
      const int64_t num_tokens = 6;
      Matrix<double> x = random_matrix<double>(num_tokens, c.d_model, gen);
      const Matrix<double> d_out = random_matrix<double>(num_tokens, c.d_model, gen);
      std::vector<uint8_t> mask(num_tokens, 1);
      RoutingOptions options;
      options.sequence_length = k.sequence_length;
      if (k.masked) {
        mask[1] = 0;
        options.token_mask = mask;
      }
      done = finite_difference_check(k, c, p, x, d_out, options);
    }
    EXPECT_TRUE(done) << k.name << ": every draw was near a tie";
  }
}

// The layer's backward against the reference backward on the same parameters and input.
void compare_layer_backward(const GradCase& k, DType dtype, int threads) {
  MoeLayerConfig c = base_config(24, 17);
  k.set(c);
  c.dtype = dtype;
  c.num_threads = threads;
  if (c.routing.expert_capacity) c.routing.expert_capacity = 14;
  std::mt19937 gen(99);
  MoeLayer layer(c, uint64_t{3});
  randomize(c, layer.parameters(), gen);
  layer.refresh_packed_weights();
  const int64_t num_tokens = k.num_tokens;
  const Matrix<float> x = random_matrix<float>(num_tokens, c.d_model, gen);
  const Matrix<float> d_out = random_matrix<float>(num_tokens, c.d_model, gen);
  std::vector<uint8_t> mask(num_tokens, 1);
  RoutingOptions options;
  options.sequence_length = k.sequence_length ? 12 : 0;
  if (k.masked) {
    mask[5] = mask[30] = 0;
    options.token_mask = mask;
  }
  layer.zero_grad();
  const auto out = layer.forward(x.cview(), options);
  const Matrix<float> d_x = layer.backward(d_out.cview());

  BasicMoeTensors<double> p;
  const MoeTensors& lp = layer.parameters();
  auto widen = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
  p.router_weight = widen(lp.router_weight);
  p.router_bias = widen(lp.router_bias);
  p.router_noise_weight = widen(lp.router_noise_weight);
  p.gate_up = widen(lp.gate_up);
  p.down = widen(lp.down);
  p.gate_up_bias = widen(lp.gate_up_bias);
  p.down_bias = widen(lp.down_bias);
  p.shared_gate_up = widen(lp.shared_gate_up);
  p.shared_down = widen(lp.shared_down);
  p.shared_gate_up_bias = widen(lp.shared_gate_up_bias);
  p.shared_down_bias = widen(lp.shared_down_bias);
  p.shared_gate = widen(lp.shared_gate);
  Matrix<double> xd(num_tokens, c.d_model), dd(num_tokens, c.d_model);
  std::copy(x.values.begin(), x.values.end(), xd.values.begin());
  std::copy(d_out.values.begin(), d_out.values.end(), dd.values.begin());
  const auto rf = reference_moe_forward(c, p, xd.cview(), options);
  ASSERT_EQ(rf.routing.plan.token_experts, out.routing.plan.token_experts) << k.name;
  ASSERT_EQ(rf.routing.plan.token_kept, out.routing.plan.token_kept) << k.name;
  const auto rg = reference_moe_backward(c, p, xd.cview(), rf, dd.cview());

  // bf16: ReLU's derivative jumps at 0, and units whose pre-activation is within the bf16 error
  // of 0 flip it, so a few gradient rows differ by O(1): a looser norm for ReLU.
  const double tol = dtype == DType::kF32 ? 1e-4 : c.activation == ExpertActivation::kRelu ? 1e-1 : 2e-2;
  auto compare = [&](const std::string& name, const std::vector<float>& got, const std::vector<double>& want) {
    ASSERT_EQ(got.size(), want.size()) << name;
    double scale = 0, err = 0, norm = 0, err_norm = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      const double e = double(got[i]) - want[i];
      scale = std::max(scale, std::abs(want[i]));
      err = std::max(err, std::abs(e));
      norm += want[i] * want[i];
      err_norm += e * e;
    }
    if (dtype == DType::kF32) {
      EXPECT_LE(err, tol * scale + 1e-7) << k.name << " " << name << ": max error " << err << " of max " << scale;
    } else {
      EXPECT_LE(std::sqrt(err_norm), tol * std::sqrt(norm) + 1e-7)
          << k.name << " bf16 " << name << ": error norm " << std::sqrt(err_norm) << " of norm " << std::sqrt(norm);
    }
  };
  compare("d_hidden_states", d_x.values, rg.d_hidden_states.values);
  std::vector<std::pair<std::string, const std::vector<float>*>> got;
  std::vector<const std::vector<double>*> want;
  layer.grads().for_each([&](const char* name, const std::vector<float>& v) { got.push_back({name, &v}); });
  rg.d_params.for_each([&](const char*, const std::vector<double>& v) { want.push_back(&v); });
  for (size_t i = 0; i < got.size(); ++i) compare(got[i].first, *got[i].second, *want[i]);
}

// Runs fn() under MOEKIT_ISA = each kernel path this CPU has (see test_layer.cpp).
void for_each_kernel_path(const std::function<void()>& fn) {
  const char* previous = std::getenv("MOEKIT_ISA");
  const std::string saved = previous ? previous : "";
  for (const char* isa : {"scalar", "avx2", "avx512", "avx512bf16"}) {
    setenv("MOEKIT_ISA", isa, 1);
    try {
      MoeLayer probe(base_config(4, 4), uint64_t{0});
    } catch (const InputError&) {
      continue;
    }
    SCOPED_TRACE(isa);
    fn();
  }
  if (previous) setenv("MOEKIT_ISA", saved.c_str(), 1);
  else unsetenv("MOEKIT_ISA");
}

TEST(LayerGradients, LayerBackwardMatchesReferenceFp32) {
  for_each_kernel_path([] {
    for (const GradCase& k : grad_cases()) compare_layer_backward(k, DType::kF32, 2);
  });
}

TEST(LayerGradients, LayerBackwardMatchesReferenceBf16) {
  for_each_kernel_path([] {
    for (const GradCase& k : grad_cases()) compare_layer_backward(k, DType::kBF16, 1);
  });
}

// backward accumulates (+=) into grads(); zero_grad() clears them.
TEST(LayerGradients, AccumulatesUntilZeroGrad) {
  MoeLayerConfig c = base_config(16, 8);
  c.num_shared_experts = 1;
  c.shared_expert_gate = true;
  std::mt19937 gen(7);
  MoeLayer layer(c, uint64_t{8});
  const Matrix<float> x = random_matrix<float>(20, 16, gen);
  const Matrix<float> d_out = random_matrix<float>(20, 16, gen);
  layer.forward(x.cview());
  layer.backward(d_out.cview());
  const MoeTensors once = layer.grads();
  layer.forward(x.cview());
  layer.backward(d_out.cview());
  std::vector<const std::vector<float>*> first;
  once.for_each([&](const char*, const std::vector<float>& v) { first.push_back(&v); });
  size_t i = 0;
  double largest = 0;
  layer.grads().for_each([&](const char* name, const std::vector<float>& v) {
    const std::vector<float>& a = *first[i++];
    for (size_t j = 0; j < v.size(); ++j) {
      EXPECT_NEAR(v[j], 2 * a[j], 1e-5 * (1 + std::abs(a[j]))) << name << "[" << j << "]";
      largest = std::max(largest, double(std::abs(a[j])));
    }
  });
  EXPECT_GT(largest, 0.0);
  layer.zero_grad();
  layer.grads().for_each([](const char* name, const std::vector<float>& v) {
    EXPECT_TRUE(std::all_of(v.begin(), v.end(), [](float g) { return g == 0.0f; })) << name;
  });
}

// The backward keeps its packed weights until refresh_packed_weights(). After an update, a layer
// that ran a training step before must give bitwise the gradients of a fresh layer holding the
// new weights (groups of 150 rows take the packed paths), fp32 and bf16.
TEST(LayerGradients, CachedBackwardPacksFollowWeightUpdates) {
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    MoeLayerConfig c = base_config(24, 17);
    c.routing.routing_method = RoutingMethod::kDense;
    c.dtype = dtype;
    std::mt19937 gen(31);
    const Matrix<float> x1 = random_matrix<float>(150, 24, gen), d1 = random_matrix<float>(150, 24, gen);
    const Matrix<float> x2 = random_matrix<float>(150, 24, gen), d2 = random_matrix<float>(150, 24, gen);
    MoeLayer layer(c, uint64_t{5}), fresh(c, uint64_t{5});
    layer.zero_grad();
    layer.forward(x1.cview());
    layer.backward(d1.cview());
    std::mt19937 g1(77), g2(77);
    randomize(c, layer.parameters(), g1);
    layer.refresh_packed_weights();
    randomize(c, fresh.parameters(), g2);
    fresh.refresh_packed_weights();
    layer.zero_grad();
    layer.forward(x2.cview());
    const Matrix<float> dx = layer.backward(d2.cview());
    fresh.forward(x2.cview());
    const Matrix<float> dx_fresh = fresh.backward(d2.cview());
    EXPECT_EQ(dx.values, dx_fresh.values) << dtype_name(dtype);
    std::vector<const std::vector<float>*> want;
    fresh.grads().for_each([&](const char*, const std::vector<float>& v) { want.push_back(&v); });
    size_t i = 0;
    layer.grads().for_each([&](const char* name, const std::vector<float>& v) {
      EXPECT_EQ(v, *want[i++]) << name << " " << dtype_name(dtype);
    });
  }
}

// zero_grad() is lazy for expert weight gradients: the next backward writes those it touches
// and grads() zero-fills the rest. After a step that touched other experts, zero_grad() then
// one backward must give exactly (bitwise) the gradients of a fresh layer's single backward,
// and a second backward must add to them.
TEST(LayerGradients, LazyZeroGradMatchesFreshLayer) {
  MoeLayerConfig c = base_config(16, 8);
  c.routing.num_experts = 8;
  c.routing.num_experts_per_tok = 1;
  c.num_shared_experts = 1;
  std::mt19937 gen(11);
  const Matrix<float> x1 = random_matrix<float>(12, 16, gen);
  const Matrix<float> x2 = random_matrix<float>(3, 16, gen);  // 3 tokens: most experts idle
  const Matrix<float> d1 = random_matrix<float>(12, 16, gen);
  const Matrix<float> d2 = random_matrix<float>(3, 16, gen);
  MoeLayer layer(c, uint64_t{5}), fresh(c, uint64_t{5});
  layer.zero_grad();
  layer.forward(x1.cview());
  layer.backward(d1.cview());
  layer.zero_grad();
  const MoeForwardResult r = layer.forward(x2.cview());
  layer.backward(d2.cview());
  int idle = 0;
  for (int64_t e = 0; e < c.num_experts(); ++e) idle += r.routing.plan.tokens_for_expert(e) == 0;
  EXPECT_GE(idle, 5);  // the case under test: experts touched before, idle now
  fresh.forward(x2.cview());
  fresh.backward(d2.cview());
  std::vector<const std::vector<float>*> want;
  fresh.grads().for_each([&](const char*, const std::vector<float>& v) { want.push_back(&v); });
  size_t i = 0;
  layer.grads().for_each([&](const char* name, const std::vector<float>& v) {
    EXPECT_EQ(v, *want[i++]) << name;
  });
  // Accumulation continues after the lazy zero.
  layer.forward(x2.cview());
  layer.backward(d2.cview());
  i = 0;
  layer.grads().for_each([&](const char* name, const std::vector<float>& v) {
    const std::vector<float>& a = *want[i++];
    for (size_t j = 0; j < v.size(); ++j) EXPECT_FLOAT_EQ(v[j], 2 * a[j]) << name << "[" << j << "]";
  });
}

}  // namespace
}  // namespace moekit
