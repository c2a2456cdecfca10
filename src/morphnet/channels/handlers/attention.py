"""Attention: heads split off the channel dim, and products between activations.

A view that splits channels into heads is followed exactly only inside the attention
modules of ``ATTENTION_MODULES`` (keyed by class name, so no framework is imported):
their rebuild (``morphnet.surgery.attention``) updates the head count, and their
scale is an attribute or the unchanged head width, so a rebuilt model computes the
same function. There a head is the pruning unit: q, k and v rows of a head and the
output projection's columns that read it form one channel group.

Products between activations (q.k^T, attn x v as ``bmm``, scaled-dot-product
attention) tie the channels they pair (the batch dim of a ``bmm`` carries heads) and
count FLOPs as FlopCounterMode does: ``2 * b * m * k * n`` for a ``bmm``, the same
two products for a fused attention kernel.
"""

from __future__ import annotations

import sys
from typing import Callable

import numpy as np
from torch import nn

from morphnet.channels.walker import Chan, ProductCall, Walker, bind, vid
from morphnet.channels.handlers.registry import _io, _ops, _record_data, handles


def _eva_head_dim(m: nn.Module) -> int | None:
    """The EvaAttention whose forward the rebuild's replaces (timm with ``resolve_self_attn_mask``, gates and
    q / k norms); an older one keeps its heads."""
    layers = sys.modules.get("timm.layers")
    current = layers is not None and hasattr(layers, "resolve_self_attn_mask") and hasattr(layers, "maybe_add_mask")
    attributes = ("gate", "q_norm", "k_norm", "norm", "qkv_bias_separate", "num_prefix_tokens", "fused_attn")
    return m.head_dim if current and all(hasattr(m, a) for a in attributes) else None


def _mha_head_dim(m: nn.Module) -> int | None:
    """Packed self-attention without extra key / value biases (what the rebuild supports)."""
    supported = getattr(m, "_qkv_same_embed_dim", False) and m.bias_k is None and not m.add_zero_attn
    return m.head_dim if supported else None


# class (module.qualname) -> head width of an instance, or None when its configuration is not supported
ATTENTION_MODULES: dict[str, Callable[[nn.Module], int | None]] = {
    "torch.nn.modules.activation.MultiheadAttention": _mha_head_dim,
    "timm.layers.attention.Attention": lambda m: m.head_dim,
    # rotary embeddings act inside a head (its width stays), so whole heads prune; grouped-query
    # AttentionRope ties heads with repeat_interleave, which is not followed: its heads stay
    "timm.layers.attention.AttentionRope": lambda m: m.head_dim if m.num_kv_groups == 1 else None,
    # EVA / timm's rotary ViTs (vit_*_rope_reg*): rotary pairs and q / k norms act inside a head; its
    # rebuild gets a forward that merges the heads back to num_heads * head_dim (its own reads the input width)
    "timm.models.eva.EvaAttention": _eva_head_dim,
    "timm.models.swin_transformer.WindowAttention": lambda m: m.qkv.out_features // 3 // m.num_heads,
    "torchvision.models.maxvit.RelativePositionalMultiHeadAttention": lambda m: m.head_dim,
    "torchvision.models.swin_transformer.ShiftedWindowAttention":
        lambda m: None if hasattr(m, "logit_scale") else m.qkv.out_features // 3 // m.num_heads,
    # Hugging Face (transformers >= 5): heads inferred with view(..., -1, head_dim), scaling stored
    "transformers.models.bert.modeling_bert.BertSelfAttention": lambda m: m.attention_head_size,
    "transformers.models.vit.modeling_vit.ViTAttention": lambda m: m.head_dim,
    # grouped-query: repeat_kv ties a key / value head to the query heads that read it (one group)
    "transformers.models.llama.modeling_llama.LlamaAttention": lambda m: m.head_dim,
    "transformers.models.gpt2.modeling_gpt2.GPT2Attention": lambda m: None if m.is_cross_attention else m.head_dim,
}

# attention classes that split their packed q / k / v projection by a size attribute (not ``chunk``),
# which their rebuild updates: there equal parts of that split keep their channels
SPLIT_BY_ATTRIBUTE = ("transformers.models.gpt2.modeling_gpt2.GPT2Attention",)


# attention classes whose rebuild replaces their forward when their packed projection narrows
# (``SlimMultiheadAttention``): the constant sizes their own code cuts that projection by (PyTorch's
# cross-attention: ``w.split([E, 2 * E])``) are cut anew, so its parts there may narrow
RECUTS_ITS_PROJECTION = ("torch.nn.modules.activation.MultiheadAttention",)


def recuts_its_projection(w: Walker, module: str) -> bool:
    """``module`` is an attention module of ``RECUTS_ITS_PROJECTION`` whose configuration is supported."""
    m = w.modules.get(module)
    kind = attention_kind(m) if m is not None else None
    return kind in RECUTS_ITS_PROJECTION and ATTENTION_MODULES[kind](m) is not None


def attention_kind(module: nn.Module) -> str | None:
    """The ``ATTENTION_MODULES`` key of ``module``'s class (or of a base class), or None."""
    for klass in type(module).__mro__:
        key = f"{klass.__module__}.{klass.__qualname__}"
        if key in ATTENTION_MODULES:
            return key
    return None


def split_rule(w: Walker, module: str) -> tuple[str, int | None]:
    """How a view in ``module`` that splits the channel dim is followed.

    ``("heads", head_dim)`` in a supported attention module, ``("fixed", None)`` in one
    whose configuration the rebuild does not support, ``("groups", None)`` elsewhere.
    """
    m = w.modules.get(module)
    kind = attention_kind(m) if m is not None else None
    if kind is None:
        return "groups", None
    head_dim = ATTENTION_MODULES[kind](m)
    return ("fixed", None) if head_dim is None else ("heads", head_dim)


def split_by_attribute(w: Walker, module: str) -> bool:
    """``module`` is an attention module of ``SPLIT_BY_ATTRIBUTE`` whose configuration is supported."""
    m = w.modules.get(module)
    kind = attention_kind(m) if m is not None else None
    return kind in SPLIT_BY_ATTRIBUTE and ATTENTION_MODULES[kind](m) is not None


def _role(c: Chan | None, contract: int, free: int) -> str | None:
    if c is None:
        return None
    if c.dim == contract:
        return "contract"
    if c.dim == free:
        return "free"
    return "batch"


def activation_bmm(w: Walker, node, a: int, b: int, bias: int | None = None) -> None:
    """``a @ b`` between activations, [..., m, k] x [..., k, n].

    Channels on the same batch dim (heads) or on the contracted dim are tied; a channel
    dim of one side only keeps its width. FLOPs: 2 * m * k * n per batch entry.
    """
    out = node.outputs[0]
    sa, sb = w.shape(a), w.shape(b)
    ra, rb = len(sa), len(sb)
    ca, cb = w.chan(a), w.chan(b)
    role_a, role_b = _role(ca, ra - 1, ra - 2), _role(cb, rb - 2, rb - 1)
    out_chan, ids = None, None
    if role_a == role_b == "batch" and ra == rb and ca.dim == cb.dim:
        w.elements.union(ca.ids, cb.ids)
        out_chan, ids = Chan(ca.dim, ca.ids), ca.ids
    elif role_a == role_b == "contract":
        w.elements.union(ca.ids, cb.ids)
        ids = ca.ids
    else:
        for v, role in ((a, role_a), (b, role_b)):
            if role in ("batch", "contract"):
                w.fix(v)
        if role_a == "free":
            out_chan, ids = Chan(len(w.shape(out)) - 2, ca.ids), ca.ids
        if role_b == "free":
            if out_chan is None:
                out_chan, ids = Chan(len(w.shape(out)) - 1, cb.ids), cb.ids
            else:
                w.fix(b)
    if bias is not None and w.chan(bias) is not None:
        if out_chan is not None and w.chan(bias).dim == out_chan.dim and len(w.shape(bias)) == len(w.shape(out)):
            w.elements.union(w.chan(bias).ids, out_chan.ids)  # baddbmm: a mask per head
        else:
            w.fix(bias)
    elif bias is not None and out_chan is not None:
        at = out_chan.dim - (len(w.shape(out)) - len(w.shape(bias)))
        if at >= 0 and w.shape(bias)[at] != 1:  # a computed bias as wide as the channels: they stay
            w.elements.fix(out_chan.ids)
            w.make_opaque(bias)
    w.set_chan(out, out_chan)
    w.derive(out, a, b)
    total = 2.0 * float(np.prod(w.shape(out), dtype=np.float64)) * sa[-1] / w.graph.batch_size
    _product(w, node, ids, total)
    _record_data(w, node, _io(node))


def _product(w: Walker, node, ids: np.ndarray | None, total: float) -> None:
    coef = total / len(ids) if ids is not None and len(ids) else total
    w.products.append(ProductCall(node.module, ids if ids is not None and len(ids) else None, coef, node.index))


@handles(*_ops("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
               "_flash_attention_forward", "_efficient_attention_forward"))
def fused_attention(w: Walker, node) -> None:
    """Fused scaled-dot-product attention on q [..., L, E], k [..., S, E], v [..., S, Ev].

    Heads (a leading dim of all three) are tied and carried to the output; channels on
    any other dim keep their width (the default scale reads E). FLOPs as FlopCounterMode's
    formula: 2 * L * S * (E + Ev) per batch entry.
    """
    b = bind(node)
    q, k, v = (vid(b.get(n)) for n in ("query", "key", "value"))
    sq, sv = w.shape(q), w.shape(v)
    heads = [w.chan(t) for t in (q, k, v)]
    lead = len(sq) - 2
    ids = None
    if (all(c is not None and c.dim < lead for c in heads) and len({c.dim for c in heads}) == 1
            and len({len(c.ids) for c in heads}) == 1):  # grouped-query attention (fewer k / v heads): fixed
        w.elements.union(heads[0].ids, heads[1].ids)
        w.elements.union(heads[0].ids, heads[2].ids)
        ids = heads[0].ids
        w.set_chan(node.outputs[0], Chan(heads[0].dim, ids))
    else:
        for t in (q, k, v):
            w.fix(t)
    for t in node.tensor_inputs():
        if t not in (q, k, v) and w.chan(t) is not None:
            w.fix(t)
    for o in node.outputs:
        w.derive(o, *node.tensor_inputs())
    batch = float(np.prod(sq[:-2], dtype=np.float64))
    total = 2.0 * batch * sq[-2] * w.shape(k)[-2] * (sq[-1] + sv[-1]) / w.graph.batch_size
    _product(w, node, ids, total)
    _record_data(w, node, _io(node))
