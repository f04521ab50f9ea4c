// Peer fixtures: numbers produced by the peers' own code or copied from their test suites
// (tests/fixtures/README.md). Every fixture file is one test case.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "route_io.h"

namespace moekit {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

std::vector<fs::path> fixture_files() {
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(MOEKIT_FIXTURE_DIR))
    if (entry.path().extension() == ".json") files.push_back(entry.path());
  std::sort(files.begin(), files.end());
  return files;
}

json load(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return json::parse(text.str());
}

// |a − b| ≤ tol · max(1, |b|).
bool close(double actual, double expected, double tol) {
  return std::abs(actual - expected) <= tol * std::max(1.0, std::abs(expected));
}

void expect_matrix_close(const json& actual, const json& expected, double tol, const std::string& what) {
  ASSERT_TRUE(actual.is_array()) << what << " missing from moekit's output";
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (size_t r = 0; r < expected.size(); ++r) {
    if (expected[r].is_array()) {
      ASSERT_EQ(actual[r].size(), expected[r].size()) << what << "[" << r << "]";
      for (size_t c = 0; c < expected[r].size(); ++c)
        EXPECT_TRUE(close(actual[r][c].get<double>(), expected[r][c].get<double>(), tol))
            << what << "[" << r << "][" << c << "]: moekit " << actual[r][c] << ", peer " << expected[r][c];
    } else {
      EXPECT_TRUE(close(actual[r].get<double>(), expected[r].get<double>(), tol))
          << what << "[" << r << "]: moekit " << actual[r] << ", peer " << expected[r];
    }
  }
}

class PeerFixture : public ::testing::TestWithParam<fs::path> {};

TEST_P(PeerFixture, MatchesPeer) {
  const json fixture = load(GetParam());
  SCOPED_TRACE(fixture.value("source", std::string("?")));
  const double tol = fixture.value("tolerance", 1e-5);
  json input = fixture.at("input");
  if (fixture.contains("backward"))
    for (const auto& [k, v] : fixture["backward"].items()) input[k] = v;
  const json out = json::parse(cli::route_json(fixture.at("config").dump(), input.dump()));
  const json& expected = fixture.at("expected");
  std::vector<int> mask;
  if (input.contains("token_mask")) mask = input["token_mask"].get<std::vector<int>>();
  const bool ordered = fixture.value("compare_order", false);

  if (expected.contains("experts")) {
    const json& ee = expected["experts"];
    ASSERT_EQ(out["experts"].size(), ee.size());
    for (size_t t = 0; t < ee.size(); ++t) {
      if (!mask.empty() && mask[t] == 0) continue;  // padding is not routed by moekit
      const json& ae = out["experts"][t];
      if (ordered) {
        EXPECT_EQ(ae, ee[t]) << "experts of token " << t;
      } else {
        EXPECT_EQ(ae.get<std::set<int>>(), ee[t].get<std::set<int>>()) << "experts of token " << t;
      }
      if (!expected.contains("weights")) continue;
      std::map<int, double> aw, ew;
      for (size_t i = 0; i < ae.size(); ++i) aw[ae[i].get<int>()] = out["weights"][t][i].get<double>();
      for (size_t i = 0; i < ee[t].size(); ++i) ew[ee[t][i].get<int>()] = expected["weights"][t][i].get<double>();
      for (const auto& [e, w] : ew) {
        ASSERT_TRUE(aw.count(e)) << "token " << t << " expert " << e;
        EXPECT_TRUE(close(aw[e], w, tol)) << "weight of token " << t << " expert " << e << ": moekit " << aw[e] << ", peer " << w;
      }
    }
  }
  if (expected.contains("dropped")) {
    std::set<std::pair<int, int>> a, e;
    for (const auto& d : out["dropped"]) a.insert({d[0].get<int>(), d[1].get<int>()});
    for (const auto& d : expected["dropped"])
      if (mask.empty() || mask[d[0].get<int>()]) e.insert({d[0].get<int>(), d[1].get<int>()});
    EXPECT_EQ(a, e) << "dropped";
  }
  if (expected.contains("tokens_per_expert")) EXPECT_EQ(out["tokens_per_expert"], expected["tokens_per_expert"]);
  if (expected.contains("capacity")) EXPECT_EQ(out["capacity"], expected["capacity"]);
  for (const char* key : {"aux_loss", "z_loss"}) {
    if (!expected.contains(key)) continue;
    EXPECT_TRUE(close(out[key].get<double>(), expected[key].get<double>(), tol))
        << key << ": moekit " << out[key] << ", peer " << expected[key];
  }
  for (const char* key : {"d_logits", "d_probs", "d_hidden_states", "d_router_weight", "d_router_bias",
                          "dispatch_weights", "combine_weights"}) {
    if (expected.contains(key)) expect_matrix_close(out[key], expected[key], tol, key);
  }
}

std::string fixture_name(const ::testing::TestParamInfo<fs::path>& info) {
  std::string name = info.param.stem().string();
  for (char& ch : name)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return name;
}

INSTANTIATE_TEST_SUITE_P(Peers, PeerFixture, ::testing::ValuesIn(fixture_files()), fixture_name);

TEST(PeerFixtures, ThereAreFixtures) { EXPECT_GE(fixture_files().size(), 10u); }

}  // namespace
}  // namespace moekit
