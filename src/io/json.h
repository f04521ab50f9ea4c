// The strict JSON layer every moekit document is read through: the routing configuration, the
// layer configuration, the presets (src/presets/*.json), the `moekit route` INPUT, a model's
// config.json, safetensors headers and checkpoint indexes. One set of readers means one wording: a
// fault names the field's full path (`num_experts`, `logits[0][2]`, `routing.top_k`), what was
// expected and what was found, in the shape "<path>: expected <what>, got <actual>", whichever
// document it is in.
//
// Strict means: a repeated key is an error (nlohmann keeps only the last one, which would hide
// a mistake), a key nobody asked for is an error (a typo must not fall back to a default), and
// nothing is converted or clamped: 8.0 is not an integer, "8" is not a number, null is not NaN.
// Documents moekit does not define keep their own rules on top of the parser: a config.json
// holds keys no family reads, and the files' readers word their messages as they always have
// ("<file>: header: ...", "config.json <key>: ...") through parse_json and Value::fail.
#pragma once

#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moekit::io {

using Json = nlohmann::json;

// Which document is being read: it picks the exception (ConfigError or InputError) and the name
// whole-document faults are reported under ("config", "input").
enum class Document { kConfig, kInput };

const char* document_name(Document document);

// Throws the document's exception with "<path>: expected <expected>, got <actual>".
[[noreturn]] void fail(Document document, const std::string& path, const std::string& expected,
                       const std::string& actual);

// How a value is shown as the "actual" part: its JSON type first, since that is usually what
// was wrong, then the value, cut at 40 characters ("string \"8\"", "number 8.5", "null").
std::string describe(const Json& value);

// Shortest text that reads back as the same double ("0.1", not "0.10000000000000001").
std::string format_number(double value);

std::string quote(std::string_view text);

// The closest candidate by edit distance, or "" when none is close enough to be a typo.
std::string closest_name(std::string_view name, const std::vector<std::string>& candidates);

// Deepest nesting of arrays and objects accepted in any document moekit reads (a config.json
// nests a few levels; safetensors headers three). nlohmann's values are destroyed, compared and
// printed recursively, so a text nested thousands deep would overflow the stack: such a text
// is rejected before it is parsed.
inline constexpr int kMaxJsonDepth = 128;

// The nesting depth of the JSON text [begin, end), counted over brackets outside strings;
// stops counting (and returns) once it exceeds `stop_above`.
int json_nesting_depth(const char* begin, const char* end, int stop_above = kMaxJsonDepth);

// A text read as JSON without throwing, for the readers that word whole-text faults their own
// way (a safetensors header names its file and "header", config.json itself): each fault is
// reported here and the caller turns it into its message.
struct ParsedJson {
  Json root;                  // null unless the text is JSON and not too deep
  bool too_deep = false;      // nested deeper than kMaxJsonDepth: not parsed at all
  std::string invalid;        // not JSON: the parser's message; "" when it is JSON
  std::string repeated_path;  // the first key repeated within one object, by its full path
                              // (`a.b`, `rows[2].name`); "" when none is
};
ParsedJson parse_json(std::string_view text);

// Parses `text` as one JSON object. Invalid JSON, nesting deeper than kMaxJsonDepth, a root that
// is not an object and a key repeated in any object (named by its full path, e.g. `a.b` or
// `rows[2].name`) are rejected. `file`, when given, names the text in place of the document's
// name ("src/presets/megatron.json: expected a JSON object, ...") and comes before every path
// ("src/presets/megatron.json: routing.top_k: ...").
Json parse_object(const std::string& text, Document document, const std::string& file = "");

// One accepted spelling of an enum value.
template <typename E>
struct EnumName {
  E value;
  std::string_view name;
};

// "one of a, b, c"
template <typename E>
std::string enum_choices(std::span<const EnumName<E>> names) {
  std::string out = "one of ";
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out += ", ";
    out += names[i].name;
  }
  return out;
}

// A [rows][cols] matrix of finite numbers, row-major.
struct NumberMatrix {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<double> values;
};

// One JSON value and the path it was found at. The readers check the type (and the range where
// one is given) and throw with the path otherwise.
class Value {
 public:
  Value(const Json& json, std::string path, Document document)
      : json_(&json), path_(std::move(path)), document_(document) {}

  const Json& json() const { return *json_; }
  const std::string& path() const { return path_; }
  Document document() const { return document_; }
  bool is_null() const { return json_->is_null(); }

  // "<path>: expected <expected>, got <actual>"
  [[noreturn]] void fail(const std::string& expected, const std::string& actual) const;

  // "an integer" (8.0 is a float in JSON and is rejected), within [min, max].
  int64_t integer(int64_t min = std::numeric_limits<int64_t>::min(),
                  int64_t max = std::numeric_limits<int64_t>::max()) const;
  // "an integer >= 0" up to 2^64 - 1 (seeds).
  uint64_t unsigned_integer() const;
  // "a finite number": JSON has no NaN or infinity, but an out-of-range literal such as 1e999
  // parses to infinity and some writers spell NaN as null; both are rejected here.
  double number() const;
  // "a finite number" within [min, max].
  double number(double min, double max) const;
  bool boolean() const;
  std::string string() const;

  // A string naming one of `names`; its spellings are listed when it is not.
  template <typename E>
  E enumeration(std::span<const EnumName<E>> names) const {
    if (!json_->is_string()) fail("a string, " + enum_choices(names), describe(*json_));
    const std::string text = json_->get<std::string>();
    for (const auto& entry : names) {
      if (entry.name == text) return entry.value;
    }
    fail(enum_choices(names), quote(text));
  }

  // An array; elements are named `<path>[i]`.
  std::size_t array_size() const;  // "an array"
  Value element(std::size_t index) const;
  std::vector<double> numbers() const;      // "an array of numbers", each "a finite number"
  std::vector<int64_t> integers(int64_t min = std::numeric_limits<int64_t>::min(),
                                int64_t max = std::numeric_limits<int64_t>::max()) const;
  // A non-empty array of non-empty rows of equal length; each entry "a finite number", named
  // `<path>[row][col]`.
  NumberMatrix number_matrix() const;
  std::vector<std::string> strings() const;  // "an array of strings", each "a string"
  // An object's members in key order, each named `<path>.<key>`; "a JSON object" otherwise.
  std::vector<std::pair<std::string, Value>> members() const;

 private:
  const Json* json_;
  std::string path_;
  Document document_;
};

// Walks one JSON object. Each key is taken at most once; every key asked for (present or not) is
// remembered, so that reject_unknown_keys() can name a key nobody took and suggest the closest
// key that was asked for. Keys are named `<prefix><key>`; a nested object's reader gets the
// prefix `<path>.`.
class ObjectReader {
 public:
  // `object` must outlive the reader. Not an object: "<name>: expected a JSON object, got ...",
  // where name is the prefix without its dot, or the document's name at the root.
  ObjectReader(const Json& object, Document document, std::string prefix = "");
  // The object held by `value`, keys prefixed with `<value.path()>.`.
  explicit ObjectReader(const Value& value);

  Document document() const { return document_; }
  std::string path(std::string_view key) const { return prefix_ + std::string(key); }

  // Present and not taken yet.
  bool contains(std::string_view key) const;
  // The value under `key`, taken or not, without taking it: for documents whose keys are read
  // where they are needed, and whose other keys are not an error (a model's config.json).
  std::optional<Value> peek(std::string_view key) const;
  // The value under `key` unless it is absent or already taken; marks it taken.
  std::optional<Value> take(std::string_view key);
  // The same, where `keys` are spellings of one field (a key and its aliases): at most one of
  // them may be given, otherwise "<canonical>: expected one key for this field, got both ...".
  // An alias is named "<alias> (alias of <canonical>)", so the message points at the text as
  // written and at the field's documented name. `which`, when given, receives the index of the
  // spelling found.
  std::optional<Value> take_one_of(std::span<const std::string> keys, const std::string& canonical,
                                   std::size_t* which = nullptr);

  // Typed shorthands: nullopt when the key is absent.
  std::optional<int64_t> integer(std::string_view key,
                                 int64_t min = std::numeric_limits<int64_t>::min(),
                                 int64_t max = std::numeric_limits<int64_t>::max());
  std::optional<double> number(std::string_view key);
  std::optional<bool> boolean(std::string_view key);
  std::optional<std::string> string(std::string_view key);
  template <typename E>
  std::optional<E> enumeration(std::string_view key, std::span<const EnumName<E>> names) {
    auto value = take(key);
    if (!value) return std::nullopt;
    return value->enumeration(names);
  }

  // Every present key nobody took: "<path>: expected a known <document> key (did you mean
  // \"...\"?), got unknown key \"...\"", for the first such key in key order.
  void reject_unknown_keys() const;

 private:
  const Json* object_;
  Document document_;
  std::string prefix_;
  std::set<std::string, std::less<>> taken_;
  std::set<std::string, std::less<>> asked_;
};

}  // namespace moekit::io
