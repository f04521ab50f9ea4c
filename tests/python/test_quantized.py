"""Quantized experts from Python: layers configured with dtype int8 / int4 / mxfp4, a checkpoint
layer quantized as it loads, and layer files (MoeLayer.save, moekit.load_layer) that load again
without quantizing. The numbers themselves are checked in C++ (tests/test_quant_layer.cpp,
tests/test_quant_formats.cpp); these tests check that Python reaches the same code and that what
it hands back is the same, bit for bit.
"""

import os

import numpy as np
import pytest

import moekit

MODELS = os.path.join(os.path.dirname(__file__), "..", "fixtures", "models")
FORMATS = ["int8", "int4", "mxfp4"]
safetensors_numpy = pytest.importorskip("safetensors.numpy")


def config(dtype):
    return {"num_experts": 8, "num_experts_per_tok": 2, "d_model": 64, "d_ff": 96, "dtype": dtype,
            "expert_bias": True}


@pytest.mark.parametrize("dtype", FORMATS)
def test_a_quantized_layer_saves_and_loads_back_bitwise(tmp_path, dtype):
    layer = moekit.MoeLayer(config(dtype), seed=3)
    x = np.random.default_rng(0).standard_normal((40, 64), dtype=np.float32)
    y, routing = layer.forward(x)
    assert y.dtype == np.float32 and y.shape == x.shape and np.isfinite(y).all()
    # The quantized path ran (the output moved), and the 8-bit format moved it least.
    y32, _ = moekit.MoeLayer(config("fp32"), seed=3).forward(x)
    errors = {f: np.linalg.norm(moekit.MoeLayer(config(f), seed=3).forward(x)[0] - y32) for f in FORMATS}
    assert errors[dtype] > 0
    assert errors["int8"] < min(errors["int4"], errors["mxfp4"])

    path = tmp_path / f"layer_{dtype}.safetensors"
    layer.save(path)
    again = moekit.load_layer(path)
    assert again.config["dtype"] == dtype and again._core.dtype == dtype
    y2, _ = again.forward(x)
    assert np.array_equal(y, y2)
    # The codes are tensors of the file, read in place (nothing was quantized again).
    stored = safetensors_numpy.load_file(str(path))
    assert stored["gate_up.codes"].dtype == np.uint8
    assert stored["gate_up.codes"].shape == (8, 192, 64 if dtype == "int8" else 32)


def test_quantized_layers_run_inference_only():
    layer = moekit.MoeLayer(config("int4"), seed=1)
    layer.train()
    x = np.ones((4, 64), dtype=np.float32)
    with pytest.raises(ValueError, match="inference only"):
        layer.forward(x)


def test_widths_the_groups_do_not_divide_are_rejected():
    cfg = config("int4")
    cfg["d_ff"] = 40
    with pytest.raises(ValueError, match="d_ff: expected a multiple of 32 for dtype int4, got 40"):
        moekit.MoeLayer(cfg, seed=1)


def test_a_checkpoint_layer_quantized_at_load_and_its_file(tmp_path):
    model = os.path.join(MODELS, "gpt_oss_mxfp4")
    io = safetensors_numpy.load_file(os.path.join(model, "moe_io.safetensors"))
    x = io["0.hidden_states"]
    layer = moekit.load_layer(model, 0, dtype="mxfp4")
    assert layer._core.dtype == "mxfp4"  # what the C++ layer computes in, not the Python-side config
    y, _ = layer.forward(x)
    ref = io["0.output"]
    # mxfp4 computes on the checkpoint's own MXFP4 values (only the activations are rounded);
    # int4 rounds those values once more, to its own grid: further from transformers' block.
    y4, _ = moekit.load_layer(model, 0, dtype="int4").forward(x)
    assert 0 < np.linalg.norm(y - ref) < np.linalg.norm(y4 - ref)
    path = tmp_path / "gpt_oss_layer0.safetensors"
    layer.save(path)
    again = moekit.load_layer(path)
    assert again.model_type == "gpt_oss" and again.layer_name == "0"
    assert np.array_equal(again.forward(x)[0], y)
    with pytest.raises(ValueError, match="layer: not given with a layer file"):
        moekit.load_layer(path, 0)
    with pytest.raises(ValueError, match="dtype"):
        moekit.load_layer(model, 0, dtype="int3")
