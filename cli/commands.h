// Subcommands of the moekit command line, one file each.
#pragma once

#include <string>
#include <vector>

namespace moekit::cli {

// `moekit bench ...`: times the MoE layer against a dense GEMM of equal FLOPs (cli/bench.cpp).
int bench_command(const std::vector<std::string>& args);

}  // namespace moekit::cli
