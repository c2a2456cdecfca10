"""From a structure (alive counts, a JSON file or a regularizer) to copies per channel group.

Everything in surgery works on one vector: ``copies[g]``, how many times channel group
``g`` appears in the rebuilt model. 0 removes the group, 1 keeps it, 2 or more builds it
again as fresh channels (wider than the seed, used by expansion). Every parameter
dimension that follows channels is rebuilt from it (``rebuild.py``), and the cost of any
copies vector is one call of the batched evaluator, so predicted costs and the rebuilt
model agree by construction.

Counts name conv / linear layers. A layer's output channels fall into channel groups
(a grouped conv's group ``j`` holds its channel ``j`` of every conv group, a depthwise
conv with multiplier 2 holds two outputs per input channel, GroupNorm ties the channels
it normalizes together): a count is met by taking the layer's prunable groups in the
order they first appear in its output channels, so "keep k" keeps the first k channels
of a plain layer. Fixed groups (model outputs, channels across a view the analysis
cannot map, ...) always stay. Coupled layers (residual adds, depthwise convs) share
groups; the first of them in graph order decides and the others must agree.
"""

from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import dataclass

import numpy as np
from torch import nn

from morphnet.channels import ChannelAnalysis, analyze_model
from morphnet.export import load_alive_counts
from morphnet.regularizers import NetworkRegularizer
from morphnet.surgery.attention import NEEDS_A_HEAD


@dataclass
class Layer:
    """The output channel groups of one conv / linear layer."""

    name: str
    groups: np.ndarray  # groups in order of first appearance
    mult: np.ndarray  # output channels of this layer in each group
    fixed: np.ndarray  # bool per group

    @property
    def width(self) -> int:
        return int(self.mult.sum())

    def count(self, copies: np.ndarray) -> int:
        return int((self.mult * copies[self.groups]).sum())


class LayerTable:
    """Conv / linear layers of an analysis, in graph order, with their output groups."""

    def __init__(self, analysis: ChannelAnalysis):
        self.analysis = analysis
        self.layers: dict[str, Layer] = {}
        for info in analysis.weights.values():
            if info.module in self.layers:
                continue
            gids = analysis.group_of[info.out_ids]
            uniq, first, mult = np.unique(gids, return_index=True, return_counts=True)
            order = np.argsort(first, kind="stable")
            groups = uniq[order]
            self.layers[info.module] = Layer(info.module, groups, mult[order], analysis.fixed_group[groups])


@dataclass
class Structure:
    """A structure resolved against a model's analysis."""

    analysis: ChannelAnalysis
    table: LayerTable
    copies: np.ndarray  # int64 per group
    names: list[str]  # the layers the structure lists, in graph order
    priority: np.ndarray  # per group; the highest is revived first when a layer would vanish
    regularizer: NetworkRegularizer | None = None
    nonempty: list | None = None  # (module, groups) of channel dims that need a channel; built on first use

    def counts(self, copies: np.ndarray | None = None) -> dict[str, int]:
        copies = self.copies if copies is None else copies
        return {n: self.table.layers[n].count(copies) for n in sorted(self.names)}


def resolve(model: nn.Module, structure, example_inputs) -> Structure:
    """Turn a counts dict, a path to an exporter JSON file or a network regularizer into copies."""
    if isinstance(structure, NetworkRegularizer):
        return _from_regularizer(model, structure)
    if isinstance(structure, (str, os.PathLike)):
        counts = load_alive_counts(structure)
        source = f"structure file {os.fspath(structure)}"
    elif isinstance(structure, dict):
        counts, source = structure, "structure"
    else:
        raise TypeError(f"structure must be a dict of alive counts, a path to an exporter JSON file or a network "
                        f"regularizer, got {type(structure).__name__}")
    analysis = analyze_model(model, example_inputs)  # the default analysis, as a regularizer's
    table = LayerTable(analysis)
    _check_names(model, table, counts, source)
    names = [n for n in table.layers if n in counts]
    copies = copies_for_counts(table, counts, names, source)
    first = np.zeros(analysis.num_groups)
    for layer in table.layers.values():  # the first group of a layer is revived first
        first[layer.groups[0]] = 1.0
    return Structure(analysis, table, copies, names, first)


def _from_regularizer(model: nn.Module, reg: NetworkRegularizer) -> Structure:
    a = reg.analysis
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    for (state, _dim) in a.alignments:
        t = own.get(state)
        if t is None or tuple(t.shape) != a.graph.state_shapes[state]:
            raise ValueError(f"the regularizer was built for a different model: '{state}' has shape "
                             f"{a.graph.state_shapes[state]} there but {None if t is None else tuple(t.shape)} in "
                             f"{type(model).__name__}; pass the model the regularizer was built on")
    table = LayerTable(a)
    alive_g, reg_g = reg.group_vectors()
    copies = (alive_g > 0.5).cpu().numpy().astype(np.int64)
    names = [n for n, layer in table.layers.items() if reg.grouping.regularized[layer.groups].any()]
    return Structure(a, table, copies, names, reg_g.detach().cpu().numpy(), reg)


def _check_names(model: nn.Module, table: LayerTable, counts: dict, source: str) -> None:
    modules = dict(model.named_modules())
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{source}: the count of '{name}' must be an integer, got {value!r}")
        if name in table.layers:
            continue
        if name in modules:
            raise ValueError(f"{source}: '{name}' is a {type(modules[name]).__name__}, not a conv or linear layer "
                             f"of {type(model).__name__} that the analysis found; structures list conv / linear "
                             f"layers by their output channels")
        close = difflib.get_close_matches(name, list(table.layers), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        prefixed = [n for n in table.layers if n.endswith("." + name)]
        if prefixed:
            hint += (f" (the file may have been exported with remove_common_prefix=True: "
                     f"'{prefixed[0]}' ends with it; restore the prefix)")
        raise ValueError(f"{source}: '{name}' is not a module of {type(model).__name__}{hint}")


def copies_for_counts(table: LayerTable, counts: dict[str, int], names: list[str],
                      source: str = "structure") -> np.ndarray:
    """Copies per group that give every layer in ``names`` its count (see the module docstring)."""
    copies = np.ones(table.analysis.num_groups, np.int64)
    owner: dict[int, str] = {}
    for name in names:
        layer = table.layers[name]
        k = int(counts[name])
        if k < 0:
            raise ValueError(f"{source}: '{name}' asks for {k} channels; counts must be >= 0")
        fixed = int(layer.mult[layer.fixed].sum())
        if k < fixed:
            raise ValueError(f"{source}: '{name}' asks for {k} channels but {fixed} of its {layer.width} output "
                             f"channels cannot be pruned (they are model outputs or cross an op whose channels "
                             f"stay fixed); its count must be at least {fixed}")
        decided = np.array([g in owner for g in layer.groups], dtype=bool)
        free = ~decided & ~layer.fixed
        taken = fixed + int((layer.mult[decided & ~layer.fixed] * copies[layer.groups[decided & ~layer.fixed]]).sum())
        need = k - taken
        if need != 0 and not decided.any() and not free.any():
            raise ValueError(f"{source}: '{name}' asks for {k} channels, but none of its {layer.width} output "
                             f"channels can be pruned or widened (they are model outputs or cross an op whose "
                             f"channels stay fixed); leave it out of the structure")
        if need < 0 or (need > 0 and not free.any()):
            others = sorted({owner[g] for g in layer.groups[decided]})
            raise ValueError(f"{source}: '{name}' asks for {k} channels, but its channels are coupled with "
                             f"{', '.join(repr(o) for o in others)} (residual add, depthwise conv or another "
                             f"element-wise op), whose count gives it {taken}; give coupled layers equal counts")
        picked = _fill(layer.mult[free], need)
        if picked is None:
            unit = np.gcd.reduce(layer.mult[free])
            raise ValueError(f"{source}: '{name}' cannot have exactly {k} channels: its prunable channels come in "
                             f"tied blocks of {unit} (a grouped or depthwise convolution keeps every group equally "
                             f"wide; GroupNorm groups go whole); use a count that differs from {taken} by a "
                             f"multiple of {unit}")
        copies[layer.groups[free]] = picked
        for g in layer.groups[~layer.fixed]:
            owner.setdefault(int(g), name)
    return copies


def _fill(mult: np.ndarray, need: int) -> np.ndarray | None:
    """Copies per group (in order) whose channels add up to ``need``; None if impossible.

    Up to the full width: keep a prefix (skipping blocks too big for what is left).
    Beyond it: every group once, then extra copies from the first group on, cyclically.
    """
    out = np.zeros(len(mult), np.int64)
    left = need
    total = int(mult.sum())
    if need > total > 0:
        out[:] = 1
        left -= total
        rounds, left = divmod(left, total)
        out += rounds
    for i, m in enumerate(mult):
        if m <= left:
            out[i] += 1
            left -= int(m)
    return out if left == 0 else None


def keep_nonempty(s: Structure, copies: np.ndarray, *, warn: bool = True) -> np.ndarray:
    """Revive one group where a layer PyTorch cannot build with zero width would vanish.

    Convolutions and normalization layers need at least one channel (a linear layer may
    reach zero: its consumer then sees only its bias). The revived group is the strongest
    one by the regularizer's vector, or the layer's first group for counts.
    """
    a = s.analysis
    copies = copies.copy()
    if s.nonempty is None:
        s.nonempty = [(module, np.unique(a.group_of[ids])) for module, ids in _nonempty_dims(a)]
    for module, groups in s.nonempty:
        if copies[groups].sum() > 0:
            continue
        g = groups[np.argmax(s.priority[groups])]
        copies[g] = 1
        if warn:
            kind = a.graph.module_types.get(module, nn.Module).__name__
            channels = int((a.group_of[a.module_out_ids.get(module, np.zeros(0, np.int64))] == g).sum()) or 1
            warnings.warn(f"apply_structure: every channel of '{module}' is pruned, but a {kind} cannot have zero "
                          f"width in PyTorch; keeping {channels} channel(s), so it costs a little more than the "
                          f"structure predicts", stacklevel=3)
    return copies


_NONEMPTY = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _nonempty_dims(a: ChannelAnalysis):
    """(module, element ids) of every channel dim that must keep at least one channel."""
    for info in a.weights.values():
        kind = a.graph.module_types.get(info.module)
        if kind is not None and issubclass(kind, nn.modules.conv._ConvNd):
            yield info.module, info.out_ids
            if info.groups > 1 and not info.depthwise:  # a grouped conv cannot read zero channels
                yield info.module, info.in_ids
    for info in a.weights.values():  # the query / key / value projection of an attention module
        parent = info.module.rpartition(".")[0]
        kind = a.graph.module_types.get(parent)
        if kind is not None and info.module.endswith((".qkv", ".c_attn")) and any(
                f"{k.__module__}.{k.__qualname__}" in NEEDS_A_HEAD for k in kind.__mro__):
            yield parent, info.out_ids
    for (state, dim), ids in a.alignments.items():
        owner = state.rpartition(".")[0]
        kind = a.graph.module_types.get(owner)
        if kind is not None and issubclass(kind, _NONEMPTY) and not issubclass(kind, nn.modules.conv._ConvNd):
            yield owner, ids
