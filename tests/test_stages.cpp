// The stages of moekit/stages.h run by a front end itself, as an exchange between processes
// would run them: bitwise the layer's forward and backward; the combine weights applied in the
// combine instead of the experts; the backend's capabilities asked when a layer is built.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "moekit/error.h"
#include "moekit/layer.h"
#include "moekit/stages.h"
#include "oracles/reference_moe.h"
#include "ops/backend.h"

namespace moekit {
namespace {

Matrix<float> random_matrix(int64_t rows, int64_t cols, std::mt19937& gen) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Matrix<float> m(rows, cols);
  for (float& v : m.values) v = dist(gen);
  return m;
}

struct StageCase {
  std::string name;
  MoeLayerConfig config;
  int64_t sequence_length = 0;
};

std::vector<StageCase> stage_cases() {
  MoeLayerConfig base;
  base.routing.num_experts = 6;
  base.routing.num_experts_per_tok = 2;
  base.routing.training = true;
  base.routing.router_aux_loss_coef = 0.2;
  base.routing.router_z_loss_coef = 0.01;
  base.d_model = 24;
  base.d_ff = 20;
  base.expert_bias = true;
  base.router_bias = true;
  std::vector<StageCase> out;
  MoeLayerConfig shared = base;
  shared.num_shared_experts = 1;
  shared.shared_expert_gate = true;
  out.push_back({"topk_shared_gate", shared});
  MoeLayerConfig capacity = base;
  capacity.routing.num_experts_per_tok = 1;
  capacity.routing.capacity_factor = 1.0;
  out.push_back({"switch_capacity", capacity});
  MoeLayerConfig soft = base;
  soft.routing.routing_method = RoutingMethod::kSoftMoe;
  soft.routing.slots_per_expert = 2;
  soft.routing.num_experts_per_tok = 1;
  out.push_back({"soft_moe", soft, 8});
  return out;
}

// forward and backward through the stages, as MoeLayer runs them, with gradients written into
// `grads` (expert weight gradients of experts without rows zeroed, as backward(…, into) does).
Matrix<float> run_stages(MoeStages& stages, const MoeParams& params, const Matrix<float>& x,
                         const Matrix<float>& d_out, const RoutingOptions& options, CombineWeights weights,
                         MoeTensors& grads, Matrix<float>& d_x) {
  const MoeLayerConfig& c = stages.config();
  const RoutingResult<float> routing = stages.route(params, x.cview(), options);
  const ExpertRows rows = stages.permute(params, routing.plan, x.cview(), routing.saved.sequence_length, weights);
  ExpertsSaved saved;
  const ConstMatrixView<float> y = stages.experts(params, rows, &saved);
  Matrix<float> out(x.rows, c.d_model);
  CombineSaved combine_saved;
  stages.combine(routing.plan, rows, y, out.view(), &combine_saved);

  grads = make_moe_tensors<float>(c);
  const MoeGradBuffers buffers = moe_grad_buffers(grads);
  std::vector<uint8_t> pending(static_cast<size_t>(c.num_experts() + 1), 1);
  RoutingGradOutput<float> d_routing;
  d_routing.d_aux_loss = c.routing.router_aux_loss_coef;
  d_routing.d_z_loss = c.routing.router_z_loss_coef;
  const ExpertRowGrads d_y = stages.combine_backward(routing.plan, rows, d_out.cview(), combine_saved, d_routing);
  const ExpertsBackward d_experts = stages.experts_backward(params, rows, d_y, saved, {&buffers, &pending});
  d_x = Matrix<float>(x.rows, c.d_model);
  stages.permute_backward(params, routing.plan, rows, x.cview(), d_experts, d_x.view(), d_routing, buffers);
  stages.route_backward(params, x.cview(), routing, d_routing, d_x.view(), buffers);
  EXPECT_EQ(pending[static_cast<size_t>(c.num_experts())], c.has_shared() ? 0 : 1);
  return out;
}

// A front end that runs the four stages itself gets bitwise the layer's output and gradients.
TEST(Stages, RunByAFrontEndMatchTheLayerBitwise) {
  for (const StageCase& k : stage_cases()) {
    std::mt19937 gen(7);
    MoeLayer layer(k.config, uint64_t{5});
    const Matrix<float> x = random_matrix(32, k.config.d_model, gen);
    const Matrix<float> d_out = random_matrix(32, k.config.d_model, gen);
    RoutingOptions options;
    options.sequence_length = k.sequence_length;
    layer.zero_grad();
    const MoeForwardResult want = layer.forward(x.cview(), options);
    const Matrix<float> want_d_x = layer.backward(d_out.cview());

    MoeStages stages(k.config);
    MoeTensors grads;
    Matrix<float> d_x;
    const Matrix<float> out =
        run_stages(stages, layer.params(), x, d_out, options, CombineWeights::kInExperts, grads, d_x);
    EXPECT_EQ(out.values, want.output.values) << k.name;
    EXPECT_EQ(d_x.values, want_d_x.values) << k.name;
    std::vector<std::vector<float>> got_grads, want_grads;
    grads.for_each([&](const char*, const std::vector<float>& v) { got_grads.push_back(v); });
    layer.grads().for_each([&](const char*, const std::vector<float>& v) { want_grads.push_back(v); });
    EXPECT_EQ(got_grads, want_grads) << k.name;
  }
}

// The combine weights applied by the combine (the experts' rows left unweighted, as rows that
// travel to another process are): the same output bits (the FFN's epilogue rounds w·(acc + b),
// the combine rounds w·y with y = acc + b), and gradients within the layer's fp32 bound of the
// double reference (the same bound as LayerGradients: 1e-4 of the largest gradient).
TEST(Stages, CombineWeightsInTheCombine) {
  for (const StageCase& k : stage_cases()) {
    if (k.config.routing.routing_method == RoutingMethod::kSoftMoe) continue;  // slots have no per-row weight
    std::mt19937 gen(11);
    MoeLayer layer(k.config, uint64_t{9});
    const Matrix<float> x = random_matrix(40, k.config.d_model, gen);
    const Matrix<float> d_out = random_matrix(40, k.config.d_model, gen);
    const MoeForwardResult want = layer.forward(x.cview());
    layer.set_training(false);  // drops the saved state of that forward

    MoeStages stages(k.config);
    MoeTensors grads;
    Matrix<float> d_x;
    const Matrix<float> out = run_stages(stages, layer.params(), x, d_out, {}, CombineWeights::kInCombine, grads, d_x);
    EXPECT_EQ(out.values, want.output.values) << k.name;

    BasicMoeTensors<double> p;
    std::vector<std::vector<double>> widened;
    layer.parameters().for_each(
        [&](const char*, const std::vector<float>& v) { widened.emplace_back(v.begin(), v.end()); });
    size_t i = 0;
    p.for_each([&](const char*, std::vector<double>& v) { v = widened[i++]; });
    Matrix<double> xd(x.rows, x.cols), dd(x.rows, x.cols);
    std::copy(x.values.begin(), x.values.end(), xd.values.begin());
    std::copy(d_out.values.begin(), d_out.values.end(), dd.values.begin());
    const auto rf = reference_moe_forward(k.config, p, xd.cview());
    ASSERT_EQ(rf.routing.plan.token_experts, want.routing.plan.token_experts) << k.name;
    const auto rg = reference_moe_backward(k.config, p, xd.cview(), rf, dd.cview());
    auto compare = [&](const std::string& name, const std::vector<float>& got, const std::vector<double>& ref) {
      ASSERT_EQ(got.size(), ref.size()) << name;
      double scale = 0, err = 0;
      for (size_t j = 0; j < ref.size(); ++j) {
        scale = std::max(scale, std::abs(ref[j]));
        err = std::max(err, std::abs(double(got[j]) - ref[j]));
      }
      EXPECT_LE(err, 1e-4 * scale + 1e-7) << k.name << " " << name << ": max error " << err << " of max " << scale;
    };
    compare("d_hidden_states", d_x.values, rg.d_hidden_states.values);
    std::vector<std::pair<std::string, const std::vector<float>*>> got;
    std::vector<const std::vector<double>*> ref;
    grads.for_each([&](const char* name, const std::vector<float>& v) { got.push_back({name, &v}); });
    rg.d_params.for_each([&](const char*, const std::vector<double>& v) { ref.push_back(&v); });
    for (size_t j = 0; j < got.size(); ++j) compare(got[j].first, *got[j].second, *ref[j]);
  }
}

// What the backend can do is asked when the layer is built: an inference-only weight format
// asked to train is a ConfigError naming the backend and the format then, not in a backward.
TEST(Stages, CapabilitiesAreAskedWhenTheLayerIsBuilt) {
  const ops::BackendOps& cpu = ops::backend_for(Backend::kCpu);
  EXPECT_TRUE(cpu.supports(ops::Op::kExperts, DType::kInt8, false));
  EXPECT_FALSE(cpu.supports(ops::Op::kExperts, DType::kInt8, true));
  EXPECT_TRUE(cpu.supports(ops::Op::kExperts, DType::kBF16, true));
  EXPECT_TRUE(cpu.supports(ops::Op::kRouter, DType::kInt4, true));

  MoeLayerConfig c;
  c.routing.num_experts = 4;
  c.routing.num_experts_per_tok = 2;
  c.d_model = 32;
  c.d_ff = 32;
  c.dtype = DType::kInt4;
  c.routing.training = true;
  try {
    MoeLayer layer(c, uint64_t{1});
    FAIL() << "an int4 layer was built for training";
  } catch (const ConfigError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("cpu backend"), std::string::npos) << m;
    EXPECT_NE(m.find("got int4"), std::string::npos) << m;
    EXPECT_NE(m.find("inference only"), std::string::npos) << m;
  }
  c.routing.training = false;
  MoeStages stages(c);
  EXPECT_FALSE(stages.can_train());
  EXPECT_THROW(stages.require_training(), ConfigError);
  c.dtype = DType::kF32;
  EXPECT_TRUE(MoeStages(c).can_train());
}

TEST(Stages, ABackendThisBuildLacksIsNamed) {
  try {
    ops::backend_for(Backend::kCuda);
    FAIL() << "a cuda backend object was found";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("got cuda"), std::string::npos) << e.what();
  }
}

// set_training switches the stages' routing too (training capacity factor, input jitter): a layer
// built for evaluation and switched to training routes as one built for training.
TEST(Stages, SetTrainingReachesTheRouting) {
  MoeLayerConfig c;
  c.routing.num_experts = 4;
  c.routing.num_experts_per_tok = 1;
  c.routing.capacity_factor = 0.5;
  c.routing.eval_capacity_factor = 4.0;
  c.routing.router_jitter_noise = 0.1;
  c.d_model = 16;
  c.d_ff = 8;
  std::mt19937 gen(3);
  const Matrix<float> x = random_matrix(64, c.d_model, gen);
  MoeLayer switched(c, uint64_t{2});
  const MoeForwardResult eval = switched.forward(x.cview());
  switched.set_training(true);
  const MoeForwardResult trained = switched.forward(x.cview());
  c.routing.training = true;
  MoeLayer built(c, uint64_t{2});
  const MoeForwardResult want = built.forward(x.cview());
  EXPECT_EQ(trained.output.values, want.output.values);
  EXPECT_EQ(trained.routing.plan.token_kept, want.routing.plan.token_kept);
  EXPECT_NE(trained.routing.plan.num_kept(), eval.routing.plan.num_kept());  // capacity 0.5 drops
  built.set_training(false);
  EXPECT_EQ(built.forward(x.cview()).output.values, eval.output.values);
}

}  // namespace
}  // namespace moekit
