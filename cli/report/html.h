// A self-contained report page: inline CSS, inline SVG, no scripts and nothing fetched from the
// network, so that it opens offline and reads the same when printed. The page is well-formed
// XML (XHTML-style self-closed tags, only the five predefined entities), so that it can be
// checked and processed by any XML parser as well as read in a browser.
#pragma once

#include <string>
#include <variant>
#include <vector>

namespace moekit::report {

// Markup from the chart functions (svg.h), included in the page as is.
struct Svg {
  std::string markup;
};

// An HTML table; every cell is plain text and is escaped.
struct Table {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
};

struct Section {
  std::string heading;
  std::string text;  // a sentence saying what the figure shows and how to read it
  std::variant<std::monostate, Svg, Table> body;
};

struct Page {
  std::string title;
  std::string subtitle;  // e.g. what was run and when; may be empty
  std::vector<Section> sections;
};

// The whole page as XHTML text.
std::string html_page(const Page& page);

// An HTML table element alone, for callers that build their own sections.
std::string html_table(const Table& table);

}  // namespace moekit::report
