// Google Benchmark of MoeLayer on the three goal shapes (coarse, fine-grained, decode), fp32 and
// bf16, inference forward and training step (zero_grad, refresh_packed_weights as after an
// optimizer update, forward, backward), on 1 and 2 threads.
// Counters: "FLOPS" (expert FLOPs 2·T·k·3·d_model·d_ff per second) and "Wbytes" (bytes of the
// weights of experts that received tokens, per second: the figure that matters for decode).
//
//   moekit_bench_layer --benchmark_filter='forward/coarse' --benchmark_min_time=1
//
// Names: <forward|train>/<shape>/<dtype>/threads:<n>. `moekit bench` measures the same forward
// next to its dense-GEMM and memory yardsticks; this binary is for profiling and regressions.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "moekit/config.h"
#include "moekit/layer.h"

namespace {

struct Shape {
  const char* name;
  int64_t tokens, d_model, d_ff, experts, top_k;
};

const Shape kShapes[] = {
    {"coarse", 512, 1024, 3584, 8, 2},
    {"fine", 1024, 1024, 384, 64, 8},
    {"decode", 8, 2048, 768, 128, 8},
};

struct Fixture {
  std::unique_ptr<moekit::MoeLayer> layer;
  std::vector<float> hidden, d_out;
};

// One layer per (shape, dtype, threads), built on first use and kept: the decode layer alone
// holds 128 experts' weights.
Fixture& fixture(int shape_index, moekit::DType dtype, int threads) {
  static std::map<std::tuple<int, int, int>, Fixture> cache;
  Fixture& f = cache[{shape_index, static_cast<int>(dtype), threads}];
  if (!f.layer) {
    const Shape& s = kShapes[shape_index];
    moekit::MoeLayerConfig c;
    c.routing = moekit::routing_config_from_preset("hf-mixtral");
    c.routing.num_experts = s.experts;
    c.routing.num_experts_per_tok = s.top_k;
    c.d_model = s.d_model;
    c.d_ff = s.d_ff;
    c.dtype = dtype;
    c.num_threads = threads;
    f.layer = std::make_unique<moekit::MoeLayer>(c, 1234);
    std::mt19937_64 gen(1235);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    f.hidden.resize(static_cast<size_t>(s.tokens * s.d_model));
    f.d_out.resize(f.hidden.size());
    for (float& x : f.hidden) x = dist(gen);
    for (float& x : f.d_out) x = dist(gen);
  }
  return f;
}

void set_counters(benchmark::State& state, const Shape& s, const moekit::RoutingPlan& plan,
                  moekit::DType dtype, double flops_per_iter) {
  int64_t active = 0;
  for (int64_t e = 0; e < plan.num_experts; ++e) active += plan.tokens_for_expert(e) > 0;
  const double elt = dtype == moekit::DType::kBF16 ? 2.0 : 4.0;
  const double wbytes = static_cast<double>(active) * static_cast<double>(3 * s.d_model * s.d_ff) * elt;
  state.counters["FLOPS"] = benchmark::Counter(flops_per_iter, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["Wbytes"] = benchmark::Counter(wbytes, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Forward(benchmark::State& state, int shape, moekit::DType dtype, int threads) {
  const Shape& s = kShapes[shape];
  Fixture& f = fixture(shape, dtype, threads);
  f.layer->set_training(false);
  const moekit::ConstMatrixView<float> x{f.hidden.data(), s.tokens, s.d_model};
  moekit::MoeForwardResult r = f.layer->forward(x);  // packs the weights
  for (auto _ : state) {
    r = f.layer->forward(x);
    benchmark::DoNotOptimize(r.output.values.data());
  }
  set_counters(state, s, r.routing.plan, dtype, 2.0 * double(s.tokens * s.top_k) * 3.0 * double(s.d_model * s.d_ff));
}

void BM_TrainStep(benchmark::State& state, int shape, moekit::DType dtype, int threads) {
  const Shape& s = kShapes[shape];
  Fixture& f = fixture(shape, dtype, threads);
  f.layer->set_training(true);
  const moekit::ConstMatrixView<float> x{f.hidden.data(), s.tokens, s.d_model};
  const moekit::ConstMatrixView<float> dy{f.d_out.data(), s.tokens, s.d_model};
  // Warm-up: the first step allocates the gradients and packs the weights.
  moekit::MoeForwardResult r = f.layer->forward(x);
  f.layer->backward(dy);
  for (auto _ : state) {
    // A step of a training loop after an optimizer update: lazy zero_grad, repack, pass.
    f.layer->zero_grad();
    f.layer->refresh_packed_weights();
    r = f.layer->forward(x);
    moekit::Matrix<float> dx = f.layer->backward(dy);
    benchmark::DoNotOptimize(dx.values.data());
  }
  f.layer->set_training(false);
  // Forward + backward ≈ 3× the forward's FLOPs.
  set_counters(state, s, r.routing.plan, dtype, 6.0 * double(s.tokens * s.top_k) * 3.0 * double(s.d_model * s.d_ff));
}

void register_all() {
  for (int shape = 0; shape < 3; ++shape) {
    for (int dtype = 0; dtype < 2; ++dtype) {
      for (int threads : {1, 2}) {
        const std::string suffix = std::string(kShapes[shape].name) + (dtype ? "/bf16" : "/fp32") +
                                   "/threads:" + std::to_string(threads);
        const auto dt = dtype ? moekit::DType::kBF16 : moekit::DType::kF32;
        benchmark::RegisterBenchmark(("forward/" + suffix).c_str(), BM_Forward, shape, dt, threads)
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
        benchmark::RegisterBenchmark(("train/" + suffix).c_str(), BM_TrainStep, shape, dt, threads)
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
