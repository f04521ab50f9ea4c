"""moekit for PyTorch: :class:`MoE`, a ``torch.nn.Module`` whose forward and backward are moekit's.

Example
-------
>>> import torch, moekit.torch
>>> moe = moekit.torch.MoE({"hidden_size": 512, "intermediate_size": 1024,
...                         "num_local_experts": 8, "num_experts_per_tok": 2})
>>> x = torch.randn(4, 128, 512, requires_grad=True)
>>> y = moe(x)                                # [4, 128, 512]
>>> (y.square().mean() + moe.router_loss).backward()
>>> moe.routing_stats["tokens_per_expert"]    # of the last call

Parameters are named and shaped as Hugging Face transformers 5.x names its MoE blocks, so an HF
block's ``state_dict`` loads into it. The forward and backward are custom operators
(``torch.ops.moekit.moe_forward`` / ``moe_backward``), opaque to ``torch.compile``.
"""

from __future__ import annotations

import json
import math
import weakref
from typing import Any, List, Mapping, Optional

try:
    import torch
    from torch import nn
except ImportError as e:  # moekit itself needs only NumPy
    raise ImportError(f"moekit.torch needs PyTorch (pip install torch): {e}") from e

from .. import load_config
from .. import _moekit
from . import _ops
from ._ops import moe_backward, moe_forward

__all__ = ["MoE", "replace_moe_blocks", "moe_forward", "moe_backward"]

# Keys of an HF config that describe the model around the MoE block, not the block: accepted
# and ignored when a whole config dict is given.
_IGNORED_HF_KEYS = {"torch_dtype", "architectures", "model_type", "transformers_version", "vocab_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                    "rms_norm_eps", "rope_theta", "initializer_range", "tie_word_embeddings", "use_cache",
                    "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout", "sliding_window",
                    "output_router_logits", "head_dim"}


class _Router(nn.Module):
    def __init__(self, rows: int, d_model: int, bias: bool, noisy: bool, selection_bias: bool, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, d_model))
        self.bias = nn.Parameter(torch.empty(rows)) if bias else None
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model)) if noisy else None
        if selection_bias:
            # DeepSeek-V3's name; a buffer (it only selects, it receives no gradient).
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        else:
            self.e_score_correction_bias = None


class _Experts(nn.Module):
    def __init__(self, num_experts: int, gate_up_rows: int, d_model: int, d_ff: int, bias: bool,
                 transposed: bool = False):
        super().__init__()
        if transposed:  # gpt-oss: [E, d, 2·d_ff] (gate/up interleaved) and [E, d_ff, d]
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, d_model, gate_up_rows))
            self.down_proj = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        else:
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, gate_up_rows, d_model))
            self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, gate_up_rows))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, d_model))
        else:
            self.gate_up_proj_bias = self.down_proj_bias = None


class _SwitchExpert(nn.Module):
    """Switch Transformers' expert (SwitchTransformersDenseActDense): wi [d_ff, d], wo [d, d_ff]."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)


class _SharedMlp(nn.Module):
    """HF's shared MLP: gate_proj, up_proj, down_proj (up_proj only for ungated activations)."""

    def __init__(self, d_model: int, d_ff: int, gated: bool, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias) if gated else None
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)


def _uniform_(t: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        t.uniform_(-bound, bound)


class MoE(nn.Module):
    """A Mixture-of-Experts block computed by moekit.

    Parameters
    ----------
    config : dict or path, optional
        Hugging Face style keys: ``hidden_size``, ``intermediate_size`` or
        ``moe_intermediate_size`` (the expert width), ``num_experts`` / ``num_local_experts``,
        ``num_experts_per_tok``, ``hidden_act``, ``preset`` and any routing key (see
        ``moekit.preset``); model keys that are not about the block (``vocab_size``, ...) are
        ignored.
    num_threads : int, optional
        Threads of moekit's pool; default: ``torch.get_num_threads()`` at each call.
    dtype : torch.dtype, optional
        float32 (default) or bfloat16 parameters. A bfloat16 module computes the experts in
        bf16 (fp32 accumulation) and the router in fp32.
    **keys
        Configuration keys that override ``config``'s.

    Attributes
    ----------
    aux_loss, z_loss : torch.Tensor
        The raw balancing and z losses of the last call (0-d, float32, with gradients).
    router_loss : torch.Tensor
        ``router_aux_loss_coef · aux_loss + router_z_loss_coef · z_loss``: add it to the loss.

    Notes
    -----
    Parameters (as transformers 5.x): ``gate.weight`` [E, d], ``gate.bias`` (router_bias),
    ``gate.e_score_correction_bias`` (a buffer), ``experts.gate_up_proj`` [E, 2·d_ff, d] (gate
    rows first; d_ff rows for ungated activations), ``experts.down_proj`` [E, d, d_ff],
    ``experts.gate_up_proj_bias`` / ``down_proj_bias`` (expert_bias), shared experts as
    ``shared_expert.{gate,up,down}_proj`` with ``shared_expert_gate.weight`` [1, d] (Qwen2-MoE)
    or ``shared_experts.*`` (DeepSeek). ``.train()`` / ``.eval()`` switch the routing's
    training mode (noise, capacity factor). Under ``torch.autocast("cpu", torch.bfloat16)`` a
    float32 module computes its experts in bf16.
    """

    def __init__(self, config: Any = None, *, num_threads: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                 _layout: str = "hf", **keys: Any):
        super().__init__()
        # "gpt_oss" (replace_moe_blocks only): transformers' GptOssMLP names and layout, a
        # `router` and experts.gate_up_proj [E, d, 2·d_ff] interleaved, down_proj [E, d_ff, d].
        self._layout = _layout
        cfg = load_config(config, **keys)
        for k in list(cfg):
            if k in _IGNORED_HF_KEYS:
                del cfg[k]
        if dtype not in (None, torch.float32, torch.bfloat16):
            raise TypeError(f"dtype: expected torch.float32 or torch.bfloat16, got {dtype}")
        cfg.pop("dtype", None)
        cfg.pop("num_threads", None)
        _moekit.check_layer_config(_json(cfg))  # a bad key is a ValueError here, not at the first call
        # The selection bias is a buffer of the module: values given in the config start it.
        initial_bias = cfg.pop("e_score_correction_bias", None)
        if initial_bias:
            cfg["selection_bias"] = True
        full = _layer_summary(cfg)
        if full["expert_bias"] and full["shared_d_ff"] > 0 and full["gated"]:
            raise ValueError("expert_bias: expected false with a gated shared expert (biased shared gate and up "
                             "projections are not supported), got true")
        self.config = cfg
        self.num_threads = int(num_threads) if num_threads else 0
        self.router_aux_loss_coef = full["router_aux_loss_coef"]
        self.router_z_loss_coef = full["router_z_loss_coef"]
        self.num_experts = full["num_experts"]
        self.top_k = full["num_experts_per_tok"]
        self.hidden_size = d = full["d_model"]
        self.d_ff = full["d_ff"]

        router = _Router(full["router_rows"], d, full["router_bias"], full["noisy_gating"],
                         full["selection_bias"], self.num_experts)
        if _layout == "switch":
            if full["gated"] or full["expert_bias"]:
                raise ValueError("_layout 'switch': expected ungated experts without biases (Switch's wi / wo)")
            self.router = nn.Module()
            self.router.classifier = router
            self.experts = nn.ModuleDict({f"expert_{e}": _SwitchExpert(d, self.d_ff) for e in range(self.num_experts)})
        else:
            setattr(self, "router" if _layout == "gpt_oss" else "gate", router)
            self.experts = _Experts(self.num_experts, full["gate_up_rows"], d, self.d_ff, full["expert_bias"],
                                    transposed=_layout == "gpt_oss")
        if full["shared_d_ff"] > 0:
            shared = _SharedMlp(d, full["shared_d_ff"], full["gated"], full["expert_bias"])
            setattr(self, "shared_expert" if full["shared_expert_gate"] else "shared_experts", shared)
            if full["shared_expert_gate"]:
                self.shared_expert_gate = nn.Linear(d, 1, bias=False)
        self._names = self._parameter_names(cfg)
        self._core = _ops._Core(cfg, self._names, layout=_layout)
        # The registry entry (and the C++ layer) goes with the module.
        weakref.finalize(self, _ops._CORES.pop, self._core.handle, None)
        self.reset_parameters()
        if initial_bias:
            if len(initial_bias) != self.num_experts:
                raise ValueError(f"e_score_correction_bias: expected {self.num_experts} values, got {len(initial_bias)}")
            with torch.no_grad():
                self._router_module.e_score_correction_bias.copy_(torch.tensor(initial_bias, dtype=torch.float32))
        if dtype is torch.bfloat16:
            self.to(torch.bfloat16)
        self.aux_loss: Optional[torch.Tensor] = None
        self.z_loss: Optional[torch.Tensor] = None
        self.router_loss: Optional[torch.Tensor] = None

    @classmethod
    def from_hf_config(cls, config: Any, **keys: Any) -> "MoE":
        """The MoE block of a Hugging Face model configured from its config.json (a dict, a
        transformers config object, a config.json path or its directory; see
        ``moekit.model_family``); keyword arguments override the derived keys. The parameters
        are initialised afresh: load the block's ``state_dict`` into it."""
        from .. import model_family

        cfg = model_family(config)["layer_config"]
        cfg.update(keys)
        return cls(cfg)

    @classmethod
    def from_pretrained(cls, path: Any, layer: Any, *, dtype: Optional[torch.dtype] = None,
                        num_threads: Optional[int] = None) -> "MoE":
        """The MoE block of layer ``layer`` of a Hugging Face checkpoint directory (see
        ``moekit.load_layer``), as a trainable module: its parameters are new tensors holding
        the checkpoint's values (FP8 / MXFP4 dequantized, any stored layout), float32 unless
        ``dtype=torch.bfloat16``."""
        from .. import load_layer

        loaded = load_layer(path, layer)
        module = cls(loaded._config, num_threads=num_threads)
        module._load_stored(loaded.stored_parameters())
        if dtype is torch.bfloat16:
            module.to(torch.bfloat16)
        elif dtype not in (None, torch.float32):
            raise TypeError(f"dtype: expected torch.float32 or torch.bfloat16, got {dtype}")
        return module

    def _load_stored(self, stored: Mapping[str, Any]) -> None:
        """Copies moekit-named fp32 arrays (MoeLayer.stored_parameters()) into the parameters."""
        targets = self._by_name()
        with torch.no_grad():
            for name, value in stored.items():
                v = torch.from_numpy(value)
                up = _UP_NAMES.get(name)
                if up is not None and targets.get(up) is not None:
                    half = v.shape[0] // 2  # one [2·d_ff, d] stack → HF's gate_proj and up_proj
                    targets[name].copy_(v[:half])
                    targets[up].copy_(v[half:])
                    continue
                target = targets.get(name)
                if target is None:
                    raise ValueError(f"{name}: the checkpoint has it, this module's configuration has no such parameter")
                target.copy_(v.reshape(target.shape))

    @property
    def _router_module(self) -> nn.Module:
        if self._layout == "switch":
            return self.router.classifier
        return self.router if self._layout == "gpt_oss" else self.gate

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation U(−1/√fan_in, 1/√fan_in), from torch's generator."""
        d = self.hidden_size
        _uniform_(self._router_module.weight, d)
        if self._router_module.bias is not None:
            _uniform_(self._router_module.bias, d)
        if self._layout == "switch":
            for expert in self.experts.values():
                _uniform_(expert.wi.weight, d)
                _uniform_(expert.wo.weight, self.d_ff)
            return
        _uniform_(self.experts.gate_up_proj, d)
        _uniform_(self.experts.down_proj, self.d_ff)
        if self.experts.gate_up_proj_bias is not None:
            _uniform_(self.experts.gate_up_proj_bias, d)
            _uniform_(self.experts.down_proj_bias, self.d_ff)

    def _by_name(self) -> dict:
        """Every tensor of the module by its moekit name (None where the module has none): each
        parameter of the schema under the first of its Hugging Face names the module has, one
        name per expert where the experts are stored apart ("gate_up.3"), and the up half of a
        weight stored as gate and up tensors under the schema's up name ("shared_up")."""
        by_name = {}
        for row in _SCHEMA:
            found, up = _find_hf(self, row, self.num_experts)
            if isinstance(found, list):
                by_name.update({f"{row['name']}.{e}": t for e, t in enumerate(found)})
            else:
                by_name[row["name"]] = found
            if row["up_name"] is not None:
                by_name[row["up_name"]] = up
        return by_name

    def _parameter_names(self, cfg: Mapping[str, Any]) -> List[str]:
        """The moekit names of the module's tensors in the ops' order: the parameters the C++
        layer's configuration uses, in the schema's order, as _by_name names them."""
        used = {name for name, _ in _moekit.parameter_shapes(_json(cfg))}
        names = []
        for name, tensor in self._by_name().items():
            if name not in _HALF_OF and (name.split(".")[0] in used) != (tensor is not None):
                raise ValueError(f"{name}: the configuration {'uses' if tensor is None else 'has no'} such parameter, "
                                 f"the module {'has no tensor for it' if tensor is None else 'has one'}")
            if tensor is not None:  # an up half: there when its weight is stored as gate and up tensors
                names.append(name)
        return names

    def _tensors(self) -> List[torch.Tensor]:
        """The parameters in the ops' order (moekit names in self._names)."""
        by_name = self._by_name()
        return [by_name[n] for n in self._names]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [num_tokens, d] or [batch, seq, d] → output of the same shape.

        A 3-D input's rows are sequences (capacity and losses per sequence where the config's
        scopes say so). The losses of the call are left in ``aux_loss``, ``z_loss`` and
        ``router_loss``, its routing in ``routing_stats`` / ``last_routing``.
        """
        x = hidden_states
        params = self._tensors()
        if x.device.type != "cpu":
            raise ValueError(f"hidden_states: expected a CPU tensor (moekit runs on the CPU only), got device {x.device}")
        if x.dim() not in (2, 3) or x.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states: expected shape [num_tokens, {self.hidden_size}] or "
                             f"[batch, seq, {self.hidden_size}], got {list(x.shape)}")
        if not x.is_contiguous():
            raise ValueError(f"hidden_states: expected a contiguous tensor (moekit reads it in place), got strides "
                             f"{x.stride()}; call .contiguous()")
        weight_dtype = next(p.dtype for n, p in zip(self._names, params) if n.split(".")[0] in _EXPERT_WEIGHTS)
        compute = "bf16" if weight_dtype == torch.bfloat16 else "fp32"
        if weight_dtype == torch.float32 and torch.is_autocast_enabled("cpu") and \
                torch.get_autocast_dtype("cpu") == torch.bfloat16:
            compute = "bf16"
        elif x.dtype != weight_dtype:
            raise TypeError(f"hidden_states: expected dtype {weight_dtype} (the parameters'), got {x.dtype}")
        seq = x.shape[1] if x.dim() == 3 else 0
        flat = x.reshape(-1, self.hidden_size)
        save = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        out, aux, z = moe_forward(flat, params, self._core.handle, compute, self.training, save, seq,
                                  self.num_threads)
        self.aux_loss, self.z_loss = aux, z
        self.router_loss = self.router_aux_loss_coef * aux + self.router_z_loss_coef * z
        if compute == "bf16" and x.dtype == torch.float32:
            out = out.to(torch.bfloat16)  # autocast: a bf16 result, as its matmuls give
        if self._layout == "gpt_oss":
            return out.reshape(x.shape), None  # GptOssMLP's (hidden_states, router_scores); scores not kept
        return out.reshape(x.shape)

    @property
    def last_routing(self) -> Optional[dict]:
        """The routing of the last call: ``plan``, ``losses``, ``stats`` (NumPy arrays)."""
        return self._core.last_routing

    @property
    def routing_stats(self) -> Optional[dict]:
        """Routing statistics of the last call (``tokens_per_expert``, ``mean_entropy``, ...)."""
        r = self._core.last_routing
        return None if r is None else r["stats"]

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, d_ff={self.d_ff}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}")


def _json(cfg: Mapping[str, Any]) -> str:
    return json.dumps(dict(cfg))


# The C++ layer's parameter schema (include/moekit/params.h): one dict per parameter in the
# layer's order, with the Hugging Face names it is found under; and the names of the up halves
# of weights that may be given as gate and up tensors.
_SCHEMA = _moekit.parameter_schema()
_UP_NAMES = {row["name"]: row["up_name"] for row in _SCHEMA if row["up_name"] is not None}
_HALF_OF = {up: name for name, up in _UP_NAMES.items()}
_EXPERT_WEIGHTS = {row["name"] for row in _SCHEMA if row["expert_weight"]}


def _get(module: nn.Module, path: str, num_experts: int) -> Any:
    """The tensor at a dotted path of `module` (None when any part is missing or None); a path
    with "{e}" gives the list of the experts' tensors."""
    if "{e}" in path:
        if _get(module, path.replace("{e}", "0"), num_experts) is None:
            return None
        return [_get(module, path.replace("{e}", str(e)), num_experts) for e in range(num_experts)]
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _find_hf(module: nn.Module, row: Mapping[str, Any], num_experts: int):
    """(tensor or list of per-expert tensors, up half or None) of a schema row under the first of
    its Hugging Face names that `module` has; (None, None) when it has none."""
    for name, up in row["hf_names"]:
        found = _get(module, name, num_experts)
        if found is not None:
            return found, (_get(module, up, num_experts) if up is not None else None)
    return None, None


def _layer_summary(cfg: Mapping[str, Any]) -> dict:
    """The derived shapes and switches of a layer config, from the C++ parser."""
    return json.loads(_moekit.layer_summary(_json(cfg)))


# transformers 5.x MoE block classes whose parameters moekit.torch.MoE names and shapes as they
# are (HF 5.x stacked experts), so a block's tensors can be shared, not copied.
_SHAREABLE_BLOCKS = {"MixtralSparseMoeBlock": "mixtral", "Qwen2MoeSparseMoeBlock": "qwen2_moe",
                     "Qwen3MoeSparseMoeBlock": "qwen3_moe", "OlmoeSparseMoeBlock": "olmoe",
                     "DeepseekV3MoE": "deepseek_v3", "GptOssMLP": "gpt_oss",
                     "SwitchTransformersSparseMLP": "switch_transformers"}
_LAYOUTS = {"gpt_oss": "gpt_oss", "switch_transformers": "switch"}


def replace_moe_blocks(model: nn.Module, *, num_threads: Optional[int] = None) -> List[str]:
    """Swaps every MoE block of a loaded transformers model for a :class:`MoE` that shares the
    block's parameter tensors (no copy: the model's ``parameters()``, its optimizer state and
    its checkpoints are unchanged), so the model computes the same logits and its MoE layers
    run on moekit's kernels.

    Families: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3 (their transformers 5.x blocks
    keep the experts stacked as ``experts.gate_up_proj`` / ``down_proj``) and gpt_oss (its
    ``router`` and its experts' interleaved, transposed stacks, read through strided views; the
    module returns ``(hidden_states, None)`` as GptOssMLP returns a pair) and switch_transformers
    (its ``router.classifier`` and one ``experts.expert_{e}.wi`` / ``wo`` per expert, read
    through one pointer per expert; expert dropout, which transformers applies in training, is
    not).

    Returns the names of the modules replaced. The replacement's routing losses are its
    ``aux_loss`` / ``router_loss`` attributes; transformers' ``output_router_logits`` does not
    see them (it records its own router modules, which are gone).
    """
    from .. import model_family

    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model: expected a transformers model (with .config), got {type(model).__name__}")
    family = model_family(config)
    replaced = []
    for name, block in list(model.named_modules()):
        kind = _SHAREABLE_BLOCKS.get(type(block).__name__)
        if kind is None:
            continue
        if kind != family["model_type"]:
            raise ValueError(f"{name}: a {type(block).__name__} in a model whose config says model_type "
                             f"{family['model_type']!r}")
        with torch.device("meta"):  # no fresh parameters: the block's own take their place
            moe = MoE(family["layer_config"], num_threads=num_threads, _layout=_LAYOUTS.get(kind, "hf"))
        theirs = dict(block.named_parameters())
        theirs.update(dict(block.named_buffers()))
        ours = dict(moe.named_parameters())
        ours.update(dict(moe.named_buffers()))
        if set(ours) != set(theirs):
            raise ValueError(f"{name}: the {type(block).__name__}'s tensors {sorted(theirs)} are not the ones moekit's "
                             f"module reads {sorted(ours)}")
        for key, tensor in theirs.items():
            owner_name, _, leaf = key.rpartition(".")
            owner = moe.get_submodule(owner_name) if owner_name else moe
            if isinstance(tensor, nn.Parameter):
                setattr(owner, leaf, tensor)
            else:
                owner._buffers[leaf] = tensor
        moe.train(block.training)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, moe)
        replaced.append(name)
    return replaced
