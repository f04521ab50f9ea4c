// A small XML well-formedness checker for the tests (the report pages and their SVG must parse
// as XML): written here so that it shares no code with the writer it checks.
#pragma once

#include <cstddef>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace moekit::xml_check {

// ---------------------------------------------------------------------------------------------
// A small XML well-formedness checker (XML 1.0 without DTD internal subsets): nesting, names,
// attribute quoting and uniqueness, entity and character references, comments, CDATA and
// processing instructions. It builds a tree so that tests can look at what a viewer would show.

struct XmlNode {
  std::string name;
  std::map<std::string, std::string> attrs;
  std::vector<XmlNode> children;
  std::string text;  // the direct character data, references decoded
};

class XmlParser {
 public:
  explicit XmlParser(std::string_view s) : s_(s) {}

  XmlNode parse() {
    if (starts("\xEF\xBB\xBF")) i_ += 3;
    if (starts("<?xml")) processing_instruction();
    misc();
    if (starts("<!DOCTYPE")) {
      const auto end = s_.find('>', i_);
      if (end == std::string_view::npos || s_.substr(i_, end - i_).find('[') != std::string_view::npos)
        fail("unsupported or unterminated DOCTYPE");
      i_ = end + 1;
      misc();
    }
    if (!starts("<")) fail("expected the root element");
    XmlNode root = element();
    misc();
    if (i_ != s_.size()) fail("content after the root element");
    return root;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    const std::size_t from = i_ > 30 ? i_ - 30 : 0;
    throw std::runtime_error("XML error at offset " + std::to_string(i_) + ": " + what + " near '" +
                             std::string(s_.substr(from, 60)) + "'");
  }
  bool starts(std::string_view p) const { return s_.substr(i_, p.size()) == p; }
  void expect(std::string_view p) {
    if (!starts(p)) fail("expected '" + std::string(p) + "'");
    i_ += p.size();
  }
  static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
  void spaces() {
    while (i_ < s_.size() && is_space(s_[i_])) ++i_;
  }
  static bool name_start(unsigned char c) { return std::isalpha(c) || c == '_' || c == ':' || c >= 0x80; }
  static bool name_char(unsigned char c) { return name_start(c) || std::isdigit(c) || c == '-' || c == '.'; }
  std::string name() {
    if (i_ >= s_.size() || !name_start(static_cast<unsigned char>(s_[i_]))) fail("expected a name");
    const std::size_t start = i_;
    while (i_ < s_.size() && name_char(static_cast<unsigned char>(s_[i_]))) ++i_;
    return std::string(s_.substr(start, i_ - start));
  }
  void misc() {
    for (;;) {
      spaces();
      if (starts("<!--")) comment();
      else if (starts("<?")) processing_instruction();
      else return;
    }
  }
  void comment() {
    expect("<!--");
    const auto end = s_.find("--", i_);
    if (end == std::string_view::npos) fail("unterminated comment");
    i_ = end;
    expect("-->");  // "--" inside a comment is not allowed
  }
  void processing_instruction() {
    const auto end = s_.find("?>", i_);
    if (end == std::string_view::npos) fail("unterminated processing instruction");
    i_ = end + 2;
  }
  static void append_utf8(std::string& out, unsigned long cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  void reference(std::string& out) {
    expect("&");
    const auto end = s_.find(';', i_);
    if (end == std::string_view::npos || end - i_ > 10) fail("unterminated reference");
    const std::string_view ref = s_.substr(i_, end - i_);
    static const std::map<std::string_view, char> kNamed = {
        {"amp", '&'}, {"lt", '<'}, {"gt", '>'}, {"quot", '"'}, {"apos", '\''}};
    if (auto it = kNamed.find(ref); it != kNamed.end()) {
      out += it->second;
    } else if (ref.size() > 1 && ref[0] == '#') {
      const bool hex = ref[1] == 'x';
      const std::string digits(ref.substr(hex ? 2 : 1));
      if (digits.empty() || digits.find_first_not_of(hex ? "0123456789abcdefABCDEF" : "0123456789") !=
                                std::string::npos)
        fail("bad character reference");
      append_utf8(out, std::stoul(digits, nullptr, hex ? 16 : 10));
    } else {
      fail("undefined entity '&" + std::string(ref) + ";'");
    }
    i_ = end + 1;
  }
  void check_char(char c) {
    if (static_cast<unsigned char>(c) < 0x20 && !is_space(c)) fail("control character");
  }
  XmlNode element() {
    expect("<");
    XmlNode node;
    node.name = name();
    for (;;) {
      const std::size_t before = i_;
      spaces();
      if (starts("/>")) {
        i_ += 2;
        return node;
      }
      if (starts(">")) {
        ++i_;
        break;
      }
      if (i_ == before) fail("expected a space before an attribute");
      const std::string key = name();
      spaces();
      expect("=");
      spaces();
      if (i_ >= s_.size() || (s_[i_] != '"' && s_[i_] != '\'')) fail("unquoted attribute value");
      const char quote = s_[i_++];
      std::string value;
      while (i_ < s_.size() && s_[i_] != quote) {
        if (s_[i_] == '<') fail("'<' in an attribute value");
        if (s_[i_] == '&') {
          reference(value);
        } else {
          check_char(s_[i_]);
          value += s_[i_++];
        }
      }
      expect(std::string_view(&quote, 1));
      if (!node.attrs.emplace(key, value).second) fail("duplicate attribute '" + key + "'");
    }
    for (;;) {
      if (i_ >= s_.size()) fail("unclosed element <" + node.name + ">");
      if (starts("</")) {
        i_ += 2;
        const std::string closing = name();
        if (closing != node.name) fail("</" + closing + "> closes <" + node.name + ">");
        spaces();
        expect(">");
        return node;
      }
      if (starts("<!--")) {
        comment();
      } else if (starts("<![CDATA[")) {
        i_ += 9;
        const auto end = s_.find("]]>", i_);
        if (end == std::string_view::npos) fail("unterminated CDATA");
        node.text += s_.substr(i_, end - i_);
        i_ = end + 3;
      } else if (starts("<?")) {
        processing_instruction();
      } else if (starts("<")) {
        node.children.push_back(element());
      } else if (starts("&")) {
        reference(node.text);
      } else {
        if (starts("]]>")) fail("']]>' in character data");
        check_char(s_[i_]);
        node.text += s_[i_++];
      }
    }
  }

  std::string_view s_;
  std::size_t i_ = 0;
};

inline XmlNode parse_xml(const std::string& text) { return XmlParser(text).parse(); }

}  // namespace moekit::xml_check
