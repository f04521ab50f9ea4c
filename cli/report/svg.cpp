#include "report/svg.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <sstream>

namespace moekit::report {

namespace {

constexpr const char* kFont = "font-family=\"DejaVu Sans, Arial, Helvetica, sans-serif\"";
// Text widths are estimated, not measured (there is no font engine here); this per-character
// width at font size 1 errs wide for the sans fonts above, so that labels never collide.
constexpr double kCharWidth = 0.62;
constexpr double kTickFont = 11;
constexpr double kTitleFont = 14;
constexpr double kAxisTitleFont = 12;

// Okabe–Ito colours, ordered so that neighbours differ in lightness as well as hue; the yellow is
// left out because it vanishes on white.
constexpr std::array<const char*, 7> kSeriesColours = {"#0072B2", "#D55E00", "#009E73", "#CC79A7",
                                                       "#000000", "#E69F00", "#56B4E9"};
constexpr std::array<const char*, 7> kDashes = {"", "7 3", "2 2", "9 3 2 3", "14 4", "4 2 1 2", "1 4"};
constexpr int kMarkerKinds = 6;
constexpr int kMarkersPerSeries = 9;

double text_width(std::string_view text, double font_size) {
  // Count code points, not bytes, so that "×" or "…" count once.
  std::size_t n = 0;
  for (unsigned char c : text) n += (c & 0xC0) != 0x80;
  return static_cast<double>(n) * font_size * kCharWidth;
}

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  std::string s = buf;
  if (s.size() > 2 && s.compare(s.size() - 2, 2, ".0") == 0) s.resize(s.size() - 2);
  if (s == "-0") s = "0";
  return s;
}

// "1.50e-05" -> "1.5e-5"; a mantissa's trailing zeros and the exponent's sign and padding go.
std::string tidy_scientific(std::string s) {
  const auto e = s.find('e');
  if (e == std::string::npos) return s;
  std::string mantissa = s.substr(0, e);
  std::string exponent = s.substr(e + 1);
  if (mantissa.find('.') != std::string::npos) {
    while (!mantissa.empty() && mantissa.back() == '0') mantissa.pop_back();
    if (!mantissa.empty() && mantissa.back() == '.') mantissa.pop_back();
  }
  bool negative = false;
  std::size_t i = 0;
  if (i < exponent.size() && (exponent[i] == '+' || exponent[i] == '-')) negative = exponent[i++] == '-';
  while (i + 1 < exponent.size() && exponent[i] == '0') ++i;
  return mantissa + "e" + (negative ? "-" : "") + exponent.substr(i);
}

int decimal_exponent(double v) { return static_cast<int>(std::floor(std::log10(std::fabs(v)))); }

std::string text(double x, double y, std::string_view content, double size, const char* anchor,
                 const std::string& extra = "") {
  std::string out = "<text x=\"" + num(x) + "\" y=\"" + num(y) + "\" font-size=\"" + num(size) +
                    "\" text-anchor=\"" + anchor + "\"";
  if (!extra.empty()) out += " " + extra;
  out += ">" + xml_escape(content) + "</text>\n";
  return out;
}

std::string svg_open(double width, double height, std::string_view title) {
  // A narrow chart (a heatmap of few columns) still has room for its whole title.
  width = std::max(width, 24 + text_width(title, kTitleFont) * 1.05);
  std::string out = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + num(width) + "\" height=\"" +
                    num(height) + "\" viewBox=\"0 0 " + num(width) + " " + num(height) + "\" " + kFont +
                    " role=\"img\">\n";
  out += "<title>" + xml_escape(title) + "</title>\n";
  out += "<rect x=\"0\" y=\"0\" width=\"" + num(width) + "\" height=\"" + num(height) + "\" fill=\"#ffffff\"/>\n";
  if (!title.empty()) out += text(12, 20, title, kTitleFont, "start", "font-weight=\"bold\"");
  return out;
}

std::string line(double x1, double y1, double x2, double y2, const std::string& style) {
  return "<line x1=\"" + num(x1) + "\" y1=\"" + num(y1) + "\" x2=\"" + num(x2) + "\" y2=\"" + num(y2) +
         "\" " + style + "/>\n";
}

std::string marker(int kind, double x, double y, const char* colour) {
  const double r = 3.5;
  const std::string fill = std::string("fill=\"") + colour + "\" stroke=\"" + colour + "\"";
  switch (kind % kMarkerKinds) {
    case 0:
      return "<circle cx=\"" + num(x) + "\" cy=\"" + num(y) + "\" r=\"" + num(r) + "\" " + fill + "/>\n";
    case 1:
      return "<rect x=\"" + num(x - r) + "\" y=\"" + num(y - r) + "\" width=\"" + num(2 * r) + "\" height=\"" +
             num(2 * r) + "\" " + fill + "/>\n";
    case 2:
      return "<polygon points=\"" + num(x) + "," + num(y - r - 1) + " " + num(x + r + 0.5) + "," + num(y + r) +
             " " + num(x - r - 0.5) + "," + num(y + r) + "\" " + fill + "/>\n";
    case 3:
      return "<polygon points=\"" + num(x) + "," + num(y - r - 1) + " " + num(x + r + 1) + "," + num(y) + " " +
             num(x) + "," + num(y + r + 1) + " " + num(x - r - 1) + "," + num(y) + "\" " + fill + "/>\n";
    case 4:  // hollow circle: tells apart from the filled one in grey
      return "<circle cx=\"" + num(x) + "\" cy=\"" + num(y) + "\" r=\"" + num(r) + "\" fill=\"#ffffff\" stroke=\"" +
             colour + "\" stroke-width=\"1.5\"/>\n";
    default:  // a cross
      return "<path d=\"M" + num(x - r) + " " + num(y - r) + " L" + num(x + r) + " " + num(y + r) + " M" +
             num(x - r) + " " + num(y + r) + " L" + num(x + r) + " " + num(y - r) + "\" stroke=\"" + colour +
             "\" stroke-width=\"2\" fill=\"none\"/>\n";
  }
}

// A value-to-pixel map, linear or logarithmic.
struct Scale {
  double lo = 0, hi = 1;  // domain
  double a = 0, b = 1;    // pixels of lo and hi
  bool log = false;
  double operator()(double v) const {
    const double t = log ? (std::log10(v) - std::log10(lo)) / (std::log10(hi) - std::log10(lo)) : (v - lo) / (hi - lo);
    return a + t * (b - a);
  }
};

struct Range {
  double lo = std::numeric_limits<double>::infinity();
  double hi = -std::numeric_limits<double>::infinity();
  void add(double v) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  bool empty() const { return !(lo <= hi); }
};

// A range wide enough for ticks: a single value gets a margin around it.
Range widened(Range r, bool log) {
  if (r.empty()) return log ? Range{1, 10} : Range{0, 1};
  if (r.hi > r.lo) return r;
  if (log) return Range{r.lo / 2, r.hi * 2};
  const double pad = r.lo == 0 ? 1 : std::fabs(r.lo) * 0.1;
  return Range{r.lo - pad, r.hi + pad};
}

double max_label_width(const std::vector<Tick>& ticks, double size) {
  double w = 0;
  for (const auto& t : ticks) w = std::max(w, text_width(t.label, size));
  return w;
}

struct Srgb {
  double r, g, b;
};

double srgb_encode(double c) {
  c = std::clamp(c, 0.0, 1.0);
  return c <= 0.0031308 ? 12.92 * c : 1.055 * std::pow(c, 1 / 2.4) - 0.055;
}

// CIELAB (D65) to linear sRGB; may fall outside [0, 1] when the colour is out of gamut.
Srgb lab_to_linear_srgb(double L, double a, double b) {
  const double fy = (L + 16) / 116, fx = fy + a / 500, fz = fy - b / 200;
  auto finv = [](double t) { return t > 6.0 / 29 ? t * t * t : 3 * (6.0 / 29) * (6.0 / 29) * (t - 4.0 / 29); };
  const double X = 0.95047 * finv(fx), Y = finv(fy), Z = 1.08883 * finv(fz);
  return {3.2404542 * X - 1.5371385 * Y - 0.4985314 * Z, -0.9692660 * X + 1.8760108 * Y + 0.0415560 * Z,
          0.0556434 * X - 0.2040259 * Y + 1.0572252 * Z};
}

bool in_gamut(const Srgb& c) {
  constexpr double kEps = 1e-9;
  return c.r >= -kEps && c.r <= 1 + kEps && c.g >= -kEps && c.g <= 1 + kEps && c.b >= -kEps && c.b <= 1 + kEps;
}

constexpr double kPaletteLightMin = 18;
constexpr double kPaletteLightMax = 95;

double palette_lightness(double t) { return kPaletteLightMin + (kPaletteLightMax - kPaletteLightMin) * t; }

}  // namespace

std::string xml_escape(std::string_view in) {
  std::string out;
  out.reserve(in.size());
  for (char c : in) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default:
        // Control characters other than tab and newline are not allowed in XML at all.
        if (static_cast<unsigned char>(c) < 0x20 && c != '\t' && c != '\n') out += ' ';
        else out += c;
    }
  }
  return out;
}

std::string format_number(double value, int significant) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  significant = std::clamp(significant, 1, 17);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*e", significant - 1, value);
  const double rounded = std::strtod(buf, nullptr);
  if (rounded == 0) return "0";
  const int exponent = decimal_exponent(rounded);
  if (exponent < -4 || exponent >= 6) return tidy_scientific(buf);
  std::snprintf(buf, sizeof buf, "%.*f", std::max(0, significant - 1 - exponent), rounded);
  std::string s = buf;
  if (s.find('.') != std::string::npos) {
    while (s.back() == '0') s.pop_back();
    if (s.back() == '.') s.pop_back();
  }
  return s;
}

std::vector<Tick> linear_ticks(double lo, double hi, int target) {
  if (!(std::isfinite(lo) && std::isfinite(hi))) return {};
  if (lo > hi) std::swap(lo, hi);
  if (lo == hi) {
    const Range r = widened(Range{lo, hi}, false);
    lo = r.lo;
    hi = r.hi;
  }
  target = std::max(target, 2);
  const double raw = (hi - lo) / target;
  int e = decimal_exponent(raw);
  const double norm = raw / std::pow(10.0, e);
  int m = norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10;
  if (m == 10) {
    m = 1;
    ++e;
  }
  const double step = m * std::pow(10.0, e);
  // A little slack so that a bound that is itself round (0.6 after rounding error) is not pushed
  // one step out.
  const auto first = static_cast<long long>(std::floor(lo / step + 1e-9));
  const auto last = static_cast<long long>(std::ceil(hi / step - 1e-9));
  std::vector<Tick> ticks;
  for (long long k = first; k <= last; ++k) {
    const double v = static_cast<double>(k) * step;
    const int digits = k == 0 ? 1 : std::max(1, decimal_exponent(v) - e + 1);
    Tick t;
    t.label = format_number(v, digits);
    t.value = std::strtod(t.label.c_str(), nullptr);
    ticks.push_back(std::move(t));
  }
  return ticks;
}

std::vector<Tick> log_ticks(double lo, double hi) {
  if (!(lo > 0 && hi > 0 && std::isfinite(lo) && std::isfinite(hi))) return {};
  if (lo > hi) std::swap(lo, hi);
  // Slack so that a bound at exactly a power of ten counts as inside.
  const double slack = 1e-9;
  const int e0 = static_cast<int>(std::floor(std::log10(lo) + slack));
  const int e1 = static_cast<int>(std::ceil(std::log10(hi) - slack));
  auto make = [](double v) {
    Tick t;
    t.label = format_number(v, 1);
    t.value = std::strtod(t.label.c_str(), nullptr);
    return t;
  };
  auto inside = [&](double v) { return v >= lo * (1 - slack) && v <= hi * (1 + slack); };
  std::vector<Tick> ticks;
  if (std::log10(hi / lo) > 2) {
    const int stride = std::max(1, (e1 - e0 + 7) / 8);
    for (int e = e0; e <= e1; ++e)
      if ((e - e0) % stride == 0 && inside(std::pow(10.0, e))) ticks.push_back(make(std::pow(10.0, e)));
    return ticks;
  }
  for (int e = e0; e <= e1; ++e)
    for (int m : {1, 2, 5})
      if (inside(m * std::pow(10.0, e))) ticks.push_back(make(m * std::pow(10.0, e)));
  if (ticks.size() >= 3) return ticks;
  // Less than a decade: ordinary round ticks, placed on the log scale.
  ticks.clear();
  for (auto& t : linear_ticks(lo, hi, 4))
    if (t.value > 0 && inside(t.value)) ticks.push_back(t);
  return ticks;
}

std::string sequential_colour(double t) {
  if (!(t >= 0)) t = 0;  // also NaN
  t = std::min(t, 1.0);
  const double L = palette_lightness(t);
  // The hue turns from blue-violet (dark end) through teal and green to yellow (light end); the
  // chroma is the most the sRGB gamut allows at that lightness and hue, up to a cap, so that the
  // lightness, the one thing a grey printout keeps, is exactly the ramp above.
  const double pi = std::acos(-1.0);
  const double hue = (300.0 - 205.0 * t) * pi / 180.0;
  const double cap = 38 + 30 * t;
  double lo = 0, hi = cap;
  if (in_gamut(lab_to_linear_srgb(L, cap * std::cos(hue), cap * std::sin(hue)))) {
    lo = cap;
  } else {
    for (int i = 0; i < 40; ++i) {
      const double c = (lo + hi) / 2;
      (in_gamut(lab_to_linear_srgb(L, c * std::cos(hue), c * std::sin(hue))) ? lo : hi) = c;
    }
  }
  const Srgb lin = lab_to_linear_srgb(L, lo * std::cos(hue), lo * std::sin(hue));
  char buf[8];
  auto byte = [](double c) { return static_cast<int>(std::lround(srgb_encode(c) * 255)); };
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", byte(lin.r), byte(lin.g), byte(lin.b));
  return buf;
}

std::string line_chart_svg(const LineChart& chart) {
  Range xr, yr;
  for (const auto& s : chart.series) {
    const std::size_t n = std::min(s.x.size(), s.y.size());
    for (std::size_t i = 0; i < n; ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i]) || (chart.log_y && s.y[i] <= 0)) continue;
      xr.add(s.x[i]);
      yr.add(s.y[i]);
    }
  }
  const bool no_data = xr.empty();
  xr = widened(xr, false);
  yr = widened(yr, chart.log_y);

  std::vector<Tick> xt = linear_ticks(xr.lo, xr.hi, 6);
  Range xd{xt.front().value, xt.back().value};
  std::vector<Tick> yt;
  Range yd;
  if (chart.log_y) {
    // Whole decades when the data spans several; otherwise the data's range with a small margin,
    // so that a loss going from 4 to 2 fills the plot instead of a tenth of it.
    if (yr.hi / yr.lo > 100) {
      yd = Range{std::pow(10.0, std::floor(std::log10(yr.lo))), std::pow(10.0, std::ceil(std::log10(yr.hi)))};
    } else {
      const double pad = std::pow(yr.hi / yr.lo, 0.05);
      yd = Range{yr.lo / pad, yr.hi * pad};
    }
    yt = log_ticks(yd.lo, yd.hi);
  } else {
    yt = linear_ticks(yr.lo, yr.hi, 5);
    yd = Range{yt.front().value, yt.back().value};
  }

  double legend_w = 0;
  for (const auto& s : chart.series) legend_w = std::max(legend_w, text_width(s.name, kTickFont));
  legend_w = chart.series.empty() ? 0 : std::min(legend_w, 200.0) + 50;
  const double left = 26 + max_label_width(yt, kTickFont) + 10;
  const double top = 34, bottom = 50;
  const double right = 16 + legend_w;
  const double plot_w = std::max(80.0, chart.width - left - right);
  const double plot_h = std::max(60.0, chart.height - top - bottom);
  const double width = left + plot_w + right, height = top + plot_h + bottom;
  const Scale sx{xd.lo, xd.hi, left, left + plot_w, false};
  const Scale sy{yd.lo, yd.hi, top + plot_h, top, chart.log_y};

  std::string out = svg_open(width, height, chart.title);
  // Grid and ticks.
  for (const auto& t : yt) {
    const double y = sy(t.value);
    out += line(left, y, left + plot_w, y, "stroke=\"#dddddd\" stroke-width=\"1\"");
    out += line(left - 4, y, left, y, "stroke=\"#000000\"");
    out += text(left - 7, y + 4, t.label, kTickFont, "end");
  }
  // Thin the x tick labels when they would touch (long step numbers on a narrow chart).
  const double x_gap = plot_w / std::max<std::size_t>(1, xt.size() - 1);
  const std::size_t x_stride =
      static_cast<std::size_t>(std::ceil((max_label_width(xt, kTickFont) + 8) / std::max(1.0, x_gap)));
  for (std::size_t i = 0; i < xt.size(); ++i) {
    const double x = sx(xt[i].value);
    out += line(x, top + plot_h, x, top + plot_h + 4, "stroke=\"#000000\"");
    if (i % std::max<std::size_t>(1, x_stride) == 0)
      out += text(x, top + plot_h + 17, xt[i].label, kTickFont, "middle");
  }
  out += "<rect x=\"" + num(left) + "\" y=\"" + num(top) + "\" width=\"" + num(plot_w) + "\" height=\"" +
         num(plot_h) + "\" fill=\"none\" stroke=\"#000000\"/>\n";
  out += text(left + plot_w / 2, height - 10, chart.x_title, kAxisTitleFont, "middle");
  const double ty = top + plot_h / 2;
  out += text(16, ty, chart.y_title, kAxisTitleFont, "middle",
              "transform=\"rotate(-90 16 " + num(ty) + ")\"");
  if (no_data) out += text(left + plot_w / 2, ty, "no data", kAxisTitleFont, "middle", "fill=\"#666666\"");

  // Series: a path broken at missing points, then a few markers staggered between series so
  // that they do not sit on top of each other.
  for (std::size_t s = 0; s < chart.series.size(); ++s) {
    const Series& ser = chart.series[s];
    const char* colour = kSeriesColours[s % kSeriesColours.size()];
    const char* dash = kDashes[s % kDashes.size()];
    const std::size_t n = std::min(ser.x.size(), ser.y.size());
    auto valid = [&](std::size_t i) {
      return std::isfinite(ser.x[i]) && std::isfinite(ser.y[i]) && !(chart.log_y && ser.y[i] <= 0);
    };
    std::string d;
    bool pen_down = false;
    for (std::size_t i = 0; i < n; ++i) {
      if (!valid(i)) {
        pen_down = false;
        continue;
      }
      d += (pen_down ? " L" : (d.empty() ? "M" : " M")) + num(sx(ser.x[i])) + " " + num(sy(ser.y[i]));
      pen_down = true;
    }
    out += "<g>\n<title>" + xml_escape(ser.name) + "</title>\n";
    if (!d.empty()) {
      out += "<path d=\"" + d + "\" fill=\"none\" stroke=\"" + colour + "\" stroke-width=\"1.8\"";
      if (*dash) out += std::string(" stroke-dasharray=\"") + dash + "\"";
      out += " stroke-linejoin=\"round\"/>\n";
    }
    const std::size_t stride = std::max<std::size_t>(1, n / kMarkersPerSeries);
    const std::size_t offset = chart.series.size() > 1 ? stride * s / chart.series.size() : 0;
    for (std::size_t i = offset; i < n; i += stride)
      if (valid(i)) out += marker(static_cast<int>(s), sx(ser.x[i]), sy(ser.y[i]), colour);
    out += "</g>\n";
  }

  // Legend: line sample with marker, then the name.
  const double lx = left + plot_w + 16;
  for (std::size_t s = 0; s < chart.series.size(); ++s) {
    const double y = top + 8 + 18.0 * static_cast<double>(s);
    const char* colour = kSeriesColours[s % kSeriesColours.size()];
    const char* dash = kDashes[s % kDashes.size()];
    std::string style = std::string("stroke=\"") + colour + "\" stroke-width=\"1.8\"";
    if (*dash) style += std::string(" stroke-dasharray=\"") + dash + "\"";
    out += line(lx, y, lx + 32, y, style);
    out += marker(static_cast<int>(s), lx + 16, y, colour);
    std::string name = chart.series[s].name;
    const std::size_t max_chars = static_cast<std::size_t>(200 / (kTickFont * kCharWidth));
    if (name.size() > max_chars) name = name.substr(0, max_chars - 1) + "\xE2\x80\xA6";
    out += text(lx + 38, y + 4, name, kTickFont, "start");
  }
  out += "</svg>\n";
  return out;
}

std::string heatmap_svg(const Heatmap& map) {
  const std::size_t rows = map.rows, cols = map.cols;
  auto at = [&](std::size_t r, std::size_t c) {
    const std::size_t i = r * cols + c;
    return i < map.values.size() ? map.values[i] : std::numeric_limits<double>::quiet_NaN();
  };
  Range vr;
  for (std::size_t i = 0; i < rows * cols && i < map.values.size(); ++i)
    if (std::isfinite(map.values[i])) vr.add(map.values[i]);
  double vmin = map.value_min.value_or(vr.empty() ? 0 : vr.lo);
  double vmax = map.value_max.value_or(vr.empty() ? 1 : vr.hi);
  if (!(vmax > vmin)) {
    const Range w = widened(Range{vmin, vmin}, false);
    vmin = w.lo;
    vmax = w.hi;
  }
  auto t_of = [&](double v) { return std::clamp((v - vmin) / (vmax - vmin), 0.0, 1.0); };

  const double label_font = 10.5;
  double row_label_w = 0;
  for (const auto& l : map.row_labels) row_label_w = std::max(row_label_w, text_width(l, label_font));
  double col_label_w = 0;
  for (const auto& l : map.col_labels) col_label_w = std::max(col_label_w, text_width(l, label_font));

  std::vector<Tick> bar_ticks;
  for (auto& t : linear_ticks(vmin, vmax, 4))
    if (t.value >= vmin - 1e-9 * (vmax - vmin) && t.value <= vmax + 1e-9 * (vmax - vmin)) bar_ticks.push_back(t);
  const double bar_label_w = max_label_width(bar_ticks, kTickFont);
  const double colour_bar_w = 24 + 14 + 6 + bar_label_w + 24;

  const double left = (map.row_title.empty() ? 8 : 26) + row_label_w + 8;
  const double top = 34;
  const double avail = std::max(60.0, map.max_width - left - colour_bar_w - 10);
  double cell_w = std::clamp(avail / static_cast<double>(std::max<std::size_t>(1, cols)), 3.0, 56.0);
  // With few columns, widen the cells to hold every column label rather than drop some.
  if (col_label_w + 8 > cell_w && (col_label_w + 8) * static_cast<double>(cols) <= avail) cell_w = col_label_w + 8;
  const double cell_h = std::clamp(320.0 / static_cast<double>(std::max<std::size_t>(1, rows)), 7.0, 26.0);
  const double grid_w = cell_w * static_cast<double>(cols), grid_h = cell_h * static_cast<double>(rows);
  const double bar_h = std::max(grid_h, 120.0);
  const double bottom = 22 + (map.col_title.empty() ? 0 : 20);
  const double width = left + grid_w + colour_bar_w + 10;
  const double height = top + std::max(grid_h, bar_h) + bottom;

  std::string out = svg_open(width, height, map.title);
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t c = 0; c < cols; ++c) {
      const double x = left + cell_w * static_cast<double>(c), y = top + cell_h * static_cast<double>(r);
      const double v = at(r, c);
      if (!std::isfinite(v)) {
        out += "<rect x=\"" + num(x) + "\" y=\"" + num(y) + "\" width=\"" + num(cell_w) + "\" height=\"" +
               num(cell_h) + "\" fill=\"#ffffff\"/>\n";
        out += line(x, y + cell_h, x + cell_w, y, "stroke=\"#999999\"");
        continue;
      }
      // The cells overlap by a fraction of a pixel so that no hairline of background shows
      // between them when the viewer scales the image.
      out += "<rect x=\"" + num(x) + "\" y=\"" + num(y) + "\" width=\"" + num(cell_w + 0.3) + "\" height=\"" +
             num(cell_h + 0.3) + "\" fill=\"" + sequential_colour(t_of(v)) + "\" shape-rendering=\"crispEdges\"/>\n";
      if (map.show_values) {
        const std::string label = format_number(v, map.value_digits);
        if (text_width(label, 10) + 4 <= cell_w && cell_h >= 12) {
          const bool light = palette_lightness(t_of(v)) > 55;
          out += text(x + cell_w / 2, y + cell_h / 2 + 3.5, label, 10, "middle",
                      light ? "fill=\"#000000\"" : "fill=\"#ffffff\"");
        }
      }
    }
  }
  out += "<rect x=\"" + num(left) + "\" y=\"" + num(top) + "\" width=\"" + num(grid_w) + "\" height=\"" +
         num(grid_h) + "\" fill=\"none\" stroke=\"#000000\"/>\n";
  // Labels, thinned to every n-th when the cells are too small to hold them all.
  const std::size_t row_stride = static_cast<std::size_t>(std::ceil(12.0 / cell_h));
  for (std::size_t r = 0; r < rows && r < map.row_labels.size(); r += row_stride)
    out += text(left - 5, top + cell_h * (static_cast<double>(r) + 0.5) + 3.5, map.row_labels[r], label_font, "end");
  const std::size_t col_stride = static_cast<std::size_t>(std::ceil((col_label_w + 4) / cell_w));
  for (std::size_t c = 0; c < cols && c < map.col_labels.size(); c += std::max<std::size_t>(1, col_stride))
    out += text(left + cell_w * (static_cast<double>(c) + 0.5), top + grid_h + 14, map.col_labels[c], label_font,
                "middle");
  if (!map.col_title.empty())
    out += text(left + grid_w / 2, top + grid_h + 34, map.col_title, kAxisTitleFont, "middle");
  if (!map.row_title.empty()) {
    const double ty = top + grid_h / 2;
    out += text(14, ty, map.row_title, kAxisTitleFont, "middle", "transform=\"rotate(-90 14 " + num(ty) + ")\"");
  }

  // Colour bar: stacked bands, lightest at the top, with round ticks inside the scale's range.
  const double bx = left + grid_w + 24;
  constexpr int kBands = 64;
  for (int i = 0; i < kBands; ++i) {
    const double t0 = static_cast<double>(i) / kBands;
    const double y = top + bar_h * (1 - t0 - 1.0 / kBands);
    out += "<rect x=\"" + num(bx) + "\" y=\"" + num(y) + "\" width=\"14\" height=\"" + num(bar_h / kBands + 0.4) +
           "\" fill=\"" + sequential_colour(t0 + 0.5 / kBands) + "\" shape-rendering=\"crispEdges\"/>\n";
  }
  out += "<rect x=\"" + num(bx) + "\" y=\"" + num(top) + "\" width=\"14\" height=\"" + num(bar_h) +
         "\" fill=\"none\" stroke=\"#000000\"/>\n";
  for (const auto& t : bar_ticks) {
    const double y = top + bar_h * (1 - t_of(t.value));
    out += line(bx + 14, y, bx + 18, y, "stroke=\"#000000\"");
    out += text(bx + 20, y + 4, t.label, kTickFont, "start");
  }
  if (!map.value_title.empty()) {
    const double tx = bx + 20 + bar_label_w + 14, ty = top + bar_h / 2;
    out += text(tx, ty, map.value_title, kAxisTitleFont, "middle",
                "transform=\"rotate(-90 " + num(tx) + " " + num(ty) + ")\"");
  }
  out += "</svg>\n";
  return out;
}

std::string bar_chart_svg(const BarChart& chart) {
  const std::size_t n = std::min(chart.labels.size(), chart.values.size());
  Range vr;
  vr.add(0);
  for (std::size_t i = 0; i < n; ++i)
    if (std::isfinite(chart.values[i])) vr.add(chart.values[i]);
  if (chart.reference && std::isfinite(*chart.reference)) vr.add(*chart.reference);
  vr = widened(vr, false);
  const std::vector<Tick> yt = linear_ticks(vr.lo, vr.hi, 5);
  const Range yd{yt.front().value, yt.back().value};

  const double left = 26 + max_label_width(yt, kTickFont) + 10;
  const double top = 34, bottom = 50;
  std::string ref_text;
  if (chart.reference) ref_text = chart.reference_label + " " + format_number(*chart.reference, 3);
  const double right = 16 + (ref_text.empty() ? 0 : text_width(ref_text, kTickFont) + 6);
  const double plot_w = std::max(80.0, chart.width - left - right);
  const double plot_h = std::max(60.0, chart.height - top - bottom);
  const double width = left + plot_w + right, height = top + plot_h + bottom;
  const Scale sy{yd.lo, yd.hi, top + plot_h, top, false};

  std::string out = svg_open(width, height, chart.title);
  for (const auto& t : yt) {
    const double y = sy(t.value);
    out += line(left, y, left + plot_w, y, "stroke=\"#dddddd\"");
    out += line(left - 4, y, left, y, "stroke=\"#000000\"");
    out += text(left - 7, y + 4, t.label, kTickFont, "end");
  }
  const double slot = plot_w / static_cast<double>(std::max<std::size_t>(1, n));
  double label_w = 0;
  for (std::size_t i = 0; i < n; ++i) label_w = std::max(label_w, text_width(chart.labels[i], kTickFont));
  const std::size_t label_stride = static_cast<std::size_t>(std::ceil((label_w + 6) / slot));
  for (std::size_t i = 0; i < n; ++i) {
    const double v = chart.values[i];
    const double x = left + slot * static_cast<double>(i);
    if (std::isfinite(v)) {
      const double y0 = sy(0), y1 = sy(v);
      out += "<rect x=\"" + num(x + slot * 0.15) + "\" y=\"" + num(std::min(y0, y1)) + "\" width=\"" +
             num(slot * 0.7) + "\" height=\"" + num(std::fabs(y1 - y0)) +
             "\" fill=\"#4a72a8\" stroke=\"#1f3d66\" stroke-width=\"0.8\"><title>" +
             xml_escape(chart.labels[i] + ": " + format_number(v, 4)) + "</title></rect>\n";
    }
    if (i % std::max<std::size_t>(1, label_stride) == 0)
      out += text(x + slot / 2, top + plot_h + 17, chart.labels[i], kTickFont, "middle");
  }
  if (yd.lo < 0 && yd.hi > 0) out += line(left, sy(0), left + plot_w, sy(0), "stroke=\"#000000\"");
  out += "<rect x=\"" + num(left) + "\" y=\"" + num(top) + "\" width=\"" + num(plot_w) + "\" height=\"" +
         num(plot_h) + "\" fill=\"none\" stroke=\"#000000\"/>\n";
  if (chart.reference && std::isfinite(*chart.reference)) {
    const double y = sy(*chart.reference);
    out += line(left, y, left + plot_w, y, "stroke=\"#000000\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"");
    out += text(left + plot_w + 6, y + 4, ref_text, kTickFont, "start");
  }
  out += text(left + plot_w / 2, height - 10, chart.x_title, kAxisTitleFont, "middle");
  const double ty = top + plot_h / 2;
  out += text(16, ty, chart.y_title, kAxisTitleFont, "middle", "transform=\"rotate(-90 16 " + num(ty) + ")\"");
  out += "</svg>\n";
  return out;
}

}  // namespace moekit::report
