// The training loop on synthetic domains: bitwise determinism across thread counts, and the
// routing phenomena the curves must show (collapse without balancing, falling entropy,
// specialisation by domain, smaller logits with the z-loss, Switch drops falling once balanced,
// the dense mixture no worse than top-1). Every threshold comes from measured runs of these
// exact configurations (the runs are deterministic); the measured values are in the comments.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <string>

#include "moekit/config.h"
#include "moekit/error.h"
#include "moekit/train.h"

namespace moekit {
namespace {

constexpr int64_t kWindow = 20;  // steps averaged at the start and at the end of a run

TrainConfig small_config(int64_t steps, double learning_rate) {
  TrainConfig c;
  c.steps = steps;
  c.batch_size = 256;
  c.learning_rate = learning_rate;
  c.eval_every = steps / 4;
  c.data.eval_tokens = 1024;
  c.layer.d_model = 32;  // smaller than the default run's layer, one thread
  c.layer.d_ff = 32;
  c.layer.num_threads = 1;
  return c;
}

// Mean of a step metric over [first, first + kWindow).
double window_mean(const TrainResult& r, size_t first, double StepMetrics::*field) {
  double sum = 0.0;
  for (size_t i = first; i < first + kWindow; ++i) sum += r.steps.at(i).*field;
  return sum / kWindow;
}
double start_mean(const TrainResult& r, double StepMetrics::*field) { return window_mean(r, 0, field); }
double end_mean(const TrainResult& r, double StepMetrics::*field) {
  return window_mean(r, r.steps.size() - kWindow, field);
}

// Top-1 softmax with the raw probability as combine weight (Switch).
void make_top1(TrainConfig& c) {
  c.layer.routing.num_experts_per_tok = 1;
  c.layer.routing.renormalize = Renormalize::kNone;
}

TEST(Train, BitwiseIdenticalForOneAndTwoThreads) {
  TrainConfig c = small_config(40, 1e-2);
  c.batch_size = 128;
  c.eval_every = 10;
  c.layer.routing.noise_std = 1.0;  // the per-step noise path too
  c.layer.routing.router_jitter_noise = 0.01;
  TrainResult a = train(c);
  c.layer.num_threads = 2;
  TrainResult b = train(c);
  ASSERT_EQ(a.steps.size(), b.steps.size());
  for (size_t i = 0; i < a.steps.size(); ++i) {
    EXPECT_EQ(a.steps[i].task_loss, b.steps[i].task_loss) << "step " << i;
    EXPECT_EQ(a.steps[i].aux_loss, b.steps[i].aux_loss) << "step " << i;
    EXPECT_EQ(a.steps[i].z_loss, b.steps[i].z_loss) << "step " << i;
    EXPECT_EQ(a.steps[i].entropy, b.steps[i].entropy) << "step " << i;
    EXPECT_EQ(a.steps[i].max_abs_logit, b.steps[i].max_abs_logit) << "step " << i;
    EXPECT_EQ(a.steps[i].tokens_per_expert, b.steps[i].tokens_per_expert) << "step " << i;
  }
  ASSERT_EQ(a.evals.size(), b.evals.size());
  for (size_t i = 0; i < a.evals.size(); ++i) {
    EXPECT_EQ(a.evals[i].task_loss, b.evals[i].task_loss);
    EXPECT_EQ(a.evals[i].domain_expert, b.evals[i].domain_expert);
  }
  EXPECT_EQ(a.router_weight.values, b.router_weight.values);
  // A different seed is a different run.
  c.seed = 1;
  EXPECT_NE(train(c).steps.back().task_loss, a.steps.back().task_loss);
}

// Collapse-prone: one target map shared by every domain (no specialisation pays), top-1 and a
// high learning rate. Measured max/mean load over the last 20 steps: 7.01 without the balancing
// loss (of 8 at most), 1.68 with aux 0.1.
TEST(Train, CollapseWithoutBalancingLossAndBalanceWithIt) {
  TrainConfig c = small_config(300, 1e-2);
  c.data.shared_target = true;
  make_top1(c);
  c.layer.routing.router_z_loss_coef = 0.0;
  c.layer.routing.router_aux_loss_coef = 0.0;
  const TrainResult off = train(c);
  c.layer.routing.router_aux_loss_coef = 0.1;
  const TrainResult on = train(c);
  const double off_load = end_mean(off, &StepMetrics::max_over_mean_load);
  const double on_load = end_mean(on, &StepMetrics::max_over_mean_load);
  EXPECT_GT(off_load, 4.0);
  EXPECT_LT(on_load, 2.0);
  EXPECT_GT(off_load, 2.5 * on_load);
  EXPECT_GT(off.evals.back().max_over_mean_load, 4.0);  // held out too
}

// Learned routing on the default data (4 domains, 8 experts, top-2): measured normalised entropy
// 0.933 → 0.774, held-out mutual information 0.096 at step 0, then 0.513, 0.499, 0.510, 0.536;
// smallest top-expert share 0.46 (top-2: at most 0.5; uniform 0.125); the centred router row of
// each domain's top expert has cosine 0.80-0.87 with that domain's centre, its largest.
TEST(Train, EntropyFallsAndExpertsSpecialiseByDomain) {
  const TrainResult r = train(small_config(300, 1e-2));
  EXPECT_LT(end_mean(r, &StepMetrics::entropy_normalized),
            start_mean(r, &StepMetrics::entropy_normalized) - 0.1);
  for (size_t i = 1; i < r.evals.size(); ++i)  // well above the start at every evaluation
    EXPECT_GT(r.evals[i].mutual_information, r.evals.front().mutual_information + 0.3) << "eval " << i;
  const EvalMetrics& last = r.evals.back();
  for (size_t k = 0; k < last.top_expert.size(); ++k) {
    EXPECT_GT(last.top_expert_share[k], 0.4) << "domain " << k;
    const int64_t e = last.top_expert[k];
    EXPECT_GT(r.prototype_cosine(e, int64_t(k)), 0.7) << "domain " << k;
    for (int64_t other = 0; other < r.prototype_cosine.cols; ++other)
      if (other != int64_t(k)) EXPECT_LT(r.prototype_cosine(e, other), r.prototype_cosine(e, int64_t(k)));
  }
  EXPECT_LT(r.evals.back().task_loss, 0.5 * r.evals.front().task_loss);
}

// Measured max |logit| over the last 20 steps: 8.46 without, 4.90 with z-loss 0.01.
TEST(Train, ZLossKeepsRouterLogitsSmaller) {
  TrainConfig c = small_config(300, 1e-2);
  c.layer.routing.router_z_loss_coef = 0.0;
  const TrainResult off = train(c);
  c.layer.routing.router_z_loss_coef = 0.01;
  const TrainResult on = train(c);
  EXPECT_LT(end_mean(on, &StepMetrics::max_abs_logit), 0.85 * end_mean(off, &StepMetrics::max_abs_logit));
  EXPECT_LT(end_mean(on, &StepMetrics::z_loss), end_mean(off, &StepMetrics::z_loss));
}

// HF Switch with capacity factor 1.0 (capacity 128 of 1024 tokens on 8 experts) on 8 domains,
// so that one domain per expert is also balance (with 4 domains a domain's tokens overflow any
// single expert and drops rise as routing specialises: measured 0.14 → 0.27 at batch 256). Once
// each domain has its own expert, what is left is the batch's binomial spread of domain counts
// (≈ 0.033 expected at batch 1024, 0.066 at 256), hence the large batch. Measured dropped
// fraction 0.111 over the first 20 steps, 0.036 over the last 20; each domain's top expert then
// holds ≥ 0.82 of its tokens. (Seeds 3, 4, 5 behave alike; seed 1 starts lower, 0.078 → 0.048;
// seed 2 merges two domains onto one expert and its drops rise, 0.106 → 0.129.)
TEST(Train, SwitchDropsTokensEarlyAndFewerOnceBalanced) {
  TrainConfig c = small_config(300, 3e-3);
  c.batch_size = 1024;
  c.layer.routing = routing_config_from_preset("hf-switch");
  c.layer.routing.expert_capacity.reset();
  c.layer.routing.capacity_factor = 1.0;
  c.layer.routing.router_aux_loss_coef = 0.01;
  c.layer.activation = ExpertActivation::kRelu;
  c.data.num_domains = 8;
  const TrainResult r = train(c);
  const double early = start_mean(r, &StepMetrics::dropped_fraction);
  const double late = end_mean(r, &StepMetrics::dropped_fraction);
  EXPECT_GT(early, 0.08);
  EXPECT_LT(late, 0.6 * early);
  for (double share : r.evals.back().top_expert_share) EXPECT_GT(share, 0.7);
}

// Measured held-out task loss: dense 0.099, top-1 0.147 (8× fewer expert FLOPs; 0.71 against
// 1.31 ms per step).
TEST(Train, DenseMixtureNoWorseThanTopOne) {
  TrainConfig c = small_config(300, 3e-3);
  c.layer.routing.routing_method = RoutingMethod::kDense;
  const TrainResult dense = train(c);
  TrainConfig t = small_config(300, 3e-3);
  make_top1(t);
  const TrainResult top1 = train(t);
  EXPECT_LE(dense.evals.back().task_loss, top1.evals.back().task_loss);
}

// Every preset and routing method trains a few steps to finite values.
TEST(Train, EveryPresetAndMethodTrains) {
  std::vector<TrainConfig> configs;
  for (const std::string& name : preset_names()) {
    TrainConfig c = small_config(4, 1e-3);
    c.layer.routing = routing_config_from_preset(name);
    configs.push_back(c);
  }
  TrainConfig base = small_config(4, 1e-3);
  TrainConfig ec = base;
  ec.layer.routing.routing_method = RoutingMethod::kExpertChoice;
  ec.layer.routing.capacity_factor = 2.0;
  TrainConfig soft = base;
  soft.layer.routing.routing_method = RoutingMethod::kSoftMoe;
  soft.layer.routing.slots_per_expert = 2;
  TrainConfig sinkhorn = base;
  sinkhorn.layer.routing.routing_method = RoutingMethod::kSinkhorn;
  TrainConfig sigmoid = base;
  sigmoid.layer.routing.scoring_func = ScoringFunc::kSigmoid;
  sigmoid.layer.selection_bias = true;
  TrainConfig sgd = base;
  sgd.optimizer = Optimizer::kSgd;
  TrainConfig noisy = base;
  noisy.layer.routing.noisy_gating = true;
  TrainConfig bf16 = base;
  bf16.layer.dtype = DType::kBF16;
  TrainConfig shared = base;
  shared.layer.num_shared_experts = 1;
  shared.layer.shared_expert_gate = true;
  configs.insert(configs.end(), {ec, soft, sinkhorn, sigmoid, sgd, noisy, bf16, shared});
  for (TrainConfig& c : configs) {
    c.batch_size = 64;
    c.data.eval_tokens = 64;
    c.layer.d_model = 16;
    c.layer.d_ff = 8;
    if (c.layer.routing.routing_method == RoutingMethod::kSoftMoe) c.sequence_length = 64;
    SCOPED_TRACE(c.layer.routing.preset);
    const TrainResult r = train(c);
    ASSERT_EQ(r.steps.size(), 4u);
    for (const StepMetrics& m : r.steps) {
      EXPECT_TRUE(std::isfinite(m.task_loss));
      EXPECT_TRUE(std::isfinite(m.aux_loss));
    }
    EXPECT_TRUE(std::isfinite(r.evals.back().task_loss));
  }
  TrainConfig bad = base;
  bad.learning_rate = -1;
  EXPECT_THROW(train(bad), ConfigError);
}

TEST(Train, MetricsJsonAndCsvHoldTheCurves) {
  TrainConfig c = small_config(8, 1e-3);
  c.eval_every = 4;
  int calls = 0;
  const TrainResult r = train(c, [&](const TrainProgress& p) {
    ++calls;
    EXPECT_EQ(p.step, calls);
    EXPECT_EQ(p.steps, 8);
  });
  EXPECT_EQ(calls, 8);
  ASSERT_EQ(r.evals.size(), 3u);  // steps 0, 4, 8
  const auto dir = std::filesystem::temp_directory_path() / "moekit_test_train_metrics";
  std::filesystem::create_directories(dir);
  write_metrics_json(r, (dir / "metrics.json").string());
  write_metrics_csv(r, dir.string());
  std::ifstream in(dir / "metrics.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(j["steps"]["task_loss"].size(), 8u);
  EXPECT_EQ(j["steps"]["task_loss"][3].get<double>(), r.steps[3].task_loss);
  EXPECT_EQ(j["evals"][2]["domain_expert"].get<std::vector<std::vector<int64_t>>>(), r.evals[2].domain_expert);
  EXPECT_EQ(j["config"]["layer"]["num_experts"].get<int64_t>(), 8);
  EXPECT_EQ(j["prototype_cosine"].size(), 8u);
  for (const char* name : {"steps.csv", "load.csv", "eval.csv", "specialisation.csv", "prototypes.csv"}) {
    EXPECT_TRUE(std::filesystem::exists(dir / name)) << name;
  }
  std::ifstream steps_csv(dir / "steps.csv");
  std::string line;
  int lines = 0;
  while (std::getline(steps_csv, line)) ++lines;
  EXPECT_EQ(lines, 9);  // header and 8 steps
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace moekit
