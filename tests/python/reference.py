"""A pure-PyTorch MoE block (the oracle of the torch tests) and the error bounds they use.

The reference follows Hugging Face transformers' Mixtral / Qwen2-MoE blocks written out by hand
(softmax in the parameters' dtype, top-k, optional renormalisation, a loop over experts), and runs
in float64 so that it stands for the exact result.
"""

import math

import torch
import torch.nn.functional as F

U32 = 2.0 ** -24  # unit roundoff of float32
U16 = 2.0 ** -8   # unit roundoff of bfloat16


def reference_moe(x, router_w, gate_up, down, top_k, norm_topk_prob=True, shared=None, aux_coef=0.0, z_coef=0.0):
    """x [T, d]; router_w [E, d]; gate_up [E, 2f, d]; down [E, d, f]. Returns (y, idx, w, aux, z, h_terms).

    shared: (gate_proj [sf, d], up_proj [sf, d], down_proj [d, sf], gate [1, d]) or None.
    aux is the HF balancing loss E · Σ_e (count_e / T) · P_e; z = mean logsumexp².
    """
    num_experts = router_w.shape[0]
    logits = x @ router_w.T
    p = torch.softmax(logits, dim=-1)
    w, idx = torch.topk(p, top_k, dim=-1)
    if norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    y = torch.zeros_like(x)
    for e in range(num_experts):
        tok, slot = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        g, u = F.linear(x[tok], gate_up[e]).chunk(2, dim=-1)
        y = y.index_add(0, tok, F.linear(F.silu(g) * u, down[e]) * w[tok, slot, None])
    if shared is not None:
        sg, su, sd, gate = shared
        y = y + torch.sigmoid(x @ gate.T) * F.linear(F.silu(x @ sg.T) * (x @ su.T), sd)
    counts = F.one_hot(idx, num_experts).sum(dim=(0, 1)).to(x.dtype)
    aux = num_experts * (counts / x.shape[0] * p.mean(dim=0)).sum()
    z = torch.logsumexp(logits, dim=-1).square().mean()
    return y, idx, w, aux, z


def forward_error_bound(x, router_w, gate_up, down, idx, w, u=U32):
    """An elementwise first-order bound on |y_computed − y| for a float computation with unit
    roundoff u of the routed part of reference_moe (in float64 on the exact values):

      GEMM 1, a d-term dot product:   |δg|, |δu| ≤ γ_{d+2} · (|W_gu| · |x|)
      SwiGLU h = silu(g)·u:           |δh| ≤ 1.1·|u|·|δg| + |silu(g)|·|δu| + 4u·|h|  (|silu'| ≤ 1.1)
      GEMM 2, an f-term dot product:  |δo| ≤ γ_{f+2} · |W_down|·|h| + |W_down|·|δh|
      combine, k terms:               |δy| ≤ Σ_k |w_k|·|δo_k| + (k + E + 8)·u·Σ_k |w_k|·|o_k|
    where γ_n = n·u and the last term covers the k-term sum and the softmax-renormalised weights
    (an E-term normaliser and a few elementwise operations per weight).
    """
    T, d = x.shape
    E, f2, _ = gate_up.shape
    f = f2 // 2
    bound = torch.zeros_like(x)
    for t in range(T):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            pre = gate_up[e] @ x[t]
            mag = gate_up[e].abs() @ x[t].abs()
            g, uu = pre[:f], pre[f:]
            dg, du = (d + 2) * u * mag[:f], (d + 2) * u * mag[f:]
            s = F.silu(g)
            h = s * uu
            dh = 1.1 * uu.abs() * dg + s.abs() * du + 4 * u * h.abs()
            o = down[e] @ h
            do = (f + 2) * u * (down[e].abs() @ h.abs()) + down[e].abs() @ dh
            bound[t] += w[t, k].abs() * do + (idx.shape[1] + E + 8) * u * (w[t, k] * o).abs()
    return bound


def normwise_gradient_tolerance(d_model, d_ff, top_k, u=U32):
    """Relative normwise tolerance ‖g − g_ref‖ / ‖g_ref‖ for gradients computed with unit roundoff u.

    Every gradient element comes out of two GEMMs in a row (the backward of GEMM 2 and of
    GEMM 1) plus elementwise work: a chain of at most n = 2·(d_model + d_ff) + top_k + 20
    roundings, so |δg| ≤ γ_n·(|A|·|B|) with γ_n = n·u. For random-sign data |A|·|B| exceeds
    |A·B| by about √n (the sum of n signed terms against the sum of their magnitudes), so
    ‖δg‖/‖g‖ ≤ γ_n·√n per GEMM, twice for the two."""
    n = 2 * (d_model + d_ff) + top_k + 20
    return 2 * n * u * math.sqrt(n)
