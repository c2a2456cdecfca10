"""The ops a measured latency table times, their signatures, and how to run them at other widths.

Every op of the inference network that does work is timed on its own, at a few widths, and its
latency fitted in the form of the cost program (``costs/measured.py``):

- conv and linear calls (``LayerCall``): rebuilt from their arguments at a grid of alive input and
  output widths; ``t = c0 + c_in A_in + c_out A_out + c_io A_in A_out`` (a side whose width is fixed
  folds into the others: ``t = c0 + k A``; depthwise convs ``t = c0 + k A_out``);
- products between activations (attention's q.k^T, attn x v, fused attention): replayed with a
  share of their heads alive; ``t = c0 + k A_heads``;
- data-moving ops (BatchNorm, activations, element-wise, pooling, concat, norms, softmax):
  replayed with a share of their channels alive; ``t = c0 + k x`` with x the elements they read
  and write, ``sum_u numel_u A(u)``.

A *signature* names what an op's time depends on apart from its prunable widths (op, kernel,
stride, spatial size, tokens, fixed widths, ...), so ops of the same shape are timed once, and a
slim network rebuilt from the seed finds its ops in the table measured on the seed. Replay runs
the recorded aten op on fresh tensors: dim 0 of every activation is scaled from the captured
batch to the measured one, channel dims keep the channels alive under a mask over channel groups
(fixed groups always alive), and the few ops whose non-tensor arguments follow the shapes, or
that must run as at inference (BatchNorm in training mode), are rewritten by one small function
each (``@replays``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from morphnet.capture.graph import LeafOp, ValueRef
from morphnet.channels.walker import ChannelAnalysis, LayerCall, bind

aten = torch.ops.aten

#: Shares of an op's prunable channels (or of its widths) at which it is timed.
FRACTIONS = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Setting:
    """Where ops are timed: device, dtype, batch size and memory format."""

    device: torch.device
    dtype: torch.dtype
    batch_size: int
    channels_last: bool = False

    @property
    def align(self) -> int:
        """Width step of the grid: multiples of 8 on CUDA (what its tensor-core kernels and the
        exported widths use), any width elsewhere."""
        return 8 if self.device.type == "cuda" else 1


@dataclass
class TimedOp:
    """One op of the model with its latency form.

    ``form``: ``"bilinear"`` (conv / linear with both widths prunable: variables A_in, A_out),
    ``"linear"`` (``c0 + k x`` with ``x = sum_u w_u A(u)`` over ``uses``), or ``"constant"`` (nothing
    prunable). ``z`` is the input of a depthwise conv: its regularization joins the output's.
    """

    kind: str  # "conv" | "linear" | "product" | "data"
    form: str
    signature: str
    module: str
    node: int
    call: LayerCall | None = None
    uses: list[tuple[np.ndarray | None, float]] = field(default_factory=list)
    z: np.ndarray | None = None
    extent: tuple[int, int] = (0, 0)  # widest (A_in, A_out) a bilinear / layer op needs the fit to cover


# ---- rewrites for replay: one small function per op family ---------------------------------------
REPLAYS: dict = {}
DERIVED: dict = {}  # op packet -> argument names that follow the shapes (left out of signatures)


def replays(*ops, derived: tuple[str, ...] = ()) -> Callable:
    """Register how ops of this family run at inference on tensors of other widths:
    ``fn(named_args) -> (callable, args, kwargs)``. ``derived`` names arguments computed from the
    shapes, which signatures leave out."""
    def register(fn):
        for op in ops:
            REPLAYS[op] = fn
            DERIVED[op] = derived
        return fn
    return register


def _packets(*names: str) -> list:
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


@replays(*_packets("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional"))
def _batch_norm(b: dict) -> tuple:
    """A BatchNorm recorded in training mode runs with its running statistics at inference."""
    if b.get("running_mean") is None:  # no running statistics: batch statistics at inference too
        return aten.native_batch_norm, (b["input"], b["weight"], b["bias"], None, None, True, 0.1, b["eps"]), {}
    return (aten._native_batch_norm_legit_no_training,
            (b["input"], b["weight"], b["bias"], b["running_mean"], b["running_var"], b["momentum"], b["eps"]), {})


@replays(aten.native_layer_norm, derived=("normalized_shape",))
def _layer_norm(b: dict) -> tuple:
    """The normalized shape is the input's last dims (narrower when its channels are pruned)."""
    x = b["input"]
    dims = len(b["normalized_shape"])
    return aten.native_layer_norm, (x, list(x.shape[-dims:]), b["weight"], b["bias"], b["eps"]), {}


@replays(aten.native_group_norm, derived=("N", "C", "HxW"))
def _group_norm(b: dict) -> tuple:
    """Batch, channels and positions are read off the input."""
    x = b["input"]
    return (aten.native_group_norm, (x, b["weight"], b["bias"], x.shape[0], x.shape[1],
                                     math.prod(x.shape[2:]), b["group"], b["eps"]), {})


@replays(*_packets("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                   "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                   "_scaled_dot_product_attention_math"))
def _attention(b: dict) -> tuple:
    """Fused attention kernels are device-specific: run the device's own through the public function."""
    mask = b.get("attn_mask", b.get("attn_bias"))
    return (F.scaled_dot_product_attention, (b["query"], b["key"], b["value"]),
            {"attn_mask": mask, "is_causal": bool(b.get("is_causal") or False), "scale": b.get("scale")})


def _is_dropout(name: str) -> bool:
    return "dropout" in name


# ---- which ops, and their signatures ------------------------------------------------------------
def timed_ops(a: ChannelAnalysis) -> list[TimedOp]:
    """The ops of the inference network, each with its latency form and signature."""
    graph = a.graph
    ops = []
    for call in a.layer_calls:
        if not graph.training_only(graph.nodes[call.node].module):
            ops.append(_layer_op(a, call))
    products = set()
    for prod in a.products:
        products.add(prod.node)
        if graph.training_only(prod.module):
            continue
        uses = [] if prod.ids is None or not _prunable(a, prod.ids) else [(prod.ids, 1.0)]
        ops.append(_replayed_op(a, "product", prod.node, prod.module, uses))
    for op in a.data_ops:
        module_type = graph.module_types.get(op.module)
        if op.node in products or graph.training_only(op.module) or _is_dropout(op.name) or (
                module_type is not None and _dropout_module(module_type)):
            continue
        uses = [(u.ids, u.numel) if u.ids is not None else (None, u.numel) for u in op.uses]
        if not any(ids is not None and _prunable(a, ids) for ids, _ in uses):
            uses = []
        ops.append(_replayed_op(a, "data", op.node, op.module, uses))
    return ops


def _dropout_module(module_type: type) -> bool:
    """Dropout and stochastic depth are identities at inference: they take no time."""
    return any(k.__name__.endswith(("Dropout", "DropoutNd", "StochasticDepth", "DropPath")) for k in module_type.__mro__)


def _prunable(a: ChannelAnalysis, ids: np.ndarray) -> bool:
    return bool(len(ids)) and not bool(a.fixed_group[a.group_of[ids]].all())


def _layer_op(a: ChannelAnalysis, call: LayerCall) -> TimedOp:
    node = a.graph.nodes[call.node]
    var_in, var_out = _prunable(a, call.in_ids), _prunable(a, call.out_ids)
    n_in, n_out = len(call.in_ids), len(call.out_ids)
    if call.kind == "conv":
        b = bind(node)
        x = a.graph.values[b["input"].index]
        weight = a.graph.values[b["weight"].index].shape
        mode = (f"depthwise x{n_out // max(n_in, 1)}" if call.depthwise else
                f"groups {call.groups}" if call.groups > 1 else "dense")
        head = ("conv", tuple(weight[2:]), tuple(b["stride"]), tuple(b["padding"]), tuple(b["dilation"]),
                bool(b["transposed"]), tuple(b["output_padding"]), mode, x.shape[0] / a.graph.batch_size,
                tuple(x.shape[2:]), b["bias"] is not None)
    else:
        packet = node.op.overloadpacket
        head = ("linear", call.in_numel, packet in (aten.addmm, aten.baddbmm))
    if call.depthwise:
        var_in = var_out = var_in or var_out
    tags = ("in", "var" if var_in else n_in, "out", "var" if var_out else n_out)
    signature = repr(head + tags)
    op = TimedOp(call.kind, "constant", signature, call.module, call.node, call=call, extent=(n_in, n_out))
    if call.depthwise and var_out:
        op.form, op.uses, op.z = "linear", [(call.out_ids, 1.0)], call.in_ids
    elif var_in and var_out:
        op.form = "bilinear"
    elif var_in or var_out:
        op.form, op.uses = "linear", [(call.in_ids if var_in else call.out_ids, 1.0)]
    return op


def _replayed_op(a: ChannelAnalysis, kind: str, node_index: int, module: str,
                 uses: list[tuple[np.ndarray | None, float]]) -> TimedOp:
    node = a.graph.nodes[node_index]
    form = "linear" if uses else "constant"
    if isinstance(node.op, LeafOp):
        return TimedOp(kind, form, repr(("module", str(node.op))), module, node_index, uses=uses)
    named = bind(node)
    derived = DERIVED.get(node.op.overloadpacket, ())
    mask = _prunable_dims(a, node_index)
    parts: list[Any] = [node.name]
    for name, value in named.items():
        if name in derived:
            continue
        leaves, spec = pytree.tree_flatten(value)
        parts.append((name, str(spec) if len(leaves) > 1 else "",
                      tuple(_tensor_token(a, leaf.index, mask) if isinstance(leaf, ValueRef) else repr(leaf)
                            for leaf in leaves)))
    return TimedOp(kind, form, repr(tuple(parts)), module, node_index, uses=uses)


def _prunable_dims(a: ChannelAnalysis, node_index: int) -> dict[int, set[int]]:
    """Value -> its dims that carry prunable channels (scaled on replay), for the values ``node`` reads."""
    node = a.graph.nodes[node_index]
    dims: dict[int, set[int]] = {}
    for v in node.tensor_inputs():
        dims[v] = {d for d, ids in _channel_dims(a, v).items() if _prunable(a, ids)}
    return dims


def _channel_dims(a: ChannelAnalysis, v: int) -> dict[int, np.ndarray]:
    """The dims of value ``v`` that carry channel elements: an activation's channel dim, a
    parameter's or buffer's aligned dims."""
    value = a.graph.values[v]
    if value.state_name is not None:
        out = {}
        for d, size in enumerate(value.shape):
            ids = a.alignments.get((value.state_name, d))
            if ids is not None and len(ids) == size:
                out[d] = ids
        return out
    chan = a.value_chans.get(v)
    return {chan.dim: chan.ids} if chan is not None else {}


def _tensor_token(a: ChannelAnalysis, v: int, mask: dict[int, set[int]]) -> tuple:
    value = a.graph.values[v]
    dims = []
    for d, size in enumerate(value.shape):
        if d in mask.get(v, ()):
            dims.append("c")
        elif d == 0 and value.state_name is None:
            dims.append(f"b{size / a.graph.batch_size:g}")
        else:
            dims.append(size)
    return (tuple(dims), str(value.dtype).removeprefix("torch."), "state" if value.state_name else "")


# ---- building the calls to time -------------------------------------------------------------
def _fill(shape, dtype: torch.dtype, setting: Setting, is_float: bool, channels_last: bool = False) -> torch.Tensor:
    """A tensor to time with: floats in [0.5, 1.5) (no NaN from a square root of a variance), integers 0
    (valid indices), on the setting's device."""
    if is_float:
        t = torch.rand(shape, dtype=setting.dtype, device=setting.device) + 0.5
    else:
        t = torch.zeros(shape, dtype=dtype, device=setting.device)
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def _scale_batch(size: int, a: ChannelAnalysis, setting: Setting) -> int:
    gb = a.graph.batch_size
    return size * setting.batch_size // gb if size % gb == 0 else size


def layer_case_call(a: ChannelAnalysis, op: TimedOp, setting: Setting, a_in: int, a_out: int) -> Callable:
    """The conv / linear call of ``op`` with ``a_in`` input and ``a_out`` output channels, tensors allocated."""
    call = op.call
    node = a.graph.nodes[call.node]
    if call.kind == "linear":
        rows = max(1, round(call.in_numel * setting.batch_size))
        x = _fill((rows, a_in), torch.float32, setting, True)
        w = _fill((a_out, a_in), torch.float32, setting, True)
        if node.op.overloadpacket in (aten.addmm, aten.baddbmm):
            bias = _fill((a_out,), torch.float32, setting, True)
            return lambda: torch.addmm(bias, x, w.t())
        return lambda: torch.mm(x, w.t())
    b = bind(node)
    shape = a.graph.values[b["input"].index].shape
    weight = a.graph.values[b["weight"].index].shape
    transposed = bool(b["transposed"])
    groups = a_in if call.depthwise else call.groups
    per_group_in, per_group_out = a_in // groups, a_out // groups
    w_shape = (a_in, per_group_out, *weight[2:]) if transposed else (a_out, per_group_in, *weight[2:])
    x = _fill((_scale_batch(shape[0], a, setting), a_in, *shape[2:]), torch.float32, setting, True,
              setting.channels_last)
    w = _fill(w_shape, torch.float32, setting, True, setting.channels_last)
    bias = _fill((a_out,), torch.float32, setting, True) if b["bias"] is not None else None
    args = (list(b["stride"]), list(b["padding"]), list(b["dilation"]), transposed, list(b["output_padding"]), groups)
    return lambda: aten.convolution(x, w, bias, *args)


def layer_widths(op: TimedOp, a_in: int, a_out: int) -> tuple[int, int]:
    """(A_in, A_out) of a conv / linear timed at the grid point: a depthwise conv keeps its multiplier."""
    if op.call.depthwise:
        mult = max(1, len(op.call.out_ids) // max(1, len(op.call.in_ids)))
        return max(1, a_out // mult), max(1, a_out // mult) * mult
    return a_in, a_out


def group_mask(a: ChannelAnalysis, op: TimedOp, fraction: float) -> np.ndarray:
    """Alive groups with ``fraction`` of the op's prunable channels kept: in every channel array the
    op reads, a group's rank within the first array that holds it decides (rank / size < fraction),
    so every array keeps at least one channel; fixed groups stay alive."""
    alive = np.ones(a.num_groups, dtype=bool)
    if fraction >= 1.0:
        return alive
    node = a.graph.nodes[op.node]
    seen: set[int] = set()
    arrays = [ids for v in node.tensor_inputs() + [o for o in node.outputs if o is not None]
              for ids in _channel_dims(a, v).values()] + [ids for ids, _ in op.uses if ids is not None]
    for ids in arrays:
        groups = [g for g in dict.fromkeys(int(g) for g in a.group_of[ids]) if not a.fixed_group[g]]
        for rank, g in enumerate(groups):
            if g not in seen:
                seen.add(g)
                alive[g] = rank / len(groups) < fraction
    return alive


def moved(a: ChannelAnalysis, op: TimedOp, alive: np.ndarray) -> float:
    """x of ``op`` under the alive groups: ``sum_u w_u A(u)``, with ``A`` counting alive channels."""
    return float(sum(w * (alive[a.group_of[ids]].sum() if ids is not None else 1.0) for ids, w in op.uses))


def replay_call(a: ChannelAnalysis, op: TimedOp, setting: Setting, alive: np.ndarray) -> Callable:
    """The recorded op on fresh tensors with the ``alive`` groups' channels, at the setting's batch."""
    node = a.graph.nodes[op.node]
    if isinstance(node.op, LeafOp):
        raise NotImplementedError(f"{node.op} is recorded as one module call; it is not replayed")

    def tensor(ref: ValueRef) -> torch.Tensor:
        value = a.graph.values[ref.index]
        shape = list(value.shape)
        dims = _channel_dims(a, ref.index)
        for d, ids in dims.items():
            shape[d] = int(alive[a.group_of[ids]].sum())
        if value.state_name is None and shape:
            shape[0] = _scale_batch(shape[0], a, setting)
        is_float = value.dtype.is_floating_point
        return _fill(shape, value.dtype, setting, is_float, setting.channels_last and value.state_name is None)

    args, kwargs = pytree.tree_map_only(ValueRef, tensor, (node.args, node.kwargs))
    packet = node.op.overloadpacket
    if packet in REPLAYS:
        named = {}
        for i, arg in enumerate(node.op._schema.arguments):
            if i < len(args) and not arg.kwarg_only:
                named[arg.name] = args[i]
            else:
                named[arg.name] = kwargs.get(arg.name, arg.default_value if arg.has_default_value() else None)
        fn, args, kwargs = REPLAYS[packet](named)
    else:
        fn = node.op
    return lambda: fn(*args, **kwargs)
