// Dequantization of checkpoint formats against transformers' own code (tools/fixtures/
// gen_quant.py), read through the safetensors reader; the format definitions value by value.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "moekit/error.h"
#include "moekit/quant.h"
#include "moekit/safetensors.h"

namespace moekit {
namespace {

std::vector<float> floats(const TensorView& t) {
  std::vector<float> v(static_cast<size_t>(t.num_elements()));
  std::memcpy(v.data(), t.data, v.size() * sizeof(float));  // the mapping need not be aligned
  return v;
}

std::vector<uint8_t> bytes(const TensorView& t) {
  const auto* p = static_cast<const uint8_t*>(t.data);
  return {p, p + t.bytes};
}

const SafetensorsFile& quant_file() {
  static const SafetensorsFile f =
      SafetensorsFile::open(std::string(MOEKIT_FIXTURE_DIR) + "/safetensors/quant.safetensors");
  return f;
}

TEST(Quant, Fp8E4m3DecodesByItsDefinition) {
  EXPECT_EQ(fp8_e4m3_to_float(0x00), 0.0f);
  EXPECT_TRUE(std::signbit(fp8_e4m3_to_float(0x80)));
  EXPECT_EQ(fp8_e4m3_to_float(0x01), std::ldexp(1.0f, -9));   // smallest subnormal
  EXPECT_EQ(fp8_e4m3_to_float(0x08), std::ldexp(1.0f, -6));   // smallest normal
  EXPECT_EQ(fp8_e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(fp8_e4m3_to_float(0x7e), 448.0f);                  // largest finite
  EXPECT_EQ(fp8_e4m3_to_float(0xfe), -448.0f);
  EXPECT_TRUE(std::isnan(fp8_e4m3_to_float(0x7f)));
  EXPECT_TRUE(std::isnan(fp8_e4m3_to_float(0xff)));
}

TEST(Quant, Fp4E2m1DecodesByItsDefinition) {
  const float want[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(fp4_e2m1_to_float(static_cast<uint8_t>(i)), want[i]);
    EXPECT_EQ(fp4_e2m1_to_float(static_cast<uint8_t>(i | 8)), -want[i]);
  }
}

TEST(Quant, Fp8BlocksEqualTransformersDequantizationBitwise) {
  const SafetensorsFile& f = quant_file();
  const TensorView& w = f.at("fp8.weight");
  ASSERT_EQ(w.dtype, TensorDType::kF8E4M3);
  const int64_t rows = w.shape[0], cols = w.shape[1];
  const std::vector<float> scale = floats(f.at("fp8.weight_scale_inv")), want = floats(f.at("fp8.expected"));
  const std::vector<uint8_t> q = bytes(w);
  std::vector<float> got(static_cast<size_t>(rows * cols));
  dequantize_fp8_blocks(q.data(), scale.data(), rows, cols, 128, 128, got.data(), "fp8.weight");
  EXPECT_EQ(got, want);  // one exact product per element: no rounding difference possible
}

TEST(Quant, Mxfp4EqualsTransformersGptOssDequantizationBitwise) {
  const SafetensorsFile& f = quant_file();
  const TensorView& b = f.at("mxfp4.blocks");
  const TensorView& s = f.at("mxfp4.scales");
  ASSERT_EQ(b.shape.size(), 4u);
  const int64_t experts = b.shape[0], out_features = b.shape[1], groups = b.shape[2];
  std::vector<float> got(static_cast<size_t>(experts * out_features * groups * 32));
  dequantize_mxfp4(static_cast<const uint8_t*>(b.data), static_cast<const uint8_t*>(s.data), experts * out_features,
                   groups, got.data(), "mxfp4");
  const std::vector<float> want = floats(f.at("mxfp4.expected"));  // [experts, groups·32, out_features]
  const int64_t in_features = groups * 32;
  for (int64_t e = 0; e < experts; ++e)
    for (int64_t o = 0; o < out_features; ++o)
      for (int64_t i = 0; i < in_features; ++i)
        ASSERT_EQ(got[(e * out_features + o) * in_features + i], want[(e * in_features + i) * out_features + o])
            << e << " " << o << " " << i;
}

TEST(Quant, NanEncodingsAndOverflowAreErrors) {
  const uint8_t nan_fp8[2] = {0x38, 0x7f};
  const float one = 1.0f;
  float out[32];
  EXPECT_THROW(dequantize_fp8_blocks(nan_fp8, &one, 1, 2, 128, 128, out, "w"), InputError);
  const float huge = 1e38f;
  const uint8_t big[1] = {0x7e};
  EXPECT_THROW(dequantize_fp8_blocks(big, &huge, 1, 1, 128, 128, out, "w"), InputError);
  uint8_t blocks[16] = {0x77};  // 6.0 in both nibbles of byte 0
  const uint8_t nan_scale = 0xff, top_scale = 254;
  EXPECT_THROW(dequantize_mxfp4(blocks, &nan_scale, 1, 1, out, "m"), InputError);
  EXPECT_THROW(dequantize_mxfp4(blocks, &top_scale, 1, 1, out, "m"), InputError);  // 6 · 2^127 overflows
  EXPECT_THROW(dequantize_fp8_blocks(big, &one, 1, 1, 0, 128, out, "w"), InputError);
}

}  // namespace
}  // namespace moekit
