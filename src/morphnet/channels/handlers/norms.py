"""Normalization: BatchNorm (the gamma source), LayerNorm / RMSNorm (fused, or RMSNorm written out in
Python as Hugging Face's Llama does), GroupNorm, InstanceNorm."""

from __future__ import annotations

import torch

import numpy as np

from morphnet.capture.graph import LeafOp
from morphnet.channels.walker import Chan, Walker, bind, vid
from morphnet.channels.handlers.registry import (
    _ops,
    _owner,
    _record_data,
    aten,
    handles,
    handles_module,
)


@handles(*_ops("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
               "_native_batch_norm_legit_functional", "_batch_norm_with_update", "_batch_norm_no_update",
               "cudnn_batch_norm", "miopen_batch_norm", "batch_norm"))
def batch_norm(w: Walker, node) -> None:
    """Per-channel statistics: channels pass through; the scale (gamma) is a MorphNet source."""
    b = bind(node)
    x = vid(b["input"])
    computed = w.chan(x) is None and bool(w.states_in(x))  # e.g. weight standardization of a conv weight
    ids = w.need_chan(x, 1) if len(w.shape(x)) > 1 else w.need_chan(x, 0)
    if computed:
        w.derive(node.outputs[0], x)
    for key in ("weight", "bias", "running_mean", "running_var"):
        v = vid(b.get(key))
        if w.align_value(v, ids) and key == "weight":
            name = w.state_view(v).name
            if name in w.gamma:
                w.elements.union(w.gamma[name], ids)
            else:
                w.gamma[name] = ids
            w.module_out.setdefault(_owner(name), ids)
    outs = [o for o in node.outputs if o is not None]
    weight = w.state_view(vid(b.get("weight")))
    if weight is not None:  # gamma (and beta) zero: this output is zero, not its input
        w.zero_point(weight.name, outs[0])
    w.set_chan(outs[0], Chan(w.chan(x).dim, ids))
    for o in outs[1:]:
        if w.shape(o) == (len(ids),):
            w.set_chan(o, Chan(0, ids))
    _record_data(w, node, [x, outs[0]])


@handles(*_ops("native_layer_norm", "layer_norm", "_fused_rms_norm", "rms_norm"))
def layer_norm(w: Walker, node) -> None:
    """Statistics across the normalized dims: channels among them keep their width."""
    b = bind(node)
    x = vid(b["input"])
    rank = len(w.shape(x))
    k = len(b["normalized_shape"])
    c = w.chan(x)
    norm_dims = range(rank - k, rank)
    if c is not None and c.dim in norm_dims:
        normalized(w, c.ids)
    for key in ("weight", "bias"):
        v = vid(b.get(key))
        sv = w.state_view(v)
        if v is None:
            continue
        if c is not None and c.dim in norm_dims and sv is not None and sv.dims[c.dim - (rank - k)] is not None:
            w.align(sv.name, sv.dims[c.dim - (rank - k)], c.ids)
        else:
            w.make_opaque(v)
    outs = [o for o in node.outputs if o is not None]
    w.set_chan(outs[0], c)
    _record_data(w, node, [x, outs[0]])


def normalized(w: Walker, ids: np.ndarray) -> None:
    """Channels normalized together: fixed, or with ``prune_normalized`` prunable (the statistics change,
    so the rebuild is not exact and says so)."""
    if w.prune_normalized:
        w.normalized.append(ids)
    else:
        w.elements.fix(ids)


_COPY_OPS = (aten._to_copy.default, aten.clone.default)
_ADD_OPS = (aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor, aten.add_.Scalar)  # + eps (torch's own RMSNorm: add_)


def _op(w: Walker, node_index: int | None):
    if node_index is None:
        return None
    op = w.graph.nodes[node_index].op
    return None if isinstance(op, LeafOp) else op


def _only_consumer(w: Walker, v: int):
    """The node that alone reads ``v`` (None when several do, or ``v`` is an output of the model)."""
    users = set(w.consumers(v))
    if len(users) != 1 or v in w.graph.outputs:
        return None
    return w.graph.nodes[users.pop()]


def _uncopied(w: Walker, v: int) -> int:
    """``v`` before dtype conversions and copies (``hidden.to(float32)``): the same entries and channels."""
    while True:
        producer = w.graph.values[v].producer
        if _op(w, producer) not in _COPY_OPS:
            return v
        inputs = w.graph.nodes[producer].tensor_inputs()
        if len(inputs) != 1 or w.graph.values[inputs[0]].shape != w.graph.values[v].shape:
            return v
        v = inputs[0]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def decomposed_rms_norm(w: Walker, node) -> bool:
    """Whether ``node``, a reduction over the channel dim, is the statistic of an RMSNorm written out in
    Python (Hugging Face's LlamaRMSNorm / T5LayerNorm, Mistral's, Qwen2's; ``nn.RMSNorm`` over one dim, which
    the CPU dispatcher decomposes so):
    ``x * rsqrt(mean(x ** 2 or x * x, channel dim, keepdim=True) + eps)``.

    Only that exact chain counts: the square read only by the mean, over the channel dim alone,
    keepdim; the mean read only by ``+ eps`` (a number), that only by ``rsqrt``, and that only by one
    product with ``x`` itself (or ``x`` before a dtype copy) of ``x``'s shape. Then the channels are
    normalized together, as by the fused ``rms_norm``, and the caller records them with
    ``normalized``. A per-channel weight that scales the result afterwards is an ordinary
    element-wise product (aligned with the channels). Anything else (another reduction, the
    statistic read elsewhere, a sum) is not recognized: the reduction keeps its channels fixed."""
    if node.op is not aten.mean.dim:
        return False
    b = bind(node)
    sq = vid(b["self"])
    c = w.chan(sq)
    rank = len(w.shape(sq))
    dims = b.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if c is None or [d % rank for d in dims] != [c.dim] or not b.get("keepdim") or \
            b.get("dtype") not in (None, torch.float32, torch.float64) or len(node.outputs) != 1:
        return False
    square = w.graph.values[sq].producer
    op = _op(w, square)
    reader = _only_consumer(w, sq)
    if op is None or reader is None or reader.index != node.index:
        return False
    sb = bind(w.graph.nodes[square])
    if op is aten.pow.Tensor_Scalar and sb.get("exponent") == 2:
        x = vid(sb["self"])
    elif op is aten.mul.Tensor and vid(sb["self"]) is not None and vid(sb["self"]) == vid(sb["other"]):
        x = vid(sb["self"])
    else:
        return False
    xc = w.chan(x)
    if x is None or xc is None or xc.dim != c.dim or not np.array_equal(xc.ids, c.ids):
        return False
    plus = _only_consumer(w, node.outputs[0])  # mean + eps
    if plus is None or plus.op not in _ADD_OPS:
        return False
    pb = bind(plus)
    if vid(pb["self"]) != node.outputs[0] or not _number(pb["other"]) or not _number(pb.get("alpha", 1)):
        return False
    root = _only_consumer(w, plus.outputs[0])
    if root is None or root.op is not aten.rsqrt.default:
        return False
    scale = _only_consumer(w, root.outputs[0])
    if scale is None or scale.op is not aten.mul.Tensor:
        return False
    mb = bind(scale)
    operands = [vid(mb["self"]), vid(mb["other"])]
    if root.outputs[0] not in operands or operands[0] == operands[1]:
        return False
    y = operands[1 - operands.index(root.outputs[0])]
    return y is not None and _uncopied(w, y) == _uncopied(w, x) and w.shape(y) == w.shape(x) == \
        w.shape(scale.outputs[0])


@handles(*_ops("native_group_norm", "group_norm"))
def group_norm(w: Walker, node) -> None:
    """GroupNorm: channels of one group are tied, so whole groups are pruned (exact)."""
    b = bind(node)
    x = vid(b["input"])
    ids = w.need_chan(x, 1)
    groups = int(b.get("group", b.get("num_groups")))
    per = len(ids) // groups
    for g in range(groups):
        w.elements.union_all(ids[g * per:(g + 1) * per])
    for key in ("weight", "bias"):
        w.align_value(vid(b.get(key)), ids)
    outs = [o for o in node.outputs if o is not None]
    w.set_chan(outs[0], Chan(1, ids))
    _record_data(w, node, [x, outs[0]])


@handles_module(torch.nn.modules.instancenorm._InstanceNorm)
def instance_norm(w: Walker, node) -> None:
    """InstanceNorm: statistics per sample and channel, so channels pass through."""
    x = node.tensor_inputs()[0]
    module = node.kwargs["module"]
    ids = w.need_chan(x, 1 if len(w.shape(x)) > 2 else 0)
    for key in ("weight", "bias", "running_mean", "running_var"):
        name = f"{module}.{key}" if module else key
        if name in w.graph.state_shapes:
            w.align(name, 0, ids)
    out = node.outputs[0]
    w.set_chan(out, Chan(w.chan(x).dim, ids))
    _record_data(w, node, [x, out])
