// Fuzz target: the preset reader (src/io/presets.cpp) on arbitrary text, as if it were one of
// the files under src/presets/. Checks: a bad preset throws ConfigError and nothing else (no
// crash, no nlohmann or std exception); a preset that reads round-trips, i.e. the text
// preset_to_json writes reads back to the same preset and writes the same text again; its
// routing config is valid and is what a config file holding the same routing keys gives.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "fuzz_common.h"
#include "io/presets.h"
#include "moekit/config.h"
#include "moekit/error.h"

namespace {

constexpr const char* kName = "fuzz";
constexpr const char* kPath = "src/presets/fuzz.json";

[[noreturn]] void finding(const char* what, const std::string& first, const std::string& second) {
  std::fprintf(stderr, "fuzz_presets: %s:\n%s\n%s\n", what, first.c_str(), second.c_str());
  std::abort();
}

void round_trip(const std::string& text) {
  const moekit::io::Preset preset = moekit::io::read_preset(kName, kPath, text);
  const std::string written = moekit::io::preset_to_json(preset);
  moekit::io::Preset again;
  try {
    again = moekit::io::read_preset(kName, kPath, written);
  } catch (const moekit::ConfigError& e) {
    finding("preset_to_json wrote a preset that does not read back", e.what(), written);
  }
  const std::string rewritten = moekit::io::preset_to_json(again);
  if (rewritten != written) finding("the preset changed on a round trip", written, rewritten);
  if (again.description != preset.description || again.sources != preset.sources || again.notes != preset.notes) {
    finding("the preset's description, sources or notes changed on a round trip", written, rewritten);
  }
  const std::string routing = moekit::routing_config_to_json(preset.routing);
  std::string as_config;
  try {
    preset.routing.validate();
    as_config = moekit::routing_config_to_json(moekit::routing_config_from_json(routing));
  } catch (const moekit::ConfigError& e) {
    finding("a preset's routing config is not a valid config", e.what(), routing);
  }
  if (as_config != routing) finding("a preset's routing config reads differently as a config", routing, as_config);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    round_trip(text);
  } catch (const moekit::ConfigError&) {
    // The expected outcome for a bad preset.
  } catch (const std::exception& e) {
    moekit::fuzz::unexpected_exception("read_preset", e);
  }
  return 0;
}
