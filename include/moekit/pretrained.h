// One MoE layer of a Hugging Face checkpoint, ready to run: its configuration from config.json
// (model_family.h) and its parameters read from the memory-mapped safetensors.
//
// Parameters are borrowed where they lie when the stored dtype is one the kernels read (F32,
// BF16) and the pointer is aligned to it: the expert weights through strided views
// (WeightView), whatever the layout —
//   HF 5.x stacks      experts.gate_up_proj [E, 2·d_ff, d], experts.down_proj [E, d, d_ff];
//   per-expert tensors experts.{e}.{gate,up,down}_proj.weight (Mixtral's w1, w3, w2; Switch's
//                      experts.expert_{e}.{wi,wo}.weight), one pointer per expert;
//   gpt-oss            experts.gate_up_proj [E, d, 2·d_ff] with gate and up interleaved along
//                      the last axis (gate = even, up = odd columns) and experts.down_proj
//                      [E, d_ff, d] (transposed): read with row stride 2 / column strides.
// Packing reads them there when the layer first runs; nothing is copied before. Everything else
// is converted once at load into memory this object owns: F16 weights, block-scaled FP8 E4M3
// weights with their weight_scale_inv and gpt-oss MXFP4 `*_blocks` + `*_scales` (quant.h),
// into the layer's dtype (fp32 exactly; for a bf16 layer straight to bf16, the values its
// packing would round the fp32 ones to: half the memory, the same results), expert by expert;
// fp32 vectors (router, biases, selection bias) stored in BF16/F16 or misaligned; and gpt-oss's
// interleaved gate_up bias (reordered gate first). NaN and Inf in any tensor read are refused.
// sources() says, per parameter, what was done.
//
// Faults (missing tensor, wrong shape or dtype, an unknown layer) are InputErrors naming the
// checkpoint directory and the tensor.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "moekit/checkpoint.h"
#include "moekit/layer.h"
#include "moekit/model_family.h"

namespace moekit {

struct PretrainedOptions {
  DType dtype = DType::kF32;  // the precision the experts compute in (not the stored dtype)
  int num_threads = 1;
};

// How one parameter of the layer was obtained.
struct LoadedParameter {
  std::string parameter;  // moekit's name (MoeTensors): "router_weight", "gate_up", ...
  std::string tensors;    // the checkpoint tensor(s) read, e.g. "model.layers.0.mlp.experts.{0..7}.gate_proj.weight"
  std::string stored;     // stored dtype and layout, e.g. "BF16 [8, 32, 64] per expert"
  std::string how;        // "borrowed", "converted BF16 → fp32", "dequantized FP8 E4M3 → fp32", ...
};

// Where a layer's MLP tensors are named in this checkpoint: layer.prefix, or the original
// Mixtral release's model.layers.N.block_sparse_moe, which transformers still writes.
std::string stored_mlp_prefix(const Checkpoint& checkpoint, const ModelFamily& family, const ModelLayer& layer);

class PretrainedLayer {
 public:
  // `layer` names a block as find_model_layer() does ("3"; Switch "3", "encoder.3",
  // "decoder.1"); a dense layer is an InputError saying why it is dense.
  static PretrainedLayer load(std::shared_ptr<const Checkpoint> checkpoint, const std::string& layer,
                              const PretrainedOptions& options = {});
  static PretrainedLayer load(const std::string& dir, const std::string& layer,
                              const PretrainedOptions& options = {});

  PretrainedLayer(PretrainedLayer&&) noexcept;
  PretrainedLayer& operator=(PretrainedLayer&&) noexcept;
  ~PretrainedLayer();

  const ModelFamily& family() const;
  const ModelLayer& layer() const;
  const MoeLayerConfig& config() const;
  // The views the layer computes with (into the mapping or this object's conversions).
  const MoeParams& params() const;
  const std::vector<LoadedParameter>& sources() const;
  // The layer, borrowing params(); it lives as long as this object.
  MoeLayer& moe();

 private:
  PretrainedLayer();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moekit
