// `moekit route`: the JSON documents of the README's "moekit route format" in, OUT back.
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>

#include "commands.h"
#include "flags.h"
#include "moekit/error.h"
#include "route_io.h"

namespace moekit::cli {
namespace {

struct RouteOptions {
  std::string config_path, input_path, output_path;
};

std::string read_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(std::string(what) + ": cannot open file '" + path + "'");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

void run_route(const RouteOptions& o) {
  const std::string out = route_json(read_file(o.config_path, "--config"), read_file(o.input_path, "--input"));
  if (o.output_path.empty()) {
    std::cout << out << "\n";
    return;
  }
  std::ofstream file(o.output_path, std::ios::binary);
  if (!file) throw InputError("--output: cannot write file '" + o.output_path + "'");
  file << out << "\n";
}

}  // namespace

void add_route_command(CLI::App& app) {
  CLI::App* route = app.add_subcommand(
      "route", "Route the INPUT document with the CONFIG document and print the OUT document (JSON)");
  auto o = std::make_shared<RouteOptions>();
  add_text_option(*route, "--config", o->config_path, "CONFIG.json", "a path",
                  "routing configuration: a preset and/or keys")
      ->required();
  add_text_option(*route, "--input", o->input_path, "INPUT.json", "a path",
                  "logits, probs or hidden_states (and the optional tensors)")
      ->required();
  add_text_option(*route, "--output", o->output_path, "OUT.json", "a path",
                  "write OUT here instead of standard output");
  route->callback([o] { run_route(*o); });
}

}  // namespace moekit::cli
