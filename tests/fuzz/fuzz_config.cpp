// Fuzz target: the three configuration parsers on arbitrary text, each on the same bytes:
// routing_config_from_json (a routing config), moe_layer_config_from_json (a layer config, layer
// and routing keys in one object) and model_family_from_config (a Hugging Face config.json).
// Checks: a bad document throws ConfigError and nothing else (no crash, no nlohmann or std
// exception such as bad_alloc); a routing config that parses round-trips, i.e. the JSON that
// routing_config_to_json writes reads back and writes the same text again.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "fuzz_common.h"
#include "moekit/config.h"
#include "moekit/error.h"
#include "moekit/layer.h"
#include "moekit/model_family.h"

namespace {

void routing_round_trip(const std::string& text) {
  const std::string written = moekit::routing_config_to_json(moekit::routing_config_from_json(text));
  std::string rewritten;
  try {
    rewritten = moekit::routing_config_to_json(moekit::routing_config_from_json(written));
  } catch (const moekit::ConfigError& e) {
    std::fprintf(stderr, "fuzz_config: routing_config_to_json wrote a config that does not read back: %s\n%s\n",
                 e.what(), written.c_str());
    std::abort();
  }
  if (rewritten != written) {
    std::fprintf(stderr, "fuzz_config: the routing config changed on a round trip:\n%s\n%s\n", written.c_str(),
                 rewritten.c_str());
    std::abort();
  }
}

// Runs one parser; its ConfigError is the expected outcome for a bad document.
template <typename Parse>
void expect_config_error_only(const char* name, Parse parse) {
  try {
    parse();
  } catch (const moekit::ConfigError&) {
  } catch (const std::exception& e) {
    moekit::fuzz::unexpected_exception(name, e);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  expect_config_error_only("routing_config_from_json", [&] { routing_round_trip(text); });
  expect_config_error_only("moe_layer_config_from_json", [&] { (void)moekit::moe_layer_config_from_json(text); });
  expect_config_error_only("model_family_from_config", [&] { (void)moekit::model_family_from_config(text); });
  return 0;
}
