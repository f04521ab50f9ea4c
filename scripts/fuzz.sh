#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/, clang with ASan and UBSan) in build-fuzz/ and runs
# each for a bounded time, one after the other, one process each; see docs/fuzzing.md.
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET [TARGET...]]     default: 60 s, every target
#
# Targets: safetensors, config, checkpoint_index, presets, model_family. Each runs on its working corpus
# build-fuzz/corpus/<target>/ (kept between runs; new inputs go there) with the seeds
# tests/fuzz/corpus/<target>/ read as well, and the dictionary tests/fuzz/<target>.dict.
# Prints the executions each target survived. On a crash, a timeout or running out of memory
# the input is copied into tests/fuzz/regressions/<target>/ (commit it: the replay test
# fuzz_replay.<target>.<file> then fails until the bug is fixed) and the script exits non-zero
# after the remaining targets have run. Environment: MOEKIT_JOBS (build jobs), CC/CXX (default clang,
# clang++), MOEKIT_FUZZ_FLAGS (more libFuzzer flags, e.g. "-max_len=65536", or "-runs=3000000" to stop
# after that many executions when it comes before the time limit).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${1:-60}
shift || true
targets=("$@")
((${#targets[@]})) || targets=(safetensors config checkpoint_index presets model_family)
jobs=${MOEKIT_JOBS:-$(nproc 2>/dev/null || echo 2)}
if ! [[ $seconds =~ ^[0-9]+$ ]] || ((seconds < 1)); then
  echo "fuzz: usage: bash scripts/fuzz.sh [SECONDS_PER_TARGET [TARGET...]]" >&2
  exit 2
fi

if ! command -v "${CXX:-clang++}" >/dev/null 2>&1; then
  echo "fuzz: ${CXX:-clang++} not found: run bash scripts/setup.sh (Debian's clang, libclang-rt-dev)" >&2
  exit 2
fi
CC=${CC:-clang} CXX=${CXX:-clang++} cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMOEKIT_BUILD_FUZZ=ON -DMOEKIT_BUILD_TESTS=OFF -DMOEKIT_BUILD_CLI=OFF -DMOEKIT_SANITIZE=OFF >/dev/null
cmake --build build-fuzz -j "$jobs" --target "${targets[@]/#/moekit_fuzz_}"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:detect_stack_use_after_return=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

failed=()
summary=()
for t in "${targets[@]}"; do
  exe=build-fuzz/tests/fuzz/moekit_fuzz_$t
  corpus=build-fuzz/corpus/$t
  artifacts=build-fuzz/artifacts/$t
  log=build-fuzz/fuzz-$t.log
  mkdir -p "$corpus" "$artifacts"
  rm -f "$artifacts"/*
  # The regressions are not read: the replay tests (ctest -R fuzz_replay) run them, and a big
  # one would raise libFuzzer's input size limit (the largest seed) for the whole run.
  seeds=(tests/fuzz/corpus/"$t")
  # The generated model fixtures, when present, seed the parsers that read their files; the
  # presets themselves seed the preset reader.
  shopt -s nullglob
  case $t in
    config | model_family) extra=(tests/fixtures/models/*/config.json) ;;
    checkpoint_index) extra=(tests/fixtures/models/*/model.safetensors.index.json) ;;
    presets) extra=(src/presets/*.json) ;;
    *) extra=() ;;
  esac
  shopt -u nullglob
  for f in "${extra[@]}"; do cp "$f" "$corpus/fixture_$(basename "$(dirname "$f")")_$(basename "$f")"; done

  dict=()
  [[ -f tests/fuzz/$t.dict ]] && dict=(-dict="tests/fuzz/$t.dict")

  echo
  echo "== fuzz $t: $seconds s (log: $log)"
  rc=0
  # shellcheck disable=SC2086  # MOEKIT_FUZZ_FLAGS is a list of flags
  "$exe" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "${dict[@]}" ${MOEKIT_FUZZ_FLAGS:-} "$corpus" "${seeds[@]}" >"$log" 2>&1 || rc=$?

  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1 || true)
  units=$(grep -oE 'corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -n 1 | sed 's/corp: //' || true)
  found=("$artifacts"/*)
  [[ -e ${found[0]} ]] || found=()
  if ((rc != 0)) || ((${#found[@]})); then
    tail -n 60 "$log"
    mkdir -p tests/fuzz/regressions/"$t"
    for f in "${found[@]}"; do
      cp "$f" tests/fuzz/regressions/"$t"/
      echo "fuzz $t: kept $(basename "$f") in tests/fuzz/regressions/$t/ (minimize: $exe -minimize_crash=1 -runs=100000 $f)"
    done
    ((${#found[@]})) || echo "fuzz $t: exit status $rc and no input saved; see $log"
    failed+=("$t")
    summary+=("$(printf '%-18s %6s s %14s executions  corpus %-12s FAILED (exit %s)' "$t" "$seconds" "${execs:-?}" "${units:-?}" "$rc")")
  else
    summary+=("$(printf '%-18s %6s s %14s executions  corpus %-12s survived' "$t" "$seconds" "${execs:-?}" "${units:-?}")")
  fi
done

echo
echo "== fuzz summary ($(date -u +%Y-%m-%d), clang $(${CXX:-clang++} -dumpversion))"
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
  echo "fuzz: FAILED: ${failed[*]}; the inputs are in tests/fuzz/regressions/ (see docs/fuzzing.md)" >&2
  exit 1
fi
