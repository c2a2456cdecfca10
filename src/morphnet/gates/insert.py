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

``fold_gates`` bakes the inference mask into the host (conv / linear output weights and
bias, normalization scale and shift: exact in training and eval mode) and removes the
gate; a gate whose host has no such parameters becomes a fixed ``ChannelScale``.
``remove_gates`` drops the gates without folding (for retraining from scratch).
"""

from __future__ import annotations

import itertools
import re
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from morphnet.channels import analyze_model
from morphnet.gates.gate import ChannelScale, LogisticSigmoidGate

GATE_ATTRIBUTE = "gate"
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def _apply_gate(module: nn.Module, args, output):
    """Forward hook of a gate's host: gate the host's output."""
    return getattr(module, GATE_ATTRIBUTE)(output)


def _gate_hooks(module: nn.Module) -> list[int]:
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


def _hosts(model: nn.Module, analysis) -> dict[str, tuple[str, int, int]]:
    """Host name -> (the layer it gates for, channel dim, channels), in model order."""
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
            found[name] = (name, 1, graph.values[outs[0]].shape[1])
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
            found[name] = (name, dim, graph.values[outputs[name][0]].shape[dim])
    order = {n: i for i, n in enumerate(modules)}
    return dict(sorted(found.items(), key=lambda kv: order[kv[0]]))


def _selected(hosts: dict[str, tuple], where) -> dict[str, tuple]:
    if where is None:
        return hosts
    if callable(where):
        return {h: v for h, v in hosts.items() if where(h) or where(v[0])}
    if isinstance(where, str):
        where = [where]
    chosen = {}
    for pattern in where:
        hits = {h: v for h, v in hosts.items() if re.search(pattern, h) or re.search(pattern, v[0])}
        if not hits:
            raise ValueError(f"add_gates: where pattern {pattern!r} matches no layer that can take a gate; "
                             f"they look like {list(hosts)[:3]}")
        chosen.update(hits)
    return {h: v for h, v in hosts.items() if h in chosen}


def add_gates(model: nn.Module, example_inputs, where: Sequence[str] | Callable[[str], bool] | None = None, *,
              input_boundary=None, output_boundary=None, prune_outputs: bool = False,
              **gate_options) -> nn.Module:
    """Insert a ``LogisticSigmoidGate`` after every prunable layer of ``model`` (in place; returns it).

    ``where`` restricts the layers: regular expressions (``re.search``) or a predicate over
    module names, matched against the gate's host and the conv / linear layer it gates for.
    ``input_boundary``, ``output_boundary`` and ``prune_outputs`` mean what they mean for the
    regularizers (pass the same values). ``gate_options`` go to every gate (``temperature``,
    ``log_odds_init``, ``straight_through``, ...). Call this before creating the optimizer,
    so that it trains the gates' logits.
    """
    existing = gated_modules(model)
    if existing:
        raise ValueError(f"add_gates: {type(model).__name__} already has gates (e.g. '{next(iter(existing))}'); "
                         f"remove them first with morphnet.remove_gates(model)")
    analysis = analyze_model(model, example_inputs, input_boundary=input_boundary,
                             output_boundary=output_boundary, prune_outputs=prune_outputs)
    hosts = _selected(_hosts(model, analysis), where)
    for name, (_, dim, channels) in hosts.items():
        host = model.get_submodule(name)
        if hasattr(host, GATE_ATTRIBUTE):
            raise ValueError(f"add_gates: module '{name}' ({type(host).__name__}) already has an attribute "
                             f"'{GATE_ATTRIBUTE}'; exclude it with where=...")
        gate = LogisticSigmoidGate(channels, channel_dim=dim, **gate_options)
        like = next((t for t in itertools.chain(host.parameters(), host.buffers()) if t.is_floating_point()), None)
        if like is not None:
            gate.to(device=like.device, dtype=like.dtype)
        host.add_module(GATE_ATTRIBUTE, gate)
        host.register_forward_hook(_apply_gate)
    return model


def _detach_gate(host: nn.Module) -> None:
    for key in _gate_hooks(host):
        del host._forward_hooks[key]
    del host._modules[GATE_ATTRIBUTE]


def _hosts_of_gates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if _gate_hooks(m)
            and isinstance(getattr(m, GATE_ATTRIBUTE, None), (LogisticSigmoidGate, ChannelScale))]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def remove_gates(model: nn.Module) -> nn.Module:
    """Drop every gate without folding its mask (in place; returns ``model``).

    For a model that is about to be rebuilt and retrained from scratch. Gates that
    ``add_gates`` inserted go with their hooks; gates placed in the model's own code become
    ``nn.Identity``.
    """
    for _, host in _hosts_of_gates(model):
        _detach_gate(host)
    for name in gated_modules(model):
        _replace(model, name, nn.Identity())
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


def fold_gates(model: nn.Module) -> nn.Module:
    """Bake every gate's inference mask into the model and remove the gate (in place; returns ``model``).

    The result computes what the gated model computes in eval mode. A gate inserted by
    ``add_gates`` scales its host's output weights and bias (conv / linear) or scale and
    shift (normalization); where the host has none (BatchNorm with ``affine=False``) and
    for gates placed in the model's own code, the gate becomes a ``ChannelScale``.
    """
    with torch.no_grad():
        for name, host in _hosts_of_gates(model):
            gate = getattr(host, GATE_ATTRIBUTE)
            if isinstance(gate, ChannelScale):
                continue
            mask = gate.inference_mask()
            if _fold_into(host, mask):
                _detach_gate(host)
            else:
                host._modules[GATE_ATTRIBUTE] = ChannelScale(mask, gate.channel_dim)
        for name, gate in gated_modules(model).items():
            _replace(model, name, ChannelScale(gate.inference_mask(), gate.channel_dim))
    return model
