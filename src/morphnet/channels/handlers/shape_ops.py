"""Views, permutations, slicing, splitting and indexing."""

from __future__ import annotations

import numpy as np

from morphnet.channels.walker import Chan, ShapeCheck, StateView, Walker, bind, vid
from morphnet.channels.handlers.attention import recuts_its_projection, split_by_attribute, split_rule
from morphnet.channels.handlers.registry import _io, _ops, _record_data, aten, handles, pass_unless_along
from morphnet.channels.views import (
    map_channel_through_view,
    map_state_dims_through_view,
    split_channel_through_view,
)


@handles(*_ops("view", "_unsafe_view", "reshape", "_reshape_alias", "unflatten", "flatten"))
def view(w: Walker, node) -> None:
    x = node.tensor_inputs()[0]
    out = node.outputs[0]
    old, new = w.shape(x), w.shape(out)
    c = w.chan(x)
    if c is not None:
        mapped = map_channel_through_view(old, new, c.dim, c.ids)
        if mapped is None:
            _split_view(w, node, old, new, c)
        else:
            w.set_chan(out, Chan(*mapped))
    sv = w.state_view(x)
    if sv is not None:
        dims = map_state_dims_through_view(old, new, sv.dims)
        if dims is None:
            w.derive(out, x)
        else:
            w.state_views[out] = StateView(sv.name, dims)
    else:
        w.derive(out, x)
        part = w.parts.get(x)
        if part is not None:
            w.carry_part(x, out, map_state_dims_through_view(old, new, part[0].dims))


def _split_view(w: Walker, node, old, new, c: Chan) -> None:
    """The view splits the channel dim into several dims (attention heads, channel shuffle groups).

    Inside an attention module of the table in ``attention.py`` the head dim carries the
    channels and a head is pruned whole. Elsewhere only a split that is merged back after
    permutes alone (a channel shuffle: a permutation of the channels) is followed: the
    innermost dim carries and the outer dims keep their size (``view(n, groups, C // groups)``),
    and the rebuilt model is checked to split the same way (a ``ShapeCheck``). Any other
    split keeps its channels fixed.
    """
    rule, head_dim = split_rule(w, node.module)
    if rule == "groups" and not _merged_back(w, node.outputs[0], tuple(old)):
        rule = "fixed"  # the split dims are used on their own (heads of unknown code): keep the width
    split = None if rule == "fixed" else split_channel_through_view(old, new, c.dim, c.ids, head_dim)
    if split is None:
        w.fix(node.tensor_inputs()[0])
        return
    carrier, ids, (tie_a, tie_b) = split
    w.elements.union(tie_a, tie_b)
    w.set_chan(node.outputs[0], Chan(carrier, ids))
    if rule == "groups":  # heads are followed in modules whose rebuild is known; other code is checked
        w.shape_checks.append(ShapeCheck(node.index, 0, carrier, ids))


_REORDERS = ("permute", "transpose", "clone", "contiguous", "expand")
_MERGES = ("view", "_unsafe_view", "reshape", "flatten", "_reshape_alias")


def _merged_back(w: Walker, v: int, shape: tuple) -> bool:
    """``v`` only flows through permutes / copies into a view back to ``shape`` (a shuffle)."""
    while True:
        users = w.consumers(v)
        if len(users) != 1:
            return False
        user = w.graph.nodes[users[0]]
        kind = getattr(user.op, "_opname", "")
        if kind in _MERGES:
            return tuple(w.shape(user.outputs[0])) == shape
        if kind not in _REORDERS or (kind == "expand" and w.shape(user.outputs[0]) != w.shape(v)):
            return False
        v = user.outputs[0]


def _permuted(w: Walker, x: int, out: int, perm: list[int]) -> None:
    c = w.chan(x)
    if c is not None:
        w.set_chan(out, Chan(perm.index(c.dim), c.ids))
    sv = w.state_view(x)
    if sv is not None:
        w.state_views[out] = StateView(sv.name, tuple(sv.dims[p] for p in perm))
    else:
        w.derive(out, x)
        if x in w.parts:
            w.carry_part(x, out, tuple(w.parts[x][0].dims[p] for p in perm))


@handles(*_ops("permute"))
def permute(w: Walker, node) -> None:
    x = node.tensor_inputs()[0]
    rank = len(w.shape(x))
    perm = [d % rank for d in bind(node)["dims"]]
    _permuted(w, x, node.outputs[0], perm)


@handles(*_ops("transpose", "transpose_", "swapaxes", "t", "t_", "numpy_T"))
def transpose(w: Walker, node) -> None:
    x = node.tensor_inputs()[0]
    rank = len(w.shape(x))
    b = bind(node)
    d0, d1 = (b.get("dim0", 0), b.get("dim1", 1)) if rank >= 2 else (0, 0)
    perm = list(range(rank))
    if rank >= 2:
        d0, d1 = d0 % rank, d1 % rank
        perm[d0], perm[d1] = perm[d1], perm[d0]
    _permuted(w, x, node.outputs[0], perm)


@handles(*_ops("expand", "expand_as", "broadcast_to"))
def expand(w: Walker, node) -> None:
    x = node.tensor_inputs()[0]
    out = node.outputs[0]
    old, new = w.shape(x), w.shape(out)
    shift = len(new) - len(old)
    c = w.chan(x)
    if c is not None:
        if len(c.ids) != new[c.dim + shift]:
            w.fix(x)
        else:
            w.set_chan(out, Chan(c.dim + shift, c.ids))
    elif split_rule(w, node.module)[0] == "heads":
        broadcast = [d for d in range(shift, len(new)) if new[d] > 1 and old[d - shift] == 1]
        if len(broadcast) == 1:
            # in an attention module, a mask expanded to the heads: its entries are equal along that
            # dim, so it follows the heads it meets (the module's rebuild expands to the new count)
            w.set_chan(out, Chan(broadcast[0], w.elements.new(new[broadcast[0]])))
    sv = w.state_view(x)
    if sv is not None:
        dims = [None] * shift + [sv.dims[i] if old[i] == new[i + shift] else None for i in range(len(old))]
        w.state_views[out] = StateView(sv.name, tuple(dims))
    else:
        w.derive(out, x)
        if x in w.parts:  # an expanded weight of a batched product
            dims = w.parts[x][0].dims
            w.carry_part(x, out, tuple([None] * shift + [dims[i] if old[i] == new[i + shift] else None
                                                         for i in range(len(old))]))


@handles(*_ops("unsqueeze", "unsqueeze_"))
def unsqueeze(w: Walker, node) -> None:
    x = node.tensor_inputs()[0]
    out = node.outputs[0]
    d = bind(node)["dim"] % len(w.shape(out))
    c = w.chan(x)
    if c is not None:
        w.set_chan(out, Chan(c.dim + (1 if d <= c.dim else 0), c.ids))
    sv = w.state_view(x)
    if sv is not None:
        dims = list(sv.dims)
        dims.insert(d, None)
        w.state_views[out] = StateView(sv.name, tuple(dims))
    else:
        w.derive(out, x)


@handles(*_ops("squeeze", "squeeze_"))
def squeeze(w: Walker, node) -> None:
    x = node.tensor_inputs()[0]
    out = node.outputs[0]
    shape = w.shape(x)
    b = bind(node)
    dims = b.get("dim", b.get("dims"))
    if dims is None:
        removed = [i for i, s in enumerate(shape) if s == 1]
    else:
        dims = [dims] if isinstance(dims, int) else list(dims)
        removed = [d % max(len(shape), 1) for d in dims if shape and shape[d % len(shape)] == 1]
    keep = [i for i in range(len(shape)) if i not in removed]
    c = w.chan(x)
    if c is not None:
        if c.dim in removed:
            w.fix(x)
        else:
            w.set_chan(out, Chan(keep.index(c.dim), c.ids))
    sv = w.state_view(x)
    if sv is not None:
        w.state_views[out] = StateView(sv.name, tuple(sv.dims[i] for i in keep))
    else:
        w.derive(out, x)


def _sliced_state(w: Walker, x: int, out: int, dim: int, keep_dim: bool, full: bool) -> None:
    sv = w.state_view(x)
    if sv is None:
        w.derive(out, x)
        return
    if full:
        w.state_views[out] = sv
    elif keep_dim:
        dims = list(sv.dims)
        if dims[dim] is not None:
            w.derive(out, x)
            return
        w.state_views[out] = StateView(sv.name, tuple(dims))
    else:
        if sv.dims[dim] is not None:
            w.derive(out, x)
            return
        w.state_views[out] = StateView(sv.name, tuple(d for i, d in enumerate(sv.dims) if i != dim))


@handles(*_ops("slice", "narrow"))
def slice_(w: Walker, node) -> None:
    """Slicing along the channel dim keeps those channels (code indexes them by position)."""
    x = node.tensor_inputs()[0]
    out = node.outputs[0]
    b = bind(node)
    rank = len(w.shape(x))
    dim = b.get("dim", 0) % rank
    full = w.shape(out)[dim] == w.shape(x)[dim]
    c = w.chan(x)
    if c is not None:
        if c.dim != dim or full:
            w.set_chan(out, c)
        else:
            w.fix(x)
    _sliced_state(w, x, out, dim, True, full)
    start = b.get("start")
    start = 0 if start is None else start
    if not full and b.get("step", 1) == 1 and isinstance(start, int) and start >= 0 and \
            _part(w, x, out, dim, start) and not recuts_its_projection(w, node.module):
        w.elements.fix(w.part_slot(x, dim))  # cut at constant positions: that dim keeps its width


def _part(w: Walker, x: int, out: int, dim: int, offset: int) -> bool:
    """``out`` is entries ``offset ...`` along ``dim`` of ``x``, a 1-D or 2-D parameter or a part of one
    (``w.chunk(3)``, ``b[:n]``): the parameter's own entries, for a linear layer that reads it. False when
    ``x`` is no such parameter."""
    view = w.part_view(x)
    if view is None or view[0].dims[dim] is None or view[0].name not in w.graph.parameters or \
            len(w.graph.state_shapes[view[0].name]) > 2:
        return False
    sv, starts = view
    state_dim = sv.dims[dim]
    w.parts[out] = (sv, {**starts, state_dim: starts.get(state_dim, 0) + offset})
    w.part_readers.add((w.node.index, x))
    return True


def _cut_parameter(w: Walker, node, x: int, dim: int) -> None:
    """Parts of a parameter cut by a split: ``chunk(n)`` into equal parts cuts where the narrowed
    parameter's width says, so position j of every part is tied (every part keeps the same positions;
    checked after the rebuild); sizes that are constants in the code keep that dim's width, except in an
    attention module whose rebuild replaces the code (``RECUTS_ITS_PROJECTION``)."""
    if not any(o in w.parts for o in node.outputs if o is not None):
        return
    whole = all(o is not None and o in w.parts for o in node.outputs)
    parts = [w.part_slot(o, dim) for o in node.outputs] if whole else []
    if whole and node.python_op == "chunk" and len({len(p) for p in parts}) == 1 and len(parts) > 1:
        w.elements.union(np.tile(parts[0], len(parts) - 1), np.concatenate(parts[1:]))
        for pos, ids in enumerate(parts):
            w.shape_checks.append(ShapeCheck(node.index, pos, dim, ids))
    elif not recuts_its_projection(w, node.module):
        w.elements.fix(w.part_slot(x, dim))


@handles(*_ops("select"))
def select(w: Walker, node) -> None:
    x = node.tensor_inputs()[0]
    out = node.outputs[0]
    rank = len(w.shape(x))
    dim = bind(node)["dim"] % rank
    c = w.chan(x)
    if c is not None:
        if c.dim == dim:
            w.fix(x)
        else:
            w.set_chan(out, Chan(c.dim - (1 if c.dim > dim else 0), c.ids))
    _sliced_state(w, x, out, dim, False, False)


def _equal_parts(w: Walker, node, x: int, dim: int, c: Chan) -> bool:
    """Equal parts of the channel dim made by ``chunk(n)`` each keep their own channels.

    Position j of every part is tied, so every part keeps the same positions and the
    rebuilt model's ``chunk(n)`` cuts at the same place (also checked after the rebuild).
    A ``split`` by a size (a constant in the code) or unequal parts return False.
    """
    if node.python_op != "chunk" and not split_by_attribute(w, node.module):
        return False  # split(size) in the code: the size is a constant (unless the rebuild updates it)
    outs = [o for o in node.outputs if o is not None]
    sizes = {w.shape(o)[dim] for o in outs}
    if len(outs) < 2 or len(outs) != len(node.outputs) or len(sizes) != 1 or sizes.pop() * len(outs) != len(c.ids):
        return False
    parts = c.ids.reshape(len(outs), -1)
    w.elements.union(np.tile(parts[0], len(outs) - 1), parts[1:].ravel())
    for pos, o in enumerate(outs):
        w.set_chan(o, Chan(dim, np.ascontiguousarray(parts[pos])))
        w.shape_checks.append(ShapeCheck(node.index, pos, dim, parts[pos]))
        _sliced_state(w, x, o, dim, True, False)
    return True


@handles(*_ops("split", "split_with_sizes", "unbind", "chunk", "unsafe_split", "tensor_split"))
def split(w: Walker, node) -> None:
    """Equal parts of the channel dim keep their channels; unequal ones (constant sizes) stay fixed."""
    x = node.tensor_inputs()[0]
    rank = len(w.shape(x))
    dim = bind(node).get("dim", 0) % rank
    c = w.chan(x)
    removes = node.op.overloadpacket is aten.unbind
    if c is not None and c.dim == dim and not removes and _equal_parts(w, node, x, dim, c):
        return
    if c is not None and c.dim == dim:
        w.fix(x)
        start = 0
        for o in node.outputs:
            if o is not None and not removes:
                n = w.shape(o)[dim]
                w.set_chan(o, Chan(dim, c.ids[start:start + n]))
                start += n
        return
    offset = 0
    for o in node.outputs:
        if o is None:
            continue
        if c is not None:
            w.set_chan(o, Chan(c.dim - (1 if removes and c.dim > dim else 0), c.ids))
        _sliced_state(w, x, o, dim, not removes, False)
        if not removes:
            _part(w, x, o, dim, offset)
            offset += w.shape(o)[dim]
    if not removes:
        _cut_parameter(w, node, x, dim)


@handles(*_ops("as_strided", "as_strided_"))
def as_strided(w: Walker, node) -> None:
    """A restride that keeps every element where it was (memory-format fix-ups) is an alias."""
    b = bind(node)
    x = vid(b["input"] if "input" in b else b["self"])
    out = node.outputs[0]
    old = w.graph.values[x]
    size, stride = list(b["size"]), list(b["stride"])
    same = list(old.shape) == size and all(s == 1 or a == c for s, a, c in zip(size, old.stride, stride))
    offset = b.get("storage_offset")
    if not same or offset not in (None, 0):
        if w.chan(x) is not None:
            raise w.unsupported("as_strided reinterprets the memory of a channel-carrying tensor")
        w.derive(out, x)
        return
    w.set_chan(out, w.chan(x))
    w.derive(out, x)


@handles(*_ops("flip"))
def flip(w: Walker, node) -> None:
    """Reversing the channel order is exact: the pruned model reverses the survivors."""
    x = node.tensor_inputs()[0]
    out = node.outputs[0]
    rank = len(w.shape(x))
    dims = [d % rank for d in bind(node)["dims"]]
    c = w.chan(x)
    if c is not None:
        w.set_chan(out, Chan(c.dim, c.ids[::-1].copy()) if c.dim in dims else c)
    w.derive(out, x)
    _record_data(w, node, _io(node))


@handles(*_ops("roll"))
def roll(w: Walker, node) -> None:
    """Rolling the channel dim depends on the width: those channels stay fixed."""
    x = node.tensor_inputs()[0]
    rank = len(w.shape(x))
    dims = bind(node)["dims"]
    pass_unless_along(w, node, x, [d % rank for d in dims] if dims else list(range(rank)))


@handles(*_ops("index_select"))
def index_select(w: Walker, node) -> None:
    b = bind(node)
    x = vid(b["self"])
    pass_unless_along(w, node, x, [b["dim"] % len(w.shape(x))])


@handles(*_ops("index"))
def index(w: Walker, node) -> None:
    """Advanced indexing: the channel dim survives when it is not indexed and keeps its place."""
    b = bind(node)
    x = vid(b["self"])
    out = node.outputs[0]
    indices = b["indices"]
    c = w.chan(x)
    if c is not None:
        indexed = [i for i, t in enumerate(indices) if t is not None]
        if c.dim in indexed or not indexed:
            w.fix(x)
        else:
            first, last = indexed[0], indexed[-1]
            adjacent = last - first + 1 == len(indexed)
            idx_rank = max(len(w.shape(t.index)) for t in indices if t is not None)
            if c.dim < first and adjacent:
                w.set_chan(out, Chan(c.dim, c.ids))
            elif c.dim > last and adjacent:
                w.set_chan(out, Chan(c.dim - len(indexed) + idx_rank, c.ids))
            elif not adjacent and c.dim > last:
                w.set_chan(out, Chan(idx_rank + c.dim - len(indexed), c.ids))
            else:
                w.fix(x)
    sv = w.state_view(x)
    indexed = [i for i, t in enumerate(indices) if t is not None]
    if (sv is not None and indexed and indexed[-1] - indexed[0] + 1 == len(indexed)
            and all(w.chan(t.index) is None for t in indices if t is not None)):
        # a lookup table (relative position bias): its other dims still follow the state
        idx_rank = max(len(w.shape(t.index)) for t in indices if t is not None)
        for i in indexed:  # the code's index values point at entries of these state dims: they stay
            if sv.dims[i] is not None:
                w.elements.fix(w.slot(sv.name, sv.dims[i]))
        dims = sv.dims[:indexed[0]] + (None,) * idx_rank + sv.dims[indexed[-1] + 1:]
        w.state_views[out] = StateView(sv.name, tuple(dims))
    else:
        w.derive(out, *node.tensor_inputs())
    _record_data(w, node, _io(node))


@handles(*_ops("repeat"))
def repeat(w: Walker, node) -> None:
    """Tiling: repeating the channel dim r times repeats every channel's id r times (exact)."""
    x = node.tensor_inputs()[0]
    out = node.outputs[0]
    repeats = list(bind(node)["repeats"])
    shift = len(repeats) - len(w.shape(x))
    c = w.chan(x)
    if c is not None:
        w.set_chan(out, Chan(c.dim + shift, np.tile(c.ids, repeats[c.dim + shift])))
    w.derive(out, x)
    _record_data(w, node, _io(node))
