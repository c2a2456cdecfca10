"""The op-handler table: how each aten op maps channels.

One small function per op family, registered with ``@handles``; the walker in
``analysis.py`` knows nothing about particular ops. A handler reads the channel ids
of its inputs (``w.chan``), records couplings (``w.elements.union``), fixes channels it
cannot follow exactly (``w.fix``) and sets the channel ids of its outputs. Ops not in
this table raise ``UnsupportedGraphError`` when they touch a channel-carrying tensor.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np
import torch

from morphnet.channels.analysis import Chan, DataOp, LayerCall, StateView, TensorUse, WeightInfo, Walker, bind, vid
from morphnet.channels.views import map_channel_through_view, map_state_dims_through_view

aten = torch.ops.aten
HANDLERS: dict = {}


def handles(*ops) -> Callable:
    def register(fn):
        for op in ops:
            HANDLERS[op] = fn
        return fn
    return register


def _ops(*names: str) -> list:
    """aten overload packets by name, skipping those this torch build lacks."""
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


def _owner(state: str) -> str:
    return state.rsplit(".", 1)[0] if "." in state else ""


def _record_data(w: Walker, node, values) -> None:
    """Memory traffic of a data-moving op over its activation (non-state) tensors."""
    if not any(w.graph.values[v].state_name is None for v in node.tensor_inputs()):
        return  # bookkeeping on model state (BatchNorm's num_batches_tracked += 1)
    uses = []
    for v in values:
        if v is None or w.graph.values[v].state_name is not None:
            continue
        c = w.chan(v)
        total = w.per_example(v)
        if c is not None and len(c.ids):
            uses.append(TensorUse(c.ids, total / len(c.ids)))
        else:
            uses.append(TensorUse(None, total))
    w.data_ops.append(DataOp(node.index, node.module, node.name, uses))


def _io(node) -> list:
    return node.tensor_inputs() + [o for o in node.outputs if o is not None]


# Module types recorded as one node (their internals are not recorded), with their handlers.
LEAF_HANDLERS: dict[type, Callable] = {}


def handles_module(*module_types: type) -> Callable:
    """Register a handler for whole calls of these module types (see ``capture_graph``)."""
    def register(fn):
        for t in module_types:
            LEAF_HANDLERS[t] = fn
        return fn
    return register


def leaf_handler(op) -> Callable:
    for klass in op.module_type.__mro__:
        if klass in LEAF_HANDLERS:
            return LEAF_HANDLERS[klass]
    raise AssertionError(f"no handler for leaf module type {op.module_type}")


def leaf_types() -> tuple:
    return tuple(LEAF_HANDLERS)


def handle_unknown(w: Walker, node) -> None:
    """An op with no handler: fine on channel-free tensors, an error on channel-carrying ones."""
    for v in node.tensor_inputs():
        if w.chan(v) is not None:
            raise w.unsupported("the op has no channel handler and its input carries prunable channels")
    for o in node.outputs:
        w.derive(o, *node.tensor_inputs())


# ---- element-wise ------------------------------------------------------------------------

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
        else:  # a computed tensor as wide as the channels: its width cannot follow pruning
            w.elements.fix(main)
            w.make_opaque(v)
    w.set_chan(out, Chan(p, main))


def _is_pointwise(op) -> bool:
    return torch.Tag.pointwise in getattr(op, "tags", ())


def pointwise(w: Walker, node) -> None:
    """Element-wise op with broadcasting: equal channel dims are tied, size-1 dims couple nothing."""
    _pointwise_core(w, node, node.tensor_inputs(), node.outputs[0] if node.outputs else None)
    _record_data(w, node, _io(node))


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


# ---- views ---------------------------------------------------------------------------------

@handles(*_ops("view", "_unsafe_view", "reshape", "_reshape_alias", "unflatten", "flatten"))
def view(w: Walker, node) -> None:
    x = node.tensor_inputs()[0]
    out = node.outputs[0]
    old, new = w.shape(x), w.shape(out)
    c = w.chan(x)
    if c is not None:
        mapped = map_channel_through_view(old, new, c.dim, c.ids)
        if mapped is None:  # the view splits the channel dim (channel shuffle, heads): keep width
            w.fix(x)
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


def _permuted(w: Walker, x: int, out: int, perm: list[int]) -> None:
    c = w.chan(x)
    if c is not None:
        w.set_chan(out, Chan(perm.index(c.dim), c.ids))
    sv = w.state_view(x)
    if sv is not None:
        w.state_views[out] = StateView(sv.name, tuple(sv.dims[p] for p in perm))
    else:
        w.derive(out, x)


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
    sv = w.state_view(x)
    if sv is not None:
        dims = [None] * shift + [sv.dims[i] if old[i] == new[i + shift] else None for i in range(len(old))]
        w.state_views[out] = StateView(sv.name, tuple(dims))
    else:
        w.derive(out, x)


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


@handles(*_ops("split", "split_with_sizes", "unbind", "chunk", "unsafe_split", "tensor_split"))
def split(w: Walker, node) -> None:
    """Splitting the channel dim keeps its channels (the code's split sizes are constants)."""
    x = node.tensor_inputs()[0]
    rank = len(w.shape(x))
    dim = bind(node).get("dim", 0) % rank
    c = w.chan(x)
    removes = node.op.overloadpacket is aten.unbind
    if c is not None and c.dim == dim:
        w.fix(x)
        start = 0
        for o in node.outputs:
            if o is not None and not removes:
                n = w.shape(o)[dim]
                w.set_chan(o, Chan(dim, c.ids[start:start + n]))
                start += n
        return
    for o in node.outputs:
        if o is None:
            continue
        if c is not None:
            w.set_chan(o, Chan(c.dim - (1 if removes and c.dim > dim else 0), c.ids))
        _sliced_state(w, x, o, dim, not removes, False)


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
    out = node.outputs[0]
    rank = len(w.shape(x))
    b = bind(node)
    dims = [d % rank for d in (b["dims"] or [])] if b["dims"] else list(range(rank))
    c = w.chan(x)
    if c is not None:
        if c.dim in dims:
            w.fix(x)
        else:
            w.set_chan(out, c)
    w.derive(out, x)
    _record_data(w, node, _io(node))


@handles(*_ops("index_select"))
def index_select(w: Walker, node) -> None:
    b = bind(node)
    x = vid(b["self"])
    out = node.outputs[0]
    dim = b["dim"] % len(w.shape(x))
    c = w.chan(x)
    if c is not None:
        if c.dim == dim:
            w.fix(x)
        else:
            w.set_chan(out, c)
    w.derive(out, x)
    _record_data(w, node, _io(node))


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
    w.derive(out, *node.tensor_inputs())
    _record_data(w, node, _io(node))


# ---- reductions and pooling ---------------------------------------------------------------------

@handles(*_ops("mean", "sum", "amax", "amin", "max", "min", "var", "std", "linalg_vector_norm", "norm",
               "logsumexp", "prod", "any", "all", "argmax", "argmin", "var_mean", "std_mean", "nansum",
               "count_nonzero"))
def reduction(w: Walker, node) -> None:
    """Reducing over spatial / token dims keeps channels; reducing over channels fixes them."""
    ins = node.tensor_inputs()
    x = ins[0]
    rank = len(w.shape(x))
    b = bind(node)
    dims = b.get("dim")
    if isinstance(dims, int):
        dims = [dims]
    if len(ins) > 1 and node.op.overloadpacket in (aten.max, aten.min):  # binary max / min
        pointwise(w, node)
        return
    reduced = list(range(rank)) if dims is None or len(dims) == 0 else [d % rank for d in dims]
    keepdim = bool(b.get("keepdim", False))
    c = w.chan(x)
    for o in node.outputs:
        if o is None:
            continue
        if c is not None and c.dim not in reduced:
            w.set_chan(o, Chan(c.dim if keepdim else c.dim - sum(1 for d in reduced if d < c.dim), c.ids))
        w.derive(o, x)
    if c is not None and c.dim in reduced:
        w.fix(x)
    _record_data(w, node, _io(node))


@handles(*_ops("max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
               "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
               "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
               "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "upsample_nearest1d",
               "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d", "upsample_bicubic2d",
               "upsample_linear1d", "upsample_trilinear3d", "_upsample_nearest_exact2d",
               "_upsample_bilinear2d_aa", "fractional_max_pool2d", "lp_pool2d", "reflection_pad1d",
               "reflection_pad2d", "reflection_pad3d", "replication_pad1d", "replication_pad2d",
               "replication_pad3d"))
def spatial(w: Walker, node) -> None:
    """Pooling, resizing and spatial padding act on the trailing dims, never on channels."""
    x = node.tensor_inputs()[0]
    rank = len(w.shape(x))
    found = re.search(r"(\d)d", node.name)
    n_sp = int(found.group(1)) if found else 2
    c = w.chan(x)
    if c is not None and c.dim >= rank - n_sp:
        raise w.unsupported(f"the channel dim {c.dim} is one of the {n_sp} spatial dims it acts on")
    for o in node.outputs:
        if o is not None and c is not None and len(w.shape(o)) == rank:
            w.set_chan(o, c)
    _record_data(w, node, _io(node))


@handles(*_ops("constant_pad_nd"))
def pad(w: Walker, node) -> None:
    x = node.tensor_inputs()[0]
    out = node.outputs[0]
    rank = len(w.shape(x))
    widths = bind(node)["pad"]
    padded = {rank - 1 - i // 2 for i, p in enumerate(widths) if p != 0}
    c = w.chan(x)
    if c is not None:
        if c.dim in padded:
            w.fix(x)
        else:
            w.set_chan(out, c)
    w.derive(out, x)
    _record_data(w, node, _io(node))


@handles(*_ops("_softmax", "_log_softmax", "softmax", "log_softmax", "cumsum", "cumprod", "_safe_softmax"))
def softmax(w: Walker, node) -> None:
    """Normalizing along the channel dim couples all channels: they stay fixed."""
    x = node.tensor_inputs()[0]
    out = node.outputs[0]
    dim = bind(node)["dim"] % len(w.shape(x))
    c = w.chan(x)
    if c is not None:
        if c.dim == dim:
            w.fix(x)
        else:
            w.set_chan(out, c)
    w.derive(out, x)
    _record_data(w, node, _io(node))


# ---- concatenation ---------------------------------------------------------------------------

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
    w.derive(out, *tensors)
    _record_data(w, node, _io(node))


# ---- normalization --------------------------------------------------------------------------

@handles(*_ops("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
               "_native_batch_norm_legit_functional", "_batch_norm_with_update", "_batch_norm_no_update",
               "cudnn_batch_norm", "miopen_batch_norm", "batch_norm"))
def batch_norm(w: Walker, node) -> None:
    """Per-channel statistics: channels pass through; the scale (gamma) is a MorphNet source."""
    b = bind(node)
    x = vid(b["input"])
    ids = w.need_chan(x, 1) if len(w.shape(x)) > 1 else w.need_chan(x, 0)
    for key in ("weight", "bias", "running_mean", "running_var"):
        v = vid(b.get(key))
        if v is None:
            continue
        sv = w.state_view(v)
        if sv is not None and sv.dims[0] is not None:
            w.align(sv.name, sv.dims[0], ids)
            if key == "weight":
                if sv.name in w.gamma:
                    w.elements.union(w.gamma[sv.name], ids)
                else:
                    w.gamma[sv.name] = ids
                w.module_out.setdefault(_owner(sv.name), ids)
        else:
            w.elements.fix(ids)
            w.make_opaque(v)
    outs = [o for o in node.outputs if o is not None]
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
        v = vid(b.get(key))
        if v is None:
            continue
        sv = w.state_view(v)
        if sv is not None and sv.dims[0] is not None:
            w.align(sv.name, sv.dims[0], ids)
        else:
            w.elements.fix(ids)
            w.make_opaque(v)
    outs = [o for o in node.outputs if o is not None]
    w.set_chan(outs[0], Chan(1, ids))
    _record_data(w, node, [x, outs[0]])


# ---- layers ------------------------------------------------------------------------------------

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
    if bias is not None:
        bsv = w.state_view(bias)
        if bsv is not None and bsv.dims[0] is not None:
            w.align(bsv.name, bsv.dims[0], out_ids)
        else:
            w.elements.fix(out_ids)
            w.make_opaque(bias)
    w.set_chan(out, Chan(1, out_ids))
    spatial_shape = (w.shape(x) if transposed else w.shape(out))[2:]
    area = float(np.prod(spatial_shape, dtype=np.float64))
    n = w.graph.batch_size
    w.layer_calls.append(LayerCall(
        module=_owner(weight_name) if weight_name else node.module, weight=weight_name or "",
        kind="conv", in_ids=in_ids, out_ids=out_ids, groups=g, depthwise=depthwise,
        flop_coef=2.0 * area * kernel * w.shape(x)[0] / n, kernel=kernel,
        in_numel=w.per_example(x) / in_ch, out_numel=w.per_example(out) / out_ch, node=node.index))


def _linear(w: Walker, node, x: int, wt: int, bias: int | None, out: int, weight_first: bool) -> None:
    """``x @ W`` (or ``W @ x`` when ``weight_first``) with W a view of a 2-D parameter.

    W may carry broadcast batch dims (an expanded weight in a batched matmul); x is
    [..., M, K] (or [..., K, N]). Tokens (all of x's other dims) multiply the FLOPs.
    """
    sv = w.state_view(wt)
    rank = len(w.shape(x))
    c_in_dim, c_out_dim = (len(sv.dims) - 1, len(sv.dims) - 2) if weight_first else (len(sv.dims) - 2,
                                                                                     len(sv.dims) - 1)
    in_state, out_state = sv.dims[c_in_dim], sv.dims[c_out_dim]
    slot_in, slot_out = w.slot(sv.name, in_state), w.slot(sv.name, out_state)
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
    if bias is not None:
        bsv = w.state_view(bias)
        bshape = w.shape(bias)
        if bsv is not None and bshape and bshape[-1] == len(slot_out) and bsv.dims[-1] is not None:
            w.align(bsv.name, bsv.dims[-1], slot_out)
        elif bshape and bshape[-1] != 1:
            w.elements.fix(slot_out)
            w.make_opaque(bias)
    w.set_chan(out, out_chan)
    owner = _owner(sv.name)
    if sv.name not in w.weights:
        w.weights[sv.name] = WeightInfo(owner, sv.name, out_state, slot_out, slot_in, 1, 1, False)
    w.module_out.setdefault(owner, slot_out)
    tokens = w.per_example(x) / w.shape(x)[x_contract]
    w.layer_calls.append(LayerCall(
        module=owner, weight=sv.name, kind="linear", in_ids=slot_in, out_ids=slot_out, groups=1,
        depthwise=False, flop_coef=2.0 * tokens, kernel=1, in_numel=tokens, out_numel=tokens, node=node.index))


def _weight_view(w: Walker, v: int, rank: int) -> bool:
    """A view of a 2-D parameter with its two dims last (batch dims broadcast): a linear weight."""
    sv = w.state_view(v)
    return (sv is not None and sv.name in w.graph.parameters and len(sv.dims) == rank and rank >= 2
            and sv.dims[-1] is not None and sv.dims[-2] is not None and all(d is None for d in sv.dims[:-2])
            and len(w.graph.state_shapes[sv.name]) == 2)


def _not_weight(w: Walker, v: int) -> bool:
    sv = w.state_view(v)
    return sv is None or sv.name not in w.graph.parameters


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
    opaque(w, node)


@handles(*_ops("_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
               "_scaled_dot_product_cudnn_attention", "scaled_dot_product_attention",
               "_scaled_dot_product_attention_math", "_efficient_attention_forward", "_flash_attention_forward",
               "einsum", "dot", "vdot", "outer", "mv"))
def opaque(w: Walker, node) -> None:
    """Products between activations (attention): the contracted and produced dims keep their width."""
    for v in node.tensor_inputs():
        w.fix(v)
    for o in node.outputs:
        w.derive(o, *node.tensor_inputs())
    _record_data(w, node, _io(node))


def _register_pointwise_tagged() -> None:
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


_register_pointwise_tagged()


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
