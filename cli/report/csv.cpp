#include "report/csv.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>

namespace moekit::report {

namespace {

// The shortest text that reads back as exactly `v` ("0.1", not "0.10000000000000001").
std::string exact_number(double v) {
  if (!std::isfinite(v)) return format_number(v);
  char buf[64];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  std::string s(buf, end);
  // "2.5e-07" -> "2.5e-7", "1e+300" -> "1e300", as format_number writes exponents.
  if (const auto e = s.find('e'); e != std::string::npos) {
    std::size_t i = e + 1;
    const bool negative = s[i] == '-';
    if (s[i] == '+' || s[i] == '-') ++i;
    while (i + 1 < s.size() && s[i] == '0') ++i;
    s = s.substr(0, e) + (negative ? "e-" : "e") + s.substr(i);
  }
  return s;
}

}  // namespace

std::string csv_field(std::string_view text) {
  if (text.find_first_of(",\"\r\n") == std::string_view::npos) return std::string(text);
  std::string out = "\"";
  for (char c : text) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}

std::string series_csv(std::string_view x_name, const std::vector<Series>& series) {
  // x -> one cell per series; a map keeps the rows sorted by x.
  std::map<double, std::vector<std::string>> rows;
  for (std::size_t s = 0; s < series.size(); ++s) {
    const std::size_t n = std::min(series[s].x.size(), series[s].y.size());
    for (std::size_t i = 0; i < n; ++i) {
      if (std::isnan(series[s].x[i])) continue;
      auto& cells = rows[series[s].x[i]];
      cells.resize(series.size());
      if (!std::isnan(series[s].y[i])) cells[s] = exact_number(series[s].y[i]);
    }
  }
  std::string out = csv_field(x_name);
  for (const auto& s : series) {
    out += ',';
    out += csv_field(s.name);
  }
  out += "\n";
  for (auto& [x, cells] : rows) {
    cells.resize(series.size());
    out += exact_number(x);
    for (const auto& c : cells) {
      out += ',';
      out += c;
    }
    out += "\n";
  }
  return out;
}

}  // namespace moekit::report
