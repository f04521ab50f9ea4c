// The strict JSON layer (src/io/json.h) on its own, and the promise it exists for: each class of
// fault reads the same in the routing config, the layer config and the `moekit route` INPUT.
#include <gtest/gtest.h>

#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "io/json.h"
#include "moekit/config.h"
#include "moekit/error.h"
#include "moekit/layer.h"
#include "route_io.h"

namespace moekit {
namespace {

using io::Document;

// The message of the `Error` that `action` throws; a failure when it throws nothing or another
// type, so that a test comparing messages cannot pass on a missing exception.
template <typename Error>
std::string message_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& error) {
    return error.what();
  } catch (const std::exception& error) {
    ADD_FAILURE() << "expected another exception type, got: " << error.what();
    return "<wrong exception type>";
  }
  ADD_FAILURE() << "expected an exception, nothing was thrown";
  return "<nothing thrown>";
}

// The three documents. Each takes the keys to add to a document that is valid without them.
std::string routing_error(const std::string& keys) {
  return message_of<ConfigError>([&] { routing_config_from_json("{" + keys + "}"); });
}

std::string layer_error(const std::string& keys) {
  return message_of<ConfigError>(
      [&] { moe_layer_config_from_json(R"({"d_model": 4, "d_ff": 4, "num_experts": 4)" + keys + "}"); });
}

std::string input_error(const std::string& keys) {
  return message_of<InputError>([&] {
    cli::route_json(R"({"num_experts": 4, "num_experts_per_tok": 2})",
                    R"({"logits": [[1, 2, 3, 4]])" + keys + "}");
  });
}

// ---------------------------------------------------------------------------------------------
// One fault class, three documents.

TEST(JsonDocuments, DuplicateKey) {
  EXPECT_EQ(routing_error(R"("num_experts": 4, "num_experts": 8)"),
            "num_experts: expected the key at most once, got it repeated");
  EXPECT_EQ(layer_error(R"(, "d_ff": 8)"), "d_ff: expected the key at most once, got it repeated");
  EXPECT_EQ(input_error(R"(, "logits": [[1, 2, 3, 4]])"),
            "logits: expected the key at most once, got it repeated");
}

TEST(JsonDocuments, UnknownKey) {
  EXPECT_EQ(routing_error(R"("num_expert": 4)"),
            R"(num_expert: expected a known configuration key (did you mean "num_experts"?), got unknown key "num_expert")");
  // The layer config suggests among layer and routing keys alike.
  EXPECT_EQ(layer_error(R"(, "d_fff": 4)"),
            R"(d_fff: expected a known configuration key (did you mean "d_ff"?), got unknown key "d_fff")");
  EXPECT_EQ(layer_error(R"(, "num_expertz": 4)"),
            R"(num_expertz: expected a known configuration key (did you mean "num_experts"?), got unknown key "num_expertz")");
  EXPECT_EQ(input_error(R"(, "logit": 1)"),
            R"(logit: expected a known input key (did you mean "logits"?), got unknown key "logit")");
  // Nothing close: no suggestion.
  EXPECT_EQ(input_error(R"(, "completely_unrelated": 1)"),
            R"(completely_unrelated: expected a known input key, got unknown key "completely_unrelated")");
}

TEST(JsonDocuments, WrongType) {
  EXPECT_EQ(routing_error(R"("temperature": "2")"),
            R"(temperature: expected a finite number, got string "2")");
  EXPECT_EQ(layer_error(R"(, "clamp_limit": "2")"),
            R"(clamp_limit: expected a finite number, got string "2")");
  EXPECT_EQ(input_error(R"(, "d_aux_loss": "2")"),
            R"(d_aux_loss: expected a finite number, got string "2")");
  // An integer written as a float is not converted.
  EXPECT_EQ(routing_error(R"("num_experts": 4.0)"), "num_experts: expected an integer, got number 4.0");
  EXPECT_EQ(layer_error(R"(, "shared_d_ff": 4.0)"), "shared_d_ff: expected an integer, got number 4.0");
  EXPECT_EQ(input_error(R"(, "sequence_length": 4.0)"),
            "sequence_length: expected an integer >= 0, got number 4.0");
}

TEST(JsonDocuments, OutOfRange) {
  EXPECT_EQ(routing_error(R"("min_capacity": -1)"), "min_capacity: expected >= 0, got -1");
  EXPECT_EQ(layer_error(R"(, "num_shared_experts": -1)"), "num_shared_experts: expected >= 0, got -1");
  EXPECT_EQ(input_error(R"(, "sequence_length": -1)"), "sequence_length: expected >= 0, got -1");
  // Bounded on both sides: the same "in [lo, hi]" in the layer config and the INPUT.
  EXPECT_EQ(layer_error(R"(, "num_threads": 0)"), "num_threads: expected in [1, 1024], got 0");
  EXPECT_EQ(input_error(R"(, "num_threads": 0)"), "num_threads: expected in [1, 1024], got 0");
  EXPECT_EQ(input_error(R"(, "num_threads": 100000)"), "num_threads: expected in [1, 1024], got 100000");
}

TEST(JsonDocuments, InvalidJson) {
  const std::string routing = message_of<ConfigError>([] { routing_config_from_json(R"({"num_experts": )"); });
  const std::string layer = message_of<ConfigError>([] { moe_layer_config_from_json(R"({"d_model": )"); });
  const std::string input =
      message_of<InputError>([] { cli::route_json(R"({"num_experts": 4})", R"({"logits": )"); });
  const std::string shape = ": expected a JSON object, got invalid JSON (";
  EXPECT_EQ(routing.rfind("config" + shape, 0), 0u) << routing;
  EXPECT_EQ(layer.rfind("config" + shape, 0), 0u) << layer;
  EXPECT_EQ(input.rfind("input" + shape, 0), 0u) << input;
  // The parser's own position follows, so the user can find the fault.
  EXPECT_NE(input.find("line 1"), std::string::npos) << input;
}

TEST(JsonDocuments, NotAnObject) {
  EXPECT_EQ(message_of<ConfigError>([] { routing_config_from_json("[1, 2]"); }),
            "config: expected a JSON object, got array [1,2]");
  EXPECT_EQ(message_of<ConfigError>([] { moe_layer_config_from_json("7"); }),
            "config: expected a JSON object, got number 7");
  EXPECT_EQ(message_of<InputError>([] { cli::route_json(R"({"num_experts": 4})", "null"); }),
            "input: expected a JSON object, got null");
}

TEST(JsonDocuments, NullInNumberArray) {
  EXPECT_EQ(routing_error(R"("num_experts": 4, "e_score_correction_bias": [0, null, 0, 0])"),
            "e_score_correction_bias[1]: expected a finite number, got null");
  EXPECT_EQ(layer_error(R"(, "e_score_correction_bias": [0, null, 0, 0])"),
            "e_score_correction_bias[1]: expected a finite number, got null");
  EXPECT_EQ(input_error(R"(, "global_counts": [0, null, 0, 0])"),
            "global_counts[1]: expected a finite number, got null");
  // In a matrix, row and column.
  EXPECT_EQ(message_of<InputError>([] {
              cli::route_json(R"({"num_experts": 4})", R"({"logits": [[1, 2, 3, 4], [1, 2, null, 4]]})");
            }),
            "logits[1][2]: expected a finite number, got null");
}

TEST(JsonDocuments, AliasIsNamedWithItsField) {
  EXPECT_EQ(routing_error(R"("top_k": "2")"),
            R"(top_k (alias of num_experts_per_tok): expected an integer, got string "2")");
  EXPECT_EQ(message_of<ConfigError>([] { moe_layer_config_from_json(R"({"hidden_size": "4", "d_ff": 4})"); }),
            R"(hidden_size (alias of d_model): expected an integer, got string "4")");
  EXPECT_EQ(message_of<ConfigError>(
                [] { moe_layer_config_from_json(R"({"d_model": 4, "hidden_size": 4, "d_ff": 4})"); }),
            R"(d_model: expected one key for this field, got both "d_model" and "hidden_size")");
}

TEST(JsonDocuments, LayerExpertBiasIsTheLayerFlag) {
  // In a layer config "expert_bias" is the layer's bool, not the routing alias of
  // e_score_correction_bias; taking it first keeps the routing reader off it.
  const MoeLayerConfig c = moe_layer_config_from_json(R"({"d_model": 4, "d_ff": 4, "expert_bias": true})");
  EXPECT_TRUE(c.expert_bias);
  EXPECT_TRUE(c.routing.e_score_correction_bias.empty());
  EXPECT_EQ(layer_error(R"(, "expert_bias": [0, 0, 0, 0])"),
            "expert_bias: expected a boolean, got array [0,0,0,0]");
}

// ---------------------------------------------------------------------------------------------
// The layer on its own.

TEST(JsonParse, RepeatedKeyNamesItsFullPath) {
  EXPECT_EQ(message_of<ConfigError>([] { io::parse_object(R"({"a": {"b": 1, "c": 2, "b": 3}})", Document::kConfig); }),
            "a.b: expected the key at most once, got it repeated");
  EXPECT_EQ(message_of<InputError>([] {
              io::parse_object(R"({"rows": [{"x": 1}, [0, {"y": 1}], {"x": 1, "x": 2}]})", Document::kInput);
            }),
            "rows[2].x: expected the key at most once, got it repeated");
  // The same key in sibling objects is no repeat.
  const io::Json ok = io::parse_object(R"({"a": {"x": 1}, "b": {"x": 2}, "c": [{"x": 3}, {"x": 4}]})",
                                       Document::kInput);
  EXPECT_EQ(ok["c"][1]["x"], 4);
}

TEST(JsonParse, OutOfRangeLiteralIsInvalidJson) {
  // nlohmann reports a literal beyond double as out_of_range, not as a parse error; it is still
  // the document's fault, not an internal error.
  const std::string message =
      message_of<InputError>([] { io::parse_object(R"({"x": 1e999})", Document::kInput); });
  EXPECT_EQ(message.rfind("input: expected a JSON object, got invalid JSON (", 0), 0u) << message;
  EXPECT_NE(message.find("1e999"), std::string::npos) << message;
  EXPECT_NE(input_error(R"(, "d_z_loss": -1e999)").find("-1e999"), std::string::npos);
}

TEST(JsonParse, ParseJsonReportsFaultsWithoutThrowing) {
  const io::ParsedJson deep = io::parse_json(std::string(200, '[') + std::string(200, ']'));
  EXPECT_TRUE(deep.too_deep);
  EXPECT_TRUE(deep.root.is_null());
  const io::ParsedJson invalid = io::parse_json(R"({"a": )");
  EXPECT_FALSE(invalid.too_deep);
  EXPECT_NE(invalid.invalid.find("parse error"), std::string::npos) << invalid.invalid;
  const io::ParsedJson repeated = io::parse_json(R"({"a": [{"b": 1, "b": 2}], "a": 3})");
  EXPECT_TRUE(repeated.invalid.empty());
  EXPECT_EQ(repeated.repeated_path, "a[0].b");  // the first repeat found
  const io::ParsedJson array = io::parse_json("[1, 2]");  // any JSON value: the caller asks for more
  EXPECT_TRUE(array.invalid.empty() && array.repeated_path.empty() && array.root.is_array());
}

TEST(JsonParse, AFileNamesTheDocument) {
  EXPECT_EQ(message_of<ConfigError>([] { io::parse_object("[1]", Document::kConfig, "dir/a.json"); }),
            "dir/a.json: expected a JSON object, got array [1]");
  EXPECT_EQ(message_of<ConfigError>([] { io::parse_object(R"({"x": {"y": 1, "y": 1}})", Document::kConfig, "a.json"); }),
            "a.json: x.y: expected the key at most once, got it repeated");
}

TEST(JsonReader, StringsMembersAndPeek) {
  const io::Json root = io::parse_object(R"({"s": ["a", "b"], "bad": ["a", 1], "o": {"k": 1, "j": "x"}})",
                                         Document::kInput);
  io::ObjectReader reader(root, Document::kInput, "f: ");
  EXPECT_EQ(reader.peek("s")->strings(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(message_of<InputError>([&] { reader.peek("bad")->strings(); }), "f: bad[1]: expected a string, got number 1");
  EXPECT_EQ(message_of<InputError>([&] { reader.peek("o")->strings(); }),
            "f: o: expected an array of strings, got object {\"j\":\"x\",\"k\":1}");
  const auto members = reader.peek("o")->members();
  ASSERT_EQ(members.size(), 2u);
  EXPECT_EQ(members[0].first, "j");  // key order
  EXPECT_EQ(members[0].second.path(), "f: o.j");
  EXPECT_EQ(members[1].second.integer(), 1);
  EXPECT_EQ(message_of<InputError>([&] { reader.peek("s")->members(); }),
            "f: s: expected a JSON object, got array [\"a\",\"b\"]");
  // peek neither takes the key nor needs it untaken.
  EXPECT_FALSE(reader.peek("absent"));
  EXPECT_TRUE(reader.take("s"));
  EXPECT_TRUE(reader.peek("s"));
  EXPECT_FALSE(reader.take("s"));
}

TEST(JsonReader, NonFiniteNumbersAreRejected) {
  // Values built in code (not parsed) can hold infinity or NaN; they are not numbers to moekit.
  const io::Json inf = std::numeric_limits<double>::infinity();
  const io::Json nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_EQ(message_of<InputError>([&] { io::Value(inf, "x", Document::kInput).number(); }),
            "x: expected a finite number, got number inf");
  EXPECT_EQ(message_of<ConfigError>([&] { io::Value(nan, "y", Document::kConfig).number(); }),
            "y: expected a finite number, got number nan");
}

TEST(JsonReader, NestedObjectPrefixesItsKeys) {
  const io::Json root =
      io::parse_object(R"({"routing": {"num_experts": "8", "top_k": 2, "bogus": 1}})", Document::kConfig);
  io::ObjectReader reader(root, Document::kConfig);
  const auto routing = reader.take("routing");
  ASSERT_TRUE(routing.has_value());
  io::ObjectReader nested(*routing);
  EXPECT_EQ(nested.path("top_k"), "routing.top_k");
  EXPECT_EQ(message_of<ConfigError>([&] { nested.integer("num_experts"); }),
            R"(routing.num_experts: expected an integer, got string "8")");
  EXPECT_EQ(nested.integer("top_k"), 2);
  EXPECT_EQ(message_of<ConfigError>([&] { nested.reject_unknown_keys(); }),
            R"(routing.bogus: expected a known configuration key, got unknown key "bogus")");
  reader.reject_unknown_keys();  // the outer object has nothing left over
  // A nested value that is not an object is named by its path.
  const io::Json flat = io::parse_object(R"({"routing": 3})", Document::kConfig);
  const io::Value value(flat["routing"], "routing", Document::kConfig);
  EXPECT_EQ(message_of<ConfigError>([&] { io::ObjectReader bad(value); }),
            "routing: expected a JSON object, got number 3");
}

TEST(JsonReader, TakesEachKeyOnce) {
  const io::Json root = io::parse_object(R"({"a": 1, "b": 2})", Document::kInput);
  io::ObjectReader reader(root, Document::kInput);
  EXPECT_TRUE(reader.contains("a"));
  EXPECT_EQ(reader.integer("a"), 1);
  EXPECT_FALSE(reader.contains("a"));
  EXPECT_FALSE(reader.integer("a").has_value());
  EXPECT_FALSE(reader.integer("missing").has_value());
  // "b" was never taken; the closest key that was asked for ("a", "missing") is suggested.
  EXPECT_EQ(message_of<InputError>([&] { reader.reject_unknown_keys(); }),
            R"(b: expected a known input key (did you mean "a"?), got unknown key "b")");
}

TEST(JsonReader, OneOfSpellings) {
  const std::vector<std::string> keys = {"d_model", "hidden_size"};
  const io::Json root = io::parse_object(R"({"hidden_size": 8})", Document::kConfig);
  io::ObjectReader reader(root, Document::kConfig);
  std::size_t which = 99;
  const auto value = reader.take_one_of(keys, "d_model", &which);
  ASSERT_TRUE(value.has_value());
  EXPECT_EQ(which, 1u);
  EXPECT_EQ(value->path(), "hidden_size (alias of d_model)");
  EXPECT_EQ(value->integer(), 8);
}

TEST(JsonReader, IntegerRangesAndLimits) {
  const io::Json root = io::parse_object(
      R"({"small": 0, "huge": 18446744073709551615, "negative": -3, "fraction": 1.5})", Document::kInput);
  const auto at = [&](const char* key) { return io::Value(root[key], key, Document::kInput); };
  EXPECT_EQ(message_of<InputError>([&] { at("small").integer(1); }), "small: expected >= 1, got 0");
  EXPECT_EQ(message_of<InputError>([&] { at("small").integer(1, 4); }), "small: expected in [1, 4], got 0");
  EXPECT_EQ(message_of<InputError>([&] { at("negative").integer(std::numeric_limits<int64_t>::min(), -4); }),
            "negative: expected <= -4, got -3");
  EXPECT_EQ(message_of<InputError>([&] { at("huge").integer(); }),
            "huge: expected an integer in the int64 range, got number 18446744073709551615");
  EXPECT_EQ(at("huge").unsigned_integer(), 18446744073709551615u);
  EXPECT_EQ(message_of<InputError>([&] { at("negative").unsigned_integer(); }),
            "negative: expected an integer >= 0, got number -3");
  EXPECT_EQ(message_of<InputError>([&] { at("fraction").integer(0, 4); }),
            "fraction: expected an integer in [0, 4], got number 1.5");
  EXPECT_EQ(message_of<InputError>([&] { at("fraction").number(2.0, 3.0); }),
            "fraction: expected a number in [2, 3], got 1.5");
  EXPECT_EQ(at("fraction").number(1.0, 2.0), 1.5);
}

TEST(JsonReader, Matrices) {
  const auto matrix_error = [](const std::string& text) {
    return message_of<InputError>([&] {
      const io::Json root = io::parse_object(R"({"m": )" + text + "}", Document::kInput);
      io::Value(root["m"], "m", Document::kInput).number_matrix();
    });
  };
  EXPECT_EQ(matrix_error("[]"), "m: expected a non-empty array of rows, got array []");
  EXPECT_EQ(matrix_error("[[]]"), "m[0]: expected a non-empty array of numbers, got array []");
  EXPECT_EQ(matrix_error("[[1, 2, 3], [4, 5]]"), "m[1]: expected 3 numbers (the length of m[0]), got 2");
  EXPECT_EQ(matrix_error("[[1, 2], 3]"), "m[1]: expected an array of numbers, got number 3");
  EXPECT_EQ(matrix_error(R"([[1, 2], [3, "4"]])"), R"(m[1][1]: expected a finite number, got string "4")");
  const io::Json root = io::parse_object(R"({"m": [[1, 2, 3], [4, 5, 6.5]]})", Document::kInput);
  const io::NumberMatrix m = io::Value(root["m"], "m", Document::kInput).number_matrix();
  EXPECT_EQ(m.rows, 2);
  EXPECT_EQ(m.cols, 3);
  EXPECT_EQ(m.values, (std::vector<double>{1, 2, 3, 4, 5, 6.5}));
}

TEST(JsonReader, Enumerations) {
  enum class Color { kRed, kBlue };
  constexpr io::EnumName<Color> kNames[] = {{Color::kRed, "red"}, {Color::kBlue, "blue"}};
  const io::Json root = io::parse_object(R"({"a": "blue", "b": "green", "c": 1})", Document::kConfig);
  io::ObjectReader reader(root, Document::kConfig);
  EXPECT_EQ(reader.enumeration<Color>("a", kNames), Color::kBlue);
  EXPECT_EQ(message_of<ConfigError>([&] { reader.enumeration<Color>("b", kNames); }),
            R"(b: expected one of red, blue, got "green")");
  EXPECT_EQ(message_of<ConfigError>([&] { reader.enumeration<Color>("c", kNames); }),
            "c: expected a string, one of red, blue, got number 1");
}

TEST(JsonDescribe, ShowsTypeThenValue) {
  EXPECT_EQ(io::describe(io::Json(nullptr)), "null");
  EXPECT_EQ(io::describe(io::Json("8")), R"(string "8")");
  EXPECT_EQ(io::describe(io::Json(8.5)), "number 8.5");
  EXPECT_EQ(io::describe(io::Json(true)), "boolean true");
  const std::string long_text = io::describe(io::Json(std::string(100, 'x')));
  EXPECT_EQ(long_text.size(), std::string("string ").size() + 40);
  EXPECT_EQ(long_text.substr(long_text.size() - 3), "...");
}

}  // namespace
}  // namespace moekit
