// JSON front end of routing: the format of `moekit route` (documented in the README).
#pragma once

#include <string>

namespace moekit {

// Routes the INPUT document with the CONFIG document and returns the OUT document.
// Throws ConfigError / InputError with a message naming the offending field.
std::string route_json(const std::string& config_json, const std::string& input_json,
                       int indent = 2);

}  // namespace moekit
