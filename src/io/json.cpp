#include "io/json.h"

#include <algorithm>
#include <charconv>
#include <cmath>

#include "moekit/error.h"

namespace moekit::io {

const char* document_name(Document document) {
  return document == Document::kConfig ? "config" : "input";
}

namespace {

// The noun of the unknown-key message: "a known configuration key", "a known input key".
const char* key_noun(Document document) {
  return document == Document::kConfig ? "configuration" : "input";
}

std::size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> previous(b.size() + 1), current(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) previous[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    current[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t substitution = previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      current[j] = std::min({previous[j] + 1, current[j - 1] + 1, substitution});
    }
    std::swap(previous, current);
  }
  return previous[b.size()];
}

std::string range_text(int64_t min, int64_t max) {
  constexpr int64_t kLowest = std::numeric_limits<int64_t>::min();
  constexpr int64_t kHighest = std::numeric_limits<int64_t>::max();
  if (min == kLowest) return "<= " + std::to_string(max);
  if (max == kHighest) return ">= " + std::to_string(min);
  return "in [" + std::to_string(min) + ", " + std::to_string(max) + "]";
}

std::string range_text(double min, double max) {
  if (min == -std::numeric_limits<double>::infinity()) return "a finite number <= " + format_number(max);
  if (max == std::numeric_limits<double>::infinity()) return "a finite number >= " + format_number(min);
  return "a number in [" + format_number(min) + ", " + format_number(max) + "]";
}

// Where the parser is while it reads: one frame per open object or array.
struct Frame {
  bool is_array = false;
  std::size_t index = 0;  // arrays: the element being read
  std::string key;        // objects: the key being read
  std::set<std::string, std::less<>> keys;
};

// "a.b", "rows[2].name": the path of the key or element being read.
std::string path_of(const std::vector<Frame>& frames) {
  std::string path;
  for (const Frame& frame : frames) {
    if (frame.is_array) {
      path += '[';
      path += std::to_string(frame.index);
      path += ']';
    } else {
      if (!path.empty()) path += ".";
      path += frame.key;
    }
  }
  return path;
}

}  // namespace

void fail(Document document, const std::string& path, const std::string& expected,
          const std::string& actual) {
  if (document == Document::kConfig) throw_config_error(path, expected, actual);
  throw_input_error(path, expected, actual);
}

std::string format_number(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), value);
  return std::string(buffer, result.ptr);
}

std::string quote(std::string_view text) {
  std::string out;
  out.reserve(text.size() + 2);
  out += '"';
  out += text;
  out += '"';
  return out;
}

std::string describe(const Json& value) {
  if (value.is_null()) return "null";
  // nlohmann writes a non-finite double as null, which would hide what the value was.
  if (value.is_number_float() && !std::isfinite(value.get<double>())) {
    return "number " + format_number(value.get<double>());
  }
  constexpr std::size_t kMaxShown = 40;
  std::string text = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (text.size() > kMaxShown) text = text.substr(0, kMaxShown - 3) + "...";
  return std::string(value.type_name()) + " " + text;
}

std::string closest_name(std::string_view name, const std::vector<std::string>& candidates) {
  std::string best;
  std::size_t best_distance = std::numeric_limits<std::size_t>::max();
  for (const auto& candidate : candidates) {
    const std::size_t distance = edit_distance(name, candidate);
    if (distance < best_distance) {
      best_distance = distance;
      best = candidate;
    }
  }
  const std::size_t limit = std::max<std::size_t>(2, name.size() / 3);
  return best_distance <= limit ? best : std::string();
}

int json_nesting_depth(const char* begin, const char* end, int stop_above) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (const char* p = begin; p != end; ++p) {
    const char ch = *p;
    if (in_string) {
      if (escaped) escaped = false;
      else if (ch == '\\') escaped = true;
      else if (ch == '"') in_string = false;
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '[' || ch == '{') {
      deepest = std::max(deepest, ++depth);
      if (deepest > stop_above) return deepest;
    } else if ((ch == ']' || ch == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

ParsedJson parse_json(std::string_view text) {
  ParsedJson parsed;
  const char* begin = text.data();
  const char* end = begin + text.size();
  if (json_nesting_depth(begin, end) > kMaxJsonDepth) {
    parsed.too_deep = true;
    return parsed;
  }
  // nlohmann keeps the last of repeated keys without a word, so repeats are caught while
  // parsing, at any depth; the first one found is reported once the text is known to be JSON.
  std::vector<Frame> frames;
  auto element_done = [&frames] {
    if (!frames.empty() && frames.back().is_array) ++frames.back().index;
  };
  const Json::parser_callback_t on_event = [&](int, Json::parse_event_t event, Json& value) {
    switch (event) {
      case Json::parse_event_t::object_start: frames.emplace_back(); break;
      case Json::parse_event_t::array_start:
        frames.emplace_back();
        frames.back().is_array = true;
        break;
      case Json::parse_event_t::key: {
        Frame& frame = frames.back();
        frame.key = value.get<std::string>();
        if (!frame.keys.insert(frame.key).second && parsed.repeated_path.empty()) {
          parsed.repeated_path = path_of(frames);
        }
        break;
      }
      case Json::parse_event_t::object_end:
      case Json::parse_event_t::array_end:
        frames.pop_back();
        element_done();
        break;
      case Json::parse_event_t::value: element_done(); break;
    }
    return true;
  };
  try {
    parsed.root = Json::parse(begin, end, on_event);
  } catch (const Json::exception& error) {
    // parse_error, and out_of_range for a number literal beyond double (1e999).
    parsed.invalid = error.what();
    parsed.repeated_path.clear();
  }
  return parsed;
}

Json parse_object(const std::string& text, Document document, const std::string& file) {
  const std::string name = file.empty() ? std::string(document_name(document)) : file;
  ParsedJson parsed = parse_json(text);
  if (parsed.too_deep) {
    fail(document, name, "a JSON object", detail::concat("nesting deeper than ", kMaxJsonDepth, " levels"));
  }
  if (!parsed.invalid.empty()) fail(document, name, "a JSON object", "invalid JSON (" + parsed.invalid + ")");
  if (!parsed.root.is_object()) fail(document, name, "a JSON object", describe(parsed.root));
  if (!parsed.repeated_path.empty()) {
    const std::string path = file.empty() ? parsed.repeated_path : file + ": " + parsed.repeated_path;
    fail(document, path, "the key at most once", "it repeated");
  }
  return std::move(parsed.root);
}

// ---------------------------------------------------------------------------------------------
// Value

void Value::fail(const std::string& expected, const std::string& actual) const {
  io::fail(document_, path_, expected, actual);
}

int64_t Value::integer(int64_t min, int64_t max) const {
  constexpr int64_t kLowest = std::numeric_limits<int64_t>::min();
  constexpr int64_t kHighest = std::numeric_limits<int64_t>::max();
  const bool ranged = min != kLowest || max != kHighest;
  const std::string what = ranged ? "an integer " + range_text(min, max) : "an integer";
  if (!json_->is_number_integer()) fail(what, describe(*json_));
  if (json_->is_number_unsigned() && json_->get<uint64_t>() > static_cast<uint64_t>(kHighest)) {
    fail(ranged ? what : "an integer in the int64 range", describe(*json_));
  }
  const int64_t value = json_->get<int64_t>();
  if (value < min || value > max) fail(range_text(min, max), std::to_string(value));
  return value;
}

uint64_t Value::unsigned_integer() const {
  // nlohmann stores every non-negative integer literal as unsigned, so anything else is
  // negative, fractional or not a number.
  if (!json_->is_number_unsigned()) fail("an integer >= 0", describe(*json_));
  return json_->get<uint64_t>();
}

double Value::number() const {
  if (!json_->is_number() || !std::isfinite(json_->get<double>())) {
    fail("a finite number", describe(*json_));
  }
  return json_->get<double>();
}

double Value::number(double min, double max) const {
  const double value = number();
  if (!(value >= min && value <= max)) fail(range_text(min, max), format_number(value));
  return value;
}

bool Value::boolean() const {
  if (!json_->is_boolean()) fail("a boolean", describe(*json_));
  return json_->get<bool>();
}

std::string Value::string() const {
  if (!json_->is_string()) fail("a string", describe(*json_));
  return json_->get<std::string>();
}

std::size_t Value::array_size() const {
  if (!json_->is_array()) fail("an array", describe(*json_));
  return json_->size();
}

Value Value::element(std::size_t index) const {
  return Value((*json_)[index], path_ + "[" + std::to_string(index) + "]", document_);
}

std::vector<double> Value::numbers() const {
  if (!json_->is_array()) fail("an array of numbers", describe(*json_));
  std::vector<double> out;
  out.reserve(json_->size());
  for (std::size_t i = 0; i < json_->size(); ++i) out.push_back(element(i).number());
  return out;
}

std::vector<int64_t> Value::integers(int64_t min, int64_t max) const {
  if (!json_->is_array()) fail("an array of integers", describe(*json_));
  std::vector<int64_t> out;
  out.reserve(json_->size());
  for (std::size_t i = 0; i < json_->size(); ++i) out.push_back(element(i).integer(min, max));
  return out;
}

std::vector<std::string> Value::strings() const {
  if (!json_->is_array()) fail("an array of strings", describe(*json_));
  std::vector<std::string> out;
  out.reserve(json_->size());
  for (std::size_t i = 0; i < json_->size(); ++i) out.push_back(element(i).string());
  return out;
}

std::vector<std::pair<std::string, Value>> Value::members() const {
  if (!json_->is_object()) fail("a JSON object", describe(*json_));
  std::vector<std::pair<std::string, Value>> out;
  out.reserve(json_->size());
  for (const auto& [key, value] : json_->items()) out.emplace_back(key, Value(value, path_ + "." + key, document_));
  return out;
}

NumberMatrix Value::number_matrix() const {
  if (!json_->is_array() || json_->empty()) fail("a non-empty array of rows", describe(*json_));
  NumberMatrix m;
  m.rows = static_cast<int64_t>(json_->size());
  const Json& first = (*json_)[0];
  if (!first.is_array() || first.empty()) {
    element(0).fail("a non-empty array of numbers", describe(first));
  }
  m.cols = static_cast<int64_t>(first.size());
  m.values.reserve(static_cast<std::size_t>(m.rows * m.cols));
  for (std::size_t r = 0; r < json_->size(); ++r) {
    const Value row = element(r);
    if (!row.json().is_array()) row.fail("an array of numbers", describe(row.json()));
    if (static_cast<int64_t>(row.json().size()) != m.cols) {
      row.fail(std::to_string(m.cols) + " numbers (the length of " + path_ + "[0])",
               std::to_string(row.json().size()));
    }
    for (std::size_t c = 0; c < row.json().size(); ++c) m.values.push_back(row.element(c).number());
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// ObjectReader

ObjectReader::ObjectReader(const Json& object, Document document, std::string prefix)
    : object_(&object), document_(document), prefix_(std::move(prefix)) {
  if (!object.is_object()) {
    const std::string name = prefix_.empty() ? document_name(document)
                                             : prefix_.substr(0, prefix_.size() - 1);
    io::fail(document, name, "a JSON object", describe(object));
  }
}

ObjectReader::ObjectReader(const Value& value)
    : ObjectReader(value.json(), value.document(), value.path() + ".") {}

bool ObjectReader::contains(std::string_view key) const {
  return object_->contains(std::string(key)) && !taken_.count(key);
}

std::optional<Value> ObjectReader::take(std::string_view key) {
  asked_.emplace(key);
  const auto it = object_->find(std::string(key));
  if (it == object_->end() || taken_.count(key)) return std::nullopt;
  taken_.emplace(key);
  return Value(*it, path(key), document_);
}

std::optional<Value> ObjectReader::peek(std::string_view key) const {
  const auto it = object_->find(std::string(key));
  if (it == object_->end()) return std::nullopt;
  return Value(*it, path(key), document_);
}

std::optional<Value> ObjectReader::take_one_of(std::span<const std::string> keys,
                                               const std::string& canonical, std::size_t* which) {
  std::optional<Value> found;
  std::string found_key;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    const std::string& key = keys[i];
    std::optional<Value> value = take(key);
    if (!value) continue;
    if (found) {
      io::fail(document_, path(canonical), "one key for this field",
               "both " + quote(found_key) + " and " + quote(key));
    }
    const std::string label = key == canonical ? path(key) : path(key) + " (alias of " + canonical + ")";
    found = Value(value->json(), label, document_);
    found_key = key;
    if (which) *which = i;
  }
  return found;
}

std::optional<int64_t> ObjectReader::integer(std::string_view key, int64_t min, int64_t max) {
  auto value = take(key);
  if (!value) return std::nullopt;
  return value->integer(min, max);
}

std::optional<double> ObjectReader::number(std::string_view key) {
  auto value = take(key);
  if (!value) return std::nullopt;
  return value->number();
}

std::optional<bool> ObjectReader::boolean(std::string_view key) {
  auto value = take(key);
  if (!value) return std::nullopt;
  return value->boolean();
}

std::optional<std::string> ObjectReader::string(std::string_view key) {
  auto value = take(key);
  if (!value) return std::nullopt;
  return value->string();
}

void ObjectReader::reject_unknown_keys() const {
  for (const auto& [key, value] : object_->items()) {
    if (taken_.count(key)) continue;
    std::string expected = std::string("a known ") + key_noun(document_) + " key";
    const std::string suggestion =
        closest_name(key, std::vector<std::string>(asked_.begin(), asked_.end()));
    if (!suggestion.empty()) expected += " (did you mean " + quote(suggestion) + "?)";
    io::fail(document_, path(key), expected, "unknown key " + quote(key));
  }
}

}  // namespace moekit::io
