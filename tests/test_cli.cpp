// End-to-end tests of the `moekit` command: the shipped examples route as documented, bad
// inputs fail with a non-zero exit status and a message on stderr that names the field, and
// every subcommand's flags are parsed, helped and rejected alike.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>
#include "moekit/quant.h"
#include "moekit/safetensors.h"

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

struct RunResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

fs::path example(const std::string& name) { return fs::path(MOEKIT_EXAMPLE_DIR) / "route" / name; }

// Each test gets its own scratch directory (ctest runs tests in parallel processes).
class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
#ifndef MOEKIT_CLI_PATH
    GTEST_SKIP() << "the moekit command is not built (MOEKIT_BUILD_CLI=OFF)";
#else
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / "moekit_test_cli" /
           (std::string(info->test_suite_name()) + "." + info->name() + "." +
            std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
#endif
  }

  void TearDown() override {
    if (!dir_.empty()) {
      std::error_code ec;
      fs::remove_all(dir_, ec);
    }
  }

  fs::path file(const std::string& name, const std::string& text) {
    const fs::path p = dir_ / name;
    write_text(p, text);
    return p;
  }

  RunResult run(const std::vector<std::string>& args) {
    RunResult r;
#ifdef MOEKIT_CLI_PATH
    const fs::path out = dir_ / "stdout.txt", err = dir_ / "stderr.txt";
    std::string cmd = shell_quote(MOEKIT_CLI_PATH);
    for (const std::string& a : args) cmd += " " + shell_quote(a);
    cmd += " </dev/null >" + shell_quote(out.string()) + " 2>" + shell_quote(err.string());
    const int status = std::system(cmd.c_str());
    r.exit_code = (status != -1 && WIFEXITED(status)) ? WEXITSTATUS(status) : -1;
    r.out = slurp(out);
    r.err = slurp(err);
#else
    (void)args;
#endif
    return r;
  }

  RunResult route(const fs::path& config, const fs::path& input) {
    return run({"route", "--config", config.string(), "--input", input.string()});
  }

  // Routes `input_text` with `config_text`, expects failure naming `field` on stderr.
  void expect_failure(const std::string& config_text, const std::string& input_text,
                      const std::string& field) {
    const RunResult r = route(file("config.json", config_text), file("input.json", input_text));
    EXPECT_NE(r.exit_code, 0) << "stdout: " << r.out;
    EXPECT_NE(r.err.find(field), std::string::npos)
        << "stderr does not name '" << field << "': " << r.err;
    EXPECT_TRUE(r.out.empty()) << "nothing should be written to stdout on error: " << r.out;
  }

  fs::path dir_;
};

using CliRoute = CliTest;
using CliRouteErrors = CliTest;
using CliPresets = CliTest;
using CliHelp = CliTest;
using CliInspect = CliTest;
using CliForward = CliTest;
using CliArguments = CliTest;

const std::string kMixtral = R"({"preset": "hf-mixtral", "num_experts": 8, "top_k": 2})";
const std::string kLogits8 = R"({"logits": [[2.1, -0.5, 3.7, 0.8, -1.2, 0.3, 1.5, -0.9]]})";

TEST_F(CliRoute, ShippedExampleHasEveryOutputKey) {
  const RunResult r = route(example("config.json"), example("input.json"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(r.err.empty()) << r.err;
  const json out = json::parse(r.out);  // throws (fails the test) when not JSON
  ASSERT_TRUE(out.is_object());
  for (const char* key : {"experts", "weights", "dropped", "tokens_per_expert", "capacity",
                          "aux_loss", "z_loss", "stats"}) {
    EXPECT_TRUE(out.contains(key)) << "missing key " << key;
  }
  EXPECT_TRUE(out["aux_loss"].is_number());
  EXPECT_TRUE(out["z_loss"].is_number());
  EXPECT_TRUE(out["stats"].is_object());
  EXPECT_TRUE(out["dropped"].empty()) << "Mixtral routing is dropless";

  const json input = json::parse(slurp(example("input.json")));
  const size_t tokens = input["logits"].size();
  ASSERT_EQ(out["experts"].size(), tokens);
  ASSERT_EQ(out["weights"].size(), tokens);
  int64_t kept = 0;
  for (size_t t = 0; t < tokens; ++t) {
    ASSERT_EQ(out["experts"][t].size(), 2u) << "token " << t;
    ASSERT_EQ(out["weights"][t].size(), 2u) << "token " << t;
    const double sum = out["weights"][t][0].get<double>() + out["weights"][t][1].get<double>();
    EXPECT_NEAR(sum, 1.0, 1e-6) << "renormalised top-2 weights of token " << t;
    kept += 2;
  }
  ASSERT_EQ(out["tokens_per_expert"].size(), 8u);
  int64_t total = 0;
  for (const json& n : out["tokens_per_expert"]) total += n.get<int64_t>();
  EXPECT_EQ(total, kept);
  // Dropless: capacity is null or the largest load, never a bound that dropped anything.
  if (!out["capacity"].is_null()) {
    int64_t max_load = 0;
    for (const json& n : out["tokens_per_expert"]) max_load = std::max(max_load, n.get<int64_t>());
    EXPECT_EQ(out["capacity"].get<int64_t>(), max_load);
  }
  EXPECT_EQ(out["stats"]["num_tokens"].get<int64_t>(), static_cast<int64_t>(tokens));
}

// The worked example: logits [2.1, -0.5, 3.7, 0.8, ...] pick experts 2 then 0 with weights
// softmax([3.7, 2.1]) = [0.832, 0.168] (renormalised top-2 over the softmax gives the same).
TEST_F(CliRoute, WorkedExampleTokenRoutesToExperts2And0) {
  const RunResult r = route(example("config.json"), example("input.json"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json out = json::parse(r.out);
  const json input = json::parse(slurp(example("input.json")));
  ASSERT_EQ(input["logits"][0][0].get<double>(), 2.1);
  ASSERT_EQ(input["logits"][0][2].get<double>(), 3.7);
  EXPECT_EQ(out["experts"][0], json::array({2, 0}));
  const double w0 = 1.0 / (1.0 + std::exp(-(3.7 - 2.1)));
  ASSERT_EQ(out["weights"][0].size(), 2u);
  EXPECT_NEAR(out["weights"][0][0].get<double>(), w0, 1e-5);
  EXPECT_NEAR(out["weights"][0][1].get<double>(), 1.0 - w0, 1e-5);
  EXPECT_NEAR(out["weights"][0][0].get<double>(), 0.832, 5e-4);
  EXPECT_NEAR(out["weights"][0][1].get<double>(), 0.168, 5e-4);
}

TEST_F(CliRoute, SwitchExampleDropsOverCapacityAndSkipsPadding) {
  const RunResult r = route(example("switch_config.json"), example("switch_input.json"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json out = json::parse(r.out);
  const json input = json::parse(slurp(example("switch_input.json")));
  const size_t tokens = input["hidden_states"].size();
  ASSERT_EQ(out["experts"].size(), tokens);
  ASSERT_TRUE(out["capacity"].is_number_integer());
  const int64_t capacity = out["capacity"].get<int64_t>();
  EXPECT_EQ(capacity, 2);
  EXPECT_FALSE(out["dropped"].empty()) << "the example is built to overflow an expert";
  for (const json& n : out["tokens_per_expert"]) EXPECT_LE(n.get<int64_t>(), capacity);
  for (const json& d : out["dropped"]) {
    ASSERT_EQ(d.size(), 2u);
    const int64_t t = d[0].get<int64_t>();
    EXPECT_TRUE(out["experts"][t].empty()) << "top-1 token " << t << " was dropped";
  }
  for (const json& reason : out["dropped_reasons"]) EXPECT_EQ(reason, "capacity");
  // Padding tokens (token_mask 0) are not routed.
  for (size_t t = 0; t < tokens; ++t) {
    if (input["token_mask"][t].get<int>() == 0) {
      EXPECT_TRUE(out["experts"][t].empty()) << "padding token " << t;
      EXPECT_TRUE(out["selected"][t].empty()) << "padding token " << t;
    }
  }
  EXPECT_FALSE(out["stats"]["by_label"].empty()) << "labels were given";
  EXPECT_GT(out["stats"]["num_dropped"].get<int64_t>(), 0);
}

TEST_F(CliRoute, OutputFlagWritesTheSameDocument) {
  const RunResult to_stdout = route(example("config.json"), example("input.json"));
  ASSERT_EQ(to_stdout.exit_code, 0) << to_stdout.err;
  const fs::path out_path = dir_ / "out.json";
  const RunResult to_file = run({"route", "--config", example("config.json").string(), "--input",
                                 example("input.json").string(), "--output", out_path.string()});
  ASSERT_EQ(to_file.exit_code, 0) << to_file.err;
  EXPECT_TRUE(to_file.out.empty());
  EXPECT_EQ(json::parse(slurp(out_path)), json::parse(to_stdout.out));
}

TEST_F(CliRouteErrors, UnknownConfigKey) {
  expect_failure(R"({"preset": "hf-mixtral", "bogus_router_key": 1})", kLogits8, "bogus_router_key");
}

TEST_F(CliRouteErrors, TopKGreaterThanNumExperts) {
  const RunResult r = route(file("config.json", R"({"num_experts": 4, "top_k": 5})"),
                            file("input.json", R"({"logits": [[1, 2, 3, 4]]})"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(r.err.find("num_experts_per_tok") != std::string::npos ||
              r.err.find("top_k") != std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("num_experts"), std::string::npos) << r.err;
}

TEST_F(CliRouteErrors, NullInLogits) {
  expect_failure(kMixtral, R"({"logits": [[2.1, -0.5, null, 0.8, -1.2, 0.3, 1.5, -0.9]]})",
                 "logits[0][2]");
}

TEST_F(CliRouteErrors, LogitsThatOverflowExitWithInputError) {
  // Finite inputs whose projection overflows float: token 3, expert 1 is 2·3e38 + 2·3e38.
  const RunResult r =
      route(file("config.json", R"({"num_experts": 2, "top_k": 1})"),
            file("input.json", R"({"hidden_states": [[0.001, 0.001], [-0.001, 0.001], [0.5, -0.001], [2, 2]],
                                   "router_weight": [[1, 1], [3e38, 3e38]]})"));
  EXPECT_EQ(r.exit_code, 2) << "stdout: " << r.out;
  EXPECT_EQ(r.err, "moekit: input error: logits[3][1]: expected a finite number, got inf\n");
  EXPECT_TRUE(r.out.empty()) << r.out;
}

TEST_F(CliRouteErrors, RouterWeightShapeMismatch) {
  // d_model 3 in hidden_states, 2 columns in router_weight.
  expect_failure(kMixtral,
                 R"({"hidden_states": [[1, 2, 3]],
                     "router_weight": [[1, 2], [1, 2], [1, 2], [1, 2],
                                       [1, 2], [1, 2], [1, 2], [1, 2]]})",
                 "router_weight");
  // 2 rows where the config has 8 experts.
  expect_failure(kMixtral, R"({"hidden_states": [[1, 2, 3]], "router_weight": [[1, 2, 3], [4, 5, 6]]})",
                 "router_weight");
}

TEST_F(CliRouteErrors, EmptyLogits) {
  expect_failure(kMixtral, R"({"logits": []})", "logits");
  expect_failure(kMixtral, R"({"logits": [[]]})", "logits");
}

TEST_F(CliRouteErrors, LogitsColumnsDifferFromNumExperts) {
  expect_failure(kMixtral, R"({"logits": [[1, 2, 3]]})", "logits");
}

TEST_F(CliRouteErrors, UnknownInputKey) {
  expect_failure(kMixtral, R"({"logits": [[2.1, -0.5, 3.7, 0.8, -1.2, 0.3, 1.5, -0.9]], "logit": 1})",
                 R"(logit: expected a known input key (did you mean "logits"?), got unknown key "logit")");
}

TEST_F(CliRouteErrors, InvalidJson) { expect_failure(kMixtral, R"({"logits": )", "input"); }

TEST_F(CliRouteErrors, MissingConfigFlag) {
  const RunResult r = run({"route", "--input", example("input.json").string()});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--config"), std::string::npos) << r.err;
  EXPECT_TRUE(r.out.empty());
}

TEST_F(CliRouteErrors, NonexistentFile) {
  const fs::path missing = dir_ / "does_not_exist.json";
  RunResult r = route(missing, example("input.json"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--config"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(missing.string()), std::string::npos) << r.err;

  r = route(example("config.json"), missing);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--input"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(missing.string()), std::string::npos) << r.err;
}

TEST_F(CliRouteErrors, UnknownArgument) {
  const RunResult r = run({"route", "--config", example("config.json").string(), "--input",
                           example("input.json").string(), "--verbose"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--verbose"), std::string::npos) << r.err;
}

TEST_F(CliPresets, ListsPresetsAndPrintsOne) {
  RunResult r = run({"presets"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("hf-mixtral"), std::string::npos);
  EXPECT_NE(r.out.find("hf-switch"), std::string::npos);

  r = run({"preset", "hf-mixtral"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json cfg = json::parse(r.out);
  EXPECT_EQ(cfg["num_experts"], 8);
  EXPECT_EQ(cfg["num_experts_per_tok"], 2);

  r = run({"preset", "no-such-preset"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("no-such-preset"), std::string::npos) << r.err;
}

// ---------------------------------------------------------------------------------------------
// Flags: one parser for every subcommand, so help, unknown flags, wrong types and ranges read
// the same everywhere.

// A bench shape small enough to run in a test; not memory-bound (8 · 2 > 2 · 4), so the 1 GiB
// read is skipped.
const std::vector<std::string> kSmallBench = {"bench",     "--tokens",  "8", "--d-model", "16",
                                              "--d-ff",    "16",        "--experts", "4",
                                              "--top-k",   "2",         "--threads", "1",
                                              "--repeats", "1",         "--warmup",  "0"};

std::vector<std::string> with(std::vector<std::string> args, const std::vector<std::string>& more) {
  args.insert(args.end(), more.begin(), more.end());
  return args;
}

// An argument error: status 2, nothing on stdout, one line on stderr naming `flag`.
void expect_argument_error(const RunResult& r, const std::string& flag) {
  EXPECT_EQ(r.exit_code, 2) << "stderr: " << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line expected: " << r.err;
  EXPECT_EQ(r.err.rfind("moekit: ", 0), 0u) << r.err;
  EXPECT_NE(r.err.find(flag), std::string::npos) << "stderr does not name " << flag << ": " << r.err;
}

TEST_F(CliHelp, NoArgumentsPrintsUsageAndExits2) {
  const RunResult r = run({});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(r.out.empty()) << r.out;
  for (const char* command : {"route", "bench", "presets", "preset"})
    EXPECT_NE(r.err.find(command), std::string::npos) << command << " missing from: " << r.err;
}

TEST_F(CliHelp, ProgramHelpListsEveryCommand) {
  for (const char* flag : {"--help", "-h"}) {
    const RunResult r = run({flag});
    EXPECT_EQ(r.exit_code, 0) << flag << ": " << r.err;
    EXPECT_TRUE(r.err.empty()) << r.err;
    for (const char* command : {"route", "bench", "presets", "preset"})
      EXPECT_NE(r.out.find(command), std::string::npos) << command << " missing from: " << r.out;
  }
}

TEST_F(CliHelp, EachCommandHelpListsItsFlags) {
  const std::vector<std::pair<std::string, std::vector<std::string>>> commands = {
      {"route", {"--config", "--input", "--output"}},
      {"bench",
       {"--tokens", "--d-model", "--d-ff", "--experts", "--top-k", "--dtype", "--threads", "--backward", "--json",
        "--repeats", "--warmup", "--preset", "--seed", "--memory-read"}},
      {"presets", {"--help"}},
      {"preset", {"NAME"}},
      {"inspect", {"--model"}},
  };
  for (const auto& [command, flags] : commands) {
    // --help wins over everything else on the line, required flags included.
    const RunResult r = run({command, "--help"});
    EXPECT_EQ(r.exit_code, 0) << command << ": " << r.err;
    EXPECT_TRUE(r.err.empty()) << command << ": " << r.err;
    for (const std::string& flag : flags)
      EXPECT_NE(r.out.find(flag), std::string::npos) << command << " --help does not list " << flag << ":\n" << r.out;
  }
  const RunResult bench = run({"bench", "--help"});
  EXPECT_NE(bench.out.find("[1, 1024]"), std::string::npos) << "the --threads range:\n" << bench.out;
}

TEST_F(CliArguments, UnknownFlagIsNamedByEveryCommand) {
  const std::vector<std::vector<std::string>> lines = {
      {"route", "--config", example("config.json").string(), "--input", example("input.json").string(), "--bogus"},
      with(kSmallBench, {"--bogus"}),
      {"presets", "--bogus"},
      {"preset", "hf-mixtral", "--bogus"},
      {"--bogus"},
  };
  for (const auto& args : lines) {
    SCOPED_TRACE(args.front());
    expect_argument_error(run(args), "'--bogus'");
  }
  // The flags it could have been are listed.
  const RunResult r = run(with(kSmallBench, {"--thread", "2"}));
  expect_argument_error(r, "'--thread'");
  EXPECT_NE(r.err.find("--threads"), std::string::npos) << r.err;
}

TEST_F(CliArguments, UnknownFlagIsNamedBeforeMissingOnes) {
  expect_argument_error(run({"route", "--confg", example("config.json").string()}), "'--confg'");
}

TEST_F(CliArguments, UnknownCommand) {
  const RunResult r = run({"rout"});
  expect_argument_error(r, "'rout'");
  EXPECT_NE(r.err.find("route"), std::string::npos) << r.err;
}

TEST_F(CliArguments, NonIntegerValue) {
  for (const char* text : {"abc", "8x", "2.5", "0x10", ""}) {
    std::vector<std::string> args = kSmallBench;
    args[2] = text;  // the value of --tokens
    const RunResult r = run(args);
    expect_argument_error(r, "--tokens");
    EXPECT_EQ(r.err, "moekit: --tokens: expected an integer in [1, 16777216], got '" + std::string(text) + "'\n");
  }
}

TEST_F(CliArguments, ThreadsOutOfRange) {
  for (const char* text : {"0", "1025", "-1"}) {
    const RunResult r = run(with(kSmallBench, {"--threads", text}));
    expect_argument_error(r, "--threads");
    EXPECT_EQ(r.err, "moekit: --threads: expected an integer in [1, 1024], got '" + std::string(text) + "'\n");
  }
}

TEST_F(CliArguments, TopKAboveExperts) {
  const RunResult r = run(with(kSmallBench, {"--experts", "4", "--top-k", "5"}));
  expect_argument_error(r, "--top-k");
  EXPECT_EQ(r.err, "moekit: --top-k: expected at most --experts (4), got 5\n");
}

TEST_F(CliArguments, MissingValueAndMissingFlag) {
  RunResult r = run({"bench", "--tokens"});
  expect_argument_error(r, "--tokens");
  EXPECT_EQ(r.err, "moekit: --tokens: expected an integer in [1, 16777216], got nothing\n");

  r = run({"route", "--config", example("config.json").string(), "--input"});
  EXPECT_EQ(r.err, "moekit: --input: expected a path, got nothing\n");
  EXPECT_EQ(r.exit_code, 2);

  std::vector<std::string> args = kSmallBench;
  args.erase(args.begin() + 5, args.begin() + 7);  // --d-ff 16
  r = run(args);
  expect_argument_error(r, "--d-ff");
  EXPECT_EQ(r.err, "moekit: --d-ff: expected an integer in [1, 1048576], got nothing\n");

  r = run({"preset"});
  expect_argument_error(r, "NAME");
  EXPECT_NE(r.err.find("preset name"), std::string::npos) << r.err;
}

TEST_F(CliArguments, BadDtype) {
  const RunResult r = run(with(kSmallBench, {"--dtype", "fp16"}));
  expect_argument_error(r, "--dtype");
  EXPECT_EQ(r.err, "moekit: --dtype: expected fp32, bf16, int8, int4 or mxfp4, got 'fp16'\n");
}

TEST_F(CliArguments, SwitchWithABadValue) {
  const RunResult r = run(with(kSmallBench, {"--json=maybe"}));
  expect_argument_error(r, "--json");
  EXPECT_NE(r.err.find("'maybe'"), std::string::npos) << r.err;
}

// The parsed values reach the run: the JSON report echoes them.
TEST_F(CliArguments, BenchRunsWithTheGivenFlags) {
  const RunResult r = run(with(kSmallBench, {"--dtype", "bfloat16", "--preset", "hf-qwen3-moe", "--json"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json out = json::parse(r.out);
  EXPECT_EQ(out["tokens"], 8);
  EXPECT_EQ(out["d_model"], 16);
  EXPECT_EQ(out["d_ff"], 16);
  EXPECT_EQ(out["experts"], 4);
  EXPECT_EQ(out["top_k"], 2);
  EXPECT_EQ(out["threads"], 1);
  EXPECT_EQ(out["repeats"], 1);
  EXPECT_EQ(out["dtype"], "bf16");
  EXPECT_EQ(out["preset"], "hf-qwen3-moe");
  EXPECT_FALSE(out.contains("backward_ms")) << "no --backward";
}

TEST_F(CliArguments, BadPresetIsAConfigError) {
  const RunResult r = run(with(kSmallBench, {"--preset", "no-such-preset"}));
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("no-such-preset"), std::string::npos) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// `moekit train`: a short run writes a complete report; bad flags and an occupied --out fail.

#include <set>

#include "oracles/xml_check.h"
#include "report/svg.h"

namespace {

class CliTrain : public CliTest {
 protected:
  // A run of a few steps (the phenomena themselves are tests/test_train.cpp's).
  RunResult train(const std::vector<std::string>& extra) {
    std::vector<std::string> args = {"train", "--steps", "40", "--batch-size", "64", "--d-model", "16",
                                     "--d-ff", "16", "--eval-every", "20", "--out", (dir_ / "run").string()};
    args.insert(args.end(), extra.begin(), extra.end());
    return run(args);
  }
};

std::vector<const moekit::xml_check::XmlNode*> elements(const moekit::xml_check::XmlNode& node, const std::string& name,
                                                        std::vector<const moekit::xml_check::XmlNode*> out = {}) {
  if (node.name == name) out.push_back(&node);
  for (const auto& c : node.children) out = elements(c, name, std::move(out));
  return out;
}

TEST_F(CliTrain, WritesAWellFormedReportWhoseNumbersAreTheMetrics) {
  const RunResult r = train({});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const fs::path run_dir = dir_ / "run";
  EXPECT_NE(r.out.find("report: " + (run_dir / "index.html").string()), std::string::npos) << r.out;
  for (const char* name : {"index.html", "metrics.json", "steps.csv", "load.csv", "eval.csv", "prototypes.csv"})
    EXPECT_TRUE(fs::exists(run_dir / name)) << name;
  // Not a terminal: plain lines, no redrawn progress bar.
  EXPECT_EQ(r.err.find('\r'), std::string::npos);
  EXPECT_NE(r.err.find("step 40/40"), std::string::npos) << r.err;

  const std::string html = slurp(run_dir / "index.html");
  moekit::xml_check::XmlNode root;
  ASSERT_NO_THROW(root = moekit::xml_check::parse_xml(html));
  EXPECT_TRUE(elements(root, "script").empty());
  EXPECT_GE(elements(root, "svg").size(), 8u);

  // The configuration table shows exactly the metrics' configuration, and the prototype
  // heatmap's cell values are the metrics' cosines as printed.
  const json metrics = json::parse(slurp(run_dir / "metrics.json"));
  std::vector<std::pair<std::string, std::string>> rows;
  for (const auto* tr : elements(root, "tr")) {
    const auto cells = elements(*tr, "td");
    if (cells.size() == 2) rows.emplace_back(cells[0]->text, cells[1]->text);
  }
  ASSERT_FALSE(rows.empty());
  for (const auto& [key, value] : rows) {
    json node = metrics.at("config");
    std::string rest = key;
    for (size_t dot; (dot = rest.find('.')) != std::string::npos; rest = rest.substr(dot + 1))
      node = node.at(rest.substr(0, dot));
    EXPECT_EQ(node.at(rest).dump(), value) << key;
  }
  EXPECT_NE(html.find("experts"), std::string::npos);

  // The prototype heatmap prints each cosine of metrics.json (at its two significant digits).
  const moekit::xml_check::XmlNode* prototypes = nullptr;
  for (const auto* svg : elements(root, "svg"))
    for (const auto* t : elements(*svg, "text"))
      if (t->text.find("Router rows") != std::string::npos) prototypes = svg;
  ASSERT_NE(prototypes, nullptr);
  std::multiset<std::string> shown;
  for (const auto* t : elements(*prototypes, "text")) shown.insert(t->text);
  const json& cosine = metrics.at("prototype_cosine");
  size_t checked = 0;
  for (const auto& row : cosine)
    for (const auto& v : row) {
      const std::string text = moekit::report::format_number(v.get<double>(), 2);
      const auto it = shown.find(text);
      EXPECT_NE(it, shown.end()) << text;
      if (it != shown.end()) shown.erase(it);
      ++checked;
    }
  EXPECT_EQ(checked, 8u * 4u);
}

TEST_F(CliTrain, BitwiseTheSameMetricsForOneAndTwoThreads) {
  ASSERT_EQ(train({"--threads", "1"}).exit_code, 0);
  json a = json::parse(slurp(dir_ / "run" / "metrics.json"));
  ASSERT_EQ(train({"--threads", "2", "--force"}).exit_code, 0);
  json b = json::parse(slurp(dir_ / "run" / "metrics.json"));
  // Wall-clock figures and the thread count itself differ by design.
  for (json* j : {&a, &b}) {
    j->erase("seconds");
    j->erase("ms_per_step");
    (*j)["steps"].erase("tokens_per_second");
    (*j)["config"]["layer"].erase("num_threads");
  }
  EXPECT_EQ(a.dump(), b.dump());
}

TEST_F(CliTrain, RefusesToOverwriteWithoutForce) {
  ASSERT_EQ(train({}).exit_code, 0);
  const auto before = fs::last_write_time(dir_ / "run" / "index.html");
  const RunResult again = train({});
  EXPECT_EQ(again.exit_code, 2);
  EXPECT_NE(again.err.find("--force"), std::string::npos) << again.err;
  EXPECT_EQ(std::count(again.err.begin(), again.err.end(), '\n'), 1) << again.err;
  EXPECT_EQ(fs::last_write_time(dir_ / "run" / "index.html"), before);
  EXPECT_EQ(train({"--force"}).exit_code, 0);
}

TEST_F(CliTrain, BadFlagsAreOneLineErrors) {
  for (const std::vector<std::string>& flags :
       {std::vector<std::string>{"--experts", "0"}, {"--experts", "4", "--top-k", "5"}, {"--lr", "-1"},
        {"--method", "fast"}, {"--capacity-factor", "0"}, {"--steps", "x"}}) {
    const RunResult r = train(flags);
    EXPECT_EQ(r.exit_code, 2) << flags[0] << ": " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_NE(r.err.find(flags[flags.size() - 2]), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(dir_ / "run" / "index.html"));
  }
}

}  // namespace

namespace {

class CliCompare : public CliTest {};

TEST_F(CliCompare, OneTableAndOneReportForSeveralMethods) {
  const RunResult r = run({"compare", "--methods", "topk,dense,switch", "--steps", "30", "--batch-size", "64",
                           "--d-model", "16", "--d-ff", "16", "--eval-every", "15", "--out", (dir_ / "cmp").string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json summary = json::parse(slurp(dir_ / "cmp" / "compare.json"));
  ASSERT_EQ(summary.size(), 3u);
  EXPECT_EQ(summary[0]["method"], "topk");
  EXPECT_EQ(summary[1]["method"], "dense");
  // The dense mixture runs every expert on every token: E / k times top-2's expert FLOPs, and
  // Switch top-1 (capacity factor 1.0) at most half of top-2's.
  const double topk = summary[0]["expert_flops_per_token"], dense = summary[1]["expert_flops_per_token"],
               top1 = summary[2]["expert_flops_per_token"];
  EXPECT_NEAR(dense / topk, 8.0 / 2.0, 1e-9);
  EXPECT_LE(top1, topk / 2 + 1e-9);
  EXPECT_EQ(summary[1]["dropped_fraction"], 0.0);
  for (const char* m : {"| topk |", "| dense |", "| switch |"}) EXPECT_NE(r.out.find(m), std::string::npos) << r.out;
  EXPECT_NO_THROW(moekit::xml_check::parse_xml(slurp(dir_ / "cmp" / "index.html")));
}

TEST_F(CliCompare, UnknownMethodIsAOneLineError) {
  const RunResult r = run({"compare", "--methods", "topk,fastest", "--out", (dir_ / "cmp").string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--methods"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("fastest"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_FALSE(fs::exists(dir_ / "cmp" / "index.html"));
}

}  // namespace

namespace moekit {
namespace {

TEST_F(CliInspect, ListsLayersTheirKindAndStoredTensors) {
  const fs::path model = dir_ / "model";
  fs::create_directories(model);
  write_text(model / "config.json", R"({"model_type": "deepseek_v3", "hidden_size": 8, "intermediate_size": 20,
      "moe_intermediate_size": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
      "n_shared_experts": 1, "first_k_dense_replace": 1, "num_hidden_layers": 2, "torch_dtype": "bfloat16"})");
  const std::vector<uint16_t> dense(3 * 20 * 8), gate(4 * 8);
  const std::vector<float> experts(4 * 8 * 8), bias(4);
  write_safetensors((model / "model.safetensors").string(),
                    {{"model.layers.0.mlp.up_proj.weight", TensorDType::kBF16, {60, 8}, dense.data()},
                     {"model.layers.1.mlp.gate.weight", TensorDType::kBF16, {4, 8}, gate.data()},
                     {"model.layers.1.mlp.gate.e_score_correction_bias", TensorDType::kF32, {4}, bias.data()},
                     {"model.layers.1.mlp.experts.gate_up_proj", TensorDType::kF32, {4, 8, 8}, experts.data()}});
  const RunResult r = run({"inspect", "--model", model.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("model_type deepseek_v3, 2 layers (1 MoE, 1 dense), 4 tensors in 1 file(s)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("experts 4, top-k 2, expert d_ff 4, activation swiglu, shared d_ff 4"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("first_k_dense_replace = 1, MLP d_ff 20"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("BF16,F32"), std::string::npos) << r.out;
  const RunResult missing = run({"inspect", "--model", (dir_ / "nothing").string()});
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_NE(missing.err.find("expected model.safetensors or model.safetensors.index.json"), std::string::npos) << missing.err;
}

TEST_F(CliForward, WritesTheLayersOutputAndRoutingForACheckpoint) {
  // The Switch fixture (transformers' own checkpoint and block outputs): a [batch, seq, d]
  // input is one sequence per row, so its capacity of 2 drops tokens per sequence as the block did.
  const std::string model = std::string(MOEKIT_FIXTURE_DIR) + "/models/switch_transformers";
  const SafetensorsFile io = SafetensorsFile::open(model + "/moe_io.safetensors");
  const TensorView& hs = io.at("decoder.1.hidden_states");
  const fs::path in = dir_ / "in.safetensors", out = dir_ / "out.safetensors";
  write_safetensors(in.string(), {{"hidden_states", hs.dtype, hs.shape, hs.data}});
  const RunResult r = run({"forward", "--model", model, "--layer", "decoder.1", "--input", in.string(), "--output",
                           out.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("switch_transformers layer decoder.1, 16 tokens (2 sequences), 4 experts, top-1, 4 dropped"),
            std::string::npos) << r.err;
  const SafetensorsFile result = SafetensorsFile::open(out.string());
  EXPECT_EQ(result.at("output").shape, hs.shape);
  EXPECT_EQ(result.at("router_logits").shape, (std::vector<int64_t>{16, 4}));
  EXPECT_EQ(result.at("topk_indices").dtype, TensorDType::kI64);
  const TensorView& kept = result.at("topk_kept");
  const TensorView& expected_kept = io.at("decoder.1.kept");
  ASSERT_EQ(kept.bytes, expected_kept.bytes);
  EXPECT_EQ(std::memcmp(kept.data, expected_kept.data, static_cast<size_t>(kept.bytes)), 0);
  const json stats = json::parse(result.metadata().at("stats"));
  EXPECT_EQ(stats["num_dropped"], 4);
  EXPECT_EQ(result.metadata().at("layer"), "decoder.1");

  const RunResult how = run({"inspect", "--model", model, "--layer", "decoder.1"});
  ASSERT_EQ(how.exit_code, 0) << how.err;
  EXPECT_NE(how.out.find("layer decoder.1 (decoder.block.1.layer.2.mlp):"), std::string::npos) << how.out;
  EXPECT_NE(how.out.find("borrowed (one pointer per expert)  [decoder.block.1.layer.2.mlp.experts.expert_{0..3}.wi.weight]"),
            std::string::npos) << how.out;

  const RunResult dense = run({"forward", "--model", model, "--layer", "0", "--input", in.string(), "--output",
                               out.string()});
  EXPECT_EQ(dense.exit_code, 2);
  EXPECT_NE(dense.err.find("layer: expected an MoE layer, got layer 0, dense (block % encoder_sparse_step (2) != 1)"),
            std::string::npos) << dense.err;
  const fs::path bad = dir_ / "bad.safetensors";
  const std::vector<float> wrong(3 * 5);
  write_safetensors(bad.string(), {{"hidden_states", TensorDType::kF32, {3, 5}, wrong.data()}});
  const RunResult shape = run({"forward", "--model", model, "--layer", "1", "--input", bad.string(), "--output",
                               out.string()});
  EXPECT_EQ(shape.exit_code, 2);
  EXPECT_NE(shape.err.find("hidden_states shape: expected [tokens, 32] or [batch, seq, 32], got [3, 5]"),
            std::string::npos) << shape.err;
}


TEST_F(CliForward, QuantizesAndSavesALayerThatLoadsBackWithoutQuantizing) {
  // gpt-oss's MXFP4 checkpoint: quantized to mxfp4 as it loads, its experts get back the
  // checkpoint's own codes and exponents (the stored values are what the rule of quant.h picks
  // for them), so the experts compute natively on the weights as shipped.
  const std::string model = std::string(MOEKIT_FIXTURE_DIR) + "/models/gpt_oss_mxfp4";
  const SafetensorsFile io = SafetensorsFile::open(model + "/moe_io.safetensors");
  const TensorView& hs = io.at("0.hidden_states");
  const fs::path in = dir_ / "in.safetensors", out = dir_ / "out.safetensors", again = dir_ / "again.safetensors",
                 saved = dir_ / "layer.safetensors";
  write_safetensors(in.string(), {{"hidden_states", hs.dtype, hs.shape, hs.data}});
  const RunResult r = run({"forward", "--model", model, "--layer", "0", "--quantize", "mxfp4", "--input", in.string(),
                           "--output", out.string(), "--save-layer", saved.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("mxfp4 → "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("layer saved to"), std::string::npos) << r.err;

  const SafetensorsFile ckpt = SafetensorsFile::open(model + "/model.safetensors");
  const SafetensorsFile layer = SafetensorsFile::open(saved.string());
  EXPECT_EQ(layer.metadata().at("model_type"), "gpt_oss");
  const int64_t E = 4, d = 64, f = 96;
  for (const auto& [ours, theirs, rows, cols] :
       {std::tuple{"gate_up", "gate_up_proj", 2 * f, d}, std::tuple{"down", "down_proj", d, f}}) {
    const std::string prefix = std::string("model.layers.0.mlp.experts.") + theirs;
    const auto* blocks = static_cast<const uint8_t*>(ckpt.at(prefix + "_blocks").data);
    const auto* scales = static_cast<const uint8_t*>(ckpt.at(prefix + "_scales").data);
    const auto* codes = static_cast<const uint8_t*>(layer.at(std::string(ours) + ".codes").data);
    const auto* exps = static_cast<const uint8_t*>(layer.at(std::string(ours) + ".scales").data);
    const int64_t groups = cols / 32;
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t row = 0; row < rows; ++row) {
        // moekit's gate rows come first, then the up rows; gpt-oss interleaves them.
        const int64_t src = std::string(ours) == "gate_up" ? (row < f ? 2 * row : 2 * (row - f) + 1) : row;
        std::vector<uint8_t> expect(static_cast<size_t>(cols / 2));
        repack_gpt_oss_mxfp4_row(blocks + (e * rows + src) * groups * 16, scales + (e * rows + src) * groups, cols,
                                 expect.data(), "blocks");
        // The same codes, except that a stored −0 (nibble 8) comes back as +0 (nibble 0):
        // quantizing writes zero without a sign. Same values.
        auto plus_zero = [](uint8_t b) {
          const uint8_t lo = (b & 0x0f) == 8 ? 0 : (b & 0x0f), hi = (b >> 4) == 8 ? 0 : (b >> 4);
          return static_cast<uint8_t>(lo | (hi << 4));
        };
        for (int64_t i = 0; i < cols / 2; ++i) {
          ASSERT_EQ(plus_zero(expect[static_cast<size_t>(i)]), codes[(e * rows + row) * (cols / 2) + i])
              << ours << " expert " << e << " row " << row << " byte " << i;
        }
        ASSERT_EQ(0, std::memcmp(scales + (e * rows + src) * groups, exps + (e * rows + row) * groups, static_cast<size_t>(groups)))
            << ours << " expert " << e << " row " << row;
      }
    }
  }

  // The saved layer runs again with neither --layer nor quantizing: bitwise the same output.
  const RunResult r2 = run({"forward", "--model", saved.string(), "--input", in.string(), "--output", again.string()});
  ASSERT_EQ(r2.exit_code, 0) << r2.err;
  const SafetensorsFile second = SafetensorsFile::open(again.string());
  const TensorView& b = second.at("output");
  const SafetensorsFile first = SafetensorsFile::open(out.string());
  const TensorView& a2 = first.at("output");
  ASSERT_EQ(a2.bytes, b.bytes);
  EXPECT_EQ(0, std::memcmp(a2.data, b.data, static_cast<size_t>(b.bytes)));
  EXPECT_EQ(second.metadata().at("dtype"), "mxfp4");

  // Errors: --layer with a layer file; a family whose widths the groups of 32 do not divide.
  const RunResult both = run({"forward", "--model", saved.string(), "--layer", "0", "--input", in.string(), "--output",
                              again.string()});
  EXPECT_EQ(both.exit_code, 2);
  EXPECT_NE(both.err.find("--layer"), std::string::npos) << both.err;
  const std::string mixtral = std::string(MOEKIT_FIXTURE_DIR) + "/models/mixtral";
  const RunResult narrow = run({"forward", "--model", mixtral, "--layer", "0", "--quantize", "int4", "--input",
                                in.string(), "--output", again.string()});
  EXPECT_EQ(narrow.exit_code, 2);
  EXPECT_NE(narrow.err.find("d_ff: expected a multiple of 32 for dtype int4, got 40"), std::string::npos) << narrow.err;
}

}  // namespace
}  // namespace moekit
