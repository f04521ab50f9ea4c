// Model families: the MoE layer of a Hugging Face checkpoint configured from its own
// config.json, as transformers 5.x builds the block for its model_type.
//
// Supported here: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss and
// switch_transformers (an encoder-decoder: its blocks are named "N" or "encoder.N" and
// "decoder.N"). Keys the family does not define are ignored (a config.json describes the whole
// model); the ones it reads are checked (types, ranges, through the layer config), and two
// spellings of one key that disagree are an error, as is a key repeated within one object (the
// text is read by the strict JSON layer). Which keys each family reads and what they become is
// in docs/config.md ("Model families"). Dense (non-MoE) layers are reported as such: DeepSeek's first
// first_k_dense_replace layers, Qwen's mlp_only_layers and layers off decoder_sparse_step,
// Switch's blocks off encoder_sparse_step / decoder_sparse_step.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moekit/layer.h"

namespace moekit {

struct ModelLayer {
  std::string name;    // how a user names it: "3"; Switch: "3" (encoder) or "decoder.3"
  std::string stack;   // "" for decoder-only models; Switch: "encoder" or "decoder"
  int64_t index = 0;   // the block's index in its stack
  bool is_moe = false;
  std::string prefix;  // where its MLP's tensors are named, e.g. "model.layers.3.mlp"
  std::string reason;  // why it is dense, e.g. "first_k_dense_replace = 3"; "" for MoE layers
  int64_t dense_d_ff = 0;  // width of a dense layer's MLP
};

struct ModelFamily {
  std::string model_type;
  // config.json quantization_config: "" (none), "fp8" (block-scaled E4M3, weight_block_size
  // [rows, cols], default 128 × 128) or "mxfp4" (gpt-oss).
  std::string quant_method;
  int64_t fp8_block_rows = 128;
  int64_t fp8_block_cols = 128;
  MoeLayerConfig layer;            // every MoE layer of the model (fp32, 1 thread)
  std::string layer_config_json;   // the same as layer-config JSON keys (moe_layer_config_from_json)
  std::vector<ModelLayer> layers;  // every decoder layer, MoE or dense
};

// Throws ConfigError on an unsupported model_type, a missing or contradictory key.
ModelFamily model_family_from_config(const std::string& config_json);

// The layer a user names ("3", "decoder.1", "encoder.0"), or an InputError naming `name` and
// the valid range.
const ModelLayer& find_model_layer(const ModelFamily& family, const std::string& name);

// The model types model_family_from_config accepts.
const std::vector<std::string>& model_family_names();

}  // namespace moekit
