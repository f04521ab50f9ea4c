// `moekit train`: the seeds' experiment. A small model around one MoE layer learns several
// synthetic domains (include/moekit/train.h); the command shows progress while it runs and
// writes the routing report: index.html (inline SVG, no script), metrics.json and a CSV per
// curve, into --out (default runs/<UTC time>/), all or nothing (cli/report/output.h).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "commands.h"
#include "flags.h"
#include "moekit/config.h"
#include "moekit/error.h"
#include "moekit/layer.h"
#include "moekit/train.h"
#include "report/html.h"
#include "report/output.h"
#include "report/svg.h"

namespace moekit::cli {
namespace {

struct TrainOptions {
  std::string config_path;  // a layer config JSON as the starting point
  std::string preset;
  std::string method;  // empty: the preset's (or top-k)
  int64_t experts = 8;
  int64_t top_k = 2;
  double capacity_factor = 0;  // 0: the preset's (dropless by default)
  double aux_coef = -1;        // < 0: the default
  double z_coef = -1;
  double temperature = 1;
  double jitter = 0;
  double noise_std = 0;
  int64_t d_model = 0;  // 0: the default
  int64_t d_ff = 0;
  int64_t domains = 4;
  int64_t steps = 0;  // 0: the default
  int64_t batch_size = 0;
  int64_t eval_every = 0;
  double learning_rate = 0;
  std::string optimizer = "adam";
  std::string dtype = "fp32";
  int threads = 2;
  uint64_t seed = 0;
  std::string out;
  bool force = false;
};

const std::vector<std::string> kMethods = {"topk",     "switch",   "dense",       "expert_choice",
                                           "soft_moe", "sinkhorn", "sigmoid_bias"};

// The flags `train` and `compare` share: the model, the data, the loop and the report.
void declare_options(CLI::App& cmd, TrainOptions& o) {
  add_text_option(cmd, "--config", o.config_path, "FILE", "a path",
                  "layer config JSON to start from (layer and routing keys, docs/config.md)");
  add_text_option(cmd, "--preset", o.preset, "NAME", "a preset name (moekit presets)",
                  "routing preset; --experts and --top-k override its counts");
  add_int_option(cmd, "--experts", o.experts, 1, 1024, "number of experts")->capture_default_str();
  add_int_option(cmd, "--top-k", o.top_k, 1, 1024, "experts per token, at most --experts")->capture_default_str();
  add_number_option(cmd, "--capacity-factor", o.capacity_factor, 0, 1e6, true,
                    "capacity factor in training (evaluation: the preset's, else the same)");
  add_number_option(cmd, "--aux-coef", o.aux_coef, 0, 1e6, false, "balancing loss coefficient (default 0.01)");
  add_number_option(cmd, "--z-coef", o.z_coef, 0, 1e6, false, "router z-loss coefficient (default 0.001)");
  add_number_option(cmd, "--temperature", o.temperature, 0, 1e6, true, "router softmax temperature")
      ->capture_default_str();
  add_number_option(cmd, "--jitter", o.jitter, 0, 1, false, "input jitter noise in training (x ×= U(1 ± ε))");
  add_number_option(cmd, "--noise-std", o.noise_std, 0, 1e6, false, "logit noise N(0, (std/E)²) in training");
  add_int_option(cmd, "--d-model", o.d_model, 1, 1 << 16, "token width (default 64)");
  add_int_option(cmd, "--d-ff", o.d_ff, 1, 1 << 16, "expert hidden width (default 128)");
  add_int_option(cmd, "--domains", o.domains, 1, 1024, "synthetic domains")->capture_default_str();
  add_int_option(cmd, "--steps", o.steps, 1, int64_t(1) << 30, "training steps (default 8000)");
  add_int_option(cmd, "--batch-size", o.batch_size, 1, int64_t(1) << 24, "tokens per step (default 512)");
  add_int_option(cmd, "--eval-every", o.eval_every, 1, int64_t(1) << 30, "held-out evaluation period (steps)");
  add_number_option(cmd, "--lr", o.learning_rate, 0, 1e3, true, "learning rate (default 3e-3)");
  add_choice_option(cmd, "--optimizer", o.optimizer, {{"adam"}, {"sgd"}}, "optimizer")->capture_default_str();
  add_choice_option(cmd, "--dtype", o.dtype, {{"fp32", "float32"}, {"bf16", "bfloat16"}}, "expert weight format")
      ->capture_default_str();
  add_int_option(cmd, "--threads", o.threads, 1, 1024, "threads (results are identical for any count)")
      ->capture_default_str();
  add_int_option(cmd, "--seed", o.seed, 0, INT64_MAX, "seed of the data and the parameters")->capture_default_str();
  add_text_option(cmd, "--out", o.out, "DIR", "a directory", "report directory (default runs/<UTC time>/)");
  add_switch(cmd, "--force", o.force, "replace the files of an earlier report in --out");
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path + ": expected a readable file, got none");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// The training configuration the flags ask for.
TrainConfig train_config(const TrainOptions& o) {
  TrainConfig t;
  MoeLayerConfig& c = t.layer;
  if (!o.config_path.empty()) c = moe_layer_config_from_json(read_file(o.config_path));
  if (!o.preset.empty()) {
    const RoutingConfig defaults = c.routing;
    c.routing = routing_config_from_preset(o.preset);
    c.routing.router_aux_loss_coef = std::max(c.routing.router_aux_loss_coef, defaults.router_aux_loss_coef);
  }
  RoutingConfig& r = c.routing;
  r.num_experts = o.experts;
  r.num_experts_per_tok = o.top_k;
  if (o.method == "switch") {
    r.routing_method = RoutingMethod::kTopK;
    r.num_experts_per_tok = 1;
    if (!r.capacity_factor) r.capacity_factor = 1.0;
  } else if (o.method == "topk") {
    r.routing_method = RoutingMethod::kTopK;
  } else if (o.method == "dense") {
    r.routing_method = RoutingMethod::kDense;
  } else if (o.method == "expert_choice") {
    r.routing_method = RoutingMethod::kExpertChoice;
    if (!r.capacity_factor) r.capacity_factor = 1.0;
  } else if (o.method == "soft_moe") {
    r.routing_method = RoutingMethod::kSoftMoe;
  } else if (o.method == "sinkhorn") {
    r.routing_method = RoutingMethod::kSinkhorn;
  } else if (o.method == "sigmoid_bias") {
    r.routing_method = RoutingMethod::kTopK;
    r.scoring_func = ScoringFunc::kSigmoid;
    c.selection_bias = true;
  }
  if (o.capacity_factor > 0) r.capacity_factor = o.capacity_factor;
  if (o.aux_coef >= 0) r.router_aux_loss_coef = o.aux_coef;
  if (o.z_coef >= 0) r.router_z_loss_coef = o.z_coef;
  r.temperature = o.temperature;
  if (o.jitter > 0) r.router_jitter_noise = o.jitter;
  if (o.noise_std > 0) r.noise_std = o.noise_std;
  if (o.d_model > 0) c.d_model = o.d_model;
  if (o.d_ff > 0) c.d_ff = o.d_ff;
  c.dtype = o.dtype == "bf16" ? DType::kBF16 : DType::kF32;
  c.num_threads = o.threads;
  t.data.num_domains = o.domains;
  if (o.steps > 0) t.steps = o.steps;
  if (o.batch_size > 0) t.batch_size = o.batch_size;
  if (o.eval_every > 0) t.eval_every = o.eval_every;
  if (o.learning_rate > 0) t.learning_rate = o.learning_rate;
  t.optimizer = o.optimizer == "sgd" ? Optimizer::kSgd : Optimizer::kAdam;
  t.seed = o.seed;
  if (r.num_experts_per_tok > r.num_experts)
    reject("--top-k", "at most --experts (" + std::to_string(r.num_experts) + ")",
           std::to_string(r.num_experts_per_tok));
  t.validate();
  return t;
}

// ---------------------------------------------------------------------------------------------
// Progress: a redrawn line on a terminal, plain lines (every tenth of the run) otherwise.

std::string clock_text(double seconds) {
  const int s = static_cast<int>(std::max(0.0, seconds) + 0.5);
  char buf[32];
  std::snprintf(buf, sizeof buf, "%d:%02d", s / 60, s % 60);
  return buf;
}

class Progress {
 public:
  Progress() : terminal_(isatty(STDERR_FILENO) != 0) {}
  void operator()(const TrainProgress& p) {
    const auto now = std::chrono::steady_clock::now();
    const bool last = p.step == p.steps;
    char line[256];
    std::snprintf(line, sizeof line, "step %lld/%lld  loss %.4f  aux %.3f  z %.3f  entropy %.3f  dropped %.3f  %.0f tok/s",
                  static_cast<long long>(p.step), static_cast<long long>(p.steps), p.task_loss, p.aux_loss, p.z_loss,
                  p.entropy, p.dropped_fraction, p.tokens_per_second);
    if (terminal_) {
      if (!last && now - drawn_ < std::chrono::milliseconds(100)) return;
      drawn_ = now;
      constexpr int kWidth = 24;
      const int filled = static_cast<int>(kWidth * p.step / std::max<int64_t>(1, p.steps));
      std::cerr << "\r[" << std::string(static_cast<size_t>(filled), '#') << std::string(static_cast<size_t>(kWidth - filled), '.')
                << "] " << line << "  ETA " << clock_text(p.eta_seconds) << "\x1b[K" << (last ? "\n" : "") << std::flush;
    } else {
      const int64_t tenth = std::max<int64_t>(1, p.steps / 10);
      if (p.step % tenth == 0 || last) std::cerr << line << "  ETA " << clock_text(p.eta_seconds) << "\n";
    }
  }

 private:
  bool terminal_;
  std::chrono::steady_clock::time_point drawn_{};
};

// ---------------------------------------------------------------------------------------------
// The report.

// At most `max_points` means of consecutive steps, so a curve of thousands of steps stays a
// light SVG: (x, y) = (mean step, mean value) per bucket.
report::Series bucketed(const std::string& name, const std::vector<StepMetrics>& steps,
                        double (*value)(const StepMetrics&), size_t max_points = 300) {
  report::Series s{name, {}, {}};
  const size_t n = steps.size(), per = std::max<size_t>(1, (n + max_points - 1) / max_points);
  for (size_t i = 0; i < n; i += per) {
    const size_t j = std::min(n, i + per);
    double x = 0, y = 0;
    for (size_t k = i; k < j; ++k) x += double(steps[k].step), y += value(steps[k]);
    s.x.push_back(x / double(j - i));
    s.y.push_back(y / double(j - i));
  }
  return s;
}

report::Series eval_series(const std::string& name, const std::vector<EvalMetrics>& evals,
                           double (*value)(const EvalMetrics&)) {
  report::Series s{name, {}, {}};
  for (const EvalMetrics& e : evals) {
    s.x.push_back(double(e.step));
    s.y.push_back(value(e));
  }
  return s;
}

report::Section chart(const std::string& heading, const std::string& text, report::LineChart c) {
  return {heading, text, report::Svg{report::line_chart_svg(c)}};
}

std::vector<std::string> numbered(const std::string& prefix, int64_t n) {
  std::vector<std::string> v;
  for (int64_t i = 0; i < n; ++i) v.push_back(prefix + std::to_string(i));
  return v;
}

// Load per expert over training: share of the kept assignments, in step buckets.
report::Heatmap load_heatmap(const TrainResult& r) {
  const int64_t num_experts = r.config.layer.num_experts();
  const size_t n = r.steps.size(), buckets = std::min<size_t>(n, 60), per = (n + buckets - 1) / buckets;
  report::Heatmap h;
  h.title = "Load per expert over training";
  h.rows = static_cast<size_t>(num_experts);
  h.row_labels = numbered("e", num_experts);
  h.row_title = "expert";
  h.col_title = "training step";
  h.value_title = "share of assignments";
  h.value_min = 0.0;
  std::vector<std::vector<double>> cols;
  for (size_t i = 0; i < n; i += per) {
    std::vector<double> share(static_cast<size_t>(num_experts), 0.0);
    double total = 0;
    for (size_t k = i; k < std::min(n, i + per); ++k)
      for (int64_t e = 0; e < num_experts; ++e) {
        share[static_cast<size_t>(e)] += double(r.steps[k].tokens_per_expert[static_cast<size_t>(e)]);
        total += double(r.steps[k].tokens_per_expert[static_cast<size_t>(e)]);
      }
    for (double& s : share) s = total > 0 ? s / total : 0.0;
    cols.push_back(share);
    h.col_labels.push_back(std::to_string(r.steps[i].step));
  }
  h.cols = cols.size();
  h.values.resize(h.rows * h.cols);
  for (size_t c = 0; c < h.cols; ++c)
    for (size_t e = 0; e < h.rows; ++e) h.values[e * h.cols + c] = cols[c][e];
  return h;
}

// Domain × expert: the share of each domain's kept assignments that each expert received.
report::Heatmap specialisation_heatmap(const EvalMetrics& e, const std::string& when) {
  report::Heatmap h;
  h.title = "Domain × expert, " + when + " (I(domain; expert)/H(domain) = " + report::format_number(e.mutual_information) + ")";
  h.rows = e.domain_expert.size();
  h.cols = h.rows ? e.domain_expert[0].size() : 0;
  h.row_labels = numbered("domain ", static_cast<int64_t>(h.rows));
  h.col_labels = numbered("e", static_cast<int64_t>(h.cols));
  h.row_title = "domain";
  h.col_title = "expert";
  h.value_title = "share of domain";
  h.value_min = 0.0;
  h.value_max = 1.0;
  h.show_values = true;
  for (const auto& row : e.domain_expert) {
    double total = 0;
    for (int64_t v : row) total += double(v);
    for (int64_t v : row) h.values.push_back(total > 0 ? double(v) / total : 0.0);
  }
  return h;
}

report::Heatmap prototype_heatmap(const TrainResult& r) {
  const Matrix<double>& m = r.prototype_cosine;
  report::Heatmap h;
  h.title = "Router rows (prototypes) against the domain centres";
  h.rows = static_cast<size_t>(m.rows);
  h.cols = static_cast<size_t>(m.cols);
  h.row_labels = numbered("e", m.rows);
  h.col_labels = numbered("domain ", m.cols);
  h.row_title = "expert (router row)";
  h.col_title = "domain centre";
  h.value_title = "cosine similarity";
  h.value_min = -1.0;
  h.value_max = 1.0;
  h.show_values = true;
  h.values.assign(m.values.begin(), m.values.end());
  return h;
}

// The configuration as key/value rows, from the metrics' own record of it.
report::Table config_table(const nlohmann::json& config) {
  report::Table t{{"key", "value"}, {}};
  std::vector<std::pair<std::string, const nlohmann::json*>> todo{{"", &config}};
  while (!todo.empty()) {
    auto [prefix, node] = todo.back();
    todo.pop_back();
    if (node->is_object()) {
      std::vector<std::pair<std::string, const nlohmann::json*>> children;
      for (auto it = node->begin(); it != node->end(); ++it)
        children.push_back({prefix.empty() ? it.key() : prefix + "." + it.key(), &*it});
      for (auto it = children.rbegin(); it != children.rend(); ++it) todo.push_back(*it);
    } else {
      t.rows.push_back({prefix, node->dump()});
    }
  }
  return t;
}

std::string page_of(const TrainResult& r, const nlohmann::json& metrics) {
  const auto& s = r.steps;
  const auto& ev = r.evals;
  report::Page page;
  page.title = "moekit train: routing report";
  const RoutingConfig& rc = r.config.layer.routing;
  page.subtitle = std::to_string(rc.num_experts) + " experts, top-" + std::to_string(rc.num_experts_per_tok) + ", " +
                  std::to_string(r.config.data.num_domains) + " domains, " + std::to_string(r.config.steps) +
                  " steps of " + std::to_string(r.config.batch_size) + " tokens, seed " + std::to_string(r.config.seed) +
                  "; " + report::format_number(r.ms_per_step) + " ms per step";
  page.sections.push_back(chart(
      "Task loss", "Mean squared error of the prediction against the token's domain target: training batches (means of consecutive steps) and the held-out split (no noise, evaluation capacity).",
      {"Task loss", "training step", "MSE per coordinate", {bucketed("train", s, [](const StepMetrics& m) { return m.task_loss; }), eval_series("held-out", ev, [](const EvalMetrics& m) { return m.task_loss; })}, true}));
  page.sections.push_back(chart(
      "Balancing and z losses", "The raw auxiliary (load-balancing) loss, 1 or k at perfect balance depending on the convention, and the router z-loss, the mean squared log-sum-exp of the logits.",
      {"Auxiliary losses", "training step", "loss (raw, before its coefficient)", {bucketed("aux loss", s, [](const StepMetrics& m) { return m.aux_loss; }), bucketed("z-loss", s, [](const StepMetrics& m) { return m.z_loss; })}, true}));
  page.sections.push_back({"Load per expert", "Each column is a stretch of training; a dark row is an expert that receives few tokens, a bright one an expert that takes more than its share (collapse shows as one or two bright rows).", report::Svg{report::heatmap_svg(load_heatmap(r))}});
  page.sections.push_back(chart(
      "Routing entropy", "Mean entropy of the per-token routing distribution: it falls as routing becomes decisive (log E is the uniform router).",
      {"Routing entropy", "training step", "entropy (nats)", {bucketed("train", s, [](const StepMetrics& m) { return m.entropy; }), eval_series("held-out", ev, [](const EvalMetrics& m) { return m.entropy; })}, false}));
  page.sections.push_back(chart(
      "Dropped assignments", "Fraction of the (token, expert) selections that overflowed an expert's capacity and were dropped (0 when routing is dropless).",
      {"Dropped fraction", "training step", "fraction of selections", {bucketed("train", s, [](const StepMetrics& m) { return m.dropped_fraction; }), eval_series("held-out", ev, [](const EvalMetrics& m) { return m.dropped_fraction; })}, false}));
  page.sections.push_back(chart(
      "Largest router logit", "The largest |logit| in each batch: the z-loss keeps it moderate.",
      {"Max |router logit|", "training step", "|logit|", {bucketed("max |logit|", s, [](const StepMetrics& m) { return m.max_abs_logit; })}, false}));
  page.sections.push_back(chart(
      "Load imbalance", "The busiest expert's load over the mean load: 1 is perfect balance; a collapsed router gives several times that.",
      {"Max / mean load", "training step", "max load / mean load", {bucketed("train", s, [](const StepMetrics& m) { return m.max_over_mean_load; }), eval_series("held-out", ev, [](const EvalMetrics& m) { return m.max_over_mean_load; })}, false}));
  if (!ev.empty()) {
    page.sections.push_back({"Specialisation at the start", "Held-out tokens before training: which experts each domain's tokens reach.", report::Svg{report::heatmap_svg(specialisation_heatmap(ev.front(), "step 0"))}});
    page.sections.push_back({"Specialisation at the end", "After training: a clear dominant expert per domain means the experts specialised.", report::Svg{report::heatmap_svg(specialisation_heatmap(ev.back(), "step " + std::to_string(ev.back().step)))}});
    page.sections.push_back(chart(
        "Mutual information", "I(domain; expert) / H(domain) on the held-out split: 0 when routing ignores the domain, 1 when the expert determines it.",
        {"Domain–expert mutual information", "training step", "I(domain; expert) / H(domain)", {eval_series("held-out", ev, [](const EvalMetrics& m) { return m.mutual_information; })}, false}));
  }
  page.sections.push_back({"Prototypes", "Cosine similarity of each router row (minus the mean row, the part the softmax sees) with each domain centre: a router row is a prototype of the tokens it routes.", report::Svg{report::heatmap_svg(prototype_heatmap(r))}});
  {
    report::BarChart b;
    b.title = "Final load (held-out)";
    b.labels = numbered("e", static_cast<int64_t>(r.final_load.size()));
    double total = 0;
    for (int64_t v : r.final_load) {
      b.values.push_back(double(v));
      total += double(v);
    }
    b.x_title = "expert";
    b.y_title = "kept assignments";
    b.reference = r.final_load.empty() ? 0.0 : total / double(r.final_load.size());
    b.reference_label = "mean";
    page.sections.push_back({"Final load", "Kept assignments per expert on the held-out split after training; the dashed line is the mean.", report::Svg{report::bar_chart_svg(b)}});
  }
  page.sections.push_back({"Configuration", "Every setting of this run (metrics.json holds the same and every curve).", config_table(metrics.at("config"))});
  return report::html_page(page);
}

std::string default_out_dir() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char buf[64];
  std::strftime(buf, sizeof buf, "runs/%Y%m%d-%H%M%S", &utc);
  return buf;
}

void print_summary(const TrainResult& result, const std::string& out);

void run_train(const TrainOptions& o) {
  const TrainConfig config = train_config(o);
  const std::string out = o.out.empty() ? default_out_dir() : o.out;
  try {
    {
      // Refuse an occupied or unwritable directory before a minute of training, not after
      // (the probe's temporaries are removed when it goes out of scope uncommitted).
      report::ReportWriter probe(out, o.force);
      probe.add("index.html", "");
      probe.add("metrics.json", "");
    }
    Progress progress;
    const TrainResult result = train(config, [&](const TrainProgress& p) { progress(p); });
    const std::string metrics_text = metrics_json_text(result);
    const nlohmann::json metrics = nlohmann::json::parse(metrics_text);
    report::ReportWriter report(out, o.force);
    report.add("metrics.json", metrics_text);
    for (const auto& [name, text] : metrics_csv_files(result)) report.add(name, text);
    report.add("index.html", page_of(result, metrics));
    report.commit("index.html");
    print_summary(result, out);
  } catch (const report::OutputError& e) {
    throw InputError(e.what());  // one line, exit status 2, like every other bad argument
  }
}

void print_summary(const TrainResult& result, const std::string& out) {
  const EvalMetrics* last = result.evals.empty() ? nullptr : &result.evals.back();
  std::cout << "trained " << result.steps.size() << " steps in " << report::format_number(result.seconds)
            << " s (" << report::format_number(result.ms_per_step) << " ms per step)";
  if (last)
    std::cout << "; held-out loss " << report::format_number(last->task_loss) << ", I(domain; expert)/H(domain) "
              << report::format_number(last->mutual_information);
  std::cout << "\nreport: " << (std::filesystem::path(out) / "index.html").string() << "\n";
}

// ---------------------------------------------------------------------------------------------
// `moekit compare`: several routing methods on the same data, model and seed.

struct MethodSummary {
  std::string method;
  TrainResult result;
  double expert_flops_per_token = 0;  // forward FLOPs of the routed experts per token
};

// Forward FLOPs of the routed experts per token: every computed row costs one expert MLP,
// 2·d·gu + 2·d_ff·d (gu = 2·d_ff gated, d_ff otherwise). Rows per token: kept assignments per
// token, or Soft MoE's slots per token (E · slots_per_expert per sequence).
double expert_flops_per_token(const TrainResult& r) {
  const MoeLayerConfig& c = r.config.layer;
  const double per_row = 2.0 * double(c.d_model) * double(c.gate_up_rows()) + 2.0 * double(c.d_ff) * double(c.d_model);
  double rows_per_token = 0;
  if (c.routing.routing_method == RoutingMethod::kSoftMoe) {
    const double seq = r.config.sequence_length > 0 ? double(r.config.sequence_length) : double(r.config.batch_size);
    rows_per_token = double(c.num_experts() * c.routing.slots_per_expert) / seq;
  } else if (!r.evals.empty()) {
    double kept = 0, tokens = 0;
    for (const auto& row : r.evals.back().domain_expert)
      for (int64_t v : row) kept += double(v);
    tokens = double(r.config.data.eval_tokens);
    rows_per_token = tokens > 0 ? kept / tokens : 0.0;
  }
  return per_row * rows_per_token;
}

std::string compare_page(const std::vector<MethodSummary>& runs, const report::Table& table) {
  report::Page page;
  page.title = "moekit compare: routing methods on the same data";
  const TrainConfig& c = runs.front().result.config;
  page.subtitle = std::to_string(c.layer.num_experts()) + " experts, " + std::to_string(c.data.num_domains) +
                  " domains, " + std::to_string(c.steps) + " steps of " + std::to_string(c.batch_size) +
                  " tokens, seed " + std::to_string(c.seed);
  page.sections.push_back({"Summary", "Held-out figures at the end of training, the routed experts' forward FLOPs per token and the wall time per training step (the only figure that is not reproducible).", table});
  report::LineChart loss{"Held-out task loss", "training step", "MSE per coordinate", {}, true};
  report::LineChart mi{"Domain–expert mutual information (held-out)", "training step", "I(domain; expert) / H(domain)", {}, false};
  for (const MethodSummary& m : runs) {
    loss.series.push_back(eval_series(m.method, m.result.evals, [](const EvalMetrics& e) { return e.task_loss; }));
    mi.series.push_back(eval_series(m.method, m.result.evals, [](const EvalMetrics& e) { return e.mutual_information; }));
  }
  page.sections.push_back(chart("Held-out task loss", "The dense mixture is fully differentiable but runs every expert on every token; sparse hard routing computes a few.", loss));
  page.sections.push_back(chart("Specialisation", "How much the expert a token reaches tells about its domain.", mi));
  return report::html_page(page);
}

struct CompareOptions {
  TrainOptions base;
  std::string methods = "switch,topk,expert_choice,dense,soft_moe,sigmoid_bias";
};

std::vector<std::string> split_methods(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  for (std::string m; std::getline(in, m, ',');) {
    if (std::find(kMethods.begin(), kMethods.end(), m) == kMethods.end()) {
      std::string all;
      for (const std::string& k : kMethods) all += (all.empty() ? "" : ", ") + k;
      reject("--methods", "a comma-separated list of " + all, "'" + m + "'");
    }
    out.push_back(m);
  }
  if (out.empty()) reject("--methods", "at least one method", "'" + text + "'");
  return out;
}

void run_compare(const CompareOptions& co) {
  const std::vector<std::string> methods = split_methods(co.methods);
  TrainOptions base = co.base;
  if (base.steps == 0) base.steps = 2000;
  std::vector<TrainConfig> configs;
  for (const std::string& m : methods) {
    TrainOptions o = base;
    o.method = m;
    configs.push_back(train_config(o));  // every flag checked before the first run
  }
  const std::string out = base.out.empty() ? default_out_dir() : base.out;
  try {
    {
      report::ReportWriter probe(out, base.force);
      probe.add("index.html", "");
      probe.add("compare.json", "");
    }
    std::vector<MethodSummary> runs;
    for (size_t i = 0; i < methods.size(); ++i) {
      std::cerr << "== " << methods[i] << " (" << i + 1 << "/" << methods.size() << ")\n";
      Progress progress;
      MethodSummary m{methods[i], train(configs[i], [&](const TrainProgress& p) { progress(p); }), 0};
      m.expert_flops_per_token = expert_flops_per_token(m.result);
      runs.push_back(std::move(m));
    }
    report::Table table{{"method", "held-out loss", "max / mean load", "entropy (nats)", "dropped", "I(domain; expert)/H(domain)",
                         "expert MFLOP / token", "ms / step"},
                        {}};
    nlohmann::ordered_json summary = nlohmann::ordered_json::array();
    for (const MethodSummary& m : runs) {
      const EvalMetrics& e = m.result.evals.back();
      table.rows.push_back({m.method, report::format_number(e.task_loss), report::format_number(e.max_over_mean_load),
                            report::format_number(e.entropy), report::format_number(e.dropped_fraction),
                            report::format_number(e.mutual_information),
                            report::format_number(m.expert_flops_per_token / 1e6), report::format_number(m.result.ms_per_step)});
      summary.push_back({{"method", m.method}, {"held_out_task_loss", e.task_loss}, {"max_over_mean_load", e.max_over_mean_load},
                         {"entropy", e.entropy}, {"dropped_fraction", e.dropped_fraction},
                         {"mutual_information", e.mutual_information}, {"expert_flops_per_token", m.expert_flops_per_token},
                         {"ms_per_step", m.result.ms_per_step}});
    }
    report::ReportWriter report(out, base.force);
    report.add("compare.json", summary.dump(1) + "\n");
    for (const MethodSummary& m : runs) report.add("metrics_" + m.method + ".json", metrics_json_text(m.result));
    report.add("index.html", compare_page(runs, table));
    report.commit("index.html");
    for (size_t c = 0; c < table.header.size(); ++c) std::cout << (c ? " | " : "| ") << table.header[c];
    std::cout << " |\n";
    for (const auto& row : table.rows) {
      for (size_t c = 0; c < row.size(); ++c) std::cout << (c ? " | " : "| ") << row[c];
      std::cout << " |\n";
    }
    std::cout << "report: " << (std::filesystem::path(out) / "index.html").string() << "\n";
  } catch (const report::OutputError& e) {
    throw InputError(e.what());
  }
}

}  // namespace

void add_train_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand(
      "train", "Train a small MoE model on synthetic domains and write the routing report (all flags optional)");
  auto o = std::make_shared<TrainOptions>();
  declare_options(*cmd, *o);
  add_choice_option(*cmd, "--method", o->method,
                    {{"topk"}, {"switch"}, {"dense"}, {"expert_choice"}, {"soft_moe"}, {"sinkhorn"}, {"sigmoid_bias"}},
                    "routing method (switch: top-1 with capacity factor 1.0 unless --capacity-factor; sigmoid_bias: "
                    "sigmoid scores with the aux-loss-free selection bias)");
  cmd->callback([o] { run_train(*o); });

  CLI::App* cmp = app.add_subcommand(
      "compare", "Train several routing methods on the same data and seed; one table and one report");
  auto c = std::make_shared<CompareOptions>();
  declare_options(*cmp, c->base);
  add_text_option(*cmp, "--methods", c->methods, "LIST", "a comma-separated list of methods",
                  "methods to compare (default switch,topk,expert_choice,dense,soft_moe,sigmoid_bias)")
      ->capture_default_str();
  cmp->callback([c] { run_compare(*c); });
}

}  // namespace moekit::cli
