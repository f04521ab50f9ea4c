#!/usr/bin/env bash
# Installs the Debian packages moekit needs to build and test, only those that are missing.
# Safe to run again: when everything is present it installs nothing and does not touch apt.
set -euo pipefail

packages=(
  cmake             # build system (>= 3.20)
  make              # the generator CMake uses by default
  g++               # C++20 compiler; brings libasan/libubsan for the sanitizer build
  nlohmann-json3-dev
  libgtest-dev      # GoogleTest
  libgmock-dev
  libbenchmark-dev  # Google Benchmark
  libcli11-dev      # CLI11, header-only: the moekit command's flag parser
  clang             # the fuzz targets (scripts/fuzz.sh): libFuzzer is clang's
  libclang-rt-dev   # clang's runtimes: libFuzzer, ASan, UBSan (not pulled in without recommends)
  git
  ca-certificates
)

installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=()
for p in "${packages[@]}"; do
  installed "$p" || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
  echo "setup: all required packages are installed"
  exit 0
fi

echo "setup: installing missing packages: ${missing[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: apt-get not found; install these packages by hand: ${missing[*]}" >&2
  exit 1
fi

sudo_cmd=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo_cmd=(sudo)
  else
    echo "setup: not root and sudo is missing; install these packages as root: ${missing[*]}" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
"${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
echo "setup: installed ${missing[*]}"
