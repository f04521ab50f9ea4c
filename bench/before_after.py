#!/usr/bin/env python3
"""Two builds of `moekit bench` side by side, alternated, in one sitting: the table that shows a
change did not move performance.

    python3 bench/before_after.py --before OLD/moekit --after build/moekit [--rounds 2] [--threads 2]
                                  [--shapes coarse,fine,decode] [--dtypes fp32,bf16,int8,int4]

For each of the README's three shapes (coarse 512·1024·3584·8·2, fine-grained 1024·1024·384·64·8,
decode 8·2048·768·128·8) and each dtype (fp32 and bf16 with --backward: forward, train forward,
backward, step; int8 and int4: forward), runs `moekit bench --json --repeats R` of the binary
before and the binary after, alternated (before, after, before, after, ...) for --rounds rounds.
Every figure of one run is already a median of R calls; the table gives per binary the median
over the rounds and the spread between its rounds (slowest / fastest − 1), which is this
machine's run-to-run noise. A benchmark, never part of the tests.
"""
import argparse
import json
import statistics
import subprocess
import sys

SHAPES = {"coarse": (512, 1024, 3584, 8, 2), "fine": (1024, 1024, 384, 64, 8), "decode": (8, 2048, 768, 128, 8)}
TRAIN_FIGURES = [("forward", "forward_ms"), ("train forward", "train_forward_ms"), ("backward", "backward_ms"),
                 ("step", "step_ms")]


def run(binary, shape, dtype, threads, repeats):
    t, d, f, e, k = shape
    cmd = [binary, "bench", "--tokens", str(t), "--d-model", str(d), "--d-ff", str(f), "--experts", str(e),
           "--top-k", str(k), "--dtype", dtype, "--threads", str(threads), "--repeats", str(repeats), "--json"]
    if dtype in ("fp32", "bf16"):
        cmd.append("--backward")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", default="fp32,bf16,int8,int4")
    ap.add_argument("--shapes", default="coarse,fine,decode", help="a subset of coarse,fine,decode")
    a = ap.parse_args()
    rows = []
    for shape in [SHAPES[name] for name in a.shapes.split(",")]:
        for dtype in a.dtypes.split(","):
            figures = TRAIN_FIGURES if dtype in ("fp32", "bf16") else TRAIN_FIGURES[:1]
            got = {"before": [], "after": []}
            for r in range(a.rounds):
                for which in ("before", "after"):
                    print(f"{which} {shape} {dtype} round {r + 1}", file=sys.stderr, flush=True)
                    got[which].append(run(getattr(a, which), shape, dtype, a.threads, a.repeats))
            for label, key in figures:
                b = [g[key] for g in got["before"]]
                f = [g[key] for g in got["after"]]
                rows.append((shape, dtype, label, statistics.median(b), statistics.median(f),
                             max(b) / min(b) - 1, max(f) / min(f) - 1))
    print("| shape (T, d, d_ff, E, k) | dtype | ms | before | after | after / before | spread before / after |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape, dtype, label, b, f, sb, sf in rows:
        print(f"| {', '.join(map(str, shape))} | {dtype} | {label} | {b:.1f} | {f:.1f} | {f / b:.2f} | "
              f"+{100 * sb:.0f}% / +{100 * sf:.0f}% |")


if __name__ == "__main__":
    main()
