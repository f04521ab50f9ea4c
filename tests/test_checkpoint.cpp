// Checkpoint directories: a sharded checkpoint written by huggingface_hub (the code
// save_pretrained uses), a single-file one, and one test per class of broken index.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "moekit/checkpoint.h"
#include "moekit/error.h"

namespace moekit {
namespace {

std::string hex_of(const TensorView& t) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  const auto* p = static_cast<const uint8_t*>(t.data);
  for (int64_t i = 0; i < t.bytes; ++i) {
    out += digits[p[i] >> 4];
    out += digits[p[i] & 15];
  }
  return out;
}

std::string make_dir(const std::string& name) {
  const std::string dir = std::string(MOEKIT_BINARY_DIR) + "/checkpoint_test_" + name;
  mkdir(dir.c_str(), 0755);
  return dir;
}

void write_text(const std::string& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

TEST(Checkpoint, ReadsAShardedCheckpointAsHuggingFaceWroteIt) {
  const std::string fixtures = std::string(MOEKIT_FIXTURE_DIR) + "/safetensors";
  std::ifstream in(fixtures + "/sharded.json");
  const nlohmann::json expected = nlohmann::json::parse(in);
  const Checkpoint c = Checkpoint::open(fixtures + "/sharded");
  EXPECT_EQ(c.num_files(), 3u);
  EXPECT_EQ(c.tensor_names().size(), expected["tensors"].size());
  for (const auto& [name, e] : expected["tensors"].items()) EXPECT_EQ(hex_of(c.at(name)), e["hex"].get<std::string>()) << name;
  EXPECT_EQ(c.at("model.layers.0.mlp.gate.weight").dtype, TensorDType::kBF16);
  EXPECT_EQ(c.find("model.layers.9.mlp.gate.weight"), nullptr);
  EXPECT_TRUE(c.config_json().empty());
}

TEST(Checkpoint, ReadsASingleFileAndItsConfig) {
  const std::string dir = make_dir("single");
  const std::vector<float> w = {1, 2, 3, 4};
  write_safetensors(dir + "/model.safetensors", {{"a.weight", TensorDType::kF32, {2, 2}, w.data()}});
  write_text(dir + "/config.json", R"({"model_type": "mixtral"})");
  const Checkpoint c = Checkpoint::open(dir);
  EXPECT_EQ(c.num_files(), 1u);
  EXPECT_EQ(c.tensor_names(), std::vector<std::string>{"a.weight"});
  EXPECT_EQ(c.config_json(), R"({"model_type": "mixtral"})");
  try {
    c.at("b.weight");
    FAIL();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("a tensor 'b.weight'"), std::string::npos) << e.what();
  }
}

void expect_fault(const std::string& name, const std::string& index, const std::string& needle) {
  const std::string dir = make_dir(name);
  std::remove((dir + "/model.safetensors").c_str());
  const std::vector<float> w = {1, 2};
  write_safetensors(dir + "/shard-1.safetensors", {{"a", TensorDType::kF32, {2}, w.data()}});
  if (!index.empty()) write_text(dir + "/model.safetensors.index.json", index);
  try {
    Checkpoint::open(dir);
    ADD_FAILURE() << name << ": accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << name << ": " << e.what();
  }
}

TEST(Checkpoint, EveryBrokenIndexIsAnErrorNamingIt) {
  expect_fault("none", "", "expected model.safetensors or model.safetensors.index.json, got neither");
  expect_fault("json", "{\"weight_map\": ", "expected well-formed JSON");
  expect_fault("nomap", R"({"metadata": {}})", "expected an object with a \"weight_map\" object");
  expect_fault("missing", R"({"weight_map": {"a": "shard-2.safetensors"}})", "expected an existing shard");
  expect_fault("absent", R"({"weight_map": {"b": "shard-1.safetensors"}})", "weight_map.b: expected the tensor in shard-1");
  expect_fault("escape", R"({"weight_map": {"a": "../shard-1.safetensors"}})", "expected a file name inside the directory");
  expect_fault("type", R"({"weight_map": {"a": 3}})", "weight_map.a: expected a shard file name");
}

TEST(Checkpoint, ARepeatedKeyInTheIndexIsAnError) {
  // The index is read through the strict JSON layer: a tensor listed twice is ambiguous.
  expect_fault("repeated", R"({"weight_map": {"a": "shard-1.safetensors", "a": "shard-1.safetensors"}})",
               "model.safetensors.index.json: weight_map.a: expected the key at most once, got it repeated");
}

}  // namespace
}  // namespace moekit
