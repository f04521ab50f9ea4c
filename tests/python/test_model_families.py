"""Model families: config.json → the moekit block, against the transformers block of that
model_type built from the same config (no downloads: tiny random configs made here)."""

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import moekit  # noqa: E402
import moekit.torch as mt  # noqa: E402
from reference import U32  # noqa: E402

D = 16


def families():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    return {
        "mixtral": (transformers.MixtralConfig(hidden_size=D, intermediate_size=24, num_local_experts=4,
                                               num_experts_per_tok=2, num_hidden_layers=2), MixtralSparseMoeBlock),
        "qwen2_moe": (transformers.Qwen2MoeConfig(hidden_size=D, intermediate_size=40, moe_intermediate_size=12,
                                                  shared_expert_intermediate_size=20, num_experts=6,
                                                  num_experts_per_tok=2, num_hidden_layers=4, decoder_sparse_step=2,
                                                  mlp_only_layers=[3]), Qwen2MoeSparseMoeBlock),
        "qwen3_moe": (transformers.Qwen3MoeConfig(hidden_size=D, intermediate_size=40, moe_intermediate_size=12,
                                                  num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                                  num_hidden_layers=2), Qwen3MoeSparseMoeBlock),
        "olmoe": (transformers.OlmoeConfig(hidden_size=D, intermediate_size=12, num_experts=8, num_experts_per_tok=2,
                                           num_hidden_layers=2), OlmoeSparseMoeBlock),
        "deepseek_v3": (transformers.DeepseekV3Config(hidden_size=D, intermediate_size=40, moe_intermediate_size=8,
                                                      n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                                                      topk_group=2, n_shared_experts=2, first_k_dense_replace=1,
                                                      num_hidden_layers=3, routed_scaling_factor=2.5),
                        DeepseekV3MoE),
    }


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_block_from_config_reproduces_the_transformers_block(name):
    hf_cfg, block_cls = families()[name]
    block = block_cls(hf_cfg).double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        for n, b in block.named_buffers():
            if "e_score_correction_bias" in n:
                b.copy_(torch.randn_like(b) * 0.1)
    moe = mt.MoE.from_hf_config(hf_cfg).eval()
    result = moe.load_state_dict({k: v.float() for k, v in block.state_dict().items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 20, D)
    y = moe(x).double()
    y_ref = block(x.double())
    y_ref = y_ref[0] if isinstance(y_ref, tuple) else y_ref
    # Normwise: each output is two chained dot products (d_model, then d_ff) plus the routing's
    # few operations; fp32 rounding of n = d + f + 20 steps, with random signs (√n) — the
    # forward_error_bound of reference.py written normwise for blocks with shared experts.
    f = moe.d_ff + (moe.config.get("shared_d_ff") or 0)
    n = D + f + 20
    assert ((y - y_ref).norm() / y_ref.norm()).item() <= n * U32 * math.sqrt(n)


def test_layers_report_dense_ones_and_why():
    fam = moekit.model_family(families()["qwen2_moe"][0])
    assert [l["is_moe"] for l in fam["layers"]] == [False, True, False, False]
    assert "decoder_sparse_step" in fam["layers"][0]["reason"] and fam["layers"][3]["reason"] == "in mlp_only_layers"
    assert fam["layers"][0]["dense_d_ff"] == 40
    ds = moekit.model_family(families()["deepseek_v3"][0])
    assert [l["is_moe"] for l in ds["layers"]] == [False, True, True]
    assert ds["layers"][0]["reason"] == "first_k_dense_replace = 1"
    assert ds["layer_config"]["shared_d_ff"] == 16 and ds["layer_config"]["d_ff"] == 8


def test_contradictions_and_unknown_families_are_errors(tmp_path):
    cfg = families()["mixtral"][0].to_dict()
    cfg["num_experts"] = 7  # disagrees with num_local_experts = 4
    with pytest.raises(ValueError, match="config.json num_experts: expected the value of num_local_experts"):
        moekit.model_family(cfg)
    with pytest.raises(ValueError, match="model_type: expected one of mixtral"):
        moekit.model_family({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1})
    (tmp_path / "config.json").write_text(families()["olmoe"][0].to_json_string())
    assert moekit.model_family(tmp_path)["model_type"] == "olmoe"  # a checkpoint directory
