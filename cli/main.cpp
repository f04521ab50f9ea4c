// The moekit command line: `moekit route` inspects routing decisions from JSON documents.
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "commands.h"
#include "moekit/config.h"
#include "moekit/error.h"
#include "route_io.h"

namespace {

constexpr const char* kUsage =
    "usage:\n"
    "  moekit route --config CONFIG.json --input INPUT.json [--output OUT.json]\n"
    "  moekit bench --tokens T --d-model D --d-ff F --experts E --top-k K\n"
    "               [--dtype fp32|bf16] [--threads N] [--backward] [--json]\n"
    "               [--repeats R] [--warmup W] [--preset NAME] [--seed S] [--memory-read]\n"
    "  moekit presets                 list the preset names\n"
    "  moekit preset NAME             print a preset's full configuration as JSON\n"
    "  moekit --help\n";

std::string read_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw moekit::InputError(std::string(what) + ": cannot open file '" + path + "'");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

int route_command(const std::vector<std::string>& args) {
  std::string config_path, input_path, output_path;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&](const char* name) -> std::string {
      if (i + 1 >= args.size()) throw moekit::InputError(std::string(name) + ": expected a path, got nothing");
      return args[++i];
    };
    if (a == "--config") config_path = value("--config");
    else if (a == "--input") input_path = value("--input");
    else if (a == "--output") output_path = value("--output");
    else throw moekit::InputError("route: unknown argument '" + a + "'");
  }
  if (config_path.empty()) throw moekit::InputError("--config: expected a path, got nothing");
  if (input_path.empty()) throw moekit::InputError("--input: expected a path, got nothing");
  const std::string out = moekit::cli::route_json(read_file(config_path, "--config"),
                                             read_file(input_path, "--input"));
  if (output_path.empty()) {
    std::cout << out << "\n";
  } else {
    std::ofstream file(output_path, std::ios::binary);
    if (!file) throw moekit::InputError("--output: cannot write file '" + output_path + "'");
    file << out << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    std::cout << kUsage;
    return args.empty() ? 2 : 0;
  }
  try {
    const std::string command = args[0];
    const std::vector<std::string> rest(args.begin() + 1, args.end());
    if (command == "route") return route_command(rest);
    if (command == "bench") return moekit::cli::bench_command(rest);
    if (command == "presets") {
      for (const std::string& name : moekit::preset_names()) std::cout << name << "\n";
      return 0;
    }
    if (command == "preset" && rest.size() == 1) {
      std::cout << moekit::routing_config_to_json(moekit::routing_config_from_preset(rest[0])) << "\n";
      return 0;
    }
    std::cerr << "moekit: unknown command '" << command << "'\n" << kUsage;
    return 2;
  } catch (const moekit::ConfigError& e) {
    std::cerr << "moekit: config error: " << e.what() << "\n";
    return 2;
  } catch (const moekit::InputError& e) {
    std::cerr << "moekit: input error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "moekit: error: " << e.what() << "\n";
    return 1;
  }
}
