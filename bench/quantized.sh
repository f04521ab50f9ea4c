#!/usr/bin/env bash
# The quantized-experts table (README, bench/README.md): `moekit bench` on the decode and the
# coarse prefill shape for bf16, int8, int4 and mxfp4, ROUNDS rounds with the dtypes alternated
# (a noisy neighbour then slows them alike), medians per row. Prints one Markdown table.
#   bash bench/quantized.sh [ROUNDS (5)] [THREADS (2)]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-5}
threads=${2:-2}
bin=build/moekit
[[ -x $bin ]] || { echo "quantized.sh: build first (cmake -S . -B build && cmake --build build)" >&2; exit 1; }
out=$(mktemp)
trap 'rm -f "$out"' EXIT
shapes=("8 2048 768 128 8" "512 1024 3584 8 2")
for ((r = 0; r < rounds; ++r)); do
  for shape in "${shapes[@]}"; do
    read -r t d f e k <<<"$shape"
    for dt in bf16 int8 int4 mxfp4; do
      "$bin" bench --tokens "$t" --d-model "$d" --d-ff "$f" --experts "$e" --top-k "$k" --dtype "$dt" \
        --threads "$threads" --repeats 7 --warmup 2 --memory-read --json >>"$out"
    done
  done
  echo "quantized.sh: round $((r + 1)) of $rounds done" >&2
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
def med(xs): return statistics.median(xs)
shapes = sorted({(r["tokens"], r["d_model"], r["d_ff"], r["experts"], r["top_k"]) for r in rows}, key=lambda s: s[0])
print("| shape (T, d, d_ff, E, k) | dtype | forward ms | vs bf16 | weight bytes | weights GB/s | / read bandwidth | output_rel_error |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for s in shapes:
    sel = [r for r in rows if (r["tokens"], r["d_model"], r["d_ff"], r["experts"], r["top_k"]) == s]
    bf16 = med([r["forward_ms"] for r in sel if r["dtype"] == "bf16"])
    for dt in ["bf16", "int8", "int4", "mxfp4"]:
        rs = [r for r in sel if r["dtype"] == dt]
        ms = med([r["forward_ms"] for r in rs])
        gbps = med([r["weight_gbps"] for r in rs])
        ratio = med([r["weight_gbps_over_read"] for r in rs])
        print(f"| {', '.join(map(str, s))} | {dt} | {ms:.2f} | {bf16 / ms:.2f}× | {rs[0]['weight_bytes_touched'] / 1e6:.0f} MB |"
              f" {gbps:.1f} | {ratio:.2f} | {med([r['output_rel_error'] for r in rs]):.2e} |")
print()
print(f"read bandwidth (1 GiB, {rows[0]['threads']} threads): median {med([r['memory_read_gbps'] for r in rows]):.1f} GB/s; "
      f"isa {rows[0]['isa']}; {len(rows) // (4 * len(shapes))} rounds")
PY
