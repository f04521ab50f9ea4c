// Exceptions thrown at the library boundary. Every message names the offending argument or
// field, the expected value and the actual value, so that the CLI can print it as is.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace moekit {

// A configuration field is unknown, of the wrong type or out of range.
class ConfigError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A tensor argument has the wrong shape, holds NaN/Inf, is empty, or is otherwise unusable.
class InputError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {
template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  out.precision(17);
  (out << ... << parts);
  return out.str();
}
}  // namespace detail

// "<field>: expected <expected>, got <actual>"
template <typename Expected, typename Actual>
[[noreturn]] void throw_config_error(const std::string& field, const Expected& expected,
                                     const Actual& actual) {
  throw ConfigError(detail::concat(field, ": expected ", expected, ", got ", actual));
}

template <typename Expected, typename Actual>
[[noreturn]] void throw_input_error(const std::string& argument, const Expected& expected,
                                    const Actual& actual) {
  throw InputError(detail::concat(argument, ": expected ", expected, ", got ", actual));
}

}  // namespace moekit
