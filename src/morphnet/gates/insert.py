"""Put gates into an existing model without editing its code, and take them out again.

A gate is attached to the layer whose output it gates (its *host*) as a child module named
``gate`` plus a forward hook that returns ``host.gate(output)``. Why a hook and not a
wrapper container: the host keeps its class and its attribute path, so ``model.layer1[0].bn1``
is still the BatchNorm2d it was, code that checks types or names still works, every
existing state-dict key is unchanged (the gate only adds ``<host>.gate.logits``), and
``copy.deepcopy`` / ``apply_structure`` carry the gate along (the hook is a module-level
function that reads the gate from the host it is called on).

Where gates go (``add_gates``): after every conv / linear layer whose output channels are
prunable, or after its BatchNorm when that BatchNorm is the layer's only consumer; and
after every normalization layer with per-channel state (BatchNorm, GroupNorm,
InstanceNorm) on prunable channels, since a normalization turns a zero channel into a
non-zero one (its shift). Every path from a channel to the next layer then passes a gate,
so a channel group whose gates are all off is exactly zero and rebuilding without it
computes the same function.

Attention heads (``heads=True``, the default): where the analysis prunes heads, one
``LogisticSigmoidHeadGate`` with a logit per head goes on the input of the attention's output
projection (a forward pre-hook and a child named ``head_gate``; see ``morphnet.gates.heads``),
and the q / k / v projections get no per-channel gates, so a head is switched on or off as a
whole and its penalty and expected cost are the head's. Attention whose output projection
cannot take one (applied in functional code, or not an ``nn.Linear``) gets a warning and keeps
whatever per-channel gates its projections get.

``fold_gates`` bakes the inference mask into the host (conv / linear output weights and
bias, normalization scale and shift, a head gate's projection input columns: exact in
training and eval mode) and removes the gate; a gate whose host has no such parameters
becomes a fixed ``ChannelScale``.
``remove_gates`` drops the gates without folding (for retraining from scratch).
"""

from __future__ import annotations

import itertools
import re
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from morphnet.channels import analyze_model
from morphnet.gates.gate import ChannelScale, LogisticSigmoidGate, LogisticSigmoidHeadGate
from morphnet.gates.heads import head_groups, head_hosts, restore_attention_forward, swap_attention_forwards

GATE_ATTRIBUTE = "gate"
HEAD_GATE_ATTRIBUTE = "head_gate"
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def _apply_gate(module: nn.Module, args, output):
    """Forward hook of a gate's host: gate the host's output."""
    return getattr(module, GATE_ATTRIBUTE)(output)


def _apply_head_gate(module: nn.Module, args):
    """Forward pre-hook of a head gate's host (an output projection): gate the host's input."""
    return (getattr(module, HEAD_GATE_ATTRIBUTE)(args[0]),) + tuple(args[1:])


def _gate_hooks(module: nn.Module, attribute: str = GATE_ATTRIBUTE) -> list[int]:
    if attribute == HEAD_GATE_ATTRIBUTE:
        return [k for k, fn in module._forward_pre_hooks.items() if fn is _apply_head_gate]
    return [k for k, fn in module._forward_hooks.items() if fn is _apply_gate]


def gated_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> every gate of ``model`` (inserted by ``add_gates`` or placed by hand)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LogisticSigmoidGate)}


def _module_outputs(graph, users: dict[int, set[str]]) -> dict[str, list[int]]:
    """Module -> values its ops produce that another module reads or the model returns."""
    outs: dict[str, list[int]] = {}
    returned = set(graph.outputs)
    for node in graph.nodes:
        for v in node.outputs:
            if v is not None and (users.get(v, set()) - {node.module} or v in returned):
                outs.setdefault(node.module, []).append(v)
    return outs


def _readers(graph) -> dict[int, set[str]]:
    users: dict[int, set[str]] = {}
    for node in graph.nodes:
        for v in node.tensor_inputs():
            users.setdefault(v, set()).add(node.module)
    return users


def _norm_ids(analysis, name: str) -> np.ndarray | None:
    prefix = f"{name}." if name else ""
    for state in ("weight", "running_mean"):
        ids = analysis.alignments.get((prefix + state, 0))
        if ids is not None:
            return ids
    return None


def _hosts(model: nn.Module, analysis) -> dict[str, tuple[str, int, int, np.ndarray]]:
    """Host name -> (the layer it gates for, channel dim, channels, their element ids), in model order."""
    graph = analysis.graph
    modules = dict(model.named_modules())
    users = _readers(graph)
    outputs = _module_outputs(graph, users)
    prunable = ~analysis.fixed_group

    def is_prunable(ids) -> bool:
        return ids is not None and len(ids) > 0 and bool(prunable[analysis.group_of[ids]].any())

    found: dict[str, tuple[str, int, int]] = {}
    for name, outs in outputs.items():
        rank = len(graph.values[outs[0]].shape)
        if isinstance(modules.get(name), _NORMS) and rank >= 2 and is_prunable(_norm_ids(analysis, name)):
            found[name] = (name, 1, graph.values[outs[0]].shape[1], _norm_ids(analysis, name))
    for info in analysis.weights.values():
        name = info.module
        if name not in outputs or not isinstance(modules.get(name), _LAYERS) or not is_prunable(info.out_ids):
            continue
        readers = set().union(*[users.get(v, set()) for v in outputs[name]])
        if len(readers) == 1 and next(iter(readers)) in found:
            norm = next(iter(readers))
            found[norm] = (name,) + found[norm][1:]
        else:
            dim = -1 if isinstance(modules[name], nn.Linear) else 1
            found[name] = (name, dim, graph.values[outputs[name][0]].shape[dim], info.out_ids)
    order = {n: i for i, n in enumerate(modules)}
    return dict(sorted(found.items(), key=lambda kv: order[kv[0]]))


def _selected(hosts: dict[tuple[str, str], tuple], where) -> dict[tuple[str, str], tuple]:
    """The hosts (keyed by (host name, gate attribute)) whose host or layer matches ``where``."""
    if where is None:
        return hosts
    if callable(where):
        return {k: v for k, v in hosts.items() if where(k[0]) or where(v[0])}
    if isinstance(where, str):
        where = [where]
    chosen = set()
    for pattern in where:
        hits = {k for k, v in hosts.items() if re.search(pattern, k[0]) or re.search(pattern, v[0])}
        if not hits:
            raise ValueError(f"add_gates: where pattern {pattern!r} matches no layer that can take a gate; "
                             f"they look like {[k[0] for k in hosts][:3]}")
        chosen |= hits
    return {k: v for k, v in hosts.items() if k in chosen}


def _all_hosts(model: nn.Module, analysis, heads: bool, where) -> dict[tuple[str, str], tuple]:
    """(host, attribute) -> (layer or attention module, channel dim, channels, head width or None), in
    model order: per-channel gates after layers, head gates before output projections. The q / k / v
    projections of heads that a chosen head gate switches get no per-channel gate."""
    prunable = ~analysis.fixed_group
    found: dict[tuple[str, str], tuple] = {}
    groups: dict[tuple[str, str], np.ndarray] = {}
    if heads:
        for name, (attention, head_dim, count, head) in head_hosts(model, analysis, prunable).items():
            found[(name, HEAD_GATE_ATTRIBUTE)] = (attention, -1, count * head_dim, head_dim)
            groups[(name, HEAD_GATE_ATTRIBUTE)] = head
    for name, (layer, dim, channels, ids) in _hosts(model, analysis).items():
        found[(name, GATE_ATTRIBUTE)] = (layer, dim, channels, None)
        groups[(name, GATE_ATTRIBUTE)] = analysis.group_of[ids] if ids is not None else np.zeros(0, np.int64)
    found = _selected(found, where)
    covered = np.zeros(analysis.num_groups, bool)
    for key in found:
        if key[1] == HEAD_GATE_ATTRIBUTE:
            covered[groups[key]] = True
    for key in [k for k in found if k[1] == GATE_ATTRIBUTE]:
        g = groups[key][prunable[groups[key]]]
        if len(g) and covered[g].all():  # every prunable channel is in a head that a head gate switches
            del found[key]
    if heads and where is None:
        left = [a for a, g in head_groups(model, analysis, prunable).items() if not covered[g].all()]
        if left:
            warnings.warn(f"add_gates: the attention heads of {', '.join(repr(a) for a in left[:3])}"
                          f"{', ...' if len(left) > 3 else ''} get no per-head gate: their output projection is "
                          f"applied in functional code or is not an nn.Linear, so no hook can gate its input. Their "
                          f"q / k / v projections keep per-channel gates where they are called as modules, and a "
                          f"head is then pruned only when every channel gate of it is off", stacklevel=3)
    order = {n: i for i, n in enumerate(dict(model.named_modules()))}
    return dict(sorted(found.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])))


def add_gates(model: nn.Module, example_inputs, where: Sequence[str] | Callable[[str], bool] | None = None, *,
              input_boundary=None, output_boundary=None, prune_outputs: bool = False, heads: bool = True,
              **gate_options) -> nn.Module:
    """Insert a ``LogisticSigmoidGate`` after every prunable layer of ``model`` (in place; returns it).

    ``where`` restricts the layers: regular expressions (``re.search``) or a predicate over
    module names, matched against the gate's host and the conv / linear layer it gates for
    (for a head gate: the output projection and its attention module).
    ``input_boundary``, ``output_boundary`` and ``prune_outputs`` mean what they mean for the
    regularizers (pass the same values). ``heads=True`` gates attention heads whole: one
    ``LogisticSigmoidHeadGate`` (a logit per head) on the input of each output projection the
    analysis can prove reaches every reader of the heads, instead of per-channel gates on the
    q / k / v projections (``nn.MultiheadAttention`` gets a subclass whose forward calls its
    ``out_proj``; the class is restored by ``fold_gates`` / ``remove_gates``); ``heads=False``
    puts per-channel gates everywhere. ``gate_options`` go to every gate (``temperature``,
    ``log_odds_init``, ``straight_through``, ...). Call this before creating the optimizer,
    so that it trains the gates' logits.
    """
    existing = gated_modules(model)
    if existing:
        raise ValueError(f"add_gates: {type(model).__name__} already has gates (e.g. '{next(iter(existing))}'); "
                         f"remove them first with morphnet.remove_gates(model)")
    if heads:
        swap_attention_forwards(model)  # classes put back below where no head gate needs them
    try:
        analysis = analyze_model(model, example_inputs, input_boundary=input_boundary,
                                 output_boundary=output_boundary, prune_outputs=prune_outputs)
        hosts = _all_hosts(model, analysis, heads, where)
        for (name, attribute), (_, dim, channels, head_dim) in hosts.items():
            host = model.get_submodule(name)
            if hasattr(host, attribute):
                raise ValueError(f"add_gates: module '{name}' ({type(host).__name__}) already has an attribute "
                                 f"'{attribute}'; exclude it with where=...")
        for (name, attribute), (_, dim, channels, head_dim) in hosts.items():
            host = model.get_submodule(name)
            if head_dim is None:
                gate = LogisticSigmoidGate(channels, channel_dim=dim, **gate_options)
            else:
                gate = LogisticSigmoidHeadGate(channels // head_dim, head_dim, channel_dim=dim, **gate_options)
            like = next((t for t in itertools.chain(host.parameters(), host.buffers()) if t.is_floating_point()),
                        None)
            if like is not None:
                gate.to(device=like.device, dtype=like.dtype)
            host.add_module(attribute, gate)
            if head_dim is None:
                host.register_forward_hook(_apply_gate)
            else:
                host.register_forward_pre_hook(_apply_head_gate)
    finally:
        _restore_ungated_attention(model)
    return model


def _restore_ungated_attention(model: nn.Module) -> None:
    """Give attention modules whose output projection has no head gate (left) their class back."""
    for module in model.modules():
        out_proj = getattr(module, "out_proj", None)
        if not (isinstance(out_proj, nn.Module) and _gate_hooks(out_proj, HEAD_GATE_ATTRIBUTE)):
            restore_attention_forward(module)


def _detach_gate(host: nn.Module, attribute: str = GATE_ATTRIBUTE) -> None:
    hooks = host._forward_pre_hooks if attribute == HEAD_GATE_ATTRIBUTE else host._forward_hooks
    for key in _gate_hooks(host, attribute):
        del hooks[key]
    del host._modules[attribute]


def _hosts_of_gates(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(host name, host, gate attribute) of every gate ``add_gates`` attached."""
    return [(n, m, attribute) for n, m in model.named_modules() for attribute in (GATE_ATTRIBUTE, HEAD_GATE_ATTRIBUTE)
            if _gate_hooks(m, attribute)
            and isinstance(getattr(m, attribute, None), (LogisticSigmoidGate, ChannelScale))]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def remove_gates(model: nn.Module) -> nn.Module:
    """Drop every gate without folding its mask (in place; returns ``model``).

    For a model that is about to be rebuilt and retrained from scratch. Gates that
    ``add_gates`` inserted go with their hooks (and attention modules get their class back);
    gates placed in the model's own code become ``nn.Identity``.
    """
    for _, host, attribute in _hosts_of_gates(model):
        _detach_gate(host, attribute)
    for name in gated_modules(model):
        _replace(model, name, nn.Identity())
    _restore_ungated_attention(model)
    return model


def _fold_into(host: nn.Module, mask: torch.Tensor) -> bool:
    """Scale the host's output channels by ``mask``; False when it has nothing to scale."""
    def scale(t: torch.Tensor | None, shape) -> None:
        if t is not None:
            t.mul_(mask.to(t.dtype).reshape(shape))

    if isinstance(host, nn.modules.conv._ConvNd):
        w = host.weight
        if host.transposed:  # (in, out / groups, *kernel): output channel = group * (out / groups) + j
            g = host.groups
            w.view(g, w.shape[0] // g, w.shape[1], -1).mul_(mask.to(w.dtype).reshape(g, 1, -1, 1))
        else:
            scale(w, (-1,) + (1,) * (w.dim() - 1))
        scale(host.bias, (-1,))
        return True
    if isinstance(host, nn.Linear):
        scale(host.weight, (-1, 1))
        scale(host.bias, (-1,))
        return True
    if isinstance(host, _NORMS) and host.weight is not None:
        scale(host.weight, (-1,))
        scale(host.bias, (-1,))
        return True
    return False


def _fold_into_input(host: nn.Module, mask: torch.Tensor) -> bool:
    """Scale the input columns of a linear host by ``mask``; False for other hosts."""
    if isinstance(host, nn.Linear) and host.weight.shape[1] == len(mask):
        host.weight.mul_(mask.to(host.weight.dtype).reshape(1, -1))
        return True
    return False


def fold_gates(model: nn.Module) -> nn.Module:
    """Bake every gate's inference mask into the model and remove the gate (in place; returns ``model``).

    The result computes what the gated model computes in eval mode. A gate inserted by
    ``add_gates`` scales its host's output weights and bias (conv / linear) or scale and
    shift (normalization), a head gate its output projection's input columns; where the host
    has none (BatchNorm with ``affine=False``) and for gates placed in the model's own code,
    the gate becomes a ``ChannelScale``. Attention modules get their class back where it can
    run their heads (a rebuilt ``nn.MultiheadAttention`` with pruned heads keeps the rebuild's).
    """
    with torch.no_grad():
        for name, host, attribute in _hosts_of_gates(model):
            gate = getattr(host, attribute)
            if isinstance(gate, ChannelScale):
                continue
            mask = gate.channel_mask(gate.inference_mask())
            fold = _fold_into_input if attribute == HEAD_GATE_ATTRIBUTE else _fold_into
            if fold(host, mask):
                _detach_gate(host, attribute)
            else:
                host._modules[attribute] = ChannelScale(mask, gate.channel_dim)
        for name, gate in gated_modules(model).items():
            _replace(model, name, ChannelScale(gate.channel_mask(gate.inference_mask()), gate.channel_dim))
    _restore_ungated_attention(model)
    return model
