// Training a small model around one MoE layer on synthetic domains, with the routing curves.
//
// Data. D domains, each a Gaussian cluster in R^d: token x = c_k + σ·n with n ~ N(0, I) and the
// centre c_k ~ N(0, (r²/d)·I) (so ‖c_k‖ ≈ r); with r of a few σ the clusters overlap. Each domain
// has its own target y = tanh(A_k·x), A_k ~ N(0, 1/(r² + d·σ²)) per entry (so A_k·x is O(1)):
// an expert that serves one domain fits one map, a generalist must fit D of them at once.
// Every value is a pure function of (seed, stream, token index, coordinate) (counter-based
// draws): the training stream and the held-out split are reproducible and disjoint.
//
// Model. prediction = MoE(x) (the layer's owned parameters; no residual), task loss
//   L_task = 1/(T·d) Σ_t ‖MoE(x_t) − y_t‖²,
// plus the layer's router_aux_loss_coef·aux + router_z_loss_coef·z through its backward. Adam
// (or SGD) over every parameter tensor with a gradient; a selection bias, when the layer has
// one, follows the aux-loss-free update instead. Bitwise deterministic for any thread count.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "moekit/layer.h"
#include "moekit/tensor.h"

namespace moekit {

struct SyntheticDataConfig {
  int64_t num_domains = 4;
  double centre_norm = 3.0;   // r: ‖c_k‖ ≈ r
  double noise_std = 1.0;     // σ: per-coordinate spread around the centre
  int64_t eval_tokens = 2048; // held-out split size
  // Every domain uses the first domain's map: no expert gains from specialising, so nothing
  // opposes the rich-get-richer feedback of routing (a collapse-prone setting).
  bool shared_target = false;
};

enum class Optimizer { kAdam, kSgd };

// 8 experts, top-2 softmax, d_model 64, d_ff 128, SwiGLU, aux 0.01, z 0.001, 2 threads.
MoeLayerConfig default_train_layer();

struct TrainConfig {
  // routing.training is set by the loop; d_model is the token width.
  MoeLayerConfig layer = default_train_layer();
  SyntheticDataConfig data;
  Optimizer optimizer = Optimizer::kAdam;
  double learning_rate = 3e-3;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_eps = 1e-8;
  // The default run: 8000 steps of 512 tokens, 5.6–7 ms per step on 2 cores (45–56 s).
  int64_t steps = 8000;
  int64_t batch_size = 512;
  int64_t sequence_length = 0;  // tokens form sequences of this length (0: one per batch)
  int64_t eval_every = 200;     // held-out evaluation period in steps (also at step 0 and last)
  uint64_t seed = 0;

  // Throws ConfigError naming the field.
  void validate() const;
};

// One training step's routing and losses (of the training batch, before the update).
struct StepMetrics {
  int64_t step = 0;
  double task_loss = 0.0;
  double aux_loss = 0.0;  // raw, before the coefficient
  double z_loss = 0.0;    // raw, before the coefficient
  double entropy = 0.0;   // mean routing entropy (nats)
  double entropy_normalized = 0.0;  // divided by log E
  double dropped_fraction = 0.0;
  double max_over_mean_load = 0.0;
  double max_abs_logit = 0.0;       // max |router logit| over the batch (before noise)
  double tokens_per_second = 0.0;   // wall clock: the one value that is not reproducible
  std::vector<int64_t> tokens_per_expert;  // [num_experts] kept
};

// A held-out evaluation (training = false: no noise, evaluation capacity).
struct EvalMetrics {
  int64_t step = 0;
  double task_loss = 0.0;
  double entropy = 0.0;
  double dropped_fraction = 0.0;
  double max_over_mean_load = 0.0;
  double mutual_information = 0.0;  // I(domain; expert) / H(domain)
  std::vector<std::vector<int64_t>> domain_expert;  // [num_domains][num_experts] kept tokens
  std::vector<int64_t> top_expert;                  // [num_domains]
  std::vector<double> top_expert_share;             // [num_domains]
};

struct TrainResult {
  TrainConfig config;
  std::vector<StepMetrics> steps;  // one per step
  std::vector<EvalMetrics> evals;  // at step 0, every eval_every steps and after the last
  Matrix<float> router_weight;     // [router_rows, d_model] final prototypes
  Matrix<float> domain_centres;    // [num_domains, d_model]
  // [router_rows, num_domains] cos(w_e − w̄, c_k): router row minus the mean row (the part the
  // softmax sees) against each domain centre.
  Matrix<double> prototype_cosine;
  std::vector<int64_t> final_load; // [num_experts] held-out kept tokens at the end
  double seconds = 0.0;            // wall time of the training steps
  double ms_per_step = 0.0;
};

struct TrainProgress {
  int64_t step = 0;  // 1-based, of `steps`
  int64_t steps = 0;
  double task_loss = 0.0;
  double aux_loss = 0.0;
  double z_loss = 0.0;
  double entropy = 0.0;
  double dropped_fraction = 0.0;
  double tokens_per_second = 0.0;  // running average
  double eta_seconds = 0.0;
};
using ProgressFn = std::function<void(const TrainProgress&)>;

// The synthetic domains of `config` (centres, maps) drawn from `seed`; tokens on demand.
class SyntheticDomains {
 public:
  SyntheticDomains(const SyntheticDataConfig& config, int64_t d_model, uint64_t seed);
  // Tokens [count, d_model], targets [count, d_model] and domain labels [count] of tokens
  // first, …, first + count − 1 of a stream (0: training, 1: held-out), on num_threads threads
  // (the values do not depend on it).
  void draw(int stream, int64_t first, int64_t count, Matrix<float>* tokens,  // [count, d_model]
            Matrix<float>* targets,                                          // [count, d_model]
            std::vector<int32_t>* labels,                                    // [count]
            int num_threads = 1) const;
  const Matrix<float>& centres() const { return centres_; }  // [num_domains, d_model]

 private:
  // One token: writes x [d_model] and y [d_model] (given zeroed), returns its domain.
  int32_t draw_token(int stream, uint64_t index, float* x, float* y) const;

  SyntheticDataConfig config_;
  int64_t d_model_;
  uint64_t seed_;
  Matrix<float> centres_;          // [num_domains, d_model]
  std::vector<Matrix<float>> maps_;  // num_domains × [d_model, d_model], (A_k)ᵀ
};

TrainResult train(const TrainConfig& config, const ProgressFn& progress = {});

// metrics.json: the configuration (layer and routing keys), every curve and the final tables.
void write_metrics_json(const TrainResult& result, const std::string& path);
std::string metrics_json_text(const TrainResult& result);  // the same text
// The CSV files of write_metrics_csv as (file name, text).
std::vector<std::pair<std::string, std::string>> metrics_csv_files(const TrainResult& result);
// One CSV per curve in `directory`: steps.csv, load.csv, eval.csv, specialisation.csv,
// prototypes.csv. Throws std::runtime_error when a file cannot be written.
void write_metrics_csv(const TrainResult& result, const std::string& directory);

}  // namespace moekit
