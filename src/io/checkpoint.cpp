// Checkpoint directories (checkpoint.h).
#include "moekit/checkpoint.h"

#include <sys/stat.h>

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "io/json.h"
#include "moekit/error.h"

namespace moekit {

namespace {

bool is_file(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  if (!in.good() && !in.eof()) throw_input_error(path, "a readable file", "a read error");
  return text.str();
}

[[noreturn]] void fail(const std::string& where, const std::string& expected, const std::string& actual) {
  throw InputError(detail::concat(where, ": expected ", expected, ", got ", actual));
}

}  // namespace

struct Checkpoint::Impl {
  std::string dir;
  std::vector<SafetensorsFile> files;
  std::map<std::string, const TensorView*> tensors;
  std::string config;
};

Checkpoint::Checkpoint() : impl_(std::make_unique<Impl>()) {}
Checkpoint::Checkpoint(Checkpoint&&) noexcept = default;
Checkpoint& Checkpoint::operator=(Checkpoint&&) noexcept = default;
Checkpoint::~Checkpoint() = default;

const std::string& Checkpoint::dir() const { return impl_->dir; }
size_t Checkpoint::num_files() const { return impl_->files.size(); }
const std::string& Checkpoint::config_json() const { return impl_->config; }

std::vector<std::string> Checkpoint::tensor_names() const {
  std::vector<std::string> names;
  for (const auto& [name, view] : impl_->tensors) names.push_back(name);
  return names;
}

const TensorView* Checkpoint::find(const std::string& name) const {
  const auto it = impl_->tensors.find(name);
  return it == impl_->tensors.end() ? nullptr : it->second;
}

const TensorView& Checkpoint::at(const std::string& name) const {
  if (const TensorView* t = find(name)) return *t;
  fail(impl_->dir, "a tensor '" + name + "'", "none in the checkpoint");
}

Checkpoint Checkpoint::open(const std::string& dir) {
  Checkpoint c;
  Impl& k = *c.impl_;
  k.dir = dir;
  const std::string single = dir + "/model.safetensors", index = dir + "/model.safetensors.index.json";
  if (is_file(dir + "/config.json")) k.config = read_text(dir + "/config.json");
  if (is_file(single)) {
    k.files.push_back(SafetensorsFile::open(single));
    for (const TensorView& t : k.files.back().tensors()) k.tensors[t.name] = &t;
    return c;
  }
  if (!is_file(index)) fail(dir, "model.safetensors or model.safetensors.index.json", "neither");
  // The index is read through the strict JSON layer (nesting bounded, a repeated key rejected by
  // its path); its faults are named "<index>: ..." and its entries "<index>: weight_map.<tensor>".
  const io::ParsedJson parsed = io::parse_json(read_text(index));
  if (parsed.too_deep) fail(index, detail::concat("JSON nested at most ", io::kMaxJsonDepth, " levels"), "deeper nesting");
  if (!parsed.invalid.empty()) fail(index, "well-formed JSON", parsed.invalid);
  const nlohmann::json& j = parsed.root;
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
    fail(index, "an object with a \"weight_map\" object", j.is_object() ? "no weight_map object" : j.type_name());
  }
  if (!parsed.repeated_path.empty()) fail(index + ": " + parsed.repeated_path, "the key at most once", "it repeated");
  const io::Value weight_map = *io::ObjectReader(j, io::Document::kInput, index + ": ").peek("weight_map");
  std::map<std::string, size_t> shard_index;
  std::vector<std::pair<std::string, std::string>> wanted;  // (tensor, shard)
  for (const auto& [tensor, entry] : weight_map.members()) {
    if (!entry.json().is_string()) entry.fail("a shard file name", entry.json().type_name());
    const std::string shard = entry.string();
    if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
      entry.fail("a file name inside the directory", "\"" + shard + "\"");
    }
    wanted.emplace_back(tensor, shard);
    if (!shard_index.count(shard)) {
      const std::string path = dir + "/" + shard;
      if (!is_file(path)) entry.fail("an existing shard", "no file " + path);
      shard_index[shard] = k.files.size();
      k.files.push_back(SafetensorsFile::open(path));
    }
  }
  for (const auto& [name, shard] : wanted) {
    const TensorView* t = k.files[shard_index[shard]].find(name);
    if (t == nullptr) fail(index + ": weight_map." + name, "the tensor in " + shard, "none there");
    k.tensors[name] = t;
  }
  return c;
}

}  // namespace moekit
