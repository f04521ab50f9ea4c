"""moekit.torch.MoE: HF parity, gradients, custom-op checks, torch.compile, training, errors."""

import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

import moekit.torch as mt  # noqa: E402
from reference import (U16, U32, forward_error_bound, normwise_gradient_tolerance,  # noqa: E402
                       reference_moe)

D, F_, E, K = 16, 24, 4, 2
CFG = {"hidden_size": D, "intermediate_size": F_, "num_local_experts": E, "num_experts_per_tok": K}


def double_params(moe):
    return (moe.gate.weight.detach().double(), moe.experts.gate_up_proj.detach().double(),
            moe.experts.down_proj.detach().double())


def relerr(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_parameters_are_named_and_shaped_as_transformers():
    moe = mt.MoE(CFG)
    shapes = {n: tuple(p.shape) for n, p in moe.named_parameters()}
    assert shapes == {"gate.weight": (E, D), "experts.gate_up_proj": (E, 2 * F_, D),
                      "experts.down_proj": (E, D, F_)}


def test_forward_matches_double_reference_within_derived_bound():
    moe = mt.MoE(CFG)
    x = torch.randn(32, D)
    y = moe(x)
    rw, gu, dn = double_params(moe)
    y_ref, idx, w, aux, z = reference_moe(x.double(), rw, gu, dn, K)
    bound = forward_error_bound(x.double(), rw, gu, dn, idx, w)
    assert (y.double() - y_ref).abs().le(bound).all()
    assert moe.aux_loss.item() == pytest.approx(aux.item(), rel=1e-5)
    assert moe.z_loss.item() == pytest.approx(z.item(), rel=1e-5)


def test_mixtral_state_dict_loads_and_reproduces_the_hf_block():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_cfg = transformers.MixtralConfig(hidden_size=D, intermediate_size=F_, num_local_experts=E,
                                        num_experts_per_tok=K, router_jitter_noise=0.0)
    block = MixtralSparseMoeBlock(hf_cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    moe = mt.MoE(preset="hf-mixtral", hidden_size=D, intermediate_size=F_, num_local_experts=E,
                 num_experts_per_tok=K).eval()
    moe.load_state_dict(block.state_dict(), strict=True)
    x = torch.randn(2, 16, D)
    y = moe(x)
    block64 = MixtralSparseMoeBlock(hf_cfg).eval().double()
    block64.load_state_dict(block.state_dict())
    y_ref = block64(x.double())
    rw, gu, dn = double_params(moe)
    flat = x.reshape(-1, D).double()
    p = torch.softmax(flat @ rw.T, -1)
    w, idx = p.topk(K, -1)
    w = w / w.sum(-1, keepdim=True)
    bound = forward_error_bound(flat, rw, gu, dn, idx, w).reshape(x.shape)
    assert (y.double() - y_ref).abs().le(bound).all()
    with torch.no_grad():
        y_hf32 = block(x)
    # both float32: each within the bound of the exact result
    assert (y - y_hf32).abs().double().le(2 * bound).all()


def test_qwen2_moe_state_dict_with_shared_expert_and_gate():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    hf_cfg = transformers.Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F_, num_experts=E,
                                         num_experts_per_tok=K, shared_expert_intermediate_size=20,
                                         norm_topk_prob=False)
    block = Qwen2MoeSparseMoeBlock(hf_cfg).double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    moe = mt.MoE(preset="hf-qwen2-moe", hidden_size=D, moe_intermediate_size=F_, num_experts=E,
                 num_experts_per_tok=K, num_shared_experts=1, shared_expert_intermediate_size=20,
                 shared_expert_gate=True).eval()
    missing = moe.load_state_dict({k: v.float() for k, v in block.state_dict().items()}, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    x = torch.randn(1, 24, D)
    y = moe(x)
    y_ref = block(x.double())
    # The routed part's bound plus the shared MLP's (the same chain with weight s_t ≤ 1).
    rw, gu, dn = double_params(moe)
    flat = x.reshape(-1, D).double()
    p = torch.softmax(flat @ rw.T, -1)
    w, idx = p.topk(K, -1)
    bound = forward_error_bound(flat, rw, gu, dn, idx, w)
    sh = block.shared_expert
    sgu = torch.cat([sh.gate_proj.weight, sh.up_proj.weight]).detach()[None]
    sb = forward_error_bound(flat, rw[:1], sgu, sh.down_proj.weight.detach()[None],
                             torch.zeros(flat.shape[0], 1, dtype=torch.long), torch.ones(flat.shape[0], 1,
                                                                                        dtype=torch.float64))
    assert (y.double() - y_ref).abs().le((bound + sb).reshape(x.shape)).all()


def test_gradcheck_in_double_for_input_and_every_parameter():
    # The op computes in float32; gradcheck's finite differences run in double on it. With
    # central differences of step eps the numerical derivative carries the forward's rounding
    # error divided by eps: |δ| ≤ γ_n·M/eps with n = d + f + k + 10 roundings along an output
    # and M ≤ 4 the largest |output| term here; truncation is O(eps²) ≪ that. The router is
    # scaled so that no perturbation of size eps can reorder the top-k (checked below).
    d, f, e, k = 6, 5, 3, 2
    moe = mt.MoE(hidden_size=d, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k,
                 router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    x = torch.randn(5, d, dtype=torch.float64)
    rw = (moe.gate.weight.detach().double() * 6)
    gu = moe.experts.gate_up_proj.detach().double()
    dn = moe.experts.down_proj.detach().double()
    eps = 1e-3
    logits = x @ rw.T
    top = logits.sort(dim=-1, descending=True).values
    gaps = (top[:, :-1] - top[:, 1:]).min()
    max_logit_change = eps * (rw.abs().sum(1).max() + x.abs().sum(1).max())
    assert gaps > 4 * max_logit_change, "the test's inputs are too close to a top-k tie"
    handle = moe._core.handle

    def fn(x64, rw64, gu64, dn64):
        params = [rw64.float(), gu64.float(), dn64.float()]
        out, aux, z = mt.moe_forward(x64.float(), params, handle, "fp32", True, True, 0, 1)
        return out.double(), aux.double(), z.double()

    out, _, _ = fn(x, rw, gu, dn)
    M = max(4.0, out.abs().max().item())
    atol = (d + f + k + 10) * U32 * M / eps
    inputs = tuple(t.clone().requires_grad_() for t in (x, rw, gu, dn))
    assert torch.autograd.gradcheck(fn, inputs, eps=eps, atol=atol, rtol=1e-3, nondet_tol=0.0)


def test_opcheck():
    moe = mt.MoE(CFG, router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
    x = torch.randn(12, D, requires_grad=True)
    args = (x, moe._tensors(), moe._core.handle, "fp32", True, True, 0, 1)
    result = torch.library.opcheck(torch.ops.moekit.moe_forward.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_torch_compile_gives_the_eager_result():
    model = nn.Sequential(nn.Linear(D, D), mt.MoE(CFG), nn.Linear(D, D))
    x = torch.randn(3, 10, D)
    y_eager = model(x)
    y_eager.square().mean().backward()
    g_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)  # the MoE ops do not break the graph
    y = compiled(x)
    y.square().mean().backward()
    assert model[1]._core.recomputed == 0  # the compiled backward found its saved forward
    # The MoE op is the same code in both; the Linear layers around it may be fused by the
    # compiler, changing their float32 rounding: the derived normwise bound applies.
    tol = normwise_gradient_tolerance(D, F_, K)
    assert relerr(y, y_eager) <= tol
    for p, g in zip(model.parameters(), g_eager):
        assert relerr(p.grad, g) <= tol


def test_training_twenty_steps_matches_the_reference_step_by_step():
    torch.manual_seed(1)
    moe = mt.MoE(CFG, router_aux_loss_coef=0.02, router_z_loss_coef=0.001)
    head = nn.Linear(D, 3)
    model = nn.ModuleDict({"moe": moe, "head": head})
    ref = {n: p.detach().double().clone().requires_grad_() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.values(), lr=0.1)
    x = torch.randn(64, D)
    target = torch.randint(0, 3, (64,))
    tol = normwise_gradient_tolerance(D, F_, K)
    for step in range(20):
        # moekit at its current parameters against the double reference at the same ones: an
        # optimizer update that did not reach the C++ layer would show here at once.
        now = {n: p.detach().double().clone().requires_grad_() for n, p in model.named_parameters()}
        y_ref, idx, w, aux, z = reference_moe(x.double(), now["moe.gate.weight"], now["moe.experts.gate_up_proj"],
                                              now["moe.experts.down_proj"], K)
        loss_ref = nn.functional.cross_entropy(y_ref @ now["head.weight"].T + now["head.bias"], target) \
            + 0.02 * aux + 0.001 * z
        loss_ref.backward()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(moe(x)), target) + moe.router_loss
        loss.backward()
        assert loss.item() == pytest.approx(loss_ref.item(), rel=tol), step
        for n, p in model.named_parameters():
            assert relerr(p.grad.double(), now[n].grad) <= tol, (step, n)
        opt.step()
        # the independent double trajectory from the same initial weights
        opt_ref.zero_grad()
        y2, _, _, aux2, z2 = reference_moe(x.double(), ref["moe.gate.weight"], ref["moe.experts.gate_up_proj"],
                                           ref["moe.experts.down_proj"], K)
        l2 = nn.functional.cross_entropy(y2 @ ref["head.weight"].T + ref["head.bias"], target) + 0.02 * aux2 \
            + 0.001 * z2
        l2.backward()
        opt_ref.step()
    # After 20 steps the trajectories agree to the per-step tolerance accumulated over the steps.
    for n, p in model.named_parameters():
        assert relerr(p.detach().double(), ref[n].detach()) <= 20 * tol, n
    assert moe._core.recomputed == 0  # every backward found its forward's saved state


def test_borrowed_memory_and_version_counters():
    moe = mt.MoE(CFG)
    x = torch.randn(8, D)
    y0 = moe(x)
    with torch.no_grad():
        moe.experts.down_proj.mul_(2.0)  # bumps the version: the next call re-reads
    y1 = moe(x)
    assert relerr(y1, 2 * y0) <= 4 * U32
    # .data shares the memory but not the version counter: without a refresh the layer keeps its
    # packed copy; after one it reads the parameter's own memory (it never copied it).
    moe.experts.down_proj.data.mul_(0.5)
    layer = moe._core.layers["fp32"][0]
    layer.refresh_packed_weights()
    y2 = moe(x)
    assert relerr(y2, y0) <= 4 * U32


def test_bf16_module_and_autocast():
    moe32 = mt.MoE(CFG)
    x = torch.randn(16, D)
    y32 = moe32(x)
    moe16 = mt.MoE(CFG, dtype=torch.bfloat16)
    moe16.load_state_dict(moe32.state_dict())
    assert moe16.experts.gate_up_proj.dtype == torch.bfloat16
    y16 = moe16(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    # bf16 weights and GEMM inputs (u = 2^-8), fp32 accumulation: the forward bound with u16 for
    # the roundings of weights, x and h (three of them along a chain) plus the output's rounding.
    rw, gu, dn = double_params(moe32)
    flat = x.double()
    p = torch.softmax(flat @ rw.T, -1)
    w, idx = p.topk(K, -1)
    w = w / w.sum(-1, keepdim=True)
    b16 = forward_error_bound(flat, rw, gu, dn, idx, w, u=3 * U16 / (D + 2)) + U16 * y32.detach().double().abs()
    y_ref = reference_moe(flat, rw, gu, dn, K)[0]
    assert ((y16.double() - y_ref).abs() <= b16 + forward_error_bound(flat, rw, gu, dn, idx, w)).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = moe32(x)
    assert ya.dtype == torch.bfloat16
    assert ((ya.double() - y_ref).abs() <= b16 + forward_error_bound(flat, rw, gu, dn, idx, w)).all()
    ya.float().sum().backward()
    assert moe32.experts.gate_up_proj.grad.dtype == torch.float32


def test_train_eval_modes_and_statistics():
    moe = mt.MoE(CFG, capacity_factor=0.5, eval_capacity_factor=4.0)
    x = torch.randn(40, D)
    moe.train()
    moe(x)
    assert moe.routing_stats["num_dropped"] > 0
    moe.eval()
    moe(x)
    assert moe.routing_stats["num_dropped"] == 0
    assert moe.routing_stats["tokens_per_expert"].sum() == 40 * K


def test_threads_follow_torch_and_results_do_not_depend_on_them():
    moe = mt.MoE(CFG)
    x = torch.randn(50, D, requires_grad=True)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = moe(x)
        assert moe._core.layers["fp32"][0].num_threads == 1
        torch.set_num_threads(2)
        y2 = moe(x)
        assert moe._core.layers["fp32"][0].num_threads == 2
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2)
    moe.num_threads = 1
    moe(x)
    assert moe._core.layers["fp32"][0].num_threads == 1


def test_bad_inputs():
    moe = mt.MoE(CFG)
    with pytest.raises(TypeError, match="hidden_states: expected dtype torch.float32 .* got torch.float64"):
        moe(torch.randn(4, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected a CPU tensor .* got device meta"):
        moe(torch.empty(4, D, device="meta"))
    with pytest.raises(ValueError, match="expected a contiguous tensor"):
        moe(torch.randn(D, 4).T)
    with pytest.raises(ValueError, match=f"expected shape \\[num_tokens, {D}\\]"):
        moe(torch.randn(4, D + 1))
    with pytest.raises(ValueError, match="unknown key"):
        mt.MoE(CFG, not_a_key=3)
    with pytest.raises(TypeError, match="dtype: expected torch.float32 or torch.bfloat16"):
        mt.MoE(CFG, dtype=torch.float16)
    bad = torch.randn(4, D)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        moe(bad)


def test_readme_example_runs():
    import os
    import re

    readme = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
    text = open(readme, encoding="utf-8").read()
    section = text[text.index("## Python and PyTorch"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    moe = scope["moe"]
    assert moe.routing_stats["tokens_per_expert"].sum() == 4 * 64 * 2
    assert moe._core.recomputed == 0


def test_numpy_api_borrows_torch_tensors_fp32_and_bf16():
    import moekit

    owner = mt.MoE(CFG)
    for dtype, cfg_dtype in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        gu = owner.experts.gate_up_proj.detach().to(dtype).clone()
        dn = owner.experts.down_proj.detach().to(dtype).clone()
        rw = owner.gate.weight.detach().clone()
        layer = moekit.MoeLayer(dict(CFG, dtype=cfg_dtype), params={"router_weight": rw, "gate_up": gu, "down": dn})
        x = torch.randn(10, D)
        y0, _ = layer.forward(x)
        dn.mul_(0.0)  # in place in the tensor's own memory
        layer.refresh_packed_weights()
        y1, _ = layer.forward(x)
        assert y0.any() and not y1.any(), cfg_dtype  # the layer read the tensor, not a copy
    with pytest.raises(TypeError, match="expected dtype float32, got float64"):
        moekit.MoeLayer(CFG, params={"router_weight": rw.double(), "gate_up": gu.float(), "down": dn.float()})


def test_gradients_through_an_eval_forward_follow_the_eval_routing():
    # In eval() the capacity factor is eval_capacity_factor: the backward must differentiate that
    # forward (saved in eval too), not rerun it with the training routing.
    torch.manual_seed(3)
    evaluated = mt.MoE(CFG, capacity_factor=0.5, eval_capacity_factor=4.0).eval()
    trained = mt.MoE(CFG, capacity_factor=4.0).train()
    trained.load_state_dict(evaluated.state_dict())
    x = torch.randn(2, 16, CFG["hidden_size"])
    grads = []
    for moe in (evaluated, trained):
        xi = x.clone().requires_grad_(True)
        moe(xi).square().sum().backward()
        grads.append((xi.grad, moe.experts.down_proj.grad))
        assert moe._core.recomputed == 0
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
