// Helpers shared by the fuzz targets (tests/fuzz/): scratch files, and the rule every target
// enforces, that a bad input ends in the expected moekit exception and nothing else.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <typeinfo>

namespace moekit::fuzz {

// A path under $TMPDIR (or /tmp) unique to this process, so that parallel fuzzers (-jobs) and
// the replay tests (ctest -j) never share a file.
inline std::string scratch_path(const std::string& name) {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir != nullptr && *dir != '\0' ? dir : "/tmp") + "/moekit_fuzz_" +
         std::to_string(::getpid()) + "_" + name;
}

// Replaces `path` by `size` bytes of `data`; aborts when it cannot (a broken setup, not a
// finding).
inline void write_file(const std::string& path, const uint8_t* data, size_t size) {
  std::FILE* out = std::fopen(path.c_str(), "wb");
  if (out == nullptr || (size > 0 && std::fwrite(data, 1, size, out) != size) || std::fclose(out) != 0) {
    std::fprintf(stderr, "fuzz: cannot write %s\n", path.c_str());
    std::abort();
  }
}

// A scratch file rewritten for every input and removed at exit.
class ScratchFile {
 public:
  explicit ScratchFile(const std::string& name) : path_(scratch_path(name)) {}
  ~ScratchFile() { std::remove(path_.c_str()); }
  ScratchFile(const ScratchFile&) = delete;
  ScratchFile& operator=(const ScratchFile&) = delete;

  const std::string& path() const { return path_; }
  void write(const uint8_t* data, size_t size) const { write_file(path_, data, size); }

 private:
  std::string path_;
};

// An exception other than the expected moekit one escaped: a finding. Aborts with its type and
// message, so that libFuzzer keeps the input (an uncaught exception would abort too, but
// without saying what it was).
[[noreturn]] inline void unexpected_exception(const char* call, const std::exception& e) {
  std::fprintf(stderr, "fuzz: %s threw %s (not a moekit error): %s\n", call, typeid(e).name(), e.what());
  std::abort();
}

}  // namespace moekit::fuzz
