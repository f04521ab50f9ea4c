// The presets: the embedded files of src/presets/ read through the strict JSON layer (presets.h).
#include "io/presets.h"

#include <nlohmann/json.hpp>

#include "io/json.h"
#include "io/routing_config.h"
#include "moekit/error.h"

namespace moekit::io {

Preset read_preset(const std::string& name, const std::string& path, const std::string& text) {
  const Json root = parse_object(text, Document::kConfig, path);
  ObjectReader reader(root, Document::kConfig, path + ": ");
  Preset preset;
  preset.name = name;
  const auto required = [&](std::string_view key, const char* what) {
    std::optional<Value> value = reader.take(key);
    if (!value) io::fail(Document::kConfig, reader.path(key), what, "none");
    return *value;
  };
  preset.description = required("description", "a string").string();
  preset.sources = required("sources", "an array of strings").strings();
  if (const auto notes = reader.take("notes")) preset.notes = notes->strings();
  ObjectReader routing(required("routing", "a JSON object of routing keys"));
  read_routing_fields(routing, preset.routing);
  routing.reject_unknown_keys();
  reader.reject_unknown_keys();
  try {
    preset.routing.validate();
  } catch (const ConfigError& error) {
    // validate() names the canonical key; the file and the object it sits in come first.
    throw ConfigError(path + ": routing." + error.what());
  }
  return preset;
}

std::string preset_to_json(const Preset& preset) {
  nlohmann::ordered_json out;
  out["description"] = preset.description;
  out["sources"] = preset.sources;
  if (!preset.notes.empty()) out["notes"] = preset.notes;
  out["routing"] = routing_fields_json(preset.routing);
  return out.dump(2);
}

const std::vector<Preset>& presets() {
  static const std::vector<Preset> kPresets = [] {
    std::vector<Preset> out;
    for (const PresetText& file : embedded_preset_texts()) {
      out.push_back(read_preset(std::string(file.name), std::string(file.path), std::string(file.text)));
    }
    return out;
  }();
  return kPresets;
}

}  // namespace moekit::io
