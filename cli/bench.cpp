// `moekit bench`: times the MoE layer's forward (and, with --backward, a training step) against
// yardsticks measured in the same run:
//
//   dense_equal_flops_ms  one dense GEMM [T·k, d_model] × [d_model, 3·d_ff] in the layer's dtype,
//                         on the library's best kernel (cpu::gemm_packed on a PackedWeight for
//                         the active ISA) and all threads; FLOPs 2·T·k·3·d_model·d_ff, the
//                         expert FLOPs of a SwiGLU MoE forward. Best of a few tilings.
//   router_ms             what the layer's forward runs before the experts: the router op
//                         (ops/router.h) on a packed weight, then route_logits (top-k, weights, plan, losses),
//                         timed on its own (the layer does not expose its internal split).
//   training (--backward) per round, as a training loop runs it: refresh_packed_weights() (the
//                         optimizer changed the weights), forward, backward. weight_update_ms is
//                         the repacking (the refresh, and the forward's and the backward's weight
//                         packing phases, done once per update), train_forward_ms and
//                         backward_ms the rest of each pass, step_ms all of it;
//                         *_phases_ms are the medians of the layer's own phase times
//                         (MoeLayer::last_phases()).
//   memory_read_gbps      a streaming read of a 1 GiB buffer on all threads (memory-bound shapes,
//                         or --memory-read).
//   output_rel_error      bf16 and the quantized formats: ‖y − y_fp32‖₂ / ‖y_fp32‖₂ against the
//                         fp32 layer on the same weights and hidden states.
// For the quantized formats (int8, int4, mxfp4) the dense GEMM is fp32 (dense_dtype) and
// weight_bytes_touched counts codes and scales.
//
// Memory-bound rule: tokens · top_k ≤ 2 · experts, i.e. at most two token rows per expert on
// average. Each weight byte then feeds ≤ 1 FLOP (fp32) or ≤ 2 (bf16), far below what the
// cores can do per byte of memory bandwidth, so the forward's time is the expert weight bytes
// it touches divided by bandwidth; weight_gbps = weight_bytes_touched / forward time is then the
// figure to compare with memory_read_gbps.
//
// Every time is the median of --repeats runs after --warmup runs. The forward, the router and
// the dense GEMM are timed in interleaved rounds, so that a noisy neighbour slows them alike and
// the ratios stay meaningful. peak_rss_mb (VmHWM, see peak_rss_mb()) is read after the layer's
// warm-up and training runs and before the dense GEMM and the 1 GiB buffer are allocated, so it
// is the layer's peak (plus the process's baseline: the hidden states and the binary).
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/thread_pool.h"
#include "commands.h"
#include "flags.h"
#include "moekit/config.h"
#include "moekit/error.h"
#include "moekit/layer.h"
#include "moekit/quant.h"
#include "moekit/routing.h"
#include "ops/router.h"

namespace moekit::cli {
namespace {

namespace mc = moekit::cpu;
using Clock = std::chrono::steady_clock;

struct BenchOptions {
  int64_t tokens = 0, d_model = 0, d_ff = 0, experts = 0, top_k = 0;
  std::string dtype = "fp32";
  int threads = 0;  // 0: all cores
  bool backward = false;
  bool json = false;
  bool memory_read = false;  // force the streaming-read measurement
  int repeats = 7;
  int warmup = 2;
  std::string preset = "hf-mixtral";
  uint64_t seed = 1234;
};

void declare_options(CLI::App& bench, BenchOptions& o) {
  const int64_t kMaxDim = int64_t(1) << 20;
  add_int_option(bench, "--tokens", o.tokens, 1, int64_t(1) << 24, "tokens (rows of the hidden states)")->required();
  add_int_option(bench, "--d-model", o.d_model, 1, kMaxDim, "hidden size")->required();
  add_int_option(bench, "--d-ff", o.d_ff, 1, kMaxDim, "expert intermediate size")->required();
  add_int_option(bench, "--experts", o.experts, 1, 1 << 16, "number of experts")->required();
  add_int_option(bench, "--top-k", o.top_k, 1, 1 << 16, "experts per token, at most --experts")->required();
  add_choice_option(bench, "--dtype", o.dtype, {{"fp32", "float32"}, {"bf16", "bfloat16"}, {"int8"}, {"int4"}, {"mxfp4"}},
                    "expert weights and GEMM inputs (fp32 accumulation either way; int8, int4, mxfp4: "
                    "quantized experts, inference only)")
      ->capture_default_str();
  add_int_option(bench, "--threads", o.threads, 1, 1024, "threads (default: all cores)");
  add_switch(bench, "--backward", o.backward, "also time training steps (weight update, forward, backward)");
  add_switch(bench, "--json", o.json, "print one JSON object on one line instead of a table");
  add_int_option(bench, "--repeats", o.repeats, 1, 100000, "timed runs per figure (medians)")->capture_default_str();
  add_int_option(bench, "--warmup", o.warmup, 0, 100000, "untimed runs before them")->capture_default_str();
  add_text_option(bench, "--preset", o.preset, "NAME", "a preset name (moekit presets)",
                  "routing preset; --experts and --top-k override its counts")
      ->capture_default_str();
  add_int_option(bench, "--seed", o.seed, 0, INT64_MAX, "seed of the parameters and hidden states")
      ->capture_default_str();
  add_switch(bench, "--memory-read", o.memory_read, "measure the read bandwidth even for a compute-bound shape");
}

// What the flags cannot check one at a time.
void finish_options(BenchOptions& o) {
  if (o.top_k > o.experts) reject("--top-k", "at most --experts (" + std::to_string(o.experts) + ")", std::to_string(o.top_k));
  if (o.backward && (o.dtype == "int8" || o.dtype == "int4" || o.dtype == "mxfp4"))
    reject("--backward", "fp32 or bf16 (quantized experts run inference only)", o.dtype);
  if (o.threads == 0) o.threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Per-phase medians over calls of the layer (MoeLayer::last_phases()), phases in first-seen order.
class PhaseMedians {
 public:
  void add(const std::vector<PhaseTime>& phases) {
    for (const PhaseTime& p : phases) {
      auto it = std::find_if(times_.begin(), times_.end(), [&](const auto& e) { return e.first == p.name; });
      if (it == times_.end()) it = times_.insert(times_.end(), {p.name, {}});
      it->second.push_back(p.ms);
    }
  }
  nlohmann::ordered_json json() const {
    nlohmann::ordered_json j = nlohmann::ordered_json::object();
    for (const auto& [name, ms] : times_) j[name] = median(ms);
    return j;
  }

 private:
  std::vector<std::pair<std::string, std::vector<double>>> times_;
};

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Median over `repeats` timed calls after `warmup` untimed ones, in ms.
double time_median(int warmup, int repeats, const std::function<void()>& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = Clock::now();
    fn();
    times.push_back(ms_since(t0));
  }
  return median(times);
}

// Peak resident set of this process, MB. VmHWM from /proc/self/status: getrusage's ru_maxrss
// survives execve on Linux, so under a parent that forked from a large process (Python with
// torch loaded) it would report the parent's peak. ru_maxrss is the fallback.
double peak_rss_mb() {
  if (std::FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    long long kb = -1;
    while (std::fgets(line, sizeof line, f)) {
      if (std::sscanf(line, "VmHWM: %lld kB", &kb) == 1) break;
    }
    std::fclose(f);
    if (kb >= 0) return static_cast<double>(kb) / 1024.0;
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;  // Linux: kilobytes
}

std::vector<float> random_normal(size_t n, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

// The process-wide pool, o.threads of its threads per job.
struct Pool {
  int threads = 1;
  template <typename Fn>
  void run(int64_t num_tasks, Fn&& fn) const {
    mc::thread_pool().run(threads, num_tasks, fn);
  }
};

// ---------------------------------------------------------------------------------------------
// Dense GEMM of equal FLOPs: C[M, N] = A[M, K] · Wᵀ, W [N, K] packed for the active ISA.

class DenseGemm {
 public:
  DenseGemm(int64_t M, int64_t N, int64_t K, DType dtype, mc::Isa isa, Pool pool, uint64_t seed)
      : M_(M), N_(N), pool_(pool) {
    // The dense GEMM multiplies bf16 for a bf16 layer and fp32 otherwise (quantized layers too).
    const DType cdt = dtype == DType::kBF16 ? DType::kBF16 : DType::kF32;
    a32_ = random_normal(static_cast<size_t>(M * K), seed + 11);
    const void* a_data = a32_.data();
    if (cdt == DType::kBF16) {  // bf16 operands, as a bf16 dense GEMM would get them
      a16_.resize(a32_.size());
      for (size_t i = 0; i < a32_.size(); ++i) a16_[i] = mc::float_to_bf16(a32_[i]);
      a32_ = {};
      a_data = a16_.data();
    }
    {
      std::vector<float> w32 = random_normal(static_cast<size_t>(N * K), seed + 12);
      const float scale = 1.0f / std::sqrt(static_cast<float>(K));
      for (float& x : w32) x *= scale;
      w_ = mc::PackedWeight::pack(w32.data(), DType::kF32, N, K, K, cdt, isa);
    }
    c_.resize(static_cast<size_t>(M * N));
    p_.m = M;
    p_.n = N;
    p_.k = K;
    p_.a = {a_data, cdt, K, 1};
    p_.c = c_.data();
    p_.c_dtype = DType::kF32;
    p_.ldc = N;
    // The best of a few tilings (the faster of two timed probes each).
    set_tiling(128, 256);
    run();  // warm caches and pages
    double best_ms = INFINITY;
    int64_t best_rb = 128, best_cb = 256;
    for (int64_t rb : {int64_t(64), int64_t(128), int64_t(256), int64_t(512)}) {
      for (int64_t cb : {int64_t(128), int64_t(256), int64_t(512)}) {
        if (rb > 64 && rb >= 2 * M) continue;  // the same tiling as a smaller row block
        set_tiling(rb, cb);
        for (int probe = 0; probe < 2; ++probe) {
          const auto t0 = Clock::now();
          run();
          const double ms = ms_since(t0);
          if (ms < best_ms) best_ms = ms, best_rb = rb, best_cb = cb;
        }
      }
    }
    set_tiling(best_rb, best_cb);
  }

  void run() {
    pool_.run(static_cast<int64_t>(tiles_.size()), [&](int64_t t, int) {
      const Tile& tile = tiles_[static_cast<size_t>(t)];
      mc::gemm_packed(p_, w_, tile.m0, tile.m1, tile.n0, tile.n1);
    });
  }
  int64_t row_block() const { return rb_; }
  int64_t col_block() const { return cb_; }

 private:
  struct Tile {
    int64_t m0, m1, n0, n1;
  };
  void set_tiling(int64_t rb, int64_t cb) {
    rb_ = rb;
    cb_ = cb;
    tiles_.clear();
    for (int64_t n0 = 0; n0 < N_; n0 += cb)
      for (int64_t m0 = 0; m0 < M_; m0 += rb) tiles_.push_back({m0, std::min(M_, m0 + rb), n0, std::min(N_, n0 + cb)});
  }

  int64_t M_, N_;
  Pool pool_;
  std::vector<float> a32_;
  std::vector<uint16_t> a16_;
  mc::PackedWeight w_;
  std::vector<float> c_;
  mc::GemmProblem p_;
  std::vector<Tile> tiles_;
  int64_t rb_ = 0, cb_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Streaming read of a large buffer on all threads, GB/s (1e9 bytes per second).

__attribute__((target_clones("avx512f", "avx2", "default"))) uint64_t sum_words(const uint64_t* p, size_t n) {
  uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += p[i];
    s1 += p[i + 1];
    s2 += p[i + 2];
    s3 += p[i + 3];
  }
  for (; i < n; ++i) s0 += p[i];
  return s0 + s1 + s2 + s3;
}

double memory_read_gbps(Pool pool, int repeats) {
  constexpr size_t kBytes = size_t(1) << 30;
  constexpr size_t kChunkWords = (size_t(16) << 20) / sizeof(uint64_t);  // 16 MiB per task
  const size_t words = kBytes / sizeof(uint64_t);
  std::unique_ptr<uint64_t[]> buf(new uint64_t[words]);  // uninitialised: first touch below
  const int64_t chunks = static_cast<int64_t>(words / kChunkWords);
  pool.run(chunks, [&](int64_t c, int) {
    uint64_t* p = buf.get() + static_cast<size_t>(c) * kChunkWords;
    for (size_t i = 0; i < kChunkWords; ++i) p[i] = static_cast<uint64_t>(c) * kChunkWords + i;
  });
  std::vector<uint64_t> sums(static_cast<size_t>(chunks));
  volatile uint64_t sink = 0;
  const double ms = time_median(1, repeats, [&] {
    pool.run(chunks, [&](int64_t c, int) {
      sums[static_cast<size_t>(c)] = sum_words(buf.get() + static_cast<size_t>(c) * kChunkWords, kChunkWords);
    });
    uint64_t s = 0;
    for (uint64_t x : sums) s += x;
    sink = sink + s;
  });
  return static_cast<double>(kBytes) / (ms * 1e6);
}

void run_bench(const BenchOptions& o) {
  DType dtype = DType::kF32;
  for (const DType d : {DType::kF32, DType::kBF16, DType::kInt8, DType::kInt4, DType::kMxfp4})
    if (o.dtype == dtype_name(d)) dtype = d;

  MoeLayerConfig config;
  config.routing = routing_config_from_preset(o.preset);
  config.routing.num_experts = o.experts;
  config.routing.num_experts_per_tok = o.top_k;
  config.routing.training = false;
  config.d_model = o.d_model;
  config.d_ff = o.d_ff;
  config.activation = ExpertActivation::kSwiGlu;
  config.dtype = dtype;
  config.num_threads = o.threads;
  config.validate();

  MoeLayer layer(config, o.seed);
  const std::vector<float> hidden = random_normal(static_cast<size_t>(o.tokens * o.d_model), o.seed + 1);
  const ConstMatrixView<float> x{hidden.data(), o.tokens, o.d_model};
  const Pool pool{o.threads};
  const mc::Isa isa = mc::active_isa();

  // Phase 1, the layer alone: inference warm-up (packs the weights), then the training step.
  layer.set_training(false);
  MoeForwardResult last;
  for (int i = 0; i < o.warmup; ++i) last = layer.forward(x);
  double train_forward_ms = 0, backward_ms = 0, step_ms = 0, weight_update_ms = 0;
  PhaseMedians train_forward_phases, backward_phases, forward_phases;
  if (o.backward) {
    layer.set_training(true);
    const std::vector<float> d_out = random_normal(static_cast<size_t>(o.tokens * o.d_model), o.seed + 2);
    const ConstMatrixView<float> dy{d_out.data(), o.tokens, o.d_model};
    // A training step as a training loop runs it: the optimizer has changed the weights, so
    // the layer re-derives its packed (and, for bf16, rounded) copies, then forward, backward.
    std::vector<double> tf, tb, ts, tu;
    auto ms = [](Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
    for (int i = 0; i < o.warmup + o.repeats; ++i) {
      layer.zero_grad();  // a training step starts from zero gradients (lazy: nearly free)
      const auto t0 = Clock::now();
      layer.refresh_packed_weights();
      const auto tr = Clock::now();
      MoeForwardResult r = layer.forward(x);
      const auto t1 = Clock::now();
      const std::vector<PhaseTime> fp = layer.last_phases();
      Matrix<float> dx = layer.backward(dy);
      const auto t2 = Clock::now();
      (void)r;
      (void)dx;
      if (i < o.warmup) continue;
      train_forward_phases.add(fp);
      backward_phases.add(layer.last_phases());
      // Repacking the weights (forward: "pack_router", "pack_experts"; backward: "pack_down_t",
      // "pack_gate_up_t") happens once per weight update and is kept for every later pass until
      // the next one (gradient accumulation reuses it): it counts as the update's cost.
      auto weight_packing = [](const std::vector<PhaseTime>& phases) {
        double total = 0;
        for (const PhaseTime& p : phases)
          if (p.name == "pack_router" || p.name == "pack_experts" || p.name == "pack_down_t" ||
              p.name == "pack_gate_up_t")
            total += p.ms;
        return total;
      };
      const double pack_f = weight_packing(fp), pack_b = weight_packing(layer.last_phases());
      tu.push_back(ms(t0, tr) + pack_f + pack_b);
      tf.push_back(ms(tr, t1) - pack_f);
      tb.push_back(ms(t1, t2) - pack_b);
      ts.push_back(ms(t0, t2));
    }
    layer.set_training(false);
    train_forward_ms = median(tf);
    backward_ms = median(tb);
    step_ms = median(ts);
    weight_update_ms = median(tu);
    for (int i = 0; i < o.warmup; ++i) last = layer.forward(x);  // back to the inference layout
  }
  last = layer.forward(x);
  const double rss_mb = peak_rss_mb();

  // Which experts received tokens, and the bytes of their weights.
  const RoutingPlan& plan = last.routing.plan;
  // Bytes of one expert's weights in the layer's format (codes and scales when quantized).
  auto matrix_bytes = [&](int64_t rows, int64_t cols) -> int64_t {
    if (is_quantized(dtype)) return rows * (quantized_code_bytes(dtype, cols) + quantized_scale_bytes(dtype, cols));
    return rows * cols * (dtype == DType::kBF16 ? 2 : 4);
  };
  const int64_t expert_bytes = matrix_bytes(config.gate_up_rows(), o.d_model) + matrix_bytes(o.d_model, o.d_ff);
  int64_t experts_active = 0;
  for (int64_t e = 0; e < plan.num_experts; ++e) experts_active += plan.tokens_for_expert(e) > 0;
  const int64_t weight_bytes_touched = experts_active * expert_bytes;
  // The output against the fp32 layer on the same weights (the same seed draws the same
  // parameters): ‖y − y_fp32‖₂ / ‖y_fp32‖₂.
  double output_rel_error = 0;
  if (dtype != DType::kF32) {
    MoeLayerConfig c32 = config;
    c32.dtype = DType::kF32;
    MoeLayer ref(c32, o.seed);
    const Matrix<float> y32 = ref.forward(x).output;
    double num = 0, den = 0;
    for (size_t i = 0; i < y32.values.size(); ++i) {
      const double diff = double(last.output.values[i]) - double(y32.values[i]);
      num += diff * diff;
      den += double(y32.values[i]) * double(y32.values[i]);
    }
    output_rel_error = den > 0 ? std::sqrt(num / den) : 0.0;
  }
  const int64_t num_kept = plan.num_kept();

  // Phase 2, the yardsticks. The router + plan: the fp32 router GEMM on a packed weight, then
  // route_logits, as the layer's forward runs them before the experts.
  const MoeParams& params = layer.params();
  const int64_t router_rows = config.router_rows();
  const ops::OpContext router_ctx = ops::default_context(o.threads);
  const std::unique_ptr<ops::RouterCache> router_cache = ops::make_router_cache(router_ctx);
  ops::router_prepare(router_ctx, params.router_weight, *router_cache);
  RoutingOptions router_options;
  router_options.num_threads = o.threads;
  Matrix<float> logits(o.tokens, router_rows);
  auto run_router = [&] {
    ops::router_forward<float>(router_ctx, x, params.router_weight, params.router_bias, logits.view(),
                               router_cache.get());
    const RoutingResult<float> r = route_logits(config.routing, logits.cview(), router_options);
    (void)r;
  };
  // The dense GEMM of equal FLOPs.
  const int64_t dense_m = o.tokens * o.top_k;
  DenseGemm dense(dense_m, 3 * o.d_ff, o.d_model, dtype, isa, pool, o.seed);
  const double flops = 2.0 * static_cast<double>(dense_m) * 3.0 * static_cast<double>(o.d_model) *
                       static_cast<double>(o.d_ff);

  // Rounds of (forward, router, dense), interleaved so that a noisy neighbour slows all three
  // alike; the median of each.
  for (int i = 0; i < o.warmup; ++i) {
    last = layer.forward(x);
    run_router();
    dense.run();
  }
  std::vector<double> tf, tr, td;
  for (int i = 0; i < o.repeats; ++i) {
    auto t0 = Clock::now();
    last = layer.forward(x);
    tf.push_back(ms_since(t0));
    forward_phases.add(layer.last_phases());
    t0 = Clock::now();
    run_router();
    tr.push_back(ms_since(t0));
    t0 = Clock::now();
    dense.run();
    td.push_back(ms_since(t0));
  }
  const double forward_ms = median(tf), router_ms = median(tr), dense_ms = median(td);

  const bool memory_bound = o.tokens * o.top_k <= 2 * o.experts;
  const bool report_memory = memory_bound || o.memory_read;
  const double read_gbps = report_memory ? memory_read_gbps(pool, o.repeats) : 0.0;
  const double weight_gbps = static_cast<double>(weight_bytes_touched) / (forward_ms * 1e6);

  nlohmann::ordered_json j;
  j["tokens"] = o.tokens;
  j["d_model"] = o.d_model;
  j["d_ff"] = o.d_ff;
  j["experts"] = o.experts;
  j["top_k"] = o.top_k;
  j["preset"] = o.preset;
  j["dtype"] = dtype_name(dtype);
  j["threads"] = o.threads;
  j["isa"] = mc::isa_name(isa);
  j["layer_isa"] = layer.isa_name();
  j["repeats"] = o.repeats;
  j["forward_ms"] = forward_ms;
  j["forward_gflops"] = flops / (forward_ms * 1e6);
  j["forward_phases_ms"] = forward_phases.json();
  j["router_ms"] = router_ms;
  j["router_share"] = router_ms / forward_ms;
  if (o.backward) {
    j["train_forward_ms"] = train_forward_ms;
    j["backward_ms"] = backward_ms;
    j["weight_update_ms"] = weight_update_ms;  // repacking after an optimizer step
    j["step_ms"] = step_ms;                    // weight update + forward + backward
    j["backward_over_forward"] = backward_ms / train_forward_ms;
    j["train_forward_phases_ms"] = train_forward_phases.json();
    j["backward_phases_ms"] = backward_phases.json();
  }
  j["dense_equal_flops_ms"] = dense_ms;
  j["dense_gflops"] = flops / (dense_ms * 1e6);
  j["dense_shape"] = {dense_m, o.d_model, 3 * o.d_ff};
  j["dense_tile"] = {dense.row_block(), dense.col_block()};
  j["ratio_to_dense"] = dense_ms / forward_ms;
  j["expert_flops"] = flops;
  j["num_kept"] = num_kept;
  j["experts_active"] = experts_active;
  j["memory_bound"] = memory_bound;
  if (report_memory) {
    j["weight_bytes_touched"] = weight_bytes_touched;
    j["weight_gbps"] = weight_gbps;
    j["memory_read_gbps"] = read_gbps;
    j["weight_gbps_over_read"] = weight_gbps / read_gbps;
  }
  j["output_rel_error"] = output_rel_error;
  j["dense_dtype"] = dtype == DType::kBF16 ? "bf16" : "fp32";
  j["peak_rss_mb"] = rss_mb;

  if (o.json) {
    std::cout << j.dump() << "\n";
    return;
  }
  char line[256];
  auto row = [&](const char* name, const std::string& value) {
    std::snprintf(line, sizeof line, "  %-24s %s\n", name, value.c_str());
    std::cout << line;
  };
  auto num = [](double v, const char* fmt) {
    char b[64];
    std::snprintf(b, sizeof b, fmt, v);
    return std::string(b);
  };
  std::cout << "moekit bench: tokens " << o.tokens << ", d_model " << o.d_model << ", d_ff " << o.d_ff
            << ", experts " << o.experts << ", top-k " << o.top_k << ", " << dtype_name(dtype) << ", "
            << o.threads << " thread(s), isa " << mc::isa_name(isa) << ", preset " << o.preset << "\n"
            << "  (medians of " << o.repeats << " runs after " << o.warmup << " warm-up runs)\n";
  row("forward", num(forward_ms, "%.3f ms") + num(flops / (forward_ms * 1e6), "  (%.1f GFLOP/s)"));
  row("router + plan", num(router_ms, "%.3f ms") + num(100.0 * router_ms / forward_ms, "  (%.1f%% of forward)"));
  if (o.backward) {
    row("training forward", num(train_forward_ms, "%.3f ms"));
    row("backward", num(backward_ms, "%.3f ms") + num(backward_ms / train_forward_ms, "  (%.2fx forward)"));
    row("weight update (repack)", num(weight_update_ms, "%.3f ms"));
    row("step", num(step_ms, "%.3f ms"));
  }
  row("dense equal FLOPs", num(dense_ms, "%.3f ms") + num(flops / (dense_ms * 1e6), "  (%.1f GFLOP/s)"));
  row("ratio to dense", num(dense_ms / forward_ms, "%.3f"));
  row("experts active", std::to_string(experts_active) + " of " + std::to_string(o.experts));
  if (report_memory) {
    row("weight bytes touched", num(static_cast<double>(weight_bytes_touched) / 1e6, "%.1f MB"));
    row("weights streamed", num(weight_gbps, "%.1f GB/s"));
    row("memory read (1 GiB)", num(read_gbps, "%.1f GB/s") + num(weight_gbps / read_gbps, "  (weights at %.2f of it)"));
  }
  if (dtype != DType::kF32) row("output vs fp32 layer", num(output_rel_error, "%.2e relative L2"));
  row("peak RSS", num(rss_mb, "%.1f MB"));
}

}  // namespace

void add_bench_command(CLI::App& app) {
  CLI::App* bench = app.add_subcommand("bench", "Time the MoE layer against a dense GEMM of equal FLOPs");
  auto o = std::make_shared<BenchOptions>();
  declare_options(*bench, *o);
  bench->callback([o] {
    finish_options(*o);
    run_bench(*o);
  });
}

}  // namespace moekit::cli
