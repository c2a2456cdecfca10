"""Element-wise ops (broadcasting), dropout, *_like and factory ops."""

from __future__ import annotations

import torch

from morphnet.channels.walker import Chan, Walker, bind, vid
from morphnet.channels.handlers.registry import (
    HANDLERS,
    _io,
    _ops,
    _record_data,
    aten,
    handles,
)


def _pointwise_core(w: Walker, node, inputs: list[int], out: int | None) -> None:
    if out is None:
        return
    rank = len(w.shape(out))
    out_shape = w.shape(out)
    chans = []
    for v in inputs:
        c = w.chan(v)
        if c is None:
            continue
        p = c.dim + rank - len(w.shape(v))
        if len(c.ids) != out_shape[p]:  # one channel broadcast over many: it must stay
            w.fix(v)
            continue
        chans.append((v, p, c))
    positions = {p for _, p, _ in chans}
    if len(positions) > 1:
        for v, _, _ in chans:
            w.fix(v)
        for v in inputs:
            w.make_opaque(v)
        return
    if not chans:
        w.derive(out, *inputs)
        return
    p = positions.pop()
    main = chans[0][2].ids
    for _, _, c in chans[1:]:
        if c.ids is not main:
            w.elements.union(main, c.ids)
    for v in inputs:
        if w.chan(v) is not None:
            continue
        shape = w.shape(v)
        q = p - (rank - len(shape))
        if q < 0 or shape[q] == 1:
            continue
        sv = w.state_view(v)
        if sv is not None and sv.dims[q] is not None:
            w.align(sv.name, sv.dims[q], main)
        elif v in w.parts and w.parts[v][0].dims[q] is not None:  # a part of a bias (``b.chunk(3)``)
            w.elements.union(w.part_slot(v, q), main)
        elif v in w.joined:  # a joined bias (``torch.cat((q_bias, k_bias, v_bias))``): each part, its entries
            for name, start in w.joined[v]:
                w.elements.union(w.slot(name, 0), main[start:start + w.graph.state_shapes[name][0]])
        else:  # a computed tensor as wide as the channels: its width cannot follow pruning
            w.elements.fix(main)
            w.make_opaque(v)
    w.set_chan(out, Chan(p, main))


def _is_pointwise(op) -> bool:
    return torch.Tag.pointwise in getattr(op, "tags", ())


_COPIES = tuple(getattr(aten, n) for n in ("clone", "contiguous", "_to_copy") if hasattr(aten, n))


def pointwise(w: Walker, node) -> None:
    """Element-wise op with broadcasting: equal channel dims are tied, size-1 dims couple nothing."""
    _pointwise_core(w, node, node.tensor_inputs(), node.outputs[0] if node.outputs else None)
    _record_data(w, node, _io(node))
    if node.op.overloadpacket in _COPIES and node.outputs and len(node.tensor_inputs()) == 1:
        x = node.tensor_inputs()[0]
        sv = w.state_view(x)  # a copy of model state still follows its dims
        if sv is not None:
            w.state_views[node.outputs[0]] = sv
        elif x in w.parts:
            w.carry_part(x, node.outputs[0], w.parts[x][0].dims)


handles(*_ops("hardswish", "hardswish_", "hardsigmoid_", "relu6", "mish", "mish_", "glu", "_to_copy",
              "clone", "contiguous", "copy", "lerp", "lerp_", "addcmul", "addcdiv", "silu", "gelu_",
              "threshold", "threshold_", "logit", "nan_to_num", "native_dropout", "dropout",
              "feature_dropout", "alpha_dropout", "bernoulli", "clamp", "clamp_"))(pointwise)


@handles(*_ops("native_dropout"))
def dropout(w: Walker, node) -> None:
    x = node.tensor_inputs()[0]
    for o in node.outputs:
        if o is not None:
            w.set_chan(o, w.chan(x))
    _record_data(w, node, _io(node))


@handles(*_ops("empty_like", "zeros_like", "ones_like", "rand_like", "randn_like", "full_like",
               "randint_like", "bernoulli_", "normal_", "uniform_", "fill_", "zero_", "random_",
               "exponential_", "detach", "alias", "lift_fresh", "detach_"))
def same_layout(w: Walker, node) -> None:
    """Output has the layout (and channels) of the first input: *_like, in-place fills, aliases."""
    x = node.tensor_inputs()[0]
    out = node.outputs[0]
    w.set_chan(out, w.chan(x))
    sv = w.state_view(x)
    if sv is not None and node.op.overloadpacket in (aten.detach, aten.alias, aten.lift_fresh):
        w.state_views[out] = sv
    elif node.op.overloadpacket not in (aten.empty_like, aten.zeros_like, aten.ones_like):
        w.derive(out, x)


@handles(*_ops("copy_"))
def copy_(w: Walker, node) -> None:
    b = bind(node)
    dst, src = vid(b["self"]), vid(b["src"])
    out = node.outputs[0]
    if w.shape(dst) == w.shape(src):
        if w.chan(dst) is not None and w.chan(src) is not None:
            _pointwise_core(w, node, [dst, src], out)
        else:
            w.set_chan(out, w.chan(src) or w.chan(dst))
            if w.chan(src) is None and w.chan(dst) is not None:
                w.fix(dst)
    else:
        _pointwise_core(w, node, [dst, src], out)
    _record_data(w, node, _io(node))


@handles(*_ops("empty", "zeros", "ones", "full", "arange", "new_zeros", "new_empty", "new_ones", "new_full",
               "scalar_tensor", "rand", "randn", "randint", "eye", "linspace", "empty_strided",
               "lift_fresh_copy", "_local_scalar_dense", "sym_size", "sym_numel", "sym_stride", "randperm"))
def creation(w: Walker, node) -> None:
    """Factories: fresh tensors without channels (their sizes come from code, not from layers)."""


def register_pointwise_tagged() -> None:
    """Every remaining aten overload tagged pointwise gets the element-wise handler (run last)."""
    for name in dir(aten):
        packet = getattr(aten, name, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket) or packet in HANDLERS:
            continue
        try:
            overloads = [getattr(packet, o) for o in packet.overloads()]
        except Exception:  # some packets cannot list overloads in this build
            continue
        for op in overloads:
            if _is_pointwise(op) and op not in HANDLERS:
                HANDLERS[op] = pointwise

