// A MoE layer in one safetensors file: its configuration and its parameters, quantized expert
// weights included, so that a layer quantized once (from a checkpoint, at load) loads again
// without quantizing, its tensors read where the file's mapping holds them.
//
// File: metadata "moekit_layer_config" (moe_layer_config_to_json), "format" = "moekit-layer",
// and any caller metadata (`moekit forward --save-layer` records "model_type", "layer");
// tensors by the names and shapes of kMoeParamSchema (params.h), F32, except the expert
// weights (gate_up, down, shared_gate_up, shared_down) of a quantized layer, stored as
// "<name>.codes" U8 [experts, rows, quantized_code_bytes(cols)] and "<name>.scales" U8
// [experts, rows, quantized_scale_bytes(cols)] (quant.h), and those of a bf16 layer, BF16.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "moekit/layer.h"

namespace moekit {

// Writes the layer's configuration and parameters to `path`. Expert weights of a quantized
// layer that are not yet quantized are quantized here by the rules of quant.h (the codes the
// layer computes with: outputs are bitwise the same after loading).
void save_layer_file(const MoeLayer& layer, const std::string& path,
                     const std::map<std::string, std::string>& metadata = {});

class LayerFile {
 public:
  // Maps and validates `path` (InputError naming the file and the tensor on any fault); the
  // layer borrows every tensor from the mapping. num_threads > 0 replaces the saved count.
  static LayerFile open(const std::string& path, int num_threads = 0);

  LayerFile(LayerFile&&) noexcept;
  LayerFile& operator=(LayerFile&&) noexcept;
  ~LayerFile();

  const MoeLayerConfig& config() const;
  const std::map<std::string, std::string>& metadata() const;
  MoeLayer& moe();  // lives as long as this object

 private:
  LayerFile();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moekit
