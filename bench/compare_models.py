#!/usr/bin/env python3
"""A whole transformers model before and after `moekit.torch.replace_moe_blocks`, in one process.

For each family (a small random model built with transformers from a config made here, no
download) it measures, with torch.set_num_threads(threads), medians of --repeats after a warm-up:
  * the forward of the whole causal LM (eval, no grad) on a [batch, seq] batch of token ids;
  * a fine-tuning step: forward with labels, backward of the LM loss, AdamW step;
first with transformers' own MoE blocks (its default experts implementation, and `grouped_mm`
where it runs), then after swapping the blocks for moekit modules sharing the same tensors
(same weights, same optimizer), and prints the ratios. The logits of both are compared too
(the largest difference, relative to the largest logit).

Needs `bash scripts/python_env.sh` (moekit, torch, transformers). Not part of the test suite.

  .venv-python/bin/python bench/compare_models.py --threads 2 --repeats 5 --markdown
"""

import argparse
import statistics
import time

import torch
import transformers

import moekit.torch as mt


def configs(hidden, inter, experts, k, layers, vocab):
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=8, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
                  pad_token_id=None)
    return {
        "mixtral": transformers.MixtralConfig(intermediate_size=inter, num_local_experts=experts,
                                              num_experts_per_tok=k, **common),
        "qwen3_moe": transformers.Qwen3MoeConfig(intermediate_size=4 * inter, moe_intermediate_size=inter,
                                                 num_experts=experts, num_experts_per_tok=k, norm_topk_prob=True,
                                                 head_dim=hidden // 8, **common),
        "olmoe": transformers.OlmoeConfig(intermediate_size=inter, num_experts=experts, num_experts_per_tok=k,
                                          **common),
    }


def median_ms(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(model, ids, repeats):
    model.eval()

    def forward():
        with torch.no_grad():
            model(ids)

    fwd = median_ms(forward, repeats)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    stp = median_ms(step, repeats)
    return fwd, stp


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--families", default="mixtral,qwen3_moe,olmoe")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for family in a.families.split(","):
        cfg = configs(a.hidden, a.inter, a.experts, a.top_k, a.layers, a.vocab)[family]
        torch.manual_seed(0)
        ids = torch.randint(0, a.vocab, (a.batch, a.seq))
        results = {}
        reference_state = None
        for impl in ("eager", "grouped_mm"):
            cfg._experts_implementation = impl  # as bench/compare_torch.py --module selects it
            torch.manual_seed(1)
            model = transformers.AutoModelForCausalLM.from_config(cfg)
            if reference_state is None:
                reference_state = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(reference_state)
            try:
                results[impl] = measure(model, ids, a.repeats)
            except Exception as e:  # an implementation this torch build lacks
                print(f"{family} {impl}: skipped ({type(e).__name__}: {e})")
        cfg._experts_implementation = "eager"
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        model.load_state_dict(reference_state)
        model.eval()
        with torch.no_grad():
            before = model(ids).logits
        mt.replace_moe_blocks(model)
        with torch.no_grad():
            after = model(ids).logits
        diff = ((after - before).abs().max() / before.abs().max()).item()
        results["moekit"] = measure(model, ids, a.repeats)
        best_fwd = min((v[0], k) for k, v in results.items() if k != "moekit")
        best_step = min((v[1], k) for k, v in results.items() if k != "moekit")
        rows.append((family, results, best_fwd, best_step, diff))

    head = (f"model: {a.layers} layers, hidden {a.hidden}, {a.experts} experts of {a.inter}, top-{a.top_k}, "
            f"vocab {a.vocab}; batch {a.batch} × {a.seq} tokens; {a.threads} threads; medians of {a.repeats}; "
            f"torch {torch.__version__.split('+')[0]}, transformers {transformers.__version__}")
    print(head)
    if a.markdown:
        print("| family | HF forward | moekit forward | forward speed-up | HF step (fwd + bwd + AdamW) | "
              "moekit step | step speed-up | max |Δlogits| / max |logits| |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for family, r, (bf, bfk), (bs, bsk), diff in rows:
        mf, ms = r["moekit"]
        if a.markdown:
            print(f"| {family} | {bf:.0f} ms ({bfk}) | {mf:.0f} ms | {bf / mf:.2f}× | {bs:.0f} ms ({bsk}) | "
                  f"{ms:.0f} ms | {bs / ms:.2f}× | {diff:.1e} |")
        else:
            print(f"{family:10s} forward HF {bf:8.1f} ms ({bfk}) moekit {mf:8.1f} ms  {bf / mf:5.2f}x   "
                  f"step HF {bs:8.1f} ms ({bsk}) moekit {ms:8.1f} ms  {bs / ms:5.2f}x   logits rel diff {diff:.1e}")


if __name__ == "__main__":
    main()
