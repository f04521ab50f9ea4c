#include "report/output.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <system_error>

namespace moekit::report {

namespace fs = std::filesystem;

namespace {

[[noreturn]] void fail(const fs::path& path, const std::string& expected, const std::string& got) {
  throw OutputError(path.string() + ": expected " + expected + ", got " + got);
}

std::string kind_of(const fs::path& path) {
  std::error_code ec;
  const auto status = fs::symlink_status(path, ec);
  if (fs::is_directory(status)) return "an existing directory";
  if (fs::is_symlink(status)) return "an existing symbolic link";
  return "an existing file";
}

bool is_plain_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

}  // namespace

ReportWriter::ReportWriter(fs::path dir, bool force) : dir_(std::move(dir)), force_(force) {
  std::error_code ec;
  const auto status = fs::status(dir_, ec);
  if (fs::exists(status)) {
    if (!fs::is_directory(status)) fail(dir_, "a directory", "a file");
    return;
  }
  if (!fs::create_directories(dir_, ec) && ec) fail(dir_, "a directory that can be created", ec.message());
}

ReportWriter::~ReportWriter() {
  if (!committed_) discard();
}

void ReportWriter::discard() noexcept {
  std::error_code ec;
  for (const auto& e : entries_) fs::remove(e.temporary, ec);
  entries_.clear();
}

void ReportWriter::add(const std::string& name, std::string_view contents) {
  if (committed_) fail(dir_ / name, "a file added before commit", "one added after");
  if (!is_plain_name(name)) fail(dir_ / name, "a plain file name", "'" + name + "'");
  for (const auto& e : entries_)
    if (e.name == name) fail(dir_ / name, "each file name once", "it twice");
  const fs::path final_path = dir_ / name;
  std::error_code ec;
  if (!force_ && fs::exists(fs::symlink_status(final_path, ec)))
    fail(final_path, "no existing file (pass --force to overwrite)", kind_of(final_path));
  // Hidden and marked partial, with the process id so that two runs into one directory do not
  // write into each other's temporaries.
  const fs::path temporary = dir_ / ("." + name + ".partial-" + std::to_string(::getpid()));
  std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
  if (!out) fail(temporary, "a writable file", std::strerror(errno));
  // Registered only once created, so that a failure never removes a path that was not ours.
  entries_.push_back({name, temporary});
  out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
  out.close();
  if (!out) fail(temporary, "the whole file written", "a write error");
}

void ReportWriter::commit(const std::string& last) {
  if (committed_) fail(dir_, "one commit", "a second");
  std::vector<Entry> order;
  for (const auto& e : entries_)
    if (e.name != last) order.push_back(e);
  for (const auto& e : entries_)
    if (e.name == last) order.push_back(e);
  std::vector<fs::path> created;
  try {
    for (const auto& e : order) {
      const fs::path final_path = dir_ / e.name;
      if (force_) {
        std::error_code ec;
        fs::rename(e.temporary, final_path, ec);
        if (ec) fail(final_path, "a file that can be replaced", ec.message());
      } else {
        // link() fails if the name exists, so a file that appeared since add() is never
        // clobbered (rename() would replace it silently).
        std::error_code ec;
        if (::link(e.temporary.c_str(), final_path.c_str()) == 0) {
          fs::remove(e.temporary, ec);
        } else if (errno == EEXIST) {
          fail(final_path, "no existing file (pass --force to overwrite)", kind_of(final_path));
        } else {
          // File systems without hard links: check, then rename (a narrow race remains there).
          if (fs::exists(fs::symlink_status(final_path, ec)))
            fail(final_path, "no existing file (pass --force to overwrite)", kind_of(final_path));
          fs::rename(e.temporary, final_path, ec);
          if (ec) fail(final_path, "a file that can be written", ec.message());
        }
      }
      created.push_back(final_path);
    }
  } catch (...) {
    std::error_code ec;
    for (const auto& p : created) fs::remove(p, ec);
    discard();
    committed_ = true;
    throw;
  }
  entries_.clear();
  committed_ = true;
}

}  // namespace moekit::report
