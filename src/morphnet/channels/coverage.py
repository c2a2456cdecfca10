"""Which channel groups a source can prove dead: zeros followed from the source to every reader.

A source (a BatchNorm scale, a conv's weight rows, a gate) is evidence that a channel is
dead only for the values it produces: the output of *that* BatchNorm, conv or gate. A
channel group may be removed only if, with every source of the group at zero, no op that
*reads* the group's channels still sees a non-zero value. Removing the group deletes its
channels from every tensor they appear in (the raw conv output, the shortcut, the sum),
so a reader that saw a non-zero value would compute something else in the slim model.

The pass runs once per source over the recorded graph, after the channel walk. Each
value that carries channels gets a flag per channel entry, "zero when the group is dead":

- the outputs of the source's own ops (its *zero points*) are zero;
- zero-preserving per-channel ops pass zeros on (``relu(0) = 0``; ``x * s`` is zero when
  either factor is; ``x + y`` only when both are; views, pooling, concat map entries; a
  depthwise conv without a bias maps channel c to its own outputs);
- other per-channel ops (``sigmoid``, a BatchNorm that is not a source, LayerNorm, a
  depthwise conv with a bias) make a non-zero value of the same channels, which is harmless
  until something reads it;
- every other op is a *reader* (the inputs of dense and grouped convs and of linear layers,
  reductions over channels, attention, unknown ops, the model's outputs): a non-zero entry
  it reads marks that entry's group as *uncovered*.

All groups are tested in one pass: per-channel ops only combine entries of one group
(element-wise operands are tied together), so whether an entry is zero depends on its own
group's sources alone. Examples: a post-activation ResNet (every conv output is read only
by its BatchNorm) and a pre-activation stack (the raw stream is read only by BatchNorms
and adds) are covered; MaxViT's MBConv, whose raw block input is read by the projection
shortcut as well as through ``pre_norm``, is not. A squeeze-excitation scale is computed
from the channel but only multiplies it, so it never uncovers it.

Rules are registered per op family with ``@zero_rule`` (aten ops) or
``@zero_rule_module`` (leaf modules), in the style of the channel handlers; an op without
a rule is a reader unless it is tagged ``pointwise`` (then: non-zero output, no read).
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from morphnet.capture.graph import LeafOp, ValueRef
from morphnet.channels.walker import ChannelAnalysis, bind, vid
from morphnet.channels.views import _MAX_EXPANDED, view_groups

aten = torch.ops.aten
ZERO_RULES: dict = {}
ZERO_LEAF_RULES: dict[type, Callable] = {}


def zero_rule(*names: str) -> Callable:
    """Register a zero-propagation rule for the aten overload packets ``names`` (missing ones skipped);
    ops of other namespaces by qualified name ("torchvision.roi_align")."""
    def register(fn):
        for n in names:
            if "." in n:
                ZERO_RULES[n] = fn
            elif hasattr(aten, n):
                ZERO_RULES[getattr(aten, n)] = fn
        return fn
    return register


def zero_rule_module(*module_types: type) -> Callable:
    """Register a zero-propagation rule for leaf modules of these types."""
    def register(fn):
        for t in module_types:
            ZERO_LEAF_RULES[t] = fn
        return fn
    return register


class ZeroPass:
    """Zero flags per channel entry of every value, and the elements readers saw non-zero."""

    def __init__(self, analysis: ChannelAnalysis, zero_points: Iterable[int]):
        self.analysis = analysis
        self.graph = analysis.graph
        self.chans = analysis.value_chans
        self.points = set(zero_points)
        self.zero: dict[int, np.ndarray] = {}
        self.seen: list[np.ndarray] = []

    def z(self, v: int | None) -> np.ndarray | None:
        """Zero flags along ``v``'s channel dim (all False unless set); None when ``v`` has no channels."""
        c = self.chans.get(v) if v is not None else None
        if c is None:
            return None
        got = self.zero.get(v)
        return got if got is not None else np.zeros(len(c.ids), dtype=bool)

    def set(self, v: int | None, flags: np.ndarray | None) -> None:
        c = self.chans.get(v) if v is not None else None
        if c is not None and flags is not None and len(flags) == len(c.ids) and flags.any():
            self.zero[v] = flags

    def read(self, v: int) -> None:
        """An op reads ``v``: its non-zero entries uncover their groups."""
        c = self.chans.get(v)
        if c is not None:
            self.seen.append(c.ids[~self.z(v)])

    def aligned(self, inputs: list[int], out: int | None) -> list[np.ndarray | None]:
        """Zero flags of broadcasting operands at the output's channel positions (None: not aligned)."""
        oc = self.chans.get(out) if out is not None else None
        flags = []
        for v in inputs:
            c = self.chans.get(v)
            if oc is None or c is None or len(c.ids) != len(oc.ids) or \
                    c.dim + len(self.graph.values[out].shape) - len(self.graph.values[v].shape) != oc.dim:
                flags.append(None)
            else:
                flags.append(self.z(v))
        return flags

    def run(self) -> np.ndarray:
        """Covered flag per channel group: no reader sees a non-zero entry of it."""
        for node in self.graph.nodes:
            if isinstance(node.op, LeafOp):
                rule = next((ZERO_LEAF_RULES[k] for k in node.op.module_type.__mro__ if k in ZERO_LEAF_RULES), reader)
            else:
                rule = (ZERO_RULES.get(node.op) or ZERO_RULES.get(node.op.overloadpacket)
                        or ZERO_RULES.get(str(node.op.overloadpacket)))
                if rule is None:
                    rule = other_per_channel if torch.Tag.pointwise in getattr(node.op, "tags", ()) else reader
            rule(self, node)
            for o in node.outputs:  # the source's own outputs are zero, whatever the op's rule said
                if o is not None and o in self.points and o in self.chans:
                    self.zero[o] = np.ones(len(self.chans[o].ids), dtype=bool)
        for v in self.graph.outputs:
            self.read(v)
        a = self.analysis
        uncovered = np.zeros(a.num_groups, dtype=bool)
        if self.seen:
            uncovered[a.group_of[np.concatenate(self.seen)]] = True
        return ~uncovered


def covered_groups(analysis: ChannelAnalysis, zero_points: Iterable[int]) -> np.ndarray:
    """Per group: True when, with the values ``zero_points`` zero, every reader of the group sees zeros."""
    return ZeroPass(analysis, zero_points).run()


# ---- rules ------------------------------------------------------------------------------------------


def reader(zp: ZeroPass, node) -> None:
    """The default: the op reads every channel-carrying input; its outputs are not zero."""
    for v in node.tensor_inputs():
        zp.read(v)


def other_per_channel(zp: ZeroPass, node) -> None:
    """A per-channel op that does not keep zeros (sigmoid, exp, a BatchNorm that is no source): outputs
    are non-zero, but it reads nothing across channels, so only what reads its output can uncover."""


@zero_rule("relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "gelu", "gelu_", "silu", "silu_", "hardswish",
           "hardswish_", "mish", "mish_", "elu", "elu_", "selu", "selu_", "celu", "celu_", "tanh", "tanh_", "abs",
           "abs_", "neg", "neg_", "sign", "sgn", "sin", "sinh", "tan", "asinh", "atan", "erf", "sqrt", "square",
           "clone", "contiguous", "_to_copy", "detach", "detach_", "alias", "lift_fresh", "nan_to_num", "dropout",
           "feature_dropout", "rrelu_with_noise", "prelu", "_prelu_kernel")
def keeps_zero(zp: ZeroPass, node) -> None:
    """f(0) = 0 entry by entry: an output entry is zero where the first input's is."""
    ins = node.tensor_inputs()
    for o in node.outputs:
        flags = zp.aligned(ins[:1], o)[0] if ins else None
        zp.set(o, flags)


@zero_rule("native_dropout")
def native_dropout(zp: ZeroPass, node) -> None:
    """(x * mask * scale, mask): the first output keeps zeros."""
    ins = node.tensor_inputs()
    if node.outputs and node.outputs[0] is not None:
        zp.set(node.outputs[0], zp.aligned(ins[:1], node.outputs[0])[0])


@zero_rule("hardtanh", "hardtanh_", "clamp", "clamp_", "clip", "clip_")
def clamp(zp: ZeroPass, node) -> None:
    """Clamping keeps zeros when 0 lies between the bounds (ReLU6, tensor bounds: no)."""
    b = bind(node)
    lo = b.get("min_val", b.get("min"))
    hi = b.get("max_val", b.get("max"))
    if all(t is None or (isinstance(t, (int, float)) and not isinstance(t, bool)) for t in (lo, hi)) and \
            (lo is None or lo <= 0) and (hi is None or hi >= 0):
        keeps_zero(zp, node)


@zero_rule("threshold", "threshold_")
def threshold(zp: ZeroPass, node) -> None:
    """threshold(x, t, value) is x where x > t, else value: zero at zero when value == 0 or t < 0."""
    b = bind(node)
    if b.get("value") == 0 or b.get("threshold", 0) < 0:
        keeps_zero(zp, node)


@zero_rule("mul", "mul_", "multiply", "_mul")
def product(zp: ZeroPass, node) -> None:
    """x * y is zero where either channel-carrying factor is (a squeeze-excitation scale times x)."""
    out = node.outputs[0]
    flags = [f for f in zp.aligned(node.tensor_inputs(), out) if f is not None]
    if flags:
        zp.set(out, np.logical_or.reduce(flags))


@zero_rule("div", "div_", "divide", "true_divide")
def quotient(zp: ZeroPass, node) -> None:
    """x / y is zero where x is (y is never zero in a working model)."""
    b = bind(node)
    x = vid(b.get("self"))
    if x is not None:
        zp.set(node.outputs[0], zp.aligned([x], node.outputs[0])[0])


def _all_zero(zp: ZeroPass, out: int | None, data: list) -> None:
    """Zero where every data operand is: tensors aligned and zero, numbers equal to 0."""
    if out is None:
        return
    flags = []
    for d in data:
        if d is None:
            continue
        if not isinstance(d, ValueRef):
            if not isinstance(d, (int, float, bool)) or d != 0:
                return
            continue
        f = zp.aligned([d.index], out)[0]
        if f is None:  # a tensor without these channels (a bias, a broadcast constant)
            return
        flags.append(f)
    if flags:
        zp.set(out, np.logical_and.reduce(flags))


@zero_rule("add", "add_", "sub", "sub_", "subtract", "maximum", "minimum", "fmax", "fmin")
def total(zp: ZeroPass, node) -> None:
    """x + y (and max / min) is zero only where both are: a raw shortcut added to a zero branch is not."""
    b = bind(node)
    _all_zero(zp, node.outputs[0], [b.get("self"), b.get("other")])


@zero_rule("where")
def where(zp: ZeroPass, node) -> None:
    """where(c, x, y) is zero where both x and y are."""
    b = bind(node)
    _all_zero(zp, node.outputs[0], [b.get("self"), b.get("other")])


def _map_by_ids(zp: ZeroPass, x: int, out: int | None) -> None:
    """An output whose channel entries are entries of ``x`` (a view, a pool): zero where every entry of
    ``x`` with the same element is zero."""
    oc = zp.chans.get(out) if out is not None else None
    xc = zp.chans.get(x)
    if oc is None or xc is None:
        return
    zx = zp.z(x)
    if not zx.any():
        return
    nonzero = set(xc.ids[~zx].tolist())
    known = set(xc.ids.tolist())
    zp.set(out, np.array([i in known and i not in nonzero for i in oc.ids.tolist()], dtype=bool))


@zero_rule("permute", "transpose",
           "transpose_", "swapaxes", "t", "t_", "expand", "expand_as", "broadcast_to", "unsqueeze", "unsqueeze_",
           "squeeze", "squeeze_", "slice", "narrow", "select", "split", "split_with_sizes", "unbind", "chunk",
           "unsafe_split", "tensor_split", "as_strided", "flip", "roll", "index_select", "index", "repeat",
           "mean", "sum", "nansum", "amax", "amin", "var", "std", "linalg_vector_norm", "norm", "prod", "cumsum",
           "cumprod", "avg_pool1d", "avg_pool2d", "avg_pool3d",
           "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
           "_adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
           "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d",
           "upsample_bicubic2d", "upsample_linear1d", "upsample_trilinear3d", "_upsample_nearest_exact2d",
           "_upsample_bilinear2d_aa", "fractional_max_pool2d", "lp_pool2d", "reflection_pad1d", "reflection_pad2d",
           "reflection_pad3d", "replication_pad1d", "replication_pad2d", "replication_pad3d", "pixel_unshuffle",
           "channel_shuffle", "native_channel_shuffle", "torchvision.roi_align", "torchvision.roi_pool")
def moves_entries(zp: ZeroPass, node) -> None:
    """Views, slicing, pooling, resizing, sums over other dims: each output entry is made of entries
    of the first input with the same channel, so it is zero where they all are (a max / mean of zeros is
    zero). Second outputs (pooling indices) are never zero."""
    ins = node.tensor_inputs()
    if not ins:
        return
    outs = node.outputs
    if node.op.overloadpacket in (aten.max_pool1d_with_indices, aten.max_pool2d_with_indices,
                                  aten.max_pool3d_with_indices, aten.fractional_max_pool2d):
        outs = outs[:1]
    for o in outs:
        _map_by_ids(zp, ins[0], o)


@zero_rule("pixel_shuffle")
def pixel_shuffle(zp: ZeroPass, node) -> None:
    """Output channel c is made of the r^2 input channels of block c: zero where the whole block is."""
    x, out = node.tensor_inputs()[0], node.outputs[0]
    xc, oc = zp.chans.get(x), zp.chans.get(out)
    if xc is not None and oc is not None and xc.dim == oc.dim and len(xc.ids) % max(len(oc.ids), 1) == 0 and \
            len(xc.ids) != len(oc.ids):
        zp.set(out, zp.z(x).reshape(len(oc.ids), -1).all(1))
    else:
        moves_entries(zp, node)


@zero_rule("constant_pad_nd")
def constant_pad(zp: ZeroPass, node) -> None:
    """Padding with zeros keeps zeros."""
    if bind(node).get("value", 0) == 0:
        moves_entries(zp, node)


@zero_rule("max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
           "max_pool3d_with_indices")
def max_pool(zp: ZeroPass, node) -> None:
    """A max of zeros is zero. Also when the input was padded with a constant <= 0 (timm's "same" max
    pooling pads with -inf first): the padded tensor is not zero, but a window holding one of its zeros
    and otherwise values <= 0 has the maximum 0, so the output is zero where the unpadded input is,
    provided every window holds an unpadded entry."""
    moves_entries(zp, node)
    x, out = node.tensor_inputs()[0], node.outputs[0]
    producer = zp.graph.values[x].producer
    pad = zp.graph.nodes[producer] if producer is not None else None
    if pad is None or isinstance(pad.op, LeafOp) or pad.op.overloadpacket is not aten.constant_pad_nd:
        return
    p = bind(pad)
    value, src = p.get("value", 0), vid(p["self"])
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0 and src is not None and \
            _windows_hold_input(zp.graph.values[src].shape, zp.graph.values[out].shape, list(p["pad"]), bind(node),
                                next(d for d in (1, 2, 3) if f"max_pool{d}d" in str(node.op.overloadpacket))):
        _map_by_ids(zp, src, out)


def _windows_hold_input(shape, out_shape, pads: list, pool: dict, n: int) -> bool:
    """Every window of an ``n``-d max pooling over ``shape`` padded by ``pads`` (``constant_pad_nd``'s layout:
    last dim first) holds at least one entry of the unpadded tensor along every pooled (trailing) dim; pads
    only on pooled dims."""

    def per_dim(v, default) -> list:
        v = default if v is None or (isinstance(v, (list, tuple)) and not v) else v
        v = [v] if isinstance(v, int) else list(v)
        return v * n if len(v) == 1 else v

    kernel = per_dim(pool["kernel_size"], None)
    stride, padding, dilation = per_dim(pool["stride"], kernel), per_dim(pool["padding"], 0), \
        per_dim(pool["dilation"], 1)
    if any(v < 0 for v in pads) or any(pads[2 * n:]) or not len(kernel) == len(stride) == len(padding) == n:
        return False
    for i in range(n):
        end = n - 1 - i  # pads[2 * end] is before dim i of the pooled dims, pads[2 * end + 1] after it
        before = pads[2 * end] if 2 * end < len(pads) else 0
        length = shape[len(shape) - n + i]
        starts = np.arange(out_shape[len(out_shape) - n + i]) * stride[i] - padding[i]
        taps = starts[:, None] + np.arange(kernel[i])[None, :] * dilation[i]  # positions in the padded tensor
        if not ((taps >= before) & (taps < before + length)).any(1).all():
            return False
    return True


@zero_rule("convolution", "_convolution", "convolution_overrideable")
def convolution(zp: ZeroPass, node) -> None:
    """A convolution whose output channel o reads input channel o // m alone (depthwise: groups equal to
    the input channels, multiplier m >= 1, transposed or not) and lies in that channel's group reads
    nothing across groups: without a bias it maps a zero channel to zero channels (its padding is zeros;
    reflect / replicate padding are pads before it, which keep zeros too; circular padding is written with
    in-place copies, which keep its channels fixed); with one it outputs
    the bias, non-zero unless the bias is the source's own evidence (then the output is a zero point).
    Any other convolution reads its input: a grouped one with several input channels per group mixes
    channels of different groups, since only position j of every group is tied."""
    b = bind(node)
    x, out = vid(b["input"]), node.outputs[0]
    xc, oc = zp.chans.get(x), zp.chans.get(out) if out is not None else None
    groups = zp.analysis.group_of
    if xc is None or oc is None or xc.dim != 1 or oc.dim != 1 or int(b["groups"]) != len(xc.ids) or \
            len(oc.ids) % len(xc.ids) != 0 or \
            not np.array_equal(groups[oc.ids], groups[np.repeat(xc.ids, len(oc.ids) // len(xc.ids))]):
        reader(zp, node)
        return
    for v in node.tensor_inputs():  # the weight and the bias: channel-free, or read like any other op's
        if v != x:
            zp.read(v)
    if b.get("bias") is None:
        zp.set(out, np.repeat(zp.z(x), len(oc.ids) // len(xc.ids)))


@zero_rule("cat", "concat", "stack")
def cat(zp: ZeroPass, node) -> None:
    """Along channels: the pieces' flags side by side; along another dim: zero where every piece is."""
    b = bind(node)
    out = node.outputs[0]
    oc = zp.chans.get(out)
    if oc is None:
        return
    tensors = [vid(t) for t in b["tensors"]]
    stacked = node.op.overloadpacket is aten.stack
    dim = b.get("dim", 0) % len(zp.graph.values[out].shape)
    if not stacked:
        tensors = [t for t in tensors if zp.graph.values[t].shape != (0,)]
    if not stacked and oc.dim == dim:
        parts = []
        for t in tensors:
            c = zp.chans.get(t)
            parts.append(zp.z(t) if c is not None and c.dim == dim else
                         np.zeros(zp.graph.values[t].shape[dim], dtype=bool))
        zp.set(out, np.concatenate(parts) if parts else None)
        return
    flags = []
    for t in tensors:
        c = zp.chans.get(t)
        if c is None or len(c.ids) != len(oc.ids):
            return
        flags.append(zp.z(t))
    if flags:
        zp.set(out, np.logical_and.reduce(flags))


@zero_rule("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
           "_native_batch_norm_legit_functional", "_batch_norm_with_update", "_batch_norm_no_update",
           "cudnn_batch_norm", "miopen_batch_norm", "batch_norm", "native_layer_norm", "layer_norm",
           "_fused_rms_norm", "rms_norm", "_softmax", "_log_softmax", "softmax",
           "log_softmax", "_safe_softmax", "sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "exp", "softplus",
           "logsumexp", "copy_", "fill_", "zero_", "empty_like", "zeros_like", "ones_like", "full_like",
           "rand_like", "randn_like", "bernoulli", "bernoulli_", "normal_", "uniform_")
def per_channel(zp: ZeroPass, node) -> None:
    """Normalizations that are not the source (BatchNorm(0) = beta - gamma * mean / std), softmax,
    sigmoid, factories shaped like a channel tensor: non-zero output, no read across channels."""
    other_per_channel(zp, node)


@zero_rule("native_group_norm", "group_norm")
def group_norm(zp: ZeroPass, node) -> None:
    """A GroupNorm group of zeros normalizes to zeros; its affine bias (beta) makes them non-zero."""
    b = bind(node)
    x, out = vid(b["input"]), node.outputs[0]
    groups = int(b.get("group", b.get("num_groups")))
    flags = zp.aligned([x], out)[0]
    if b.get("bias") is None and flags is not None and len(flags) % groups == 0:
        zp.set(out, np.repeat(flags.reshape(groups, -1).all(1), len(flags) // groups))


@zero_rule_module(torch.nn.modules.instancenorm._InstanceNorm)
def instance_norm(zp: ZeroPass, node) -> None:
    """InstanceNorm keeps zeros without a bias and without running statistics (eval: (0 - mean) / std)."""
    prefix = f"{node.kwargs['module']}." if node.kwargs["module"] else ""
    if not any(prefix + k in zp.graph.state_shapes for k in ("bias", "running_mean")):
        keeps_zero(zp, node)


# ---- issue 12: heads (views that split or merge the channel dim, products between activations,
# fused attention, bias adds after a decomposed linear). Kept apart from the rules above.


@zero_rule("view", "_unsafe_view", "reshape", "_reshape_alias", "unflatten", "flatten")
def reshaped(zp: ZeroPass, node) -> None:
    """A view that splits the channel dim (heads: C -> (3, heads, head_dim)) or merges it with others
    (heads merged back, a flatten): each output channel entry is zero where every input channel entry
    whose elements land in it is, followed by position, not by element id (a head's carrier id is
    the id of one of its channels only)."""
    x, out = node.tensor_inputs()[0], node.outputs[0]
    xc, oc = zp.chans.get(x), zp.chans.get(out) if out is not None else None
    if xc is None or oc is None:
        return
    zx = zp.z(x)
    if not zx.any():
        return
    where = view_positions(zp.graph.values[x].shape, zp.graph.values[out].shape, xc.dim, oc.dim)
    if where is not None:
        zp.set(out, zx[where].all(1))


def view_positions(old, new, dim: int, out_dim: int) -> np.ndarray | None:
    """For a reshape ``old -> new``: row j lists the positions along ``dim`` of ``old`` whose elements
    land at position j along ``out_dim`` of ``new`` (None when the two dims are not reshaped together)."""
    old, new = tuple(old), tuple(new)
    for ga, gb in view_groups(old, new):
        if dim not in ga:
            continue
        if out_dim not in gb:
            return None
        sizes = [old[d] for d in ga]
        if int(np.prod(sizes, dtype=np.int64)) > _MAX_EXPANDED:
            return None
        shape = [1] * len(ga)
        shape[ga.index(dim)] = old[dim]
        full = np.broadcast_to(np.arange(old[dim]).reshape(shape), sizes).reshape([new[d] for d in gb])
        return np.moveaxis(full, gb.index(out_dim), 0).reshape(new[out_dim], -1)
    return None


def _product_nodes(zp: ZeroPass) -> set[int]:
    got = getattr(zp, "_products", None)
    if got is None:
        got = zp._products = {p.node for p in zp.analysis.products}
    return got


@zero_rule("bmm", "baddbmm")
def batched_product(zp: ZeroPass, node) -> None:
    """A product between activations the analysis recorded (q.k^T, attn x v; ``activation_bmm``):

    - heads on the batch dim of both: head h of ``a @ b`` is ``a[h] @ b[h]``, zero where either is
      (softmax makes non-zero weights, so attn x v is zero for a head whose v is; a relative
      position bias added to the logits does not matter);
    - channels on the contracted dim of both: a channel whose entries are zero on one side adds
      nothing to the sum, so only channels non-zero on both sides are read;
    - a channel dim on a free dim of one side: the output keeps its zeros.
    ``baddbmm`` adds its bias: zero only where the bias carries the same channels and is zero too.
    Any other product (a linear layer's ``bmm`` with an expanded weight) reads its inputs."""
    if node.index not in _product_nodes(zp):
        reader(zp, node)
        return
    b = bind(node)
    a, m = vid(b.get("self" if "mat2" in b else "batch1")), vid(b.get("mat2", b.get("batch2")))
    bias = vid(b.get("self")) if "batch1" in b else None
    out = node.outputs[0]
    ca, cm, oc = zp.chans.get(a), zp.chans.get(m), zp.chans.get(out)
    ra, rm = len(zp.graph.values[a].shape), len(zp.graph.values[m].shape)
    role_a = None if ca is None else {ra - 1: "contract", ra - 2: "free"}.get(ca.dim, "batch")
    role_m = None if cm is None else {rm - 2: "contract", rm - 1: "free"}.get(cm.dim, "batch")
    flags = None
    if role_a == role_m == "batch" and oc is not None and ca.dim == cm.dim == oc.dim and \
            len(ca.ids) == len(cm.ids) == len(oc.ids):
        flags = zp.z(a) | zp.z(m)
    elif role_a == role_m == "contract" and len(ca.ids) == len(cm.ids):
        both = ~(zp.z(a) | zp.z(m))
        zp.seen.append(ca.ids[both])
        zp.seen.append(cm.ids[both])
    else:
        for v, role in ((a, role_a), (m, role_m)):
            c = zp.chans.get(v)
            if role == "free" and oc is not None and len(c.ids) == len(oc.ids) and \
                    oc.dim == len(zp.graph.values[out].shape) - (2 if v == a else 1) and flags is None:
                flags = zp.z(v)
            elif c is not None:
                zp.read(v)
    if bias is not None:
        bf = zp.aligned([bias], out)[0]
        if flags is not None:
            flags = flags & bf if bf is not None else None
        if bf is None:
            zp.read(bias)
    zp.set(out, flags)


@zero_rule("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
           "_flash_attention_forward", "_efficient_attention_forward")
def fused_attention(zp: ZeroPass, node) -> None:
    """Fused attention with heads on a leading dim of q, k, v and the output (``fused_attention`` in
    the handlers): head h of the output is softmax(q[h] k[h]^T) v[h], zero where v[h] is. q and k of a
    head only feed that head's output, so they are not read; other inputs (masks) are."""
    b = bind(node)
    q, k, v = (vid(b.get(n)) for n in ("query", "key", "value"))
    out = node.outputs[0]
    cs = [zp.chans.get(t) for t in (q, k, v, out)]
    if any(c is None for c in cs) or len({c.dim for c in cs}) != 1 or len({len(c.ids) for c in cs}) != 1 or \
            node.index not in _product_nodes(zp):
        reader(zp, node)
        return
    for t in node.tensor_inputs():
        if t not in (q, k, v):
            zp.read(t)
    zp.set(out, zp.z(v))


def fold_bias_adds(analysis: ChannelAnalysis) -> None:
    """``x @ W^T`` followed by a separate ``+ b`` (``F.linear`` on a 3-D input decomposes so, as in
    ``nn.MultiheadAttention``'s packed input projection): ``b`` becomes ``W``'s bias (group lasso's
    "alive when the weights or the bias are above the limit") and the sum a zero point of ``W``.
    Only for a 1-D parameter aligned entry by entry with ``W``'s output channels (or the part of it
    that goes with a part of ``W``'s rows, as in cross-attention's ``b.chunk(3)``), or a bias joined from
    1-D states whose parts go with ``W``'s rows (EVA's ``qkv_bias_separate``), added to a value that is
    already ``W``'s zero point, when ``W`` has no other bias."""
    graph = analysis.graph
    owner = {}
    for name, values in analysis.zero_points.items():
        if name in analysis.weights:
            for v in values:
                owner[v] = name
    adds = {aten.add.Tensor, aten.add_.Tensor}
    views = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
    for node in graph.nodes:
        if isinstance(node.op, LeafOp) or not node.outputs or node.outputs[0] is None:
            continue
        if node.op in views:  # [tokens, C] -> [L, N, C]: the last dim keeps its positions
            x, out = node.tensor_inputs()[0], node.outputs[0]
            xc, oc = analysis.value_chans.get(x), analysis.value_chans.get(out)
            if x in owner and xc is not None and oc is not None and np.array_equal(xc.ids, oc.ids) and \
                    xc.dim == len(graph.values[x].shape) - 1 and oc.dim == len(graph.values[out].shape) - 1:
                owner[out] = owner[x]
            continue
        if node.op not in adds:
            continue
        b = bind(node)
        x, y = vid(b.get("self")), vid(b.get("other"))
        for lin, bias in ((x, y), (y, x)):
            weight = owner.get(lin)
            if weight is not None and bias in analysis.joined and weight not in analysis.biases and \
                    _aligned_joined_bias(analysis, weight, lin, bias, node.outputs[0]):
                analysis.biases[weight] = list(analysis.joined[bias])
                analysis.zero_points[weight].append(node.outputs[0])
                owner[node.outputs[0]] = weight
                break
            if weight is None or bias is None or \
                    analysis.biases.get(weight) not in (None, _bias_entries(analysis, bias)[0]):
                continue
            if _aligned_bias(analysis, weight, lin, bias, node.outputs[0]):
                analysis.biases[weight] = _bias_entries(analysis, bias)[0]
                analysis.zero_points[weight].append(node.outputs[0])
                owner[node.outputs[0]] = weight
                break


def _bias_entries(analysis: ChannelAnalysis, v: int) -> tuple[str | None, int]:
    """The 1-D state value ``v`` is (all of it, or a part of it) and its first entry."""
    name = analysis.graph.values[v].state_name
    if name is not None:
        return name, 0
    part = analysis.parts.get(v)
    if part is None or len(part[0].dims) != 1 or part[0].dims[0] != 0:
        return None, 0
    return part[0].name, part[1].get(0, 0)


def _aligned_bias(analysis: ChannelAnalysis, weight: str, lin: int, bias: int, out: int) -> bool:
    graph, chans = analysis.graph, analysis.value_chans
    name, start = _bias_entries(analysis, bias)
    info = analysis.weights[weight]
    lc, oc = chans.get(lin), chans.get(out)
    if name is None or name not in graph.parameters or lc is None or oc is None or name in analysis.opaque_states:
        return False
    n, k = len(info.out_ids), len(lc.ids)
    if graph.state_shapes.get(name) != (n,) or tuple(graph.values[bias].shape) != (k,) or \
            lc.dim != len(graph.values[lin].shape) - 1 or oc.dim != len(graph.values[out].shape) - 1:
        return False
    slot = analysis.alignments.get((name, 0))
    rows = info.out_ids[start:start + k]  # the weight's rows this part of the bias goes with
    return (slot is not None and np.array_equal(lc.ids, rows) and np.array_equal(oc.ids, rows)
            and np.array_equal(analysis.group_of[slot], analysis.group_of[info.out_ids]))


def _aligned_joined_bias(analysis: ChannelAnalysis, weight: str, lin: int, bias: int, out: int) -> bool:
    """``bias`` joins 1-D states (``torch.cat((q_bias, k_bias, v_bias))``) that go, part by part, with all of
    ``weight``'s rows, which ``lin`` and the sum carry on their last dim."""
    graph, chans = analysis.graph, analysis.value_chans
    rows = analysis.weights[weight].out_ids
    lc, oc = chans.get(lin), chans.get(out)
    if lc is None or oc is None or tuple(graph.values[bias].shape) != (len(rows),) or \
            lc.dim != len(graph.values[lin].shape) - 1 or oc.dim != len(graph.values[out].shape) - 1 or \
            not np.array_equal(lc.ids, rows) or not np.array_equal(oc.ids, rows):
        return False
    for name, start in analysis.joined[bias]:
        slot = analysis.alignments.get((name, 0))
        if slot is None or name in analysis.opaque_states or \
                not np.array_equal(analysis.group_of[slot], analysis.group_of[rows[start:start + len(slot)]]):
            return False
    return True


__all__ = ["ZERO_RULES", "ZERO_LEAF_RULES", "ZeroPass", "covered_groups", "zero_rule", "zero_rule_module",
           "reader", "keeps_zero", "other_per_channel",
           "fold_bias_adds", "view_positions"]
