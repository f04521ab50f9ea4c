// `moekit inspect --model DIR`: every decoder layer of a checkpoint (MoE or dense, and why),
// the MoE layer's configuration as moekit derives it from config.json, and per layer the MLP's
// stored tensors, their dtypes and bytes; with --layer N, how that layer's parameters load.
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>

#include "commands.h"
#include "flags.h"
#include "moekit/checkpoint.h"
#include "moekit/error.h"
#include "moekit/model_family.h"
#include "moekit/pretrained.h"

namespace moekit::cli {

namespace {

std::string megabytes(int64_t bytes) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(bytes < (int64_t{1} << 20) ? 3 : 1) << double(bytes) / double(1 << 20) << " MiB";
  return out.str();
}

void inspect(const std::string& dir) {
  const Checkpoint checkpoint = Checkpoint::open(dir);
  if (checkpoint.config_json().empty()) throw_input_error(dir + "/config.json", "the model's configuration", "no such file");
  const ModelFamily family = model_family_from_config(checkpoint.config_json());
  const MoeLayerConfig& c = family.layer;
  int64_t moe = 0;
  for (const ModelLayer& l : family.layers) moe += l.is_moe ? 1 : 0;
  const std::vector<std::string> names = checkpoint.tensor_names();
  int64_t total = 0;
  for (const std::string& n : names) total += checkpoint.at(n).bytes;
  std::cout << "model " << dir << ": model_type " << family.model_type << ", " << family.layers.size() << " layers ("
            << moe << " MoE, " << family.layers.size() - static_cast<size_t>(moe) << " dense), " << names.size()
            << " tensors in " << checkpoint.num_files() << " file(s), " << megabytes(total) << "\n";
  std::cout << "MoE layer: d_model " << c.d_model << ", experts " << c.num_experts() << ", top-k "
            << c.routing.num_experts_per_tok << ", expert d_ff " << c.d_ff << ", activation "
            << activation_name(c.activation);
  if (c.has_shared()) {
    std::cout << ", shared d_ff " << c.effective_shared_d_ff() << (c.shared_expert_gate ? " behind a sigmoid gate" : "");
  }
  std::cout << "\n  routing: " << c.routing.preset << " (" << family.layer_config_json << ")\n";
  std::cout << "layer      kind   tensors  dtypes        bytes        note\n";
  for (const ModelLayer& l : family.layers) {
    const std::string prefix = stored_mlp_prefix(checkpoint, family, l) + ".";
    int64_t count = 0, bytes = 0;
    std::set<std::string> dtypes;
    for (const std::string& n : names) {
      if (n.rfind(prefix, 0) != 0) continue;
      const TensorView& t = checkpoint.at(n);
      ++count;
      bytes += t.bytes;
      dtypes.insert(tensor_dtype_name(t.dtype));
    }
    std::string dt;
    for (const std::string& d : dtypes) dt += (dt.empty() ? "" : ",") + d;
    std::string note = l.reason;
    if (!l.is_moe && l.dense_d_ff > 0) note += ", MLP d_ff " + std::to_string(l.dense_d_ff);
    if (count == 0) note += std::string(note.empty() ? "" : "; ") + "no tensors under " + prefix;
    std::cout << std::left << std::setw(11) << l.name << std::setw(7) << (l.is_moe ? "moe" : "dense") << std::setw(9)
              << count << std::setw(14) << (dt.empty() ? "-" : dt) << std::setw(13) << megabytes(bytes) << note << "\n";
  }
}

// One layer as moekit loads it: per parameter the tensors read, their stored dtype and layout
// and whether they are borrowed in place or converted (pretrained.h).
void inspect_layer(const std::string& dir, const std::string& name) {
  const PretrainedLayer layer = PretrainedLayer::load(dir, name);
  std::cout << "layer " << layer.layer().name << " (" << layer.layer().prefix << "):\n";
  std::cout << std::left << std::setw(22) << "parameter" << std::setw(40) << "stored" << "how  [tensors]\n";
  for (const LoadedParameter& p : layer.sources()) {
    std::cout << std::left << std::setw(22) << p.parameter << std::setw(40) << p.stored << p.how << "  [" << p.tensors
              << "]\n";
  }
}

}  // namespace

void add_inspect_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("inspect", "List a checkpoint's layers (MoE or dense), its MoE configuration "
                                                 "and the stored tensors' dtypes and bytes");
  auto dir = std::make_shared<std::string>();
  add_text_option(*cmd, "--model", *dir, "DIR", "a checkpoint directory (config.json and model.safetensors or "
                                                "model.safetensors.index.json)", "the checkpoint")->required();
  auto layer = std::make_shared<std::string>();
  add_text_option(*cmd, "--layer", *layer, "N", "a layer index (Switch: N, encoder.N or decoder.N)",
                  "also show how this MoE layer's parameters load: borrowed where they lie or converted");
  cmd->callback([dir, layer] {
    inspect(*dir);
    if (!layer->empty()) inspect_layer(*dir, *layer);
  });
}

}  // namespace moekit::cli
