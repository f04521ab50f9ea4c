// Charts for the training and comparison reports, as standalone SVG text. Every function is a
// pure function of plain data, so the report can be tested without a training run and the
// charts read the same in any browser or printer: no scripts, no external fonts or styles.
// Series are told apart by dash pattern and marker as well as by colour, and the heatmap's
// palette rises monotonically in lightness, so that a grey printout still reads.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace moekit::report {

// Text escaped for XML character data and attribute values (&, <, >, ", ').
std::string xml_escape(std::string_view text);

// `value` with at most `significant` significant digits, in the shortest form strtod reads back
// ("0.25", "1.5e-05", "-3"); "NaN", "inf", "-inf" for non-finite values.
std::string format_number(double value, int significant = 3);

struct Tick {
  double value = 0;
  std::string label;  // reads back (strtod) as `value`
};

// Round ticks (1, 2 or 5 times a power of ten apart) covering [lo, hi], about `target` of them.
std::vector<Tick> linear_ticks(double lo, double hi, int target = 5);

// Ticks for a log axis over [lo, hi] (both > 0): the powers of ten, thinned when there are many,
// with 2 and 5 times them added when the range spans less than about two decades.
std::vector<Tick> log_ticks(double lo, double hi);

// A sequential colour ("#rrggbb") for t in [0, 1] (clamped): dark blue-violet through teal and
// green to light yellow, built in CIELAB with lightness L* rising linearly in t, so that the
// scale is still ordered when printed in grey.
std::string sequential_colour(double t);

struct Series {
  std::string name;
  std::vector<double> x;
  std::vector<double> y;  // NaN (or, on a log axis, a value <= 0) leaves a gap in the line
};

struct LineChart {
  std::string title;
  std::string x_title;  // with the unit, e.g. "step"
  std::string y_title;  // with the unit, e.g. "loss (nats/token)"
  std::vector<Series> series;
  bool log_y = false;
  double width = 720;
  double height = 340;
};

// Several named series over a shared x axis, with a legend on the right.
std::string line_chart_svg(const LineChart& chart);

struct Heatmap {
  std::string title;
  std::size_t rows = 0;
  std::size_t cols = 0;
  std::vector<double> values;  // rows × cols, row-major; NaN cells are drawn hatched grey
  std::vector<std::string> row_labels;  // empty, or one per row
  std::vector<std::string> col_labels;  // empty, or one per column
  std::string row_title;
  std::string col_title;
  std::string value_title;  // the colour bar's title, with the unit
  std::optional<double> value_min;  // the colour scale's ends; the data's range when unset
  std::optional<double> value_max;
  bool show_values = false;  // print each cell's value where the cell is wide enough
  int value_digits = 2;      // significant digits of the printed cell values
  double max_width = 720;    // cells shrink (to a minimum) to keep the chart about this wide
};

// A rows × cols matrix as coloured cells with row and column labels and a labelled colour bar.
std::string heatmap_svg(const Heatmap& map);

struct BarChart {
  std::string title;
  std::vector<std::string> labels;
  std::vector<double> values;
  std::string x_title;
  std::string y_title;
  std::optional<double> reference;  // a dashed horizontal line, e.g. the mean load
  std::string reference_label;      // printed next to it with its value
  double width = 720;
  double height = 300;
};

// Vertical bars, one per label, with an optional reference line.
std::string bar_chart_svg(const BarChart& chart);

}  // namespace moekit::report
