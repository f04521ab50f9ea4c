"""Checkpoint layers from Python: moekit.load_layer and moekit.torch.MoE.from_pretrained against
the outputs transformers' own blocks produced (tests/fixtures/models/, written by
tools/fixtures/gen_models.py), and moekit.torch.replace_moe_blocks on whole transformers models.

Tolerances as in tests/test_pretrained.cpp: two fp32 computations of the same block differ by
at most 2·γ_n·max|y| with n = d_model + d_ff + top_k + 4 (the longest accumulation chain).
"""

import math
import os

import numpy as np
import pytest

import moekit

safetensors_numpy = pytest.importorskip("safetensors.numpy")

MODELS = os.path.join(os.path.dirname(__file__), "..", "fixtures", "models")
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "switch_transformers",
            "deepseek_v3_fp8", "gpt_oss_mxfp4"]
U = 2.0 ** -24


def gamma(n):
    return n * U / (1 - n * U)


def fixture(family):
    io = safetensors_numpy.load_file(os.path.join(MODELS, family, "moe_io.safetensors"))
    layers = sorted({k.rsplit(".", 1)[0] for k in io if k.endswith(".output")})
    return io, layers


def tolerance(config, scale):
    n = config["d_model"] + config["d_ff"] + config.get("num_experts_per_tok", 1) + 4
    return 2 * gamma(n) * scale


@pytest.mark.parametrize("family", FAMILIES)
def test_load_layer_reproduces_the_transformers_block(family):
    io, layers = fixture(family)
    for name in layers:
        layer = moekit.load_layer(os.path.join(MODELS, family), name)
        assert layer.layer_name == name and not layer.training
        x = io[f"{name}.hidden_states"]
        out, routing = layer(x)  # [batch, seq, d]: each row a sequence
        expected = io[f"{name}.output"]
        tol = tolerance({"d_model": x.shape[-1], "d_ff": layer.config["d_ff"],
                         "num_experts_per_tok": io[f"{name}.topk_indices"].shape[1]}, np.abs(expected).max())
        assert np.abs(out - expected).max() <= tol, (family, name)
        # As sets per token: DeepSeek's block takes an unsorted topk.
        assert (np.sort(routing["experts"], axis=1) == np.sort(io[f"{name}.topk_indices"], axis=1)).all()


def test_sources_say_what_was_borrowed_and_what_was_converted():
    q = moekit.load_layer(os.path.join(MODELS, "qwen3_moe"), 0)
    how = {s["parameter"]: s["how"] for s in q.sources()}
    assert how["gate_up"] == "borrowed (one pointer per expert)" and how["router_weight"] == "converted BF16 → fp32"
    g = moekit.load_layer(os.path.join(MODELS, "gpt_oss_mxfp4"), 1)
    assert {s["parameter"]: s["how"] for s in g.sources()}["gate_up"] == "dequantized MXFP4 → fp32"
    stored = g.stored_parameters()
    assert stored["gate_up"].shape == (4, 192, 64) and stored["gate_up"].dtype == np.float32


def test_load_layer_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"layer 1, dense \(in mlp_only_layers\)"):
        moekit.load_layer(os.path.join(MODELS, "qwen2_moe"), 1)
    with pytest.raises(ValueError, match=r"layer: expected a layer index 0\.\.1, got \"7\""):
        moekit.load_layer(os.path.join(MODELS, "mixtral"), 7)
    with pytest.raises(ValueError, match="dtype: expected 'fp32', 'bf16', 'int8', 'int4' or 'mxfp4', got 'fp8'"):
        moekit.load_layer(os.path.join(MODELS, "mixtral"), 0, dtype="fp8")
    with pytest.raises(ValueError, match="no-such-dir"):
        moekit.load_layer(os.path.join(MODELS, "no-such-dir"), 0)


torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import moekit.torch as mt  # noqa: E402


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "switch_transformers",
                                    "deepseek_v3_fp8", "gpt_oss_mxfp4"])
def test_module_from_pretrained_reproduces_the_block(family):
    io, layers = fixture(family)
    name = layers[-1]
    moe = mt.MoE.from_pretrained(os.path.join(MODELS, family), name).eval()
    x = torch.from_numpy(io[f"{name}.hidden_states"])
    with torch.no_grad():
        y = moe(x).numpy()
    expected = io[f"{name}.output"]
    tol = tolerance({"d_model": x.shape[-1], "d_ff": moe.d_ff, "num_experts_per_tok": moe.top_k},
                    np.abs(expected).max())
    assert np.abs(y - expected).max() <= tol
    assert all(p.requires_grad for p in moe.parameters())  # a module to fine-tune


def tiny_models():
    common = dict(vocab_size=64, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                  hidden_size=32, num_hidden_layers=2, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    configs = {
        "mixtral": transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                                              **common),
        "qwen2_moe": transformers.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=24,
                                                 shared_expert_intermediate_size=40, num_experts=6,
                                                 num_experts_per_tok=2, **common),
        "qwen3_moe": transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=24, num_experts=8,
                                                 num_experts_per_tok=2, norm_topk_prob=True, head_dim=16, **common),
        "olmoe": transformers.OlmoeConfig(intermediate_size=24, num_experts=8, num_experts_per_tok=2, **common),
        "deepseek_v3": transformers.DeepseekV3Config(intermediate_size=64, moe_intermediate_size=16,
                                                     n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                                                     topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                                                     routed_scaling_factor=2.5, q_lora_rank=None, kv_lora_rank=16,
                                                     qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                                     **common),
        "gpt_oss": transformers.GptOssConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                             head_dim=16, sliding_window=4,
                                             layer_types=["sliding_attention", "full_attention"],
                                             **dict(common, num_key_value_heads=1)),
    }
    # Capacity 3 of 12 tokens per sequence over 4 experts: some tokens are dropped.
    configs["switch_transformers"] = transformers.SwitchTransformersConfig(
        vocab_size=64, d_model=32, d_kv=16, d_ff=40, num_layers=2, num_decoder_layers=2, num_heads=2, num_experts=4,
        expert_capacity=3, encoder_sparse_step=2, decoder_sparse_step=2, router_jitter_noise=0.0,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    for c in configs.values():
        c._experts_implementation = "eager"  # grouped_mm has no float64 kernel (the exact reference)
    return configs


def build(config):
    if config.model_type == "switch_transformers":
        return transformers.SwitchTransformersForConditionalGeneration(config)
    return transformers.AutoModelForCausalLM.from_config(config)


def run(model, ids, **kw):
    if model.config.model_type == "switch_transformers":  # an encoder-decoder: the ids on both sides
        return model(input_ids=ids, decoder_input_ids=ids, **kw)
    return model(ids, **kw)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss",
                                    "switch_transformers"])
def test_replace_moe_blocks_keeps_the_logits_and_shares_the_tensors(family):
    torch.manual_seed(0)
    config = tiny_models()[family]
    model = build(config).eval()
    with torch.no_grad():
        for n, b in model.named_buffers():
            if "e_score_correction_bias" in n:
                b.copy_(torch.randn_like(b) * 0.05)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        exact = run(model.double(), ids).logits
        model.float()
        before = run(model, ids).logits.double()
    params_before = {n: p.data_ptr() for n, p in model.named_parameters()}
    replaced = mt.replace_moe_blocks(model)
    assert replaced and all(isinstance(model.get_submodule(n), mt.MoE) for n in replaced)
    # The same tensors, under the same names: optimizer state and checkpoints carry over.
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params_before
    with torch.no_grad():
        after = run(model, ids).logits.double()
    # transformers' own fp32 logits are |before − exact| from the exact (fp64) ones; moekit's
    # fp32 blocks round as much again at most (same operations, other orders): within 3× of it.
    err_hf = (before - exact).abs().max().item()
    assert (after - exact).abs().max().item() <= 3 * err_hf + 1e-7
    # A training step reaches the shared parameters through moekit's backward.
    model.train()
    loss = run(model, ids, labels=ids).loss
    loss.backward()
    block = model.get_submodule(replaced[0])
    grads = [p.grad for n, p in block.named_parameters() if "experts" in n]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert math.isfinite(loss.item())


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "switch_transformers"])
def test_replace_moe_blocks_gradients_match_transformers(family):
    torch.manual_seed(1)
    config = tiny_models()[family]
    reference = build(config).double().eval()
    model = build(config).eval()
    model.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    mt.replace_moe_blocks(model)
    ids = torch.randint(0, 64, (2, 10))
    run(reference, ids, labels=ids).loss.backward()
    run(model, ids, labels=ids).loss.backward()
    ours = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        g, r = ours[name].grad.double(), p.grad
        # Normwise, fp32 against fp64: the gradient chains the forward and backward dot products
        # of the whole network (≈ 10 layers of length ≤ 64), rounding ≤ n·u·√n relative with
        # random signs; n = 2000 covers them with room for the softmax and norms.
        n = 2000
        assert ((g - r).norm() / max(r.norm().item(), 1e-30)).item() <= n * U * math.sqrt(n), name
