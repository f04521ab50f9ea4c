// Writing a report's files into a directory so that an interrupted or failed run never leaves a
// report that looks complete: each file is written under a hidden temporary name and only
// renamed to its final name by commit(), the main page last. Until then, and if anything fails,
// the temporaries are removed and no final name is created.
#pragma once

#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace moekit::report {

// A report cannot be written where asked: the file exists (and overwriting was not allowed),
// the directory is not a directory, or the disk refused. The message reads
// "<path>: expected ..., got ..." like the library's errors.
class OutputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class ReportWriter {
 public:
  // Creates `dir` (and its parents) when missing. With `force`, existing files of the same names
  // are replaced; without it, add() refuses them before anything is written.
  ReportWriter(std::filesystem::path dir, bool force);
  ~ReportWriter();  // removes the temporaries of a report that was never committed
  ReportWriter(const ReportWriter&) = delete;
  ReportWriter& operator=(const ReportWriter&) = delete;

  // Writes `contents` under a temporary name for the final name `name`, a plain file name (no
  // directory part). Throws OutputError when the final name exists and force is off, when the
  // name was already added, or when the write fails.
  void add(const std::string& name, std::string_view contents);

  // Renames every temporary to its final name, in the order added but with `last` (when it was
  // added, typically the HTML page) renamed at the very end, so that its presence means the
  // report is complete. On failure, the files this writer created are removed and OutputError
  // is thrown. Nothing may be added afterwards.
  void commit(const std::string& last = "");

  const std::filesystem::path& dir() const { return dir_; }

 private:
  struct Entry {
    std::string name;
    std::filesystem::path temporary;
  };
  void discard() noexcept;

  std::filesystem::path dir_;
  bool force_;
  bool committed_ = false;
  std::vector<Entry> entries_;
};

}  // namespace moekit::report
