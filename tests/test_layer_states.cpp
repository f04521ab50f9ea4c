// The layer's front-end API: forward states taken out of the layer (several forwards before
// their backwards), gradients written into caller buffers, loss gradients given per call, and
// the thread count changed between calls. Each result is compared bitwise with the plain
// forward → backward → grads() sequence, which the Layer* suites check against the reference.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "moekit/error.h"
#include "moekit/layer.h"

namespace moekit {
namespace {

MoeLayerConfig config_with_everything() {
  MoeLayerConfig c;
  c.routing.num_experts = 6;
  c.routing.num_experts_per_tok = 2;
  c.routing.router_aux_loss_coef = 0.03;
  c.routing.router_z_loss_coef = 0.002;
  c.routing.training = true;
  c.d_model = 12;
  c.d_ff = 10;
  c.router_bias = true;
  c.expert_bias = true;
  c.num_shared_experts = 1;
  c.shared_d_ff = 7;
  c.shared_expert_gate = true;
  c.selection_bias = true;
  return c;
}

Matrix<float> normal_matrix(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Matrix<float> m(rows, cols);
  for (float& v : m.values) v = dist(gen);
  return m;
}

struct StepResult {
  Matrix<float> output, d_x;
  MoeTensors grads;
};

// The plain sequence on a fresh layer: forward, backward, grads().
StepResult plain_step(const MoeLayerConfig& c, const Matrix<float>& x, const Matrix<float>& dy) {
  MoeLayer layer(c, 7);
  layer.zero_grad();
  StepResult r;
  r.output = layer.forward(x.cview()).output;
  r.d_x = layer.backward(dy.cview());
  r.grads = layer.grads();
  return r;
}


// Caller buffers full of NaN: everything the backward does not write would show.
MoeTensors nan_buffers(const MoeLayerConfig& c) {
  MoeTensors t = make_moe_tensors<float>(c);
  t.for_each([](const char*, std::vector<float>& v) { std::fill(v.begin(), v.end(), std::numeric_limits<float>::quiet_NaN()); });
  t.selection_bias.clear();
  return t;
}

void expect_same_grads(const MoeTensors& a, const MoeTensors& b, const std::string& what) {
  std::vector<std::pair<std::string, std::vector<float>>> va, vb;
  a.for_each([&](const char* n, const std::vector<float>& v) { va.emplace_back(n, v); });
  b.for_each([&](const char* n, const std::vector<float>& v) { vb.emplace_back(n, v); });
  for (size_t i = 0; i < va.size(); ++i) {
    if (va[i].first == "selection_bias") continue;
    EXPECT_EQ(va[i].second, vb[i].second) << what << ": " << va[i].first;
  }
}

TEST(LayerStates, TwoForwardsInFlightMatchTheirPlainSteps) {
  const MoeLayerConfig c = config_with_everything();
  const Matrix<float> x1 = normal_matrix(9, c.d_model, 1), x2 = normal_matrix(14, c.d_model, 2);
  const Matrix<float> dy1 = normal_matrix(9, c.d_model, 3), dy2 = normal_matrix(14, c.d_model, 4);
  const StepResult p1 = plain_step(c, x1, dy1), p2 = plain_step(c, x2, dy2);

  MoeLayer layer(c, 7);
  const Matrix<float> y1 = layer.forward(x1.cview()).output;
  MoeForwardState s1 = layer.take_forward_state();
  const Matrix<float> y2 = layer.forward(x2.cview()).output;
  MoeForwardState s2 = layer.take_forward_state();
  EXPECT_TRUE(layer.take_forward_state().empty());  // nothing left in the layer
  EXPECT_EQ(y1.values, p1.output.values);
  EXPECT_EQ(y2.values, p2.output.values);
  // Backwards in the opposite order, each into its own NaN-filled buffers.
  MoeTensors g2 = nan_buffers(c), g1 = nan_buffers(c);
  const MoeGradBuffers b2 = moe_grad_buffers(g2), b1 = moe_grad_buffers(g1);
  MoeBackwardOptions o2, o1;
  o2.into = &b2;
  o1.into = &b1;
  const Matrix<float> dx2 = layer.backward(dy2.cview(), s2, o2);
  const Matrix<float> dx1 = layer.backward(dy1.cview(), s1, o1);
  EXPECT_TRUE(s1.empty());
  EXPECT_TRUE(s2.empty());
  EXPECT_EQ(dx1.values, p1.d_x.values);
  EXPECT_EQ(dx2.values, p2.d_x.values);
  expect_same_grads(g1, p1.grads, "first");
  expect_same_grads(g2, p2.grads, "second");
}

TEST(LayerStates, BuffersAreAssignedEvenForExpertsWithoutTokens) {
  MoeLayerConfig c = config_with_everything();
  c.routing.num_experts = 8;
  const Matrix<float> x = normal_matrix(2, c.d_model, 5), dy = normal_matrix(2, c.d_model, 6);
  const StepResult p = plain_step(c, x, dy);  // 2 tokens × top-2: at least 4 of 8 experts idle
  MoeLayer layer(c, 7);
  layer.forward(x.cview());
  MoeForwardState s = layer.take_forward_state();
  MoeTensors g = nan_buffers(c);
  const MoeGradBuffers b = moe_grad_buffers(g);
  MoeBackwardOptions o;
  o.into = &b;
  layer.backward(dy.cview(), s, o);
  expect_same_grads(g, p.grads, "idle experts are zeros, not left as they were");
}

TEST(LayerStates, LossGradientsGivenPerCallEqualTheCoefficients) {
  MoeLayerConfig with = config_with_everything();
  MoeLayerConfig without = with;
  without.routing.router_aux_loss_coef = 0.0;
  without.routing.router_z_loss_coef = 0.0;
  const Matrix<float> x = normal_matrix(11, with.d_model, 8), dy = normal_matrix(11, with.d_model, 9);
  const StepResult p = plain_step(with, x, dy);
  MoeLayer layer(without, 7);
  layer.forward(x.cview());
  MoeForwardState s = layer.take_forward_state();
  MoeBackwardOptions o;
  o.d_aux_loss = with.routing.router_aux_loss_coef;
  o.d_z_loss = with.routing.router_z_loss_coef;
  layer.zero_grad();
  const Matrix<float> dx = layer.backward(dy.cview(), s, o);
  EXPECT_EQ(dx.values, p.d_x.values);
  expect_same_grads(layer.grads(), p.grads, "accumulated");
}

TEST(LayerStates, ThreadCountChangesBetweenCallsWithoutChangingResults) {
  const MoeLayerConfig c = config_with_everything();
  const Matrix<float> x = normal_matrix(40, c.d_model, 10), dy = normal_matrix(40, c.d_model, 11);
  const StepResult p = plain_step(c, x, dy);
  MoeLayer layer(c, 7);
  layer.set_num_threads(3);
  EXPECT_EQ(layer.config().num_threads, 3);
  layer.zero_grad();
  EXPECT_EQ(layer.forward(x.cview()).output.values, p.output.values);
  layer.set_num_threads(2);
  EXPECT_EQ(layer.backward(dy.cview()).values, p.d_x.values);
  expect_same_grads(layer.grads(), p.grads, "threads");
  EXPECT_THROW(layer.set_num_threads(0), InputError);
}

TEST(LayerStates, BadStatesAndBuffersAreErrors) {
  const MoeLayerConfig c = config_with_everything();
  const Matrix<float> x = normal_matrix(5, c.d_model, 12), dy = normal_matrix(5, c.d_model, 13);
  MoeLayer layer(c, 7);
  MoeForwardState empty;
  try {
    layer.backward(dy.cview(), empty);
    FAIL() << "an empty state was accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("backward state: expected the saved state of a training forward"),
              std::string::npos) << e.what();
  }
  layer.forward(x.cview());
  MoeForwardState s = layer.take_forward_state();
  MoeTensors g = nan_buffers(c);
  g.down.pop_back();
  const MoeGradBuffers b = moe_grad_buffers(g);
  MoeBackwardOptions o;
  o.into = &b;
  try {
    layer.backward(dy.cview(), s, o);
    FAIL() << "a short buffer was accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("gradient buffer down length: expected"), std::string::npos) << e.what();
  }
  MoeBackwardOptions bad;
  bad.d_aux_loss = std::numeric_limits<double>::infinity();
  EXPECT_THROW(layer.backward(dy.cview(), s, bad), InputError);
}

TEST(LayerStates, TensorSizesMatchTheOwnedTensors) {
  MoeLayerConfig c = config_with_everything();
  c.routing.noisy_gating = true;
  const MoeTensors t = make_moe_tensors<float>(c);
  const auto sizes = moe_tensor_sizes(c);
  size_t i = 0;
  t.for_each([&](const char* name, const std::vector<float>& v) {
    ASSERT_LT(i, sizes.size());
    EXPECT_STREQ(sizes[i].first, name);
    EXPECT_EQ(sizes[i].second, static_cast<int64_t>(v.size())) << name;
    ++i;
  });
  EXPECT_EQ(i, sizes.size());
}

}  // namespace
}  // namespace moekit
