// Exceptions thrown at the library boundary. Every message names the offending argument or
// field, the expected value and the actual value, so that the CLI can print it as is.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
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

// A shape as error messages write it: "[2, 3, 4]" (the empty shape "[]"). free_extent, when
// given, is written for a negative extent: a pattern's free dimension (e.g. "*").
inline std::string shape_text(std::span<const int64_t> shape, const char* free_extent = nullptr) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ", ";
    out += shape[i] < 0 && free_extent != nullptr ? std::string(free_extent) : std::to_string(shape[i]);
  }
  return out + "]";
}
// The same from the extents themselves: shape_text(rows, cols) is "[rows, cols]".
template <std::integral... Extents>
  requires(sizeof...(Extents) > 0)
std::string shape_text(Extents... extents) {
  const int64_t shape[] = {static_cast<int64_t>(extents)...};
  return shape_text(std::span<const int64_t>(shape));
}

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
