"""moekit: Mixture-of-Experts routing and layers, forward and backward, on fast CPU kernels.

``import moekit`` needs only NumPy. ``import moekit.torch`` adds :class:`moekit.torch.MoE`, a
``torch.nn.Module`` whose forward and backward are moekit's.

Arrays (NumPy arrays, PyTorch CPU tensors) are read where they lie: no function of this package
copies an input behind the caller's back. An argument of the wrong dtype is a ``TypeError``; a
wrong shape, a non-contiguous layout or memory on another device is a ``ValueError`` naming the
argument, the expected and the actual value. Results are NumPy arrays that own their memory
(handed over from the C++ side, not copied).

A configuration is a dict, or the path of a JSON file holding one, with the keys and presets of
the ``moekit`` command (Hugging Face names, other systems' aliases, ``"preset": NAME``); keyword
arguments given next to it override its keys.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Union

import numpy as np

from . import _moekit

__version__ = "0.1.0"
__all__ = ["route", "presets", "preset", "load_config", "model_family", "load_layer", "MoeLayer", "__version__"]

ConfigLike = Union[Mapping[str, Any], str, "os.PathLike[str]", None]


def load_config(config: ConfigLike = None, **keys: Any) -> dict:
    """Return a configuration as a dict.

    Parameters
    ----------
    config : dict, str or os.PathLike, optional
        A dict of configuration keys, or the path of a JSON file holding one.
    **keys
        Keys that override those of ``config``.

    Returns
    -------
    dict
        A new dict (``config`` is not modified). The keys are not validated here; the functions
        that use the configuration validate it and name any bad key.
    """
    if config is None:
        out: dict = {}
    elif isinstance(config, Mapping):
        out = dict(config)
    elif isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        try:
            with open(path, encoding="utf-8") as f:
                out = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"config: expected a dict or the path of a JSON file, got {path!r}, "
                             "which does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config: {path}: not valid JSON ({e})") from None
        if not isinstance(out, dict):
            raise ValueError(f"config: {path}: expected a JSON object, got {type(out).__name__}")
    else:
        raise TypeError("config: expected a dict or the path of a JSON file, got "
                        f"{type(config).__name__}")
    out.update(keys)
    return out


def _hf_config_text(config) -> str:
    """config.json text from a dict, a transformers config object, a config.json path or a
    checkpoint directory."""
    if hasattr(config, "to_dict") and callable(config.to_dict):
        return json.dumps(config.to_dict())
    if isinstance(config, Mapping):
        return json.dumps(dict(config))
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            raise ValueError(f"config: expected a config.json or a directory holding one, got {path!r}") from None
    raise TypeError("config: expected a dict, a transformers config, or the path of a config.json or its "
                    f"directory, got {type(config).__name__}")


def model_family(config) -> dict:
    """The MoE layer of a Hugging Face model, configured from its config.json.

    Parameters
    ----------
    config : dict, transformers.PretrainedConfig, or path
        The model's configuration (a config.json, its directory, a dict or a config object).
        ``model_type`` one of mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss,
        switch_transformers.

    Returns
    -------
    dict
        ``model_type``; ``layer_config``: the moekit layer keys of its MoE layers (for
        :class:`MoeLayer` or ``moekit.torch.MoE``); ``layers``: per layer ``name`` (what
        :func:`load_layer` takes: ``"3"``; Switch ``"3"`` or ``"decoder.3"``), ``stack``,
        ``index``, ``is_moe``, ``prefix`` (where its MLP's tensors are named), ``reason`` (why a layer is
        dense) and ``dense_d_ff``.
    """
    raw = _moekit.model_family(_hf_config_text(config))
    return {"model_type": raw["model_type"], "layer_config": json.loads(raw["layer_config_json"]),
            "layers": list(raw["layers"])}


def presets() -> list:
    """Names of the routing presets, one per public system (the ``moekit presets`` list)."""
    return list(_moekit.preset_names())


def preset(name: str) -> dict:
    """Every routing key of preset ``name``, as a dict (a ``ValueError`` for an unknown name)."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    return json.loads(_moekit.preset_json(name))


def _per_token(plan: dict) -> dict:
    """[num_tokens, k] views of the per-token arrays when every token has k selections."""
    offsets = plan["token_offsets"]
    counts = np.diff(offsets)
    if counts.size == 0 or not np.all(counts == counts[0]):
        return {"experts": None, "weights": None, "kept": None}
    k = int(counts[0])
    t = counts.size
    return {
        "experts": plan["token_experts"].reshape(t, k),
        "weights": plan["token_weights"].reshape(t, k),
        "kept": plan["token_kept"].view(np.bool_).reshape(t, k),
    }


def _routing_result(raw: dict) -> dict:
    plan = raw["plan"]
    plan["token_kept"] = plan["token_kept"].view(np.bool_)
    out = dict(raw)
    out.update(_per_token(plan))
    out["dropped"] = plan["dropped"]
    return out


def route(scores, config: ConfigLike = None, *, router_weight=None, router_bias=None, noise_weight=None,
          probs: bool = False, token_mask=None, sequence_length: int = 0, labels=None, selection_bias=None,
          training: Optional[bool] = None, num_threads: int = 1, **keys: Any) -> dict:
    """Route tokens: scores (or hidden states) → plan, losses and statistics.

    Parameters
    ----------
    scores : array, float32, [num_tokens, num_experts]
        Router logits; with ``probs=True`` scores used as given (no score function); with
        ``router_weight`` the hidden states [num_tokens, d_model], which the router projects
        first (input jitter and noisy gating then apply as configured).
    config : dict or path, optional
        Routing configuration (``num_experts``, ``num_experts_per_tok``, ``preset``, ...).
    router_weight : array, float32, [num_experts, d_model], optional
        The router Linear's weight (Hugging Face layout); ``router_bias`` [num_experts] and
        ``noise_weight`` [num_experts, d_model] (noisy gating) go with it.
    token_mask : array, bool or uint8, [num_tokens], optional
        1 for real tokens, 0 for padding.
    sequence_length : int
        Tokens form consecutive sequences of this length (capacity and losses per sequence
        where configured); 0: one sequence.
    labels : array, int32, [num_tokens], optional
        A label per token (a domain, say) for the per-label statistics.
    selection_bias : array, float32, [num_experts], optional
        The aux-loss-free selection bias (DeepSeek-V3 ``e_score_correction_bias``).
    training : bool, optional
        Overrides the config's ``training`` (noise, training capacity factor).
    num_threads : int
        Threads used; the result is bitwise the same for any value.
    **keys
        Configuration keys that override ``config``'s.

    Returns
    -------
    dict
        ``experts``, ``weights``, ``kept``: [num_tokens, k] arrays when every token has k
        selections (``None`` otherwise, e.g. expert choice: use ``plan``); ``dropped``:
        [num_dropped, 2] (token, expert) pairs; ``plan``: the full plan in CSR form both ways
        (``token_offsets``, ``token_experts``, ``token_weights``, ``token_kept``,
        ``expert_offsets``, ``expert_tokens``, ``expert_weights``, ``capacity``, Soft MoE's
        ``dispatch`` and ``combine``); ``losses``: dict of floats (``aux_loss``, ``z_loss``,
        ``total``, ...); ``stats``: dict (``tokens_per_expert``, ``mean_entropy``,
        ``dropped_fraction``, ``collapsed``, ...); ``logits`` and ``scores`` [num_tokens, *].
    """
    cfg = load_config(config, **keys)
    if training is not None:
        cfg["training"] = bool(training)
    if router_weight is not None and probs:
        raise ValueError("probs: expected False with router_weight (hidden states are projected to logits), got True")
    kind = "hidden_states" if router_weight is not None else ("probs" if probs else "logits")
    raw = _moekit.route(json.dumps(cfg), scores, kind, router_weight, router_bias, noise_weight, token_mask,
                        int(sequence_length), labels, selection_bias, int(num_threads))
    return _routing_result(raw)


def _flatten_tokens(hidden_states, d_model: int, sequence_length: int):
    """[batch, seq, d_model] → a [batch·seq, d_model] view and the sequence length."""
    shape = tuple(hidden_states.shape)
    if len(shape) == 3:
        if sequence_length not in (0, shape[1]):
            raise ValueError(f"sequence_length: expected 0 or {shape[1]} for hidden_states of shape {list(shape)}, "
                             f"got {sequence_length}")
        return hidden_states.reshape(shape[0] * shape[1], shape[2]), shape[1], shape
    if len(shape) != 2:
        raise ValueError(f"hidden_states: expected shape [num_tokens, {d_model}] or [batch, seq, {d_model}], "
                         f"got {list(shape)}")
    return hidden_states, sequence_length, shape


def load_layer(path: Union[str, "os.PathLike[str]"], layer: Union[int, str, None] = None, *, dtype: str = "fp32",
               num_threads: int = 1) -> "MoeLayer":
    """One MoE layer of a Hugging Face checkpoint directory, or a layer file, ready to run.

    Parameters
    ----------
    path : str or path
        A checkpoint directory: ``config.json`` and ``model.safetensors`` (or the shards of
        ``model.safetensors.index.json``), as ``save_pretrained`` writes them or the Hub serves
        them. ``model_type`` one of :func:`model_family`'s. Or a layer file written by
        :meth:`MoeLayer.save` (or ``moekit forward --save-layer``): then ``layer`` and ``dtype``
        are not given, the file holds both.
    layer : int or str
        The decoder layer index; for Switch Transformers ``N`` / ``"encoder.N"`` or
        ``"decoder.N"``. A dense layer is a ``ValueError`` saying why it is dense.
    dtype : ``"fp32"``, ``"bf16"``, ``"int8"``, ``"int4"`` or ``"mxfp4"``
        The precision the experts compute in (not the stored one). The quantized formats run
        inference only; their weights are quantized as the layer loads (a checkpoint's MXFP4
        experts come back with their own codes). Save the layer to skip that next time.

    Returns
    -------
    MoeLayer
        In eval mode, borrowing the memory-mapped tensors where their dtype allows (F32, BF16,
        and a layer file's quantized codes), with F16, FP8 (block scales) and MXFP4 weights
        converted once at load; :meth:`MoeLayer.sources` says what was done per parameter.
        Give 3-D hidden states [batch, seq, d_model] for families whose capacity or losses are
        per sequence (Switch).
    """
    m = MoeLayer.__new__(MoeLayer)
    m._state = None
    m.last_routing = None
    if os.path.isfile(os.fspath(path)):
        if layer is not None:
            raise ValueError(f"layer: not given with a layer file (it holds one layer), got {layer!r}")
        if dtype != "fp32":
            raise ValueError(f"dtype: not given with a layer file (its dtype is saved), got {dtype!r}")
        core, config_json, meta = _moekit.load_layer_file(os.fspath(path), int(num_threads))
        m._config = json.loads(config_json)
        m._core = core
        m.model_type = meta.get("model_type", "")
        m.layer_name = meta.get("layer", "")
        return m
    if layer is None:
        raise ValueError("layer: expected a layer index with a checkpoint directory, got None")
    core, info = _moekit.load_pretrained(os.fspath(path), str(layer), dtype, int(num_threads))
    m._config = json.loads(info["layer_config_json"])
    m._config["dtype"] = dtype
    m._core = core
    m.model_type = info["model_type"]
    m.layer_name = info["layer"]
    return m


class MoeLayer:
    """A moekit MoE layer: router, routed experts, optional shared experts; forward and backward.

    Parameters
    ----------
    config : dict or path
        Layer keys (``d_model`` / ``hidden_size``, ``d_ff`` / ``intermediate_size``,
        ``activation`` / ``hidden_act``, ``router_bias``, ``expert_bias``,
        ``num_shared_experts``, ``shared_expert_gate``, ``dtype`` fp32 | bf16 | int8 | int4 | mxfp4
        (the last three: quantized experts, inference only), ``num_threads``)
        and any routing key, in one dict (see the C++ ``moe_layer_config_from_json``).
    seed : int
        Owned parameters are initialised from it (PyTorch nn.Linear's rule).
    params : dict of arrays, optional
        Borrow these arrays instead of owning parameters (no copy; they must stay alive and
        unchanged, or call :meth:`refresh_packed_weights` after changing them). Names:
        ``router_weight`` [router_rows, d_model], ``router_bias``, ``router_noise_weight``,
        ``gate_up`` [num_experts, gate_up_rows, d_model] (or ``gate_up`` and ``up`` as
        [num_experts, d_ff, d_model] halves), ``down`` [num_experts, d_model, d_ff],
        ``gate_up_bias`` [num_experts, gate_up_rows], ``down_bias`` [num_experts, d_model],
        ``shared_gate_up`` [rows, d_model] (or with ``shared_up``), ``shared_down``,
        ``shared_gate_up_bias``, ``shared_down_bias``, ``shared_gate`` [d_model] or [1, d_model],
        ``selection_bias`` [num_experts]. Expert weights may be float32 or bfloat16; the rest
        float32.
    **keys
        Configuration keys that override ``config``'s.
    """

    def __init__(self, config: ConfigLike = None, *, seed: int = 0, params: Optional[Mapping[str, Any]] = None,
                 **keys: Any):
        self._config = load_config(config, **keys)
        text = json.dumps(self._config)
        if params is not None:
            self._core = _moekit.Layer(text, dict(params))
        else:
            self._core = _moekit.Layer(text, int(seed))
        self._state = None
        self.last_routing: Optional[dict] = None

    @property
    def config(self) -> dict:
        """The configuration the layer was built from (a copy)."""
        return dict(self._config)

    @property
    def training(self) -> bool:
        return self._core.training

    def train(self, mode: bool = True) -> "MoeLayer":
        """Training mode: noise, the training capacity factor, and saving for :meth:`backward`."""
        self._core.set_training(bool(mode))
        self._state = None
        return self

    def eval(self) -> "MoeLayer":
        return self.train(False)

    @property
    def num_threads(self) -> int:
        return self._core.num_threads

    @num_threads.setter
    def num_threads(self, value: int) -> None:
        self._core.num_threads = int(value)

    @property
    def isa(self) -> str:
        """The kernel path in use (``avx512bf16``, ``avx2``, ``scalar``, ...)."""
        return self._core.isa

    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Write the layer (configuration and parameters, quantized codes included) to one
        safetensors file that :func:`load_layer` reads back without quantizing again."""
        meta = {}
        if getattr(self, "model_type", ""):
            meta["model_type"] = self.model_type
        if getattr(self, "layer_name", ""):
            meta["layer"] = self.layer_name
        self._core.save(os.fspath(path), meta)

    def forward(self, hidden_states, *, token_mask=None, sequence_length: int = 0, labels=None):
        """Run the layer.

        Parameters
        ----------
        hidden_states : array, float32, [num_tokens, d_model] or [batch, seq, d_model]
            Read in place. A 3-D array's rows are sequences (``sequence_length`` = seq).
        token_mask, sequence_length, labels
            As for :func:`route`.

        Returns
        -------
        output : numpy.ndarray, float32, the shape of ``hidden_states``
        routing : dict
            ``plan``, ``losses``, ``stats`` as :func:`route` returns them.
        """
        x, seq, shape = _flatten_tokens(hidden_states, self._core.d_model, int(sequence_length))
        out, routing, state = self._core.forward(x, token_mask, seq, labels)
        self._state = state
        self.last_routing = _routing_result(routing)
        return out.reshape(shape), self.last_routing

    __call__ = forward

    def backward(self, d_output, *, grads: Optional[Mapping[str, Any]] = None, d_aux_loss: Optional[float] = None,
                 d_z_loss: Optional[float] = None):
        """Backward of the last training forward.

        Parameters
        ----------
        d_output : array, float32, the output's shape
            dL/d output.
        grads : dict of float32 arrays, optional
            Buffers to write (assign) the parameter gradients into, named as :meth:`grads`
            names them; without it they accumulate into the layer's own (:meth:`grads`).
        d_aux_loss, d_z_loss : float, optional
            dL/d aux_loss and dL/d z_loss; default: the config's coefficients.

        Returns
        -------
        numpy.ndarray, float32
            dL/d hidden_states, the shape of ``d_output``.
        """
        if self._state is None or self._state.empty:
            raise ValueError("backward: expected a preceding training forward (call train() first), "
                             "got no saved forward")
        shape = tuple(d_output.shape)
        dy = d_output.reshape(-1, shape[-1]) if len(shape) == 3 else d_output
        state, self._state = self._state, None
        d_x = self._core.backward(dy, state, None if grads is None else dict(grads), d_aux_loss, d_z_loss)
        return d_x.reshape(shape)

    def parameters(self) -> dict:
        """Owned parameters as writable NumPy views (flat), by name. Call
        :meth:`refresh_packed_weights` after changing them."""
        return self._core.parameters()

    def grads(self) -> dict:
        """Accumulated gradients as NumPy views (flat), by name."""
        return self._core.grads()

    def zero_grad(self) -> None:
        self._core.zero_grad()

    def refresh_packed_weights(self) -> None:
        """The parameters changed: re-read them on the next forward."""
        self._core.refresh_packed_weights()
        self._state = None

    def update_selection_bias(self, tokens_per_expert) -> None:
        """Aux-loss-free balancing step of an owned selection bias (int64 [num_experts])."""
        self._core.update_selection_bias(np.ascontiguousarray(tokens_per_expert, dtype=np.int64))

    def sources(self) -> list:
        """For a layer from :func:`load_layer`: per parameter the checkpoint tensors read, their
        stored dtype and layout, and how they were obtained (``borrowed``, ``converted``,
        ``dequantized``). Empty for other layers."""
        return list(self._core.sources())

    def stored_parameters(self) -> dict:
        """The parameters the layer computes with, copied into new float32 arrays of the stacked
        layout (``gate_up`` [num_experts, gate_up_rows, d_model], ``down`` [num_experts,
        d_model, d_ff], ...), whatever layout they are read from."""
        return self._core.stored_parameters()

    def last_phases(self) -> list:
        """(phase, milliseconds) of the last forward or backward."""
        return self._core.last_phases()
