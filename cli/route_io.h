// The `moekit route` documents (format in the README): CONFIG and INPUT in, OUT back. They
// belong to the command line; the library takes and returns tensors and structs only.
#pragma once

#include <string>

namespace moekit::cli {

// Routes the INPUT document with the CONFIG document and returns the OUT document.
// Throws ConfigError / InputError with a message naming the offending field.
std::string route_json(const std::string& config_json, const std::string& input_json,
                       int indent = 2);

}  // namespace moekit::cli
