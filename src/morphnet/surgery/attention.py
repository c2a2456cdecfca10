"""Attribute fix-ups of attention modules whose heads were pruned.

Keyed like ``morphnet.channels.handlers.attention.ATTENTION_MODULES`` (class names, so
no framework is imported): the analysis follows head splits only in those classes, and
after the rebuild narrowed their projections, each fix-up sets the head count the
module's forward reads. The head width and the attention scale never change, so the
rebuilt module computes the same function on the surviving heads.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from morphnet.channels.handlers.attention import ATTENTION_MODULES, attention_kind
from morphnet.gates.heads import multihead_attention_forward


class SlimMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose heads span less than ``embed_dim``.

    PyTorch's functional attention derives the head width from ``embed_dim`` (the
    query's width), so a module with pruned heads (inner width ``num_heads * head_dim``
    no longer ``embed_dim``, or a pruned input width) needs this forward: the same packed projections, the same
    scale ``head_dim ** -0.5`` and masks, with ``num_heads`` heads. Supports packed
    projections without ``bias_k`` / ``add_zero_attn`` (what the analysis prunes).
    """

    forward = multihead_attention_forward


def _mha(module: nn.Module, original: nn.Module) -> None:
    if module.in_proj_weight.shape != original.in_proj_weight.shape:  # heads or the input width pruned
        module.num_heads = module.in_proj_weight.shape[0] // 3 // original.head_dim
        module.embed_dim = module.kdim = module.vdim = module.in_proj_weight.shape[1]
        module.__class__ = SlimMultiheadAttention


def _timm_attention(module: nn.Module, original: nn.Module) -> None:
    module.num_heads = module.qkv.weight.shape[0] // 3 // original.head_dim
    if hasattr(module, "attn_dim"):
        module.attn_dim = module.num_heads * original.head_dim


def _timm_attention_rope(module: nn.Module, original: nn.Module) -> None:
    rows = module.qkv.weight.shape[0] // 3 if module.qkv is not None else module.q_proj.weight.shape[0]
    module.num_heads = module.num_kv_heads = rows // original.head_dim
    module.attn_dim = module.kv_dim = rows


def _eva_attention_forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                           attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """timm's EvaAttention with ``num_heads`` heads of the original width (its own forward reshapes the
    heads back to the input width): the same projections and biases, q / k norms, rotary embedding after
    the prefix tokens, scale, masks, output norm and gate."""
    from timm.layers import apply_rot_embed_cat, maybe_add_mask, resolve_self_attn_mask

    n, length, _ = x.shape
    h, d = self.num_heads, self.head_dim
    gate = self.gate(x).sigmoid() if self.gate is not None else None
    if self.qkv is not None:
        if self.q_bias is None:
            qkv = self.qkv(x)
        elif self.qkv_bias_separate:
            qkv = self.qkv(x) + torch.cat((self.q_bias, self.k_bias, self.v_bias))
        else:
            qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(n, length, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (proj(x).reshape(n, length, h, d).transpose(1, 2) for proj in (self.q_proj, self.k_proj,
                                                                                   self.v_proj))
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        p, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], dim=2).type_as(v)
    if self.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                             dropout_p=self.attn_drop.p if self.training else 0.0)
    else:
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(length, attn, attn_mask, is_causal=is_causal))
        out = self.attn_drop(attn.softmax(dim=-1)) @ v
    out = self.norm(out.transpose(1, 2).reshape(n, length, h * d))
    if gate is not None:
        out = out * gate
    return self.proj_drop(self.proj(out))


def _timm_eva_attention(module: nn.Module, original: nn.Module) -> None:
    projection = "qkv" if original.qkv is not None else "q_proj"
    rows = getattr(module, projection).weight.shape[0] // (3 if projection == "qkv" else 1)
    module.num_heads = rows // original.head_dim
    if getattr(module, projection).weight.shape != getattr(original, projection).weight.shape:
        module.__class__ = _slim_class(type(original), _eva_attention_forward)


def _timm_window_attention(module: nn.Module, original: nn.Module) -> None:
    head_dim = original.qkv.out_features // 3 // original.num_heads
    module.num_heads = module.qkv.weight.shape[0] // 3 // head_dim


def _window_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """torchvision's shifted window attention with ``num_heads`` heads of the original width.

    torchvision's functional version derives the head width from the input's width, which
    head pruning leaves unchanged; this one reads it from the projection (same scale)."""
    n, height, width, c = x.shape
    wh, ww = self.window_size
    x = F.pad(x, (0, 0, 0, (-width) % ww, 0, (-height) % wh))
    ph, pw = x.shape[1], x.shape[2]
    shift = [0 if wh >= ph else self.shift_size[0], 0 if ww >= pw else self.shift_size[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    rows, cols, area = ph // wh, pw // ww, wh * ww
    windows = x.view(n, rows, wh, cols, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(n * rows * cols, area, c)
    heads, d = self.num_heads, self.head_dim
    q, k, v = self.qkv(windows).view(windows.shape[0], area, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * d ** -0.5) @ k.transpose(-2, -1) + self.get_relative_position_bias()
    if sum(shift) > 0:
        region = x.new_zeros((ph, pw))
        label = 0
        for hs in ((0, -wh), (-wh, -shift[0]), (-shift[0], None)):
            for ws in ((0, -ww), (-ww, -shift[1]), (-shift[1], None)):
                region[hs[0]:hs[1], ws[0]:ws[1]] = label
                label += 1
        region = region.view(rows, wh, cols, ww).permute(0, 2, 1, 3).reshape(rows * cols, area)
        mask = (region.unsqueeze(1) - region.unsqueeze(2) != 0).to(attn.dtype) * -100.0
        attn = attn.view(n, rows * cols, heads, area, area) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(n * rows * cols, heads, area, area)
    attn = F.dropout(attn.softmax(-1), self.attention_dropout, self.training)
    out = (attn @ v).transpose(1, 2).reshape(windows.shape[0], area, heads * d)
    out = F.dropout(self.proj(out), self.dropout, self.training)
    out = out.view(n, rows, cols, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(n, ph, pw, c)
    if sum(shift) > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :height, :width, :].contiguous()


_SLIM_CLASSES: dict[type, type] = {}


def _slim_class(klass: type, forward) -> type:
    """A subclass of ``klass`` with ``forward`` (one per class, so rebuilt models share it)."""
    if klass not in _SLIM_CLASSES:
        _SLIM_CLASSES[klass] = type(f"Slim{klass.__name__}", (klass,), {"forward": forward,
                                                                        "__module__": __name__})
    return _SLIM_CLASSES[klass]


def _torchvision_window_attention(module: nn.Module, original: nn.Module) -> None:
    head_dim = original.qkv.out_features // 3 // original.num_heads
    if module.qkv.weight.shape != original.qkv.weight.shape:  # heads or the input width pruned
        module.num_heads = module.qkv.weight.shape[0] // 3 // head_dim
        module.head_dim = head_dim
        module.__class__ = _slim_class(type(original), _window_attention_forward)


def _maxvit_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """torchvision MaxViT's attention with ``n_heads`` heads (its own reshapes back to the input width)."""
    b, g, p, _ = x.shape
    h, d = self.n_heads, self.head_dim
    q, k, v = self.to_qkv(x).view(b, g, p, 3, h, d).permute(3, 0, 1, 4, 2, 5).unbind(0)
    attn = F.softmax(q @ (k * self.scale_factor).transpose(-2, -1) + self.get_relative_positional_bias(), dim=-1)
    return self.merge((attn @ v).permute(0, 1, 3, 2, 4).reshape(b, g, p, h * d))


def _torchvision_maxvit_attention(module: nn.Module, original: nn.Module) -> None:
    if module.to_qkv.weight.shape != original.to_qkv.weight.shape:  # heads or the input width pruned
        module.n_heads = module.to_qkv.weight.shape[0] // 3 // original.head_dim
        module.__class__ = _slim_class(type(original), _maxvit_attention_forward)


# attention classes whose forward cannot run with zero heads (timm's window attention infers the
# head width with -1): the rebuild keeps one head there
def _hf_bert_self_attention(module: nn.Module, original: nn.Module) -> None:
    module.all_head_size = module.query.weight.shape[0]  # (the children's attributes are fixed after this)
    module.num_attention_heads = module.all_head_size // original.attention_head_size


def _hf_vit_attention(module: nn.Module, original: nn.Module) -> None:
    module.num_attention_heads = module.q_proj.weight.shape[0] // original.head_dim


def _hf_llama_attention(module: nn.Module, original: nn.Module) -> None:
    """Nothing stored: heads are inferred with view(-1, head_dim), and a key / value head goes with all
    of its query heads, so num_key_value_groups stays."""


def _hf_gpt2_attention(module: nn.Module, original: nn.Module) -> None:
    module.split_size = module.c_attn.weight.shape[1] // 3  # Conv1D: [in, out]; q, k, v split by it
    module.num_heads = module.split_size // original.head_dim
    module.embed_dim = module.c_attn.weight.shape[0]  # the residual width (informational: forward reads split_size)


# forwards that cannot run with zero heads (a size inferred with -1, a split by a size of 0)
NEEDS_A_HEAD = ("timm.models.swin_transformer.WindowAttention",
                "transformers.models.gpt2.modeling_gpt2.GPT2Attention")


FIXUPS: dict[str, Callable[[nn.Module, nn.Module], None]] = {
    "torch.nn.modules.activation.MultiheadAttention": _mha,
    "timm.layers.attention.Attention": _timm_attention,
    "timm.layers.attention.AttentionRope": _timm_attention_rope,
    "timm.models.eva.EvaAttention": _timm_eva_attention,
    "timm.models.swin_transformer.WindowAttention": _timm_window_attention,
    "torchvision.models.swin_transformer.ShiftedWindowAttention": _torchvision_window_attention,
    "torchvision.models.maxvit.RelativePositionalMultiHeadAttention": _torchvision_maxvit_attention,
    "transformers.models.bert.modeling_bert.BertSelfAttention": _hf_bert_self_attention,
    "transformers.models.vit.modeling_vit.ViTAttention": _hf_vit_attention,
    "transformers.models.llama.modeling_llama.LlamaAttention": _hf_llama_attention,
    "transformers.models.gpt2.modeling_gpt2.GPT2Attention": _hf_gpt2_attention,
}
assert set(FIXUPS) == set(ATTENTION_MODULES), "every attention module the analysis prunes needs a fix-up"


def _torchvision_vit(module: nn.Module, original: nn.Module) -> None:
    module.hidden_dim = module.conv_proj.weight.shape[0]  # read by its patch reshape


def _hf_conv1d(module: nn.Module, original: nn.Module) -> None:
    module.nx, module.nf = module.weight.shape  # GPT-2's transposed linear: its forward reshapes to nf


def _hf_llama_model(module: nn.Module, original: nn.Module) -> None:
    """The residual width (pruned only with prune_normalized=True) in the rebuilt copy's own config, which
    its layers share (the original's is untouched); per-layer widths have no place in a config."""
    module.config.hidden_size = module.embed_tokens.weight.shape[1]


def _hf_gpt2_model(module: nn.Module, original: nn.Module) -> None:
    """GPT-2's residual width (pruned only with prune_normalized=True) in the rebuilt copy's own config
    (``n_embd``, which ``hidden_size`` maps to) and the model's ``embed_dim``."""
    module.config.n_embd = module.embed_dim = module.wte.weight.shape[1]


def _hf_llama_decoder_layer(module: nn.Module, original: nn.Module) -> None:
    module.hidden_size = module.input_layernorm.weight.shape[0]  # informational: forward does not read it


def _hf_llama_mlp(module: nn.Module, original: nn.Module) -> None:
    module.intermediate_size, module.hidden_size = module.gate_proj.weight.shape  # informational too


# transformer models that store their residual width (pruned only with prune_normalized=True), and
# layers that store their widths (Hugging Face's Conv1D, Llama's blocks)
WIDTH_FIXUPS: dict[str, Callable[[nn.Module, nn.Module], None]] = {
    "torchvision.models.vision_transformer.VisionTransformer": _torchvision_vit,
    "transformers.pytorch_utils.Conv1D": _hf_conv1d,
    "transformers.models.gpt2.modeling_gpt2.GPT2Model": _hf_gpt2_model,
    "transformers.models.llama.modeling_llama.LlamaModel": _hf_llama_model,
    "transformers.models.llama.modeling_llama.LlamaDecoderLayer": _hf_llama_decoder_layer,
    "transformers.models.llama.modeling_llama.LlamaMLP": _hf_llama_mlp,
}


def fix_attention(module: nn.Module, original: nn.Module) -> bool:
    """Update the head count of a known attention module (or the width a known transformer
    stores); False for other modules."""
    kind = attention_kind(original)
    if kind is not None:
        FIXUPS[kind](module, original)
        return True
    for klass in type(original).__mro__:
        key = f"{klass.__module__}.{klass.__qualname__}"
        if key in WIDTH_FIXUPS:
            WIDTH_FIXUPS[key](module, original)
            return True
    return False


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _heads_of(module: nn.Module) -> tuple[int, int | None] | None:
    """(heads, head width or None) of an attention-like module, or None.

    The query projection's width over the head width comes first (Hugging Face modules that keep
    the head count only in their config, such as Llama's, and every rebuilt module); then an
    integer ``num_heads`` / ``n_heads`` / ``num_attention_heads`` attribute (the fix-ups above
    keep those current)."""
    head_dim = _int(getattr(module, "head_dim", None)) or _int(getattr(module, "attention_head_size", None))
    query = getattr(module, "q_proj", None) or getattr(module, "query", None)
    if head_dim and isinstance(query, nn.Linear):
        return query.out_features // head_dim, head_dim
    for attribute in ("num_heads", "n_heads", "num_attention_heads"):
        heads = _int(getattr(module, attribute, None))
        if heads is not None:
            kind = attention_kind(module)
            if head_dim is None and kind is not None and heads:
                try:
                    head_dim = ATTENTION_MODULES[kind](module)
                except (AttributeError, ZeroDivisionError):
                    head_dim = None
            return heads, head_dim
    return None


def head_counts(model: nn.Module) -> dict[str, tuple[int, int | None]]:
    """Attention module name -> (heads, head width or None), in module order, for ``model`` as it is
    (a seed or a rebuilt slim model). Only the innermost of nested modules that carry a head count
    is listed (torchvision's ``EncoderBlock`` stores ``num_heads`` and so does its attention, whose
    count the rebuild updates). Empty for a model without attention."""
    found = {name: heads for name, module in model.named_modules() if (heads := _heads_of(module)) is not None}

    def inside(inner: str, outer: str) -> bool:
        return inner != outer and (outer == "" or inner.startswith(outer + "."))

    return {name: value for name, value in found.items() if not any(inside(other, name) for other in found)}
