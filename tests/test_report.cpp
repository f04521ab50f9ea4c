// The report toolkit (cli/report/): charts and pages are well-formed XML whose printed numbers
// read back as the values drawn, text is escaped, the heatmap palette darkens monotonically, and
// the writer neither overwrites nor leaves a half-written report under the final names.
// One test also writes an example report from synthetic data into the build directory.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "oracles/xml_check.h"
#include "report/csv.h"
#include "report/html.h"
#include "report/output.h"
#include "report/svg.h"

namespace {

namespace fs = std::filesystem;
using namespace moekit::report;

using namespace moekit::xml_check;


void collect(const XmlNode& node, const std::string& name, std::vector<const XmlNode*>& out) {
  if (node.name == name) out.push_back(&node);
  for (const auto& c : node.children) collect(c, name, out);
}

std::vector<const XmlNode*> find_all(const XmlNode& root, const std::string& name) {
  std::vector<const XmlNode*> out;
  collect(root, name, out);
  return out;
}

double parse_number(const std::string& s) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0') throw std::runtime_error("not a number: '" + s + "'");
  return v;
}

bool is_number(const std::string& s) {
  try {
    parse_number(s);
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

// CIE L* (D65) of "#rrggbb", computed here independently of the palette's own code.
double cie_lightness(const std::string& hex) {
  EXPECT_EQ(hex.size(), 7u);
  auto channel = [&](int i) {
    const double c = std::stoi(hex.substr(1 + 2 * i, 2), nullptr, 16) / 255.0;
    return c <= 0.04045 ? c / 12.92 : std::pow((c + 0.055) / 1.055, 2.4);
  };
  const double y = 0.2126729 * channel(0) + 0.7151522 * channel(1) + 0.0721750 * channel(2);
  return y > 216.0 / 24389 ? 116 * std::cbrt(y) - 16 : y * 24389.0 / 27;
}

LineChart sample_line_chart() {
  LineChart chart;
  chart.title = "Task loss";
  chart.x_title = "step";
  chart.y_title = "loss (nats/token)";
  Series train{"train", {}, {}}, held{"held-out", {}, {}};
  for (int s = 0; s <= 200; s += 5) {
    train.x.push_back(s);
    train.y.push_back(2.0 + 2.5 * std::exp(-s / 40.0));
    held.x.push_back(s);
    held.y.push_back(2.2 + 2.4 * std::exp(-s / 45.0));
  }
  chart.series = {train, held};
  return chart;
}

// ---------------------------------------------------------------------------------------------

TEST(XmlChecker, AcceptsWellFormedAndRejectsBrokenDocuments) {
  EXPECT_NO_THROW(parse_xml("<?xml version=\"1.0\"?><!DOCTYPE html><a x='1'><b/>t&amp;&#60;<!-- c --></a>"));
  EXPECT_EQ(parse_xml("<a>&lt;x&#x26;&gt;</a>").text, "<x&>");
  for (const char* bad : {"<a><b></a></b>", "<a>x & y</a>", "<a x=1/>", "<a x='1' x='2'/>", "<a>",
                          "<a/><b/>", "<a>&nbsp;</a>", "<a x='<'/>", "<a><!-- a -- b --></a>", "<a b/>"})
    EXPECT_THROW(parse_xml(bad), std::runtime_error) << bad;
}

TEST(ReportText, EscapesTheFiveXmlSpecials) {
  EXPECT_EQ(xml_escape("<a&b>\"'"), "&lt;a&amp;b&gt;&quot;&apos;");
  EXPECT_EQ(xml_escape("plain text"), "plain text");
  EXPECT_EQ(xml_escape(std::string("a\x01z")), "a z");  // not representable in XML 1.0
}

TEST(ReportNumbers, FormatNumberIsShortAndReadsBackWithinItsPrecision) {
  EXPECT_EQ(format_number(0.25), "0.25");
  EXPECT_EQ(format_number(-3), "-3");
  EXPECT_EQ(format_number(-0.0), "0");
  EXPECT_EQ(format_number(1234567, 3), "1.23e6");
  EXPECT_EQ(format_number(1.5e-5, 2), "1.5e-5");
  EXPECT_EQ(format_number(0.000123456, 3), "0.000123");
  EXPECT_EQ(format_number(99.96, 3), "100");
  EXPECT_EQ(format_number(std::nan("")), "NaN");
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> mantissa(-10, 10);
  std::uniform_int_distribution<int> exponent(-9, 9);
  for (int i = 0; i < 2000; ++i) {
    const double v = mantissa(rng) * std::pow(10.0, exponent(rng));
    for (int digits : {1, 2, 3, 4, 6}) {
      const std::string s = format_number(v, digits);
      const double back = parse_number(s);
      EXPECT_LE(std::fabs(back - v), 0.5 * std::pow(10.0, 1 - digits) * std::fabs(v) * (1 + 1e-9))
          << v << " -> " << s;
      EXPECT_EQ(s.find('+'), std::string::npos) << s;
    }
  }
}

TEST(ReportNumbers, LinearTicksAreRoundCoverTheRangeAndReadBack) {
  const std::vector<std::pair<double, double>> ranges = {
      {0, 1}, {0.1, 0.3}, {-3.7, 12.2}, {0, 950}, {1e-6, 3e-6}, {1e6, 5e7}, {2.0, 4.5}, {-1, -0.2}, {0.6, 0.6}};
  for (const auto& [lo, hi] : ranges) {
    const auto ticks = linear_ticks(lo, hi, 5);
    ASSERT_GE(ticks.size(), 3u) << lo << ".." << hi;
    EXPECT_LE(ticks.size(), 12u) << lo << ".." << hi;
    EXPECT_LE(ticks.front().value, lo);
    EXPECT_GE(ticks.back().value, hi);
    const double step = ticks[1].value - ticks[0].value;
    const double mantissa = step / std::pow(10.0, std::floor(std::log10(step) + 1e-9));
    EXPECT_TRUE(std::fabs(mantissa - 1) < 1e-6 || std::fabs(mantissa - 2) < 1e-6 || std::fabs(mantissa - 5) < 1e-6)
        << "step " << step;
    std::set<std::string> labels;
    for (std::size_t i = 0; i < ticks.size(); ++i) {
      // The label is what the reader sees; it must be the tick's value, evenly spaced.
      EXPECT_DOUBLE_EQ(parse_number(ticks[i].label), ticks[i].value) << ticks[i].label;
      EXPECT_NEAR(ticks[i].value, ticks[0].value + step * static_cast<double>(i), 1e-9 * step) << ticks[i].label;
      EXPECT_LE(ticks[i].label.size(), 8u) << ticks[i].label;
      labels.insert(ticks[i].label);
    }
    EXPECT_EQ(labels.size(), ticks.size()) << "labels repeat for " << lo << ".." << hi;
  }
  const auto unit = linear_ticks(0, 1, 5);
  std::vector<std::string> labels;
  for (const auto& t : unit) labels.push_back(t.label);
  EXPECT_EQ(labels, (std::vector<std::string>{"0", "0.2", "0.4", "0.6", "0.8", "1"}));
}

TEST(ReportNumbers, LogTicksArePowersOfTenOrTheirRoundMultiples) {
  const auto decades = log_ticks(1e-4, 10);
  std::vector<std::string> labels;
  for (const auto& t : decades) labels.push_back(t.label);
  EXPECT_EQ(labels, (std::vector<std::string>{"0.0001", "0.001", "0.01", "0.1", "1", "10"}));
  for (const auto& [lo, hi] : std::vector<std::pair<double, double>>{{1e-9, 1e3}, {0.5, 30}, {1.8, 4.9}, {3e-7, 9e-7}}) {
    const auto ticks = log_ticks(lo, hi);
    ASSERT_GE(ticks.size(), 2u) << lo << ".." << hi;
    for (const auto& t : ticks) {
      EXPECT_DOUBLE_EQ(parse_number(t.label), t.value);
      EXPECT_GE(t.value, lo * (1 - 1e-9));
      EXPECT_LE(t.value, hi * (1 + 1e-9));
    }
  }
}

TEST(ReportPalette, LightnessRisesMonotonicallyFromDarkToLight) {
  double previous = -1;
  for (int i = 0; i <= 64; ++i) {
    const std::string colour = sequential_colour(i / 64.0);
    ASSERT_EQ(colour.size(), 7u);
    ASSERT_EQ(colour[0], '#');
    const double L = cie_lightness(colour);
    EXPECT_GT(L, previous + 0.5) << "t = " << i / 64.0 << " " << colour;
    previous = L;
  }
  EXPECT_LT(cie_lightness(sequential_colour(0)), 25);
  EXPECT_GT(cie_lightness(sequential_colour(1)), 90);
  EXPECT_EQ(sequential_colour(-1), sequential_colour(0));
  EXPECT_EQ(sequential_colour(2), sequential_colour(1));
}

TEST(ReportCharts, LineChartIsWellFormedWithTickLabelsAtTheirValues) {
  for (bool log_y : {false, true}) {
    LineChart chart = sample_line_chart();
    chart.log_y = log_y;
    chart.series[1].y[3] = std::nan("");  // a gap must not break the path syntax
    const std::string svg = line_chart_svg(chart);
    XmlNode root;
    ASSERT_NO_THROW(root = parse_xml(svg)) << svg;
    EXPECT_EQ(root.name, "svg");
    EXPECT_EQ(root.attrs.at("xmlns"), "http://www.w3.org/2000/svg");
    // The y tick labels (right-aligned left of the axis) must be numbers placed where their
    // values fall: pixel position affine in the value (or its logarithm).
    std::vector<std::pair<double, double>> ticks;
    std::set<std::string> texts;
    for (const XmlNode* t : find_all(root, "text")) {
      texts.insert(t->text);
      if (t->attrs.at("text-anchor") == "end" && is_number(t->text)) {
        const double v = parse_number(t->text);
        ticks.emplace_back(log_y ? std::log10(v) : v, parse_number(t->attrs.at("y")));
      }
    }
    ASSERT_GE(ticks.size(), 3u) << svg;
    // Coordinates are printed to 0.1 px, so the fit through the end ticks is good to ~0.1 px.
    const double slope = (ticks.back().second - ticks[0].second) / (ticks.back().first - ticks[0].first);
    EXPECT_LT(slope, 0);  // larger values higher up
    for (const auto& [v, y] : ticks) EXPECT_NEAR(y, ticks[0].second + slope * (v - ticks[0].first), 0.2);
    for (const char* expected : {"Task loss", "step", "loss (nats/token)", "train", "held-out"})
      EXPECT_TRUE(texts.count(expected)) << expected;
    // Each series in its own dash pattern, so that they are told apart without colour.
    std::set<std::string> dashes;
    for (const XmlNode* p : find_all(root, "path"))
      if (p->attrs.count("stroke-width") && p->attrs.at("stroke-width") == "1.8")
        dashes.insert(p->attrs.count("stroke-dasharray") ? p->attrs.at("stroke-dasharray") : "solid");
    EXPECT_EQ(dashes.size(), 2u);
  }
}

TEST(ReportCharts, LabelsAreEscapedEverywhere) {
  const std::string nasty = "<a&b>";
  LineChart line = sample_line_chart();
  line.title = line.x_title = line.y_title = line.series[0].name = nasty;
  Heatmap map;
  map.rows = 2;
  map.cols = 2;
  map.values = {0, 1, 2, 3};
  map.row_labels = {nasty, "r1"};
  map.col_labels = {nasty, "c1"};
  map.title = map.row_title = map.col_title = map.value_title = nasty;
  BarChart bars;
  bars.labels = {nasty, "x"};
  bars.values = {1, 2};
  bars.title = bars.x_title = bars.y_title = bars.reference_label = nasty;
  bars.reference = 1.5;
  Page page;
  page.title = page.subtitle = nasty;
  page.sections.push_back({nasty, nasty, Table{{nasty}, {{nasty}}}});
  for (const std::string& doc : {line_chart_svg(line), heatmap_svg(map), bar_chart_svg(bars), html_page(page)}) {
    EXPECT_EQ(doc.find(nasty), std::string::npos);
    EXPECT_NE(doc.find("&lt;a&amp;b&gt;"), std::string::npos);
    XmlNode root;
    ASSERT_NO_THROW(root = parse_xml(doc)) << doc;
    // And the reader sees the text itself, once decoded.
    bool seen = false;
    for (const char* element : {"text", "title", "h1", "td"})
      for (const XmlNode* n : find_all(root, element)) seen |= n->text == nasty || n->text.find(nasty) == 0;
    EXPECT_TRUE(seen);
  }
}

TEST(ReportCharts, HeatmapCellsShowTheirValuesAndColoursFollowThem) {
  Heatmap map;
  map.title = "specialisation";
  map.rows = 3;
  map.cols = 4;
  map.values = {0.0123, 0.25, 0.5, 0.987, 0.3333, 0.6667, 0.1, 0.9, 0.05, 0.45, 0.55, 0.75};
  map.row_labels = {"code", "math", "prose"};
  map.col_labels = {"E0", "E1", "E2", "E3"};
  map.value_title = "fraction of tokens";
  map.show_values = true;
  map.value_digits = 2;
  const std::string svg = heatmap_svg(map);
  XmlNode root;
  ASSERT_NO_THROW(root = parse_xml(svg)) << svg;
  std::vector<double> shown;
  for (const XmlNode* t : find_all(root, "text"))
    if (t->attrs.at("text-anchor") == "middle" && is_number(t->text) && t->attrs.at("font-size") == "10")
      shown.push_back(parse_number(t->text));
  ASSERT_EQ(shown.size(), map.values.size()) << svg;
  for (std::size_t i = 0; i < shown.size(); ++i)
    EXPECT_NEAR(shown[i], map.values[i], 0.05 * map.values[i] + 1e-12) << i;  // two digits
  // Cell colours: lighter for larger values (row-major order of the first 12 coloured rects).
  std::vector<std::pair<double, double>> value_lightness;
  std::size_t k = 0;
  for (const XmlNode* r : find_all(root, "rect")) {
    const auto fill = r->attrs.find("fill");
    if (fill == r->attrs.end() || fill->second == "none" || fill->second == "#ffffff") continue;
    if (k < map.values.size()) value_lightness.emplace_back(map.values[k++], cie_lightness(fill->second));
  }
  ASSERT_EQ(value_lightness.size(), map.values.size());
  std::sort(value_lightness.begin(), value_lightness.end());
  for (std::size_t i = 1; i < value_lightness.size(); ++i)
    EXPECT_GT(value_lightness[i].second, value_lightness[i - 1].second);
  // The colour bar's tick labels lie within the scale's range.
  for (const XmlNode* t : find_all(root, "text"))
    if (t->attrs.at("text-anchor") == "start" && is_number(t->text)) {
      EXPECT_GE(parse_number(t->text), 0.0123 - 1e-12);
      EXPECT_LE(parse_number(t->text), 0.987 + 1e-12);
    }
}

TEST(ReportCharts, BarChartIsWellFormedWithItsReferenceLine) {
  BarChart chart;
  chart.title = "final load";
  for (int e = 0; e < 16; ++e) {
    chart.labels.push_back("E" + std::to_string(e));
    chart.values.push_back(0.0625 * (1 + 0.5 * std::sin(e)));
  }
  chart.reference = 0.0625;
  chart.reference_label = "mean";
  const std::string svg = bar_chart_svg(chart);
  XmlNode root;
  ASSERT_NO_THROW(root = parse_xml(svg)) << svg;
  std::size_t bars = 0, dashed = 0;
  for (const XmlNode* r : find_all(root, "rect")) bars += r->attrs.count("fill") && r->attrs.at("fill") == "#4a72a8";
  for (const XmlNode* l : find_all(root, "line")) dashed += l->attrs.count("stroke-dasharray");
  EXPECT_EQ(bars, 16u);
  EXPECT_EQ(dashed, 1u);
  bool label = false;
  for (const XmlNode* t : find_all(root, "text")) label |= t->text == "mean 0.0625";
  EXPECT_TRUE(label);
}

TEST(ReportCharts, DegenerateDataStillGivesWellFormedCharts) {
  const double nan = std::nan("");
  std::vector<LineChart> lines(4);
  lines[1].series = {{"one point", {5}, {0.5}}};
  lines[2].series = {{"all missing", {0, 1}, {nan, nan}}, {"mismatched", {0, 1, 2}, {1}}};
  lines[3].log_y = true;
  lines[3].series = {{"non-positive", {0, 1, 2}, {0, -1, 0}}, {"flat", {0, 1}, {3, 3}}};
  for (const auto& chart : lines) EXPECT_NO_THROW(parse_xml(line_chart_svg(chart)));
  Heatmap empty;
  EXPECT_NO_THROW(parse_xml(heatmap_svg(empty)));
  Heatmap flat;
  flat.rows = 2;
  flat.cols = 3;
  flat.values = {1, 1, nan, 1, 1};  // one value short, one missing
  flat.show_values = true;
  EXPECT_NO_THROW(parse_xml(heatmap_svg(flat)));
  BarChart bars;
  EXPECT_NO_THROW(parse_xml(bar_chart_svg(bars)));
  bars.labels = {"a", "b"};
  bars.values = {-1, nan};
  EXPECT_NO_THROW(parse_xml(bar_chart_svg(bars)));
}

TEST(ReportCsv, SeriesJoinOnXAndValuesReadBackExactly) {
  const double third = 1.0 / 3;
  const std::vector<Series> series = {{"train", {0, 10, 20}, {third, 2.5e-7, std::nan("")}},
                                      {"held, \"out\"", {10, 30}, {-1e300, 4}}};
  EXPECT_EQ(series_csv("step", series),
            "step,train,\"held, \"\"out\"\"\"\n"
            "0,0.3333333333333333,\n"
            "10,2.5e-7,-1e300\n"
            "20,,\n"
            "30,,4\n");
  EXPECT_EQ(parse_number("0.3333333333333333"), third);
}

TEST(ReportPage, IsWellFormedSelfContainedXhtml) {
  Page page;
  page.title = "Routing report";
  page.subtitle = "synthetic";
  page.sections.push_back({"Loss", "Task loss over steps.", Svg{line_chart_svg(sample_line_chart())}});
  page.sections.push_back({"Configuration", "What produced it.", Table{{"key", "value"}, {{"experts", "8"}, {"k", "2"}}}});
  page.sections.push_back({"Notes", "Text only.", std::monostate{}});
  const std::string html = html_page(page);
  XmlNode root;
  ASSERT_NO_THROW(root = parse_xml(html)) << html;
  EXPECT_EQ(root.name, "html");
  EXPECT_EQ(root.attrs.at("xmlns"), "http://www.w3.org/1999/xhtml");
  EXPECT_EQ(find_all(root, "section").size(), 3u);
  EXPECT_EQ(find_all(root, "svg").size(), 1u);
  EXPECT_EQ(find_all(root, "td").size(), 4u);
  EXPECT_EQ(find_all(root, "script").size(), 0u);
  // Nothing to fetch: no links, no external images, styles or fonts.
  for (const char* external : {"<link", "<img", "src=", "href=", "@import", "url("})
    EXPECT_EQ(html.find(external), std::string::npos) << external;
}

// ---------------------------------------------------------------------------------------------

class ReportWriterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("moekit_report_" + std::string(info->name()) + "_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::vector<std::string> listing() const {
    std::vector<std::string> names;
    if (fs::exists(dir_))
      for (const auto& e : fs::directory_iterator(dir_)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }
  static std::string slurp(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
  }
  fs::path dir_;
};

TEST_F(ReportWriterTest, WritesUnderFinalNamesOnlyAtCommit) {
  {
    ReportWriter writer(dir_, false);
    writer.add("index.html", "<html/>");
    writer.add("loss.csv", "step,loss\n0,1\n");
    for (const auto& name : listing()) EXPECT_EQ(name[0], '.') << name;  // only hidden temporaries
    writer.commit("index.html");
  }
  EXPECT_EQ(listing(), (std::vector<std::string>{"index.html", "loss.csv"}));
  EXPECT_EQ(slurp(dir_ / "loss.csv"), "step,loss\n0,1\n");
}

TEST_F(ReportWriterTest, RefusesToOverwriteWithoutForceWithAOneLineMessage) {
  {
    ReportWriter writer(dir_, false);
    writer.add("index.html", "old");
    writer.commit();
  }
  try {
    ReportWriter writer(dir_, false);
    writer.add("index.html", "new");
    FAIL() << "overwrote without force";
  } catch (const OutputError& e) {
    const std::string message = e.what();
    EXPECT_EQ(message.find('\n'), std::string::npos);
    EXPECT_EQ(message.rfind((dir_ / "index.html").string() + ": expected ", 0), 0u) << message;
    EXPECT_NE(message.find(", got an existing file"), std::string::npos) << message;
  }
  EXPECT_EQ(slurp(dir_ / "index.html"), "old");
  EXPECT_EQ(listing(), (std::vector<std::string>{"index.html"}));  // no temporary left behind
  {
    ReportWriter writer(dir_, true);
    writer.add("index.html", "new");
    writer.commit();
  }
  EXPECT_EQ(slurp(dir_ / "index.html"), "new");
}

TEST_F(ReportWriterTest, AFileAppearingBeforeCommitIsNotClobbered) {
  ReportWriter writer(dir_, false);
  writer.add("a.csv", "mine");
  std::ofstream(dir_ / "a.csv") << "theirs";
  EXPECT_THROW(writer.commit(), OutputError);
  EXPECT_EQ(slurp(dir_ / "a.csv"), "theirs");
  EXPECT_EQ(listing(), (std::vector<std::string>{"a.csv"}));
}

TEST_F(ReportWriterTest, AnInterruptedReportLeavesNothingUnderTheFinalNames) {
  try {
    ReportWriter writer(dir_, false);
    writer.add("loss.csv", "step,loss\n");
    writer.add("metrics.json", "{}");
    throw std::runtime_error("training stopped");  // before the page is written and committed
  } catch (const std::runtime_error&) {
  }
  EXPECT_TRUE(fs::is_directory(dir_));
  EXPECT_EQ(listing(), std::vector<std::string>{});
}

TEST_F(ReportWriterTest, AWriteFailingMidwayLeavesNothingBehind) {
  {
    ReportWriter writer(dir_, false);
    writer.add("loss.csv", "step,loss\n");
    // Something already holds the second file's temporary name, so that file cannot be written.
    const fs::path blocker = dir_ / (".index.html.partial-" + std::to_string(::getpid()));
    fs::create_directories(blocker / "inside");
    EXPECT_THROW(writer.add("index.html", "<html/>"), OutputError);
  }
  // The first file's temporary is gone; the blocking directory, not the writer's, is left alone.
  EXPECT_EQ(listing(), (std::vector<std::string>{".index.html.partial-" + std::to_string(::getpid())}));
}

TEST_F(ReportWriterTest, AFailedCommitRemovesWhatItHadRenamed) {
  fs::create_directories(dir_ / "index.html");  // a directory cannot be replaced by a file
  {
    ReportWriter writer(dir_, true);
    writer.add("loss.csv", "step,loss\n");
    writer.add("index.html", "<html/>");
    EXPECT_THROW(writer.commit("index.html"), OutputError);
  }
  EXPECT_EQ(listing(), (std::vector<std::string>{"index.html"}));
  EXPECT_TRUE(fs::is_directory(dir_ / "index.html"));
}

TEST_F(ReportWriterTest, RejectsNamesWithDirectoriesAndAFileAsTheDirectory) {
  ReportWriter writer(dir_, false);
  EXPECT_THROW(writer.add("../escape.csv", "x"), OutputError);
  EXPECT_THROW(writer.add("", "x"), OutputError);
  writer.add("a.csv", "x");
  EXPECT_THROW(writer.add("a.csv", "y"), OutputError);
  std::ofstream(dir_ / "plain") << "x";
  EXPECT_THROW(ReportWriter(dir_ / "plain", true), OutputError);
}

// ---------------------------------------------------------------------------------------------
// An example report from synthetic data, written to the build directory for a look in a browser
// (report_example/index.html). Its checks are the same as above, on a page of realistic size.

TEST(ReportExample, WritesASyntheticTrainingReport) {
  constexpr int kExperts = 8, kSteps = 300, kDomains = 4, kEvery = 10;
  std::mt19937 rng(3);
  std::normal_distribution<double> noise(0, 1);
  Page page;
  page.title = "moekit train: routing report (synthetic data)";
  page.subtitle = "8 experts, top-2, 300 steps; every curve sampled every 10 steps";

  LineChart loss;
  loss.title = "Task loss";
  loss.x_title = "step";
  loss.y_title = "cross-entropy (nats/token)";
  loss.log_y = true;
  Series train{"train", {}, {}}, held{"held-out", {}, {}};
  LineChart aux = loss;
  aux.title = "Auxiliary losses";
  aux.y_title = "loss (unitless)";
  aux.series.clear();
  Series balance{"load-balancing loss", {}, {}}, z{"router z-loss", {}, {}};
  LineChart entropy{"Routing entropy", "step", "entropy (nats)", {}, false, 720, 300};
  Series mean_entropy{"per-token entropy", {}, {}}, load_entropy{"entropy of the mean load", {}, {}};
  LineChart dropped{"Dropped tokens", "step", "dropped fraction (of token slots)", {}, false, 720, 260};
  Series drop{"capacity factor 1.25", {}, {}};
  LineChart logit{"Largest router logit", "step", "max |logit|", {}, false, 720, 260};
  Series max_logit{"max over batch", {}, {}};
  Heatmap load;
  load.title = "Load per expert over steps";
  load.rows = kExperts;
  load.cols = kSteps / kEvery + 1;
  load.row_title = "expert";
  load.col_title = "step";
  load.value_title = "share of tokens";
  for (int e = 0; e < kExperts; ++e) load.row_labels.push_back("E" + std::to_string(e));
  load.values.assign(load.rows * load.cols, 0);
  for (int s = 0, c = 0; s <= kSteps; s += kEvery, ++c) {
    const double x = s;
    train.x.push_back(x);
    train.y.push_back(1.9 + 2.8 * std::exp(-x / 60) + 0.03 * noise(rng));
    held.x.push_back(x);
    held.y.push_back(2.05 + 2.7 * std::exp(-x / 70) + 0.02 * noise(rng));
    balance.x.push_back(x);
    balance.y.push_back(0.01 * (1 + 1.5 * std::exp(-x / 50)));
    z.x.push_back(x);
    z.y.push_back(2e-4 * (1 + 8 * std::exp(-x / 30)));
    mean_entropy.x.push_back(x);
    mean_entropy.y.push_back(0.35 + 1.7 * std::exp(-x / 80));
    load_entropy.x.push_back(x);
    load_entropy.y.push_back(std::log(8.0) - 0.15 * std::exp(-x / 100) - 0.01 * std::fabs(noise(rng)));
    drop.x.push_back(x);
    drop.y.push_back(std::max(0.0, 0.18 * std::exp(-x / 40) + 0.004 * noise(rng)));
    max_logit.x.push_back(x);
    max_logit.y.push_back(1.5 + 6 * (1 - std::exp(-x / 120)));
    load.col_labels.push_back(std::to_string(s));
    double total = 0;
    for (int e = 0; e < kExperts; ++e) {
      const double v = std::exp(0.8 * std::exp(-x / 90) * std::sin(1.3 * e) + 0.05 * noise(rng));
      load.values[e * load.cols + c] = v;
      total += v;
    }
    for (int e = 0; e < kExperts; ++e) load.values[e * load.cols + c] /= total;
  }
  loss.series = {train, held};
  aux.series = {balance, z};
  entropy.series = {mean_entropy, load_entropy};
  dropped.series = {drop};
  logit.series = {max_logit};

  // Domain × expert: each domain prefers two experts.
  Heatmap spec;
  spec.title = "Domain \xC3\x97 expert specialisation";
  spec.rows = kDomains;
  spec.cols = kExperts;
  spec.row_labels = {"code", "math", "prose", "dialogue"};
  for (int e = 0; e < kExperts; ++e) spec.col_labels.push_back("E" + std::to_string(e));
  spec.row_title = "domain";
  spec.col_title = "expert";
  spec.value_title = "P(expert | domain)";
  spec.show_values = true;
  spec.value_min = 0;
  std::vector<double> joint(kDomains * kExperts);
  for (int d = 0; d < kDomains; ++d) {
    double total = 0;
    for (int e = 0; e < kExperts; ++e) total += joint[d * kExperts + e] = (e / 2 == d ? 6.0 : 1.0) + 0.3 * std::fabs(noise(rng));
    for (int e = 0; e < kExperts; ++e) joint[d * kExperts + e] /= total;
  }
  spec.values = joint;
  double mi = 0;  // domains equally likely
  for (int e = 0; e < kExperts; ++e) {
    double pe = 0;
    for (int d = 0; d < kDomains; ++d) pe += joint[d * kExperts + e] / kDomains;
    for (int d = 0; d < kDomains; ++d) {
      const double p = joint[d * kExperts + e] / kDomains;
      mi += p * std::log(p / (pe / kDomains));
    }
  }

  Heatmap cosine;
  cosine.title = "Router prototypes against domain centres";
  cosine.rows = kExperts;
  cosine.cols = kDomains;
  cosine.row_labels = load.row_labels;
  cosine.col_labels = spec.row_labels;
  cosine.row_title = "expert (router row)";
  cosine.col_title = "domain centre";
  cosine.value_title = "cosine similarity";
  cosine.value_min = -1;
  cosine.value_max = 1;
  cosine.show_values = true;
  for (int e = 0; e < kExperts; ++e)
    for (int d = 0; d < kDomains; ++d)
      cosine.values.push_back(std::clamp((e / 2 == d ? 0.7 : -0.1) + 0.1 * noise(rng), -1.0, 1.0));

  Heatmap weights;
  weights.title = "Router weight rows (prototypes)";
  weights.rows = kExperts;
  weights.cols = 32;
  weights.row_labels = load.row_labels;
  for (int j = 0; j < 32; ++j) weights.col_labels.push_back(std::to_string(j));
  weights.row_title = "expert";
  weights.col_title = "model dimension";
  weights.value_title = "weight";
  for (int i = 0; i < kExperts * 32; ++i) weights.values.push_back(0.2 * noise(rng));

  BarChart final_load;
  final_load.title = "Final load per expert";
  final_load.x_title = "expert";
  final_load.y_title = "share of tokens";
  final_load.reference = 1.0 / kExperts;
  final_load.reference_label = "uniform";
  for (int e = 0; e < kExperts; ++e) {
    final_load.labels.push_back(load.row_labels[e]);
    final_load.values.push_back(load.values[e * load.cols + load.cols - 1]);
  }

  page.sections.push_back({"Task loss", "Cross-entropy on the training batches and on held-out data (log scale).",
                           Svg{line_chart_svg(loss)}});
  page.sections.push_back({"Auxiliary losses", "Load-balancing loss and router z-loss, before their coefficients.",
                           Svg{line_chart_svg(aux)}});
  page.sections.push_back({"Load per expert", "Share of the batch's token slots each expert received at each step.",
                           Svg{heatmap_svg(load)}});
  page.sections.push_back({"Routing entropy", "Mean entropy of the per-token routing distribution, and the entropy of the mean load (ln 8 = 2.08 is uniform).",
                           Svg{line_chart_svg(entropy)}});
  page.sections.push_back({"Dropped tokens", "Fraction of token slots beyond an expert's capacity.", Svg{line_chart_svg(dropped)}});
  page.sections.push_back({"Router logits", "Largest absolute router logit in the batch.", Svg{line_chart_svg(logit)}});
  page.sections.push_back({"Specialisation", "Share of each domain's tokens routed to each expert; mutual information between domain and expert: " +
                                                 format_number(mi, 3) + " nats.",
                           Svg{heatmap_svg(spec)}});
  page.sections.push_back({"Prototypes", "Cosine similarity between each router weight row and each domain's mean input.",
                           Svg{heatmap_svg(cosine)}});
  page.sections.push_back({"Router weights", "The router's weight rows over the first 32 model dimensions.", Svg{heatmap_svg(weights)}});
  page.sections.push_back({"Final load", "Share of tokens per expert at the last step; the dashed line is the uniform share.",
                           Svg{bar_chart_svg(final_load)}});
  page.sections.push_back({"Configuration", "The configuration that produced this report.",
                           Table{{"key", "value"}, {{"experts", "8"}, {"top_k", "2"}, {"capacity_factor", "1.25"},
                                                    {"aux_loss_coef", "0.01"}, {"z_loss_coef", "0.001"}, {"steps", "300"}}}});
  const std::string html = html_page(page);
  XmlNode root;
  ASSERT_NO_THROW(root = parse_xml(html));
  EXPECT_EQ(find_all(root, "svg").size(), 10u);

  const std::string csv = series_csv("step", loss.series);
  const fs::path dir = fs::path(MOEKIT_BINARY_DIR) / "report_example";
  ReportWriter writer(dir, true);
  writer.add("task_loss.csv", csv);
  writer.add("index.html", html);
  writer.commit("index.html");
  EXPECT_TRUE(fs::exists(dir / "index.html"));
}

}  // namespace
