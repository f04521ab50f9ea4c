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
  nlohmann::json j;
  const std::string text = read_text(index);
  if (io::json_nesting_depth(text.data(), text.data() + text.size()) > io::kMaxJsonDepth) {
    fail(index, detail::concat("JSON nested at most ", io::kMaxJsonDepth, " levels"), "deeper nesting");
  }
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail(index, "well-formed JSON", e.what());
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
    fail(index, "an object with a \"weight_map\" object", j.is_object() ? "no weight_map object" : j.type_name());
  }
  std::map<std::string, size_t> shard_index;
  std::vector<std::pair<std::string, std::string>> wanted;  // (tensor, shard)
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string()) fail(index + ": weight_map." + it.key(), "a shard file name", it.value().type_name());
    const std::string shard = it.value().get<std::string>();
    if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
      fail(index + ": weight_map." + it.key(), "a file name inside the directory", "\"" + shard + "\"");
    }
    wanted.emplace_back(it.key(), shard);
    if (!shard_index.count(shard)) {
      const std::string path = dir + "/" + shard;
      if (!is_file(path)) fail(index + ": weight_map." + it.key(), "an existing shard", "no file " + path);
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
