"""moekit's forward and backward as PyTorch custom operators (torch.library).

``moekit::moe_forward`` and ``moekit::moe_backward`` are opaque to torch.compile (it compiles
the model around them), have fake implementations that give the output shapes, and an autograd
formula that calls the backward op. The C++ layer a module computes with lives in a registry of
``_Core`` objects, found by the integer handle each op call carries.

The C++ layer borrows the parameters' memory (no copy) and records each parameter's data
pointer and version counter: an optimizer step (or any in-place change) bumps the versions, and
the next call re-reads the weights (``refresh_packed_weights``); a new data pointer (``.to()``,
``load_state_dict(assign=True)``) makes a new C++ layer. Packed weights are never stale.

A training forward's saved state (what the backward needs: the routing result, the
pre-activations) is kept by the core under a key made of the input's data pointer, version and
shape and the parameters' versions; its backward takes it from there. When it is not there (more
than ``_MAX_SAVED`` forwards in flight, or a backward for a forward that was run elsewhere, as
torch.library.opcheck does), the backward recomputes that forward first: the result is the same,
since the forward is deterministic.

Copies made on purpose (and only these):
  * bfloat16 hidden states are widened to float32 for the router (the router is fp32), and the
    float32 output is rounded back to bfloat16;
  * router weights and biases stored in bfloat16 get a float32 shadow, refreshed on change; so
    does a gpt-oss module's interleaved expert bias (reordered gate first);
  * a gpt-oss module's gate_up and bias gradients are written interleaved into new tensors;
  * gradients of bfloat16 parameters are computed in float32 and rounded to bfloat16;
  * the shared expert's gate and up gradients are one [2·d_ff, d_model] buffer split into the
    two HF parameters (the up half is cloned);
  * an output gradient that is not contiguous is made contiguous.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import json
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import _moekit

_MAX_SAVED = 8  # saved forwards kept per core before the oldest is dropped

_CORES: Dict[int, "_Core"] = {}
_handles = itertools.count(1)
# The C++ layers go before the interpreter tears the extension down.
atexit.register(_CORES.clear)


class _Core:
    """The C++ layers of one module (one per compute dtype) and the saved forwards."""

    def __init__(self, config: dict, names: Sequence[str], layout: str = "hf"):
        self.config = dict(config)
        self.names = list(names)  # moekit parameter names, in the ops' list order
        # The weights given as gate and up tensors (their up half's name is in the list too).
        self.split = {name for name, up in _UP_NAMES.items() if up in self.names}
        # "hf": transformers 5.x stacks, [E, 2·d_ff, d] (gate rows first) and [E, d, d_ff];
        # "gpt_oss": its experts' own layout, gate_up_proj [E, d, 2·d_ff] with gate and up
        # interleaved (even / odd columns) and its bias likewise, down_proj [E, d_ff, d]. The
        # weights are read through strided views of those tensors (no copy); the [E, 2·d_ff]
        # bias gets a gate-first shadow; gradients are mapped back to the stored layout.
        self.layout = layout
        self.layers: Dict[str, Tuple[object, tuple, tuple, dict]] = {}
        self.saved: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()
        self.last_routing: Optional[dict] = None
        self.recomputed = 0  # backwards that had to rerun their forward (no saved state)
        self.handle = next(_handles)
        _CORES[self.handle] = self

    # The C++ layer for this call's parameters, built or refreshed when they changed.
    def layer(self, params: Sequence[torch.Tensor], compute: str, num_threads: int):
        identity = tuple((p.data_ptr(), p.dtype, tuple(p.shape)) for p in params)
        versions = tuple(p._version for p in params)
        entry = self.layers.get(compute)
        if entry is None or entry[1] != identity:
            arrays, shadows = self._arrays(params, compute)
            config = dict(self.config, dtype=compute, num_threads=num_threads)
            layer = _moekit.Layer(json.dumps(config), arrays)
            entry = (layer, identity, versions, shadows)
            self.layers[compute] = entry
            self.saved.clear()
        elif entry[2] != versions:
            for i, (shadow, make) in entry[3].items():  # float32 / reordered copies of small parameters
                shadow.copy_(make(params[i].detach()))
            entry[0].refresh_packed_weights()
            entry = (entry[0], identity, versions, entry[3])
            self.layers[compute] = entry
            self.saved.clear()
        layer = entry[0]
        if layer.num_threads != num_threads:
            layer.num_threads = num_threads
        return layer

    def _arrays(self, params: Sequence[torch.Tensor], compute: str):
        arrays, shadows = {}, {}
        for i, (name, p) in enumerate(zip(self.names, params)):
            t = p.detach()
            if t.device.type != "cpu":
                raise ValueError(f"{name}: expected a CPU tensor (moekit runs on the CPU only), got device {t.device}")
            if not t.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
            if t.dtype not in (torch.float32, torch.bfloat16):
                raise TypeError(f"{name}: expected dtype float32 or bfloat16, got {t.dtype}")
            weight = not _spec(name)["fp32_only"]  # bf16 weights are read as they are
            if "." in name:  # "gate_up.3": one tensor per expert (Switch), passed as a list
                base, index = name.split(".")
                arrays.setdefault(base, []).append(t)
                assert len(arrays[base]) == int(index) + 1
            # gpt-oss stores transposed every weight the schema lets arrive transposed (gate_up,
            # down), and gate and up interleaved wherever it lets them (gate_up and its bias).
            elif self.layout == "gpt_oss" and _arrives(name, "transposed") and _arrives(name, "interleaved"):
                arrays[name] = t[:, :, 0::2].transpose(1, 2)  # [E, d_ff, d], strides (2fd, 2, 2f)
                arrays[_UP_NAMES[name]] = t[:, :, 1::2].transpose(1, 2)
            elif self.layout == "gpt_oss" and _arrives(name, "transposed"):
                arrays[name] = t.transpose(1, 2)  # [E, d, d_ff], strides (fd, 1, d)
            elif self.layout == "gpt_oss" and _arrives(name, "interleaved"):
                make = _gate_first
                shadows[i] = (make(t), make)
                arrays[name] = shadows[i][0]
            elif t.dtype == torch.float32 or weight:
                arrays[name] = t
            else:
                make = torch.Tensor.float
                shadows[i] = (make(t), make)
                arrays[name] = shadows[i][0]
        return arrays, shadows

    @staticmethod
    def key(x: torch.Tensor, params: Sequence[torch.Tensor], compute: str, training: bool, seq: int):
        return (x.data_ptr(), x._version, tuple(x.shape), x.dtype, compute, training, seq,
                tuple((p.data_ptr(), p._version) for p in params))

    def forward(self, x, params, compute, training, save, seq, num_threads):
        layer = self.layer(params, compute, num_threads)
        if layer.training != training:
            layer.set_training(training)
        layer.save_for_backward = bool(save)  # also in eval: a gradient through the eval routing
        x32 = x if x.dtype == torch.float32 else x.float()
        out, routing, state = layer.forward(x32.detach(), None, seq, None)
        self.last_routing = routing
        if save and state is not None:
            k = self.key(x, params, compute, training, seq)
            self.saved[k] = state
            self.saved.move_to_end(k)
            while len(self.saved) > _MAX_SAVED:
                self.saved.popitem(last=False)
        out = torch.from_numpy(out)
        if x.dtype != torch.float32:
            out = out.to(x.dtype)
        losses = routing["losses"]
        return (out, torch.tensor(losses["aux_loss"], dtype=torch.float32),
                torch.tensor(losses["z_loss"], dtype=torch.float32))

    def backward(self, d_out, d_aux, d_z, x, params, compute, training, seq, num_threads):
        layer = self.layer(params, compute, num_threads)
        state = self.saved.pop(self.key(x, params, compute, training, seq), None)
        if state is None or state.empty:
            self.recomputed += 1
            # The same routing mode as the forward being differentiated, saving its state.
            if layer.training != training:
                layer.set_training(training)
            layer.save_for_backward = True
            x32 = x if x.dtype == torch.float32 else x.float()
            _, _, state = layer.forward(x32.detach(), None, seq, None)
        # Gradient buffers from moekit's pool (recycled when torch frees them: no page faults
        # on the next step); the C++ backward writes them, it does not accumulate.
        grads = {}
        experts = {}
        for name in self.names:
            if "." in name:
                experts[name.split(".")[0]] = experts.get(name.split(".")[0], 0) + 1
        for name, p in zip(self.names, params):
            if name in _HALF_OF or not _spec(name)["has_gradient"]:
                continue  # no gradient; the up halves come out of the stacked buffers
            if "." in name:  # per-expert tensors: one stacked buffer, a view per expert
                base = name.split(".")[0]
                if base not in grads:
                    grads[base] = _moekit.pooled_array([experts[base]] + list(p.shape), "float32")
                continue
            rows = 2 * p.shape[0] if name in self.split else p.shape[0]
            shape = [rows] + list(p.shape[1:])
            if self.layout == "gpt_oss" and _arrives(name, "transposed"):
                shape = [p.shape[0], p.shape[2], p.shape[1]]  # the layer's [E, rows, cols]
            grads[name] = _moekit.pooled_array(shape, "float32")
        d = d_out if d_out.dtype == torch.float32 else d_out.float()
        d_x = layer.backward(d.detach().contiguous(), state, grads, float(d_aux), float(d_z))
        result = [torch.from_numpy(d_x).to(x.dtype)]
        for name, p in zip(self.names, params):
            if not _spec(name)["has_gradient"]:
                result.append(p.new_empty((0,)))  # it only selects: no gradient
                continue
            if "." in name:
                base, index = name.split(".")
                g = torch.from_numpy(grads[base])[int(index)]
            elif self.layout == "gpt_oss" and (_arrives(name, "transposed") or _arrives(name, "interleaved")):
                g = _to_gpt_oss(name, torch.from_numpy(grads[name]), p)
            elif name in _HALF_OF:
                g = torch.from_numpy(grads[_HALF_OF[name]])[p.shape[0]:].clone()
            elif name in self.split:
                g = torch.from_numpy(grads[name])[:p.shape[0]]
            else:
                g = torch.from_numpy(grads[name])
            if p.dtype == torch.bfloat16:
                rounded = torch.from_numpy(_moekit.pooled_array(list(p.shape), "bfloat16")).view(torch.bfloat16)
                rounded.copy_(g)
                g = rounded
            result.append(g.view(p.shape))
        return result


# The C++ layer's parameter schema (include/moekit/params.h) by name, the up halves' names of the
# weights that may be given as gate and up tensors, and the weight each such half belongs to.
_SCHEMA = {row["name"]: row for row in _moekit.parameter_schema()}
_UP_NAMES = {name: row["up_name"] for name, row in _SCHEMA.items() if row["up_name"] is not None}
_HALF_OF = {up: name for name, up in _UP_NAMES.items()}


def _spec(name: str) -> dict:
    """The schema row of a name of the ops' list: a parameter, one expert of it ("gate_up.3") or
    an up half ("shared_up")."""
    base = name.split(".")[0]
    return _SCHEMA[_HALF_OF.get(base, base)]


def _arrives(name: str, layout: str) -> bool:
    """Whether the schema lets the parameter arrive in `layout` ("transposed", "interleaved")."""
    return layout in _spec(name)["layouts"]


def _gate_first(bias: torch.Tensor) -> torch.Tensor:
    """gpt-oss's interleaved [E, 2·d_ff] bias (gate even, up odd) as the layer's gate-first order."""
    return torch.cat([bias[:, 0::2], bias[:, 1::2]], dim=1).float().contiguous()


def _to_gpt_oss(name: str, g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A gradient in the layer's layout (gate rows first; [E, d, d_ff] down) in gpt-oss's."""
    if not _arrives(name, "interleaved"):  # down
        return g.transpose(1, 2)  # [E, d_ff, d], a view of the buffer
    f = g.shape[1] // 2
    out = torch.empty(p.shape, dtype=torch.float32)
    if _arrives(name, "transposed"):  # gate_up: g [E, 2f, d] → [E, d, 2f] interleaved
        out[:, :, 0::2] = g[:, :f].transpose(1, 2)
        out[:, :, 1::2] = g[:, f:].transpose(1, 2)
    else:  # bias [E, 2f]
        out[:, 0::2] = g[:, :f]
        out[:, 1::2] = g[:, f:]
    return out


def _threads(requested: int) -> int:
    return requested if requested > 0 else max(1, torch.get_num_threads())


@torch.library.custom_op("moekit::moe_forward", mutates_args=())
def moe_forward(x: torch.Tensor, params: List[torch.Tensor], handle: int, compute: str, training: bool,
                save: bool, sequence_length: int, num_threads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, aux_loss, z_loss) of the MoE layer of core ``handle`` on x [num_tokens, d_model]."""
    core = _CORES[handle]
    return core.forward(x, params, compute, training, save, sequence_length, _threads(num_threads))


@moe_forward.register_fake
def _(x, params, handle, compute, training, save, sequence_length, num_threads):
    return (torch.empty_like(x), x.new_empty((), dtype=torch.float32), x.new_empty((), dtype=torch.float32))


@torch.library.custom_op("moekit::moe_backward", mutates_args=())
def moe_backward(d_output: torch.Tensor, d_aux_loss: torch.Tensor, d_z_loss: torch.Tensor, x: torch.Tensor,
                 params: List[torch.Tensor], handle: int, compute: str, training: bool, sequence_length: int,
                 num_threads: int) -> List[torch.Tensor]:
    """[d_x, d_param...] for the forward of the same arguments (an empty tensor: no gradient)."""
    core = _CORES[handle]
    return core.backward(d_output, d_aux_loss, d_z_loss, x, params, compute, training, sequence_length,
                         _threads(num_threads))


@moe_backward.register_fake
def _(d_output, d_aux_loss, d_z_loss, x, params, handle, compute, training, sequence_length, num_threads):
    core = _CORES[handle]
    out = [torch.empty_like(x)]
    for name, p in zip(core.names, params):
        out.append(torch.empty_like(p) if _spec(name)["has_gradient"] else p.new_empty((0,)))
    return out


def _setup_context(ctx, inputs, output):
    x, params, handle, compute, training, save, sequence_length, num_threads = inputs
    ctx.save_for_backward(x, *params)
    ctx.args = (handle, compute, training, sequence_length, num_threads)


def _backward(ctx, d_output, d_aux_loss, d_z_loss):
    x, *params = ctx.saved_tensors
    handle, compute, training, sequence_length, num_threads = ctx.args
    if d_output is None:
        d_output = torch.zeros_like(x)
    zero = torch.zeros((), dtype=torch.float32)
    grads = torch.ops.moekit.moe_backward(d_output, zero if d_aux_loss is None else d_aux_loss,
                                          zero if d_z_loss is None else d_z_loss, x, params, handle, compute,
                                          training, sequence_length, num_threads)
    d_x, d_params = grads[0], list(grads[1:])
    names = _CORES[handle].names
    d_params = [g if _spec(n)["has_gradient"] else None for n, g in zip(names, d_params)]
    return d_x, d_params, None, None, None, None, None, None


moe_forward.register_autograd(_backward, setup_context=_setup_context)
