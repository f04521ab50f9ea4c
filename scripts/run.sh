#!/usr/bin/env bash
# The main job: installs what is missing, builds moekit (Release, build/) and routes the shipped
# example (Mixtral-style top-2 over 8 experts) with `moekit route`, printing the OUT document.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

jobs=${MOEKIT_JOBS:-$(nproc 2>/dev/null || echo 2)}

echo "== setup"
bash scripts/setup.sh

echo "== build (Release, build/)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DMOEKIT_SANITIZE=OFF
cmake --build build -j "$jobs" --target moekit_cli

echo "== moekit route --config examples/route/config.json --input examples/route/input.json"
build/moekit route --config examples/route/config.json --input examples/route/input.json
