#!/usr/bin/env bash
# The main job: installs what is missing, builds moekit (Release, build/) and runs `moekit train`
# on its embedded default (8 experts, top-2, 4 synthetic domains, about a minute on 2 cores),
# which writes the routing report to runs/<UTC time>/ and prints where it is.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

jobs=${MOEKIT_JOBS:-$(nproc 2>/dev/null || echo 2)}

echo "== setup"
bash scripts/setup.sh

echo "== build (Release, build/)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DMOEKIT_SANITIZE=OFF
cmake --build build -j "$jobs" --target moekit_cli

echo "== moekit train"
build/moekit train "$@"
