#include "report/html.h"

#include "report/svg.h"

namespace moekit::report {

namespace {

// Grey-safe styling: black text, ruled tables, no colour carrying meaning. The figures keep
// their natural size on screen and shrink to the page width when printed.
constexpr const char* kStyle =
    "body{font-family:'DejaVu Sans',Arial,Helvetica,sans-serif;color:#000;background:#fff;"
    "max-width:1000px;margin:1.5em auto;padding:0 1em;line-height:1.4}"
    "h1{font-size:1.5em;margin-bottom:0.2em}"
    "h2{font-size:1.15em;margin:1.6em 0 0.3em;border-bottom:1px solid #888}"
    "p.subtitle{color:#333;margin-top:0}"
    "figure{margin:0.5em 0}"
    "svg{max-width:100%;height:auto}"
    "table{border-collapse:collapse;font-size:0.9em;margin:0.5em 0}"
    "th,td{border:1px solid #888;padding:0.2em 0.6em;text-align:left;vertical-align:top}"
    "td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "th{background:#eee}"
    "section{page-break-inside:avoid;break-inside:avoid}";

// Cells that read as numbers are right-aligned so that columns of figures line up.
bool looks_numeric(const std::string& s) {
  if (s.empty()) return false;
  std::size_t digits = 0;
  for (char c : s) {
    if (c >= '0' && c <= '9') ++digits;
    else if (c != '.' && c != '-' && c != '+' && c != 'e' && c != 'E' && c != '%') return false;
  }
  return digits > 0;
}

}  // namespace

std::string html_table(const Table& table) {
  std::string out = "<table>\n";
  if (!table.header.empty()) {
    out += "<thead><tr>";
    for (const auto& h : table.header) out += "<th>" + xml_escape(h) + "</th>";
    out += "</tr></thead>\n";
  }
  out += "<tbody>\n";
  for (const auto& row : table.rows) {
    out += "<tr>";
    for (const auto& cell : row)
      out += (looks_numeric(cell) ? "<td class=\"num\">" : "<td>") + xml_escape(cell) + "</td>";
    out += "</tr>\n";
  }
  out += "</tbody>\n</table>\n";
  return out;
}

std::string html_page(const Page& page) {
  std::string out =
      "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\">\n<head>\n"
      "<meta charset=\"utf-8\"/>\n<title>" +
      xml_escape(page.title) + "</title>\n<style>" + kStyle + "</style>\n</head>\n<body>\n";
  out += "<h1>" + xml_escape(page.title) + "</h1>\n";
  if (!page.subtitle.empty()) out += "<p class=\"subtitle\">" + xml_escape(page.subtitle) + "</p>\n";
  for (const auto& section : page.sections) {
    out += "<section>\n<h2>" + xml_escape(section.heading) + "</h2>\n";
    if (!section.text.empty()) out += "<p>" + xml_escape(section.text) + "</p>\n";
    if (const auto* svg = std::get_if<Svg>(&section.body)) out += "<figure>\n" + svg->markup + "</figure>\n";
    if (const auto* table = std::get_if<Table>(&section.body)) out += html_table(*table);
    out += "</section>\n";
  }
  out += "</body>\n</html>\n";
  return out;
}

}  // namespace moekit::report
