// Subcommands of the moekit command line, one file each. A subcommand is one `add_*_command`
// that declares it and its flags on the program's CLI::App (cli/flags.h) and sets its callback,
// which runs it once the whole line has parsed; main() lists the `add_*_command`s. A callback
// reports failures by throwing: moekit errors (ConfigError, InputError) for what it reads,
// CLI::ParseError (through reject()) for flags that disagree with each other.
#pragma once

#include <CLI/CLI.hpp>

namespace moekit::cli {

// `moekit route`: routes a JSON INPUT document with a JSON CONFIG document (cli/route.cpp).
void add_route_command(CLI::App& app);

// `moekit bench`: times the MoE layer against a dense GEMM of equal FLOPs (cli/bench.cpp).
void add_bench_command(CLI::App& app);

// `moekit presets` and `moekit preset NAME`: the preset names, one preset's configuration
// (cli/presets.cpp).
void add_preset_commands(CLI::App& app);

// `moekit train`: trains a small model around one MoE layer on synthetic domains and writes the
// routing report; `moekit compare`: several routing methods on the same data (cli/train.cpp).
void add_train_command(CLI::App& app);

// `moekit inspect --model DIR`: a checkpoint's layers, MoE configuration and stored tensors
// (cli/inspect.cpp).
void add_inspect_command(CLI::App& app);

// `moekit forward --model DIR --layer N --input IN --output OUT`: one MoE layer of a checkpoint
// on given hidden states (cli/forward.cpp).
void add_forward_command(CLI::App& app);

}  // namespace moekit::cli
