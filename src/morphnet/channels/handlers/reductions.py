"""Reductions, pooling and resizing, padding, softmax."""

from __future__ import annotations

import re

from morphnet.channels.walker import Chan, Walker, bind
from morphnet.channels.handlers.elementwise import pointwise
from morphnet.channels.handlers.norms import decomposed_rms_norm
from morphnet.channels.handlers.registry import _io, _ops, _record_data, aten, handles, pass_unless_along


@handles(*_ops("mean", "sum", "amax", "amin", "max", "min", "var", "std", "linalg_vector_norm", "norm",
               "logsumexp", "prod", "any", "all", "argmax", "argmin", "var_mean", "std_mean", "nansum",
               "count_nonzero"))
def reduction(w: Walker, node) -> None:
    """Reducing over spatial / token dims keeps channels; reducing over channels fixes them, unless it is
    the statistic of an RMSNorm written out in Python (then as the fused ``rms_norm``: see ``norms.py``)."""
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
        if w.prune_normalized and decomposed_rms_norm(w, node):
            w.normalized.append(c.ids)  # prunable, not exact: the rebuild measures and reports the deviation
        else:
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
    """Padding the channel dim would add channels from code: those stay fixed."""
    x = node.tensor_inputs()[0]
    rank = len(w.shape(x))
    pass_unless_along(w, node, x, {rank - 1 - i // 2 for i, p in enumerate(bind(node)["pad"]) if p != 0})


@handles(*_ops("_softmax", "_log_softmax", "softmax", "log_softmax", "cumsum", "cumprod", "_safe_softmax"))
def softmax(w: Walker, node) -> None:
    """Normalizing along the channel dim couples all channels: they stay fixed."""
    x = node.tensor_inputs()[0]
    pass_unless_along(w, node, x, [bind(node)["dim"] % len(w.shape(x))])
