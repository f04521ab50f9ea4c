#!/usr/bin/env bash
# Runs every test: a Release build in build/ and its tests, the Python package (pip install . into
# .venv-python) and its tests, then an ASan+UBSan build in build-asan/ and its tests. All must pass.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

jobs=${MOEKIT_JOBS:-$(nproc 2>/dev/null || echo 2)}

stage() {
  echo
  echo "=============================================================="
  echo "== $*"
  echo "=============================================================="
}

start=$SECONDS

stage "setup: required packages"
bash scripts/setup.sh

stage "Release build (build/)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DMOEKIT_SANITIZE=OFF -DMOEKIT_BUILD_TESTS=ON
cmake --build build -j "$jobs"

stage "Release tests (build/)"
ctest --test-dir build --output-on-failure -j2

stage "Python package: pip install . into .venv-python, then pytest (tests/python/)"
bash scripts/python_env.sh
.venv-python/bin/python -m pytest -q tests/python

stage "fuzz: libFuzzer targets, 30 s each (build-fuzz/, clang; docs/fuzzing.md)"
bash scripts/fuzz.sh 30

stage "ASan+UBSan build (build-asan/)"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOEKIT_SANITIZE=ON -DMOEKIT_BUILD_TESTS=ON
cmake --build build-asan -j "$jobs"

stage "ASan+UBSan tests (build-asan/)"
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=0:detect_stack_use_after_return=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
ctest --test-dir build-asan --output-on-failure -j2

stage "all tests passed ($((SECONDS - start)) s)"
