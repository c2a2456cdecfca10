"""Concatenation and stacking."""

from __future__ import annotations

import numpy as np

from morphnet.channels.walker import Chan, Walker, bind, vid
from morphnet.channels.handlers.registry import _io, _ops, _record_data, aten, handles


@handles(*_ops("cat", "concat", "stack"))
def cat(w: Walker, node) -> None:
    """Concat along channels joins their ids; along another dim the inputs' channels are tied."""
    b = bind(node)
    tensors = [vid(t) for t in b["tensors"]]
    out = node.outputs[0]
    out_rank = len(w.shape(out))
    is_stack = node.op.overloadpacket is aten.stack
    dim = b.get("dim", 0) % out_rank
    if not is_stack:
        tensors = [t for t in tensors if w.shape(t) != (0,)]  # legacy empty tensors are skipped by cat
    chans = [w.chan(t) for t in tensors]
    if not is_stack and any(c is not None and c.dim == dim for c in chans):
        parts = [w.need_chan(t, dim) for t in tensors]
        w.set_chan(out, Chan(dim, np.concatenate(parts)))
    else:
        # along another dim: behaves like an element-wise op between the pieces
        if is_stack:
            lifted = [Chan(c.dim + (1 if c.dim >= dim else 0), c.ids) if c is not None else None for c in chans]
        else:
            lifted = chans
        positions = {c.dim for c in lifted if c is not None}
        if len(positions) == 1:
            p = positions.pop()
            main = next(c.ids for c in lifted if c is not None)
            for t, c in zip(tensors, lifted):
                if c is not None:
                    if c.ids is not main:
                        w.elements.union(main, c.ids)
                    continue
                sv = w.state_view(t)
                q = p - (1 if is_stack and p > dim else 0)
                if sv is not None and sv.dims[q] is not None:
                    w.align(sv.name, sv.dims[q], main)
                else:
                    w.elements.fix(main)
                    w.make_opaque(t)
            w.set_chan(out, Chan(p, main))
        elif positions:
            for t in tensors:
                w.fix(t)
    if not is_stack and out_rank == 1 and tensors and all(_whole_1d_state(w, t) for t in tensors):
        starts = np.cumsum([0] + [w.shape(t)[0] for t in tensors[:-1]])
        w.joined[out] = [(w.state_view(t).name, int(s)) for t, s in zip(tensors, starts)]
    w.derive(out, *tensors)
    _record_data(w, node, _io(node))


def _whole_1d_state(w: Walker, v: int) -> bool:
    sv = w.state_view(v)
    return sv is not None and sv.dims == (0,) and w.graph.state_shapes.get(sv.name) == w.shape(v)
