"""The NumPy API: route, presets, MoeLayer; zero copies; errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

import moekit


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def test_import_without_torch():
    # A meta-path finder that refuses torch: `import moekit` must not need it.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import moekit, numpy as np\n"
        "r = moekit.route(np.zeros((2, 4), np.float32), {'num_experts': 4, 'num_experts_per_tok': 1})\n"
        "print(r['experts'].shape)\n"
        "try:\n"
        "    import moekit.torch\n"
        "except ImportError as e:\n"
        "    print('no torch:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "(2, 1)" in out
    assert "no torch" in out


def test_presets_and_preset():
    names = moekit.presets()
    assert "hf-mixtral" in names and "hf-deepseek-v3" in names and len(names) >= 17
    p = moekit.preset("hf-deepseek-v3")
    assert p["scoring_func"] == "sigmoid" and p["n_group"] == 8 and p["topk_group"] == 4
    with pytest.raises(ValueError, match="preset: expected one of .*got \"mixtral\""):
        moekit.preset("mixtral")


def test_route_mixtral_matches_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 8)).astype(np.float32)
    r = moekit.route(logits, {"preset": "hf-mixtral"})
    # Mixtral: softmax over all experts, top-2, renormalised (an independent NumPy oracle).
    p = softmax(logits.astype(np.float64))
    idx = np.argsort(-p, axis=1, kind="stable")[:, :2]
    w = np.take_along_axis(p, idx, axis=1)
    w /= w.sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(r["experts"], idx)
    np.testing.assert_allclose(r["weights"], w, rtol=1e-6, atol=1e-7)  # float32 softmax: a few ulp
    assert r["kept"].dtype == np.bool_ and r["kept"].all()
    assert r["dropped"].shape == (0, 2)
    counts = np.bincount(idx.ravel(), minlength=8)
    np.testing.assert_array_equal(r["stats"]["tokens_per_expert"], counts)
    # Switch-style balancing loss of HF Mixtral: E · Σ f_e P_e with f over both choices.
    P = p.mean(axis=0)
    # HF load_balancing_loss_func: E · Σ_k Σ_e (count_ke / T) · P_e = E · Σ_e (count_e / T) · P_e
    assert r["losses"]["load_balancing"] == pytest.approx(8 * (counts / 64 * P).sum(), rel=1e-6)
    assert r["plan"]["expert_offsets"][-1] == 128


def test_route_capacity_drops_and_csr():
    logits = np.zeros((8, 2), np.float32)
    logits[:, 0] = 1.0  # every token prefers expert 0
    r = moekit.route(logits, {"num_experts": 2, "num_experts_per_tok": 1, "capacity_factor": 1.0, "training": True})
    # capacity = ceil(1.0 · 8 · 1 / 2) = 4: tokens 4..7 dropped from expert 0 (position order)
    assert r["plan"]["capacity"] == 4
    np.testing.assert_array_equal(r["dropped"], [[4, 0], [5, 0], [6, 0], [7, 0]])
    np.testing.assert_array_equal(r["kept"][:, 0], [True] * 4 + [False] * 4)
    assert r["stats"]["num_dropped"] == 4
    assert r["stats"]["dropped_fraction"] == 0.5


def test_route_from_hidden_states_and_config_file(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 6)).astype(np.float32)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    path = tmp_path / "routing.json"
    path.write_text(json.dumps({"num_experts": 4, "num_experts_per_tok": 2}))
    r = moekit.route(x, path, router_weight=w)
    np.testing.assert_allclose(r["logits"], x @ w.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="router_weight: expected shape \\[\\*, 6\\], got \\[4, 5\\]"):
        moekit.route(x, path, router_weight=w[:, :5])


def test_route_errors_name_the_argument():
    x = np.zeros((4, 8), np.float32)
    with pytest.raises(TypeError, match="logits: expected dtype float32, got float64"):
        moekit.route(x.astype(np.float64), {"num_experts": 8})
    with pytest.raises(ValueError, match="logits: expected a C-contiguous array"):
        moekit.route(np.zeros((4, 16), np.float32)[:, ::2], {"num_experts": 8})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        moekit.route(x, {"num_experts": 8, "num_experts_per_tok": 9})
    with pytest.raises(ValueError, match="unknown key"):
        moekit.route(x, {"num_experts": 8, "not_a_key": 1})
    with pytest.raises(ValueError, match="token_mask: expected shape \\[4\\], got \\[3\\]"):
        moekit.route(x, {"num_experts": 8}, token_mask=np.ones(3, np.bool_))
    bad = x.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        moekit.route(bad, {"num_experts": 8})
    with pytest.raises(TypeError, match="config: expected a dict"):
        moekit.route(x, 3)


LAYER = {"hidden_size": 16, "intermediate_size": 24, "num_local_experts": 4, "num_experts_per_tok": 2}


def ptr(a):
    return a.__array_interface__["data"][0]


def test_owned_parameters_are_views_and_writes_reach_the_layer():
    layer = moekit.MoeLayer(LAYER, seed=3)
    x = np.random.default_rng(2).standard_normal((12, 16)).astype(np.float32)
    y0, _ = layer.forward(x)
    p = layer.parameters()
    assert ptr(p["down"]) == ptr(layer.parameters()["down"])  # the same memory every time
    p["down"] *= 2.0  # in place, through the view
    layer.refresh_packed_weights()
    y1, _ = layer.forward(x)
    # The output is linear in W_down: doubling it doubles the output (up to fp32 rounding).
    np.testing.assert_allclose(y1, 2 * y0, rtol=1e-6, atol=1e-6)


def test_borrowed_parameters_are_read_in_place():
    owner = moekit.MoeLayer(LAYER, seed=5)
    params = {k: v.reshape(s) for k, v, s in [
        ("router_weight", owner.parameters()["router_weight"], (4, 16)),
        ("gate_up", owner.parameters()["gate_up"], (4, 48, 16)),
        ("down", owner.parameters()["down"], (4, 16, 24))]}
    copies = {k: v.copy() for k, v in params.items()}
    borrowed = moekit.MoeLayer(LAYER, params=copies)
    x = np.random.default_rng(3).standard_normal((9, 16)).astype(np.float32)
    y_owner, _ = owner.forward(x)
    y_borrowed, _ = borrowed.forward(x)
    np.testing.assert_array_equal(y_owner, y_borrowed)  # same values, same kernels: bitwise
    copies["down"][:] = 0.0  # in place: the borrowing layer reads this memory
    borrowed.refresh_packed_weights()
    y_zero, _ = borrowed.forward(x)
    assert not y_zero.any()


def test_output_arrays_own_their_memory():
    layer = moekit.MoeLayer(LAYER, seed=1)
    x = np.ones((3, 16), np.float32)
    y, routing = layer.forward(x)
    assert y.dtype == np.float32 and y.shape == (3, 16) and y.flags.c_contiguous
    y2, _ = layer.forward(x)
    assert ptr(y) != ptr(y2)  # each call hands over a new buffer; earlier results stay valid
    np.testing.assert_array_equal(y, y2)


def test_backward_into_buffers_matches_accumulated_grads():
    layer = moekit.MoeLayer(dict(LAYER, router_aux_loss_coef=0.01), seed=2).train()
    x = np.random.default_rng(4).standard_normal((20, 16)).astype(np.float32)
    dy = np.random.default_rng(5).standard_normal((20, 16)).astype(np.float32)
    layer.zero_grad()
    layer.forward(x)
    dx1 = layer.backward(dy)
    acc = {k: v.copy() for k, v in layer.grads().items()}
    buffers = {k: np.full_like(v, 7.0) for k, v in acc.items()}  # garbage: they are assigned
    pointers = {k: ptr(v) for k, v in buffers.items()}
    layer.forward(x)
    dx2 = layer.backward(dy, grads=buffers)
    np.testing.assert_array_equal(dx1, dx2)
    for k in acc:
        assert ptr(buffers[k]) == pointers[k]
        np.testing.assert_array_equal(buffers[k], acc[k])
    with pytest.raises(ValueError, match="backward: expected a preceding training forward"):
        layer.backward(dy)


def test_layer_errors():
    with pytest.raises(ValueError, match="d_ff"):
        moekit.MoeLayer({"hidden_size": 8, "num_local_experts": 2})
    layer = moekit.MoeLayer(LAYER)
    with pytest.raises(ValueError, match="hidden_states: expected shape \\[\\*, 16\\], got \\[2, 15\\]"):
        layer.forward(np.zeros((2, 15), np.float32))
    with pytest.raises(TypeError, match="hidden_states: expected dtype float32, got float16"):
        layer.forward(np.zeros((2, 16), np.float16))
    with pytest.raises(ValueError, match="C-contiguous"):
        layer.forward(np.asfortranarray(np.zeros((2, 16), np.float32)))
    with pytest.raises(ValueError, match="unknown parameter 'gate_proj'"):
        moekit.MoeLayer(LAYER, params={"gate_proj": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="params\\['down'\\]: expected shape \\[4, 16, 24\\], got \\[4, 24, 16\\]"):
        moekit.MoeLayer(LAYER, params={"router_weight": np.zeros((4, 16), np.float32),
                                       "gate_up": np.zeros((4, 48, 16), np.float32),
                                       "down": np.zeros((4, 24, 16), np.float32)})


def test_three_dimensional_input_is_per_sequence():
    layer = moekit.MoeLayer(dict(LAYER, capacity_factor=1.0, capacity_scope="sequence", training=True), seed=0)
    x = np.random.default_rng(6).standard_normal((2, 8, 16)).astype(np.float32)
    y, routing = layer.forward(x)
    assert y.shape == (2, 8, 16)
    # capacity per sequence of 8 tokens: ceil(1.0 · 8 · 2 / 4) = 4
    assert routing["plan"]["capacity"] == 4
