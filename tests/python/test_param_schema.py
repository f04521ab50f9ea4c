"""The parameter schema (include/moekit/params.h) as the extension exposes it, against the arrays
the extension takes and gives and the tensors moekit.torch.MoE holds."""

import json

import pytest

from moekit import _moekit

SCHEMA = _moekit.parameter_schema()
NAMES = [row["name"] for row in SCHEMA]

D, F_, E = 8, 6, 3
BASE = {"hidden_size": D, "intermediate_size": F_, "num_local_experts": E, "num_experts_per_tok": 2}
# Each row of the schema on and off, gated and ungated, both shared-MLP spellings.
CONFIGS = {
    "mixtral": {},
    "qwen2_moe": {"num_shared_experts": 1, "shared_expert_intermediate_size": 10, "shared_expert_gate": True},
    "deepseek_v3": {"num_shared_experts": 2, "selection_bias": True},
    "router": {"router_bias": True, "noisy_gating": True},
    "ungated_biased": {"hidden_act": "gelu", "expert_bias": True, "num_shared_experts": 1},
}


def shapes_of(cfg):
    return {name: tuple(shape) for name, shape in _moekit.parameter_shapes(json.dumps(cfg))}


def test_rows_are_the_layers_parameters_in_order():
    assert NAMES == ["router_weight", "router_bias", "router_noise_weight", "gate_up", "down", "gate_up_bias",
                     "down_bias", "shared_gate_up", "shared_down", "shared_gate_up_bias", "shared_down_bias",
                     "shared_gate", "selection_bias"]
    halves = [row["up_name"] for row in SCHEMA if row["up_name"]]
    assert halves == ["up", "shared_up"]
    assert len(set(NAMES + halves)) == len(NAMES) + len(halves)
    assert [row["name"] for row in SCHEMA if not row["has_gradient"]] == ["selection_bias"]
    for row in SCHEMA:
        assert row["hf_names"], row["name"]
        assert row["expert_weight"] == (row["storage"] == "weight") == (not row["fp32_only"])
        assert len(row["shape"]) == {"fp32_matrix": 2, "weight": 3}.get(row["storage"], len(row["shape"]))


def test_the_extension_takes_every_schema_name_and_no_other():
    cfg = json.dumps(dict(BASE, **CONFIGS["qwen2_moe"]))
    # Every name (and up half) is known: the layer goes on to ask for the missing router weight.
    with pytest.raises(ValueError, match=r"params.router_weight: expected a \[3, 8\] matrix, got none"):
        _moekit.Layer(cfg, {name: None for name in NAMES + ["up", "shared_up"]})
    with pytest.raises(ValueError, match="params: unknown parameter 'gate_up_proj'"):
        _moekit.Layer(cfg, {"gate_up_proj": None})


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_stored_parameters_have_the_schema_shapes(family):
    cfg = dict(BASE, **CONFIGS[family])
    layer = _moekit.Layer(json.dumps(cfg), 3)
    want = shapes_of(cfg)
    stored = layer.stored_parameters()
    assert list(stored) == list(want)
    assert {n: tuple(a.shape) for n, a in stored.items()} == want
    # The layer takes them back under the same names and shapes.
    again = _moekit.Layer(json.dumps(cfg), stored)
    assert {n: a.tolist() for n, a in again.stored_parameters().items()} == {n: a.tolist() for n, a in stored.items()}


torch = pytest.importorskip("torch")
import moekit.torch as mt  # noqa: E402


def expected_names(module, cfg):
    """The ops' names worked out from the schema: the rows the config uses, one per expert in
    the Switch layout, an HF shared MLP's up_proj under the row's up name when gated."""
    names = []
    for name in shapes_of(cfg):
        if module._layout == "switch" and name in ("gate_up", "down"):
            names += [f"{name}.{e}" for e in range(E)]
            continue
        names.append(name)
        if name == "shared_gate_up" and cfg.get("hidden_act", "silu") == "silu":
            names.append("shared_up")
    return names


def module_cases():
    for family, keys in sorted(CONFIGS.items()):
        yield family, dict(BASE, **keys), "hf"
    yield "gpt_oss", dict(BASE, router_bias=True, expert_bias=True), "gpt_oss"
    yield "switch", dict(BASE, hidden_act="relu"), "switch"


@pytest.mark.parametrize("family,cfg,layout", list(module_cases()), ids=[c[0] for c in module_cases()])
def test_the_torch_module_exposes_the_schema(family, cfg, layout):
    moe = mt.MoE(cfg, _layout=layout)
    assert moe._names == expected_names(moe, cfg)
    shapes = shapes_of(cfg)
    by_name = moe._by_name()
    # Every tensor of the module is one the schema names, under one of the row's HF names.
    qualified = {id(t): n for n, t in list(moe.named_parameters()) + list(moe.named_buffers())}
    assert {id(by_name[n]) for n in moe._names} == set(qualified)
    hf = {row["name"]: row for row in SCHEMA}
    for name in moe._names:
        base = name.split(".")[0]
        row = hf[{"up": "gate_up", "shared_up": "shared_gate_up"}.get(base, base)]
        spelled = set()
        for whole, up in row["hf_names"]:
            for n in (whole, up):
                if n is not None:
                    spelled |= {n.replace("{e}", str(e)) for e in range(E)}
        assert qualified[id(by_name[name])] in spelled, (name, qualified[id(by_name[name])])
        # Shapes as the extension takes them, in the layouts the row lists: halves, one expert of
        # the stack, gpt-oss's transposed experts, a vector as a [1, n] matrix.
        want = shapes[row["name"]]
        if row["up_name"] in moe._names:  # given as gate and up tensors: half the rows each
            want = (want[0] // 2,) + want[1:]
        if "." in name:  # one expert of the stack
            want = want[1:]
        if layout == "gpt_oss" and "transposed" in row["layouts"]:
            want = (want[0], want[2], want[1])
        if "row_matrix" in row["layouts"]:  # HF's [1, d] shared_expert_gate.weight
            want = (1,) + want
        assert tuple(by_name[name].shape) == want, name
