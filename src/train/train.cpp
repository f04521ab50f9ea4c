// The training loop of train.h: data, forward, task loss, backward, optimiser, metrics.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <span>
#include <type_traits>
#include <utility>

#include "internal/parallel.h"
#include "internal/random.h"
#include "moekit/error.h"
#include "moekit/train.h"

namespace moekit {
namespace {

using Clock = std::chrono::steady_clock;

// Stream of the per-step logit noise the loop supplies (RoutingOptions::logit_noise), so that
// noise differs from step to step while the layer's routing seed stays fixed.
constexpr uint64_t kStepNoiseStream = 0x7472'0200;
constexpr int kTrainStream = 0;
constexpr int kEvalStream = 1;

// The parameter tensors in for_each order that have a gradient (the selection bias has none).
std::vector<std::vector<float>*> trainable(MoeTensors& t) {
  std::vector<std::vector<float>*> out;
  t.for_each([&](const char* name, std::vector<float>& v) {
    if (moe_param_spec(name).has_gradient) out.push_back(&v);
  });
  return out;
}
std::vector<const std::vector<float>*> trainable(const MoeTensors& t) {
  std::vector<const std::vector<float>*> out;
  t.for_each([&](const char* name, const std::vector<float>& v) {
    if (moe_param_spec(name).has_gradient) out.push_back(&v);
  });
  return out;
}

// Adam (Kingma & Ba) or plain SGD over every parameter tensor that has a gradient:
//   m ← β1·m + (1−β1)·g,  v ← β2·v + (1−β2)·g²,
//   θ ← θ − lr · (m / (1−β1^t)) / (√(v / (1−β2^t)) + ε);      SGD: θ ← θ − lr·g.
// Element-wise in a fixed order: bitwise reproducible for any thread count.
class ParameterOptimizer {
 public:
  ParameterOptimizer(const TrainConfig& config, int num_threads)
      : config_(config), num_threads_(num_threads) {}

  void step(MoeTensors& params, const MoeTensors& grads) {
    ++t_;
    std::vector<std::vector<float>*> p = trainable(params);
    std::vector<const std::vector<float>*> g = trainable(grads);
    if (m_.empty()) {
      for (auto* v : p) {
        m_.emplace_back(v->size(), 0.0f);
        v_.emplace_back(v->size(), 0.0f);
      }
    }
    const double lr = config_.learning_rate;
    const double c1 = 1.0 - std::pow(config_.adam_beta1, double(t_));
    const double c2 = 1.0 - std::pow(config_.adam_beta2, double(t_));
    for (size_t i = 0; i < p.size(); ++i) {
      if (g[i]->size() != p[i]->size()) continue;  // no gradient (selection bias)
      std::vector<float>& theta = *p[i];
      const std::vector<float>& grad = *g[i];
      if (config_.optimizer == Optimizer::kSgd) {
        for (size_t j = 0; j < theta.size(); ++j) theta[j] -= float(lr * grad[j]);
        continue;
      }
      // m̂/(√v̂ + ε) = (m/c1) / (√v/√c2 + ε), with the step's constants hoisted.
      float* __restrict m = m_[i].data();
      float* __restrict v = v_[i].data();
      float* __restrict w = theta.data();
      const float* __restrict dw = grad.data();
      const float b1 = float(config_.adam_beta1), b2 = float(config_.adam_beta2);
      const float step_size = float(lr / c1), inv_sqrt_c2 = float(1.0 / std::sqrt(c2));
      const float eps = float(config_.adam_eps);
      // Element-wise, so any split over threads gives the same values.
      detail::parallel_for(int64_t(theta.size()), num_threads_, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          m[j] = b1 * m[j] + (1.0f - b1) * dw[j];
          v[j] = b2 * v[j] + (1.0f - b2) * dw[j] * dw[j];
          w[j] -= step_size * m[j] / (std::sqrt(v[j]) * inv_sqrt_c2 + eps);
        }
      });
    }
  }

 private:
  TrainConfig config_;
  int num_threads_ = 1;
  int64_t t_ = 0;
  std::vector<std::vector<float>> m_, v_;
};

// L = 1/(T·d) Σ ‖pred − y‖², and dL/dpred = 2(pred − y)/(T·d) into *d_output.
double task_loss(ConstMatrixView<float> prediction,  // [T, d]
                 ConstMatrixView<float> target,      // [T, d]
                 Matrix<float>* d_output) {          // [T, d] or null
  const double scale = 1.0 / double(prediction.size());
  if (d_output) *d_output = Matrix<float>(prediction.rows, prediction.cols);
  double sum = 0.0;
  for (int64_t i = 0; i < prediction.size(); ++i) {
    const double r = double(prediction.data[i]) - double(target.data[i]);
    sum += r * r;
    if (d_output) d_output->values[size_t(i)] = float(2.0 * r * scale);
  }
  return sum * scale;
}

double max_abs(const Matrix<float>& m) {
  double out = 0.0;
  for (float v : m.values) out = std::max(out, double(std::fabs(v)));
  return out;
}

// N(0, (noise_std/E)²) logit noise of one step (V-MoE's scale), [T · router_rows].
std::vector<double> step_logit_noise(const MoeLayerConfig& layer, uint64_t seed, int64_t step,
                                     int64_t num_tokens) {
  const int64_t cols = layer.router_rows();
  const double scale = layer.routing.noise_std / double(layer.num_experts());
  std::vector<double> noise(size_t(num_tokens * cols));
  const auto stream = static_cast<detail::RandomStream>(kStepNoiseStream);
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t e = 0; e < cols; ++e) {
      noise[size_t(t * cols + e)] =
          scale * detail::random_normal(seed ^ detail::splitmix64(uint64_t(step)), stream, t, e);
    }
  }
  return noise;
}

bool loop_supplies_noise(const MoeLayerConfig& layer) {
  return layer.routing.noise_std > 0 && !layer.routing.noisy_gating;
}

StepMetrics step_metrics(int64_t step, double loss, const MoeForwardResult& fwd) {
  StepMetrics m;
  m.step = step;
  m.task_loss = loss;
  m.aux_loss = fwd.routing.losses.aux_loss;
  m.z_loss = fwd.routing.losses.z_loss;
  m.entropy = fwd.routing.stats.mean_entropy;
  m.entropy_normalized = fwd.routing.stats.mean_entropy_normalized;
  m.dropped_fraction = fwd.routing.stats.dropped_fraction;
  m.max_over_mean_load = fwd.routing.stats.max_over_mean_load;
  const Matrix<float>& clean = fwd.routing.saved.clean_logits;
  m.max_abs_logit = max_abs(clean.values.empty() ? fwd.routing.saved.logits : clean);
  m.tokens_per_expert = fwd.routing.stats.tokens_per_expert;
  return m;
}

struct HeldOut {
  Matrix<float> tokens;   // [N, d]
  Matrix<float> targets;  // [N, d]
  std::vector<int32_t> labels;  // [N]
};

RoutingOptions routing_options(const TrainConfig& config, std::span<const int32_t> labels) {
  RoutingOptions options;
  options.sequence_length = config.sequence_length;
  options.labels = labels;
  return options;
}

EvalMetrics evaluate(MoeLayer& layer, const TrainConfig& config, const HeldOut& held_out,
                     int64_t step) {
  layer.set_training(false);
  const MoeForwardResult fwd = layer.forward(held_out.tokens.cview(), routing_options(config, held_out.labels));
  layer.set_training(true);
  EvalMetrics m;
  m.step = step;
  m.task_loss = task_loss(fwd.output.cview(), held_out.targets.cview(), nullptr);
  const RoutingStats& s = fwd.routing.stats;
  m.entropy = s.mean_entropy;
  m.dropped_fraction = s.dropped_fraction;
  m.max_over_mean_load = s.max_over_mean_load;
  m.mutual_information = s.label_expert_mutual_information;
  const int64_t num_domains = config.data.num_domains;
  m.domain_expert.assign(size_t(num_domains), std::vector<int64_t>(size_t(layer.config().num_experts()), 0));
  m.top_expert.assign(size_t(num_domains), 0);
  m.top_expert_share.assign(size_t(num_domains), 0.0);
  for (const LabelStats& l : s.by_label) {
    if (l.label < 0 || l.label >= num_domains) continue;
    m.domain_expert[size_t(l.label)] = l.tokens_per_expert;
    m.top_expert[size_t(l.label)] = l.top_expert;
    m.top_expert_share[size_t(l.label)] = l.top_expert_share;
  }
  return m;
}

// cos(w_e − w̄, c_k) for every router row e and domain centre k, with w̄ the mean row: adding
// one vector to every row leaves the softmax unchanged, so only the centred rows are the
// prototypes that tell experts apart (the raw rows share a common part along −mean centre).
Matrix<double> prototype_cosine(const Matrix<float>& rows,      // [R, d]
                                const Matrix<float>& centres) {  // [D, d]
  std::vector<double> mean(size_t(rows.cols), 0.0);
  for (int64_t e = 0; e < rows.rows; ++e)
    for (int64_t j = 0; j < rows.cols; ++j) mean[size_t(j)] += double(rows(e, j)) / double(rows.rows);
  Matrix<double> out(rows.rows, centres.rows);
  for (int64_t e = 0; e < rows.rows; ++e) {
    for (int64_t k = 0; k < centres.rows; ++k) {
      double dot = 0, nw = 0, nc = 0;
      for (int64_t j = 0; j < rows.cols; ++j) {
        const double w = double(rows(e, j)) - mean[size_t(j)];
        dot += w * centres(k, j);
        nw += w * w;
        nc += double(centres(k, j)) * centres(k, j);
      }
      out(e, k) = (nw > 0 && nc > 0) ? dot / std::sqrt(nw * nc) : 0.0;
    }
  }
  return out;
}

// One optimisation step on the batch of `step`; returns its metrics.
StepMetrics train_step(MoeLayer& layer, ParameterOptimizer& optimizer, const TrainConfig& config,
                       const SyntheticDomains& data, int64_t step) {
  Matrix<float> x, y;
  std::vector<int32_t> labels;
  data.draw(kTrainStream, step * config.batch_size, config.batch_size, &x, &y, &labels,
            layer.config().num_threads);
  RoutingOptions options = routing_options(config, labels);
  std::vector<double> noise;
  if (loop_supplies_noise(layer.config())) {
    noise = step_logit_noise(layer.config(), config.seed, step, config.batch_size);
    options.logit_noise = noise;
  }
  const MoeForwardResult fwd = layer.forward(x.cview(), options);
  Matrix<float> d_output;
  const double loss = task_loss(fwd.output.cview(), y.cview(), &d_output);
  layer.zero_grad();
  layer.backward(d_output.cview());  // adds aux and z gradients with the config's coefficients
  optimizer.step(layer.parameters(), layer.grads());
  if (layer.config().has_selection_bias()) {
    layer.update_selection_bias(fwd.routing.stats.selected_per_expert);
  }
  layer.refresh_packed_weights();
  return step_metrics(step, loss, fwd);
}

void report_progress(const ProgressFn& progress, const StepMetrics& m, int64_t steps,
                     int64_t tokens_done, double seconds) {
  if (!progress) return;
  TrainProgress p;
  p.step = m.step + 1;
  p.steps = steps;
  p.task_loss = m.task_loss;
  p.aux_loss = m.aux_loss;
  p.z_loss = m.z_loss;
  p.entropy = m.entropy;
  p.dropped_fraction = m.dropped_fraction;
  p.tokens_per_second = seconds > 0 ? double(tokens_done) / seconds : 0.0;
  p.eta_seconds = p.step > 0 ? seconds / double(p.step) * double(steps - p.step) : 0.0;
  progress(p);
}

}  // namespace

MoeLayerConfig default_train_layer() {
  MoeLayerConfig c;
  c.routing.num_experts = 8;
  c.routing.num_experts_per_tok = 2;
  c.routing.router_aux_loss_coef = 0.01;
  c.routing.router_z_loss_coef = 0.001;
  c.d_model = 64;
  c.d_ff = 128;
  c.activation = ExpertActivation::kSwiGlu;
  c.num_threads = 2;
  return c;
}

void TrainConfig::validate() const {
  layer.validate();
  if (steps < 1) throw_config_error("steps", ">= 1", steps);
  if (batch_size < 1) throw_config_error("batch_size", ">= 1", batch_size);
  if (!(learning_rate > 0) || !std::isfinite(learning_rate))
    throw_config_error("learning_rate", "a finite number > 0", learning_rate);
  if (!(adam_beta1 >= 0 && adam_beta1 < 1)) throw_config_error("adam_beta1", "in [0, 1)", adam_beta1);
  if (!(adam_beta2 >= 0 && adam_beta2 < 1)) throw_config_error("adam_beta2", "in [0, 1)", adam_beta2);
  if (!(adam_eps > 0)) throw_config_error("adam_eps", "> 0", adam_eps);
  if (eval_every < 1) throw_config_error("eval_every", ">= 1", eval_every);
  if (sequence_length < 0 || (sequence_length > 0 && batch_size % sequence_length != 0))
    throw_config_error("sequence_length", "0 or a divisor of batch_size", sequence_length);
  if (data.num_domains < 1) throw_config_error("data.num_domains", ">= 1", data.num_domains);
  if (data.eval_tokens < 1 || (sequence_length > 0 && data.eval_tokens % sequence_length != 0))
    throw_config_error("data.eval_tokens", ">= 1 (a multiple of sequence_length)", data.eval_tokens);
}

TrainResult train(const TrainConfig& config, const ProgressFn& progress) {
  config.validate();
  TrainResult result;
  result.config = config;
  MoeLayerConfig layer_config = config.layer;
  layer_config.routing.training = true;
  MoeLayer layer(layer_config, config.seed);
  ParameterOptimizer optimizer(config, layer_config.num_threads);
  const SyntheticDomains data(config.data, layer_config.d_model, config.seed);
  HeldOut held_out;
  data.draw(kEvalStream, 0, config.data.eval_tokens, &held_out.tokens, &held_out.targets, &held_out.labels);

  result.evals.push_back(evaluate(layer, config, held_out, 0));
  result.steps.reserve(size_t(config.steps));
  double seconds = 0.0;
  for (int64_t step = 0; step < config.steps; ++step) {
    const auto start = Clock::now();
    StepMetrics m = train_step(layer, optimizer, config, data, step);
    const double dt = std::chrono::duration<double>(Clock::now() - start).count();
    seconds += dt;
    m.tokens_per_second = dt > 0 ? double(config.batch_size) / dt : 0.0;
    report_progress(progress, m, config.steps, (step + 1) * config.batch_size, seconds);
    result.steps.push_back(std::move(m));
    if ((step + 1) % config.eval_every == 0 || step + 1 == config.steps) {
      result.evals.push_back(evaluate(layer, config, held_out, step + 1));
    }
  }
  result.seconds = seconds;
  result.ms_per_step = 1e3 * seconds / double(config.steps);

  const int64_t rows = layer_config.router_rows();
  result.router_weight = Matrix<float>(rows, layer_config.d_model);
  std::copy(layer.parameters().router_weight.begin(), layer.parameters().router_weight.end(),
            result.router_weight.values.begin());
  result.domain_centres = data.centres();
  result.prototype_cosine = prototype_cosine(result.router_weight, result.domain_centres);
  for (const auto& row : result.evals.back().domain_expert) {
    if (result.final_load.empty()) result.final_load.assign(row.size(), 0);
    for (size_t e = 0; e < row.size(); ++e) result.final_load[e] += row[e];
  }
  return result;
}

}  // namespace moekit
