"""Layers: convolutions, linear layers (products with a parameter), and opaque products."""

from __future__ import annotations

import numpy as np

from morphnet.channels.walker import (
    Chan,
    LayerCall,
    StateView,
    Walker,
    WeightInfo,
    bind,
    vid,
)
from morphnet.channels.handlers.attention import activation_bmm
from morphnet.channels.handlers.registry import (
    _io,
    _ops,
    _owner,
    _record_data,
    aten,
    handles,
)


def _per_channel(w: Walker, v: int, dim: int) -> float:
    """Elements of value ``v`` per example and per index of ``dim``: the spatial positions of a conv
    input, the tokens of a linear one. Defined for a layer pruned to zero channels too (a block
    whose attention heads were all removed), where dividing the size by the width is not."""
    shape = list(w.shape(v))
    del shape[dim]
    return float(np.prod(shape, dtype=np.float64)) / w.graph.batch_size


def _identity_view(sv: StateView | None, rank: int) -> bool:
    return sv is not None and sv.dims == tuple(range(rank))


@handles(aten.convolution, *_ops("_convolution", "convolution_overrideable"))
def convolution(w: Walker, node) -> None:
    """Conv / transposed conv of any rank, groups, stride, dilation and padding."""
    b = bind(node)
    x, wt, bias, out = vid(b["input"]), vid(b["weight"]), vid(b.get("bias")), node.outputs[0]
    transposed, g = bool(b["transposed"]), int(b["groups"])
    wshape = w.shape(wt)
    sv = w.state_view(wt)
    in_ch, out_ch = w.shape(x)[1], w.shape(out)[1]
    kernel = int(np.prod(wshape[2:], dtype=np.int64))
    in_ids = w.need_chan(x, 1)
    depthwise = g > 1 and g == in_ch
    if not _identity_view(sv, len(wshape)):  # a computed weight (weight norm, standardization)
        w.fix(x)
        w.make_opaque(wt)
        out_ids = w.elements.new(out_ch, fixed=True)
        weight_name = None
        source = [n for n in w.states_in(wt) if w.graph.state_shapes.get(n) == tuple(wshape)]
        if len(source) == 1 and source[0] not in w.weights:  # counted in model size, never pruned
            w.weights[source[0]] = WeightInfo(_owner(source[0]), source[0], 1 if transposed else 0, out_ids,
                                              w.need_chan(x, 1), kernel, g, depthwise)
    else:
        weight_name = sv.name
        if depthwise:
            mult = out_ch // in_ch
            if transposed:
                w.align(weight_name, 0, in_ids)
                if mult == 1:
                    out_ids = in_ids
                else:
                    out_ids = w.elements.new(out_ch, fixed=True)
                    w.elements.fix(in_ids)
            else:
                out_ids = w.slot(weight_name, 0)
                w.elements.union(np.repeat(in_ids, mult), out_ids)
        elif not transposed:
            out_ids = w.slot(weight_name, 0)
            per_in = w.slot(weight_name, 1)
            w.elements.union(in_ids, np.tile(per_in, g))
            if g > 1:  # keep every group equally wide: position j is pruned in all groups at once
                per_out = out_ch // g
                w.elements.union(out_ids, np.tile(out_ids[:per_out], g))
        else:
            w.elements.union(in_ids, w.slot(weight_name, 0))
            if g > 1:
                per_in = in_ch // g
                w.elements.union(in_ids, np.tile(in_ids[:per_in], g))
            out_ids = np.tile(w.slot(weight_name, 1), g)
        owner = _owner(weight_name)
        out_dim = 1 if transposed and not depthwise else 0
        if weight_name not in w.weights:
            w.weights[weight_name] = WeightInfo(owner, weight_name, out_dim, out_ids, in_ids, kernel, g, depthwise)
        w.module_out.setdefault(owner, out_ids)
    bias_aligned = w.align_value(bias, out_ids)
    if weight_name and (bias is None or bias_aligned):  # zero rows (and bias) give zero output channels
        w.zero_point(weight_name, out)
        if bias is not None:
            w.biases[weight_name] = w.state_view(bias).name
    w.set_chan(out, Chan(1, out_ids))
    spatial_shape = (w.shape(x) if transposed else w.shape(out))[2:]
    area = float(np.prod(spatial_shape, dtype=np.float64))
    n = w.graph.batch_size
    w.layer_calls.append(LayerCall(
        module=_owner(weight_name) if weight_name else node.module, weight=weight_name or "",
        kind="conv", in_ids=in_ids, out_ids=out_ids, groups=g, depthwise=depthwise,
        flop_coef=2.0 * area * kernel * w.shape(x)[0] / n, kernel=kernel,
        in_numel=_per_channel(w, x, 1), out_numel=_per_channel(w, out, 1), node=node.index))


def _linear(w: Walker, node, x: int, wt: int, bias: int | None, out: int, weight_first: bool) -> None:
    """``x @ W`` (or ``W @ x`` when ``weight_first``) with W a view of a 2-D parameter, or of a contiguous
    part of one (``F.linear(q, w.chunk(3)[0])``: those rows of the parameter).

    W may carry broadcast batch dims (an expanded weight in a batched matmul); x is
    [..., M, K] (or [..., K, N]). Tokens (all of x's other dims) multiply the FLOPs.
    """
    sv, starts = w.part_view(wt)
    rank = len(w.shape(x))
    c_in_dim, c_out_dim = (len(sv.dims) - 1, len(sv.dims) - 2) if weight_first else (len(sv.dims) - 2,
                                                                                     len(sv.dims) - 1)
    in_state, out_state = sv.dims[c_in_dim], sv.dims[c_out_dim]
    slot_in, slot_out = w.part_slot(wt, c_in_dim), w.part_slot(wt, c_out_dim)
    x_contract = rank - 2 if weight_first else rank - 1
    out_dim = rank - 2 if weight_first else rank - 1
    c = w.chan(x)
    if c is not None and c.dim == x_contract:
        w.elements.union(slot_in, c.ids)
        out_chan = Chan(out_dim, slot_out)
    elif c is not None:  # channels ride along another dim; this layer's own widths stay fixed
        w.elements.fix(slot_in)
        w.elements.fix(slot_out)
        out_chan = Chan(c.dim, c.ids)
    else:
        w.elements.fix(slot_in)
        out_chan = Chan(out_dim, slot_out)
    bias_name = None
    if bias is not None:
        bview = w.part_view(bias)
        bshape = w.shape(bias)
        if bview is not None and bshape and bshape[-1] == len(slot_out) and bview[0].dims[-1] is not None:
            w.elements.union(w.part_slot(bias, len(bshape) - 1), slot_out)
            bias_name = bview[0].name
        elif bias in w.joined and bshape == (len(slot_out),) and not starts and not weight_first:
            for name, start in w.joined[bias]:  # EVA's torch.cat((q_bias, k_bias, v_bias)): each part, its rows
                w.elements.union(w.slot(name, 0), slot_out[start:start + w.graph.state_shapes[name][0]])
            bias_name = list(w.joined[bias])
        elif bshape and bshape[-1] != 1:
            w.elements.fix(slot_out)
            w.make_opaque(bias)
    if out_chan.ids is slot_out and (bias is None or bias_name is not None):
        w.zero_point(sv.name, out)  # zero rows (and bias) give zero output features
        if bias_name is not None:
            w.biases[sv.name] = bias_name
    w.set_chan(out, out_chan)
    owner = _owner(sv.name)
    if sv.name not in w.weights:  # all of the parameter (its parts are read by several calls)
        w.weights[sv.name] = WeightInfo(owner, sv.name, out_state, w.slot(sv.name, out_state),
                                        w.slot(sv.name, in_state), 1, 1, False)
    w.module_out.setdefault(owner, w.weights[sv.name].out_ids)
    tokens = _per_channel(w, x, x_contract)
    w.layer_calls.append(LayerCall(
        module=owner, weight=sv.name, kind="linear", in_ids=slot_in, out_ids=slot_out, groups=1,
        depthwise=False, flop_coef=2.0 * tokens, kernel=1, in_numel=tokens, out_numel=tokens, node=node.index))


def _weight_view(w: Walker, v: int, rank: int) -> bool:
    """A view of a 2-D parameter, or of a part of one, with its two dims last (batch dims broadcast):
    a linear weight."""
    view = w.part_view(v)
    sv = view[0] if view is not None else None
    return (sv is not None and sv.name in w.graph.parameters and len(sv.dims) == rank and rank >= 2
            and sv.dims[-1] is not None and sv.dims[-2] is not None and all(d is None for d in sv.dims[:-2])
            and len(w.graph.state_shapes[sv.name]) == 2)


def _not_weight(w: Walker, v: int) -> bool:
    view = w.part_view(v)
    return view is None or view[0].name not in w.graph.parameters


@handles(aten.mm, aten.addmm, aten.bmm, aten.baddbmm, *_ops("matmul", "linear"))
def matmul(w: Walker, node) -> None:
    """A product with a parameter matrix is a linear layer; between activations it is opaque."""
    b = bind(node)
    if "mat1" in b or "batch1" in b:
        a, m = vid(b.get("mat1", b.get("batch1"))), vid(b.get("mat2", b.get("batch2")))
        bias = vid(b["self"])
    else:
        a, m, bias = vid(b.get("self", b.get("input"))), vid(b.get("mat2", b.get("weight"))), None
    out = node.outputs[0]
    ra, rm = len(w.shape(a)), len(w.shape(m))
    if ra == rm:
        if _weight_view(w, m, rm) and _not_weight(w, a):
            _linear(w, node, a, m, bias, out, weight_first=False)
            return
        if _weight_view(w, a, ra) and _not_weight(w, m):
            _linear(w, node, m, a, bias, out, weight_first=True)
            return
        if ra == 3 and node.op.overloadpacket in (aten.bmm, aten.baddbmm) and _not_weight(w, a) and _not_weight(w, m):
            activation_bmm(w, node, a, m, bias)
            return
    opaque(w, node)


@handles(*_ops("scaled_dot_product_attention", "_scaled_dot_product_attention_math",
               "einsum", "dot", "vdot", "outer", "mv"))
def opaque(w: Walker, node) -> None:
    """Products between activations (attention): the contracted and produced dims keep their width."""
    for v in node.tensor_inputs():
        w.fix(v)
    for o in node.outputs:
        w.derive(o, *node.tensor_inputs())
    _record_data(w, node, _io(node))


@handles(*_ops("embedding"))
def embedding(w: Walker, node) -> None:
    """A lookup table ``weight[indices]``: the output's last dim is the table's dim 1, entry by entry, so
    it carries the table's column channels (a transformer's token embedding starts its residual width).
    A table that is not a plain parameter (computed, or a view that moves dim 1) gives no channels."""
    b = bind(node)
    wt, idx, out = vid(b["weight"]), vid(b["indices"]), node.outputs[0]
    if w.chan(wt) is not None or w.chan(idx) is not None:
        raise w.unsupported("the lookup table or the indices carry prunable channels")
    sv = w.state_view(wt)
    if sv is not None and len(w.shape(wt)) == 2 and sv.dims[1] is not None and len(w.shape(out)) >= 1:
        w.set_chan(out, Chan(len(w.shape(out)) - 1, w.slot(sv.name, sv.dims[1])))
    w.derive(out, wt)
