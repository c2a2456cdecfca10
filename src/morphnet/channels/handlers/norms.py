"""Normalization: BatchNorm (the gamma source), LayerNorm, GroupNorm, InstanceNorm."""

from __future__ import annotations

import torch

from morphnet.channels.analysis import Chan, Walker, bind, vid
from morphnet.channels.handlers.registry import (
    _ops,
    _owner,
    _record_data,
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
        if w.prune_normalized:  # asked for: prunable, but the statistics change (not exact)
            w.normalized.append(c.ids)
        else:
            w.elements.fix(c.ids)
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
