// `moekit presets` and `moekit preset NAME`.
#include <iostream>
#include <memory>
#include <string>

#include "commands.h"
#include "flags.h"
#include "moekit/config.h"

namespace moekit::cli {

void add_preset_commands(CLI::App& app) {
  CLI::App* presets = app.add_subcommand("presets", "List the preset names, one a line");
  presets->callback([] {
    for (const std::string& name : preset_names()) std::cout << name << "\n";
  });

  CLI::App* preset = app.add_subcommand("preset", "Print a preset's full routing configuration as JSON");
  auto name = std::make_shared<std::string>();
  add_text_option(*preset, "NAME", *name, "", "a preset name (moekit presets)", "the preset")->required();
  preset->callback([name] { std::cout << routing_config_to_json(routing_config_from_preset(*name)) << "\n"; });
}

}  // namespace moekit::cli
