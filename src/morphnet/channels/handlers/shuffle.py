"""Ops that move entries between the channel dim and others: pixel (un)shuffle, channel shuffle."""

from __future__ import annotations

import numpy as np

from morphnet.channels.walker import Chan, Walker, bind
from morphnet.channels.handlers.registry import _io, _ops, _record_data, handles


def _channel_ids(w: Walker, node) -> tuple[int, np.ndarray | None]:
    """The input and its channel ids along dim -3 (pixel shuffles act on (..., C, H, W)), or None."""
    x = node.tensor_inputs()[0]
    c = w.chan(x)
    dim = len(w.shape(x)) - 3
    if c is not None and c.dim != dim:
        if c.dim >= dim + 1:  # the channels ride on H or W, which the op rearranges
            w.fix(x)
        return x, None
    return x, None if c is None else c.ids


@handles(*_ops("pixel_shuffle"))
def pixel_shuffle(w: Walker, node) -> None:
    """(C r^2, H, W) -> (C, H r, W r): output channel c is input channels c r^2 ... c r^2 + r^2 - 1, so each
    block of r^2 input channels is pruned whole (exact)."""
    x, ids = _channel_ids(w, node)
    out = node.outputs[0]
    c = w.chan(x)
    if ids is not None:
        r2 = int(bind(node)["upscale_factor"]) ** 2
        blocks = ids.reshape(-1, r2)
        for block in blocks:
            w.elements.union_all(block)
        w.set_chan(out, Chan(c.dim, blocks[:, 0].copy()))
    elif c is not None and c.dim < len(w.shape(x)) - 3:
        w.set_chan(out, c)
    w.derive(out, x)
    _record_data(w, node, _io(node))


@handles(*_ops("pixel_unshuffle"))
def pixel_unshuffle(w: Walker, node) -> None:
    """(C, H r, W r) -> (C r^2, H, W): each channel becomes r^2 consecutive channels (exact)."""
    x, ids = _channel_ids(w, node)
    out = node.outputs[0]
    c = w.chan(x)
    if ids is not None:
        r2 = int(bind(node)["downscale_factor"]) ** 2
        w.set_chan(out, Chan(c.dim, np.repeat(ids, r2)))
    elif c is not None and c.dim < len(w.shape(x)) - 3:
        w.set_chan(out, c)
    w.derive(out, x)
    _record_data(w, node, _io(node))


@handles(*_ops("channel_shuffle", "native_channel_shuffle"))
def channel_shuffle(w: Walker, node) -> None:
    """(g, C/g) -> (C/g, g) along dim 1: position j of every group is tied (all groups stay equally wide),
    and the output ids are the input ids in shuffled order (exact)."""
    x = node.tensor_inputs()[0]
    out = node.outputs[0]
    c = w.chan(x)
    if c is not None and c.dim == 1:
        g = int(bind(node)["groups"])
        per = len(c.ids) // g
        table = c.ids.reshape(g, per)
        for j in range(per):
            w.elements.union_all(table[:, j])
        w.set_chan(out, Chan(1, table.T.reshape(-1).copy()))
    elif c is not None:
        w.set_chan(out, c)
    w.derive(out, x)
    _record_data(w, node, _io(node))
