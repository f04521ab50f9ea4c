// Fuzz target: model_family_from_config (src/model_family.cpp) on arbitrary text, as the
// config.json of a checkpoint. Checks: a bad config.json throws ConfigError and nothing else (no
// crash, no nlohmann or std exception); a family that reads is consistent: its layer config
// JSON reads back to the same layer config, which round-trips through moe_layer_config_to_json,
// every layer is MoE exactly when it has no reason to
// be dense, a dense layer has its MLP width, every layer is found again by its name (a Switch
// encoder block by "encoder.N" too), and a name that is no layer's is an InputError.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "fuzz_common.h"
#include "moekit/error.h"
#include "moekit/layer.h"
#include "moekit/model_family.h"

namespace {

// A broken invariant of a family that read: a finding.
void check(bool ok, const char* what, const std::string& text) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_model_family: %s\n%s\n", what, text.c_str());
    std::abort();
  }
}

void check_family(const moekit::ModelFamily& f) {
  const std::string& json = f.layer_config_json;
  const std::string written = moekit::moe_layer_config_to_json(f.layer);
  std::string reread;
  try {
    check(moekit::moe_layer_config_to_json(moekit::moe_layer_config_from_json(json)) == written,
          "the family's layer config JSON reads as another config", json);
    reread = moekit::moe_layer_config_to_json(moekit::moe_layer_config_from_json(written));
  } catch (const moekit::ConfigError& e) {
    check(false, "the family's layer config does not read back", json + "\n" + written + "\n" + e.what());
  }
  check(reread == written, "the family's layer config changed on a round trip", written + "\n" + reread);
  check(!f.layers.empty(), "a family without layers", json);
  for (const moekit::ModelLayer& l : f.layers) {
    check(l.is_moe == l.reason.empty(), "a layer that is MoE and has a reason to be dense, or neither", l.name);
    check(l.is_moe ? l.dense_d_ff == 0 : l.dense_d_ff >= 0, "a dense width on a MoE layer, or a negative one", l.name);
    check(!l.prefix.empty(), "a layer without a tensor prefix", l.name);
    check(&moekit::find_model_layer(f, l.name) == &l, "find_model_layer does not find a layer by its name", l.name);
    if (l.stack == "encoder") {
      check(&moekit::find_model_layer(f, "encoder." + l.name) == &l, "an encoder block is not found as encoder.N",
            l.name);
    }
  }
  bool rejected = false;
  try {
    (void)moekit::find_model_layer(f, "no such layer");
  } catch (const moekit::InputError&) {
    rejected = true;
  }
  check(rejected, "find_model_layer accepts a name no layer has", json);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    check_family(moekit::model_family_from_config(text));
  } catch (const moekit::ConfigError&) {
    // The expected outcome for a bad config.json.
  } catch (const std::exception& e) {
    moekit::fuzz::unexpected_exception("model_family_from_config", e);
  }
  return 0;
}
