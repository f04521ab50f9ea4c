#include "flags.h"

#include <cmath>
#include <cstdio>
#include <iostream>
#include <map>
#include <stdexcept>

namespace moekit::cli {
namespace {

// What each declared option takes, in words. One process parses one command line, so a table
// for the process is enough.
std::map<const CLI::Option*, std::string>& expected_values() {
  static std::map<const CLI::Option*, std::string> table;
  return table;
}

CLI::Option* remember(CLI::Option* option, const std::string& expected) {
  expected_values()[option] = expected;
  // A flag given twice keeps its last value, as the hand-written parsers did (CLI11 would reject it).
  return option->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
}

std::string expected_of(const CLI::Option& option) {
  const auto it = expected_values().find(&option);
  return it == expected_values().end() ? "a value" : it->second;
}

template <typename Int>
CLI::Option* add_int(CLI::App& app, const std::string& name, Int& value, int64_t min, int64_t max,
                     const std::string& help) {
  const std::string range = "[" + std::to_string(min) + ", " + std::to_string(max) + "]";
  const std::string expected = "an integer in " + range;
  CLI::Validator in_range(
      [min, max, expected](std::string& text) -> std::string {
        size_t used = 0;
        long long v = 0;
        bool ok = !text.empty();
        if (ok) {
          try {
            v = std::stoll(text, &used, 10);
          } catch (const std::exception&) {
            ok = false;
          }
        }
        if (!ok || used != text.size() || v < min || v > max) return "expected " + expected + ", got '" + text + "'";
        text = std::to_string(v);
        return {};
      },
      "", "int_in_range");
  CLI::Option* option = app.add_option(name, value, help)->type_name("INT in " + range)->transform(in_range);
  return remember(option, expected);
}

// "fp32 or bf16", "a, b or c".
std::string one_of(const std::vector<std::string>& words) {
  std::string s;
  for (size_t i = 0; i < words.size(); ++i) {
    if (i > 0) s += i + 1 == words.size() ? " or " : ", ";
    s += words[i];
  }
  return s;
}

// The command the error belongs to: the subcommand on the line, or the program itself.
const CLI::App& command_of(const CLI::App& app) {
  const std::vector<CLI::App*> chosen = app.get_subcommands();
  return chosen.empty() ? app : *chosen.front();
}

std::string flags_of(const CLI::App& command) {
  std::vector<std::string> names;
  for (const CLI::Option* option : command.get_options()) {
    if (option == command.get_help_ptr() || option->get_lnames().empty()) continue;
    names.push_back(option->get_name());
  }
  names.push_back("--help");
  std::string s;
  for (const std::string& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

std::string commands_of(const CLI::App& app) {
  std::string s;
  for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; }))
    s += (s.empty() ? "" : ", ") + sub->get_name();
  return s;
}

// The line after "moekit: " for an argument error, or "" when it is none of the cases below.
std::string describe(const CLI::App& app, const CLI::ParseError& error) {
  const CLI::App& command = command_of(app);
  // An unknown argument is named first, even when a required flag is missing too: it is
  // usually the misspelling of that flag.
  const std::vector<std::string> left = app.remaining(true);
  if (!left.empty()) {
    const std::string& arg = left.front();
    if (&command == &app) return "expected a command (" + commands_of(app) + ") or --help, got '" + arg + "'";
    if (arg.size() > 1 && arg[0] == '-')
      return command.get_name() + ": expected one of " + flags_of(command) + ", got '" + arg + "'";
    return command.get_name() + ": expected no more arguments, got '" + arg + "'";
  }
  const std::string kind = error.get_name();
  if (kind == "RequiredError") {
    for (const CLI::Option* option : command.get_options()) {
      if (option->get_required() && option->count() == 0)
        return option->get_name() + ": expected " + expected_of(*option) + ", got nothing";
    }
  }
  if (kind == "ArgumentMismatch") {  // a flag without its value: "NAME: 1 required TYPE missing"
    const std::string what = error.what();
    const std::string name = what.substr(0, what.find(':'));
    if (const CLI::Option* option = command.get_option_no_throw(name); option && option->count() == 0)
      return name + ": expected " + expected_of(*option) + ", got nothing";
  }
  if (kind == "ConversionError") {  // "Could not convert: NAME = TEXT", as for `--json=maybe`
    const std::string what = error.what();
    for (const CLI::Option* option : command.get_options()) {
      const std::string prefix = "Could not convert: " + option->get_name() + " = ";
      if (what.rfind(prefix, 0) == 0)
        return option->get_name() + ": expected " + expected_of(*option) + ", got '" + what.substr(prefix.size()) + "'";
    }
  }
  return {};
}

}  // namespace

CLI::Option* add_int_option(CLI::App& app, const std::string& name, int& value, int64_t min, int64_t max,
                            const std::string& help) {
  return add_int(app, name, value, min, max, help);
}
CLI::Option* add_int_option(CLI::App& app, const std::string& name, int64_t& value, int64_t min, int64_t max,
                            const std::string& help) {
  return add_int(app, name, value, min, max, help);
}
CLI::Option* add_int_option(CLI::App& app, const std::string& name, uint64_t& value, int64_t min, int64_t max,
                            const std::string& help) {
  return add_int(app, name, value, min, max, help);
}

CLI::Option* add_number_option(CLI::App& app, const std::string& name, double& value, double min, double max,
                               bool min_open, const std::string& help) {
  auto text_of = [](double x) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", x);
    return std::string(buf);
  };
  const std::string lo = text_of(min), hi = text_of(max);
  const std::string range = std::string(min_open ? "(" : "[") + lo + ", " + hi + "]";
  const std::string expected = "a number in " + range;
  CLI::Validator in_range(
      [min, max, min_open, expected](std::string& text) -> std::string {
        size_t used = 0;
        double v = 0;
        bool ok = !text.empty();
        if (ok) {
          try {
            v = std::stod(text, &used);
          } catch (const std::exception&) {
            ok = false;
          }
        }
        ok = ok && used == text.size() && std::isfinite(v) && (min_open ? v > min : v >= min) && v <= max;
        if (!ok) return "expected " + expected + ", got '" + text + "'";
        return {};
      },
      "", "number_in_range");
  CLI::Option* option = app.add_option(name, value, help)->type_name("NUM in " + range)->transform(in_range);
  return remember(option, expected);
}

CLI::Option* add_text_option(CLI::App& app, const std::string& name, std::string& value,
                             const std::string& type_name, const std::string& expected, const std::string& help) {
  return remember(app.add_option(name, value, help)->type_name(type_name), expected);
}

CLI::Option* add_choice_option(CLI::App& app, const std::string& name, std::string& value,
                               const std::vector<std::vector<std::string>>& choices, const std::string& help) {
  std::vector<std::string> names;
  for (const auto& spellings : choices) names.push_back(spellings.front());
  const std::string expected = one_of(names);
  CLI::Validator to_choice(
      [choices, expected](std::string& text) -> std::string {
        for (const auto& spellings : choices) {
          for (const std::string& s : spellings) {
            if (text == s) {
              text = spellings.front();
              return {};
            }
          }
        }
        return "expected " + expected + ", got '" + text + "'";
      },
      "", "choice");
  std::string type_name;
  for (const std::string& n : names) type_name += (type_name.empty() ? "" : "|") + n;
  return remember(app.add_option(name, value, help)->type_name(type_name)->transform(to_choice), expected);
}

CLI::Option* add_switch(CLI::App& app, const std::string& name, bool& value, const std::string& help) {
  return remember(app.add_flag(name, value, help), "no value (or true or false)");
}

void reject(const std::string& flag, const std::string& expected, const std::string& actual) {
  throw CLI::ValidationError(flag, "expected " + expected + ", got " + actual);
}

int report_parse_error(const CLI::App& app, const CLI::ParseError& error) {
  if (error.get_name() == "CallForHelp" || error.get_name() == "CallForAllHelp") {
    std::cout << app.help();
    return 0;
  }
  const std::string line = describe(app, error);
  std::cerr << "moekit: " << (line.empty() ? std::string(error.what()) : line) << "\n";
  return 2;
}

}  // namespace moekit::cli
