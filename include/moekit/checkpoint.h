// A Hugging Face checkpoint directory: its weights (one model.safetensors, or the shards that
// model.safetensors.index.json maps each tensor to), memory-mapped, and its config.json text.
// As transformers looks for them: model.safetensors first, then the index. The index is checked
// as a whole when opened: well-formed JSON, a "weight_map" object of shard file names (plain
// names inside the directory), every shard present and valid, every mapped tensor in its shard.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "moekit/safetensors.h"

namespace moekit {

class Checkpoint {
 public:
  // Throws InputError naming the directory (and the shard, the tensor) on any fault.
  static Checkpoint open(const std::string& dir);

  Checkpoint(Checkpoint&&) noexcept;
  Checkpoint& operator=(Checkpoint&&) noexcept;
  ~Checkpoint();

  const std::string& dir() const;
  // Every tensor name, sorted.
  std::vector<std::string> tensor_names() const;
  // nullptr when the checkpoint has no tensor of that name.
  const TensorView* find(const std::string& name) const;
  // The tensor, or an InputError naming the directory and the missing tensor.
  const TensorView& at(const std::string& name) const;
  // The shard files opened (one for an unsharded checkpoint).
  size_t num_files() const;
  // config.json's text, or "" when the directory has none.
  const std::string& config_json() const;

 private:
  Checkpoint();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moekit
