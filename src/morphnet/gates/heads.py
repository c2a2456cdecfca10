"""Where per-head gates go: the input of an attention module's output projection.

The channel analysis prunes heads in the attention modules of
``morphnet.channels.handlers.attention.ATTENTION_MODULES``: a head's q, k and v rows and the
output projection's columns that read it are one channel group. A gate that zeroes a head
must reach every reader of that group. The heads merged back (``num_heads * head_dim``
channels) are read by the output projection only; q and k feed nothing but the head's own
attention weights and v only the head's output, so a closed gate on the projection's input
proves the whole head dead (``channels/coverage.py`` checks it like any other source). One
logit per head (``LogisticSigmoidHeadGate``) makes the head the unit of the penalty and of the
expected cost.

A projection qualifies when it is an ``nn.Linear`` called as a module (so a forward pre-hook
sees its input), its input columns come in runs of ``head_dim`` that each lie in one channel
group, and those groups are written by the q / k / v projections of one attention module.
That finds timm's ``Attention`` and ``WindowAttention`` (``proj``), torchvision's MaxViT
attention (``merge``), Hugging Face's Llama (``o_proj``), ViT and BERT (the ``dense`` layer of
the attention output, a sibling module). Where consecutive heads share one group (Llama's
grouped-query attention: the query heads of one key / value head) one logit gates the block.

``nn.MultiheadAttention`` applies its output projection inside functional code, where no hook
reaches; ``add_gates`` gives such a module a subclass whose forward computes the same attention
and calls ``out_proj`` as a module (``GatedMultiheadAttention``; the rebuild's ``SlimMultiheadAttention`` has the same
forward), and ``fold_gates`` /
``remove_gates`` restore the class. Attention whose output projection is otherwise applied in
functional code (torchvision's Swin passes the weights of ``qkv`` and ``proj`` to a function) or
is not an ``nn.Linear`` (GPT-2's ``Conv1D``) gets no head gate: ``add_gates`` warns, and its
heads keep whatever per-channel gates its projections get (none in those two).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from morphnet.channels.handlers.attention import ATTENTION_MODULES, attention_kind

_MHA = "torch.nn.modules.activation.MultiheadAttention"


def multihead_attention_forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                                average_attn_weights=True, is_causal=False):
    """``nn.MultiheadAttention.forward`` with ``num_heads`` heads of ``head_dim`` (pruned heads: the inner width
    need not be ``embed_dim``) and ``self.out_proj`` called as a module (so a head gate's pre-hook on it runs):
    the same packed projections, scale ``head_dim ** -0.5`` and masks. Packed projections without ``bias_k`` /
    ``add_zero_attn``. Used by ``GatedMultiheadAttention`` and the rebuild's ``SlimMultiheadAttention``."""
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not self.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    n, length, source = query.shape[0], query.shape[1], key.shape[1]
    h, d = self.num_heads, self.head_dim
    if query is key and key is value:  # self-attention: one product with the packed weight, as the
        # seed's forward does, so analysing the slim model sees (and counts) its input projection
        q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
    else:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    q = q.reshape(n, length, h, d).transpose(1, 2)
    k = k.reshape(n, source, h, d).transpose(1, 2)
    v = v.reshape(n, source, h, d).transpose(1, 2)
    attn = (q * d ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
    for mask, shape in ((attn_mask, (-1, h, length, source)), (key_padding_mask, (n, 1, 1, source))):
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = attn.new_zeros(mask.shape).masked_fill(mask, float("-inf"))
            attn = attn + (mask.reshape(shape) if mask.dim() > 2 or shape[0] == n else mask)
    attn = F.dropout(attn.softmax(-1), self.dropout, self.training)
    out = self.out_proj((attn @ v).transpose(1, 2).reshape(n, length, h * d))
    if not batched:
        out = out.squeeze(0)
    elif not self.batch_first:
        out = out.transpose(0, 1)
    weights = None
    if need_weights:
        weights = attn.mean(1) if average_attn_weights else attn
        if not batched:
            weights = weights.squeeze(0)
    return out, weights


class GatedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose forward calls ``out_proj`` as a module (see the module docstring)."""

    forward = multihead_attention_forward
    _ungated_class = nn.MultiheadAttention


_GATED_CLASSES: dict[type, type] = {nn.MultiheadAttention: GatedMultiheadAttention}


def _gated_class(klass: type) -> type:
    if klass not in _GATED_CLASSES:
        _GATED_CLASSES[klass] = type(f"Gated{klass.__name__}", (klass,), {
            "forward": multihead_attention_forward, "_ungated_class": klass, "__module__": __name__})
    return _GATED_CLASSES[klass]


def swap_attention_forwards(model: nn.Module) -> list[nn.Module]:
    """Give every supported ``nn.MultiheadAttention`` of ``model`` (one whose class keeps PyTorch's
    forward) the gated forward; returns the modules changed."""
    swapped = []
    for module in model.modules():
        kind = attention_kind(module)
        if kind == _MHA and type(module).forward is nn.MultiheadAttention.forward and \
                ATTENTION_MODULES[kind](module) is not None:
            module.__class__ = _gated_class(type(module))
            swapped.append(module)
    return swapped


def restore_attention_forward(module: nn.Module) -> None:
    """Undo ``swap_attention_forwards`` for ``module`` (nothing for other modules)."""
    original = type(module).__dict__.get("_ungated_class")
    if original is not None:
        module.__class__ = original


def _attention_modules(model: nn.Module) -> dict[str, int]:
    """Attention module name -> head width, for the supported configurations of ``ATTENTION_MODULES``."""
    found = {}
    for name, module in model.named_modules():
        kind = attention_kind(module)
        head_dim = ATTENTION_MODULES[kind](module) if kind is not None else None
        if head_dim:
            found[name] = head_dim
    return found


def _inside(module: str, name: str) -> bool:
    return module == name or name == "" or module.startswith(name + ".")


def head_hosts(model: nn.Module, analysis, prunable: np.ndarray) -> dict[str, tuple[str, int, int, np.ndarray]]:
    """Output projection -> (its attention module, head width, heads, each head's channel group), for
    every projection that can take a head gate on its input (see the module docstring).
    ``prunable``: bool per channel group."""
    attention = _attention_modules(model)
    if not attention:
        return {}
    modules = dict(model.named_modules())
    group_of = analysis.group_of
    found: dict[str, tuple[str, int, int, np.ndarray]] = {}
    for call in analysis.layer_calls:
        host = modules.get(call.module)
        prefix = f"{call.module}." if call.module else ""
        if call.kind != "linear" or not isinstance(host, nn.Linear) or call.weight != prefix + "weight" or \
                analysis.graph.nodes[call.node].module != call.module or call.module in found:
            continue
        groups = group_of[call.in_ids]
        if not prunable[groups].any():
            continue
        for name, head_dim in attention.items():
            if len(groups) % head_dim:
                continue
            runs = groups.reshape(-1, head_dim)
            if not (runs == runs[:, :1]).all():
                continue
            written = [group_of[info.out_ids] for info in analysis.weights.values()
                       if info.module != call.module and _inside(info.module, name)]
            if written and np.isin(runs[:, 0], np.concatenate(written)).all():
                per = _heads_per_group(runs[:, 0])
                found[call.module] = (name, head_dim * per, len(runs) // per, runs[::per, 0])
                break
    return found


def _heads_per_group(heads: np.ndarray) -> int:
    """Consecutive heads that share one channel group, when every group is such a block of equal size
    (grouped-query attention: the query heads of one key / value head); else 1. One logit then
    gates the block, the unit the rebuild can remove."""
    for per in range(len(heads), 1, -1):
        if len(heads) % per == 0:
            blocks = heads.reshape(-1, per)
            if (blocks == blocks[:, :1]).all():
                return per
    return 1


def head_groups(model: nn.Module, analysis, prunable: np.ndarray) -> dict[str, np.ndarray]:
    """Attention module -> its prunable head groups: groups that hold several rows of one of its
    projections (a head's q, k or v rows; a residual channel holds one row of each layer)."""
    out: dict[str, np.ndarray] = {}
    for name in _attention_modules(model):
        found = []
        for info in analysis.weights.values():
            if _inside(info.module, name):
                g, counts = np.unique(analysis.group_of[info.out_ids], return_counts=True)
                found.append(g[(counts > 1) & prunable[g]])
        if found and len(np.concatenate(found)):
            out[name] = np.unique(np.concatenate(found))
    return out
