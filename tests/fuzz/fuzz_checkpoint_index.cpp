// Fuzz target: Checkpoint::open on a directory whose model.safetensors.index.json is the input
// and which holds one small valid shard, shard.safetensors (tensors "a" and "b"). Checks: a bad
// index throws InputError and nothing else (no crash, no nlohmann or std exception); an index
// that opens maps every tensor name it lists to a view of the shard, and every byte of every
// view is read.
#include <sys/stat.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "fuzz_common.h"
#include "moekit/checkpoint.h"
#include "moekit/error.h"
#include "moekit/safetensors.h"

namespace {

// The scratch checkpoint directory, made once per process, removed at exit.
struct ScratchCheckpoint {
  std::string dir = moekit::fuzz::scratch_path("checkpoint");
  std::string index = dir + "/model.safetensors.index.json";
  std::string shard = dir + "/shard.safetensors";

  ScratchCheckpoint() {
    if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
      std::fprintf(stderr, "fuzz_checkpoint_index: cannot make %s\n", dir.c_str());
      std::abort();
    }
    const float a[6] = {1, 2, 3, 4, 5, 6};
    const uint16_t b[2] = {7, 8};
    moekit::write_safetensors(shard, {{"a", moekit::TensorDType::kF32, {2, 3}, a},
                                      {"b", moekit::TensorDType::kU16, {2}, b}});
  }
  ~ScratchCheckpoint() {
    std::remove(index.c_str());
    std::remove(shard.c_str());
    ::rmdir(dir.c_str());
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const ScratchCheckpoint scratch;
  moekit::fuzz::write_file(scratch.index, data, size);
  try {
    const moekit::Checkpoint checkpoint = moekit::Checkpoint::open(scratch.dir);
    uint64_t sum = 0;
    for (const std::string& name : checkpoint.tensor_names()) {
      const moekit::TensorView& t = checkpoint.at(name);
      if (t.name != name || (name != "a" && name != "b")) {
        std::fprintf(stderr, "fuzz_checkpoint_index: tensor '%s' is not one of the shard's\n", name.c_str());
        std::abort();
      }
      for (int64_t i = 0; i < t.bytes; ++i) sum += static_cast<const uint8_t*>(t.data)[i];
    }
    volatile uint64_t sink = sum;
    (void)sink;
  } catch (const moekit::InputError&) {
    // The expected outcome for a bad index.
  } catch (const std::exception& e) {
    moekit::fuzz::unexpected_exception("Checkpoint::open", e);
  }
  return 0;
}
