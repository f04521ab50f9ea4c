// safetensors: the reference implementation's own file read back tensor by tensor, round trips
// through the writer, and one test per class of malformed header.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "moekit/error.h"
#include "moekit/safetensors.h"

namespace moekit {
namespace {

std::string fixture(const std::string& name) { return std::string(MOEKIT_FIXTURE_DIR) + "/safetensors/" + name; }

std::string temp_path(const std::string& name) {
  return std::string(MOEKIT_BINARY_DIR) + "/safetensors_test_" + name + ".safetensors";
}

std::string hex_of(const void* data, int64_t bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  const auto* p = static_cast<const uint8_t*>(data);
  for (int64_t i = 0; i < bytes; ++i) {
    out += digits[p[i] >> 4];
    out += digits[p[i] & 15];
  }
  return out;
}

TEST(Safetensors, ReadsTheReferenceWritersFileAsTheReferenceReaderDoes) {
  std::ifstream in(fixture("reference.json"));
  ASSERT_TRUE(in.good());
  const nlohmann::json expected = nlohmann::json::parse(in);
  const SafetensorsFile f = SafetensorsFile::open(fixture("reference.safetensors"));
  using Metadata = std::map<std::string, std::string>;
  EXPECT_EQ(f.metadata(), expected["metadata"].get<Metadata>());
  ASSERT_EQ(f.tensors().size(), expected["tensors"].size());
  for (const auto& [name, e] : expected["tensors"].items()) {
    const TensorView& t = f.at(name);
    EXPECT_EQ(tensor_dtype_name(t.dtype), e["dtype"].get<std::string>()) << name;
    EXPECT_EQ(t.shape, e["shape"].get<std::vector<int64_t>>()) << name;
    EXPECT_EQ(hex_of(t.data, t.bytes), e["hex"].get<std::string>()) << name;
    EXPECT_EQ(t.bytes, t.num_elements() * tensor_dtype_size(t.dtype)) << name;
  }
  // Views point into the mapping, in ascending offset order.
  for (size_t i = 1; i < f.tensors().size(); ++i)
    EXPECT_LE(static_cast<const uint8_t*>(f.tensors()[i - 1].data) + f.tensors()[i - 1].bytes,
              static_cast<const uint8_t*>(f.tensors()[i].data));
  EXPECT_EQ(f.find("absent"), nullptr);
  EXPECT_THROW(f.at("absent"), InputError);
}

TEST(Safetensors, WriterRoundTripsEveryDtypeWithAPaddedHeader) {
  const std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -0.5f};
  const std::vector<uint16_t> b = {0x3f80, 0xbf80, 0x4000};
  const std::vector<int64_t> c = {-1, 1LL << 50};
  const std::vector<uint8_t> d = {1, 2, 3, 4, 5};
  const std::vector<TensorToWrite> tensors = {
      {"w.a", TensorDType::kF32, {2, 3}, a.data()},
      {"w.b", TensorDType::kBF16, {3}, b.data()},
      {"c", TensorDType::kI64, {2}, c.data()},
      {"d", TensorDType::kU8, {5}, d.data()},
      {"e", TensorDType::kF32, {0, 7}, nullptr},
  };
  const std::string path = temp_path("roundtrip");
  write_safetensors(path, tensors, {{"k", "v"}});
  std::ifstream raw(path, std::ios::binary);
  uint64_t header = 0;
  raw.read(reinterpret_cast<char*>(&header), 8);
  EXPECT_EQ(header % 8, 0u);
  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_EQ(f.metadata().at("k"), "v");
  for (const TensorToWrite& t : tensors) {
    const TensorView& v = f.at(t.name);
    EXPECT_EQ(v.dtype, t.dtype);
    EXPECT_EQ(v.shape, t.shape);
    if (v.bytes > 0) EXPECT_EQ(std::memcmp(v.data, t.data, static_cast<size_t>(v.bytes)), 0) << t.name;
  }
  std::remove(path.c_str());
  EXPECT_THROW(write_safetensors(path, {{"x", TensorDType::kF32, {1}, a.data()}, {"x", TensorDType::kF32, {1}, a.data()}}),
               InputError);
  EXPECT_THROW(write_safetensors(path, {{"x", TensorDType::kF32, {-1}, a.data()}}), InputError);
}

// A file of an 8-byte size, `header` and `data_bytes` zero bytes (size_override: a wrong size).
std::string make_file(const std::string& name, const std::string& header, size_t data_bytes,
                      int64_t size_override = -1) {
  const std::string path = temp_path(name);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  const uint64_t n = size_override >= 0 ? static_cast<uint64_t>(size_override) : header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
  out << header << std::string(data_bytes, '\0');
  return path;
}

void expect_fault(const std::string& name, const std::string& header, size_t data_bytes, const std::string& needle,
                  int64_t size_override = -1) {
  const std::string path = make_file(name, header, data_bytes, size_override);
  try {
    SafetensorsFile::open(path);
    ADD_FAILURE() << name << ": accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << name << ": " << e.what();
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << "the message names the file";
  }
  std::remove(path.c_str());
}

TEST(Safetensors, EveryMalformedHeaderIsAnErrorNamingTheField) {
  const std::string ok = R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  {
    const std::string path = temp_path("short");
    std::ofstream(path, std::ios::binary) << "abc";  // shorter than the 8-byte size
    EXPECT_THROW(SafetensorsFile::open(path), InputError);
    std::remove(path.c_str());
  }
  expect_fault("empty_header", "", 0, "header: expected well-formed JSON");
  expect_fault("huge", ok, 8, "header size: expected at most", 1 << 30);
  expect_fault("badjson", R"({"t":)", 0, "header: expected well-formed JSON");
  expect_fault("repeated", R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
               8, "key 't' repeated");
  expect_fault("dtype", R"({"t":{"dtype":"F31","shape":[2],"data_offsets":[0,8]}})", 8, "tensor 't' dtype: expected one of");
  expect_fault("shape", R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8, "tensor 't' shape");
  expect_fault("outside", R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4, "begin <= end <= 4");
  expect_fault("reversed", R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8, "data_offsets");
  expect_fault("size", R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8, "expected 12 bytes ([3] × 4), got 8");
  expect_fault("overlap", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
               12, "no overlap with another tensor");
  expect_fault("metadata", R"({"__metadata__":{"k":3}})", 0, "__metadata__.k: expected a string");
  expect_fault("extra", R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8, "key 'x'");
  expect_fault("root", R"([1,2])", 0, "header: expected a JSON object");
  EXPECT_THROW(SafetensorsFile::open(temp_path("does_not_exist")), InputError);
}

TEST(Safetensors, ARepeatedKeyIsNamedByItsPath) {
  expect_fault("repeated_nested", R"({"t":{"dtype":"F32","shape":[2],"dtype":"F32","data_offsets":[0,8]}})", 8,
               "header: expected each key once, got key 't.dtype' repeated");
}

}  // namespace
}  // namespace moekit
