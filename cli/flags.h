// Flag declarations shared by every subcommand, and the one place where a rejected command line
// becomes the project's error line, `moekit: <what>: expected <expected>, got <actual>`.
// Each helper records what its flag takes in words, so that a bad value, a missing value and a
// missing required flag all read the same.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace moekit::cli {

// `--name INT`: an integer in [min, max], into `value` (int, int64_t or uint64_t). The text is
// checked and rewritten in decimal before CLI11 converts it: CLI11 alone would read "010" as
// octal and "0x10" as hex, and would word a non-integer differently from an out-of-range one.
CLI::Option* add_int_option(CLI::App& app, const std::string& name, int& value, int64_t min, int64_t max,
                            const std::string& help);
CLI::Option* add_int_option(CLI::App& app, const std::string& name, int64_t& value, int64_t min, int64_t max,
                            const std::string& help);
CLI::Option* add_int_option(CLI::App& app, const std::string& name, uint64_t& value, int64_t min, int64_t max,
                            const std::string& help);

// `--name X`: a finite number in [min, max] (or (min, max] with min_open), into `value`.
CLI::Option* add_number_option(CLI::App& app, const std::string& name, double& value, double min, double max,
                               bool min_open, const std::string& help);

// `--name TEXT` (or a positional NAME): any text; `expected` words it for the error line
// ("a path", "a preset name (moekit presets)").
CLI::Option* add_text_option(CLI::App& app, const std::string& name, std::string& value,
                             const std::string& type_name, const std::string& expected, const std::string& help);

// `--name A|B`: one of `choices`, each with its accepted spellings (the first is the one stored).
CLI::Option* add_choice_option(CLI::App& app, const std::string& name, std::string& value,
                               const std::vector<std::vector<std::string>>& choices, const std::string& help);

// `--name`: a switch, true when given (`--name=false` also reads).
CLI::Option* add_switch(CLI::App& app, const std::string& name, bool& value, const std::string& help);

// Rejects a value that only makes sense against another flag (--top-k above --experts), worded
// like every other argument error.
[[noreturn]] void reject(const std::string& flag, const std::string& expected, const std::string& actual);

// The exit status for a ParseError from `app.parse`: 0 after printing the help to stdout for
// --help, else 2 after one error line on stderr.
int report_parse_error(const CLI::App& app, const CLI::ParseError& error);

}  // namespace moekit::cli
