#!/usr/bin/env python3
"""moekit against a PyTorch eager MoE block, same shapes, dtype and threads, in one run.

The PyTorch block is written like Hugging Face's Mixtral sparse MoE block (transformers 4.x
`MixtralSparseMoeBlock`): a router Linear, softmax in fp32, top-k, renormalisation, then a Python
loop over the experts that gathers each expert's tokens, runs its SwiGLU MLP (one weight tensor
per expert: w1 gate, w3 up, w2 down) and scatters the weighted result with index_add_. In bf16
the whole block (router included) is bf16, as a model loaded in bf16 runs it.

For each shape and dtype it measures, with torch.set_num_threads(threads):
  * torch forward (no grad), median of --repeats runs after --warmup;
  * torch's own dense GEMM of equal FLOPs, [T*k, d_model] x [d_model, 3*d_ff], same dtype;
  * with --backward, forward + backward (input and every weight require grad);
  * `moekit bench --json` with the same shape, dtype, threads and repeats (a subprocess);
and prints the table side by side (markdown with --markdown).

Needs PyTorch (see bench/README.md). Not part of the test suite.

  python3 bench/compare_torch.py --moekit build/moekit --threads 2 --dtypes fp32,bf16

With --module it compares, in this one process, the Python package's `moekit.torch.MoE` with
Hugging Face transformers' `MixtralSparseMoeBlock` (its eager experts implementation, and
`grouped_mm`, the one `from_pretrained` picks), all three with the same weights (the HF block's
state_dict loaded into moekit's module), on the coarse and fine-grained shapes: the forward (no
grad) and a training step (forward, backward of ⟨y, dy⟩, AdamW step), in fp32, as bf16 modules,
and as fp32 modules under torch.autocast(bf16); and `moekit bench`'s forward of the same shape
(the C++ layer without Python). Needs `bash scripts/python_env.sh` (moekit, torch, transformers):

  .venv-python/bin/python bench/compare_torch.py --module --moekit build/moekit --threads 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:  # pragma: no cover
    sys.exit("compare_torch.py needs PyTorch: python3 -m venv .venv-bench && "
             ".venv-bench/bin/pip install torch")

# (tokens, d_model, d_ff, experts, top_k): coarse, fine-grained, decode (the layer's goal shapes).
SHAPES = [(512, 1024, 3584, 8, 2), (1024, 1024, 384, 64, 8), (8, 2048, 768, 128, 8)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Expert(nn.Module):
    """Mixtral's MixtralBlockSparseTop2MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model, d_ff):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoeBlock(nn.Module):
    """Hugging Face MixtralSparseMoeBlock.forward, without jitter (eval)."""

    def __init__(self, d_model, d_ff, experts, top_k):
        super().__init__()
        self.num_experts, self.top_k = experts, top_k
        self.gate = nn.Linear(d_model, experts, bias=False)
        self.experts = nn.ModuleList(Expert(d_model, d_ff) for _ in range(experts))

    def forward(self, hidden_states):
        num_tokens, d_model = hidden_states.shape
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros((num_tokens, d_model), dtype=hidden_states.dtype, device=hidden_states.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = int(expert_idx)
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, d_model)
            current = self.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, current.to(hidden_states.dtype))
        return final


def cpu_busy_cores(interval=1.0):
    """CPU cores kept busy by other processes over `interval` s while this one sleeps (/proc/stat)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle
    try:
        t0, i0 = sample()
        time.sleep(interval)
        t1, i1 = sample()
    except OSError:
        return float("nan")
    return (os.cpu_count() or 1) * (1.0 - (i1 - i0) / max(1, t1 - t0))


def wait_quiet(args):
    """Waits (up to --quiet-wait s) until other processes use less than 0.25 core; returns the
    busy cores seen last, so that the table can say how noisy the machine was."""
    deadline = time.monotonic() + args.quiet_wait
    while True:
        busy = cpu_busy_cores()
        if busy < 0.25 or time.monotonic() >= deadline:
            return busy


def torch_side(shape, dtype, args):
    tokens, d_model, d_ff, experts, top_k = shape
    torch.manual_seed(args.seed)
    block = SparseMoeBlock(d_model, d_ff, experts, top_k).to(dtype)
    x = torch.randn(tokens, d_model).to(dtype)
    out = {}
    a = torch.randn(tokens * top_k, d_model).to(dtype)
    w = (torch.randn(3 * d_ff, d_model) / d_model ** 0.5).to(dtype)
    # Forward and dense GEMM in alternation, so that a noisy neighbour slows both alike.
    fwd, dense = [], []
    with torch.no_grad():
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            block(x)
            t1 = time.perf_counter()
            F.linear(a, w)
            t2 = time.perf_counter()
            if i >= args.warmup:
                fwd.append((t1 - t0) * 1e3)
                dense.append((t2 - t1) * 1e3)
    out["forward_ms"] = statistics.median(fwd)
    out["dense_ms"] = statistics.median(dense)
    if args.backward:
        xg = x.clone().requires_grad_(True)
        dy = torch.randn(tokens, d_model).to(dtype)
        fwd, bwd = [], []

        def zero():
            block.zero_grad(set_to_none=True)
            xg.grad = None

        for i in range(args.warmup + args.repeats):
            zero()
            t0 = time.perf_counter()
            y = block(xg)
            t1 = time.perf_counter()
            y.backward(dy)
            t2 = time.perf_counter()
            if i >= args.warmup:
                fwd.append((t1 - t0) * 1e3)
                bwd.append((t2 - t1) * 1e3)
        out["train_forward_ms"] = statistics.median(fwd)
        out["backward_ms"] = statistics.median(bwd)
        out["step_ms"] = statistics.median([f + b for f, b in zip(fwd, bwd)])
    return out


def moekit_side(shape, dtype_name, args):
    tokens, d_model, d_ff, experts, top_k = shape
    cmd = [args.moekit, "bench", "--tokens", str(tokens), "--d-model", str(d_model), "--d-ff", str(d_ff),
           "--experts", str(experts), "--top-k", str(top_k), "--dtype", dtype_name,
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--json"]
    if args.backward:
        cmd.append("--backward")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# Timing keys (the smaller the better) and rates (the larger the better); other keys: first round.
def keep_fastest(best, new):
    for key, value in new.items():
        if key not in best:
            best[key] = value
        elif not isinstance(value, (int, float)):
            continue
        elif key.endswith("_ms"):
            best[key] = min(best[key], value)
        elif key.endswith("_gbps") and key != "weight_gbps":
            best[key] = max(best[key], value)


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moekit", default="build/moekit", help="path of the moekit executable")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--shapes", default=None,
                   help="semicolon-separated T,D,F,E,K tuples (default: the three goal shapes)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backward", action="store_true", help="also time forward + backward")
    p.add_argument("--rounds", type=int, default=1,
                   help="run torch and moekit alternately this many times per shape and keep, per "
                        "figure, the smallest median (noise on a shared machine only slows runs down)")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="before each measurement wait up to this many seconds for other processes "
                        "to leave the CPUs (less than 0.25 core busy); the busy cores seen are reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--module", action="store_true",
                   help="compare moekit.torch.MoE with transformers' Mixtral block in this process")
    p.add_argument("--modes", default="fp32,bf16,autocast", help="--module: comma-separated fp32, bf16, autocast")
    p.add_argument("--budget", type=float, default=20.0,
                   help="--module: seconds per measurement after which fewer repeats (at least 3) are taken")
    p.add_argument("--markdown", action="store_true", help="print markdown tables")
    p.add_argument("--json-out", default=None, help="write every raw measurement to this file")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    if args.module:
        return module_mode(args)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            sys.exit(f"--dtypes: expected fp32 or bf16, got '{d}'")
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    rows = []
    for dtype_name in dtypes:
        for shape in shapes:
            t, m, busy = {}, {}, []
            for _ in range(max(1, args.rounds)):
                busy.append(wait_quiet(args))
                keep_fastest(t, torch_side(shape, DTYPES[dtype_name], args))
                busy.append(wait_quiet(args))
                keep_fastest(m, moekit_side(shape, dtype_name, args))
            if "weight_bytes_touched" in m:
                m["weight_gbps"] = m["weight_bytes_touched"] / (m["forward_ms"] * 1e6)
            m["ratio_to_dense"] = m["dense_equal_flops_ms"] / m["forward_ms"]
            m["router_share"] = m["router_ms"] / m["forward_ms"]
            if "backward_ms" in m:
                m["backward_over_forward"] = m["backward_ms"] / m["train_forward_ms"]
            rows.append({"shape": shape, "dtype": dtype_name, "torch": t, "moekit": m, "busy": busy})
            print(f"# done {shape} {dtype_name}: torch {t['forward_ms']:.2f} ms, "
                  f"moekit {m['forward_ms']:.2f} ms", file=sys.stderr, flush=True)

    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"torch_version": torch.__version__, "threads": args.threads, "rows": rows}, f, indent=1)

    isa = rows[0]["moekit"]["isa"] if rows else "?"
    print(f"torch {torch.__version__}, {args.threads} threads, moekit isa {isa}; "
          f"medians of {args.repeats} after {args.warmup} warm-up, best of {max(1, args.rounds)} round(s)")
    head = ["shape (T, d, ff, E, k)", "dtype", "torch ms", "moekit ms", "speed-up",
            "moekit/dense", "torch/dense", "torch dense ms", "moekit dense ms", "router %",
            "weights GB/s (torch / moekit / read)", "busy cores before"]
    table = []
    for r in rows:
        t, m = r["torch"], r["moekit"]
        mem = "-"
        if "weight_bytes_touched" in m:
            torch_gbps = m["weight_bytes_touched"] / (t["forward_ms"] * 1e6)
            mem = f"{torch_gbps:.1f} / {m['weight_gbps']:.1f} / {m['memory_read_gbps']:.1f}"
        table.append([
            ", ".join(map(str, r["shape"])), r["dtype"], fmt(t["forward_ms"]), fmt(m["forward_ms"]),
            fmt(t["forward_ms"] / m["forward_ms"], ".2f") + "x", fmt(m["ratio_to_dense"], ".2f"),
            fmt(t["dense_ms"] / t["forward_ms"], ".2f"), fmt(t["dense_ms"]), fmt(m["dense_equal_flops_ms"]),
            fmt(100 * m["router_share"]), mem, " ".join(fmt(b, ".1f") for b in r["busy"])])
    print_table(head, table, args.markdown)

    if args.backward:
        # moekit's step includes re-deriving its packed weights, as after every optimizer update.
        head = ["shape (T, d, ff, E, k)", "dtype", "torch fwd+bwd ms", "moekit repack+fwd+bwd ms",
                "moekit repack ms", "step speed-up", "torch bwd/fwd", "moekit bwd/fwd", "moekit peak RSS MB",
                "busy cores before"]
        table = []
        for r in rows:
            t, m = r["torch"], r["moekit"]
            table.append([
                ", ".join(map(str, r["shape"])), r["dtype"], fmt(t["step_ms"]), fmt(m["step_ms"]),
                fmt(m.get("weight_update_ms")), fmt(t["step_ms"] / m["step_ms"], ".2f") + "x",
                fmt(t["backward_ms"] / t["train_forward_ms"], ".2f"),
                fmt(m["backward_over_forward"], ".2f"), fmt(m["peak_rss_mb"], ".0f"),
                " ".join(fmt(b, ".1f") for b in r["busy"])])
        print()
        print_table(head, table, args.markdown)


# ---------------------------------------------------------------------------------------------
# --module: moekit.torch.MoE against transformers' Mixtral block, in one process.

MODULE_SHAPES = [(512, 1024, 3584, 8, 2), (1024, 1024, 384, 64, 8)]
MODULE_MODES = ["fp32", "bf16", "autocast"]


def timed(fn, warmup, repeats, budget_s):
    """Median ms of fn() over `repeats` runs after `warmup` (fewer, at least 3, when the runs
    would take longer than budget_s)."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), len(times)


def module_side(shape, mode, args):
    import contextlib

    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    import moekit.torch

    tokens, d_model, d_ff, experts, top_k = shape
    torch.manual_seed(args.seed)
    hf_cfg = transformers.MixtralConfig(hidden_size=d_model, intermediate_size=d_ff, num_local_experts=experts,
                                        num_experts_per_tok=top_k, router_jitter_noise=0.0)
    ref = MixtralSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        for prm in ref.parameters():
            prm.normal_(0.0, d_model ** -0.5)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    blocks = {}
    for impl in ("eager", "grouped_mm"):
        hf_cfg._experts_implementation = impl
        b = MixtralSparseMoeBlock(hf_cfg)
        b.load_state_dict(ref.state_dict())
        blocks["hf_" + impl] = b.to(dtype)
    mk = moekit.torch.MoE(preset="hf-mixtral", hidden_size=d_model, intermediate_size=d_ff,
                          num_local_experts=experts, num_experts_per_tok=top_k, dtype=dtype)
    mk.load_state_dict(ref.state_dict())
    blocks["moekit"] = mk
    x = torch.randn(1, tokens, d_model).to(dtype)
    dy = torch.randn(1, tokens, d_model)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mode == "autocast" else contextlib.nullcontext
    out = {}
    for name, block in blocks.items():
        block.eval()  # inference: moekit then multiplies with its fused-SwiGLU packing
        with torch.no_grad(), ctx():
            fwd = timed(lambda: block(x), args.warmup, args.repeats, args.budget)
        block.train()
        opt = torch.optim.AdamW(block.parameters(), lr=1e-6)
        parts = {"fwd": [], "bwd": [], "opt": []}

        def step():
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with ctx():
                y = block(x)
            t1 = time.perf_counter()
            (y.float() * dy).sum().backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            for key, a, b in (("fwd", t0, t1), ("bwd", t1, t2), ("opt", t2, t3)):
                parts[key].append((b - a) * 1e3)

        stp = timed(step, 1, args.repeats, args.budget)
        out[name] = {"forward_ms": fwd[0], "forward_runs": fwd[1], "step_ms": stp[0], "step_runs": stp[1]}
        for key, values in parts.items():
            out[name]["step_" + key + "_ms"] = statistics.median(values[1:] if len(values) > 1 else values)
        print(f"# {shape} {mode} {name}: forward {fwd[0]:.1f} ms, step {stp[0]:.1f} ms "
              f"(fwd {out[name]['step_fwd_ms']:.0f}, bwd {out[name]['step_bwd_ms']:.0f}, "
              f"AdamW {out[name]['step_opt_ms']:.0f})", file=sys.stderr, flush=True)
        del opt
    return out


def module_mode(args):
    shapes = MODULE_SHAPES if not args.shapes else [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows = []
    for shape in shapes:
        for mode in modes:
            busy = wait_quiet(args)
            r = module_side(shape, mode, args)
            bench = None
            if args.moekit and os.path.exists(args.moekit):
                bench = moekit_side(shape, "fp32" if mode == "fp32" else "bf16", args)["forward_ms"]
            rows.append({"shape": shape, "mode": mode, "results": r, "bench_forward_ms": bench, "busy": busy})
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"torch_version": torch.__version__, "threads": args.threads, "rows": rows}, f, indent=1)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads; "
          f"medians of up to {args.repeats} runs after {args.warmup} warm-up")
    head = ["shape (T, d, ff, E, k)", "mode", "moekit.torch fwd ms", "moekit bench fwd ms", "module/bench",
            "HF eager fwd ms", "HF grouped_mm fwd ms", "fwd speed-up", "moekit.torch step ms",
            "HF eager step ms", "HF grouped_mm step ms", "step speed-up", "AdamW ms (moekit / HF best)",
            "busy cores before"]
    table = []
    for row in rows:
        r = row["results"]
        m, e, g = r["moekit"], r["hf_eager"], r["hf_grouped_mm"]
        best_fwd = min(e["forward_ms"], g["forward_ms"])
        best_step = min(e["step_ms"], g["step_ms"])
        b = row["bench_forward_ms"]
        table.append([", ".join(map(str, row["shape"])), row["mode"], fmt(m["forward_ms"]), fmt(b),
                      "-" if b is None else fmt(m["forward_ms"] / b, ".2f"), fmt(e["forward_ms"]),
                      fmt(g["forward_ms"]), fmt(best_fwd / m["forward_ms"], ".2f") + "x", fmt(m["step_ms"]),
                      fmt(e["step_ms"]), fmt(g["step_ms"]), fmt(best_step / m["step_ms"], ".2f") + "x",
                      fmt(m["step_opt_ms"], ".0f") + " / " + fmt((e if e["step_ms"] < g["step_ms"] else g)["step_opt_ms"], ".0f"),
                      fmt(row["busy"], ".1f")])
    print_table(head, table, args.markdown)


def print_table(head, table, markdown):
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("| " + " | ".join("---" for _ in head) + " |")
        for row in table:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
