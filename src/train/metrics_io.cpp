// metrics.json and the per-curve CSV files of a training run (train.h).
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

#include "moekit/train.h"

namespace moekit {
namespace {

using nlohmann::json;

json layer_json(const MoeLayerConfig& c) {
  json j = json::parse(routing_config_to_json(c.routing));
  j["d_model"] = c.d_model;
  j["d_ff"] = c.d_ff;
  j["activation"] = activation_name(c.activation);
  j["router_bias"] = c.router_bias;
  j["expert_bias"] = c.expert_bias;
  j["num_shared_experts"] = c.num_shared_experts;
  j["shared_d_ff"] = c.shared_d_ff;
  j["shared_expert_gate"] = c.shared_expert_gate;
  j["selection_bias"] = c.selection_bias;
  j["dtype"] = dtype_name(c.dtype);
  j["num_threads"] = c.num_threads;
  return j;
}

json config_json(const TrainConfig& c) {
  return json{{"layer", layer_json(c.layer)},
              {"data",
               {{"num_domains", c.data.num_domains},
                {"centre_norm", c.data.centre_norm},
                {"noise_std", c.data.noise_std},
                {"eval_tokens", c.data.eval_tokens},
                {"shared_target", c.data.shared_target}}},
              {"optimizer", c.optimizer == Optimizer::kAdam ? "adam" : "sgd"},
              {"learning_rate", c.learning_rate},
              {"adam_beta1", c.adam_beta1},
              {"adam_beta2", c.adam_beta2},
              {"adam_eps", c.adam_eps},
              {"steps", c.steps},
              {"batch_size", c.batch_size},
              {"sequence_length", c.sequence_length},
              {"eval_every", c.eval_every},
              {"seed", c.seed}};
}

template <typename T>
json matrix_json(const Matrix<T>& m) {
  json rows = json::array();
  for (int64_t r = 0; r < m.rows; ++r) rows.push_back(std::vector<T>(m.row(r), m.row(r) + m.cols));
  return rows;
}

json steps_json(const std::vector<StepMetrics>& steps) {
  json j = json::object();
  auto column = [&](const char* name, auto get) {
    json c = json::array();
    for (const StepMetrics& m : steps) c.push_back(get(m));
    j[name] = std::move(c);
  };
  column("step", [](const StepMetrics& m) { return m.step; });
  column("task_loss", [](const StepMetrics& m) { return m.task_loss; });
  column("aux_loss", [](const StepMetrics& m) { return m.aux_loss; });
  column("z_loss", [](const StepMetrics& m) { return m.z_loss; });
  column("entropy", [](const StepMetrics& m) { return m.entropy; });
  column("entropy_normalized", [](const StepMetrics& m) { return m.entropy_normalized; });
  column("dropped_fraction", [](const StepMetrics& m) { return m.dropped_fraction; });
  column("max_over_mean_load", [](const StepMetrics& m) { return m.max_over_mean_load; });
  column("max_abs_logit", [](const StepMetrics& m) { return m.max_abs_logit; });
  column("tokens_per_second", [](const StepMetrics& m) { return m.tokens_per_second; });
  column("tokens_per_expert", [](const StepMetrics& m) { return m.tokens_per_expert; });
  return j;
}

json evals_json(const std::vector<EvalMetrics>& evals) {
  json a = json::array();
  for (const EvalMetrics& m : evals) {
    a.push_back({{"step", m.step},
                 {"task_loss", m.task_loss},
                 {"entropy", m.entropy},
                 {"dropped_fraction", m.dropped_fraction},
                 {"max_over_mean_load", m.max_over_mean_load},
                 {"mutual_information", m.mutual_information},
                 {"domain_expert", m.domain_expert},
                 {"top_expert", m.top_expert},
                 {"top_expert_share", m.top_expert_share}});
  }
  return a;
}

// Writes `text` to path.tmp, then renames it over `path`: a failed write leaves no file that
// looks complete.
void write_file(const std::filesystem::path& path, const std::string& text) {
  const std::filesystem::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error("cannot write " + tmp.string());
    out << text;
    if (!out.flush()) throw std::runtime_error("cannot write " + tmp.string());
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) throw std::runtime_error("cannot rename " + tmp.string() + " to " + path.string() + ": " + ec.message());
}

std::string steps_csv(const std::vector<StepMetrics>& steps) {
  std::ostringstream o;
  o.precision(9);
  o << "step,task_loss,aux_loss,z_loss,entropy,entropy_normalized,dropped_fraction,"
       "max_over_mean_load,max_abs_logit,tokens_per_second\n";
  for (const StepMetrics& m : steps) {
    o << m.step << ',' << m.task_loss << ',' << m.aux_loss << ',' << m.z_loss << ',' << m.entropy << ','
      << m.entropy_normalized << ',' << m.dropped_fraction << ',' << m.max_over_mean_load << ','
      << m.max_abs_logit << ',' << m.tokens_per_second << '\n';
  }
  return o.str();
}

std::string load_csv(const std::vector<StepMetrics>& steps) {
  std::ostringstream o;
  o << "step";
  if (!steps.empty())
    for (size_t e = 0; e < steps.front().tokens_per_expert.size(); ++e) o << ",expert_" << e;
  o << '\n';
  for (const StepMetrics& m : steps) {
    o << m.step;
    for (int64_t n : m.tokens_per_expert) o << ',' << n;
    o << '\n';
  }
  return o.str();
}

std::string eval_csv(const std::vector<EvalMetrics>& evals) {
  std::ostringstream o;
  o.precision(9);
  o << "step,task_loss,entropy,dropped_fraction,max_over_mean_load,mutual_information\n";
  for (const EvalMetrics& m : evals) {
    o << m.step << ',' << m.task_loss << ',' << m.entropy << ',' << m.dropped_fraction << ','
      << m.max_over_mean_load << ',' << m.mutual_information << '\n';
  }
  return o.str();
}

// The final specialisation matrix, one row per domain.
std::string specialisation_csv(const EvalMetrics& m) {
  std::ostringstream o;
  o << "domain";
  if (!m.domain_expert.empty())
    for (size_t e = 0; e < m.domain_expert.front().size(); ++e) o << ",expert_" << e;
  o << '\n';
  for (size_t k = 0; k < m.domain_expert.size(); ++k) {
    o << k;
    for (int64_t n : m.domain_expert[k]) o << ',' << n;
    o << '\n';
  }
  return o.str();
}

// Cosine of each router row to each domain centre.
std::string prototypes_csv(const Matrix<double>& cosine) {
  std::ostringstream o;
  o.precision(9);
  o << "router_row";
  for (int64_t k = 0; k < cosine.cols; ++k) o << ",domain_" << k;
  o << '\n';
  for (int64_t e = 0; e < cosine.rows; ++e) {
    o << e;
    for (int64_t k = 0; k < cosine.cols; ++k) o << ',' << cosine(e, k);
    o << '\n';
  }
  return o.str();
}

}  // namespace

std::string metrics_json_text(const TrainResult& result) {
  const json j{{"config", config_json(result.config)},
               {"steps", steps_json(result.steps)},
               {"evals", evals_json(result.evals)},
               {"router_weight", matrix_json(result.router_weight)},
               {"domain_centres", matrix_json(result.domain_centres)},
               {"prototype_cosine", matrix_json(result.prototype_cosine)},
               {"final_load", result.final_load},
               {"seconds", result.seconds},
               {"ms_per_step", result.ms_per_step}};
  return j.dump(1) + "\n";
}

std::vector<std::pair<std::string, std::string>> metrics_csv_files(const TrainResult& result) {
  std::vector<std::pair<std::string, std::string>> files = {
      {"steps.csv", steps_csv(result.steps)},
      {"load.csv", load_csv(result.steps)},
      {"eval.csv", eval_csv(result.evals)},
  };
  if (!result.evals.empty()) files.emplace_back("specialisation.csv", specialisation_csv(result.evals.back()));
  files.emplace_back("prototypes.csv", prototypes_csv(result.prototype_cosine));
  return files;
}

void write_metrics_json(const TrainResult& result, const std::string& path) {
  write_file(path, metrics_json_text(result));
}

void write_metrics_csv(const TrainResult& result, const std::string& directory) {
  const std::filesystem::path dir(directory);
  for (const auto& [name, text] : metrics_csv_files(result)) write_file(dir / name, text);
}

}  // namespace moekit
