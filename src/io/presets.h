// The presets: one JSON file per peer system under src/presets/, embedded into the library when
// it is built (src/presets/presets.cmake) and read through the strict JSON layer like any config.
//
// A preset file is one object:
//   "description"  string             what the preset reproduces
//   "sources"      array of strings   the peer's files (and symbols) its values come from
//   "notes"        array of strings   optional: why a value is what it is
//   "routing"      object             routing keys, exactly as a config file holds them (no `preset`)
// Keys not set keep the RoutingConfig defaults. Every fault names the file and the key's path
// ("src/presets/megatron.json: routing.top_k: expected an integer, got string \"2\"").
#pragma once

#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moekit/config.h"

namespace moekit::io {

// One embedded preset file (generated at build time from src/presets/).
struct PresetText {
  std::string_view name;  // the file's stem, e.g. "megatron"
  std::string_view path;  // where it lives in the source tree, e.g. "src/presets/megatron.json"
  std::string_view text;  // its bytes
};

// Every embedded preset file, in documentation order (the order of src/presets/presets.cmake).
std::span<const PresetText> embedded_preset_texts();

struct Preset {
  std::string name;
  std::string description;
  std::vector<std::string> sources;
  std::vector<std::string> notes;
  RoutingConfig routing;  // validated; `preset` is left empty
};

// Reads one preset file's text; ConfigError naming `path` and the key on any fault, including a
// routing config that does not validate.
Preset read_preset(const std::string& name, const std::string& path, const std::string& text);

// The preset file as read_preset reads it back: every routing field under its canonical key.
std::string preset_to_json(const Preset& preset);

// Every embedded preset, read once (on first use), in documentation order.
const std::vector<Preset>& presets();

}  // namespace moekit::io
