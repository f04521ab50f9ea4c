// The moekit command line: one CLI::App with a subcommand per job (cli/commands.h).
#include <CLI/CLI.hpp>

#include <iostream>

#include "commands.h"
#include "flags.h"
#include "moekit/error.h"

int main(int argc, char** argv) {
  CLI::App app{"moekit: Mixture-of-Experts routing and layers", "moekit"};
  app.require_subcommand(0, 1);  // one command per run; none is handled below
  moekit::cli::add_train_command(app);
  moekit::cli::add_route_command(app);
  moekit::cli::add_bench_command(app);
  moekit::cli::add_preset_commands(app);
  moekit::cli::add_inspect_command(app);
  moekit::cli::add_forward_command(app);
  // After the commands: a subcommand inherits the footer that is set when it is added.
  app.footer("Run 'moekit COMMAND --help' for a command's flags. Exit status: 0 success, "
             "1 internal error, 2 bad arguments, configuration or input.");

  try {
    app.parse(argc, argv);
    if (app.get_subcommands().empty()) {  // `moekit` alone (or `moekit --`): usage, as an error
      std::cerr << app.help();
      return 2;
    }
    return 0;
  } catch (const CLI::ParseError& e) {
    return moekit::cli::report_parse_error(app, e);
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
