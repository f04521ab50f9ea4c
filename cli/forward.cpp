// `moekit forward --model DIR --layer N --input IN.safetensors --output OUT.safetensors
// [--dtype fp32|bf16 | --quantize int8|int4|mxfp4] [--save-layer FILE] [--threads T]`: one MoE
// layer of a checkpoint (pretrained.h) on the hidden states of IN; OUT holds what the layer
// computed and how it routed. --quantize runs the experts quantized (quant.h); --save-layer
// writes the layer as loaded (quantized codes included, layer_file.h), and `--model FILE` runs
// such a file again without --layer and without quantizing again.
//
//   IN:  hidden_states [tokens, d_model] (one sequence) or [batch, seq, d_model] (each row a
//        sequence: capacity and losses per sequence where the family's scopes say so);
//        F32, BF16 or F16 (widened to fp32 exactly).
//   OUT: output (the shape of hidden_states, F32), router_logits [tokens, experts] F32,
//        topk_indices I64 and topk_weights F32 [tokens, k] (choice order; a selection dropped
//        by capacity keeps its index and has weight 0), topk_kept U8 [tokens, k]; metadata:
//        "stats" (the routing statistics as `moekit route` prints them), "aux_loss",
//        "z_loss", "layer", "model_type", "dtype".
#include <algorithm>
#include <filesystem>
#include <optional>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "flags.h"
#include "moekit/error.h"
#include "moekit/layer_file.h"
#include "moekit/pretrained.h"
#include "moekit/quant.h"
#include "moekit/safetensors.h"
#include "moekit/stats.h"
#include "route_io.h"

namespace moekit::cli {

namespace {

struct ForwardArgs {
  std::string model, layer, input, output, dtype = "fp32", quantize, save_layer;
  int threads = 1;
};

// hidden_states of IN as fp32 [tokens, d_model], with the sequence length (0: one sequence).
Matrix<float> read_hidden_states(const SafetensorsFile& in, int64_t d_model, int64_t* sequence_length) {
  const TensorView& t = in.at("hidden_states");
  const std::string name = in.path() + ": hidden_states";
  const size_t rank = t.shape.size();
  if ((rank != 2 && rank != 3) || t.shape.back() != d_model) {
    throw_input_error(name + " shape", detail::concat("[tokens, ", d_model, "] or [batch, seq, ", d_model, "]"),
                      shape_text(t.shape));
  }
  const int64_t tokens = t.num_elements() / d_model;
  if (tokens == 0) throw_input_error(name + " shape", "at least one token", shape_text(t.shape));
  *sequence_length = rank == 3 ? t.shape[1] : 0;
  Matrix<float> x(tokens, d_model);
  const auto* bytes = static_cast<const uint8_t*>(t.data);
  for (int64_t i = 0; i < tokens * d_model; ++i) {
    if (t.dtype == TensorDType::kF32) {
      std::memcpy(&x.values[static_cast<size_t>(i)], bytes + 4 * i, 4);
    } else if (t.dtype == TensorDType::kBF16 || t.dtype == TensorDType::kF16) {
      uint16_t b;
      std::memcpy(&b, bytes + 2 * i, 2);
      if (t.dtype == TensorDType::kF16) {
        x.values[static_cast<size_t>(i)] = fp16_to_float(b);
      } else {
        const uint32_t u = uint32_t{b} << 16;
        std::memcpy(&x.values[static_cast<size_t>(i)], &u, 4);
      }
    } else {
      throw_input_error(name + " dtype", "F32, BF16 or F16", tensor_dtype_name(t.dtype));
    }
  }
  return x;  // the layer checks it for NaN/Inf, naming the element
}

// The layer to run: one of a checkpoint directory, or a layer file.
struct LoadedLayer {
  std::optional<PretrainedLayer> pretrained;
  std::optional<LayerFile> file;
  std::string name, model_type;
  MoeLayer& moe() { return pretrained ? pretrained->moe() : file->moe(); }
};

LoadedLayer load_layer(const ForwardArgs& a) {
  LoadedLayer l;
  if (std::filesystem::is_regular_file(a.model)) {
    if (!a.layer.empty()) reject("--layer", "not given with a layer file as --model (it holds one layer)", a.layer);
    if (!a.quantize.empty()) reject("--quantize", "not given with a layer file (its dtype is saved)", a.quantize);
    l.file.emplace(LayerFile::open(a.model, a.threads));
    const auto& meta = l.file->metadata();
    l.name = meta.count("layer") ? meta.at("layer") : "";
    l.model_type = meta.count("model_type") ? meta.at("model_type") : "";
    return l;
  }
  if (a.layer.empty()) reject("--layer", "a layer index with a checkpoint directory as --model", "none");
  PretrainedOptions options;
  options.dtype = a.dtype == "bf16" ? DType::kBF16 : DType::kF32;
  for (const DType q : {DType::kInt8, DType::kInt4, DType::kMxfp4})
    if (a.quantize == dtype_name(q)) options.dtype = q;
  options.num_threads = a.threads;
  l.pretrained.emplace(PretrainedLayer::load(a.model, a.layer, options));
  l.name = l.pretrained->layer().name;
  l.model_type = l.pretrained->family().model_type;
  return l;
}

void run_forward(const ForwardArgs& a) {
  if (!a.quantize.empty() && a.dtype != "fp32") reject("--dtype", "not given with --quantize", a.dtype);
  LoadedLayer layer = load_layer(a);
  const MoeLayerConfig& c = layer.moe().config();
  if (!a.save_layer.empty()) {
    save_layer_file(layer.moe(), a.save_layer, {{"model_type", layer.model_type}, {"layer", layer.name}});
  }
  const SafetensorsFile in = SafetensorsFile::open(a.input);
  int64_t sequence_length = 0;
  const Matrix<float> x = read_hidden_states(in, c.d_model, &sequence_length);
  RoutingOptions routing;
  routing.sequence_length = sequence_length;
  const MoeForwardResult r = layer.moe().forward(x.cview(), routing);

  const RoutingPlan& plan = r.routing.plan;
  const int64_t tokens = x.rows;
  int64_t k = 0;
  for (int64_t t = 0; t < tokens; ++t) k = std::max(k, plan.token_offsets[t + 1] - plan.token_offsets[t]);
  // Tokens with fewer selections (expert choice) are padded with index −1, weight 0, kept 0.
  std::vector<int64_t> indices(static_cast<size_t>(tokens * k), -1);
  std::vector<float> weights(static_cast<size_t>(tokens * k), 0.0f);
  std::vector<uint8_t> kept(static_cast<size_t>(tokens * k), 0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t s = plan.token_offsets[t]; s < plan.token_offsets[t + 1]; ++s) {
      const size_t at = static_cast<size_t>(t * k + (s - plan.token_offsets[t]));
      indices[at] = plan.token_experts[static_cast<size_t>(s)];
      weights[at] = plan.token_weights[static_cast<size_t>(s)];
      kept[at] = plan.token_kept[static_cast<size_t>(s)];
    }
  }
  const TensorView& hs = in.at("hidden_states");
  const Matrix<float>& logits = r.routing.saved.clean_logits;
  std::vector<TensorToWrite> out = {
      {"output", TensorDType::kF32, hs.shape, r.output.values.data()},
      {"router_logits", TensorDType::kF32, {logits.rows, logits.cols}, logits.values.data()},
      {"topk_indices", TensorDType::kI64, {tokens, k}, indices.data()},
      {"topk_weights", TensorDType::kF32, {tokens, k}, weights.data()},
      {"topk_kept", TensorDType::kU8, {tokens, k}, kept.data()},
  };
  const std::map<std::string, std::string> metadata = {
      {"stats", routing_stats_to_json(r.routing.stats)},
      {"aux_loss", detail::concat(r.routing.losses.aux_loss)},
      {"z_loss", detail::concat(r.routing.losses.z_loss)},
      {"layer", layer.name},
      {"model_type", layer.model_type},
      {"dtype", dtype_name(c.dtype)},
  };
  write_safetensors(a.output, out, metadata);
  const RoutingStats& s = r.routing.stats;
  std::cerr << "moekit forward: " << layer.model_type << " layer " << layer.name << ", " << tokens
            << " tokens" << (sequence_length ? detail::concat(" (", tokens / sequence_length, " sequences)") : "")
            << ", " << c.num_experts() << " experts, top-" << c.routing.num_experts_per_tok << ", " << s.num_dropped
            << " dropped, " << dtype_name(c.dtype) << " → " << a.output
            << (a.save_layer.empty() ? "" : ", layer saved to " + a.save_layer) << "\n";
}

}  // namespace

void add_forward_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("forward", "Run one MoE layer of a checkpoint on hidden states from a "
                                                 "safetensors file; write its output and routing");
  auto a = std::make_shared<ForwardArgs>();
  add_text_option(*cmd, "--model", a->model, "DIR", "a checkpoint directory or a layer file",
                  "the checkpoint (config.json and model.safetensors or its index), or a layer file "
                  "written by --save-layer")->required();
  add_text_option(*cmd, "--layer", a->layer, "N", "a layer index (Switch: N, encoder.N or decoder.N)",
                  "the MoE layer of a checkpoint (moekit inspect --model DIR lists them)");
  add_text_option(*cmd, "--input", a->input, "IN", "a safetensors file",
                  "hidden_states [tokens, d_model] or [batch, seq, d_model]")->required();
  add_text_option(*cmd, "--output", a->output, "OUT", "a path", "where to write output, router_logits, "
                                                                "topk_indices, topk_weights, topk_kept")->required();
  add_choice_option(*cmd, "--dtype", a->dtype, {{"fp32", "float32"}, {"bf16", "bfloat16"}},
                    "precision of the expert computation (default fp32; not the stored dtype)");
  add_choice_option(*cmd, "--quantize", a->quantize, {{"int8"}, {"int4"}, {"mxfp4"}},
                    "run the experts with quantized weights (inference; quantized as the layer loads)");
  add_text_option(*cmd, "--save-layer", a->save_layer, "FILE", "a path",
                  "also write the layer as loaded (quantized codes included) to FILE, for --model FILE");
  add_int_option(*cmd, "--threads", a->threads, 1, 1024, "threads (results do not depend on it)");
  cmd->callback([a] { run_forward(*a); });
}

}  // namespace moekit::cli
