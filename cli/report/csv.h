// The numbers behind a chart as CSV, so that a report's curves can be re-plotted or compared
// without parsing its SVG. Values are printed in the shortest form that reads back exactly.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "report/svg.h"

namespace moekit::report {

// A CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180).
std::string csv_field(std::string_view text);

// One row per distinct x (ascending) over all series, one column per series after the x column
// named `x_name`; a series without a point at that x, or with NaN there, leaves the cell empty.
std::string series_csv(std::string_view x_name, const std::vector<Series>& series);

}  // namespace moekit::report
