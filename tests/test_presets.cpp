// The presets as data (src/presets/*.json, embedded at build time, read by src/io/presets.cpp):
// every file reads, round-trips and holds a plain routing config; a malformed preset names its
// file and the key's path. The values themselves are checked in test_config.cpp (ConfigPresets)
// and against the peers' own outputs in test_fixtures.cpp.
#include <gtest/gtest.h>

#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "io/presets.h"
#include "moekit/config.h"
#include "moekit/error.h"

namespace moekit {
namespace {

using Json = nlohmann::json;

TEST(PresetFiles, EveryEmbeddedPresetReadsAndRoundTrips) {
  const auto texts = io::embedded_preset_texts();
  ASSERT_EQ(texts.size(), preset_names().size());
  // The routing keys a config file may hold under their canonical (Hugging Face) names.
  const Json canonical = Json::parse(routing_config_to_json(RoutingConfig{}));
  for (std::size_t i = 0; i < texts.size(); ++i) {
    const std::string name(texts[i].name);
    SCOPED_TRACE(name);
    EXPECT_EQ(name, preset_names()[i]);  // documentation order
    EXPECT_EQ(texts[i].path, "src/presets/" + name + ".json");

    const io::Preset preset = io::read_preset(name, std::string(texts[i].path), std::string(texts[i].text));
    EXPECT_EQ(preset.name, name);
    EXPECT_FALSE(preset.description.empty());
    EXPECT_FALSE(preset.sources.empty());
    EXPECT_TRUE(preset.routing.preset.empty());
    EXPECT_NO_THROW(preset.routing.validate());

    // Written back and read again: the same preset, the same text.
    const std::string written = io::preset_to_json(preset);
    const io::Preset again = io::read_preset(name, std::string(texts[i].path), written);
    EXPECT_EQ(io::preset_to_json(again), written);
    EXPECT_EQ(again.description, preset.description);
    EXPECT_EQ(again.sources, preset.sources);
    EXPECT_EQ(again.notes, preset.notes);
    EXPECT_EQ(routing_config_to_json(again.routing), routing_config_to_json(preset.routing));

    // The file's routing object is a plain config: canonical keys only, and a config file holding
    // exactly those keys is the preset (but for the name in `preset`).
    const Json file = Json::parse(texts[i].text);
    for (const auto& [key, value] : file.at("routing").items()) {
      EXPECT_TRUE(canonical.contains(key) && key != "preset") << key << " is not a canonical routing key";
    }
    RoutingConfig from_config = routing_config_from_json(file.at("routing").dump());
    from_config.preset = name;
    EXPECT_EQ(routing_config_to_json(from_config), routing_config_to_json(routing_config_from_preset(name)));
  }
}

TEST(PresetFiles, NamesAreUniqueAndEveryOneIsEmbedded) {
  std::set<std::string> seen;
  for (const auto& text : io::embedded_preset_texts()) EXPECT_TRUE(seen.insert(std::string(text.name)).second);
  EXPECT_EQ(io::presets().size(), seen.size());
}

// The message of the ConfigError that reading `text` as src/presets/megatron.json throws.
std::string preset_error(const std::string& text) {
  try {
    io::read_preset("megatron", "src/presets/megatron.json", text);
  } catch (const ConfigError& error) {
    return error.what();
  }
  ADD_FAILURE() << "accepted: " << text;
  return "";
}

// A valid preset file with `routing` as its routing object.
std::string preset_with(const std::string& routing) {
  return R"({"description": "d", "sources": ["s"], "routing": {)" + routing + "}}";
}

TEST(PresetFiles, AMalformedPresetNamesItsFileAndThePath) {
  const std::string file = "src/presets/megatron.json: ";
  EXPECT_EQ(preset_error(preset_with(R"("num_experts": "8")")),
            file + "routing.num_experts: expected an integer, got string \"8\"");
  EXPECT_EQ(preset_error(preset_with(R"("top_k": 2.5)")),
            file + "routing.top_k (alias of num_experts_per_tok): expected an integer, got number 2.5");
  EXPECT_EQ(preset_error(preset_with(R"("drop_policy": "last")")),
            file + "routing.drop_policy: expected one of position, probs, random, got \"last\"");
  EXPECT_EQ(preset_error(preset_with(R"("num_expert": 8)")),
            file + "routing.num_expert: expected a known configuration key (did you mean \"num_experts\"?), got "
                   "unknown key \"num_expert\"");
  // A preset does not name another preset: `preset` is not a key of its routing object.
  EXPECT_EQ(preset_error(preset_with(R"("preset": "hf-mixtral")")).rfind(file + "routing.preset: expected a known "
                                                                                "configuration key", 0),
            0u);
  EXPECT_EQ(preset_error(preset_with(R"("seed": 1, "seed": 2)")),
            file + "routing.seed: expected the key at most once, got it repeated");
  EXPECT_EQ(preset_error(preset_with(R"("num_experts": 4, "num_experts_per_tok": 5)")),
            file + "routing.num_experts_per_tok: expected <= num_experts (4), got 5");
  EXPECT_EQ(preset_error(R"({"description": "d", "sources": ["s", 3], "routing": {}})"),
            file + "sources[1]: expected a string, got number 3");
  EXPECT_EQ(preset_error(R"({"description": "d", "sources": []})"),
            file + "routing: expected a JSON object of routing keys, got none");
  EXPECT_EQ(preset_error(R"({"description": "d", "sources": [], "routing": [1]})"),
            file + "routing: expected a JSON object, got array [1]");
  EXPECT_EQ(preset_error(R"({"sources": [], "routing": {}})"), file + "description: expected a string, got none");
  EXPECT_EQ(preset_error(R"({"description": "d", "sources": [], "routing": {}, "name": "x"})"),
            file + "name: expected a known configuration key, got unknown key \"name\"");
  EXPECT_EQ(preset_error("[1]"), "src/presets/megatron.json: expected a JSON object, got array [1]");
  EXPECT_EQ(preset_error(R"({"routing": )").rfind("src/presets/megatron.json: expected a JSON object, got invalid "
                                                  "JSON (",
                                                  0),
            0u);
}

}  // namespace
}  // namespace moekit
